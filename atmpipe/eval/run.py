"""The eval stage: load SAEs, check they fit the store and model, run each metric, write the report.

The metrics are plug-ins (`atmpipe.eval.metric`, listed in `atmpipe.eval.metrics.REGISTRY`); this module
opens what they need once (SAEs, store, model, the activation cache) and loops over them. LM work goes
through `ActivationCache`, so it is paid once per model and layer; each SAE then costs only its own share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atmpipe.atomic import disk_full
from atmpipe.errors import UserError
from atmpipe.eval.cache import ActivationCache
from atmpipe.eval.config import EvalConfig, config_class  # noqa: F401  (config_class: for plug-in tests)
from atmpipe.eval.metric import Metric
from atmpipe.eval.metrics import REGISTRY
from atmpipe.eval.report import write_report
from atmpipe.progress import Progress
from atmpipe.stage_inputs import (
    LoadedSAE,
    Phase,
    agreed,
    check_out,
    console,
    load_saes,
    open_sae_store,
    other_width,
)
from atmpipe.writable import cannot_write, full_disk

# --- inputs ---------------------------------------------------------------------------------------


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown or not names:
        raise UserError(
            f"unknown metric {', '.join(unknown) or '(none)'}; known metrics: {', '.join(REGISTRY)}"
        )
    return names


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
    store = open_sae_store(cfg, saes, layer)
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
