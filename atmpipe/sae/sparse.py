"""Sparse latents: the training step of ReLU, JumpReLU and ATM on a batch's active entries only.

Once warm-up is over, ~1% of a batch's latents are nonzero, yet a dense step runs five GEMMs over all of
them. On the sparse path only the encoder's forward GEMM stays dense (every pre-activation must be seen to
know which are active); the decoder forward, the decoder-weight gradient, the gradient into the latents
and the encoder-weight gradient run on the `Entries` alone (gather-sum and sparse-dense products).

Each kernel has its dense twin beside it (`*_dense`), which the tests compare it with.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this fraction of nonzero latents (support entries / batch·d_sae) the sparse step is the faster one
# on CPU. `benchmarks/bench_train.py --crossover` (ReLU step, 640 → 5120, batch 4096, 2 loaded cores):
# dense/sparse 2.58 at 1%, 2.00 at 5%, 1.50 at 10%, 0.93 at 20% (benchmarks/results/*-sparse-crossover.json);
# the crossover is near 19%, the switch sits a little below it.
CROSSOVER_DENSITY = 0.15
# On CUDA (H200, 2304 → 65536, batch 4096, fp32 as `atmpipe train` runs; benchmarks/gpu.py's latent paths,
# benchmarks/results/2026-11-29-vm-gpu-paths.json) dense/sparse is 2.84 for ReLU, 2.8 for ATM and 1.7 for
# JumpReLU at densities 0.1% and 0.8%; higher densities were not measured there, so the switch sits at 1%.
CUDA_CROSSOVER_DENSITY = 0.01
# In bf16 the dense step's GEMMs get faster and the sparse step's products do not (they accumulate in fp32),
# so the crossover should move down. It has not been measured (it needs bf16 units: a CPU with AMX or
# AVX512-BF16, or a GPU); until it is, bf16 keeps fp32's measured values.
CROSSOVERS = {
    ("cpu", "fp32"): CROSSOVER_DENSITY,
    ("cpu", "bf16"): CROSSOVER_DENSITY,  # fp32's: not measured in bf16
    ("cuda", "fp32"): CUDA_CROSSOVER_DENSITY,
    ("cuda", "bf16"): CUDA_CROSSOVER_DENSITY,  # fp32's: not measured in bf16
}


def crossover_density(device: torch.device, precision: str = "fp32") -> float:
    """Below this density `--latent-path auto` takes the sparse path, on `device` in `precision` (bf16 | fp32;
    0 where no measurement says it wins)."""
    return CROSSOVERS.get((device.type, precision), 0.0)


class Entries(NamedTuple):
    """Where a batch's latents are kept: entry j is latent cols[j] of token rows[j] (row-major order)."""

    rows: Tensor | None  # [nnz] int64, non-decreasing (None where only the decoder needs the entries)
    cols: Tensor  # [nnz] int64
    crow: Tensor  # [n + 1] int64: token t's entries are crow[t]:crow[t + 1] (CSR row pointers)
    n: int  # tokens
    d_sae: int


def entries_where(support: Tensor) -> Entries:
    """The True positions of a [n, d_sae] bool mask."""
    n, d_sae = support.shape
    rows, cols = support.nonzero().unbind(1)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=support.device)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return Entries(rows, cols, crow, n, d_sae)


def to_dense(vals: Tensor, e: Entries) -> Tensor:
    """The [n, d_sae] latents that hold `vals` at the entries and 0 elsewhere."""
    return vals.new_zeros(e.n, e.d_sae).index_put_((e.rows, e.cols), vals)


def latent_sums(vals: Tensor, e: Entries) -> Tensor:
    """Σ over tokens per latent [d_sae] (a column sum of the dense latents)."""
    return vals.new_zeros(e.d_sae).index_add_(0, e.cols, vals)


