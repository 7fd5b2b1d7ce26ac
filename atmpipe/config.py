"""Typed configs: each stage declares a dataclass; values come from a stages/*.toml recipe, then flags."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from atmpipe.errors import UserError

C = TypeVar("C")


def load_config(cls: type[C], toml_path: str | Path | None = None, **overrides: Any) -> C:
    """Build `cls` from defaults, then the TOML recipe, then non-None `overrides` (the CLI flags)."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        try:
            values.update(tomllib.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(
                f"config file {path} does not exist; pass a recipe such as stages/train-atm.toml"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML ({e}); fix it or drop --config") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
