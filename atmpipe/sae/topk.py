"""TopK SAE (Gao et al. 2024) with AuxK for dead latents; optional BatchTopK with an inference threshold."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from atmpipe.errors import UserError
from atmpipe.sae import kernels
from atmpipe.sae.base import SAE, CommonParams, SAEConfig, TrainOutput


@dataclass
class TopKParams(CommonParams):
    k: int = 32
    aux_k: int | None = None  # None: d_in // 2 (capped at d_sae)
    aux_coeff: float = 1 / 32  # scaled by min(n_dead / aux_k, 1)
    batch_topk: bool = False  # keep the k·batch largest over the whole batch while training
    threshold_beta: float = 0.99  # BatchTopK: EMA of the smallest kept activation, used at inference


class TopKSAE(SAE):
    method = "topk"
    architecture = "topk"
    Params = TopKParams
    # BatchTopK's threshold: an EMA of the smallest kept value, monotone in it.
    rank_reductions = {**SAE.rank_reductions, "running_threshold": "min"}

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        # BatchTopK's inference threshold (normalised units) and how many batches it has seen.
        self.register_buffer("running_threshold", torch.tensor(0.0))
        self.register_buffer("threshold_batches", torch.tensor(0, dtype=torch.long))

    @property
    def aux_k(self) -> int:
        return min(self.hp.aux_k or self.cfg.d_in // 2, self.cfg.d_sae)

    def auto_path_reason(self) -> str | None:
        return "auto: TopK's k of d_sae, BatchTopK dense"

    def validate_hparams(self) -> None:
        k, d_sae = self.hp.k, self.cfg.d_sae
        if not (isinstance(k, int) and 0 < k < d_sae):
            raise UserError(f"k must be an integer with 0 < k < d_sae = {d_sae} (got {k}); pass e.g. --k 32")
        if self.hp.aux_k is not None and self.hp.aux_k <= 0:
            raise UserError(f"aux_k must be positive (got {self.hp.aux_k})")
        if self.hp.aux_coeff < 0:
            raise UserError(f"aux_coeff must be non-negative (got {self.hp.aux_coeff})")

    # ----- inference -----
    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        if self.hp.batch_topk:
            return pre * (pre > self.running_threshold)
        vals, idx = pre.topk(self.hp.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    # ----- training -----
    def training_forward(self, x: Tensor, step: int, total_steps: int) -> TrainOutput:
        x = x.to(self.W_enc.dtype)
        dead = self.dead_mask()
        # On CPU the check is free; on an accelerator always run AuxK (it is zero without dead latents) to avoid a sync.
        use_aux = self.hp.aux_coeff > 0 and (x.device.type != "cpu" or bool(dead.any()))
        if self.hp.batch_topk:  # a threshold over the whole batch: dense latents
            self.path = ("dense", None)
            f, x_hat, aux_vals, aux_idx = self._batch_topk(x, dead if use_aux else None)
            fires = kernels.fire_counts_fused(f.detach())
        else:
            # k of d_sae latents: sparse whatever the device, unless the dense twins are asked for.
            on = self.latent_path != "dense"
            self.path = ("sparse" if on else "dense", self.hp.k / self.cfg.d_sae)
            encode = kernels.topk_encode if on else kernels.topk_encode_dense
            decode = kernels.sparse_decode if on else kernels.dense_decode
            vals, idx, aux_vals, aux_idx = encode(
                x, self.W_enc, self.b_enc, self.b_dec, self.hp.k, dead if use_aux else None, self.aux_k
            )
            x_hat = decode(vals, idx, self.W_dec, self.b_dec)
            # Statistics straight from the k selections; the dense f only if someone asks for it.
            fires = torch.zeros(self.cfg.d_sae, dtype=torch.int32, device=x.device)
            fires.index_add_(0, idx.flatten(), (vals.detach() > 0).flatten().to(torch.int32))
            f = functools.partial(self._dense_latents, vals.detach(), idx)
        mse, stats = self.common_stats(x, x_hat, fires)
        losses = {"mse": mse}
        if use_aux:
            # Reconstruct the residual the live latents left, with the best dead latents.
            residual = (x - x_hat).detach()
            e_hat = kernels.sparse_decode(aux_vals, aux_idx, self.W_dec)
            scale = (dead.sum() / self.aux_k).clamp(max=1.0)
            losses["aux"] = self.hp.aux_coeff * scale * (e_hat - residual).pow(2).sum(-1).mean()
        if self.hp.batch_topk:
            stats["threshold"] = self.running_threshold.detach().clone()
        return TrainOutput(x_hat, f, losses, stats)

    def _dense_latents(self, vals: Tensor, idx: Tensor) -> Tensor:
        return torch.zeros(vals.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device).scatter_(
            1, idx, vals
        )

    def _batch_topk(self, x: Tensor, dead: Tensor | None):
        pre = self.pre_acts(x)
        acts = pre.relu()
        n = x.shape[0]
        vals, flat = acts.flatten().topk(self.hp.k * n, sorted=False)
        f = torch.zeros_like(acts).flatten().scatter(0, flat, vals).view_as(acts)
        self.update_threshold(vals)
        aux_vals = aux_idx = None
        if dead is not None:
            aux_vals, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(self.aux_k, dim=-1, sorted=False)
            aux_vals = aux_vals.relu()
        return f, self.decode(f), aux_vals, aux_idx

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """BatchTopK's inference threshold: the first batch's smallest kept activation, then an EMA of it
        (`threshold_beta`). kept: this batch's kept activations (zeros among them are not kept)."""
        kept = torch.where(kept > 0, kept, torch.inf)
        # A rank with no rows of this batch has nothing kept (and min() of nothing is an error).
        kept_min = kept.min() if kept.numel() else self.running_threshold.new_tensor(torch.inf)
        kept_min = torch.where(torch.isfinite(kept_min), kept_min, self.running_threshold)
        b = self.hp.threshold_beta
        new = torch.where(
            self.threshold_batches == 0, kept_min, b * self.running_threshold + (1 - b) * kept_min
        )
        self.running_threshold.copy_(new.to(self.running_threshold.dtype))
        self.threshold_batches.add_(1)

    # ----- save / load -----
    def inference_tensors(self) -> dict[str, Tensor]:
        if self.hp.batch_topk:  # BatchTopK at inference is a JumpReLU with one shared threshold
            return {"threshold": self.running_threshold.expand(self.cfg.d_sae)}
        return {}

    def load_inference_tensors(self, tensors: dict[str, Tensor]) -> None:
        if self.hp.batch_topk:
            self.running_threshold.copy_(tensors["threshold"][0])
            self.threshold_batches.fill_(1)

    def saelens_cfg_extra(self) -> dict:
        if self.hp.batch_topk:
            return {"architecture": "jumprelu"}
        return {"k": self.hp.k, "rescale_acts_by_decoder_norm": False}
