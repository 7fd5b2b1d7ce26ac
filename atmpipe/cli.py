"""The `atmpipe` command line: parses flags, then calls one stage function, importing the stage only when its
command runs (so `atmpipe --help` stays free of torch). Only `python -m atmpipe` (`__main__.py`) imports it."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from importlib import import_module

import typer
from rich.console import Console
from typer.core import TyperCommand

from atmpipe import remote
from atmpipe.config import HarvestConfig, TrainConfig, load_config, load_recorded
from atmpipe.errors import UserError
from atmpipe.eval.config import EvalConfig
from atmpipe.eval.metrics import REGISTRY
from atmpipe.inspect.config import InspectConfig
from atmpipe.options import add_command

APP_HELP = (
    "atmpipe: harvest residual streams into Zarr, train SAEs (ATM and its baselines: `atmpipe train --help` "
    "lists the methods), evaluate them, browse their features."
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=APP_HELP, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def config_stage(cls, target: str):
    """A stage whose body is only: the recipe(s) and flags into `cls`, then `target` ("module:function",
    imported when the command runs, so `atmpipe --help` stays free of torch) called on that config."""

    def run(config, flags: dict) -> None:
        def go():
            module, name = target.split(":")
            load = (
                load_recorded
                if {"recipe", "overrides"} <= {f.name for f in dataclasses.fields(cls)}
                else load_config
            )
            getattr(import_module(module), name)(load(cls, config, **flags))

        run_stage(go)

    return run


def run_stage(fn, *args, **kwargs):
    """Run a stage function; user errors become a one-line message and exit code 2 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # an object store still failing after its retries, wherever it was read
        if not (what := remote.fault(e)):
            raise
        fault = remote.StoreFault(
            f"an object store failed ({what}) after its retries; re-run the same command"
        )
        _fail(str(fault), fault.exit_code)


# --- harvest ------------------------------------------------------------------------------------


def _harvest(config, flags: dict) -> None:
    from atmpipe import distributed  # the stages import torch: only when their command runs, not for --help
    from atmpipe.harvest import harvest

    path = harvest(load_recorded(HarvestConfig, config, **flags))
    if distributed.world().is_main:  # under torchrun, said once
        err.print(f"store: {path}  (inspect with `atmpipe info {path}`)", highlight=False)


add_command(
    app, "harvest", HarvestConfig, lambda config, flags: run_stage(_harvest, config, flags),
    "Stage one: run the LM over a corpus and store residual-stream activations (resumable).",
    "Recipe such as stages/harvest.toml; flags override it.",
)  # fmt: skip


# --- info ---------------------------------------------------------------------------------------


@app.command("info")
def info_command(
    store: str = typer.Argument(..., help="A store written by `atmpipe harvest` (path or URL)."),
) -> None:
    """Show a store's provenance, size, tokens, completion and statistics."""

    def go():
        from atmpipe.store import info_table, open_store  # zarr and torch: only when the command runs

        Console().print(info_table(open_store(store)))

    run_stage(go)


# --- train --------------------------------------------------------------------------------------


def _parse_hparams(pairs: list[str] | None) -> dict:
    """`--hparam key=value` (repeatable); values are JSON (numbers, true/false, null) or plain strings."""
    parsed = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--hparam {pair!r} is not KEY=VALUE; pass e.g. --hparam r=2.0")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def _method_flags(args: list[str]) -> dict[str, str]:
    """The flags left after train's own: each names a hyper-parameter of the method (`--k 64`,
    `--target-l0=64`), generated from the method's Params once the method is known (`train.method_flags`)."""
    found: dict[str, str] = {}
    rest = list(args)
    while rest:
        flag = rest.pop(0)
        name, sep, value = flag.partition("=")
        if not name.startswith("--") or len(name) < 3:
            raise UserError(f"unexpected argument {flag!r}; `atmpipe train` takes flags only (see --help)")
        if not sep:
            if not rest:
                raise UserError(f"{flag} needs a value; pass it as {flag} VALUE")
            value = rest.pop(0)
        found[name[2:].replace("-", "_")] = value
    return found


