"""Feature absorption on the first-letter task, computed the way SAEBench 0.6's absorption eval computes it.

Two halves. The task (`first_letter_task` + `word_activations`) builds prompts from the model's vocabulary and
runs the LM; the caller caches it per model and layer. The metric (`absorption_metrics`) is a pure function of
those activations and an SAE, checked on planted cases and against SAEBench's own functions (tests).

Steps, each as SAEBench's code does it (docs/metrics.md has the full account):
1. words: every vocabulary token that reads as ASCII letters, with or without a leading space; optionally a
   random sample at natural letter frequencies (the one deviation, for CPU budget; recorded with its own
   seed, so that the protocol's seed varies split, examples and probes over the same words, as SAEBench's
   seed does over its whole vocabulary);
2. a shuffled 80/20 word split; each word's prompt is a newline, 10 in-context examples drawn from its own
   split ("cat has the first letter: C") and "{word} has the first letter:", read at the word's last token;
3. ground-truth probe: 26 one-vs-rest logistic probes on the raw residual, Adam with class-weighted BCE;
   a word is positive for a letter when that letter's logit is above 0; letters need test F1 > 0.6;
4. main latents: an L1-penalised one-vs-rest probe on the SAE latents ranks them; class-balanced logistic
   regressions on the top k grow k while test F1 rises by more than 0.03;
5. scoring: every test word the probe gets right, re-prompted with 10 fresh examples from the whole
   vocabulary, gets an absorption fraction and a full-absorption flag; per letter, sums over its probe true
   positives; the headline is the mean over letters, with a bootstrap CI over words.
"""

from __future__ import annotations

import hashlib
import math
import random
import string
from typing import NamedTuple

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from atmpipe.eval.compute.absorption_config import AbsorptionConfig
from atmpipe.lm import capture

LETTERS = string.ascii_lowercase
EPS = 1e-8  # a main latent below this counts as silent
PROTOCOL = "saebench-0.6"


# --- the task: vocabulary, sample, prompts, token positions --------------------------------------------


def first_letter(word: str) -> str:
    return word.strip()[0].lower()


def alphabetic_vocab(tokenizer) -> list[str]:
    """Every token whose text is ASCII letters, with or without one leading space (" cat" and "cat")."""
    words = set()
    for piece in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([piece])
        if piece.startswith("▁") and not text.startswith(" "):  # tokenizers that drop the marker's space
            text = " " + text
        core = text[1:] if text.startswith(" ") else text
        if core and core.isascii() and core.isalpha():
            words.add(text)
    return sorted(words)


def sample_vocab(vocab: list[str], n: int, min_per_letter: int, seed: int) -> list[str]:
    """A uniform random sample of `n` words (natural letter frequencies), topped up per letter to the floor."""
    if n <= 0 or n >= len(vocab):
        return list(vocab)
    order = np.random.default_rng(seed).permutation(len(vocab))
    chosen = set(order[:n].tolist())
    counts = {c: 0 for c in LETTERS}
    for i in chosen:
        counts[first_letter(vocab[i])] += 1
    for i in order[n:].tolist():  # the floor draws from the same random order
        c = first_letter(vocab[i])
        if counts[c] < min_per_letter:
            chosen.add(i)
            counts[c] += 1
    return [vocab[i] for i in sorted(chosen)]


def build_prompt(word: str, examples: list[str], template: str) -> tuple[str, int]:
    """A newline, the in-context examples, then the word's own line; returns it and the char index where
    `word` ends (the newline in front keeps the first example's tokenisation like the others')."""
    lines = [template.format(word=e) + " " + first_letter(e).upper() for e in examples]
    prefix = "\n" + "".join(line + "\n" for line in lines)
    return prefix + template.format(word=word), len(prefix) + template.index("{word}") + len(word)


def draw_examples(rng: random.Random, pool: list[str], word: str, k: int) -> list[str]:
    """`k` in-context examples from `pool`, redrawn while they contain the word itself."""
    if len(pool) <= k:  # a tiny sample: every other word (SAEBench cannot draw k here and raises)
        return [v for v in pool if v != word]
    while True:
        examples = rng.sample(pool, k)
        if word not in examples:
            return examples


def prompt_tokens(tokenizer, prompt: str, word_end: int) -> tuple[list[int], int] | None:
    """Token ids of the prompt up to the word, and the position of the word's last token.

    The position comes from the tokenisation (on Gemma 3 it is SAEBench's fixed offset, 6 from the end; a
    test checks this). A prompt whose tokens merge across the word's end has no such position: None. The
    ids stop at the word: a causal LM's residual there does not depend on what follows.
    """
    ids = tokenizer(prompt)["input_ids"]
    prefix = tokenizer(prompt[:word_end])["input_ids"]
    if ids[: len(prefix)] != prefix:
        return None
    return prefix, len(prefix) - 1


