"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): BatchTopK latents whose nested prefixes must each
reconstruct the input on their own.

The latents are split into groups; prefix m is groups 0…m (the first latents). The loss is the sum over
prefixes of the squared error of the reconstruction from that prefix's latents alone (weight 1 each, the
full width included), as SAELens's MatryoshkaBatchTopKTrainingSAE sums them. The selection is BatchTopK
(the k·batch largest activations of the whole batch), with TopK's AuxK and inference threshold (topk.py).

Speed: the prefix reconstructions share one sparse decode. The kept entries, in row-major order, are already
sorted by group within each token (groups are contiguous latent ranges), so one gather-sum over the entries
with one bag per (token, group) gives each group's part of each token's reconstruction [n, G, d_in]; their
cumulative sum over groups is every prefix's reconstruction. The selection itself never sorts the whole
batch: a cheap pass keeps the entries above a lower bound of the cutoff (last step's cutoff, lowered), and
only those are ranked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from atmpipe.errors import UserError
from atmpipe.sae import kernels, sparse
from atmpipe.sae.base import SAEConfig, TrainOutput
from atmpipe.sae.sparse import Entries
from atmpipe.sae.topk import TopKParams, TopKSAE

# The public Matryoshka releases' nesting (128/512/2048/8192/32768 of 32768 latents), as fractions of d_sae.
DEFAULT_PREFIXES = [1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0]
# The candidate pass keeps the entries above this fraction of last step's cutoff (the cutoff moves by a few
# percent a step); when they are too few it takes every positive entry instead.
CUTOFF_MARGIN = 0.8


@dataclass
class MatryoshkaParams(TopKParams):
    batch_topk: bool = True  # always: Matryoshka selects by BatchTopK
    # The nested prefix widths as fractions of d_sae, smallest first, the last 1 (the full width).
    prefix_fractions: list[float] = field(default_factory=lambda: list(DEFAULT_PREFIXES))


class MatryoshkaSAE(TopKSAE):
    method = "matryoshka"
    architecture = "jumprelu"  # at inference BatchTopK is a JumpReLU with one shared threshold
    Params = MatryoshkaParams

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        # The exact BatchTopK cutoff of the last batch: the candidate pass starts below it.
        self.register_buffer("last_cutoff", torch.tensor(0.0))
        self.register_buffer("group_of", self._groups(), persistent=False)

    @property
    def widths(self) -> list[int]:
        """The prefix widths in latents, smallest first; the last is d_sae."""
        return [round(f * self.cfg.d_sae) for f in self.hp.prefix_fractions]

    def validate_hparams(self) -> None:
        super().validate_hparams()
        if self.hp.batch_topk is not True:
            raise UserError(
                "matryoshka always selects by BatchTopK; drop batch_topk from its hyper-parameters"
            )
        fr = self.hp.prefix_fractions
        ok = isinstance(fr, list) and fr and all(isinstance(f, int | float) and 0 < f <= 1 for f in fr)
        if not ok or fr[-1] != 1:
            raise UserError(
                f"prefix_fractions must be a list of fractions of d_sae in (0, 1], the last 1 (got {fr!r}); "
                "pass e.g. --hparam 'prefix_fractions=[0.0625, 0.25, 1]'"
            )
        w = self.widths
        if w[0] < 1 or any(a >= b for a, b in zip(w, w[1:], strict=False)):
            raise UserError(
                f"prefix_fractions {fr} give prefix widths {w} of d_sae = {self.cfg.d_sae}; they must be at "
                "least 1 and strictly increasing: use fewer or wider prefixes"
            )

    def _groups(self) -> Tensor:
        return torch.bucketize(torch.arange(self.cfg.d_sae), torch.tensor(self.widths), right=True)

    def latent_groups(self) -> Tensor | None:
        """The group of each latent [d_sae] (0: the first, smallest prefix)."""
        return self.group_of.clone()

    # ----- training -----
    def training_forward(self, x: Tensor, step: int, total_steps: int) -> TrainOutput:
        x = x.to(self.W_enc.dtype)
        n = x.shape[0]
        dead = self.dead_mask()
        use_aux = self.hp.aux_coeff > 0 and (x.device.type != "cpu" or bool(dead.any()))
        raw, x_c = self.train_pre_acts_parts(x)
        e = self._select(raw)
        fires = torch.bincount(e.cols, minlength=self.cfg.d_sae).to(torch.int32)
        if self._sparse_path(x.device):
            vals = sparse.pre_acts_at(raw, x_c, self.W_enc, self.b_enc, self.b_dec, e)
            parts = sparse.decode(vals, self._group_bags(e), self.W_dec).view(n, -1, self.cfg.d_in)
            f = functools.partial(sparse.to_dense, vals.detach(), e)
            pre_dense = None
        else:
            pre_dense = sparse.pre_acts_dense(raw, x_c, self.W_enc, self.b_enc, self.b_dec)
            keep = torch.zeros_like(pre_dense, dtype=torch.bool)
            keep[e.rows, e.cols] = True
            f_dense = pre_dense * keep
            parts = self.group_decode_dense(f_dense)
            vals, f = f_dense[e.rows, e.cols], f_dense.detach()
        self.update_threshold(vals.detach())
        prefix_mse, x_hat = PrefixErrors.apply(parts, x - self.b_dec)  # [G], the full reconstruction − b_dec
        x_hat = x_hat + self.b_dec.detach()
        losses, stats = self._prefix_losses(x, prefix_mse, x_hat, fires)
        if use_aux:
            losses["aux"] = self._aux_loss(x, x_hat, raw, x_c, pre_dense, dead)
        stats["threshold"] = self.running_threshold.detach().clone()
        return TrainOutput(x_hat, f, losses, stats)

    def _sparse_path(self, device: torch.device) -> bool:
        """The path, from the density the selection fixes (k/d_sae on every rank: no read-back)."""
        density = self.hp.k / self.cfg.d_sae
        on = self.latent_path == "sparse" or (
            self.latent_path == "auto" and density < sparse.crossover_density(device)
        )
        self.path = ("sparse" if on else "dense", density)
        return on

    def _prefix_losses(
        self, x: Tensor, prefix_mse: Tensor, x_hat: Tensor, fires: Tensor
    ) -> tuple[dict, dict]:
        """The full width's loss as `mse` (with the shared statistics), the inner prefixes' sum as
        `inner_mse`, and each inner prefix's own under `mse_<width>`."""
        _, stats = self.common_stats(x, x_hat, fires)  # x_hat carries no gradient: its mse is prefix_mse[-1]
        for width, value in zip(self.widths, prefix_mse[:-1].detach(), strict=False):
            stats[f"mse_{width}"] = value
        return {"mse": prefix_mse[-1], "inner_mse": prefix_mse[:-1].sum()}, stats

    def group_decode_dense(self, f: Tensor) -> Tensor:
        """Each group's part of the reconstruction [n, G, d_in] from dense latents (one GEMM per group)."""
        edges = [0, *self.widths]
        return torch.stack([f[:, a:b] @ self.W_dec[a:b] for a, b in zip(edges, edges[1:], strict=False)], 1)

    def _group_bags(self, e: Entries) -> Entries:
        """The entries as bags of one (token, group) each: a decode then gives each group's part."""
        n_groups = len(self.widths)
        bags = e.rows * n_groups + self.group_of[e.cols]  # non-decreasing: row-major order sorts groups
        crow = torch.zeros(e.n * n_groups + 1, dtype=torch.int64, device=bags.device)
        crow[1:] = torch.bincount(bags, minlength=e.n * n_groups).cumsum(0)
        return Entries(bags, e.cols, crow, e.n * n_groups, e.d_sae)

    def _aux_loss(self, x, x_hat, raw, x_c, pre_dense, dead) -> Tensor:
        """TopK's AuxK: the best dead latents reconstruct the residual of the full width."""
        with torch.no_grad():
            masked = (raw + self.b_enc).masked_fill_(~dead, float("-inf"))
            idx = masked.topk(self.aux_k, dim=-1, sorted=False).indices
        n = x.shape[0]
        if pre_dense is None:
            rows = torch.arange(n, device=x.device).repeat_interleave(self.aux_k)
            crow = torch.arange(0, n * self.aux_k + 1, self.aux_k, device=x.device)
            aux_e = Entries(rows, idx.reshape(-1), crow, n, self.cfg.d_sae)
            pre = sparse.pre_acts_at(raw, x_c, self.W_enc, self.b_enc, self.b_dec, aux_e).view(n, -1)
        else:
            pre = pre_dense.gather(1, idx)
        pre = torch.where(dead[idx], pre, 0.0).relu()  # a row with fewer dead latents than aux_k
        e_hat = kernels.sparse_decode(pre, idx, self.W_dec)
        scale = (dead.sum() / self.aux_k).clamp(max=1.0)
        return self.hp.aux_coeff * scale * (e_hat - (x - x_hat).detach()).pow(2).sum(-1).mean()

    # ----- the BatchTopK selection -----
    @torch.no_grad()
    def _select(self, raw: Tensor) -> Entries:
        """The k·batch largest positive pre-activations (raw + b_enc) of the global batch, in row-major order.
        Ties at the cutoff are all kept."""
        n = raw.shape[0]
        count = self.hp.k * (self.share.total if self.share.world.size > 1 else n)
        lower = self.last_cutoff * CUTOFF_MARGIN
        rows, cols, vals = _above(raw, self.b_enc, lower)
        if _global_sum(len(vals), self.share) < count and bool(lower > 0):
            rows, cols, vals = _above(raw, self.b_enc, lower.new_tensor(0.0))
        cutoff = _global_kth(vals, count, self.share)
        self.last_cutoff.copy_(cutoff)
        keep = vals >= cutoff
        rows, cols = rows[keep], cols[keep]
        crow = torch.zeros(n + 1, dtype=torch.int64, device=raw.device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        return Entries(rows, cols, crow, n, self.cfg.d_sae)


class PrefixErrors(torch.autograd.Function):
    """Every prefix's squared error from the groups' parts [n, G, d] of the reconstructions and the target
    [n, d] (x − b_dec): (mean over tokens of ‖Σ_{g≤m} parts_g − target‖², for each m [G]; the last prefix's
    Σ_g parts_g [n, d], without gradient). The errors are one cumulative sum, kept for the backward, whose
    gradient into group g is the errors of every prefix that holds g: a reverse running sum in place
    (autograd's chain of cumsum, slices and squares makes a pass over [n, G, d] for each of them)."""

    @staticmethod
    def forward(ctx, parts, target):
        err = parts.cumsum(1).sub_(target.unsqueeze(1))  # x̂_m − x for every prefix m
        ctx.save_for_backward(err)
        full = err[:, -1] + target
        ctx.mark_non_differentiable(full)
        return torch.linalg.vecdot(err, err).mean(0), full

    @staticmethod
    def backward(ctx, g, _g_full):
        (err,) = ctx.saved_tensors
        # In place: err is not needed again, and a fresh [n, G, d] costs as much as the product itself (a
        # second backward through the same graph then fails on the version check instead of reading junk).
        grad = err.mul_((2 / err.shape[0] * g).view(1, -1, 1))
        for m in range(grad.shape[1] - 2, -1, -1):  # group m is in prefixes m…G−1
            grad[:, m] += grad[:, m + 1]
        return grad, -grad[:, 0]


def _above(raw: Tensor, b_enc: Tensor, lower: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, pre) of the entries with pre = raw + b_enc > lower ≥ 0, in row-major order."""
    rows, cols = (raw > lower - b_enc).nonzero().unbind(1)
    pre = raw[rows, cols] + b_enc[cols]
    keep = pre > lower  # the sum rounded: the comparison above may let a few through at the edge
    return rows[keep], cols[keep], pre[keep]


def _global_sum(count: int, share) -> int:
    if share.world.size == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t)


def _global_kth(vals: Tensor, count: int, share) -> Tensor:
    """The count-th largest of the values of every rank (the smallest of all of them when fewer)."""
    top = vals.topk(min(count, len(vals)), sorted=False).values
    if share.world.size > 1:  # each rank's candidates for the global top-count, padded to one length
        padded = torch.full((count,), float("-inf"), dtype=vals.dtype, device=vals.device)
        padded[: len(top)] = top
        gathered = [torch.empty_like(padded) for _ in range(share.world.size)]
        dist.all_gather(gathered, padded)
        top = torch.cat(gathered)
        top = top.topk(min(count, int(torch.isfinite(top).sum())), sorted=False).values
    return top.min() if len(top) else vals.new_tensor(float("inf"))
