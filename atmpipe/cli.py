"""The `atmpipe` command line: parses flags, then calls one stage function. Nothing imports this module."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from atmpipe.errors import UserError

APP_HELP = (
    "atmpipe: harvest residual streams into Zarr, train ATM / TopK / JumpReLU / ReLU SAEs, evaluate them."
)
app = typer.Typer(add_completion=False, no_args_is_help=True, help=APP_HELP, pretty_exceptions_enable=False)
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


@app.command("harvest")
def harvest_command(
    model: str | None = typer.Option(
        None, help="gemma-3-270m (embedded, default), gemma-2-2b, a hub id, a local checkpoint or .gguf."
    ),
    layer: list[int] | None = typer.Option(None, help="Layer to capture (repeatable; default: middle)."),
    dataset: str | None = typer.Option(None, help="'embedded' (default), local files or a hub name."),
    text_column: str | None = typer.Option(None, help="Column holding the text (default 'text')."),
    tokens: int | None = typer.Option(None, help="Training tokens to harvest (default 100,000)."),
    eval_tokens: int | None = typer.Option(None, help="Held-out evaluation tokens (default 10,240)."),
    context_size: int | None = typer.Option(None, help="Tokens per window, BOS included (default 128)."),
    batch_size: int | None = typer.Option(None, help="Windows per forward pass (default 32)."),
    seed: int | None = typer.Option(None, help="Seed of the document split and the window order."),
    dtype: str | None = typer.Option(None, help="Compute dtype (default float32 on CPU, bfloat16 on CUDA)."),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
    storage_dtype: str | None = typer.Option(None, help="float32 (default) | float16 | bfloat16."),
    out: str | None = typer.Option(None, help="Store path (default cache/l{L}.zarr)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store of another configuration."),
    config: Path | None = typer.Option(None, help="Recipe such as stages/harvest.toml; flags override it."),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="RISK: runs Python code from the model's repository. Only for models you trust.",
    ),
) -> None:
    """Stage one: run the LM over a corpus and store residual-stream activations (resumable)."""

    def go():
        from atmpipe import distributed
        from atmpipe.config import load_config
        from atmpipe.harvest import HarvestConfig, harvest

        cfg = load_config(
            HarvestConfig, config, model=model, layers=layer or None, dataset=dataset, text_column=text_column,
            tokens=tokens, eval_tokens=eval_tokens, context_size=context_size, batch_size=batch_size, seed=seed,
            dtype=dtype, device=device, storage_dtype=storage_dtype, out=out, overwrite=overwrite or None,
            trust_remote_code=trust_remote_code or None,
        )  # fmt: skip
        path = harvest(cfg)
        if distributed.world().is_main:  # under torchrun, said once
            err.print(f"store: {path}  (inspect with `atmpipe info {path}`)", highlight=False)

    run_stage(go)


# --- info ---------------------------------------------------------------------------------------
# (section owned by the harvest stage)


@app.command("info")
def info_command(
    store: str = typer.Argument(..., help="A store written by `atmpipe harvest` (path or URL)."),
) -> None:
    """Show a store's provenance, size, tokens, completion and statistics."""

    def go():
        from atmpipe.store import info_table, open_store

        Console().print(info_table(open_store(store)))

    run_stage(go)


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
    config: list[Path] | None = typer.Option(
        None, help="Recipe such as stages/train-atm.toml; repeat to layer a sizes file; flags override it."
    ),
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
# (section owned by the eval stage) The flags mirror atmpipe.eval.run.config_class() (each metric's
# Options dataclass, with its help): tests/test_eval_plugins.py fails when they drift. They are not generated
# here because importing the metrics (torch, sklearn) would slow every `atmpipe` command down to seconds.


@app.command("eval")
def eval_command(
    sae: list[str] = typer.Option(..., help="SAE directory (atmpipe or SAELens format); repeat for several."),
    store: str | None = typer.Option(
        None, help="Activation store (default: the one the SAEs were trained on)."
    ),
    model: str | None = typer.Option(None, help="Model (default: the SAEs' model)."),
    layer: int | None = typer.Option(None, help="Layer (default: the SAEs' layer)."),
    metrics: str | None = typer.Option(
        None, help="Comma list of core, absorption, probing, bias, training, masking (default all)."
    ),
    out: str | None = typer.Option(None, help="Report directory (default reports/eval)."),
    config: Path | None = typer.Option(None, help="TOML recipe of eval settings; flags override it."),
    device: str | None = typer.Option(None, help="cpu | cuda (default auto)."),
    dtype: str | None = typer.Option(None, help="LM dtype: float32 | bfloat16 | float16."),
    seed: int | None = typer.Option(None, help="Seed of every sample and probe."),
    batch_size: int | None = typer.Option(None, help="LM batch size (prompts)."),
    core_tokens: int | None = typer.Option(None, help="Held-out store tokens for the core metrics."),
    splice_windows: int | None = typer.Option(None, help="Eval windows for the downstream loss."),
    absorption_words_per_letter: int | None = typer.Option(None, help="Words sampled per first letter."),
    absorption_icl: int | None = typer.Option(None, help="In-context examples per absorption prompt."),
    absorption_f1_gate: float | None = typer.Option(None, help="Letters need probe F1 above this."),
    absorption_min_letters: int | None = typer.Option(None, help="Letters needed to report absorption."),
    probing_tasks: str | None = typer.Option(None, help="Comma list of probing tasks (default all)."),
    probing_train: int | None = typer.Option(None, help="Training texts per probing task."),
    probing_test: int | None = typer.Option(None, help="Test texts per probing task."),
    probing_context: int | None = typer.Option(None, help="Tokens per probing/bias text."),
    probing_data: str | None = typer.Option(None, help="Directory of the sae-probes *.csv.zst files."),
    bias_occupations: str | None = typer.Option(None, help="Target occupations A,B for SCR."),
    bias_people_per_cell: int | None = typer.Option(None, help="Cap per (occupation, gender) cell; 0 = all."),
    training_max_points: int | None = typer.Option(
        None, help="Most records per SAE's training curves kept in results.json (evenly spaced)."
    ),
) -> None:
    """Stage three: measure SAEs side by side (core, absorption, probing, bias, training) and write a report."""

    def go():
        from atmpipe.config import load_config
        from atmpipe.eval.run import EvalConfig, run_eval

        flags = dict(
            sae=sae, store=store, model=model, layer=layer, metrics=metrics, out=out, device=device, dtype=dtype,
            seed=seed, batch_size=batch_size, core_tokens=core_tokens, splice_windows=splice_windows,
            absorption_words_per_letter=absorption_words_per_letter, absorption_icl=absorption_icl,
            absorption_f1_gate=absorption_f1_gate, absorption_min_letters=absorption_min_letters,
            probing_tasks=probing_tasks, probing_train=probing_train, probing_test=probing_test,
            probing_context=probing_context, probing_data=probing_data, bias_occupations=bias_occupations,
            bias_people_per_cell=bias_people_per_cell, training_max_points=training_max_points,
        )  # fmt: skip
        run_eval(load_config(EvalConfig, config, **flags))

    run_stage(go)


# --- verify -------------------------------------------------------------------------------------
# (section owned by the reliability work)


@app.command("verify")
def verify_command(store: str = typer.Argument(..., help="A store written by `atmpipe harvest`.")) -> None:
    """Read every chunk of a store and report damaged ones; exit code 1 if any is damaged."""

    def go():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from atmpipe.integrity import count_chunks, verify_store
        from atmpipe.store import open_store

        opened = open_store(store, check_files=False)
        with Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err) as bar:
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
