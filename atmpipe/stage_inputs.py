"""What eval and inspect both open before their work: the SAEs with their metadata, checked against each
other and against the store and model they were trained on; the output directory, checked before minutes of
work; and the progress phase and console they report to."""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from atmpipe.errors import UserError
from atmpipe.progress import Progress
from atmpipe.sae import SAE
from atmpipe.store import open_store
from atmpipe.writable import cannot_write, require_writable

console = Console(stderr=True)


@dataclass
class LoadedSAE:
    name: str
    path: Path
    sae: torch.nn.Module
    info: dict  # method, width, model, layer, hyper-parameters, provenance


class Phase:
    """One progress bar for one long phase; `advance(n)` with a per-second rate shown."""

    def __init__(self, progress: Progress, description: str, total: int):
        self.progress, self.task = progress, progress.add_task(description, total=total)

    def __call__(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


def check_out(out: Path) -> None:
    """The report is written last: an unwritable --out must fail before the minutes of LM work, not after."""
    if out.exists() and not out.is_dir():
        raise cannot_write(out, FileExistsError(errno.EEXIST, "it is a file", str(out)))
    require_writable(out)


def load_saes(paths: list[str]) -> list[LoadedSAE]:
    if not paths:
        raise UserError("no SAE given; pass --sae DIR (one or more times)")
    loaded, names = [], set()
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError(
                f"SAE directory {path} does not exist; pass a directory written by `atmpipe train`"
            )
        sae = SAE.load(path).eval()
        meta_file = path / "atmpipe.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        name = path.name if path.name not in names else f"{path.parent.name}/{path.name}"
        names.add(name)
        cfg = sae.cfg
        loaded.append(
            LoadedSAE(
                name,
                path,
                sae,
                {
                    "path": str(path),
                    "method": cfg.method,
                    "architecture": sae.architecture,
                    "d_in": cfg.d_in,
                    "d_sae": cfg.d_sae,
                    "model_name": cfg.model_name,
                    "layer": cfg.layer,
                    "hook_name": cfg.hook_name,
                    "hparams": cfg.hparams,
                    "store": cfg.store,
                    "provenance": meta.get("provenance", {}),
                    "format": "atmpipe" if meta else "saelens",
                },
            )
        )
    return loaded


def same_model(a: str, b: str) -> bool:
    """'google/gemma-2-2b' and 'gemma-2-2b' name the same model."""
    if not a or not b:
        return True
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def other_width(saes: list[LoadedSAE], d_model: int) -> LoadedSAE | None:
    """The first SAE whose input width is not `d_model` (the model's it is evaluated with)."""
    return next((s for s in saes if s.info["d_in"] != d_model), None)


def agreed(saes: list[LoadedSAE], key: str, flag, what: str):
    """The value all SAEs record for `key` (flag wins); SAEs disagreeing with each other or the flag are refused."""
    values = {s.name: s.info[key] for s in saes if s.info[key] not in ("", -1, None)}
    if flag is not None:
        for name, v in values.items():
            if (key == "model_name" and not same_model(v, flag)) or (key != "model_name" and v != flag):
                raise UserError(
                    f"SAE {name} was trained on {what} {v}, but --{what} {flag} was given; "
                    f"evaluate it on its own {what} or drop --{what}"
                )
        return flag
    distinct = sorted({str(v) for v in values.values()})
    if len(distinct) > 1:
        raise UserError(
            f"the SAEs were trained on different {what}s ({', '.join(f'{n}: {v}' for n, v in values.items())}); "
            "evaluate SAEs of one model and layer together"
        )
    return next(iter(values.values()), None)


def open_sae_store(cfg, saes: list[LoadedSAE], layer: int | None):
    """The store `cfg.store` names, else the one the SAEs were trained on (None if neither is known), checked
    against the SAEs' layer, width and model."""
    path = cfg.store or next((s.info["store"].get("path") for s in saes if s.info["store"].get("path")), None)
    if path is None:
        return None
    store = open_store(path)
    if layer is not None and layer not in store.layers:
        raise UserError(
            f"store {path} holds layers {store.layers}, not layer {layer} of the SAEs; "
            "pass the store the SAEs were trained on (--store)"
        )
    for s in saes:
        if s.info["d_in"] != store.d_model:
            raise UserError(
                f"SAE {s.name} has width d_in={s.info['d_in']} but store {path} has d_model="
                f"{store.d_model}; pass the store the SAE was trained on (--store)"
            )
        store_model = store.attrs["model"]["name"]
        if store_model != "synthetic" and not same_model(s.info["model_name"], store_model):
            raise UserError(
                f"SAE {s.name} was trained on model {s.info['model_name']} but store {path} holds "
                f"{store_model}; pass the matching --store"
            )
    return store
