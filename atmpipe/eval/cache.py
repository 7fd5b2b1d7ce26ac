"""Per model and layer cache of the LM activations the metrics need (prompts, probing texts, baselines).

`$ATMPIPE_HOME/eval-cache/<model-hash>-l{L}/<kind>-<config-hash>.safetensors` holds the tensors and the
`.json` beside it the config that produced them plus any non-tensor data (words, labels). A second SAE,
or a second `atmpipe eval`, reuses them: only the SAE's own share is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atmpipe.atomic import atomic_file
from atmpipe.home import atmpipe_home


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ActivationCache:
    def __init__(self, model_hash: str, layer: int, root: Path | None = None):
        self.dir = (root or atmpipe_home() / "eval-cache") / f"{model_hash[:16]}-l{layer}"

    def paths(self, kind: str, config: dict) -> tuple[Path, Path]:
        stem = self.dir / f"{kind}-{config_hash(config)}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def get_or_compute(
        self, kind: str, config: dict, compute: Callable[[], tuple[dict[str, torch.Tensor], dict]]
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON-able extras for (kind, config); computed once, then read back."""
        tensors_path, meta_path = self.paths(kind, config)
        if tensors_path.exists() and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("config") == json.loads(json.dumps(config, default=str)):
                return load_file(tensors_path), meta["extra"]
        tensors, extra = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        # Written to temp names and renamed, tensors first: a crash never leaves a half cache entry.
        with atomic_file(tensors_path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        with atomic_file(meta_path) as tmp:
            tmp.write_text(json.dumps({"kind": kind, "config": config, "extra": extra}, default=str))
        return tensors, extra
