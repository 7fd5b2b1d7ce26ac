"""Absorption (SAEBench's protocol) on planted cases, hand-checked words, the bootstrap, the word sample and
the prompts. The planted case: a synthetic activation space and a hand-built SAE whose extra latents take over
letter a's direction for chosen words; the expected rates are counted by hand from the construction."""

import numpy as np
import pytest
import torch

from atmpipe.eval.compute.absorption import (
    LETTERS,
    AbsorptionConfig,
    absorption_metrics,
    bootstrap_ci,
    build_prompt,
    ground_truth_probe,
    main_latents,
    sample_vocab,
    word_absorption,
)

D, ALPHA, BETA = 64, 4.0, 3.0


class ReluSAE(torch.nn.Module):
    def __init__(self, W_enc, b_enc, W_dec):
        super().__init__()
        self.W_enc, self.b_enc, self.W_dec = W_enc, b_enc, W_dec
        self.b_dec = torch.zeros(W_dec.shape[1])

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def planted_case(n_absorbed: int, per_letter_train=40, per_letter_test=12, seed=0):
    """Letter c lives on basis vector c; absorbed test words of letter a also carry a private token
    direction (basis 26 + j). Latent c reads letter c; with absorption, latent 26 + j reads token j with
    decoder e_a, and latent a is switched off by any token direction."""
    rng = np.random.default_rng(seed)
    eye = np.eye(D)

    def words(n, letter):
        return ALPHA * eye[letter] + 0.05 * rng.standard_normal((n, D))

    x_train = np.vstack([words(per_letter_train, c) for c in range(26)])
    y_train = np.repeat(np.arange(26), per_letter_train)
    x_test = np.vstack([words(per_letter_test, c) for c in range(26)])
    y_test = np.repeat(np.arange(26), per_letter_test)
    for j in range(n_absorbed):  # the first n_absorbed test words of letter a
        x_test[j] += BETA * eye[26 + j]

    d_sae = 26 + n_absorbed
    W_enc = torch.zeros(D, d_sae)
    b_enc = torch.full((d_sae,), -ALPHA / 2)
    W_dec = torch.zeros(d_sae, D)
    for c in range(26):
        W_enc[c, c], W_dec[c, c] = 1.0, 1.0
    for j in range(n_absorbed):
        W_enc[26 + j, 0] = -10.0  # token j silences the main latent of letter a
        W_enc[26 + j, 26 + j] = 2 * ALPHA / BETA  # fires with magnitude ~ALPHA on token j only
        b_enc[26 + j] = -ALPHA
        W_dec[26 + j, 0] = 1.0
    sae = ReluSAE(W_enc, b_enc, W_dec)
    return sae, x_train, y_train, x_test, y_test


def run_planted(n_absorbed=0, cfg=None, keep=None, **kw):
    sae, xtr, ytr, xte, yte = planted_case(n_absorbed, **kw)
    if keep is not None:
        xtr, ytr, xte, yte = xtr[ytr < keep], ytr[ytr < keep], xte[yte < keep], yte[yte < keep]
    # 50 epochs of one 4096 batch would barely move the L1 ranking probe on ~1,000 planted words
    cfg = cfg or AbsorptionConfig(sparse_probe_batch=64)
    task = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte, "x_score": xte}
    probe = ground_truth_probe(xtr, ytr, xte, yte, cfg)
    return absorption_metrics(sae, task, probe, cfg), probe