def first_letter_task(tokenizer, cfg: AbsorptionConfig) -> dict:
    """The word sample, its split, and the prompts: one per word from its own split's examples, and for
    each test word a second, scoring prompt with fresh examples from the whole sample (as SAEBench, where
    the sample is the vocabulary). A word whose prompt cannot be read at its last token is dropped."""
    vocab = alphabetic_vocab(tokenizer)
    words = sample_vocab(vocab, cfg.sample_words, cfg.min_words_per_letter, cfg.sample_seed)
    rng = random.Random(cfg.seed)
    shuffled = rng.sample(words, len(words))
    n_train = int(len(shuffled) * cfg.train_fraction)
    splits = {"train": shuffled[:n_train], "test": shuffled[n_train:]}
    pools = {"train": splits["train"], "test": splits["test"], "score": words}
    out = {k: {"words": [], "input_ids": [], "positions": []} for k in pools}
    dropped = 0
    for split, split_words in splits.items():
        for w in split_words:
            kinds = ("test", "score") if split == "test" else ("train",)
            toks = {
                k: prompt_tokens(
                    tokenizer,
                    *build_prompt(w, draw_examples(rng, pools[k], w, cfg.icl_examples), cfg.template),
                )
                for k in kinds
            }
            if any(t is None for t in toks.values()):
                dropped += 1
                continue
            for k, (ids, pos) in toks.items():
                out[k]["words"].append(w)
                out[k]["input_ids"].append(ids)
                out[k]["positions"].append(pos)
    for part in out.values():
        part["labels"] = np.array([LETTERS.index(first_letter(w)) for w in part["words"]], dtype=np.int64)
    return out | {
        "vocab_size": len(vocab),
        "n_sampled": len(words),
        "sample_sha256": hashlib.sha256("\n".join(words).encode()).hexdigest(),
        "dropped": dropped,
    }


@torch.no_grad()
def word_activations(
    lm, layer: int, input_ids: list[list[int]], positions: list[int], batch_size: int = 32, progress=None
) -> torch.Tensor:
    """Residual at `layer` on each prompt's word position: [n_prompts, d_model] float32."""
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


# --- probes -----------------------------------------------------------------------------------------


def train_probes(
    x: np.ndarray, labels: np.ndarray, cfg: AbsorptionConfig, *, l1_ranking: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """26 one-vs-rest logistic probes trained together: Adam, BCE weighted by negatives/positives per letter,
    learning rate decayed exponentially from `probe_lr` to `probe_end_lr` over the epochs, shuffled
    mini-batches. The ground-truth probe (`probe_batch`, `probe_weight_decay`), or with `l1_ranking` the
    latents' ranking probe (`sparse_probe_batch`, `sparse_weight_decay`, and an L1 penalty: `sparse_l1` ×
    mean over letters of the summed |weights|). Returns weights [26, d] and biases.

    The seed fixes the initialisation and batch order through torch's global generator, which is restored
    afterwards: the same consumption as SAEBench's trainer, so both give the same probe on the same seed.
    """
    if l1_ranking:
        batch, weight_decay, l1 = cfg.sparse_probe_batch, cfg.sparse_weight_decay, cfg.sparse_l1
    else:
        batch, weight_decay, l1 = cfg.probe_batch, cfg.probe_weight_decay, 0.0
    epochs, lr, end_lr = cfg.probe_epochs, cfg.probe_lr, cfg.probe_end_lr
    xt = torch.as_tensor(x, dtype=torch.float32)
    y = torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), len(LETTERS)).float()
    pos = y.sum(0)
    pos_weight = torch.where(pos > 0, (len(y) - pos) / pos.clamp(min=1), torch.ones_like(pos))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small GEMMs: on busy cores, thread hand-offs cost ~10x the arithmetic
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(cfg.seed)
        probe = torch.nn.Linear(xt.shape[1], len(LETTERS))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, y), batch, shuffle=True)
        opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
        for _ in range(epochs):
            for xb, yb in loader:
                opt.zero_grad()
                loss = loss_fn(probe(xb), yb)
                if l1:
                    loss = loss + l1 * probe.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    torch.set_num_threads(threads)
    return probe.weight.detach().numpy().copy(), probe.bias.detach().numpy().copy()


