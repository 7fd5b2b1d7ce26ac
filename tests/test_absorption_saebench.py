"""atmpipe's absorption steps equal SAEBench 0.6's own functions on fixed inputs (the planted case).

SAEBench runs in .venv-saebench (`make saebench`; it pins numpy < 2) through tests/saebench_reference.py;
the test is skipped where that venv is missing. Same seed, same inputs: the probes are trained with the same
random stream, so weights agree to float rounding, and the main latents, F1s and per-word scores exactly.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from atmpipe.eval.compute.absorption import (
    LETTERS,
    AbsorptionConfig,
    encode_all,
    ground_truth_probe,
    latent_ranking,
    main_latents,
    word_absorption,
)

ROOT = Path(__file__).resolve().parent.parent
SAEBENCH_PY = ROOT / ".venv-saebench" / "bin" / "python"
sys.path.insert(0, str(Path(__file__).parent))
from test_eval_absorption import planted_case  # noqa: E402

pytestmark = pytest.mark.skipif(not SAEBENCH_PY.exists(), reason="no .venv-saebench (make saebench)")


def saved_matryoshka(planted, path: Path):
    """The planted SAE as a saved atmpipe Matryoshka SAE (its weights, a threshold of 0.1), loaded back:
    SAEBench reads the same directory through SAELens, as it reads any SAELens SAE."""
    from atmpipe.sae import SAE, SAEConfig, make_sae

    d_in, d_sae = planted.W_enc.shape
    sae = make_sae(SAEConfig("matryoshka", d_in, d_sae, {"k": 4, "prefix_fractions": [0.5, 1]}))
    weights = {"W_enc": planted.W_enc, "b_enc": planted.b_enc, "W_dec": planted.W_dec, "b_dec": planted.b_dec}
    sae.load_weights({**weights, "threshold": torch.full((d_sae,), 0.1)})
    sae.save(path, {})
    return SAE.load(path).eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["relu", "matryoshka"])
def test_probe_selection_and_scoring_equal_saebench(tmp_path, kind):
    cfg = AbsorptionConfig(seed=3)  # the defaults: they must be SAEBench's
    sae, xtr, ytr, xte, yte = planted_case(5, per_letter_train=24, per_letter_test=12)
    sae_dir = ""
    if kind == "matryoshka":  # a saved atmpipe SAE, loaded by SAEBench through SAELens as a JumpReLU
        sae_dir = str(tmp_path / "matryoshka")
        sae = saved_matryoshka(sae, Path(sae_dir))
    rng = np.random.default_rng(1)
    x_score = xte + 0.3 * rng.standard_normal(xte.shape)  # the re-prompted words differ from the probe's
    xtr, xte, x_score = (a.astype(np.float32) for a in (xtr, xte, x_score))
    letter = 0
    np.savez(
        tmp_path / "in.npz",
        x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, x_score=x_score,
        W_enc=sae.W_enc.detach().numpy(), b_enc=sae.b_enc.detach().numpy(), W_dec=sae.W_dec.detach().numpy(),
        b_dec=sae.b_dec.detach().numpy(), seed=cfg.seed, letter=letter, sae_dir=sae_dir,
    )  # fmt: skip
    subprocess.run(
        [
            str(SAEBENCH_PY),
            str(ROOT / "tests" / "saebench_reference.py"),
            tmp_path / "in.npz",
            tmp_path / "out.npz",
        ],
        check=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},  # tiny GEMMs: threads only add hand-off waits
    )
    ref = np.load(tmp_path / "out.npz")
    assert ref["batches"].tolist() == [cfg.probe_batch, cfg.sparse_probe_batch]

    probe = ground_truth_probe(xtr, ytr, xte, yte, cfg)
    np.testing.assert_allclose(probe["weights"], ref["gt_weights"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probe["bias"], ref["gt_bias"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probe["f1"], ref["f1_probe"], atol=1e-12)

    F_train, F_test = encode_all(sae, xtr), encode_all(sae, xte)
    ranking = latent_ranking(F_train, ytr, cfg)
    for c in range(len(LETTERS)):
        main, f1s = main_latents(F_train, F_test, ytr == c, yte == c, ranking[c], cfg)
        assert main == [int(m) for m in ref["split_feats"][c] if m >= 0], LETTERS[c]
        np.testing.assert_allclose(f1s, ref["f1_sparse"][c][: len(f1s)], atol=1e-12)

    main = [int(m) for m in ref["split_feats"][letter] if m >= 0]
    true_pos = np.flatnonzero((yte == letter) & (probe["test_logits"][:, letter] > 0))
    np.testing.assert_array_equal(true_pos, ref["true_pos"])
    direction = probe["weights"][letter] / np.linalg.norm(probe["weights"][letter])
    W_dec = sae.W_dec.detach().numpy()
    cos = W_dec @ direction / np.maximum(np.linalg.norm(W_dec, axis=1), 1e-8)
    F_score = encode_all(sae, x_score)
    scored = [word_absorption(float(x_score[i] @ direction), F_score[i], cos, main, cfg) for i in true_pos]
    np.testing.assert_allclose([s[0] for s in scored], ref["fractions"], atol=1e-5)
    assert [s[1] for s in scored] == ref["fulls"].tolist()
    assert ref["fulls"].sum() > 0 and ref["fractions"].sum() > 0  # the planted absorbers are found