class TrainCommand(TyperCommand):
    """`atmpipe train`, whose help lists the installed methods and their hyper-parameters, read from the
    method registry when the help is shown (the registry imports torch; starting the command line does not)."""

    def format_help(self, ctx, formatter) -> None:
        from atmpipe.sae import SAE_METHODS  # torch: only when this help is shown

        lines = [
            f"{name}: {', '.join(f.name for f in dataclasses.fields(m.Params))}"
            for name, m in SAE_METHODS.items()
        ]
        self.epilog = (
            "Methods and their hyper-parameters. Each hyper-parameter of the chosen method is also a flag "
            "(--NAME VALUE, underscores as dashes), as is --hparam NAME=VALUE.\n\n" + "\n\n".join(lines)
        )
        super().format_help(ctx, formatter)


def _train(config, flags: dict, hparam: list[str] | None, ctx: typer.Context) -> None:
    from atmpipe.train import load_train_config, train  # torch: only when the command runs

    cfg = load_train_config(
        config, hparams=_parse_hparams(hparam), method_flags=_method_flags(ctx.args), **flags
    )
    train(cfg)


add_command(
    app, "train", TrainConfig, lambda config, flags, hparam, ctx: run_stage(_train, config, flags, hparam, ctx),
    "Stage two: train an SAE on a store's shuffled training activations.",
    "Recipe such as stages/train-atm.toml; flags override it.",
    extra=(inspect.Parameter("hparam", inspect.Parameter.KEYWORD_ONLY, annotation=list[str] | None,
                             default=typer.Option(None, help="Method hyper-parameter KEY=VALUE (repeatable).")),
           inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)),
    command_cls=TrainCommand, context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)  # fmt: skip


# --- eval ---------------------------------------------------------------------------------------


add_command(
    app, "eval", EvalConfig, config_stage(EvalConfig, "atmpipe.eval.run:run_eval"),
    f"Stage three: measure SAEs side by side ({', '.join(REGISTRY)}) and write a report.",
    "TOML recipe of eval settings; flags override it.",
)  # fmt: skip


# --- inspect ------------------------------------------------------------------------------------


add_command(
    app, "inspect", InspectConfig, config_stage(InspectConfig, "atmpipe.inspect.run:build"),
    "Stage four: a feature browser (top contexts, logit effects, absorption, SAEs side by side) as HTML.",
    "TOML recipe of inspect settings; flags override it.",
)  # fmt: skip


# --- verify -------------------------------------------------------------------------------------


@app.command("verify")
def verify_command(store: str = typer.Argument(..., help="A store written by `atmpipe harvest`.")) -> None:
    """Read every chunk of a store and report damaged ones; exit code 1 if any is damaged."""

    def go():
        from atmpipe.integrity import count_chunks, verify_store  # zarr and torch: only when it runs
        from atmpipe.progress import Progress
        from atmpipe.store import open_store

        opened = open_store(store, check_files=False)
        with Progress(err, unit=" chunks") as bar:
            task = bar.add_task("verify", total=count_chunks(opened))
            report = verify_store(opened, on_progress=lambda n: bar.advance(task, n))
        for damage in report.damaged:
            err.print(f"damaged: {damage}", highlight=False, soft_wrap=True)
        pending = ", ".join(f"{n:,} {s} tokens" for s, n in report.uncommitted_tokens.items() if n)
        summary = f"{report.chunks_checked:,} chunks checked, {len(report.damaged)} damaged"
        err.print(summary + (f" ({pending} not committed yet)" if pending else ""), highlight=False)
        if report.damaged:
            raise typer.Exit(1)

    run_stage(go)


def main() -> None:  # pragma: no cover - `python -m atmpipe`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
