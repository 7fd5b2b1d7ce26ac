"""Absorption on a planted case: a synthetic activation space and a hand-built SAE whose extra latents take
over letter a's direction for chosen words. The expected rates are counted by hand from the construction."""

import numpy as np
import pytest
import torch

from atmpipe.eval.absorption import (
    LETTERS,
    AbsorptionConfig,
    absorption_metrics,
    build_prompt,
    ground_truth_probe,
    sample_words,
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


def test_planted_absorber_matches_hand_count():
    n_absorbed, per_letter_test = 5, 12
    sae, xtr, ytr, xte, yte = planted_case(n_absorbed, per_letter_test=per_letter_test)
    out = absorption_metrics(sae, xtr, ytr, xte, yte, AbsorptionConfig())
    assert out["status"] == "ok" and out["letters_passed"] == 26 and out["letters_evaluated"] == 26
    a = out["per_letter"]["a"]
    assert a["main_latents"] == [0] and a["n_probe_true_positives"] == per_letter_test
    # Each absorbed word: main latent silent, absorber carries all of a's probe projection → 1 and full.
    assert a["absorption_fraction"] == pytest.approx(n_absorbed / per_letter_test)
    assert a["full_absorption"] == pytest.approx(n_absorbed / per_letter_test)
    assert a["n_full_absorption"] == n_absorbed
    for c in LETTERS[1:]:
        assert out["per_letter"][c]["absorption_fraction"] == 0.0
    assert out["mean_absorption_fraction"] == pytest.approx(n_absorbed / per_letter_test / 26)
    assert out["mean_full_absorption"] == pytest.approx(n_absorbed / per_letter_test / 26)
    assert out["mean_num_split_features"] == 1.0


def test_no_absorber_scores_zero():
    sae, xtr, ytr, xte, yte = planted_case(0)
    out = absorption_metrics(sae, xtr, ytr, xte, yte, AbsorptionConfig())
    assert out["status"] == "ok"
    assert out["mean_absorption_fraction"] == 0.0 and out["mean_full_absorption"] == 0.0


def test_too_few_letters_reports_counts_instead_of_a_number():
    sae, xtr, ytr, xte, yte = planted_case(0)
    keep_tr, keep_te = ytr < 10, yte < 10  # only 10 letters exist: 16 get F1 0
    out = absorption_metrics(sae, xtr[keep_tr], ytr[keep_tr], xte[keep_te], yte[keep_te], AbsorptionConfig())
    assert out["status"] == "insufficient"
    assert out["letters_passed"] == 10 and out["letters_required"] == 20
    assert "mean_absorption_fraction" not in out
    assert "only 10 of 26 letters" in out["reason"]
    # The gate is an option.
    out = absorption_metrics(
        sae, xtr[keep_tr], ytr[keep_tr], xte[keep_te], yte[keep_te], AbsorptionConfig(min_letters=10)
    )
    assert out["status"] == "ok" and out["letters_evaluated"] == 10


def test_ground_truth_probe_direction_points_at_letter():
    _, xtr, ytr, xte, yte = planted_case(0)
    probe = ground_truth_probe(xtr, ytr, xte, yte)
    assert probe["accuracy"] == 1.0
    assert np.argmax(probe["directions"][3]) == 3


def test_prompt_and_sampling():
    prompt, end = build_prompt("zebra", ["apple", "Banana"], "{word} has the first letter:")
    assert (
        prompt == "apple has the first letter: A\nBanana has the first letter: B\nzebra has the first letter:"
    )
    assert prompt[:end].endswith("zebra") and prompt[end:] == " has the first letter:"
    words = sample_words(["apple", "avocado", "axe", "bee", "Quilt"], per_letter=2, seed=0)
    assert sorted(w[0].lower() for w in words) == ["a", "a", "b", "q"]


@pytest.mark.slow
def test_read_position_is_the_words_own_vocabulary_token():
    """On the real tokenizer every prompt is read at the sampled word's single leading-space token."""
    from atmpipe.eval.absorption import first_letter_dataset
    from atmpipe.lm import load_lm

    tok = load_lm("gemma-3-270m").tokenizer
    ds = first_letter_dataset(tok, AbsorptionConfig(words_per_letter=3))
    assert len(ds["words"]) == 78 and ds["dropped"] == 0
    for word, ids, pos in zip(ds["words"], ds["input_ids"], ds["positions"], strict=True):
        assert tok.convert_ids_to_tokens(ids[pos]) == "▁" + word
        assert tok.decode(ids[pos + 1 :]) == " has the first letter:"
