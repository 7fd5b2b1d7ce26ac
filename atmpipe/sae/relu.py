"""ReLU + L1 (the "standard" SAE): λ·Σ f_i‖W_dec,i‖, λ warmed up, optionally steered toward a target L0."""

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


@dataclass
class ReLUParams(CommonParams):
    l1: float = 5.0  # λ (initial λ when target_l0 is set)
    l1_warmup_frac: float = 0.05  # λ ramps linearly from 0 over this fraction of the steps
    target_l0: float | None = None  # if set, a multiplicative controller adapts λ toward this L0
    l0_controller_rate: float = 0.01  # per step, after warm-up: λ ← λ·(L0/target)^rate


class ReLUSAE(SAE):
    method = "relu"
    architecture = "standard"
    Params = ReLUParams
    rank_reductions = {**SAE.rank_reductions, "last_l0": "mean"}  # last_l0 steers the L0 controller

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        # λ lives on device so the controller never syncs; it is part of the state (resume).
        self.register_buffer("l1_coeff", torch.tensor(float(self.hp.l1)))
        self.register_buffer("last_l0", torch.tensor(0.0))
        self._controller_on = False

    def validate_hparams(self) -> None:
        hp = self.hp
        if not hp.l1 > 0:
            raise UserError(f"l1 coefficient must be positive (got {hp.l1}); pass e.g. --l1 5")
        if not 0 <= hp.l1_warmup_frac <= 1:
            raise UserError(f"l1_warmup_frac must be in [0, 1] (got {hp.l1_warmup_frac})")
        if hp.target_l0 is not None and not hp.target_l0 > 0:
            raise UserError(f"target_l0 must be positive (got {hp.target_l0}); pass e.g. --target-l0 64")

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
            l1 = (f_used @ dec_norm).mean()  # Σ_i f_i‖W_dec,i‖, mean over tokens
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
        self._controller_on = self.hp.target_l0 is not None and ramp >= 1.0
        stats.update(common)
        stats["l1_coeff"] = coeff.detach()
        return TrainOutput(x_hat, latents, {"mse": mse, "l1": coeff * l1}, stats)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self._controller_on:
            ratio = self.last_l0.clamp_min(1e-3) / self.hp.target_l0
            self.l1_coeff.mul_(ratio.pow(self.hp.l0_controller_rate))
