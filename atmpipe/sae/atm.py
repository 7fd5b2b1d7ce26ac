"""ATM, Adaptive Temporal Masking (arXiv 2510.08855): the ReLU + L1 SAE whose latents are randomly masked
during training, more often the less important a latent has been.

Per-latent EMAs of magnitude (M), frequency (F) and reconstruction share (R) give an importance I; latents
below θ = mean(I) + c·std(I) are dropped with probability p = 1 − exp(−r(θ − I)/θ) ≤ p_max. No masking for
the first W steps (W = mask_warmup_steps, capped at mask_warmup_frac of the run; statistics still accumulate), then r
ramps from 0 over as many steps. Inference never masks: the saved SAE is a plain ReLU SAE plus its final
statistics (atm_stats.safetensors).

Two controls, defaults unchanged (docs/methods.md):
- threshold = "log": θ and the distance θ − I are taken on log I, p = 1 − exp(−r(c − z)) for a latent whose
  log importance has z-score z < c (kernels.atm_probabilities): a heavy tail cannot lift θ above every latent.
- targeting = "uniform": every latent gets the same p, the mean of the adaptive p of that step: dropout at
  ATM's rate, the control that says whether the importance scores matter.

R's denominator, mean_t ‖x̂_t − b_dec‖, comes by default from the previous step's reconstruction (the masks
must exist before this step's x̂; "exact" pays one more dense GEMM for the unmasked reconstruction).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from atmpipe import schedule
from atmpipe.errors import UserError
from atmpipe.sae import kernels, sparse
from atmpipe.sae.base import SAEConfig, TrainOutput, read_tensor_file
from atmpipe.sae.relu import ReLUParams, ReLUSAE
from atmpipe.sae.sparse import Entries

FLOAT32_MAX = 3.4028234663852886e38  # r becomes a float32 tensor: beyond this it overflows

STATS_FILE = "atm_stats.safetensors"
STAT_NAMES = ("M", "F", "R", "I", "p")


@dataclass
class ATMParams(ReLUParams):
    beta: float = 0.99  # EMA decay of M, F, R
    c: float = 1.0  # threshold θ = mean(I) + c·std(I)
    r: float = 1.0  # masking rate in p = 1 − exp(−r(θ − I)/θ)
    p_max: float = 0.99
    combine: str = "product"  # "product" | "mean" of the normalised M, F, R
    granularity: str = "token"  # "token": a mask per token and latent | "step": one per latent per step
    mask_warmup_steps: int = 1000  # no masking for W steps, then r ramps linearly over the next W ...
    mask_warmup_frac: float = 0.1  # ... with W capped at this fraction of the run (short runs mask too)
    threshold: str = "linear"  # "linear": θ on I | "log": θ and θ − I on log I (scale-free)
    targeting: str = "adaptive"  # "adaptive": p from each latent's importance | "uniform": all get mean(p)
    recon_norm: str = "previous"  # R's denominator: "previous" step's x̂ | "exact" (one more GEMM)
    mask_seed: int = 0  # of the counter-based mask stream (training sets it to --seed unless given)


class ATMSAE(ReLUSAE):
    method = "atm"
    architecture = "standard"
    Params = ATMParams
    rank_reductions = {**ReLUSAE.rank_reductions, "atm_recon_norm": "mean"}
    seed_hparam = "mask_seed"
    # The mask warm-up was `warmup_steps` / `warmup_frac`, the names of the lr warm-up too; the mask seed was
    # `seed`, the name of the run's seed.
    renamed_hparams = {
        "warmup_steps": "mask_warmup_steps",
        "warmup_frac": "mask_warmup_frac",
        "seed": "mask_seed",
    }

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        for name in STAT_NAMES:
            self.register_buffer(f"atm_{name}", torch.zeros(cfg.d_sae))
        self.register_buffer("atm_theta", torch.tensor(0.0))
        self.register_buffer("atm_recon_norm", torch.tensor(float("nan")))  # NaN until the first step

    def validate_hparams(self) -> None:
        super().validate_hparams()
        hp = self.hp
        checks = [
            (0 <= hp.beta < 1, f"beta must be in [0, 1) (got {hp.beta})"),
            (0 <= hp.r <= FLOAT32_MAX, f"r must be non-negative and within float32's range (got {hp.r})"),
            (0 <= hp.p_max <= 1, f"p_max must be in [0, 1] (got {hp.p_max})"),
            (hp.combine in ("product", "mean"), f"combine must be 'product' or 'mean' (got {hp.combine!r})"),
            (
                hp.granularity in ("token", "step"),
                f"granularity must be 'token' or 'step' (got {hp.granularity!r})",
            ),
            (
                hp.mask_warmup_steps >= 0,
                f"mask_warmup_steps must be non-negative (got {hp.mask_warmup_steps})",
            ),
            (
                0 <= hp.mask_warmup_frac <= 1,
                f"mask_warmup_frac must be in [0, 1] (got {hp.mask_warmup_frac})",
            ),
            (
                hp.threshold in ("linear", "log"),
                f"threshold must be 'linear' or 'log' (got {hp.threshold!r})",
            ),
            (
                hp.targeting in ("adaptive", "uniform"),
                f"targeting must be 'adaptive' or 'uniform' (got {hp.targeting!r})",
            ),
            (
                hp.recon_norm in ("previous", "exact"),
                f"recon_norm must be 'previous' or 'exact' (got {hp.recon_norm!r})",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"atm {msg}; fix the ATM options")

    def masking_warmup(self, total_steps: int) -> int:
        """W: the steps without masking (and then of r's ramp), capped at mask_warmup_frac of the run."""
        return schedule.warmup_length(self.hp.mask_warmup_steps, self.hp.mask_warmup_frac, total_steps)

    def rate_at(self, step: int, total_steps: int) -> float:
        """The effective r: 0 during the W warm-up steps, then a linear ramp to r over the next W."""
        w = self.masking_warmup(total_steps)
        return self.hp.r * schedule.ramp(step, w, w)

    def update_fn(self):
        """The dense statistics step: the fused kernel, or, on several ranks, its global-batch form."""
        if self.share.world.size > 1:
            return functools.partial(update_across_ranks, kernels.atm_update_fused, self.share)
        return kernels.atm_update_fused

    def mask_latents(self, x: Tensor, f: Tensor, step: int, total_steps: int) -> tuple[Tensor, dict]:
        if not self.training:  # evaluation never masks and never moves the statistics
            return f, {}
        hp = self.hp
        dec_norm = self.W_dec.detach().norm(dim=1)
        with torch.no_grad():
            if hp.recon_norm == "exact":
                recon_norm = (f.detach() @ self.W_dec.detach()).to(self.W_dec.dtype).norm(dim=-1).mean()
            else:  # first step: the input's norm stands in for its reconstruction's
                fallback = (x - self.b_dec.detach()).norm(dim=-1).mean()
                recon_norm = torch.where(torch.isnan(self.atm_recon_norm), fallback, self.atm_recon_norm)
            r = torch.full((), self.rate_at(step, total_steps), device=f.device)
            key = torch.full((), kernels.step_key(hp.mask_seed, step), dtype=torch.int64, device=f.device)
            M, F_, R, imp, theta, p, keep = self.update_fn()(
                f, dec_norm, self.atm_M, self.atm_F, self.atm_R, recon_norm, r, key,
                hp.beta, hp.c, hp.p_max, hp.combine, hp.granularity == "token", hp.threshold == "log",
                hp.targeting == "uniform",
            )  # fmt: skip
            for name, value in zip(STAT_NAMES, (M, F_, R, imp, p), strict=True):
                getattr(self, f"atm_{name}").copy_(value)
            self.atm_theta.copy_(theta)
        masking = step >= self.masking_warmup(total_steps) and hp.r > 0
        f_used = f * keep if masking else f
        return f_used, {"masked_frac": p.mean(), "threshold": theta}

    def mask_entries(
        self, x: Tensor, f: Tensor, e: Entries, step: int, total_steps: int
    ) -> tuple[Tensor, dict]:
        """mask_latents on the sparse path: the same statistics, from the active entries (a latent that is
        zero has nothing to mask), and each entry's keep from the same counter-based noise stream."""
        if not self.training:
            return f, {}
        with torch.no_grad():
            theta, p = self.step_statistics(x, f.detach(), e, step, total_steps)
            stats = {"masked_frac": p.mean(), "threshold": theta}
            if not (step >= self.masking_warmup(total_steps) and self.hp.r > 0):
                return f, stats
            key = torch.tensor(kernels.step_key(self.hp.mask_seed, step), dtype=torch.int64, device=x.device)
            rows = self.share.global_rows(e.rows)  # the entries' rows in the global batch
            where = rows * e.d_sae + e.cols if self.hp.granularity == "token" else e.cols
            keep = (kernels.noise_at(where, key) >= p[e.cols]).to(f.dtype)
        return f * keep, stats

    def step_statistics(
        self, x: Tensor, f: Tensor, e: Entries, step: int, total: int
    ) -> tuple[Tensor, Tensor]:
        """The EMA step, importance, θ and p from the entries' values f; returns (θ, p)."""
        hp, n, vals = self.hp, x.shape[0], f.float()
        means = torch.stack(
            [sparse.latent_sums(vals, e) / n, sparse.latent_sums(torch.ones_like(vals), e) / n]
        )
        mean_f, fired = self.share.mean(means).unbind(0)
        M, F_, R = kernels.atm_statistics(
            mean_f, fired, self.W_dec.norm(dim=1), self.atm_M, self.atm_F, self.atm_R,
            self.recon_norm(x, lambda: sparse.decode(f, e, self.W_dec)), hp.beta,
        )  # fmt: skip
        imp = kernels.atm_importance(M, F_, R, hp.combine)
        r = torch.tensor(self.rate_at(step, total), device=x.device)
        theta, p = kernels.atm_probabilities(
            imp, r, hp.c, hp.p_max, hp.threshold == "log", hp.targeting == "uniform"
        )
        for name, value in zip(STAT_NAMES, (M, F_, R, imp, p), strict=True):
            getattr(self, f"atm_{name}").copy_(value)
        self.atm_theta.copy_(theta)
        return theta, p

    def recon_norm(self, x: Tensor, unmasked: Callable[[], Tensor]) -> Tensor:
        """R's denominator this step, the batch mean of ‖x̂_t − b_dec‖: with recon_norm = "exact" from
        unmasked() (this step's unmasked x̂ − b_dec), else the previous step's (first step: ‖x − b_dec‖)."""
        if self.hp.recon_norm == "exact":
            return self.share.mean(unmasked().norm(dim=-1).mean())
        fallback = self.share.mean((x - self.b_dec.detach()).norm(dim=-1).mean())
        return torch.where(torch.isnan(self.atm_recon_norm), fallback, self.atm_recon_norm)

    def training_forward(self, x: Tensor, step: int, total_steps: int) -> TrainOutput:
        out = super().training_forward(x, step, total_steps)
        if self.training:
            with torch.no_grad():
                self.atm_recon_norm.copy_((out.x_hat.detach() - self.b_dec.detach()).norm(dim=-1).mean())
        return out

    def masking_statistics(self) -> dict[str, Tensor]:
        return {**{name: getattr(self, f"atm_{name}") for name in STAT_NAMES}, "theta": self.atm_theta}

    def extra_files(self) -> dict[str, dict[str, Tensor]]:
        return {STATS_FILE: {**self.masking_statistics(), "theta": self.atm_theta.reshape(1)}}

    def load_extra_files(self, path: Path) -> None:
        file = path / STATS_FILE
        if not file.exists():
            return  # an ATM SAE saved without statistics still works for inference
        d = self.cfg.d_sae
        shapes = {**{name: (d,) for name in STAT_NAMES}, "theta": (1,)}
        tensors = read_tensor_file(file, list(shapes), shapes)
        with torch.no_grad():
            for name in STAT_NAMES:
                getattr(self, f"atm_{name}").copy_(tensors[name])
            self.atm_theta.copy_(tensors["theta"][0])


def update_across_ranks(kernel, share, f, dec_norm, M, F_, R, recon_norm, r, key, beta, c, p_max,
                        combine, per_token, log_threshold=False, uniform=False):  # fmt: skip
    """ATM's statistics step for the global batch, from this rank's rows (`share`), with the SAE's kernel.

    The EMAs are linear in the batch means and every rank starts from the same M, F, R, ‖W_dec‖: so one
    kernel step on the local rows, averaged over the ranks by their rows, is the global-batch step
    (recon_norm, a mean over tokens, is reduced first; a rank without rows adds nothing). Importance,
    threshold and probabilities then follow from the global EMAs, and each rank draws the masks of its
    rows at their global positions, so they are the 1-process masks.
    """
    recon_norm = share.mean(recon_norm)
    stepped = kernel(f, dec_norm, M, F_, R, recon_norm, r, key, beta, c, p_max, combine, per_token,
                     log_threshold, uniform)  # fmt: skip
    M, F_, R = share.mean(torch.stack(stepped[:3])).unbind(0)
    imp = kernels.atm_importance(M, F_, R, combine)
    theta, p = kernels.atm_probabilities(imp, r, c, p_max, log_threshold, uniform)
    latents = torch.arange(f.shape[1], device=f.device)
    if per_token:
        rows = share.global_rows(torch.arange(f.shape[0], device=f.device))
        keep = kernels.noise_at(rows[:, None] * f.shape[1] + latents, key) >= p
    else:
        keep = kernels.noise_at(latents, key) >= p
    return M, F_, R, imp, theta, p, keep.to(f.dtype)
