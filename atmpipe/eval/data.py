"""Labelled text shipped offline in the `sae-probes` wheel: probing tasks and the bias (SCR) pair.

`sae_probes/data/cleaned_data/*.csv.zst` hold `prompt, target` columns. The package itself is never imported
(it needs transformer_lens); only its data directory is located.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from atmpipe.errors import UserError

if TYPE_CHECKING:
    import pandas as pd  # heavy: only for parquet files


@dataclass(frozen=True)
class ProbeTask:
    name: str
    file: str
    positive: tuple  # target values of the positive class
    negative: tuple | None = None  # None: every other value
    group: str = ""


def _t(name, file, pos=(1,), neg=(0,), group=""):
    return ProbeTask(name, file, pos, neg, group)


# The Wikidata occupations, one sae-probes file each (`wikidata_occupation_is<X>`): the first five are
# probing tasks, all six feed the bias (SCR) table of occupation and gender.
OCCUPATIONS = ("journalist", "athlete", "actor", "politician", "singer", "researcher")
OCCUPATION_FILES = {occ: f"{59 + i}_wikidata_occupation_is{occ}" for i, occ in enumerate(OCCUPATIONS)}

# Binary tasks of the sae-probes data (Kantamneni et al. 2025), grouped by family. 51 tasks over seven families;
# every sentiment/emotion set that ships is here (112_amzn_rev repeats 111_yelp_data's texts and is left out).
TASKS = {
    t.name: t
    for t in [
        # people and places
        _t("hist_fig_ismale", "5_hist_fig_ismale", group="people"),
        _t("hist_fig_isamerican", "6_hist_fig_isamerican", group="people"),
        _t("hist_fig_ispolitician", "7_hist_fig_ispolitician", group="people"),
        _t("wikidata_gender", "56_wikidatasex_or_gender", ("male",), ("female",), "people"),
        _t("wikidata_alive", "57_wikidatais_alive", (True,), (False,), "people"),
        _t(
            "wikidata_party",
            "58_wikidatapolitical_party",
            ("Democratic Party",),
            ("Republican Party",),
            "people",
        ),
        *(_t(f"wikidata_{occ}", OCCUPATION_FILES[occ], group="people") for occ in OCCUPATIONS[:5]),
        _t("nyc_manhattan", "114_nyc_borough_Manhattan", group="people"),
        _t("us_state_ca", "118_us_state_CA", group="people"),
        _t("us_timezone_new_york", "121_us_timezone_New_York", group="people"),
        _t("world_country_us", "124_world_country_United_States", group="people"),
        _t("art_type_book", "126_art_type_book", group="people"),
        _t("athlete_basketball", "155_athlete_sport_basketball", group="people"),
        # news and headlines
        _t("headline_trump", "21_headline_istrump", (True,), (False,), "news"),
        _t("headline_china", "23_headline_ischina", (True,), (False,), "news"),
        _t("headline_iran", "24_headline_isiran", (True,), (False,), "news"),
        _t("headline_frontpage", "26_headline_isfrontpage", group="news"),
        _t("news_politics", "139_news_class_Politics", group="news"),
        _t("news_technology", "140_news_class_Technology", group="news"),
        _t("agnews_world", "161_agnews_0", group="news"),
        _t("agnews_sports", "162_agnews_1", group="news"),
        _t("click_bait", "105_click_bait", ("clickbait",), ("factual",), "news"),
        _t("news_fake", "100_news_fake", group="news"),
        # sentiment and emotion
        _t("sst2", "92_glue_sst2", group="sentiment"),
        _t("movie_sentiment", "113_movie_sent", group="sentiment"),
        _t("amazon_5star", "157_amazon_5star", group="sentiment"),
        _t("yelp_1v5", "111_yelp_data", (4,), (0,), "sentiment"),  # 1 vs 5 stars, as SAEBench's Amazon
        _t("tweet_worry", "148_twt_emotion_worry", group="sentiment"),
        _t("tweet_happiness", "149_twt_emotion_happiness", group="sentiment"),
        _t("tweet_sadness", "150_twt_emotion_sadness", group="sentiment"),
        # code
        _t("code_c", "158_code_C", group="code"),
        _t("code_python", "159_code_Python", group="code"),
        _t("code_html", "160_code_HTML", group="code"),
        # reasoning and truthfulness
        _t("sciq_true", "36_sciq_tf", group="reasoning"),
        _t("truthfulqa_true", "41_truthqa_tf", ("correct",), ("incorrect",), "reasoning"),
        _t("temporal_sense", "42_temp_sense", ("yes",), ("no",), "reasoning"),
        _t("physics_true", "44_phys_tf", group="reasoning"),
        _t("reasoning_a", "47_reasoning_tf", ("A",), ("B",), "reasoning"),
        _t("deontology_valid", "50_deon_isvalid", group="reasoning"),
        _t("commonsense_true", "54_cs_tf", ("yes",), ("no",), "reasoning"),
        _t("cola_grammatical", "87_glue_cola", group="reasoning"),
        _t("mnli_entailment", "136_glue_mnli_entailment", group="reasoning"),
        # arithmetic (the only binary arithmetic set that ships)
        _t("arith_answer_a", "129_arith_mc_A", group="arithmetic"),
        # safety and provenance
        _t("hate_speech", "106_hate_hate", group="other"),
        _t("spam", "96_spam_is", group="other"),
        _t("ai_written", "110_aimade_humangpt3", group="other"),
        _t("toxic", "95_toxic_is", group="other"),
        _t("bigram_high_school", "65_high-school", ("bigram",), ("not_bigram",), "other"),
    ]
}
GROUPS = ("people", "news", "sentiment", "code", "reasoning", "arithmetic", "other")


def default_data_dir() -> Path:
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the labelled datasets (sae-probes==0.4.2) are not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "cleaned_data"


def read_dataset(stem: str, data_dir: Path | None = None) -> pd.DataFrame:
    import pandas as pd  # here, not above: the eval flags are built from this package without pandas
    import zstandard

    path = (data_dir or default_data_dir()) / f"{stem}.csv.zst"
    try:
        with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
            df = pd.read_csv(io.TextIOWrapper(reader, encoding="utf-8"))
    except (OSError, zstandard.ZstdError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise UserError(
            f"cannot read labelled dataset {path} ({type(e).__name__}: {e}); "
            "reinstall sae-probes==0.4.2 (`make setup`) or pass --probing-data DIR"
        ) from None
    missing = {"prompt", "target"} - set(df.columns)
    if missing:
        raise UserError(
            f"labelled dataset {path} lacks column(s) {', '.join(sorted(missing))}; expected prompt, target"
        )
    return df.dropna(subset=["prompt", "target"])


def unique_texts(df: pd.DataFrame) -> pd.DataFrame:
    """Each text once: some sets repeat a text (a name, a headline), which would put it in train and test;
    a text given two labels is dropped."""
    df = df.assign(prompt=df.prompt.astype(str)).drop_duplicates(["prompt", "target"])
    return df[~df.prompt.duplicated(keep=False)]


def task_split(task: ProbeTask, n_train: int, n_test: int, seed: int, data_dir: Path | None = None) -> dict:
    """A class-balanced train/test sample of one binary task: texts and 0/1 labels."""
    df = unique_texts(read_dataset(task.file, data_dir))
    pos = df[df.target.isin(task.positive)]
    neg = df[~df.target.isin(task.positive)] if task.negative is None else df[df.target.isin(task.negative)]
    # The test split is served first (up to half of the smaller class), the training split gets the rest.
    per_class = min(len(pos), len(neg))
    n_te = min(n_test // 2, per_class // 2)
    n_tr = min(n_train // 2, per_class - n_te)
    rng = np.random.default_rng(seed)
    out = {"train_texts": [], "train_labels": [], "test_texts": [], "test_labels": []}
    for label, part in ((1, pos), (0, neg)):
        rows = part.iloc[rng.permutation(len(part))[: n_tr + n_te]].prompt.astype(str).tolist()
        out["train_texts"] += rows[:n_tr]
        out["test_texts"] += rows[n_tr:]
        out["train_labels"] += [label] * n_tr
        out["test_labels"] += [label] * n_te
    return out


def occupation_gender_table(data_dir: Path | None = None) -> pd.DataFrame:
    """People with an occupation label and a gender, joined on the same text (the same Wikidata person).

    Each `wikidata_occupation_is<X>` file holds positive and negative texts about people; the gender file
    holds texts about people too; a text present in both names one person with both attributes. People
    who are positive for more than one occupation are dropped.
    """
    import pandas as pd  # heavy: only for parquet files

    gender = read_dataset("56_wikidatasex_or_gender", data_dir)[["prompt", "target"]].drop_duplicates(
        "prompt"
    )
    gender = gender.rename(columns={"target": "gender"})
    frames = []
    for occ, file in OCCUPATION_FILES.items():
        df = read_dataset(file, data_dir)
        frames.append(df[df.target == 1][["prompt"]].assign(occupation=occ))
    occ = pd.concat(frames).drop_duplicates()
    occ = occ[~occ.prompt.duplicated(keep=False)]
    return occ.merge(gender, on="prompt")


@dataclass(frozen=True)
class ClassSet:
    name: str
    file: str
    classes: tuple  # the target values used, one class each


# Multi-class sets that ship, for TPP (AG News ships only as three one-vs-rest binary files: not here).
CLASS_SETS = {
    c.name: c
    for c in [
        ClassSet("news_class", "97_news_class", ("Politics", "Technology", "Entertainment", "Sport")),
        ClassSet("tweet_emotion", "102_twt_emotion", ("worry", "happiness", "sadness", "surprise")),
        ClassSet("science_category", "99_sci_cat", ("Physics", "Chemistry", "Biology")),
        ClassSet("athlete_sport", "108_athlete_sport", ("football", "basketball", "baseball")),
        ClassSet("art_type", "27_art_type", ("book", "song", "movie")),
    ]
}


def class_split(cs: ClassSet, n_train: int, n_test: int, seed: int, data_dir: Path | None = None) -> dict:
    """Per class up to n_train training and n_test test texts (test first, at most half a class): texts, labels."""
    df = unique_texts(read_dataset(cs.file, data_dir))
    rng = np.random.default_rng(seed)
    out = {"train_texts": [], "train_labels": [], "test_texts": [], "test_labels": []}
    for label, value in enumerate(cs.classes):
        part = df[df.target == value]
        n_te = min(n_test, len(part) // 2)
        rows = part.iloc[rng.permutation(len(part))].prompt.astype(str).tolist()
        out["test_texts"] += rows[:n_te]
        out["train_texts"] += rows[n_te : n_te + n_train]
        out["test_labels"] += [label] * n_te
        out["train_labels"] += [label] * len(rows[n_te : n_te + n_train])
    return out
