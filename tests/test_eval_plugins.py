"""Metrics are plug-ins: the training-curves metric against the real training logs it reads, a tiny metric
registered in one line that runs and reports, and the eval flags that mirror the metrics' options."""

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.config import load_config
from atmpipe.eval.metric import Metric, option
from atmpipe.eval.metrics import REGISTRY
from atmpipe.eval.run import EvalConfig, config_class, run_eval
from atmpipe.options import help_text
from atmpipe.sae import SAE, SAEConfig, make_sae
from atmpipe.store import write_arrays_store
from atmpipe.train import TrainConfig, train

runner = CliRunner()
LAYER, D = 2, 16
HPARAMS = {"relu": {"l1": 0.3}, "topk": {"k": 4}, "atm": {"l1": 0.3, "warmup_steps": 20}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three SAEs really trained for 60 steps (a log line every 5), and one saved without a training log."""
    root = tmp_path_factory.mktemp("plugins")
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(32, D))
    acts = ((rng.random((4096, 32)) < 0.1) * rng.exponential(2.0, (4096, 32)) @ atoms).astype(np.float32)
    store = write_arrays_store(
        root / "syn.zarr", {"train": {"acts": acts}, "eval": {"acts": acts[:512]}}, layer=LAYER,
        chunk_tokens=256, shard_tokens=1024,
    )  # fmt: skip
    out = {}
    for method, hp in HPARAMS.items():
        cfg = TrainConfig(
            store=str(store.path), method=method, d_sae=64, batch_size=128, tokens=128 * 60, lr=3e-3,
            hparams=dict(hp), out=str(root / method), checkpoint_every=30, log_every=5, device="cpu",
        )  # fmt: skip
        out[method] = train(cfg)
    torch.manual_seed(0)
    bare = SAEConfig("relu", D, 64, {}, model_name="synthetic", layer=LAYER, store={"path": str(store.path)})
    out["bare"] = make_sae(bare).save(root / "bare", {})
    return out


def log_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def eval_args(runs, *names):
    return [a for n in names for a in ("--sae", str(runs[n]))]


def test_training_curves_are_the_logged_numbers(runs, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(
        app, ["eval", *eval_args(runs, "relu", "topk", "atm", "bare"), "--metrics", "training",
              "--training-max-points", "7", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["metrics"] == ["training"] and results["run"]["model_source"] is None  # no LM
    for method in HPARAMS:
        log, section = log_of(runs[method]), results["results"][method]["training"]
        assert section["records"] == len(log) == 12 and section["last"] == log[-1]
        assert section["method"] == method and section["log"] == str(runs[method] / "metrics.jsonl")
        curves, by_step = section["curves"], {r["step"]: r for r in log}
        assert curves["step"] == [5, 15, 25, 35, 40, 50, 60]  # 7 evenly spaced records, first and last kept
        assert set(curves) == {k for r in log for k in r}
        for key, values in curves.items():
            assert values == [by_step[s].get(key) for s in curves["step"]], key
    atm = results["results"]["atm"]["training"]["curves"]
    assert {"masked_frac", "threshold", "mse", "l1", "fvu", "l0", "dead"} <= set(atm)
    assert "training" not in results["results"]["bare"]

    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Training curves" in md and "<h2>Training curves</h2>" in page
    assert "No training log (metrics.jsonl) beside bare: trained elsewhere or converted, so no curves." in md
    for png in ("training_losses.png", "training_sparsity.png", "training_atm.png"):
        assert png_size(out / png) == (800, 500)
    assert page.count("data:image/png;base64,") == 3
    last = log_of(runs["atm"])[-1]
    row = next(line for line in md.splitlines() if line.startswith("| atm |"))
    assert row.startswith(f"| atm | 12 | 60 | {60 * 128} |") and f"{last['threshold']:.4g}" in row


def test_broken_training_log_fails_before_any_report(runs, tmp_path):
    run = tmp_path / "atm"
    run.mkdir()
    for f in runs["atm"].iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*lines[:3], lines[3][:20]]) + "\n")  # a line cut short
    result = runner.invoke(
        app, ["eval", "--sae", str(run), "--metrics", "training", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.replace("\n", " ").strip() == (
        f"error: training log {run / 'metrics.jsonl'} line 4 is not a logged step (Unterminated string "
        "starting at); remove that line, or drop 'training' from --metrics"
    )
    assert not (tmp_path / "r").exists()
    result = runner.invoke(
        app, ["eval", "--sae", str(run), "--metrics", "training", "--training-max-points", "1"]
    )
    assert result.exit_code == 2 and result.output.replace("\n", " ").strip() == (
        "error: --training-max-points must be at least 2 (got 1); pass e.g. --training-max-points 1000"
    )


@dataclasses.dataclass
class DecoderNormOptions:
    decoder_norm_rows: int = option(3, "Decoder rows whose norms are listed.")


class DecoderNorms(Metric):
    """A whole metric in a few lines: every decoder row's norm, with one row in the side-by-side table."""

    name = "decoder_norms"
    Options = DecoderNormOptions
    rows = [("mean decoder row norm", "mean", None)]

    def compute(self, ctx, sae):
        norms = sae.sae.W_dec.detach().norm(dim=1)
        return {"mean": float(norms.mean()), "first": norms[: self.opts.decoder_norm_rows].tolist()}

    def blocks(self, names, results, shared):
        return [
            ("h2", "Decoder norms"),
            ("p", ", ".join(f"{n}: {results[n][self.name]['mean']:.6f}" for n in names)),
        ]


def test_a_metric_is_one_class_and_one_registry_line(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "decoder_norms", DecoderNorms)  # the one line
    cfg = load_config(
        config_class(), None, sae=[str(runs["topk"]), str(runs["bare"])], metrics="decoder_norms,training",
        decoder_norm_rows=2, out=str(tmp_path / "report"),
    )  # fmt: skip
    out = run_eval(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["config"]["decoder_norm_rows"] == 2
    md = (out / "report.md").read_text()
    for name in ("topk", "bare"):
        norms = SAE.load(runs[name]).W_dec.detach().norm(dim=1)
        section = results["results"][name]["decoder_norms"]
        assert section["mean"] == pytest.approx(float(norms.mean()), rel=1e-6)
        assert section["first"] == pytest.approx(norms[:2].tolist(), rel=1e-6)
        assert f"{name}: {section['mean']:.6f}" in md
    assert "## Decoder norms" in md and "| mean decoder row norm |" in md
    assert md.index("## Decoder norms") < md.index("## Training curves") < md.index("## Provenance")


def test_eval_flags_mirror_the_metric_options():
    """The eval flags and their help are the config's fields (the CLI is generated from them)."""
    command = typer.main.get_command(app).commands["eval"]
    flags = {p.name: p.help for p in command.params if p.name != "config"}
    assert flags == {f.name: help_text(f) for f in dataclasses.fields(EvalConfig) if f.metadata.get("help")}