def ground_truth_probe(x_train, y_train, x_test, y_test, cfg: AbsorptionConfig) -> dict:
    """The letter probes on the raw residual, their test logits and per-letter test F1 (logit > 0)."""
    W, b = train_probes(x_train, y_train, cfg)
    logits = x_test.astype(np.float32) @ W.T + b
    f1 = [f1_score(y_test == c, logits[:, c] > 0, zero_division=0) for c in range(len(LETTERS))]
    return {"weights": W, "bias": b, "test_logits": logits, "f1": np.array(f1)}


def main_latents(
    F_train: np.ndarray,
    F_test: np.ndarray,
    is_pos_train: np.ndarray,
    is_pos_test: np.ndarray,
    ranking: np.ndarray,
    cfg: AbsorptionConfig,
) -> tuple[list[int], list[float]]:
    """Latents of one letter, by k-sparse probing: the top k of the L1 probe's weights (largest first, not
    by magnitude), a class-balanced logistic regression on them, test F1 of decision > 0; k grows while F1
    rises by more than `f1_jump`. Returns the main latents and the F1 for each k tried."""
    w = torch.as_tensor(ranking)
    main, best, f1s = [], -math.inf, []
    for k in range(1, cfg.max_k + 1):
        feats = w.topk(k).indices.numpy()
        clf = LogisticRegression(max_iter=500, class_weight="balanced")
        clf.fit(F_train[:, feats], is_pos_train.astype(np.int64))
        f1 = float(f1_score(is_pos_test, clf.decision_function(F_test[:, feats]) > 0, zero_division=0))
        f1s.append(f1)
        if f1 <= best + cfg.f1_jump:
            break
        best, main = f1, feats.tolist()
    return main, f1s


def latent_ranking(F_train: np.ndarray, y_train: np.ndarray, cfg: AbsorptionConfig) -> np.ndarray:
    """Weights [26, d_sae] of the L1-penalised one-vs-rest probe on the latents: they rank the latents."""
    return train_probes(F_train, y_train, cfg, l1_ranking=True)[0]


def probe_cosines(probe: dict, c: int, W_dec) -> tuple[np.ndarray, np.ndarray]:
    """Letter c's unit probe direction (weights, no bias) and each decoder row's cosine with it."""
    direction = torch.as_tensor(probe["weights"][c]).float()
    direction = direction / direction.norm()
    W = W_dec.detach().float().cpu()
    return direction.numpy(), torch.nn.functional.cosine_similarity(direction[None], W, dim=-1).numpy()


# --- the per-word calculator and the aggregate -------------------------------------------------------


class WordScore(NamedTuple):
    fraction: float
    full: bool
    absorbers: list[int]  # the latents that took the word: the fraction's top candidates, else full's top


def word_absorption(
    a_model: float, f: np.ndarray, cos: np.ndarray, main: list[int], cfg: AbsorptionConfig
) -> WordScore:
    """Absorption fraction, full absorption and absorbing latents of one word.

    `a_model` is the residual's projection on the unit probe direction, `f` the SAE latents, `cos` each
    decoder row's cosine with the probe. SAEBench divides by `a_model`; at exactly 0 (where it would raise)
    this scores 0 and not full.
    """
    proj = f * cos
    main_proj = float(proj[main].sum())
    candidates = np.ones(len(f), dtype=bool)
    candidates[main] = False
    candidates &= (cos >= cfg.absorber_cos) & (proj > 0)
    idx = np.flatnonzero(candidates)
    top_candidates = idx[np.argsort(-proj[idx], kind="stable")][: cfg.max_absorbers]
    absorbed = float(proj[top_candidates].sum())
    if a_model == 0:
        return WordScore(0.0, False, [])
    if main_proj >= a_model or absorbed / a_model < cfg.projection_share:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        a = min(absorbed, a_model - main_proj)
        fraction = float(np.clip(a / (a + main_proj), 0.0, 1.0))
    top = int(np.argmax(proj))
    full = bool(
        np.all(f[main] < EPS)
        and cos[top] >= cfg.full_absorption_cos
        and a_model >= 0
        and proj[top] / a_model >= cfg.projection_share
    )
    absorbers = top_candidates.tolist() if fraction > 0 else [top] if full else []
    return WordScore(fraction, full, absorbers)


def absorbers_by_latent(scored: list[WordScore], words: list[str]) -> list[dict]:
    """Each absorbing latent with the words it took, most words first (ties: lower latent first)."""
    taken: dict[int, list[str]] = {}
    for score, word in zip(scored, words, strict=True):
        for j in score.absorbers:
            taken.setdefault(int(j), []).append(word)
    return [{"latent": j, "words": w} for j, w in sorted(taken.items(), key=lambda t: (-len(t[1]), t[0]))]