def transposed_product(tok: Tensor, lat: Tensor, vals: Tensor, dense: Tensor, d_sae: int) -> Tensor:
    """Gᵀ @ dense [d_sae, d] for the [n, d_sae] matrix G holding vals at (tok, lat): one sparse-dense product,
    in fp32 at least, also for bf16 operands: the result is a weight's gradient, a sum over the batch, and
    torch's CPU kernel would accumulate bf16 in bf16 (a sum of 2,000 ones stops at 256) while CUDA's has no
    bf16 kernel at all. Its cost is nnz·d, not a GEMM's."""
    dtype = torch.promote_types(torch.promote_types(vals.dtype, dense.dtype), torch.float32)
    vals, dense = vals.to(dtype), dense.to(dtype)
    G_t = torch.sparse_coo_tensor(
        torch.stack([lat, tok]), vals, (d_sae, dense.shape[0]), check_invariants=False
    )
    return torch.sparse.mm(G_t, dense)


def encoder_grads(x: Tensor, tok: Tensor, lat: Tensor, g: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """Gradients of W and b in pre = x @ W + b, given dL/dpre nonzero only at (tok[j], lat[j]) with value
    g[j]: W's is xᵀG, b's the per-latent sums of g."""
    grad_W = transposed_product(tok, lat, g, x, d_sae).T  # [d_in, d_sae]
    grad_b = grad_W.new_zeros(d_sae).index_add_(0, lat, g.to(grad_W.dtype))  # in grad_W's dtype, as W's
    return grad_W, grad_b


# ---------------------------------------------------------------------------------------------------
# Encoder: pre = x_c @ W_enc + b_enc (x_c = x − b_dec), its GEMM dense; its gradient from the entries alone.
# ---------------------------------------------------------------------------------------------------


class _PreActsAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, raw, x_c, W_enc, b_enc, b_dec, rows, cols):
        ctx.save_for_backward(x_c, W_enc, rows, cols)
        return raw[rows, cols] + b_enc[cols].to(raw.dtype)  # in raw's dtype (bf16 under autocast)

    @staticmethod
    def backward(ctx, g):
        x_c, W_enc, rows, cols = ctx.saved_tensors
        grad_W, grad_b_enc = encoder_grads(x_c, rows, cols, g, W_enc.shape[1])
        grad_b_dec = -(W_enc @ grad_b_enc)  # b_dec enters as x − b_dec: a mat-vec, not a GEMM
        return None, None, grad_W, grad_b_enc, grad_b_dec, None, None


def pre_acts_at(raw: Tensor, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, e: Entries) -> Tensor:
    """The pre-activations at the entries [nnz], from raw = x_c @ W_enc computed without autograd; the
    backward gives W_enc (x_cᵀG), b_enc and b_dec their gradients from the entries alone."""
    return _PreActsAt.apply(raw, x_c, W_enc, b_enc, b_dec, e.rows, e.cols)


class _PreActs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, raw, x_c, W_enc, b_enc, b_dec):
        ctx.save_for_backward(x_c, W_enc)
        return raw + b_enc.to(raw.dtype)  # in raw's dtype (bf16 under autocast)

    @staticmethod
    def backward(ctx, g):
        # The GEMM in g's dtype (the forward's: bf16 under autocast; autograd casts W_enc's gradient to
        # fp32), the bias sums in fp32 at least.
        x_c, W_enc = ctx.saved_tensors
        grad_b_enc = g.sum(0, dtype=torch.promote_types(g.dtype, W_enc.dtype))
        return None, None, x_c.to(g.dtype).T @ g, grad_b_enc, -(W_enc @ grad_b_enc)


