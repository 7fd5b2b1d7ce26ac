"""Typed configs: each stage's settings are one dataclass (defaults, help, validation); values come from a
stages/*.toml recipe, then flags. The `atmpipe` flags are generated from these fields (`atmpipe.options`), so
this module stays cheap to import: the stages' heavy modules are imported only inside `validate`.

Several recipes layer in order (e.g. a method's recipe, then a sizes file): a later file's keys replace an
earlier one's, and tables (a train recipe's [hparams]) merge key by key."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from atmpipe.corpus import EMBEDDED, check_context_size
from atmpipe.errors import UserError
from atmpipe.hub import EMBEDDED_MODEL
from atmpipe.options import device_option, option
from atmpipe.typecheck import check_types

C = TypeVar("C")


def load_config(
    cls: type[C], toml_path: str | Path | Sequence[str | Path] | None = None, **overrides: Any
) -> C:
    """Build `cls` from defaults, then the TOML recipe(s) in order, then non-None `overrides` (the CLI flags)."""
    values: dict[str, Any] = {}
    for path in recipe_paths(toml_path):
        merge(values, read_recipe(path))
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    check_types(cls, values, "config key")
    return cls(**values)


def load_recorded(
    cls: type[C], toml_path: str | Path | Sequence[str | Path] | None = None, **flags: Any
) -> C:
    """`load_config`, then what ran recorded in the config, as train records it: the recipe files in the order
    they were layered, and the flags given on top of them."""
    cfg = load_config(cls, toml_path, **flags)
    cfg.recipe = [str(p) for p in recipe_paths(toml_path)]  # type: ignore[attr-defined]
    cfg.overrides = {k: v for k, v in flags.items() if v is not None}  # type: ignore[attr-defined]
    return cfg


def recipe_paths(toml_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """One recipe, several, or none, as a list of paths."""
    if toml_path is None:
        return []
    if isinstance(toml_path, (str, Path)):
        return [Path(toml_path)]
    return [Path(p) for p in toml_path]


def read_recipe(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"config file {path} does not exist; pass a recipe such as stages/train-atm.toml"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e}); fix it or drop --config") from None


def merge(values: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """Layer `layer` over `values` in place: keys replace, tables merge key by key."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


@dataclass
class HarvestConfig:
    """`atmpipe harvest`: each field with help is a flag; every field is a key of a harvest recipe."""

    model: str = option(
        EMBEDDED_MODEL, "gemma-3-270m (embedded), gemma-2-2b, a hub id, a local checkpoint or .gguf."
    )
    layers: list[int] = option(  # empty: the model's middle layer
        help="Layer to capture (repeatable; default: middle).", flag="layer", factory=list
    )
    dataset: str = option(EMBEDDED, "'embedded', local files or a hub name.")
    text_column: str | None = option(None, "Column holding the text (default 'text').")
    tokens: int = option(100_000, "Training tokens to harvest.")  # whole windows
    eval_tokens: int = option(10_240, "Held-out evaluation tokens.")  # unseen documents
    context_size: int = option(128, "Tokens per window, BOS included.")
    batch_size: int = option(32, "Windows per forward pass.")
    seed: int = option(0, "Seed of the document split and the window order.")
    dtype: str | None = option(
        None, "Compute dtype (default bfloat16 where the device has bf16 units, else float32)."
    )
    device: str = device_option()
    storage_dtype: str = option("float32", "float32 | float16 | bfloat16.")
    out: str | None = option(None, "Store path (default cache/l{L}.zarr).")
    overwrite: bool = option(False, "Replace a store of another configuration.")
    chunk_tokens: int | None = None  # default: one batch
    shard_tokens: int | None = None  # default: 8 chunks
    trust_remote_code: bool = option(  # runs Python code shipped with the model: only with an explicit flag
        False, "RISK: runs Python code from the model's repository. Only for models you trust."
    )
    # What ran, recorded beside the store (harvest.recipe_file), not in it: the recipe files in order and the
    # flags given (set by load_recorded).
    recipe: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        from atmpipe.store import (
            STORAGE_DTYPES,  # zarr and torch: this module builds the flags, keep it light
        )

        check_context_size(self.context_size)
        if self.tokens < self.context_size:
            raise UserError(
                f"--tokens {self.tokens} is less than one window of {self.context_size} tokens; pass more"
            )
        if self.eval_tokens < 0 or self.batch_size < 1:
            raise UserError("--eval-tokens must be ≥ 0 and --batch-size ≥ 1")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise UserError(
                f"unknown --storage-dtype {self.storage_dtype!r}; use one of {', '.join(STORAGE_DTYPES)}"
            )


