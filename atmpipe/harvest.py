"""Stage one: corpus → lm → store. Captures the residual stream of one or more layers into a Zarr store.

Every forward batch lies inside one shard (shards hold a whole number of batches), so a resumed harvest
recomputes exactly the batches an uninterrupted one would, and the finished store is bit-identical.
The main thread runs the LM; a writer thread compresses, writes and commits shards (store.StoreWriter).
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import zarr
from rich.console import Console

from atmpipe import distributed, remote
from atmpipe.atomic import atomic_file
from atmpipe.config import HarvestConfig
from atmpipe.corpus import build_corpus
from atmpipe.errors import UserError
from atmpipe.integrity import remove_orphans
from atmpipe.interrupt import Interrupts
from atmpipe.lm import LM, capture, check_layers, load_lm
from atmpipe.lock import exclusive_writer
from atmpipe.progress import Progress
from atmpipe.store import (
    STORAGE_DTYPES,
    StoreWriter,
    acts_name,
    bytes_needed,
    encode_acts,
    hook_name,
    plan_split,
)
from atmpipe.writable import check_writable

console = Console(stderr=True)


class HarvestInterrupted(UserError):
    """SIGINT/SIGTERM: committed shards are kept; the message says how to resume."""

    exit_code = 130


class _Stop(Exception):
    """A stop was requested between two forward batches."""


def free_disk_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def default_out(layers: list[int]) -> Path:
    return Path("cache") / f"l{'-'.join(map(str, layers))}.zarr"


def recipe_file(out: Path) -> Path:
    """Where a local store's recipe is recorded: beside the store, not in it, so that two harvests of one
    configuration write the same bytes whichever recipe files and flags ran them."""
    return out.with_name(out.name + ".recipe.json")


def record_recipe(out, cfg: HarvestConfig, resuming: bool) -> None:
    """What ran, as train records it: the recipe files in order and the flags given. The run that starts the
    store writes it (a resumed harvest keeps the first run's; --overwrite replaces it); a remote store keeps
    none."""
    if remote.is_remote(out) or (resuming and recipe_file(out).exists()):
        return
    with atomic_file(recipe_file(out)) as tmp:
        tmp.write_text(json.dumps({"recipe": cfg.recipe, "overrides": cfg.overrides}, indent=2) + "\n")


def store_attrs(cfg: HarvestConfig, lm: LM, layers: list[int], corpus, plans: dict) -> dict:
    tok = lm.tokenizer
    return {
        "model": {"name": lm.name, "source": lm.source, "config_hash": lm.config_hash, "n_layers": lm.n_layers},
        "layers": layers,
        "hook_names": {str(layer): hook_name(layer) for layer in layers},
        "d_model": lm.d_model,
        "dtype": cfg.storage_dtype,
        "context_size": cfg.context_size,
        "seed": cfg.seed,
        "tokenizer": {"name_or_path": tok.name_or_path, "bos_token_id": lm.bos_token_id, "vocab_size": len(tok)},
        "dataset": corpus.provenance(),
        "splits": plans,
        # How the activations were computed: part of the configuration, since it changes their bits.
        "harvest": {"batch_size": cfg.batch_size, "compute_dtype": str(lm.dtype).removeprefix("torch."),
                    "device": lm.device.type},
    }  # fmt: skip


def harvest(cfg: HarvestConfig, lm: LM | None = None) -> Path:
    """Run stage one; returns the store path. Re-running the same command resumes an interrupted harvest.

    `lm`: an already loaded model to use instead of loading `cfg.model` (benchmarks, notebooks).
    """
    cfg.validate()
    out = remote.location(cfg.out) if cfg.out else default_out([0]).parent  # (the layer is known later)
    if not remote.is_remote(out):
        with _writable(out, {}):
            check_writable(out)  # an unwritable --out fails now, not once the model has loaded
    # Loading or converting the model stops at once; the harvest loop stops after its current batch.
    with Interrupts(graceful=False) as stop:
        try:
            return _harvest(cfg, lm, stop)
        except KeyboardInterrupt:
            name = stop.names[0] if stop else "SIGINT"
            raise HarvestInterrupted(
                f"stopped by {name}; nothing committed is lost: re-run the same command to resume"
            ) from None


def _harvest(cfg: HarvestConfig, lm: LM | None, stop: Interrupts) -> Path:
    world = distributed.world()  # under torchrun: this rank writes its share of the shards
    console.quiet = not world.is_main
    if lm is None:
        lm = load_lm(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    layers = check_layers(lm, cfg.layers or [lm.n_layers // 2])
    out = remote.location(cfg.out) if cfg.out else default_out(layers)  # a path or an fsspec URL
    with console.status("tokenising the corpus"):
        corpus = build_corpus(
            lm.tokenizer,
            lm.bos_token_id,
            context_size=cfg.context_size,
            train_tokens=cfg.tokens,
            eval_tokens=cfg.eval_tokens,
            seed=cfg.seed,
            spec=cfg.dataset,
            text_column=cfg.text_column,
        )
    for note in corpus.notes:
        console.print(f"[yellow]note:[/] {note}")
    batch_tokens = cfg.batch_size * cfg.context_size
    chunk = cfg.chunk_tokens or batch_tokens
    shard = cfg.shard_tokens or 8 * chunk
    windows = {"train": corpus.train, "eval": corpus.eval}
    plans = {name: plan_split(w.size, chunk, shard, batch_tokens) for name, w in windows.items()}
    attrs = store_attrs(cfg, lm, layers, corpus, plans)

    resuming = remote.exists(out) and not cfg.overwrite
    needed = bytes_needed(
        {n: p["n_tokens"] for n, p in plans.items()}, len(layers), lm.d_model, cfg.storage_dtype
    )
    free = math.inf if remote.is_remote(out) else free_disk_bytes(out.parent.resolve())
    free += remote.size_bytes(out) if remote.exists(out) else 0
    if needed > free:
        raise UserError(
            f"not enough free disk for {out}: the store needs about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB "
            "are free; pass fewer --tokens, --storage-dtype bfloat16, or an --out on a bigger disk"
        )
    # One writer per store: a second harvest into it is refused (the lock dies with its holder).
    with _writable(out, plans), exclusive_writer(out, "store", not remote.is_remote(out) and world.is_main):
        if resuming:
            remove_orphans(out)  # temp files of writes a crash cut short
        with _writable(out, plans):
            writer = distributed.store_writer(out, attrs, overwrite=cfg.overwrite)
        if writer.complete:
            writer.abandon()
            console.print(f"{out} is already complete; nothing to do (pass --overwrite to harvest again)")
            return out
        if world.is_main:
            record_recipe(out, cfg, resuming)
        if resuming and any(writer.shards_committed(s) for s in plans):
            done = sum(
                min(writer.shards_committed(s) * p["shard_tokens"], p["n_tokens"]) for s, p in plans.items()
            )
            console.print(f"resuming {out}: {done:,} tokens already committed")
        stop.graceful = True  # from here a signal stops after the current batch, keeping every finished shard
        try:
            with _writable(out, plans):
                try:
                    _run(lm, layers, windows, plans, writer, cfg, out, stop)
                except _Stop:
                    writer.close()  # finish and commit the shards already computed
                    raise HarvestInterrupted(
                        f"stopped by {stop.names[0]} with {_committed_tokens(out, plans):,} tokens committed in "
                        f"{out}; they are kept: re-run the same command to resume"
                    ) from None
                writer.close()
        except BaseException:
            writer.abandon()
            raise
        finally:
            stop.graceful = False
        return out


def _committed_tokens(out: Path, plans: dict) -> int:
    """Tokens committed on disk (re-read: a failed commit may have advanced the in-memory count)."""
    try:
        splits = zarr.open_group(out, mode="r").attrs["atmpipe"]["splits"]
        return sum(
            min(splits[s]["shards_committed"] * p["shard_tokens"], p["n_tokens"]) for s, p in plans.items()
        )
    except Exception:
        return 0


@contextmanager
def _writable(out: Path, plans: dict):
    """A full disk or an unwritable --out is the user's to fix: say so in one line, and how to resume."""
    try:
        yield
    except Exception as e:
        if remote.is_remote(out) and (what := remote.fault(e)):
            raise UserError(
                f"the object store holding {out} failed ({what}) after its retries; the store keeps its "
                "committed shards: re-run the same command to resume"
            ) from None
        if not isinstance(e, OSError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"the disk holding {out} is full ({e.strerror}); the store keeps its "
                f"{_committed_tokens(out, plans):,} committed tokens: free some space, then re-run the same "
                "command to resume"
            ) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
            raise UserError(
                f"cannot write to {out} ({e.strerror}: {e.filename}); pass an --out in a writable directory"
            ) from None
        raise


def _run(
    lm: LM, layers, windows, plans, writer: StoreWriter, cfg: HarvestConfig, out: Path, stop: Interrupts
) -> None:
    def tokens(split: str, shards) -> int:  # tokens in these shards of the split
        p = plans[split]
        return sum(min((i + 1) * p["shard_tokens"], p["n_tokens"]) - i * p["shard_tokens"] for i in shards)

    todo = {split: writer.todo(split) for split in plans}  # this process's share (all, unless torchrun)
    total = sum(tokens(split, writer.owned(split)) for split in plans)
    done = total - sum(tokens(split, todo[split]) for split in plans)
    bytes_per_token = len(layers) * lm.d_model * STORAGE_DTYPES[cfg.storage_dtype].itemsize
    with Progress(console, unit=" tokens", speed_unit=" tok/s") as progress:
        task = progress.add_task(f"harvest {out}", total=total, completed=done, info="0.00 GB written")
        written = 0
        for split, rows in windows.items():
            plan = plans[split]
            windows_per_shard = plan["shard_tokens"] // cfg.context_size
            for index in todo[split]:
                first = index * windows_per_shard
                shard_rows = rows[first : first + windows_per_shard]
                arrays = _harvest_shard(lm, layers, shard_rows, first, split, cfg, stop)
                writer.put_shard(split, index, arrays)
                written += shard_rows.size * bytes_per_token
                progress.update(task, advance=shard_rows.size, info=f"{written / 1e9:.2f} GB written")


def _harvest_shard(
    lm: LM, layers, rows: np.ndarray, first_window: int, split: str, cfg: HarvestConfig, stop: Interrupts
) -> dict:
    """Forward one shard's windows batch by batch; returns the shard's arrays in storage form."""
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for start in range(0, len(rows), cfg.batch_size):
        if stop:  # this shard is dropped unwritten; the ones before it are kept
            raise _Stop
        ids = torch.from_numpy(rows[start : start + cfg.batch_size].astype(np.int64))
        acts = capture(lm, ids, layers)
        for layer in layers:
            x = acts[layer].reshape(-1, lm.d_model)
            _check_finite(x, layer, split, first_window + start, cfg.context_size, ids)
            parts[layer].append(encode_acts(x, cfg.storage_dtype, what=f"activations of layer {layer}"))
    flat = rows.reshape(-1)
    return {
        **{acts_name(layer): np.concatenate(parts[layer]) for layer in layers},
        "tokens": flat.astype(np.int32),
        "positions": np.tile(np.arange(cfg.context_size, dtype=np.int32), len(rows)),
        "bos": flat == lm.bos_token_id,
    }


def _check_finite(x: torch.Tensor, layer: int, split: str, first_window: int, context: int, ids) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        window, position = first_window + row // context, row % context
        raise UserError(
            f"non-finite activation ({float(x[row][bad[row]][0])}) at layer {layer}, {split} window {window}, "
            f"position {position} (token id {int(ids.reshape(-1)[row])}); try --dtype float32 or another model"
        )
