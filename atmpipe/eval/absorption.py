"""Feature absorption on the first-letter task (Chanin et al.; SAEBench `evals/absorption`).

Two halves: `first_letter_dataset` + `word_activations` build the task from the model's vocabulary and run the
LM (cached per model/layer by the caller); `absorption_metrics` is a pure function of those activations and an
SAE, so it can be checked on a planted case.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

LETTERS = string.ascii_lowercase
EPS = 1e-8


@dataclass
class AbsorptionConfig:
    words_per_letter: int = (
        80  # stratified; on gemma-3-270m fewer than ~64 train words a letter fail the gate
    )
    min_word_letters: int = 3
    icl_examples: int = 2
    # The leading space keeps each word the single vocabulary token it was drawn from ("\n" + " word"
    # tokenises as "\n", "▁word"); without it "affirmat" splits into "aff" + "irmat" and the read token
    # no longer carries the first letter.
    template: str = " {word} has the first letter:"
    test_fraction: float = 0.2
    probe_f1_gate: float = 0.6  # letters whose ground-truth probe F1 is not above this are not evaluated
    min_letters: int = 20  # SAEBench refuses to report with fewer evaluable letters
    max_k: int = 10
    f1_jump: float = 0.03  # a further latent joins the main latents if it raises F1 by more than this
    absorber_cos: float = 0.1
    full_absorption_cos: float = 0.025
    projection_share: float = 0.4
    max_absorbers: int = 3
    seed: int = 0


# --- the task: vocabulary, prompts, token positions -----------------------------------------------------


def alphabetic_vocab(tokenizer, min_letters: int = 3) -> list[str]:
    """Words that are whole tokens made only of English letters (leading-space tokens, as SAEBench)."""
    words = set()
    for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        if not piece or piece[0] not in "▁Ġ ":  # sentencepiece / byte-BPE / plain leading space
            continue
        word = piece[1:]
        if len(word) >= min_letters and word.isascii() and word.isalpha():
            words.add(word)
    return sorted(words)


def sample_words(vocab: list[str], per_letter: int, seed: int) -> list[str]:
    """Up to `per_letter` words for each first letter, so rare letters are not drowned out."""
    rng = random.Random(seed)
    by_letter: dict[str, list[str]] = {c: [] for c in LETTERS}
    for w in vocab:
        by_letter[w[0].lower()].append(w)
    chosen = []
    for c in LETTERS:
        pool = by_letter[c]
        chosen += rng.sample(pool, min(per_letter, len(pool)))
    return chosen


def build_prompt(word: str, examples: list[str], template: str) -> tuple[str, int]:
    """In-context examples then the word's own line; returns the prompt and the char index where `word` ends."""
    lines = [template.format(word=e) + " " + e[0].upper() for e in examples]
    prefix = "\n".join(lines + [""]) if lines else ""
    return prefix + template.format(word=word), len(prefix) + template.index("{word}") + len(word)


def prompt_tokens(tokenizer, prompt: str, word_end: int) -> tuple[list[int], int] | None:
    """Token ids of the prompt and the position of the word's last token, read from the tokenisation.

    The position is the last token of the tokenised prefix that ends with the word; this holds only when
    the prompt's tokens start with the prefix's tokens (a merge across the word's end would break it), so
    such prompts are dropped (None).
    """
    ids = tokenizer(prompt)["input_ids"]
    prefix = tokenizer(prompt[:word_end])["input_ids"]
    if ids[: len(prefix)] != prefix:
        return None
    return ids, len(prefix) - 1


def first_letter_dataset(tokenizer, cfg: AbsorptionConfig) -> dict:
    """Sampled words, their prompts' token ids and word positions, labels and the train/test split."""
    vocab = alphabetic_vocab(tokenizer, cfg.min_word_letters)
    words = sample_words(vocab, cfg.words_per_letter, cfg.seed)
    rng = random.Random(cfg.seed + 1)
    rows = []
    for w in words:
        examples = rng.sample(
            [v for v in rng.sample(vocab, cfg.icl_examples + 1) if v != w], cfg.icl_examples
        )
        prompt, end = build_prompt(w, examples, cfg.template)
        tok = prompt_tokens(tokenizer, prompt, end)
        if tok is not None:
            rows.append((w, tok[0], tok[1]))
    # Stratified 80/20 split: every letter keeps test words.
    is_test = np.zeros(len(rows), dtype=bool)
    labels = np.array([LETTERS.index(w[0].lower()) for w, _, _ in rows])
    split_rng = np.random.default_rng(cfg.seed)
    for c in range(26):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * cfg.test_fraction))
        is_test[split_rng.permutation(idx)[:n_test]] = True
    return {
        "words": [w for w, _, _ in rows],
        "input_ids": [ids for _, ids, _ in rows],
        "positions": [p for _, _, p in rows],
        "labels": labels,
        "is_test": is_test,
        "vocab_size": len(vocab),
        "dropped": len(words) - len(rows),
    }


