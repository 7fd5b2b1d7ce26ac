"""The recipes are what runs: stages/train-*.toml reach their target L0 unaided, layered with a sizes file,
and a run records the recipe files and every override."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from atmpipe.sae import SAE
from atmpipe.store import write_arrays_store
from atmpipe.train import load_train_config, train

REPO = Path(__file__).resolve().parents[1]
METHODS = ("relu", "topk", "jumprelu", "atm")
D, N_ATOMS, ACTIVE, TARGET = 32, 256, 12, 16
# The sizes a small run needs, as a sizes file layered over each recipe (as stages/demo-train.toml is).
SIZES = """
d_sae = 256
batch_size = 256
tokens = 76_800
lr = 1e-3
checkpoint_every = 100
log_every = 10
buffer_chunks = 4
device = "cpu"
"""


def synthetic_acts(n: int, seed: int = 0) -> np.ndarray:
    """Sparse non-negative codes (~ACTIVE of N_ATOMS a token, heavy-tailed sizes) over unit-norm atoms."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(N_ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    freq = rng.uniform(0.2, 1.8, N_ATOMS) * ACTIVE / N_ATOMS  # some atoms common, some rare
    codes = (rng.random((n, N_ATOMS)) < freq) * rng.exponential(1.0, (n, N_ATOMS))
    return (codes @ atoms + 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "syn.zarr"
    acts = synthetic_acts(8192)
    positions = np.arange(len(acts)) % 64
    splits = {
        "train": {"acts": acts, "positions": positions, "bos": positions == 0},
        "eval": {"acts": acts[:512]},
    }
    return write_arrays_store(path, splits, layer=1, chunk_tokens=256, shard_tokens=2048)


def inference_l0(run: Path, store) -> float:
    sae = SAE.load(run)
    x = torch.from_numpy(store.read_acts("train", 1))
    with torch.no_grad():
        return float((sae.encode(x) > 0).sum(-1).float().mean())


@pytest.mark.parametrize("method", METHODS)
def test_each_recipe_reaches_its_target_l0_unaided(store, tmp_path, method):
    sizes = tmp_path / "sizes.toml"
    sizes.write_text(SIZES)
    target = {"k": TARGET} if method == "topk" else {"target_l0": float(TARGET)}
    cfg = load_train_config(
        [REPO / "stages" / f"train-{method}.toml", sizes],
        store=str(store.path),
        out=str(tmp_path / "run"),
        **target,
    )
    run = train(cfg)
    l0 = inference_l0(run, store)
    assert abs(l0 / TARGET - 1) <= 0.10, f"{method}: L0 {l0:.1f} against the target {TARGET}"
