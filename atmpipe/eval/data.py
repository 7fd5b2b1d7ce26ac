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


TASKS = {
    t.name: t
    for t in [
        ProbeTask("sst2", "92_glue_sst2", (1,), (0,), "sentiment"),
        ProbeTask("amazon_5star", "157_amazon_5star", (1,), (0,), "sentiment"),
        ProbeTask("yelp_1v5", "111_yelp_data", (4,), (0,), "sentiment"),  # 1 vs 5 stars, as SAEBench's Amazon
        ProbeTask("news_politics", "97_news_class", ("Politics",), None, "topic"),
        ProbeTask("agnews_world", "161_agnews_0", (1,), (0,), "topic"),
        ProbeTask("wikidata_gender", "56_wikidatasex_or_gender", ("male",), ("female",), "people"),
        ProbeTask("wikidata_athlete", "60_wikidata_occupation_isathlete", (1,), (0,), "people"),
        ProbeTask("wikidata_politician", "62_wikidata_occupation_ispolitician", (1,), (0,), "people"),
    ]
}
OCCUPATIONS = ("journalist", "athlete", "actor", "politician", "singer", "researcher")


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


def task_split(task: ProbeTask, n_train: int, n_test: int, seed: int, data_dir: Path | None = None) -> dict:
    """A class-balanced train/test sample of one binary task: texts and 0/1 labels."""
    df = read_dataset(task.file, data_dir)
    pos = df[df.target.isin(task.positive)]
    neg = df[~df.target.isin(task.positive)] if task.negative is None else df[df.target.isin(task.negative)]
    n_tr = min(n_train // 2, len(pos), len(neg))
    n_te = min(n_test // 2, min(len(pos), len(neg)) - n_tr)
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
    for i, occ in enumerate(OCCUPATIONS):
        df = read_dataset(f"{59 + i}_wikidata_occupation_is{occ}", data_dir)
        frames.append(df[df.target == 1][["prompt"]].assign(occupation=occ))
    occ = pd.concat(frames).drop_duplicates()
    occ = occ[~occ.prompt.duplicated(keep=False)]
    return occ.merge(gender, on="prompt")