def pre_acts_dense(raw: Tensor, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """Dense twin of pre_acts_at: all of the pre-activations, with the dense gradients."""
    return _PreActs.apply(raw, x_c, W_enc, b_enc, b_dec)


# ---------------------------------------------------------------------------------------------------
# Decoder: x̂ = Σ_j vals[j]·W_dec[cols[j]] per token, as a gather-sum (its backward is sparse too).
# ---------------------------------------------------------------------------------------------------


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, W_dec, e: Entries):
        # In the latents' dtype: under autocast they are bf16 while W_dec stays fp32, and the gather-sum
        # runs on W_dec in bf16 (embedding_bag accumulates bf16 in fp32).
        ctx.save_for_backward(vals, W_dec)
        ctx.e = e
        return F.embedding_bag(e.cols, W_dec.to(vals.dtype), e.crow[:-1], per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g):
        (vals, W_dec), e = ctx.saved_tensors, ctx.e
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:  # one dot product g_t·W_dec[i] per entry: a sampled GEMM
            dtype = torch.promote_types(g.dtype, W_dec.dtype)  # (the CPU's sampled GEMM has no bf16 kernel)
            with warnings.catch_warnings():  # "CSR support is in beta": this use is tested against a GEMM
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(
                    e.crow, e.cols, torch.ones_like(vals, dtype=dtype), (e.n, e.d_sae), check_invariants=False
                )
            grad_vals = torch.sparse.sampled_addmm(pattern, g.to(dtype), W_dec.T.to(dtype), beta=0.0).values()
        if ctx.needs_input_grad[1]:  # Σ_t vals·g_t into each entry's row of W_dec
            rows = e.rows
            if rows is None:
                rows = torch.arange(e.n, device=g.device).repeat_interleave(
                    e.crow.diff(), output_size=len(e.cols)
                )
            grad_W = transposed_product(rows, e.cols, vals, g, e.d_sae)
        return grad_vals, grad_W, None


def decode(vals: Tensor, e: Entries, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """The reconstruction from the entries: a gather-sum forward (embedding_bag); its backward gives the
    latents their gradient as one sampled GEMM and W_dec its gradient as a sparse-dense product. (torch's
    own embedding_bag backward sorts the entries and costs about a dense GEMM.)"""
    out = _Decode.apply(vals, W_dec, e)
    return out if b_dec is None else out + b_dec


def decode_dense(vals: Tensor, e: Entries, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """Dense twin of decode: scatter into [n, d_sae] latents, then one GEMM."""
    out = to_dense(vals, e) @ W_dec
    return out if b_dec is None else out + b_dec


# ---------------------------------------------------------------------------------------------------
# JumpReLU on entries: the support must hold the active entries and the threshold's window.
# ---------------------------------------------------------------------------------------------------


def relu_support(raw: Tensor, b_enc: Tensor) -> Tensor:
    """Entries ReLU needs: pre = raw + b_enc > 0, as raw > −b_enc (one pass, pre never written). The same
    set to the bit: a rounded sum keeps the sign of the exact one."""
    return raw > -b_enc


def jumprelu_support(raw: Tensor, b_enc: Tensor, theta: Tensor, eps: float) -> Tensor:
    """Entries JumpReLU needs: active (pre > θ) or inside the rectangle window (pre > θ − ε/2), in one pass
    as raw > θ − b_enc − ε/2 lowered by ε/64: a superset of the window whatever the round-off of
    jumprelu_backward's (pre − θ)/ε (the extra entries get zero gradients, as in the dense step)."""
    return raw > theta - b_enc - eps * (0.5 + 1 / 64)


class JumpReLUEntries(torch.autograd.Function):
    """(f, L0 per token [n]) from the entries' (pre, θ); the gradients of kernels.JumpReLU, per entry:
    ∂/∂pre = g_f·1[pre > θ];  ∂/∂θ = rect(u)·(−(θ/ε)·g_f − g_l0/ε), summed into θ by autograd's gather."""

    @staticmethod
    def forward(ctx, pre, theta, rows, n, eps):
        active = pre > theta
        ctx.save_for_backward(pre, theta, rows)
        ctx.eps = eps
        count = torch.promote_types(pre.dtype, torch.float32)  # a count in bf16 would stop at 256
        l0 = pre.new_zeros(n, dtype=count).index_add_(0, rows, active.to(count))
        return torch.where(active, pre, 0.0), l0

    @staticmethod
    def backward(ctx, g_f, g_l0):
        pre, theta, rows = ctx.saved_tensors
        u = (pre - theta) / ctx.eps
        in_window = (u > -0.5) & (u < 0.5)
        grad_pre = torch.where(pre > theta, g_f, 0.0)
        grad_theta = torch.where(in_window, -(theta / ctx.eps) * g_f - g_l0[rows] / ctx.eps, 0.0)
        return grad_pre, grad_theta, None, None, None
