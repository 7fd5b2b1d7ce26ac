"""Fast ops with their plain twins: ATM's fused statistics + masking, JumpReLU's fused forward/backward,
dense firing counts, and TopK's sparse encoder/decoder (the other methods' sparse path: sparse.py).

Each fast op has a reference beside it that the tests compare it with (same inputs, same random stream).
Element-wise passes over [batch, d_sae] cost about as much as a GEMM each on CPU, so they are fused with
torch.compile, behind the one compile switch (compiling.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from atmpipe.sae import sparse
from atmpipe.sae.compiling import fused

# ---------------------------------------------------------------------------------------------------
# Firing counts of dense latents (f ≥ 0), for the dead-latent clock and L0.
# ---------------------------------------------------------------------------------------------------


def fire_counts(f: Tensor) -> Tensor:
    """How many tokens each latent fired on: [d_sae] int32 (eager bool reductions over dim 0 are slow)."""
    return (f > 0).sum(0, dtype=torch.int32)


fire_counts_fused = fused(fire_counts)

# ---------------------------------------------------------------------------------------------------
# JumpReLU: f = pre·1[pre > θ] and the per-token L0 in one pass; both gradients in one pass.
# ---------------------------------------------------------------------------------------------------


def jumprelu_forward(pre: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(f, L0 per token [batch] in fp32 at least (a bf16 count would stop at 256), firing counts per latent
    [d_sae] int32)."""
    active = pre > theta
    l0 = active.sum(-1, dtype=torch.promote_types(pre.dtype, torch.float32))
    return torch.where(active, pre, 0.0), l0, active.sum(0, dtype=torch.int32)


def jumprelu_backward(pre: Tensor, theta: Tensor, eps: float, g_f: Tensor, g_l0: Tensor):
    """Straight-through gradients with the rectangle kernel rect(u) = 1[|u| < ½], u = (pre − θ)/ε:
    ∂/∂pre = g_f·1[pre > θ];  ∂/∂θ = Σ_t rect(u)·(−(θ/ε)·g_f − g_l0/ε)."""
    u = (pre - theta) / eps
    in_window = (u > -0.5) & (u < 0.5)
    grad_pre = torch.where(pre > theta, g_f, 0.0)
    grad_theta = torch.where(in_window, -(theta / eps) * g_f - g_l0.unsqueeze(-1) / eps, 0.0).sum(0)
    return grad_pre, grad_theta


jumprelu_forward_fused = fused(jumprelu_forward)
jumprelu_backward_fused = fused(jumprelu_backward)


class JumpReLU(torch.autograd.Function):
    """(f, L0 per token, firing counts) from (pre, θ, ε); gradients to pre and θ in one fused pass."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        f, l0, counts = jumprelu_forward_fused(pre, theta)
        ctx.mark_non_differentiable(counts)
        return f, l0, counts

    @staticmethod
    def backward(ctx, g_f, g_l0, _g_counts):
        pre, theta = ctx.saved_tensors
        grad_pre, grad_theta = jumprelu_backward_fused(
            pre, theta, ctx.eps, g_f.contiguous(), g_l0.contiguous()
        )
        return grad_pre, grad_theta, None


# ---------------------------------------------------------------------------------------------------
# ATM: one fused function for the statistics update, importance, threshold, probabilities and masks.
# ---------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def hash32(x):
    """A 32-bit integer mixer (works on Python ints and int64 tensors holding values < 2**32).

    Multipliers stay below 2**31 so int64 products never overflow: compiled code (C++/Triton) and
    eager torch then compute bit-identical values, which makes the Bernoulli masks reproducible.
    """
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def step_key(seed: int, step: int) -> int:
    """The random-stream key of one training step (counter-based: resuming at a step gives the same masks)."""
    return hash32((hash32(seed & _MASK32) ^ (step & _MASK32)) & _MASK32)


def uniform_noise(shape: tuple[int, ...], key: Tensor, device: torch.device) -> Tensor:
    """U[0,1) noise from the counter hash of each element's flat index and the step key (24-bit exact)."""
    n = 1
    for s in shape:
        n *= s
    return noise_at(torch.arange(n, device=device, dtype=torch.int64).view(shape), key)