@torch.no_grad()
def word_activations(
    lm, layer: int, input_ids: list[list[int]], positions: list[int], batch_size: int = 32, progress=None
) -> torch.Tensor:
    """Residual at `layer` on each prompt's word position: [n_prompts, d_model] float32."""
    from atmpipe.lm import capture

    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(input_ids), batch_size):
        batch = input_ids[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):  # right padding: positions stay as tokenised
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        resid = capture(lm, ids.to(lm.device), [layer], attention_mask=mask.to(lm.device))[layer]
        pos = torch.tensor(positions[start : start + batch_size], device=resid.device)
        out.append(resid[torch.arange(len(batch), device=resid.device), pos].float().cpu())
        if progress is not None:
            progress(len(batch))
    return torch.cat(out)


# --- the pure metric ----------------------------------------------------------------------------------


class CenteredScale:
    """Centre the residual and divide by one scalar, the RMS of its per-dimension spread.

    The residual carries a few huge constant offsets (one dimension averages ~7000 on gemma-3-270m against
    a typical spread of ~30), so the old scale, the mean norm, shrank every informative dimension ~200-fold
    and the probe's L2 penalty erased them. One scalar keeps probe weights in residual coordinates; a
    per-dimension scale would inflate the weights of near-constant dimensions.
    """

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(0)
        self.scale = float(np.sqrt(x.var(0).mean())) or 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


def ground_truth_probe(
    acts_train: np.ndarray, y_train: np.ndarray, acts_test: np.ndarray, y_test: np.ndarray, seed: int = 0
) -> dict:
    """26-way logistic regression on the centred, scaled residual; per-letter test F1 and unit directions."""
    prep = CenteredScale(acts_train)
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(prep(acts_train), y_train)
    pred = clf.predict(prep(acts_test))
    letters = list(range(26))
    f1 = f1_score(y_test, pred, labels=letters, average=None, zero_division=0)
    directions = np.zeros((26, acts_train.shape[1]))
    directions[clf.classes_] = clf.coef_ if len(clf.classes_) > 2 else np.vstack([-clf.coef_, clf.coef_])
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    return {
        "directions": directions / np.where(norms > 0, norms, 1.0),
        "f1": f1,
        "pred_test": pred,
        "accuracy": float((pred == y_test).mean()),
    }


def _fit_sparse(F_train, y_train, F_test, y_test, feats, seed):
    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(F_train[:, feats], y_train)
    score = clf.decision_function(F_test[:, feats])
    return f1_score(y_test, score > 0, zero_division=0), score


def main_latents(
    F_train: np.ndarray,
    F_test: np.ndarray,
    is_pos_train: np.ndarray,
    is_pos_test: np.ndarray,
    cfg: AbsorptionConfig,
) -> tuple[list[int], np.ndarray, list[float]]:
    """k-sparse probing: rank latents by mean difference, grow k while F1 jumps by more than `f1_jump`.

    Returns the main latents, the chosen probe's test scores, and the F1 for each k tried.
    """
    diff = F_train[is_pos_train].mean(0) - F_train[~is_pos_train].mean(0)
    ranked = np.argsort(-diff, kind="stable")[: cfg.max_k]
    best, main, main_score, f1s = -math.inf, [], None, []
    for k in range(1, len(ranked) + 1):
        f1, score = _fit_sparse(F_train, is_pos_train, F_test, is_pos_test, ranked[:k], cfg.seed)
        f1s.append(float(f1))
        if f1 > best + cfg.f1_jump:
            best, main, main_score = f1, ranked[:k].tolist(), score
        else:
            break
    return main, main_score, f1s


