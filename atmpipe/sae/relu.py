"""ReLU + L1 (the "standard" SAE): λ·Σ f_i‖W_dec,i‖, λ warmed up, optionally steered toward a target L0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from atmpipe import schedule
from atmpipe.errors import UserError
from atmpipe.sae import kernels
from atmpipe.sae.base import SAE, CommonParams, SAEConfig, TrainOutput


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

    def training_forward(self, x: Tensor, step: int, total_steps: int) -> TrainOutput:
        x = x.to(self.W_enc.dtype)
        f = F.relu(self.train_pre_acts(x))
        f_used, stats = self.mask_latents(x, f, step, total_steps)
        x_hat = self.decode(f_used)
        mse, common = self.common_stats(x, x_hat, kernels.fire_counts_fused(f.detach()))
        ramp = schedule.ramp(step, 0, self.hp.l1_warmup_frac * total_steps)
        coeff = self.l1_coeff * ramp
        l1 = (f_used @ self.W_dec.norm(dim=1)).mean()  # Σ_i f_i‖W_dec,i‖, mean over tokens
        self.last_l0.copy_(common["l0"])
        self._controller_on = self.hp.target_l0 is not None and ramp >= 1.0
        stats.update(common)
        stats["l1_coeff"] = coeff.detach()
        return TrainOutput(x_hat, f, {"mse": mse, "l1": coeff * l1}, stats)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self._controller_on:
            ratio = self.last_l0.clamp_min(1e-3) / self.hp.target_l0
            self.l1_coeff.mul_(ratio.pow(self.hp.l0_controller_rate))
