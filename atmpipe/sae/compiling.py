"""The compile switch: the one place that decides whether atmpipe runs compiled kernels.

Every compiled function is made with `fused` and asks `compiling()` at each call. On by default; off with
`atmpipe train --no-compile` (TrainConfig.no_compile; the trainer calls `set_compile`) or with the environment
variable ATMPIPE_EAGER=1, which wins over everything (a machine without a C++ compiler, debugging). Off,
each function's plain eager twin runs: the same results to float round-off, without torch.compile.

(Whether the training step runs on sparse or dense latents is another question, with its own option:
`atmpipe train --latent-path`, see sparse.py.)
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils._python_dispatch import _disable_current_modes

_compile: bool = True


def set_compile(on: bool) -> None:
    """Turn compiled kernels on or off for this process."""
    global _compile
    _compile = bool(on)


def compiling() -> bool:
    """Whether compiled kernels run: set_compile's setting, unless ATMPIPE_EAGER=1 turns them off."""
    return _compile and os.environ.get("ATMPIPE_EAGER", "") in ("", "0")


def _compile_fn(fn, dynamic: bool | None):
    # One graph per dtype and per combination of python constants (ATM's options, DDP's β = 1): a process
    # that trains several configurations (the test suite, a sweep) needs more than torch's default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=dynamic, fullgraph=True)


def fused(fn, dynamic: bool | None = True):
    """fn compiled on first use (for every shape; dynamic=None: torch's default, specialise then
    generalise), or fn itself while compiling() is off."""
    compiled = functools.cache(lambda: _compile_fn(fn, dynamic))

    def run(*args, **kw):
        if not compiling():
            return fn(*args, **kw)
        # torch.compile refuses to run under a dispatch mode (precision.EmulatedBF16, the quality study's
        # bf16 emulation): set it aside, these kernels hold no matrix product for it to see.
        with _disable_current_modes():
            return compiled()(*args, **kw)

    return functools.wraps(fn)(run)
