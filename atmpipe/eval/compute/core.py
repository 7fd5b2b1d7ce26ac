"""Core metrics: reconstruction and sparsity on held-out store tokens, and downstream loss with the SAE spliced in.

Definitions in docs/metrics.md (SAEBench's code where paper and code differ). Every reducer accumulates in float64
over batches, so the numbers do not depend on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from atmpipe.lm import forward_with_splice

DENSE_FIRING_RATE = 0.1  # a latent firing on more than 10% of tokens is "dense"
DUPLICATE_COSINE = 0.8  # two live latents with decoder cosine above this are duplicates


class CoreAccumulator:
    """Streams (x, f, x_hat) batches of non-special tokens and reduces them to the core metrics."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq_x = 0.0  # Σ‖x‖²
        self.sum_sq_err = 0.0  # Σ‖x − x̂‖²
        self.sum_cos = 0.0
        self.sum_norm_x = 0.0
        self.sum_norm_xhat = 0.0
        self.sum_sq_xhat = 0.0
        self.sum_dot = 0.0  # Σ⟨x, x̂⟩
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.fire_count = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor, f: Tensor, x_hat: Tensor) -> None:
        x, f, x_hat = x.double(), f.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_sq_x += float((x * x).sum())
        self.sum_sq_err += float(((x - x_hat) ** 2).sum())
        self.sum_cos += float(F.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum())
        self.sum_norm_x += float(x.norm(dim=-1).sum())
        self.sum_norm_xhat += float(x_hat.norm(dim=-1).sum())
        self.sum_sq_xhat += float((x_hat * x_hat).sum())
        self.sum_dot += float((x * x_hat).sum())
        active = f != 0
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(f.abs().sum())
        self.fire_count += active.sum(0).double()

    def result(self) -> dict:
        n = self.n
        mean_x = self.sum_x / n
        total_var = self.sum_sq_x - n * float(mean_x @ mean_x)  # Σ‖x − x̄‖²
        fvu = self.sum_sq_err / total_var if total_var > 0 else math.nan
        rate = self.fire_count / n
        return {
            "n_tokens": n,
            "mse": self.sum_sq_err / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cossim": self.sum_cos / n,
            "l2_ratio": self.sum_norm_xhat / self.sum_norm_x,
            "relative_reconstruction_bias": self.sum_sq_xhat / self.sum_dot if self.sum_dot else math.nan,
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "frac_dead": float((self.fire_count == 0).double().mean()),
            "frac_dense": float((rate > DENSE_FIRING_RATE).double().mean()),
            "live": (self.fire_count > 0),
        }


@torch.no_grad()
def decoder_similarity(W_dec: Tensor, live: Tensor | None = None, block: int = 1024) -> dict:
    """Max pairwise decoder cosine (over all latents) and the share of live latents duplicated by another.

    Computed in blocks of rows so a 65k-wide decoder never materialises its full Gram matrix.
    """
    W = F.normalize(W_dec.detach().float(), dim=-1)
    d_sae = W.shape[0]
    live = torch.ones(d_sae, dtype=torch.bool) if live is None else live.to(torch.bool).cpu()
    max_cos = -1.0
    duplicated = torch.zeros(d_sae, dtype=torch.bool)
    live_rows = W[live]
    for start in range(0, d_sae, block):
        rows = W[start : start + block]
        sims = rows @ W.T
        idx = torch.arange(start, start + rows.shape[0])
        sims[torch.arange(rows.shape[0]), idx] = -2.0  # ignore self-similarity
        if d_sae > 1:
            max_cos = max(max_cos, float(sims.max()))
        if live_rows.shape[0] > 1:
            live_sims = sims[:, live]
            duplicated[start : start + rows.shape[0]] = (live_sims > DUPLICATE_COSINE).any(dim=1)
    n_live = int(live.sum())
    frac_dup = float((duplicated & live).sum()) / n_live if n_live else math.nan
    return {
        "max_decoder_cosine": max_cos if d_sae > 1 else math.nan,
        "frac_duplicate": frac_dup,
        "n_live": n_live,
    }


