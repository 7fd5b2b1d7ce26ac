"""Store integrity: find damaged chunks (`atmpipe verify`), missing shard files, and the temp files of
writes that a crash cut short.

Every chunk carries a crc32c checksum (store.compressors), so reading it is enough to know it is intact.
A shard file that is gone entirely has no checksum to fail: Zarr would read it as zeros, so its absence
is checked separately. Activations must also be finite, or training stops on a NaN.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atmpipe import remote
from atmpipe.store import (  # noqa: F401  (check_no_missing_shards, missing_shards: re-exported)
    Store,
    array_names,
    check_no_missing_shards,
    decode_acts,
    first_line,
    missing_shards,
    open_store,
    shard_key,
)

# zarr's LocalStore writes `<name>.<uuid4 hex>.partial` and renames it into place; a kill leaves it behind.
_ZARR_TEMP = re.compile(r".*\.[0-9a-f]{32}\.partial")


@dataclass
class Damage:
    """One damaged chunk of one array."""

    split: str
    array: str
    chunk: int
    start: int
    stop: int  # exclusive
    reason: str

    def __str__(self) -> str:
        return f"{self.split}/{self.array} chunk {self.chunk} (tokens {self.start}-{self.stop - 1}): {self.reason}"


@dataclass
class Verification:
    path: Path | str
    chunks_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    uncommitted_tokens: dict[str, int] = field(default_factory=dict)  # not written yet by the harvest


def count_chunks(store: Store) -> int:
    """How many chunks `verify_store` checks (a progress bar's total)."""
    total = 0
    for meta in store.attrs["splits"].values():
        committed = min(meta["shards_committed"] * meta["shard_tokens"], meta["n_tokens"])
        total += -(-committed // meta["chunk_tokens"]) * len(array_names(store))
    return total


def verify_store(store: Store | str | Path, on_progress: Callable[[int], None] | None = None) -> Verification:
    """Read every committed chunk of every array; report each damaged one by split, array and token range.

    Reads a shard at a time (Zarr decodes its chunks concurrently); a shard that fails is re-read chunk by
    chunk to say which chunk is bad. `on_progress(n)` is called after each n chunks checked.
    """
    store = store if isinstance(store, Store) else open_store(store, check_files=False)
    report = Verification(store.path)
    for split, meta in store.attrs["splits"].items():
        chunk, shard_tokens, n = meta["chunk_tokens"], meta["shard_tokens"], meta["n_tokens"]
        report.uncommitted_tokens[split] = n - min(meta["shards_committed"] * shard_tokens, n)
        for array in array_names(store):
            arr = store.group[f"{split}/{array}"]
            for shard in range(meta["shards_committed"]):
                start, stop = shard * shard_tokens, min((shard + 1) * shard_tokens, n)
                spans = [(s, min(s + chunk, stop)) for s in range(start, stop, chunk)]
                if array.startswith("acts_") and not remote.has_file(
                    store.path, shard_key(store, split, array, shard)
                ):
                    report.damaged += [
                        Damage(split, array, s // chunk, s, e, "shard file missing") for s, e in spans
                    ]
                else:
                    report.damaged += _check_shard(split, array, arr, spans, chunk)
                report.chunks_checked += len(spans)
                if on_progress:
                    on_progress(len(spans))
    return report


def _check_shard(split: str, array: str, arr, spans: list[tuple[int, int]], chunk: int) -> list[Damage]:
    try:
        return _non_finite(split, array, arr[spans[0][0] : spans[-1][1]], spans, chunk)
    except Exception:  # a checksum or decoding failure in this shard: find the chunk(s)
        found = []
        for s, e in spans:
            try:
                found += _non_finite(split, array, arr[s:e], [(s, e)], chunk)
            except Exception as err:
                found.append(Damage(split, array, s // chunk, s, e, first_line(err)))
        return found


def _non_finite(split: str, array: str, values: np.ndarray, spans, chunk: int) -> list[Damage]:
    if not array.startswith("acts_"):
        return []
    bad_rows = ~np.isfinite(decode_acts(values)).all(axis=1)
    found, first = [], spans[0][0]
    for s, e in spans:
        bad = int(bad_rows[s - first : e - first].sum())
        if bad:
            found.append(Damage(split, array, s // chunk, s, e, f"{bad} rows hold non-finite activations"))
    return found


def remove_orphans(path: Path | str) -> list[Path]:
    """Delete the temp files of writes a crash cut short (never renamed into place); returns them.

    Only for a store no other process is writing (the harvest about to resume it).
    """
    if remote.is_remote(path) or not Path(path).is_dir():
        return []
    orphans = [p for p in Path(path).rglob("*.partial") if _ZARR_TEMP.fullmatch(p.name) and p.is_file()]
    for p in orphans:
        p.unlink()
    return orphans
