"""Warm-ups and ramps: one helper for the lr schedule, ReLU's and JumpReLU's sparsity coefficient and ATM's
masking rate, so that every schedule starts, ramps and scales to the run length the same way."""

from __future__ import annotations


def ramp(step: float, start: float, length: float) -> float:
    """0 before `start`, then linear to 1 over `length` steps, 1 after (a step function when length ≤ 0)."""
    if length <= 0:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / length, 0.0), 1.0)


def warmup_length(steps: int, frac: float, total: int) -> int:
    """A warm-up of `steps`, capped at `frac` of a `total`-step run so that short runs warm up too."""
    return max(0, min(steps, int(frac * total)))