def word_absorption(
    x: np.ndarray, f: np.ndarray, cos: np.ndarray, p: np.ndarray, main: list[int], cfg: AbsorptionConfig
) -> tuple[float, bool]:
    """Absorption fraction and full absorption of one word (SAEBench's calculator, docs/metrics.md)."""
    a_model = float(x @ p)
    proj = f * cos
    main_proj = float(proj[main].sum())
    candidates = np.ones(len(f), dtype=bool)
    candidates[main] = False
    candidates &= (cos >= cfg.absorber_cos) & (proj > 0)
    absorbers = np.sort(proj[candidates])[::-1][: cfg.max_absorbers]
    absorbed = float(absorbers.sum())
    if a_model <= 0 or main_proj >= a_model or absorbed / a_model < cfg.projection_share:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        a = min(absorbed, a_model - main_proj)
        fraction = float(np.clip(a / (a + main_proj), 0.0, 1.0))
    top = int(np.argmax(proj))
    full = bool(
        np.all(np.abs(f[main]) < EPS)
        and cos[top] >= cfg.full_absorption_cos
        and a_model > 0
        and proj[top] / a_model >= cfg.projection_share
    )
    return fraction, full


@torch.no_grad()
def encode_all(sae, acts: np.ndarray, batch: int = 4096) -> np.ndarray:
    return np.concatenate(
        [
            sae.encode(torch.as_tensor(acts[i : i + batch]).float()).float().cpu().numpy()
            for i in range(0, len(acts), batch)
        ]
    )


def absorption_metrics(
    sae,
    acts_train: np.ndarray,
    y_train: np.ndarray,
    acts_test: np.ndarray,
    y_test: np.ndarray,
    cfg: AbsorptionConfig,
    probe: dict | None = None,
) -> dict:
    """Mean absorption fraction, full-absorption rate and split features, per letter and over letters.

    Evaluated words (SAEBench): test words of a letter the ground-truth probe gets right on which the
    main-latent probe does not fire; each letter's sums are divided by its number of probe true positives.
    """
    probe = probe or ground_truth_probe(acts_train, y_train, acts_test, y_test, cfg.seed)
    passed = [c for c in range(26) if probe["f1"][c] > cfg.probe_f1_gate]
    base = {
        "n_words_train": int(len(y_train)),
        "n_words_test": int(len(y_test)),
        "probe_accuracy": probe["accuracy"],
        "probe_f1": {LETTERS[c]: float(probe["f1"][c]) for c in range(26)},
        "letters_passed": len(passed),
        "letters_required": cfg.min_letters,
        "probe_f1_gate": cfg.probe_f1_gate,
    }
    if len(passed) < cfg.min_letters:
        return base | {
            "status": "insufficient",
            "reason": f"only {len(passed)} of 26 letters have ground-truth probe F1 > {cfg.probe_f1_gate} "
            f"(need {cfg.min_letters}); sample more words per letter or lower the gate",
        }
    F_train, F_test = encode_all(sae, acts_train), encode_all(sae, acts_test)
    W_dec = sae.W_dec.detach().float().cpu().numpy()
    dec_unit = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    per_letter = {}
    for c in passed:
        p = probe["directions"][c]
        main, score, f1s = main_latents(F_train, F_test, y_train == c, y_test == c, cfg)
        true_pos = np.flatnonzero((y_test == c) & (probe["pred_test"] == c))
        if len(true_pos) == 0:
            continue
        cos = dec_unit @ p
        fractions, fulls = 0.0, 0
        for i in true_pos:
            if score[i] > 0:  # the main latents' probe fires: nothing is absorbed
                continue
            frac, full = word_absorption(acts_test[i], F_test[i], cos, p, main, cfg)
            fractions += frac
            fulls += int(full)
        per_letter[LETTERS[c]] = {
            "absorption_fraction": fractions / len(true_pos),
            "full_absorption": fulls / len(true_pos),
            "n_full_absorption": fulls,
            "n_probe_true_positives": int(len(true_pos)),
            "main_latents": [int(m) for m in main],
            "num_split_features": len(main),
            "sparse_probe_f1": f1s,
        }
    if not per_letter:
        return base | {"status": "insufficient", "reason": "no test word was classified right by the probe"}
    rows = per_letter.values()
    return base | {
        "status": "ok",
        "mean_absorption_fraction": float(np.mean([r["absorption_fraction"] for r in rows])),
        "mean_full_absorption": float(np.mean([r["full_absorption"] for r in rows])),
        "mean_num_split_features": float(np.mean([r["num_split_features"] for r in rows])),
        "letters_evaluated": len(per_letter),
        "per_letter": per_letter,
    }