@torch.no_grad()
def encode_all(sae, acts: np.ndarray, batch: int = 4096) -> np.ndarray:
    device = sae.W_dec.device
    return np.concatenate(
        [
            sae.encode(torch.as_tensor(acts[i : i + batch]).float().to(device)).float().cpu().numpy()
            for i in range(0, len(acts), batch)
        ]
    )


def bootstrap_ci(per_letter_words: list[np.ndarray], n: int, seed: int) -> list[float]:
    """95% interval of the mean over letters of each letter's mean over words, resampling words within each
    letter (the letters stay fixed: their set is decided by the probe, not sampled)."""
    if n <= 0 or not per_letter_words:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = np.zeros(n)
    for values in per_letter_words:
        means += values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    means /= len(per_letter_words)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def absorption_metrics(sae, task: dict, probe: dict, cfg: AbsorptionConfig) -> dict:
    """Per-letter and mean absorption fraction, full-absorption rate, split features and absorbers of one SAE.

    `task` holds `x_train`, `y_train`, `x_test`, `y_test` (probe prompts), `x_score` (the test words'
    fresh prompts, row for row with `x_test`) and optionally `words_test` (to name the absorbed words);
    `probe` is `ground_truth_probe`'s output.
    """
    passed = [c for c in range(len(LETTERS)) if probe["f1"][c] > cfg.probe_f1_gate]
    required = max(cfg.min_letters, 1)  # with no letter at all there is no mean to take, whatever the gate
    base = {"protocol": PROTOCOL, "letters_passed": len(passed), "letters_required": required}
    if len(passed) < required:
        return base | {
            "status": "insufficient",
            "reason": f"only {len(passed)} of 26 letters have ground-truth probe F1 > {cfg.probe_f1_gate} "
            f"(need {required}); sample more words or lower --absorption-min-letters",
        }
    F_train, F_test = encode_all(sae, task["x_train"]), encode_all(sae, task["x_test"])
    F_score = encode_all(sae, task["x_score"])
    ranking = latent_ranking(F_train, task["y_train"], cfg)
    y_tr, y_te = task["y_train"], task["y_test"]
    words = task.get("words_test") or [f"test word {i}" for i in range(len(y_te))]
    per_letter, fractions, fulls = {}, [], []
    for c in passed:
        main, f1s = main_latents(F_train, F_test, y_tr == c, y_te == c, ranking[c], cfg)
        true_pos = np.flatnonzero((y_te == c) & (probe["test_logits"][:, c] > 0))
        direction, cos = probe_cosines(probe, c, sae.W_dec)
        a_model = task["x_score"][true_pos].astype(np.float32) @ direction
        scored = [
            word_absorption(float(a), F_score[i], cos, main, cfg)
            for a, i in zip(a_model, true_pos, strict=True)
        ]
        frac = np.array([s.fraction for s in scored], dtype=float)
        full = np.array([s.full for s in scored], dtype=float)
        fractions.append(frac)
        fulls.append(full)
        per_letter[LETTERS[c]] = {
            "absorption_fraction": float(frac.mean()),
            "full_absorption": float(full.mean()),
            "n_full_absorption": int(full.sum()),
            "n_probe_true_positives": int(len(true_pos)),
            "main_latents": [int(m) for m in main],
            "num_split_features": len(main),
            "sparse_probe_f1": f1s,
            "absorbers": absorbers_by_latent(scored, [words[i] for i in true_pos]),
            # Per scored word, in one order for every SAE of an eval (the probe picks them): what a paired
            # comparison of two SAEs resamples.
            "words": [words[i] for i in true_pos],
            "word_fraction": [round(float(v), 6) for v in frac],
            "word_full": [int(v) for v in full],
        }
    rows = per_letter.values()
    return base | {
        "status": "ok",
        "mean_absorption_fraction": float(np.mean([r["absorption_fraction"] for r in rows])),
        "mean_full_absorption": float(np.mean([r["full_absorption"] for r in rows])),
        "ci95_absorption_fraction": bootstrap_ci(fractions, cfg.bootstrap, cfg.seed),
        "ci95_full_absorption": bootstrap_ci(fulls, cfg.bootstrap, cfg.seed),
        "mean_num_split_features": float(np.mean([r["num_split_features"] for r in rows])),
        "letters_evaluated": len(per_letter),
        "per_letter": per_letter,
    }
