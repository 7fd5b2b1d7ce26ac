"""A method and a metric from an installed distribution, through entry points only: no file of atmpipe is
edited and no registry line is written. The distribution is installed the way pip leaves one (a package and
its .dist-info with entry_points.txt in a directory on the path), and `atmpipe train` and `atmpipe eval` run
in fresh processes, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors.torch import load_file
from test_reliability_inputs import make_store

from atmpipe.sae.base import WEIGHTS_FILE

REPO = Path(__file__).resolve().parents[1]

METHOD = '''
"""An SAE method that lives outside atmpipe."""
from dataclasses import dataclass

import torch

from atmpipe.sae.base import SAE, CommonParams, TrainOutput


@dataclass
class DensityL1Params(CommonParams):
    l1: float = 0.5


class DensityL1SAE(SAE):
    """ReLU latents whose L1 penalty grows with the fraction of latents that fired on the previous step."""

    method = "density_l1"
    architecture = "standard"
    Params = DensityL1Params
    rank_reductions = {**SAE.rank_reductions, "density": "mean"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("density", torch.tensor(0.0))

    def encode(self, x):
        return self.pre_acts(x).relu()

    def training_forward(self, x, step, total_steps):
        f = self.train_pre_acts(x).relu()
        x_hat = self.decode(f)
        mse, stats = self.common_stats(x, x_hat, (f > 0).sum(0))
        penalty = self.hp.l1 * (1 + self.density) * (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        with torch.no_grad():
            self.density.copy_((f > 0).float().mean())
        return TrainOutput(x_hat, f, {"mse": mse, "l1": penalty}, {**stats, "density": self.density.clone()})
'''

# A metric module stays light (atmpipe.eval.metric): the eval flags are built from it at start-up.
METRIC = '''
"""An eval metric that lives outside atmpipe."""
from dataclasses import dataclass

from atmpipe.eval.metric import Metric, option


@dataclass
class DecoderNormOptions:
    decoder_norm_rows: int = option(3, "Decoder rows whose norms are listed.")


class DecoderNorms(Metric):
    name = "decoder_norms"
    Options = DecoderNormOptions
    rows = [("mean decoder row norm", "mean", None)]

    def compute(self, ctx, sae):
        norms = sae.sae.W_dec.detach().norm(dim=1)
        return {"mean": float(norms.mean()), "first": norms[: self.opts.decoder_norm_rows].tolist()}

    def blocks(self, names, results, shared):
        return [("h2", "Decoder norms"), ("p", ", ".join(f"{n}: {results[n][self.name]['mean']:.6f}" for n in names))]
'''

ENTRY_POINTS = """
[atmpipe.methods]
density_l1 = atmpipe_density.sae:DensityL1SAE

[atmpipe.metrics]
decoder_norms = atmpipe_density.metric:DecoderNorms
"""


def install_plugin(site: Path) -> None:
    """What `pip install` leaves in site-packages: the package, and its .dist-info naming the entry points."""
    (site / "atmpipe_density").mkdir(parents=True)
    (site / "atmpipe_density" / "__init__.py").write_text("")
    (site / "atmpipe_density" / "sae.py").write_text(textwrap.dedent(METHOD))
    (site / "atmpipe_density" / "metric.py").write_text(textwrap.dedent(METRIC))
    info = site / "atmpipe_density-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: atmpipe-density\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)


def atmpipe(site: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)]), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "atmpipe", *map(str, args)], env=env, capture_output=True, text=True, cwd=REPO
    )


def test_an_installed_plugin_trains_and_evaluates_through_entry_points(tmp_path):
    site = tmp_path / "site-packages"
    install_plugin(site)
    store = make_store(tmp_path / "s.zarr")
    run = tmp_path / "run"
    train = atmpipe(site, "train", "--store", store.path, "--method", "density_l1", "--out", run, "--device", "cpu",
                    "--batch-size", "64", "--tokens", "640", "--hparam", "l1=0.2")  # fmt: skip
    assert train.returncode == 0, train.stderr
    assert json.loads((run / "atmpipe.json").read_text())["method"] == "density_l1"
    eval_help = atmpipe(site, "eval", "--help")
    assert "--decoder-norm-rows" in eval_help.stdout  # the plug-in's option is a flag like any metric's
    report = tmp_path / "report"
    ev = atmpipe(site, "eval", "--sae", run, "--store", store.path, "--metrics", "decoder_norms,training",
                 "--decoder-norm-rows", "2", "--out", report, "--device", "cpu")  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    results = json.loads((report / "results.json").read_text())
    section = results["results"]["run"]["decoder_norms"]
    norms = load_file(run / WEIGHTS_FILE)["W_dec"].norm(dim=1)
    assert abs(section["mean"] - float(norms.mean())) < 1e-5 and len(section["first"]) == 2
    assert "## Decoder norms" in (report / "report.md").read_text()
    # Without the distribution on the path, the method is unknown again: nothing was registered by hand.
    bare = atmpipe(
        tmp_path / "empty", "train", "--store", store.path, "--method", "density_l1", "--out", tmp_path / "r2"
    )
    assert bare.returncode == 2 and "unknown method 'density_l1'" in bare.stderr
