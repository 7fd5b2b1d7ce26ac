"""The `atmpipe` command line: parses flags, then calls one stage function. Nothing imports this module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from atmpipe.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_stage(fn, *args, **kwargs):
    """Run a stage function; user errors become a one-line message and exit code 2 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


# --- harvest ------------------------------------------------------------------------------------
# (section owned by the harvest stage)


# --- info ---------------------------------------------------------------------------------------
# (section owned by the harvest stage)


# --- train --------------------------------------------------------------------------------------
# (section owned by the train stage)


def _parse_hparams(pairs: list[str] | None) -> dict:
    """`--hparam key=value` (repeatable); values are JSON (numbers, true/false, null) or plain strings."""
    import json

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


@app.command("train")
def train_command(
    store: str | None = typer.Option(None, help="Activation store written by `atmpipe harvest`."),
    method: str | None = typer.Option(None, help="relu | topk | jumprelu | atm (default atm)."),
    config: Path | None = typer.Option(None, help="Recipe such as stages/train-atm.toml; flags override it."),
    layer: int | None = typer.Option(None, help="Layer to train on (default: the store's first)."),
    d_sae: int | None = typer.Option(None, help="Number of latents (default: expansion × d_model)."),
    expansion: int | None = typer.Option(None, help="d_sae as a multiple of d_model (default 8)."),
    k: int | None = typer.Option(None, help="TopK: active latents per token."),
    l1: float | None = typer.Option(None, help="ReLU/ATM: sparsity coefficient λ."),
    target_l0: float | None = typer.Option(None, help="Adapt the sparsity coefficient toward this L0."),
    lr: float | None = typer.Option(None, help="Adam learning rate (default 3e-4)."),
    batch_size: int | None = typer.Option(None, help="Tokens per step (default 4096)."),
    tokens: int | None = typer.Option(None, help="Training tokens in total."),
    seed: int | None = typer.Option(None, help="Seed of the initialisation, the shuffle and the masks."),
    checkpoint_every: int | None = typer.Option(None, help="Steps between checkpoints."),
    out: str | None = typer.Option(None, help="Run directory (default runs/<store>-<method>)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Train on an unfinished store's committed shards."
    ),
    skip_damaged: bool = typer.Option(
        False, "--skip-damaged", help="Skip (and count) chunks that fail their checksum."
    ),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the training step."),
    device: str | None = typer.Option(None, help="cpu | cuda | auto (default auto)."),
    hparam: list[str] | None = typer.Option(None, help="Method hyper-parameter KEY=VALUE (repeatable)."),
) -> None:
    """Stage two: train an SAE on a store's shuffled training activations."""

    def go():
        from atmpipe.train import load_train_config, train

        flags = dict(
            store=store, method=method, layer=layer, d_sae=d_sae, expansion=expansion, k=k, l1=l1,
            target_l0=target_l0, lr=lr, batch_size=batch_size, tokens=tokens, seed=seed,
            checkpoint_every=checkpoint_every, out=out, device=device,
            # switches: only an explicit flag overrides the recipe
            resume=resume or None, overwrite=overwrite or None, allow_partial=allow_partial or None,
            skip_damaged=skip_damaged or None, compile=compile or None,
        )  # fmt: skip
        cfg = load_train_config(config, hparams=_parse_hparams(hparam), **flags)
        if not cfg.store:
            raise UserError(
                "no store given; pass --store cache/l12.zarr or set `store` in the --config recipe"
            )
        train(cfg)

    run_stage(go)


# --- eval ---------------------------------------------------------------------------------------
# (section owned by the eval stage)


def main() -> None:  # pragma: no cover - `python -m atmpipe`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
