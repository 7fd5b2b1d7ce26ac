"""ReLU + L1 (the "standard" SAE): λ·Σ f_i‖W_dec,i‖, λ warmed up, optionally steered toward a target L0.

The λ controller (`target_l0`, docs/methods.md) integrates log λ by rate·ln(L0/target) per step, but only
while the SAE is pushed too weakly toward the target. The push is read from the loss itself: scaling every
latent by s, the MSE's slope at s = 1 over the L1 term's slope is −λ_bal, the λ at which the two balance.
λ > λ_bal shrinks the latents (and L0), λ < λ_bal grows them. The controller asks for λ/λ_bal =
1 + push·ln(L0/target) and holds λ once the SAE gets at least that. Why: with Adam, L0 moves at a bounded
speed, tens of steps behind λ, so a plain integrator keeps raising λ while L0 is still on its way and
overshoots into a collapse (windup). Early in a run the reconstructions are too large and shrink the
latents by themselves (λ_bal < 0): λ then holds instead of winding up against a push it does not need.
λ_bal is the balance of the gradient the optimizer is fed: each batch's slopes are weighted by the factor
gradient clipping put on that batch. Unweighted, the rare batches of outlier tokens (gradients ~10× the
others', clipped to their size; MSE slope of the other sign) pull λ_bal far below the optimizer's balance,
and λ holds while L0 drifts above the target (ATM's demo run ended 7% high that way).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from atmpipe import schedule
from atmpipe.errors import UserError
from atmpipe.sae import kernels, sparse
from atmpipe.sae.base import SAE, CommonParams, SAEConfig, TrainOutput
from atmpipe.sae.sparse import Entries

BALANCE_DECAY = 0.9  # EMA of the two slopes: ~10 steps, shorter than L0's lag, long enough for batch noise


@dataclass
class ReLUParams(CommonParams):
    l1: float = 5.0  # λ (initial λ when target_l0 is set)
    l1_warmup_frac: float = 0.05  # λ ramps linearly from 0 over this fraction of the steps
    target_l0: float | None = None  # if set, a controller adapts λ toward this L0 (module docstring)
    l0_controller_rate: float = 0.08  # after warm-up, while the push is short: λ ← λ·(L0/target)^rate
    l0_controller_push: float = 2.0  # the push it asks for: λ/λ_bal = 1 + push·ln(L0/target)


class ReLUSAE(SAE):
    method = "relu"
    architecture = "standard"
    Params = ReLUParams
    # last_l0 and last_slopes (batch means) steer the L0 controller
    rank_reductions = {**SAE.rank_reductions, "last_l0": "mean", "last_slopes": "mean"}

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        # λ and the controller's inputs live on device so it never syncs; they are state (resume).
        self.register_buffer("l1_coeff", torch.tensor(float(self.hp.l1)))
        self.register_buffer("last_l0", torch.tensor(0.0))
        self.register_buffer("last_slopes", torch.zeros(2))  # this batch's MSE and L1 slopes along s
        self.register_buffer("slopes_ema", torch.zeros(2))  # their EMAs (the ratio needs no bias correction)
        self._controller_on = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint from before the slopes existed resumes with fresh EMAs (λ itself is in it).
        for name in ("last_slopes", "slopes_ema"):
            state_dict.setdefault(prefix + name, torch.zeros(2))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def steers_l0(self) -> bool:
        return self.hp.target_l0 is not None

    def validate_hparams(self) -> None:
        hp = self.hp
        if not hp.l1 > 0:
            raise UserError(f"l1 coefficient must be positive (got {hp.l1}); pass e.g. --l1 5")
        if not 0 <= hp.l1_warmup_frac <= 1:
            raise UserError(f"l1_warmup_frac must be in [0, 1] (got {hp.l1_warmup_frac})")
        if hp.target_l0 is not None and not hp.target_l0 > 0:
            raise UserError(f"target_l0 must be positive (got {hp.target_l0}); pass e.g. --target-l0 64")
        if not hp.l0_controller_rate > 0 or not hp.l0_controller_push >= 0:
            raise UserError(
                f"l0_controller_rate must be positive and l0_controller_push non-negative (got "
                f"{hp.l0_controller_rate} and {hp.l0_controller_push}); pass e.g. --hparam l0_controller_rate=0.08"
            )

    def encode(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_acts(x))

    def mask_latents(self, x: Tensor, f: Tensor, step: int, total_steps: int) -> tuple[Tensor, dict]:
        """The latents the training loss sees (ATM masks them; plain ReLU uses them as they are)."""
        return f, {}

    def mask_entries(
        self, x: Tensor, f: Tensor, e: Entries, step: int, total_steps: int
    ) -> tuple[Tensor, dict]:
        """mask_latents on the sparse path: f holds the values at the entries e."""
        return f, {}

    def training_forward(self, x: Tensor, step: int, total_steps: int) -> TrainOutput:
        x = x.to(self.W_enc.dtype)
        raw, x_c = self.train_pre_acts_parts(x)
        e = self.sparse_entries(sparse.relu_support(raw, self.b_enc.detach()))
        dec_norm = self.W_dec.norm(dim=1)
        if e is None:
            f = F.relu(sparse.pre_acts_dense(raw, x_c, self.W_enc, self.b_enc, self.b_dec))
            f_used, stats = self.mask_latents(x, f, step, total_steps)
            x_hat = self.decode(f_used)
            fires = kernels.fire_counts_fused(f.detach())
            l1 = (f_used @ dec_norm).to(dec_norm.dtype).mean()  # Σ_i f_i‖W_dec,i‖, token mean in fp32
            latents = f
        else:  # the same on the active entries (pre > 0) alone
            f = sparse.pre_acts_at(
                raw, x_c, self.W_enc, self.b_enc, self.b_dec, e
            )  # all > 0: ReLU's identity
            f_used, stats = self.mask_entries(x, f, e, step, total_steps)
            x_hat = sparse.decode(f_used, e, self.W_dec, self.b_dec)
            fires = torch.bincount(e.cols, minlength=self.cfg.d_sae).to(torch.int32)
            l1 = (f_used * dec_norm[e.cols]).sum() / x.shape[0]
            latents = functools.partial(sparse.to_dense, f.detach(), e)
        mse, common = self.common_stats(x, x_hat, fires)
        ramp = schedule.ramp(step, 0, self.hp.l1_warmup_frac * total_steps)
        coeff = self.l1_coeff * ramp
        self.last_l0.copy_(common["l0"])
        self.last_slopes.copy_(self.scale_slopes(x, x_hat.detach(), l1.detach()))
        self._controller_on = self.hp.target_l0 is not None and ramp >= 1.0
        stats.update(common)
        stats["l1_coeff"] = coeff.detach()
        stats["l1_balance"] = balance(self.last_slopes)
        return TrainOutput(x_hat, latents, {"mse": mse, "l1": coeff * l1}, stats)

    @torch.no_grad()
    def scale_slopes(self, x: Tensor, x_hat: Tensor, l1: Tensor) -> Tensor:
        """d/ds at s = 1 of the MSE and of the L1 term (without λ) when every latent the loss sees is
        scaled by s: 2·mean⟨x̂ − x, x̂ − b_dec⟩ and the L1 term itself."""
        return torch.stack([2 * ((x_hat - x) * (x_hat - self.b_dec)).sum(-1).mean(), l1])

    @torch.no_grad()
    def after_optimizer_step(self, grad_scale: Tensor | float = 1.0) -> None:
        super().after_optimizer_step(grad_scale)
        if self.hp.target_l0 is None:
            return
        # Weighted as the optimizer weighs the batch: clipping scales a batch of outlier tokens (slopes
        # ~10× the others', often the other sign) down to the others' size, and so must λ_bal.
        self.slopes_ema.lerp_(self.last_slopes * grad_scale, 1 - BALANCE_DECAY)
        if self._controller_on:
            self.l1_coeff.mul_(self.l1_factor())

    def l1_factor(self) -> Tensor:
        """This step's factor on λ: (L0/target)^rate while the push λ/λ_bal is short of
        1 + push·ln(L0/target) (or points the wrong way), else 1."""
        gap = (self.last_l0.clamp_min(1e-3) / self.hp.target_l0).log()
        asked = balance(self.slopes_ema).clamp_min(0) * (1 + self.hp.l0_controller_push * gap).clamp_min(0)
        short = (asked - self.l1_coeff) * gap > 0
        return torch.where(short, gap * self.hp.l0_controller_rate, 0.0).exp()


def balance(slopes: Tensor) -> Tensor:
    """λ_bal: the λ at which the loss is flat along a common scaling of the latents (−MSE slope / L1)."""
    return -slopes[0] / slopes[1].clamp_min(1e-12)
