"""ATM's masking diagnostics: the numbers by hand, and the report section of a real eval (a tiny Gemma-3,
a store captured from it, an ATM SAE trained by `atmpipe train`) against a recomputation from the SAE's
atm_stats.safetensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.eval.metrics import masking
from atmpipe.store import write_arrays_store
from atmpipe.train import TrainConfig, train


def test_diagnostics_by_hand():
    stats = {
        "I": np.array([0.0, 0.5, 1.0, 4.0]),
        "p": np.array([0.6, 0.4, 0.2, 0.0]),
        "F": np.array([0.0, 0.1, 0.1, 0.2]),
        "theta": 3.0,
    }
    d = masking.diagnostics(stats, {"threshold": "linear", "targeting": "adaptive"})
    assert d["frac_above_theta"] == 0.25
    assert d["mean_p"] == pytest.approx(0.3)
    assert d["effective_masking_rate"] == pytest.approx((0.04 + 0.02) / 0.4)  # the silent latent counts 0
    assert d["targeting_index"] == pytest.approx(np.sqrt(0.05) / 0.3)
    assert d["corr_p_firing"] == pytest.approx(np.corrcoef(stats["p"], stats["F"])[0, 1])
    assert sum(d["hist_p"]["counts"]) == 4 and d["hist_p"]["edges"][0] == 0.0
    # Uniform dropout: one p for every latent, targeting index 0, no correlation to speak of.
    uniform = masking.diagnostics({**stats, "p": np.full(4, 0.3)}, {"targeting": "uniform"})
    assert uniform["targeting_index"] == 0.0 and uniform["corr_p_firing"] is None
    assert uniform["effective_masking_rate"] == pytest.approx(0.3)
    # The absorption task's main latents: their p against every latent's.
    absorption = {"status": "ok", "per_letter": {"a": {"main_latents": [2]}, "b": {"main_latents": [2, 3]}}}
    rel = masking.diagnostics(stats, {}, absorption)["absorption_main_latents"]
    assert rel == {"n": 2, "mean_p": 0.1, "mean_p_all": pytest.approx(0.3), "frac_above_theta": 0.5,
                   "mean_percentile_of_p": 0.125}  # fmt: skip
    assert masking.diagnostics({**stats, "I": np.zeros(4), "p": np.zeros(4)}, {})["status"] == "no statistics"


@pytest.mark.parametrize("targeting", ["adaptive", "uniform"])
def test_report_of_a_real_eval_holds_the_masking_section(tiny_checkpoints, tmp_path, targeting):
    from atmpipe.lm import capture, load_lm

    lm = load_lm(str(tiny_checkpoints["gemma3"]), device="cpu")
    layer, ctx = 1, 16
    torch.manual_seed(0)
    windows = torch.randint(4, 300, (48, ctx))
    windows[:, 0] = lm.bos_token_id
    acts = capture(lm, windows, [layer])[layer].reshape(-1, lm.d_model).float().numpy()
    tokens = windows.reshape(-1).numpy()

    def split(sl):
        return {"acts": acts[sl], "tokens": tokens[sl], "positions": np.arange(len(tokens))[sl] % ctx,
                "bos": tokens[sl] == lm.bos_token_id}  # fmt: skip

    model = {"name": str(tiny_checkpoints["gemma3"]), "source": lm.source, "config_hash": lm.config_hash,
             "n_layers": lm.n_layers}  # fmt: skip
    n_train = 40 * ctx
    store = write_arrays_store(
        tmp_path / "tiny.zarr", {"train": split(slice(0, n_train)), "eval": split(slice(n_train, None))},
        layer=layer, chunk_tokens=64, shard_tokens=128, attrs_extra={"model": model, "context_size": ctx},
    )  # fmt: skip
    run = train(
        TrainConfig(
            store=str(store.path),
            method="atm",
            d_sae=4 * lm.d_model,
            batch_size=64,
            tokens=64 * 40,
            lr=3e-3,
            hparams={"l1": 0.3, "warmup_steps": 4, "targeting": targeting},
            out=str(tmp_path / "atm"),
            checkpoint_every=40,
            buffer_chunks=2,
            device="cpu",
        )  # fmt: skip
    )
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["eval", "--sae", str(run), "--metrics", "core,masking", "--splice-windows", "1", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert (
        "## ATM masking diagnostics" in md
        and "<h2>ATM masking diagnostics</h2>" in (out / "report.html").read_text()
    )
    assert (out / "atm_masking.png").is_file()
    got = json.loads((out / "results.json").read_text())["results"]["atm"]["masking"]
    # Recompute from the file alone.
    s = {k: v.double().numpy() for k, v in load_file(str(run / "atm_stats.safetensors")).items()}
    imp, p, freq, theta = s["I"], s["p"], s["F"], float(s["theta"][0])
    assert got["theta"] == pytest.approx(theta)
    assert got["frac_above_theta"] == pytest.approx(float((imp >= theta).mean()))
    assert got["mean_p"] == pytest.approx(float(p.mean()))
    assert got["effective_masking_rate"] == pytest.approx(float((p * freq).sum() / freq.sum()))
    assert got["targeting_index"] == pytest.approx(float(p.std() / p.mean()), abs=1e-6)
    assert got["targeting"] == targeting
    if targeting == "uniform":  # one p for every latent: the index reads 0
        assert got["targeting_index"] == pytest.approx(0.0, abs=1e-6) and got["mean_p"] > 0
    else:
        assert got["targeting_index"] > 0.05
        assert got["corr_p_firing"] == pytest.approx(float(np.corrcoef(p, freq)[0, 1]))
    assert got["hist_p"]["counts"] == np.histogram(p, bins=masking.HIST_BINS, range=(0, 1))[0].tolist()
