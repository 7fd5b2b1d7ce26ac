"""Per model and layer cache of the LM activations the metrics need (prompts, probing texts, baselines).

`$ATMPIPE_HOME/eval-cache/<model-hash>-l{L}/<kind>-<config-hash>.safetensors` holds the tensors and the
`.json` beside it the config that produced them plus any non-tensor data (words, labels). A second SAE,
or a second `atmpipe eval`, reuses them: only the SAE's own share is recomputed. The `.json` is written
last and records the sha256 of the tensors: an entry a kill, a full disk or an edit left incomplete or
damaged does not match it and is computed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from atmpipe.atomic import atomic_file, sweep
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
        if (found := self._read(tensors_path, meta_path, config)) is not None:
            return found
        tensors, extra = compute()
        self.dir.mkdir(parents=True, exist_ok=True)
        sweep(self.dir)  # temporary files of writers that were killed
        # Written to temp names and renamed, tensors first, the metadata (with the tensors' checksum) last:
        # a crash never leaves an entry that is read back, and a damaged one is recomputed.
        with atomic_file(tensors_path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            digest = file_digest(tmp)
        with atomic_file(meta_path) as tmp:
            entry = {"kind": kind, "config": config, "extra": extra, "sha256": digest}
            tmp.write_text(json.dumps(entry, default=str))
        return tensors, extra

    @staticmethod
    def _read(tensors_path: Path, meta_path: Path, config: dict) -> tuple[dict, dict] | None:
        """A complete entry for `config` whose tensors match their recorded checksum, else None."""
        try:
            meta = json.loads(meta_path.read_text())
            if meta["config"] != json.loads(json.dumps(config, default=str)):
                return None
            if meta["sha256"] != file_digest(tensors_path):
                return None
            return load_file(tensors_path), meta["extra"]
        except (OSError, ValueError, KeyError, TypeError):  # absent, half written by an older atmpipe, edited
            return None


def file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