def test_planted_absorber_matches_hand_count():
    n_absorbed, per_letter_test = 5, 12
    out, probe = run_planted(n_absorbed, per_letter_test=per_letter_test)
    assert (probe["f1"] == 1.0).all()
    assert out["status"] == "ok" and out["letters_passed"] == 26 and out["letters_evaluated"] == 26
    a = out["per_letter"]["a"]
    assert a["main_latents"] == [0] and a["n_probe_true_positives"] == per_letter_test
    # Each absorbed word: main latent silent, the absorber carries all of a's probe projection → 1 and full.
    assert a["absorption_fraction"] == pytest.approx(n_absorbed / per_letter_test)
    assert a["full_absorption"] == pytest.approx(n_absorbed / per_letter_test)
    assert a["n_full_absorption"] == n_absorbed
    # each absorbed word (test rows 0…4, unnamed here) was taken by its own token latent 26 + j
    assert a["absorbers"] == [{"latent": 26 + j, "words": [f"test word {j}"]} for j in range(n_absorbed)]
    # per scored word, in test order: the first n_absorbed are absorbed, the rest not
    assert a["words"] == [f"test word {j}" for j in range(per_letter_test)]
    assert a["word_fraction"] == [1.0] * n_absorbed + [0.0] * (per_letter_test - n_absorbed)
    assert a["word_full"] == [1] * n_absorbed + [0] * (per_letter_test - n_absorbed)
    for c in LETTERS[1:]:
        assert out["per_letter"][c]["absorption_fraction"] == 0.0
    assert out["mean_absorption_fraction"] == pytest.approx(n_absorbed / per_letter_test / 26)
    assert out["mean_full_absorption"] == pytest.approx(n_absorbed / per_letter_test / 26)
    assert out["mean_num_split_features"] == 1.0
    lo, hi = out["ci95_full_absorption"]
    assert 0 < lo < out["mean_full_absorption"] < hi < 2 * n_absorbed / per_letter_test / 26


def test_no_absorber_scores_zero():
    out, _ = run_planted(0)
    assert out["status"] == "ok"
    assert out["mean_absorption_fraction"] == 0.0 and out["mean_full_absorption"] == 0.0
    assert out["ci95_absorption_fraction"] == [0.0, 0.0]


def test_too_few_letters_reports_counts_instead_of_a_number():
    out, _ = run_planted(0, keep=10)  # only 10 letters exist: 16 get F1 0
    assert out["status"] == "insufficient"
    assert out["letters_passed"] == 10 and out["letters_required"] == 20
    assert "mean_absorption_fraction" not in out
    assert "only 10 of 26 letters" in out["reason"]
    out, _ = run_planted(
        0, keep=10, cfg=AbsorptionConfig(sparse_probe_batch=64, min_letters=10)
    )  # the gate is an option
    assert out["status"] == "ok" and out["letters_evaluated"] == 10


CFG = AbsorptionConfig()


@pytest.mark.parametrize(
    "a_model, f, cos, main, expected",
    [
        # the main latent carries the whole projection: nothing absorbed
        (2.0, [2.0, 1.0], [1.0, 0.5], [0], (0.0, False, [])),
        # main silent; latent 1 carries 0.5·2 = 1.0 of 2.0 (share 0.5 ≥ 0.4): fraction 1, full
        (2.0, [0.0, 2.0], [1.0, 0.5], [0], (1.0, True, [1])),
        # main 1.0 of 3.0, absorber 2.0 (share 2/3): a = min(2, 3 - 1) = 2 → 2 / (2 + 1); main fires: not full
        (3.0, [1.0, 4.0], [1.0, 0.5], [0], (2 / 3, False, [1])),
        # absorber share 1/3 < 0.4: not absorption
        (3.0, [1.0, 2.0], [1.0, 0.5], [0], (0.0, False, [])),
        # absorber cosine 0.09 < 0.1: not a candidate for the fraction; full needs only cos ≥ 0.025, and
        # its absorber is the top-projecting latent
        (1.0, [0.0, 10.0], [1.0, 0.09], [0], (0.0, True, [1])),
        # four absorbers: only the top three count (0.3 + 0.3 + 0.3 = 0.9 ≥ 0.4·1 → fraction 1); ties: lowest first
        (1.0, [0.0, 3, 3, 3, 3], [1.0, 0.1, 0.1, 0.1, 0.1], [0], (1.0, False, [1, 2, 3])),
        # negative probe projection: neither
        (-1.0, [0.0, 2.0], [1.0, 0.5], [0], (0.0, False, [])),
        # zero projection (SAEBench divides by it and raises): neither
        (0.0, [0.0, 2.0], [1.0, 0.5], [0], (0.0, False, [])),
    ],
)
def test_word_absorption_hand_checked(a_model, f, cos, main, expected):
    frac, full, absorbers = word_absorption(a_model, np.array(f), np.array(cos), main, CFG)
    assert frac == pytest.approx(expected[0]) and full == expected[1] and absorbers == expected[2]


