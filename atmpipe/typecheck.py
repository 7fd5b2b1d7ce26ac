"""Values as TOML or JSON give them (recipes, --hparam, saved hyper-parameters) checked against a dataclass's
annotations before they reach arithmetic. A leaf module: the config and the SAE body both use it."""

from __future__ import annotations

import types
import typing
from typing import Any

from atmpipe.errors import UserError


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
