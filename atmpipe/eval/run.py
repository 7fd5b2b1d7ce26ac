"""The eval stage: load SAEs, check they fit the store and model, run each metric, write the report.

The metrics are plug-ins (`atmpipe.eval.metric`, listed in `atmpipe.eval.metrics.REGISTRY`); this module
opens what they need once (SAEs, store, model, the activation cache) and loops over them. LM work goes
through `ActivationCache`, so it is paid once per model and layer; each SAE then costs only its own share.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from atmpipe.atomic import disk_full
from atmpipe.errors import UserError
from atmpipe.eval.cache import ActivationCache
from atmpipe.eval.config import EvalConfig, config_class  # noqa: F401  (config_class: for plug-in tests)
from atmpipe.eval.metric import Metric
from atmpipe.eval.metrics import REGISTRY
from atmpipe.eval.report import write_report
from atmpipe.progress import Progress
from atmpipe.sae import SAE
from atmpipe.store import open_store
from atmpipe.writable import cannot_write, full_disk, require_writable

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


# --- inputs ---------------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """The report is written last: an unwritable --out must fail before the minutes of LM work, not after."""
    if out.exists() and not out.is_dir():
        raise cannot_write(out, FileExistsError(errno.EEXIST, "it is a file", str(out)))
    require_writable(out)


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown or not names:
        raise UserError(
            f"unknown metric {', '.join(unknown) or '(none)'}; known metrics: {', '.join(REGISTRY)}"
        )
    return names


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


def open_eval_store(cfg: EvalConfig, saes: list[LoadedSAE], layer: int | None):
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


# --- the stage -------------------------------------------------------------------------------------


@dataclass
class Context:
    """What the run hands each metric: its settings, the SAEs, what it opened, the cache and the display."""

    cfg: Any  # the EvalConfig
    saes: list[LoadedSAE]
    layer: int
    store: Any = None
    lm: Any = None
    cache: ActivationCache | None = None
    progress: Progress | None = None
    shared: dict = dataclasses.field(default_factory=lambda: {"sizes": {}})  # results.json's "shared"
    results: dict = dataclasses.field(default_factory=dict)  # per SAE, the sections computed so far

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def phase(self, description: str, total: int) -> Phase:
        return Phase(self.progress, description, total)

    def cached(self, kind: str, key: dict, compute):
        """`compute()`'s (tensors, extras), computed once per model, layer, kind and key."""
        return self.cache.get_or_compute(kind, key, compute)


def run_eval(cfg) -> Path:
    metrics = [REGISTRY[name].from_config(cfg) for name in parse_metrics(cfg.metrics)]
    for m in metrics:
        m.check()
    check_out(Path(cfg.out))
    saes = load_saes(cfg.sae)
    ctx, model_name = open_inputs(cfg, saes, metrics)
    for m in metrics:  # every dataset and log is read before the minutes of LM work
        m.prepare(ctx)
    if any("lm" in m.needs for m in metrics):
        ctx.lm = open_lm(cfg, model_name, ctx, saes)
    ctx.cache = ActivationCache(ctx.lm.config_hash if ctx.lm else "store", ctx.layer)
    for s in saes:
        s.sae.to(ctx.lm.device if ctx.lm else "cpu")

    results: dict[str, dict] = {s.name: {} for s in saes}
    ctx.results = results
    with Progress(console) as ctx.progress:
        try:
            for m in metrics:
                m.collect(ctx)
                phase = ctx.phase(f"{m.name} · SAEs", len(saes))
                for s in saes:
                    section = m.compute(ctx, s)
                    if section is not None:
                        results[s.name][m.name] = section
                    phase()
        except OSError as e:  # writing the activation cache
            if not disk_full(e):
                raise
            raise full_disk(ctx.cache.dir, e, "the cache keeps its complete entries") from None

    run_info = {
        "model": model_name,
        "model_source": ctx.lm.source if ctx.lm else None,
        "model_config_hash": ctx.lm.config_hash if ctx.lm else None,
        "layer": ctx.layer,
        "store": str(ctx.store.path) if ctx.store is not None else None,
        "metrics": [m.name for m in metrics],
        "config": {k: v for k, v in asdict(cfg).items() if k != "sae"},
        "cache_dir": str(ctx.cache.dir),
    }
    try:
        out = write_report(Path(cfg.out), saes, results, ctx.shared, run_info, metrics)
    except OSError as e:  # checked at the start, but the disk may have filled or changed since
        if disk_full(e):
            raise full_disk(Path(cfg.out), e, "the LM activations stay cached") from None
        raise cannot_write(Path(cfg.out), e) from None
    console.print(f"report written to {out}")
    return out


def open_inputs(cfg, saes: list[LoadedSAE], metrics: list[Metric]) -> tuple[Context, str | None]:
    """The layer, model name and store the SAEs agree on (flags win), as the metrics' context."""
    layer = agreed(saes, "layer", cfg.layer, "layer")
    model_name = agreed(saes, "model_name", cfg.model, "model")
    store = open_eval_store(cfg, saes, layer)
    if store is not None and layer is None:
        layer = store.layers[0]
    for m in metrics:
        if "store" in m.needs and store is None:
            raise UserError(
                f"metric '{m.name}' needs the activation store the SAEs were trained on; pass --store PATH"
            )
    if layer is None:
        raise UserError("the SAEs do not record their layer; pass --layer")
    if model_name is None and store is not None and store.attrs["model"]["name"] != "synthetic":
        model_name = store.attrs["model"]["name"]
    return Context(cfg, saes, layer, store), model_name


def open_lm(cfg, model_name: str | None, ctx: Context, saes: list[LoadedSAE]):
    """The model, refused when it is not the store's or does not fit the SAEs and the layer."""
    from atmpipe.lm import load_lm  # transformers: only when a metric needs the model

    if model_name is None:
        raise UserError("the SAEs do not record their model; pass --model")
    lm = load_lm(model_name, device=cfg.device, dtype=cfg.dtype)
    store, layer = ctx.store, ctx.layer
    if store is not None and store.attrs["model"]["config_hash"] not in ("synthetic", lm.config_hash):
        raise UserError(
            f"model {model_name} ({lm.source}) is not the model store {store.path} was harvested "
            "with (config hash differs); pass the store's --model"
        )
    if s := other_width(saes, lm.d_model):
        raise UserError(
            f"SAE {s.name} has width d_in={s.info['d_in']} but model {model_name} has "
            f"d_model={lm.d_model}; evaluate it with the model it was trained on"
        )
    if not 0 <= layer < lm.n_layers:
        raise UserError(
            f"layer {layer} is out of range for {model_name} ({lm.n_layers} layers); pass --layer"
        )
    return lm
