"""Which dtype the matrix products run in: one rule for training and for the LM stages.

bf16 pays only on hardware with bf16 matrix units: a CUDA GPU that supports it, or a CPU with AMX or
AVX512-BF16. Elsewhere (an AVX2 CPU) torch emulates a bf16 GEMM tens of times slower than fp32, so `auto`
keeps fp32 there. Training in bf16 is mixed precision: the forward's products run under `torch.autocast`
(the backward's products follow them), while master weights, Adam's state, gradients, the loss reduction
and ATM's statistics stay fp32 (docs/precision.md).

`ATMPIPE_EMULATE_BF16=1` is for the quality study only: it computes each bf16 dense GEMM as an fp32 GEMM
of its (already bf16) operands, rounded back to bf16, which is what a bf16 unit computes (bf16 inputs,
exact products, fp32 accumulation, a bf16 output), at fp32 speed on a CPU without the units.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PRECISIONS = ("auto", "bf16", "fp32")
EMULATE_ENV = "ATMPIPE_EMULATE_BF16"


def cpu_has_bf16_units() -> bool:
    """AMX tiles or AVX512-BF16 (torch's own cpuinfo probes)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def has_bf16_units(device: torch.device) -> bool:
    """Whether bf16 matrix products run faster than fp32 ones on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16_units()
    return False


def resolve(precision: str, device: torch.device) -> str:
    """ "bf16" or "fp32" for a --precision of auto | bf16 | fp32 (TrainConfig.validate checks it) on `device`."""
    if precision == "auto":
        return "bf16" if has_bf16_units(device) else "fp32"
    return precision


def default_lm_dtype(device: torch.device) -> torch.dtype:
    """The LM's compute dtype when --dtype is not given: bf16 where the device has bf16 units."""
    return torch.bfloat16 if resolve("auto", device) == "bf16" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a training forward runs in: bf16 autocast for "bf16", nothing for "fp32"."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def emulation(precision: str) -> contextlib.AbstractContextManager:
    """Around a training step's forward and backward: EmulatedBF16 where ATMPIPE_EMULATE_BF16=1 asks for it."""
    if precision != "bf16" or os.environ.get(EMULATE_ENV, "") in ("", "0"):
        return contextlib.nullcontext()
    return EmulatedBF16()


_aten = torch.ops.aten
# The dense products that a bf16 unit computes (the sparse ones run torch's own kernels on every CPU).
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
          _aten.mv.default, _aten.addmv.default, _aten.dot.default}  # fmt: skip


class EmulatedBF16(TorchDispatchMode):
    """Every dense bf16 GEMM as fp32 arithmetic on its bf16 operands, the result rounded to bf16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            return func(*up, **kwargs).bfloat16()
        return func(*args, **kwargs)