def test_main_latents_grow_while_f1_jumps():
    """Letter positives are split over latents 0 and 1 (half each); latent 2 is noise. k=1 finds half the
    positives, k=2 all of them (F1 jump), k=3 adds nothing (stop)."""
    rng = np.random.default_rng(0)
    n = 400
    pos = np.arange(n) < n // 2
    F = rng.random((n, 5)) * 0.01
    F[pos & ((np.arange(n) // 2) % 2 == 0), 0] = 1.0  # rows alternate in pairs: both halves in each split
    F[pos & ((np.arange(n) // 2) % 2 == 1), 1] = 1.0
    ranking = np.array([0.9, 0.8, 0.7, 0.1, 0.0])
    main, f1s = main_latents(F[::2], F[1::2], pos[::2], pos[1::2], ranking, CFG)
    assert main == [0, 1]
    assert f1s[1] == 1.0 and f1s[0] < 0.97 and len(f1s) == 3


def test_bootstrap_ci_over_words():
    const = [np.full(10, 0.5), np.full(4, 0.5)]
    assert bootstrap_ci(const, 200, 0) == [0.5, 0.5]
    rng = np.random.default_rng(1)
    small = [rng.random(20) for _ in range(3)]
    large = [rng.random(2000) for _ in range(3)]
    lo_s, hi_s = bootstrap_ci(small, 500, 0)
    lo_l, hi_l = bootstrap_ci(large, 500, 0)
    assert lo_s < np.mean([v.mean() for v in small]) < hi_s
    assert hi_l - lo_l < (hi_s - lo_s) / 5  # √100 = 10× more words: a much narrower interval
    assert bootstrap_ci(small, 500, 0) == [lo_s, hi_s]  # seeded


def test_prompt_matches_saebench_layout():
    prompt, end = build_prompt(" zebra", [" apple", "Banana"], "{word} has the first letter:")
    assert (
        prompt
        == "\n apple has the first letter: A\nBanana has the first letter: B\n zebra has the first letter:"
    )
    assert prompt[:end].endswith(" zebra") and prompt[end:] == " has the first letter:"


def test_word_sample_natural_frequencies_and_floor():
    vocab = [f"a{i}" for i in range(900)] + [f" b{i}" for i in range(90)] + ["zz", "zy"]
    assert sample_vocab(vocab, 0, 0, 0) == vocab  # 0: the whole vocabulary
    s = sample_vocab(vocab, 200, 0, 0)
    assert len(s) == 200 and s == sample_vocab(vocab, 200, 0, 0) and len(set(s)) == 200
    assert 5 < sum(w.startswith(" b") for w in s) < 35  # ~10% of the sample, as in the vocabulary
    floored = sample_vocab(vocab, 200, 30, 0)
    assert set(s) <= set(floored)  # the floor only adds
    assert sum(w.startswith(" b") for w in floored) >= 30 and {"zz", "zy"} <= set(floored)


@pytest.mark.slow
def test_read_position_is_saebench_offset_on_gemma3():
    """On Gemma 3 the word's last token, found from the tokenisation, is SAEBench's fixed position -6 of
    the full prompt (BOS included), for every word; and it is the word's own vocabulary token."""
    import random

    from atmpipe.eval.compute.absorption import alphabetic_vocab, draw_examples, prompt_tokens
    from atmpipe.lm import load_lm

    tok = load_lm("gemma-3-270m").tokenizer
    vocab = alphabetic_vocab(tok)
    assert len(vocab) > 130_000 and " cat" in vocab and "cat" in vocab
    words = sample_vocab(vocab, 2000, 20, 0)
    rng = random.Random(0)
    for w in words:
        prompt, end = build_prompt(w, draw_examples(rng, words, w, 10), CFG.template)
        ids, pos = prompt_tokens(tok, prompt, end)
        full = tok(prompt)["input_ids"]
        assert full[0] == tok.bos_token_id and pos == len(full) - 6 and ids == full[: pos + 1]
        assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids[pos : pos + 1])) == w
