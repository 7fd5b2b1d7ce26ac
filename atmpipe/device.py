"""Which torch device a stage runs on: one rule and one set of messages for harvest, train and eval."""

from __future__ import annotations

import torch

from atmpipe.errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """`None` or "auto" picks CUDA when torch sees a GPU, else the CPU; anything else must exist here."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; pass cpu, cuda, cuda:1 or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name} was asked for but no CUDA GPU is visible; drop --device or pass --device cpu"
        )
    return device