def noise_at(flat_index: Tensor, key: Tensor) -> Tensor:
    """The U[0,1) noise of the elements at `flat_index` (int64) of a step's mask: a rank holding some rows
    of a global batch draws exactly the values one process would."""
    return (hash32((flat_index ^ key) & _MASK32) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def atm_statistics(mean_f, fired, dec_norm, M, F_, R, recon_norm, beta: float):
    """One EMA step of magnitude M, frequency F and reconstruction share R from the batch means of f
    (mean_f) and of 1[f > 0] (fired), all [d_sae]; recon_norm is the batch mean of ‖x̂_t − b_dec‖."""
    M = beta * M + (1 - beta) * mean_f
    F_ = beta * F_ + (1 - beta) * fired
    R = beta * R + (1 - beta) * mean_f * dec_norm / recon_norm
    return M, F_, R


def atm_importance(M: Tensor, F_: Tensor, R: Tensor, combine: str) -> Tensor:
    """I from the statistics, each normalised by its mean: their product or their mean."""
    tiny = 1e-30  # all-zero statistics give I = 0 and so p = 0, never NaN
    m, fr, rr = M / M.mean().clamp_min(tiny), F_ / F_.mean().clamp_min(tiny), R / R.mean().clamp_min(tiny)
    return m * fr * rr if combine == "product" else (m + fr + rr) / 3


LOG_FLOOR = 1e-6  # log I is taken of I + this: I is in units of a typical latent, dead latents have I = 0


def atm_probabilities(
    imp: Tensor, r: Tensor, c: float, p_max: float, log_threshold: bool = False, uniform: bool = False
) -> tuple[Tensor, Tensor]:
    """ATM's threshold θ (in I's units) and masking probabilities p from the importance I: [d_sae].

    linear: θ = mean(I) + c·std(I) and p = 1 − exp(−r(θ − I)/θ) below θ.
    log: the same on s = log(I + LOG_FLOOR): θ_s = mean(s) + c·std(s) and p = 1 − exp(−r(θ_s − s)/std(s)),
    i.e. p = 1 − exp(−r(c − z)) for a latent whose log importance has z-score z < c; scale-free, so a heavy
    tail of I cannot lift θ above every latent. θ is returned as exp(θ_s) − LOG_FLOOR.
    p is capped at p_max; uniform gives every latent the mean of these p (dropout with the same rate).
    Shared by the dense update below and any step that acts on active entries only.
    """
    if log_threshold:
        s = (imp + LOG_FLOOR).log()
        spread = s.std(correction=0)
        theta_s = s.mean() + c * spread
        p = torch.where(s < theta_s, 1 - torch.exp(-r * (theta_s - s) / spread.clamp_min(1e-12)), 0.0)
        theta = theta_s.exp() - LOG_FLOOR
    else:
        theta = imp.mean() + c * imp.std(correction=0)
        p = torch.where(imp < theta, 1 - torch.exp(-r * (theta - imp) / theta), 0.0)
    p = p.clamp(0.0, p_max)
    if uniform:
        p = p.mean().expand_as(p).contiguous()
    return theta, p


def atm_update(
    f: Tensor,
    dec_norm: Tensor,
    M: Tensor,
    F_: Tensor,
    R: Tensor,
    recon_norm: Tensor,
    r: Tensor,
    key: Tensor,
    beta: float,
    c: float,
    p_max: float,
    combine: str,
    per_token: bool,
    log_threshold: bool = False,
    uniform: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ATM's per-step statistics and masks on dense latents (this is also the eager reference).

    f: unmasked latents [batch, d_sae]; dec_norm: ‖W_dec,i‖; M, F_, R: EMA buffers; recon_norm: the
    batch mean of ‖x̂_t − b_dec‖ (0-d); r: the effective rate this step (0-d); key: step key (0-d int64).
    Returns new (M, F, R), importance I, threshold θ (0-d), probabilities p and the keep mask
    (0/1 in f's dtype; [batch, d_sae] per token, [d_sae] per step).
    """
    f_dtype = f.dtype
    f = f.detach().float()
    M, F_, R = atm_statistics(f.mean(0), (f > 0).float().mean(0), dec_norm, M, F_, R, recon_norm, beta)
    imp = atm_importance(M, F_, R, combine)
    theta, p = atm_probabilities(imp, r, c, p_max, log_threshold, uniform)
    u = uniform_noise(tuple(f.shape) if per_token else (f.shape[1],), key, f.device)
    keep = (u >= p).to(f_dtype)  # in f's dtype: the mask multiplies f with no conversion pass
    return M, F_, R, imp, theta, p, keep


atm_update_fused = fused(atm_update, dynamic=None)  # one fused kernel set (C++ on CPU, Triton on CUDA)


# ---------------------------------------------------------------------------------------------------
# TopK: encoder whose backward touches only the selected latents, and a gather-sum decoder.
# ---------------------------------------------------------------------------------------------------


def _topk_select(pre: Tensor, k: int, allowed: Tensor | None) -> tuple[Tensor, Tensor]:
    if allowed is not None:
        pre = pre.masked_fill(~allowed, float("-inf"))
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return vals.relu(), idx


class TopKEncode(torch.autograd.Function):
    """(relu(top-k of pre), indices) and, if `aux_mask` is given, the top-k_aux among the masked latents.

    pre = (x − b_dec) @ W_enc + b_enc is computed densely; the backward is sparse: the gradient of the
    pre-activations is nonzero only at selected latents, so W_enc's gradient is a sparse-dense product.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, aux_mask, k_aux):
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, W_enc)
        vals, idx = _topk_select(pre, k, None)
        if aux_mask is not None:
            aux_vals, aux_idx = _topk_select(pre, k_aux, aux_mask)
        else:
            aux_vals, aux_idx = x.new_zeros(x.shape[0], 0), idx.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(x_c, W_enc, vals, idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        x_c, W_enc, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        # Through the ReLU, then merge the main and auxiliary selections into one sparse gradient.
        g = torch.cat([g_vals * (vals > 0), g_aux * (aux_vals > 0)], dim=1)
        lat = torch.cat([idx, aux_idx], dim=1)
        tok = torch.arange(lat.shape[0], device=lat.device).unsqueeze(1).expand_as(lat)
        grad_W, grad_b_enc = sparse.encoder_grads(
            x_c, tok.reshape(-1), lat.reshape(-1), g.reshape(-1), W_enc.shape[1]
        )
        grad_b_dec = -(W_enc @ grad_b_enc)  # b_dec enters as x − b_dec: −Σ_t G_t W_encᵀ
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(
                lat, W_enc.T.contiguous(), per_sample_weights=g.to(W_enc.dtype), mode="sum"
            )
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None


def topk_encode(x, W_enc, b_enc, b_dec, k, aux_mask=None, k_aux=0):
    """Fast path: TopK encoder with a sparse backward. Returns (vals, idx, aux_vals, aux_idx)."""
    return TopKEncode.apply(x, W_enc, b_enc, b_dec, k, aux_mask, k_aux)


def topk_encode_dense(x, W_enc, b_enc, b_dec, k, aux_mask=None, k_aux=0):
    """Reference twin of topk_encode: plain autograd through dense pre-activations."""
    pre = torch.addmm(b_enc, x - b_dec, W_enc)
    vals, idx = _topk_select(pre, k, None)
    if aux_mask is None:
        return vals, idx, pre.new_zeros(pre.shape[0], 0), idx.new_zeros(pre.shape[0], 0)
    aux_vals, aux_idx = _topk_select(pre, k_aux, aux_mask)
    return vals, idx, aux_vals, aux_idx


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Σ_j vals[t, j] · W_dec[idx[t, j]] (+ b_dec) as a gather-sum with a sparse backward, never a dense GEMM."""
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    e = sparse.Entries(None, idx.reshape(-1), crow, n, W_dec.shape[0])
    return sparse.decode(vals.reshape(-1), e, W_dec, b_dec)


def dense_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Reference twin of sparse_decode: scatter into dense latents, then one GEMM."""
    f = torch.zeros(vals.shape[0], W_dec.shape[0], dtype=vals.dtype, device=vals.device).scatter(1, idx, vals)
    out = f @ W_dec
    return out if b_dec is None else out + b_dec
