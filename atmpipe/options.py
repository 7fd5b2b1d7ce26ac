"""Each option written once: a config dataclass field holds its default and its help, and the CLI flag is
generated from it.

A field declared with `option(default, help)` is a flag of its stage's command and a key of its recipe; a
field without help is a recipe key only. Flags default to None, so only a flag actually given overrides
the recipe (`config.load_config`); a bool field is a switch (`--overwrite`) that only turns a setting on.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           factory: Callable[[], Any] | None = None) -> Any:  # fmt: skip
    """A config field that is also a flag: its default, the help its flag shows, and the flag's name when
    it is not the field's (`layers` is `--layer`, repeatable)."""
    metadata = {"help": help, **({"flag": flag} if flag else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def device_option() -> Any:
    """`--device`, one option for every stage that runs torch (harvest, train, eval): one default, one help;
    `atmpipe.device.resolve_device` reads it (inspect, without the flag, takes that default)."""
    return option("auto", "cpu | cuda | cuda:N | auto (cuda when torch sees a GPU, else cpu).")


def flag_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The fields of `cls` that are flags, with their resolved types."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("help")]


def help_text(f: dataclasses.Field) -> str:
    """The flag's help: the field's, then "(default X)" from the field's own default, so that the default
    is written once. A default of None, False or empty is no value to show (what None means, such as
    "default: the SAEs' layer", is the help's to say); neither is one the help already names."""
    text, value = f.metadata["help"], f.default
    if value in (None, False, "", dataclasses.MISSING) or "default" in text:
        return text
    shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    return f"{text} (default {shown})"


def _parameter(f: dataclasses.Field, kind: Any) -> inspect.Parameter:
    name = f.metadata.get("flag", f.name)
    dashed = "--" + name.replace("_", "-")
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if kind is bool:
        default = typer.Option(False, dashed, help=f.metadata["help"])
    else:
        default = typer.Option(... if required else None, dashed, help=help_text(f))
        kind = kind if required or _optional(kind) else kind | None
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)


def _optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def add_command(app, name: str, cls: type, run: Callable[..., None], doc: str, recipe_help: str,
                extra: tuple[inspect.Parameter, ...] = (), command_cls: type | None = None,
                **command_settings: Any) -> None:  # fmt: skip
    """Add `atmpipe <name>`: a flag per option of `cls`, `--config` for a recipe, and `extra` parameters;
    `run(config, overrides, **extra)` gets the recipe path, the given flags by field name, and the extras.
    `command_cls` and `command_settings` (click's context settings) go to typer's `app.command`."""
    fields = flag_fields(cls)
    params = [_parameter(f, kind) for f, kind in fields]
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=list[Path] | None,
            default=typer.Option(None, help=recipe_help + " Repeat to layer recipes (later files win)."),
        )
    )
    params += extra
    extra_names = {p.name for p in extra}

    def command(**values: Any) -> None:
        overrides = {}
        for f, kind in fields:
            value = values[f.metadata.get("flag", f.name)]
            overrides[f.name] = (value or None) if kind is bool or isinstance(value, list) else value
        run(values["config"], overrides, **{k: values[k] for k in extra_names})

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    app.command(name, cls=command_cls, **command_settings)(command)