@dataclass
class TrainConfig:
    """`atmpipe train`: each field with help is a flag; every field is a key of a train recipe."""

    store: str = option("", "Activation store written by `atmpipe harvest`.")
    method: str = option("atm", "SAE method: one of the methods listed at the end of this help.")
    layer: int | None = option(None, "Layer to train on (default: the store's first).")
    d_sae: int | None = option(None, "Number of latents (default: expansion × d_model).")
    expansion: int = option(8, "d_sae as a multiple of d_model.")
    # The method's hyper-parameters (its Params in atmpipe/sae/<method>.py, the one place they are declared):
    # a recipe's [hparams] table, then --hparam KEY=VALUE, then flags named after them (--k 64).
    hparams: dict = field(default_factory=dict)
    lr: float = option(3e-4, "Adam learning rate.")
    batch_size: int = option(4096, "Tokens per step.")
    tokens: int = option(20_000_000, "Training tokens in total.")
    seed: int = option(0, "Seed of the initialisation, the shuffle and the masks.")
    warmup_steps: int = 1000  # linear lr warm-up, capped at warmup_frac of the run
    warmup_frac: float = 0.1
    decay_frac: float = 0.2  # linear lr decay to 0 over this last fraction of the steps
    grad_clip: float = 1.0
    buffer_chunks: int = 32  # chunks mixed in the stream's shuffle buffer
    checkpoint_every: int = option(1000, "Steps between checkpoints.")
    log_every: int = 10
    out: str | None = option(None, "Run directory (default runs/<store>-<method>).")
    resume: bool = option(False, "Continue the run in --out from its last checkpoint.")
    overwrite: bool = option(False, "Replace the run already in --out.")
    allow_partial: bool = option(False, "Train on an unfinished store's committed shards.")
    skip_damaged: bool = option(False, "Skip (and count) chunks that fail their checksum.")
    no_compile: bool = option(
        False,
        "Run the plain eager kernels, not the compiled ones (the one compile switch: sae/compiling.py).",
    )
    latent_path: str = option(
        "auto", "The step's latents: auto (sparse below the device's measured density) | sparse | dense."
    )
    precision: str = option(
        "auto",
        "Matrix products in bf16 | fp32 | auto (bf16 where the device has bf16 units, else fp32).",
    )
    device: str = device_option()
    # What ran, recorded in the run: the recipe files in the order they were layered, and the flags and
    # --hparam values given on top of them (set by load_train_config).
    recipe: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        from atmpipe.sae import SAE_METHODS  # torch: this module builds the flags, keep it light

        if not self.store:
            raise UserError(
                "no store given; pass --store cache/l12.zarr or set `store` in the --config recipe"
            )
        if self.method not in SAE_METHODS:
            raise UserError(
                f"unknown method {self.method!r}; known methods: {', '.join(sorted(SAE_METHODS))}"
            )
        for name in ("lr", "batch_size", "tokens", "expansion", "checkpoint_every", "log_every", "grad_clip"):
            value = getattr(self, name)
            if not value > 0:
                raise UserError(f"{name} must be positive, got {value}; pass --{name.replace('_', '-')} > 0")
        if (
            not self.lr < 1
        ):  # Adam's first step moves every weight by ~lr: at 1 or more it overflows, not learns
            raise UserError(
                f"lr {self.lr} is too large for Adam (SAEs train at 1e-4 to 1e-3); pass e.g. --lr 3e-4"
            )
        if self.d_sae is not None and self.d_sae <= 0:
            raise UserError(
                f"d_sae must be positive, got {self.d_sae}; pass e.g. --d-sae 5120 or --expansion 8"
            )
        for name in ("warmup_frac", "decay_frac"):  # fractions of the run: beyond [0, 1] they overflow
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}; fix it in the recipe")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        if self.latent_path not in ("auto", "sparse", "dense"):  # sae.base.LATENT_PATHS
            raise UserError(
                f"latent_path must be one of auto, sparse, dense (got {self.latent_path!r}); pass e.g. --latent-path auto"
            )
        if self.precision not in ("auto", "bf16", "fp32"):  # precision.PRECISIONS
            raise UserError(
                f"precision must be one of auto, bf16, fp32 (got {self.precision!r}); pass e.g. --precision auto"
            )


def __getattr__(name: str):
    """`EvalConfig`, `RunOptions` and `config_class` live in `atmpipe.eval.config`; their old import path
    still works, resolved on first use (a top-level import would make this module import every metric)."""
    if name in ("EvalConfig", "RunOptions", "config_class"):
        from atmpipe.eval import config  # deferred: keeps the metric plug-ins off this module's import path

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
