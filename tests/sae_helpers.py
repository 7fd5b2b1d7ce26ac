"""Shared helpers for the SAE method tests: planted-dictionary data and a minimal training loop."""

from __future__ import annotations

import torch

from atmpipe.sae import SAE, SAEConfig, make_sae


def planted(n_tokens: int, d_in: int = 32, n_atoms: int = 48, active: float = 3.0, seed: int = 0):
    """Tokens made of a known dictionary: unit-norm atoms, sparse non-negative codes (~`active` per token)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    on = torch.rand(n_tokens, n_atoms, generator=g) < active / n_atoms
    codes = on * (0.5 + torch.rand(n_tokens, n_atoms, generator=g))
    return codes @ atoms, atoms


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
