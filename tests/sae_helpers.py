"""Shared helpers for the SAE tests: planted-dictionary data (as tensors, or as a store for the train
stage) and a minimal training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from atmpipe.sae import SAE, SAEConfig, make_sae
from atmpipe.store import write_arrays_store


def planted(n_tokens: int, d_in: int = 32, n_atoms: int = 48, active: float = 3.0, seed: int = 0):
    """Tokens made of a known dictionary: unit-norm atoms, sparse non-negative codes (~`active` per token)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    on = torch.rand(n_tokens, n_atoms, generator=g) < active / n_atoms
    codes = on * (0.5 + torch.rand(n_tokens, n_atoms, generator=g))
    return codes @ atoms, atoms


def planted_acts(
    n: int,
    d: int,
    n_atoms: int,
    active: float,
    size: float = 1.0,
    offset: float = 0.0,
    spread: tuple[float, float] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Activations made of a known dictionary: sparse non-negative codes (~`active` atoms a token, exponential
    sizes of mean `size`) over unit-norm atoms, plus `offset` (so that b_dec has work to do). With `spread`
    = (lo, hi), each atom's frequency is scaled by a uniform draw from it: some atoms common, some rare."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    freq = active / n_atoms if spread is None else rng.uniform(*spread, n_atoms) * active / n_atoms
    codes = (rng.random((n, n_atoms)) < freq) * rng.exponential(size, (n, n_atoms))
    return (codes @ atoms + offset).astype(np.float32)


def planted_store(path: Path, acts: np.ndarray, layer: int, shard_tokens: int):
    """`acts` as a store: the train split in 64-token windows (BOS first), its first 512 rows as eval."""
    positions = np.arange(len(acts)) % 64
    splits = {
        "train": {"acts": acts, "positions": positions, "bos": positions == 0},
        "eval": {"acts": acts[:512]},
    }
    return write_arrays_store(path, splits, layer=layer, chunk_tokens=256, shard_tokens=shard_tokens)


def train(sae: SAE, x: torch.Tensor, steps: int, batch: int = 256, lr: float = 3e-3, seed: int = 0) -> SAE:
    """Adam on shuffled batches; the train stage's loop in miniature (grads, parallel-grad removal, renorm)."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine
    try:
        return _train(sae, x, steps, batch, lr)
    finally:
        torch.set_num_threads(threads)


def _train(sae: SAE, x: torch.Tensor, steps: int, batch: int, lr: float) -> SAE:
    opt = torch.optim.Adam(sae.param_groups(lr), lr=lr, betas=sae.adam_betas)
    x = x * sae.cfg.norm_scale
    sae.init_b_dec(x[:1024])
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,))
        out = sae.training_forward(x[idx], step, steps)
        opt.zero_grad(set_to_none=True)
        sum(out.losses.values()).backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.after_optimizer_step()
    return sae


def fvu(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat = sae(x)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def recovered(sae: SAE, atoms: torch.Tensor, cos: float = 0.9) -> float:
    """Fraction of planted atoms that some decoder row matches with cosine > cos."""
    W = sae.W_dec.detach()
    W = W / W.norm(dim=1, keepdim=True)
    return float(((atoms @ W.T).max(dim=1).values > cos).float().mean())


def make(method: str, d_in: int = 32, d_sae: int = 96, norm_scale: float = 1.0, **hparams) -> SAE:
    torch.manual_seed(0)
    return make_sae(
        SAEConfig(method, d_in, d_sae, hparams, model_name="planted", layer=3, hook_name="blocks.3.hook_resid_post",
                  norm_scale=norm_scale)
    )  # fmt: skip
