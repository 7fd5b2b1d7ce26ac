"""Typed configs: each stage declares a dataclass; values come from stages/*.toml recipes, then flags.

Several recipes layer in order (e.g. a method's recipe, then a sizes file): a later file's keys replace an
earlier one's, and tables (a train recipe's [hparams]) merge key by key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from atmpipe.errors import UserError

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
    return cls(**values)


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
