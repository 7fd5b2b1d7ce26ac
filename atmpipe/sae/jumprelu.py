"""JumpReLU SAE (Rajamanoharan et al. 2024): learned thresholds trained with rectangle-kernel straight-through
gradients; sparsity λ·L0 (λ warmed up) or coeff·(L0/target − 1)².

Thresholds are learned as log θ. θ0 and the bandwidth ε default to 0.1 and 0.03 of the normalised scale
(a typical active latent is ~1 there): with ε = θ0 = 0.001 the thresholds barely move in short runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from atmpipe import schedule
from atmpipe.errors import UserError
from atmpipe.sae import kernels, sparse
from atmpipe.sae.base import SAE, CommonParams, SAEConfig, TrainOutput


@dataclass
class JumpReLUParams(CommonParams):
    sparsity: str = "l0"  # "l0": l0_coeff·L0 (warmed up) | "target": l0_coeff·(L0/target_l0 − 1)²
    l0_coeff: float = 0.5
    target_l0: float | None = None  # required for sparsity = "target"
    sparsity_warmup_steps: int = 10_000  # λ ramps linearly from 0 (sparsity = "l0") over this many steps,
    sparsity_warmup_frac: float = 0.1  # capped at this fraction of the run
    threshold_init: float = 0.1  # θ0, normalised units
    bandwidth: float = 0.03  # ε, normalised units
    threshold_lr_scale: float = 1.0  # log θ learns at lr × this


class JumpReLUSAE(SAE):
    method = "jumprelu"
    architecture = "jumprelu"
    Params = JumpReLUParams
    method_betas = (0.0, 0.999)  # β1 = 0, as the JumpReLU paper trains

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(self.hp.threshold_init)))

    @property
    def steers_l0(self) -> bool:
        return self.hp.sparsity == "target"

    def validate_hparams(self) -> None:
        hp = self.hp
        if hp.sparsity not in ("l0", "target"):
            raise UserError(f"jumprelu sparsity must be 'l0' or 'target' (got {hp.sparsity!r})")
        if hp.sparsity == "target" and not (hp.target_l0 and hp.target_l0 > 0):
            raise UserError("jumprelu sparsity 'target' needs a positive target_l0; pass --target-l0 64")
        if hp.sparsity == "l0" and hp.target_l0 is not None:  # the l0 penalty never reads it
            raise UserError(
                f"jumprelu ignores target_l0 ({hp.target_l0}) with its default sparsity 'l0'; "
                "add --hparam sparsity=target to steer L0 toward it, or drop --target-l0"
            )
        if not 0 <= hp.sparsity_warmup_frac <= 1:
            raise UserError(
                f"jumprelu sparsity_warmup_frac must be in [0, 1] (got {hp.sparsity_warmup_frac})"
            )
        for name in ("l0_coeff", "threshold_init", "bandwidth", "threshold_lr_scale"):
            if not getattr(hp, name) > 0:
                raise UserError(f"jumprelu {name} must be positive (got {getattr(hp, name)})")

    def param_groups(self, lr: float) -> list[dict]:
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [
            {"params": rest, "lr": lr},
            {"params": [self.log_threshold], "lr": lr * self.hp.threshold_lr_scale},
        ]

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def training_forward(self, x: Tensor, step: int, total_steps: int) -> TrainOutput:
        x = x.to(self.W_enc.dtype)
        raw, x_c = self.train_pre_acts_parts(x)
        theta, eps = self.threshold, self.hp.bandwidth
        e = self.sparse_entries(sparse.jumprelu_support(raw, self.b_enc.detach(), theta.detach(), eps))
        if e is None:
            # f, the L0 of each token and the firing counts in one pass (kernels.JumpReLU: the gradients
            # are the rectangle-kernel straight-through estimators, also in one pass).
            pre = sparse.pre_acts_dense(raw, x_c, self.W_enc, self.b_enc, self.b_dec)
            f, l0_per_token, fires = kernels.JumpReLU.apply(pre, theta, eps)
            x_hat = self.decode(f)
            latents = f
        else:  # the same on the entries that are active or inside θ's window
            pre_e = sparse.pre_acts_at(raw, x_c, self.W_enc, self.b_enc, self.b_dec, e)
            theta_e = theta[e.cols]
            f, l0_per_token = sparse.JumpReLUEntries.apply(pre_e, theta_e, e.rows, e.n, eps)
            x_hat = sparse.decode(f, e, self.W_dec, self.b_dec)
            active = pre_e.detach() > theta_e.detach()
            fires = torch.bincount(e.cols[active], minlength=self.cfg.d_sae).to(torch.int32)
            latents = functools.partial(sparse.to_dense, f.detach(), e)
        mse, stats = self.common_stats(x, x_hat, fires)
        l0 = l0_per_token.mean()
        if self.hp.sparsity == "l0":
            w = schedule.warmup_length(
                self.hp.sparsity_warmup_steps, self.hp.sparsity_warmup_frac, total_steps
            )
            sparsity = self.hp.l0_coeff * schedule.ramp(step, 0, w) * l0
        else:
            sparsity = self.hp.l0_coeff * target_penalty(l0, self.share.mean(l0.detach()), self.hp.target_l0)
        stats["threshold_mean"] = theta.detach().mean()
        # The loss term has its own name: "l0" is the measured L0 in the stats.
        return TrainOutput(x_hat, latents, {"mse": mse, "sparsity": sparsity}, stats)

    def inference_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}

    def load_inference_tensors(self, tensors: dict[str, Tensor]) -> None:
        # SAELens computes relu(pre)·1[pre > θ]: a θ ≤ 0 acts as θ = 0.
        self.log_threshold.data.copy_(tensors["threshold"].clamp_min(0).log())


def target_penalty(l0: Tensor, l0_global: Tensor, target: float) -> Tensor:
    """(L0/target − 1)² of the global batch's L0, with the gradient a rank's own rows give it.

    The penalty is not linear in L0, so ranks cannot each take it of their own L0: its value is taken at the
    global L0 (the same on every rank), and its gradient is the slope there times this rank's L0, which the
    rows-weighted gradient average then sums into the slope times the global L0's gradient. On one process
    l0_global is l0: the plain penalty and its gradient.
    """
    gap = l0_global / target - 1
    return gap.pow(2) + (2 * gap / target) * (l0 - l0.detach())