@torch.no_grad()
def reconstruction_metrics(sae, batches: Iterable[Tensor]) -> dict:
    """All core metrics of `sae` over batches of raw activations (special tokens already removed)."""
    acc = CoreAccumulator(sae.W_dec.shape[1], sae.W_dec.shape[0])
    for x in batches:
        x = x.float()
        f = sae.encode(x)
        acc.update(x, f, sae.decode(f))
    if acc.n == 0:
        return {"status": "no tokens", "reason": "the eval split holds no non-BOS tokens"}
    out = acc.result()
    live = out.pop("live")
    out.update(decoder_similarity(sae.W_dec, live))
    return out


# --- downstream loss with the reconstruction spliced in ---------------------------------------------------


def _next_token_ce_and_logprobs(logits: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position next-token CE [b, s-1] and the log-probabilities [b, s-1, vocab] they come from."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return ce, logp


def _kl(logp_clean: Tensor, logp_other: Tensor) -> Tensor:
    """KL(clean ‖ other) per position."""
    return (logp_clean.exp() * (logp_clean - logp_other)).sum(-1)


def keep_special(fn, input_ids: Tensor, special_ids: Iterable[int]):
    """Wrap a residual replacement so special-token positions (BOS) keep their clean residual.

    SAEBench excludes special tokens from the reconstruction; they are also excluded from training.
    """
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for t in special_ids:
        special |= input_ids == t

    def splice(resid: Tensor) -> Tensor:
        return torch.where(special[..., None].to(resid.device), resid, fn(resid).to(resid.dtype))

    return splice


@torch.no_grad()
def baseline_losses(lm, layer: int, windows: Tensor, special_ids: list[int], progress=None) -> dict:
    """CE of the clean run and of the zero-ablated run and their KL: independent of the SAE, so cached."""
    ce_clean, ce_zero, kl_zero, n = 0.0, 0.0, 0.0, 0
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1].to(lm.device)
        clean, logp_clean = _next_token_ce_and_logprobs(lm.model(input_ids=ids).logits, ids)
        zero_fn = keep_special(torch.zeros_like, ids, special_ids)
        zero, logp_zero = _next_token_ce_and_logprobs(forward_with_splice(lm, ids, layer, zero_fn), ids)
        ce_clean += float(clean.sum())
        ce_zero += float(zero.sum())
        kl_zero += float(_kl(logp_clean, logp_zero).sum())
        n += clean.numel()
        if progress is not None:
            progress()
    return {"ce_clean": ce_clean / n, "ce_zero": ce_zero / n, "kl_zero": kl_zero / n, "n_predictions": n}


def reconstruct(sae, resid: Tensor) -> Tensor:
    """SAE reconstruction of a [batch, seq, d] residual (SAEs take [tokens, d])."""
    flat = resid.reshape(-1, resid.shape[-1]).float()
    return sae.decode(sae.encode(flat)).reshape(resid.shape)


@torch.no_grad()
def spliced_losses(lm, layer: int, windows: Tensor, special_ids: list[int], sae, progress=None) -> dict:
    """CE and KL (vs clean) with the SAE's reconstruction replacing the layer-`layer` residual."""
    ce_sae, kl_sae, n = 0.0, 0.0, 0
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1].to(lm.device)
        _, logp_clean = _next_token_ce_and_logprobs(lm.model(input_ids=ids).logits, ids)
        recon = keep_special(lambda r: reconstruct(sae, r), ids, special_ids)
        ce, logp = _next_token_ce_and_logprobs(forward_with_splice(lm, ids, layer, recon), ids)
        ce_sae += float(ce.sum())
        kl_sae += float(_kl(logp_clean, logp).sum())
        n += ce.numel()
        if progress is not None:
            progress()
    return {"ce_sae": ce_sae / n, "kl_sae": kl_sae / n}


def downstream_scores(base: dict, spliced: dict) -> dict:
    """ce_loss_score = (CE_zero − CE_sae)/(CE_zero − CE_clean); kl_div_score = (KL_zero − KL_sae)/KL_zero."""
    ce_gap = base["ce_zero"] - base["ce_clean"]
    return {
        "ce_loss_score": (base["ce_zero"] - spliced["ce_sae"]) / ce_gap if ce_gap else math.nan,
        "kl_div_score": (base["kl_zero"] - spliced["kl_sae"]) / base["kl_zero"]
        if base["kl_zero"]
        else math.nan,
        "ce_clean": base["ce_clean"],
        "ce_zero": base["ce_zero"],
        "ce_sae": spliced["ce_sae"],
        "kl_zero": base["kl_zero"],
        "kl_sae": spliced["kl_sae"],
        "n_predictions": base["n_predictions"],
    }
