"""A fifth SAE method written outside atmpipe, as a user would add one: this file plus one registry line.

"density_l1": ReLU latents whose L1 penalty grows with the fraction of latents that fired on the previous
step. That fraction is a mean over tokens kept in a buffer, so data-parallel training must reduce it across
ranks: the method says so in `rank_reductions`, and neither train.py nor distributed.py knows it exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atmpipe.sae import SAE_METHODS
from atmpipe.sae.base import SAE, CommonParams, TrainOutput

NAME = "density_l1"


@dataclass
class DensityL1Params(CommonParams):
    l1: float = 0.5


class DensityL1SAE(SAE):
    method = NAME
    architecture = "standard"
    Params = DensityL1Params
    rank_reductions = {**SAE.rank_reductions, "density": "mean"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("density", torch.tensor(0.0))  # fraction of latents fired, previous step

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def training_forward(self, x: Tensor, step: int, total_steps: int) -> TrainOutput:
        f = self.train_pre_acts(x).relu()
        x_hat = self.decode(f)
        mse, stats = self.common_stats(x, x_hat, (f > 0).sum(0))
        penalty = self.hp.l1 * (1 + self.density) * (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        with torch.no_grad():
            self.density.copy_((f > 0).float().mean())
        return TrainOutput(x_hat, f, {"mse": mse, "l1": penalty}, {**stats, "density": self.density.clone()})


def register() -> None:
    SAE_METHODS[NAME] = DensityL1SAE  # the one registry line
