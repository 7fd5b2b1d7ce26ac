"""The Zarr v3 activation store: schema, resumable shard writer, reader and info table.

Layout (docs/design.md): a root group with `train/` and `eval/` sub-groups, each holding `acts_l{L}`
[n_tokens, d_model], `tokens`, `positions` and `bos` [n_tokens], chunked along tokens and packed into
shards with the v3 sharding codec. Provenance, progress and statistics live in the root attributes under
"atmpipe". bfloat16 activations are stored as their uint16 bit pattern (the top half of the float32 bits),
since Zarr has no bfloat16 dtype; `read_acts` decodes them.

Writes are crash-safe: shards are written whole and in order by one writer thread, each file atomically
(zarr's LocalStore writes a temp file and renames it), and only then is the shard committed by rewriting
the root attributes (also atomic). A re-run resumes after the last committed shard.
"""

from __future__ import annotations

import copy
import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import zarr
from rich.table import Table
from zarr.codecs import BloscCodec, Crc32cCodec

from atmpipe import remote
from atmpipe.errors import UserError

SCHEMA_VERSION = 1
SPLITS = ("train", "eval")
STORAGE_DTYPES = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": np.dtype("uint16"),
}
FLOAT16_MAX = float(np.finfo(np.float16).max)
DEFAULT_CHUNK_TOKENS = 4096
DEFAULT_SHARD_TOKENS = 32768
# Keys of the attributes that record progress; everything else is configuration and must match on resume.
PROGRESS_KEYS = ("complete", "stats", "stats_state")


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def acts_name(layer: int) -> str:
    return f"acts_l{layer}"


def compressors() -> list:
    """Blosc-LZ4 with bit shuffle, then a crc32c checksum per chunk (so damage is detected on read).

    Chosen by measurement on real gemma-3-270m layer-9 residuals (benchmarks/bench_harvest.py, "codec"
    lines): activations barely compress, their mantissas are noise. Size ratios: float32 none 1.00,
    lz4+byte-shuffle 1.03, lz4+bit-shuffle 1.09, zstd-1 1.08, blosc-zstd-1 1.07; bfloat16 1.09 / 1.20 /
    1.26 / 1.25. lz4+bit-shuffle gets nearly zstd's ratio while writing as fast or faster (120-220 MB/s
    on one loaded core vs 90-125 for the zstd variants), hundreds of times the CPU harvest rate, so the
    writer thread never holds the LM back.
    """
    return [BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), Crc32cCodec()]


# --- storage dtypes -------------------------------------------------------------------------------


def encode_acts(x: torch.Tensor | np.ndarray, dtype: str, what: str = "activations") -> np.ndarray:
    """float activations → the storage array for `dtype` (float16 refuses values beyond its range)."""
    t = torch.as_tensor(x)
    if dtype == "float32":
        return t.to(torch.float32).cpu().numpy()
    if dtype == "float16":
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise UserError(
                f"{what} reach {peak:.4g}, beyond float16's range (±{FLOAT16_MAX:.0f}); "
                "use --storage-dtype bfloat16 or float32"
            )
        return t.to(torch.float16).cpu().numpy()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    raise UserError(f"unknown storage dtype {dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")


def decode_acts(a: np.ndarray) -> np.ndarray:
    """Stored activations → float32 (uint16 holds the high 16 bits of a float32: bfloat16)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


# --- statistics -----------------------------------------------------------------------------------


class RunningStats:
    """Exact float64 norm / mean / variance over non-BOS tokens, merged shard by shard (Chan et al.).

    The state is plain JSON (Python floats round-trip exactly), saved at every commit so a resumed
    harvest continues the very same sums and ends bit-identical to an uninterrupted one.
    """

    def __init__(self, d_model: int, state: dict | None = None):
        if state is None:
            self.n, self.sum_norm = 0, 0.0
            self.mean, self.m2 = np.zeros(d_model), np.zeros(d_model)
        else:
            self.n, self.sum_norm = int(state["n"]), float(state["sum_norm"])
            self.mean, self.m2 = np.array(state["mean"], np.float64), np.array(state["m2"], np.float64)

    def update(self, acts: np.ndarray) -> None:
        self.merge(self.part(acts))

    @staticmethod
    def part(acts: np.ndarray) -> dict:
        """The statistics of one shard alone, as JSON (a multi-process harvest records them per shard)."""
        x = decode_acts(acts).astype(np.float64)
        if x.shape[0] == 0:
            return {"n": 0}
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        sum_norm = float(np.sqrt((x**2).sum(1)).sum())
        return {"n": x.shape[0], "sum_norm": sum_norm, "mean": mean_b.tolist(), "m2": m2_b.tolist()}

    def merge(self, part: dict) -> None:
        """Fold in a shard's `part`; merging shard by shard in order gives the same bits in any process."""
        n_b = int(part["n"])
        if n_b == 0:
            return
        mean_b, m2_b = np.array(part["mean"], np.float64), np.array(part["m2"], np.float64)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * n_b / n)
        self.sum_norm += float(part["sum_norm"])
        self.n = n

    def state(self) -> dict:
        return {"n": self.n, "sum_norm": self.sum_norm, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def summary(self) -> dict:
        n = max(self.n, 1)
        return {
            "mean_norm": self.sum_norm / n,
            "mean": self.mean.tolist(),
            "var": (self.m2 / n).tolist(),
            "n": self.n,
        }


# --- reader ---------------------------------------------------------------------------------------


class Split:
    """One split (train / eval) of a store."""

    def __init__(self, group: zarr.Group, name: str, meta: dict, layers: list[int]):
        self.group, self.name, self.meta, self.layers = group, name, meta, layers
        self.n_tokens: int = meta["n_tokens"]
        self.shard_tokens: int = meta["shard_tokens"]
        self.chunk_tokens: int = meta["chunk_tokens"]
        self.n_shards: int = meta["n_shards"]
        self.shards_committed: int = meta["shards_committed"]
        self.n_committed_tokens: int = min(self.shards_committed * self.shard_tokens, self.n_tokens)

    def acts(self, layer: int) -> zarr.Array:
        if layer not in self.layers:
            raise UserError(f"layer {layer} is not in this store (it has {self.layers}); pick one of those")
        return self.group[acts_name(layer)]

    @property
    def tokens(self) -> zarr.Array:
        return self.group["tokens"]

    @property
    def positions(self) -> zarr.Array:
        return self.group["positions"]

    @property
    def bos(self) -> zarr.Array:
        return self.group["bos"]

    def read_acts(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_tokens if stop is None else stop
        return decode_acts(self.acts(layer)[start:stop])


class Store:
    """A harvested (or synthetic) activation store, opened for reading."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = remote.location(path)  # a local Path, or an fsspec URL (s3://..., gs://...)
        self.group = zarr.open_group(self.path, mode=mode)
        self.attrs: dict = dict(self.group.attrs["atmpipe"])
        self.layers: list[int] = list(self.attrs["layers"])
        self.d_model: int = self.attrs["d_model"]
        self.dtype: str = self.attrs["dtype"]

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def split(self, name: str) -> Split:
        if name not in self.attrs["splits"]:
            raise UserError(
                f"store {self.path} has no split {name!r}; it has {', '.join(self.attrs['splits'])}"
            )
        return Split(self.group[name], name, self.attrs["splits"][name], self.layers)

    def read_acts(self, split: str, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.split(split).read_acts(layer, start, stop)

    def stats(self, layer: int) -> dict:
        stats = self.attrs.get("stats") or {}
        if str(layer) not in stats:
            raise UserError(
                f"store {self.path} has no statistics for layer {layer}; finish the harvest first"
            )
        return stats[str(layer)]

    def norm_scale(self, layer: int) -> float:
        """Multiply activations by this so their mean norm is sqrt(d_model)."""
        return math.sqrt(self.d_model) / self.stats(layer)["mean_norm"]

    def disk_bytes(self) -> int:
        return remote.size_bytes(self.path)


def open_store(path: str | Path, *, check_files: bool = True) -> Store:
    """Open a store to read; refuses other schema versions, inconsistent layouts and missing shard files
    (`check_files=False`: leave those to `atmpipe verify`, which reports them all)."""
    path = remote.location(path)
    if not remote.has_file(path, "zarr.json"):
        raise UserError(f"no activation store at {path}; run `atmpipe harvest --out {path}` first")
    try:
        store = Store(path)
    except KeyError:
        if (zarr.open_group(path, mode="r").attrs.get("atmpipe") or {}).get("creating"):
            raise UserError(
                f"store {path} was never fully created (its harvest stopped while creating it); "
                "re-run the harvest to create it again"
            ) from None
        raise UserError(
            f"{path} is a Zarr group but not an atmpipe store (no 'atmpipe' attributes)"
        ) from None
    except (ValueError, TypeError, OSError) as e:  # a zarr.json that is not a group's JSON
        if what := remote.fault(e):
            raise remote.StoreFault(
                f"the object store holding {path} failed ({what}) after its retries"
            ) from None
        raise UserError(f"store {path} has unreadable metadata ({first_line(e)}); re-harvest it") from None
    version = store.attrs.get("schema_version")
    if type(version) is not int or version > SCHEMA_VERSION:
        raise UserError(
            f"store {path} was written by a newer atmpipe (schema version {version}; this one reads "
            f"{SCHEMA_VERSION}); upgrade atmpipe to read it"
        )
    if version < SCHEMA_VERSION:
        raise UserError(
            f"store {path} has the old schema version {version}, which this atmpipe (schema {SCHEMA_VERSION}) "
            f"does not read; re-harvest it with `atmpipe harvest --out {path} --overwrite`"
        )
    check_layout(store)
    if check_files:
        check_no_missing_shards(store)
    return store


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def array_names(store: Store) -> list[str]:
    return [acts_name(layer) for layer in store.layers] + ["tokens", "positions", "bos"]


def shard_key(store: Store, split: str, array: str, shard: int) -> str:
    """The shard's object key inside the store, e.g. train/acts_l12/c/3/0."""
    arr = store.group[f"{split}/{array}"]
    return f"{split}/{array}/" + arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def missing_shards(store: Store) -> Iterator[tuple[str, str, int, int, int]]:
    """(split, array, shard, first token, stop token) of each committed activation shard whose file is gone.

    Only activations: Zarr writes no file for a shard that is all fill value (zeros), which token, position
    and BOS shards can legitimately be; real activations never are.
    """
    for split, meta in store.attrs["splits"].items():
        for array in array_names(store)[: len(store.layers)]:
            for shard in range(meta["shards_committed"]):
                if not remote.has_file(store.path, shard_key(store, split, array, shard)):
                    start = shard * meta["shard_tokens"]
                    yield split, array, shard, start, min(start + meta["shard_tokens"], meta["n_tokens"])


def check_no_missing_shards(store: Store) -> None:
    """Refuse a store with a committed shard file gone (training would read zeros in its place)."""
    for split, array, shard, start, stop in missing_shards(store):
        raise UserError(
            f"store {store.path} is damaged: {split}/{array} shard {shard} (tokens {start}-{stop - 1}) is "
            f"missing; re-harvest it (`atmpipe verify {store.path}` lists every damaged chunk)"
        )


def check_layout(store: Store) -> None:
    """The arrays on disk must be what the attributes say (shapes, dtypes, chunking), or the store is refused.

    Attribute values are type-checked first: they name arrays, and are never trusted as paths.
    """

    def refuse(what: str) -> UserError:
        return UserError(
            f"store {store.path} is inconsistent: {what}; it is damaged or was edited: re-harvest it"
        )

    a = store.attrs
    layers, d_model, dtype, splits = a.get("layers"), a.get("d_model"), a.get("dtype"), a.get("splits")
    if not (isinstance(layers, list) and layers and all(type(x) is int and x >= 0 for x in layers)):
        raise refuse(f"attribute layers is {layers!r}, not a list of layer numbers")
    if not (type(d_model) is int and d_model > 0):
        raise refuse(f"attribute d_model is {d_model!r}, not a positive integer")
    if dtype not in STORAGE_DTYPES:
        raise refuse(f"attribute dtype is {dtype!r}, not one of {', '.join(STORAGE_DTYPES)}")
    if not (isinstance(splits, dict) and splits and set(splits) <= set(SPLITS)):
        raise refuse(f"attribute splits names {list(splits or [])!r}, not train and eval")
    sizes = ("n_tokens", "n_shards", "shards_committed", "shard_tokens", "chunk_tokens")
    for name, meta in splits.items():
        if not (isinstance(meta, dict) and all(type(meta.get(k)) is int and meta[k] >= 0 for k in sizes)):
            raise refuse(f"split {name} has malformed sizes {meta!r}")
        n, shard, chunk = meta["n_tokens"], meta["shard_tokens"], meta["chunk_tokens"]
        if not (0 < chunk <= shard and shard % chunk == 0 and meta["n_shards"] == -(-n // shard)
                and meta["shards_committed"] <= meta["n_shards"]):  # fmt: skip
            raise refuse(f"split {name} has contradictory sizes {meta!r}")
        _member(store, name, refuse)  # the split's group (what the readers open first)
        want = {
            acts_name(L): ((n, d_model), STORAGE_DTYPES[dtype], (chunk, d_model), (shard, d_model))
            for L in layers
        }
        for array, kind in (("tokens", "int32"), ("positions", "int32"), ("bos", "bool")):
            want[array] = ((n,), np.dtype(kind), (chunk,), (shard,))
        for array, expected in want.items():
            arr = _member(store, f"{name}/{array}", refuse)
            got = (tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks), tuple(arr.shards or arr.chunks))
            if got != expected:
                raise refuse(
                    f"{name}/{array} has shape {got[0]}, dtype {got[1]}, chunks {got[2]}, shards {got[3]}, "
                    f"the attributes say shape {expected[0]}, dtype {expected[1]}, chunks {expected[2]}, "
                    f"shards {expected[3]}"
                )
    if problem := attribute_problem(a, layers, d_model):  # after the layout: its messages say more
        raise refuse(problem)


def _member(store: Store, key: str, refuse: Callable[[str], UserError]):
    """The group or array `key` of the store, or the store refused: missing, or metadata zarr cannot read."""
    try:
        return store.group[key]
    except (KeyError, FileNotFoundError):
        raise refuse(f"array {key} is missing" if "/" in key else f"group {key} is missing") from None
    except Exception as e:  # its zarr.json is not valid metadata: zarr's own words say why
        raise refuse(f"{key} has unreadable metadata ({first_line(e)})") from None


# What the stages read of a store's provenance attributes, with the type each value must have.
_STR, _INT, _OPT_STR, _OPT_INT = (str,), (int,), (str, type(None)), (int, type(None))
PROVENANCE = {
    "model": {"name": _STR, "source": _STR, "config_hash": _STR, "n_layers": _INT},
    "tokenizer": {"name_or_path": _STR, "bos_token_id": _OPT_INT, "vocab_size": _INT},
    "dataset": {"spec": _STR, "n_documents": _INT, "text_column": _OPT_STR},
}


def _numbers(values, n: int) -> bool:
    return isinstance(values, list) and len(values) == n and all(type(v) in (int, float) for v in values)


def _stats_problem(name: str, entry, layer: int, d_model: int, keys: tuple[str, ...]) -> str | None:
    """Why the `name` entry of one layer's statistics is malformed (None: it is fine)."""
    ok = isinstance(entry, dict) and type(entry.get("n")) is int and entry["n"] >= 0
    scalar = entry.get(keys[0]) if ok else None
    ok = ok and type(scalar) in (int, float) and not scalar < 0  # (inf: training says what it means)
    ok = ok and all(_numbers(entry.get(k), d_model) for k in keys[1:])
    if ok and name == "stats" and entry["n"] > 0 and not scalar > 0:
        ok = False  # a zero mean norm would divide training's input scale by zero
    return (
        None if ok or (name == "stats_state" and entry == {"n": 0}) else f"attribute {name} of layer {layer}"
    )


def attribute_problem(a: dict, layers: list[int], d_model: int) -> str | None:
    """What is malformed in a store's provenance and statistics attributes, or None."""
    for key, fields in PROVENANCE.items():
        value = a.get(key)
        if not isinstance(value, dict) or any(type(value.get(f)) not in t for f, t in fields.items()):
            return f"attribute {key} is {value!r}, not {{{', '.join(fields)}}} of the right types"
    if type(a.get("context_size")) is not int or a["context_size"] < 1 or type(a.get("seed")) is not int:
        return f"attributes context_size, seed are {a.get('context_size')!r}, {a.get('seed')!r}, not integers"
    hooks = a.get("hook_names")
    if not (isinstance(hooks, dict) and all(isinstance(hooks.get(str(x)), str) for x in layers)):
        return f"attribute hook_names is {hooks!r}, not a name per layer"
    if type(a.get("complete", False)) is not bool:
        return f"attribute complete is {a['complete']!r}, not true or false"
    name, keys = (
        ("stats", ("mean_norm", "mean", "var"))
        if a.get("complete")
        else ("stats_state", ("sum_norm", "mean", "m2"))
    )
    stats = a.get(name) or {}
    if not isinstance(stats, dict):
        return f"attribute {name} is {stats!r}, not statistics per layer"
    for layer in layers:
        if str(layer) in stats and (problem := _stats_problem(name, stats[str(layer)], layer, d_model, keys)):
            return f"{problem} is malformed"
    return None


# --- writer ---------------------------------------------------------------------------------------


def plan_split(n_tokens: int, chunk_tokens: int, shard_tokens: int, batch_tokens: int = 1) -> dict:
    """Chunk/shard sizes for one split: shards hold whole batches; small splits get one small shard."""
    if shard_tokens % chunk_tokens or shard_tokens % batch_tokens:
        raise UserError(
            f"shard_tokens {shard_tokens} must be a multiple of chunk_tokens {chunk_tokens} and of the "
            f"batch in tokens {batch_tokens}; fix them in the config"
        )
    if n_tokens < shard_tokens:  # one shard, no bigger than the data (rounded up to whole batches)
        shard_tokens = max(batch_tokens, -(-n_tokens // batch_tokens) * batch_tokens)
        if shard_tokens % chunk_tokens:
            chunk_tokens = shard_tokens
    return {
        "n_tokens": n_tokens,
        "n_shards": -(-n_tokens // shard_tokens),
        "shards_committed": 0,
        "shard_tokens": shard_tokens,
        "chunk_tokens": chunk_tokens,
    }


def config_view(attrs: dict) -> dict:
    """The attributes that define a store's content (progress fields removed)."""
    view = {k: v for k, v in copy.deepcopy(attrs).items() if k not in PROGRESS_KEYS}
    for meta in view.get("splits", {}).values():
        meta.pop("shards_committed", None)
    return view


def _normalise(attrs: dict) -> dict:
    """JSON round trip, so a fresh config compares equal to one read back from zarr.json."""

    return json.loads(json.dumps(attrs))


def bytes_needed(split_sizes: dict[str, int], n_layers: int, d_model: int, dtype: str) -> int:
    """Upper bound of the store's size: activations barely compress, so count them raw (+ token arrays)."""
    per_token = n_layers * d_model * STORAGE_DTYPES[dtype].itemsize + 9
    return sum(split_sizes.values()) * per_token


class StoreWriter:
    """Creates a store, or reopens one with the same configuration to resume it.

    `attrs` is the full "atmpipe" attribute dict (without progress fields); `splits` in it come from
    `plan_split`. Call `put_shard` in order; a background thread writes, updates statistics and commits.
    """

    def __init__(self, path: str | Path, attrs: dict, *, overwrite: bool = False, max_pending: int = 2):
        self.path = remote.location(path)
        attrs = _normalise({**attrs, "schema_version": SCHEMA_VERSION})
        self.layers: list[int] = attrs["layers"]
        self.d_model: int = attrs["d_model"]
        self.dtype: str = attrs["dtype"]
        # An empty directory is what a kill at the very start of a creation leaves: create it anew.
        if remote.exists(self.path) and not overwrite and not remote.is_empty_dir(self.path):
            self._reopen(attrs)
        else:
            self._create(attrs)
        self._next_index: dict[str, int] = {}
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="atmpipe-store-writer", daemon=True)
        self._thread.start()

    # creation / resumption
    def _create(self, attrs: dict) -> None:
        if remote.exists(self.path):
            if not remote.has_file(self.path, "zarr.json") and not remote.is_empty_dir(self.path):
                raise UserError(
                    f"{self.path} exists and is not a Zarr store; refusing to replace it, pass another --out"
                )
            remote.remove(self.path)
        # Marked as being created until the first commit: a harvest killed before then is simply recreated.
        root = zarr.open_group(self.path, mode="w", attributes={"atmpipe": {"creating": True}})
        for name, meta in attrs["splits"].items():
            group = root.create_group(name)
            rows, chunk, shard = meta["n_tokens"], meta["chunk_tokens"], meta["shard_tokens"]
            common = dict(compressors=compressors(), fill_value=0, config={"write_empty_chunks": True})
            for layer in self.layers:
                group.create_array(
                    acts_name(layer),
                    shape=(rows, self.d_model),
                    dtype=STORAGE_DTYPES[self.dtype],
                    chunks=(chunk, self.d_model),
                    shards=(shard, self.d_model),
                    **common,
                )
            for array, dtype in (("tokens", "int32"), ("positions", "int32"), ("bos", "bool")):
                group.create_array(
                    array, shape=(rows,), dtype=dtype, chunks=(chunk,), shards=(shard,), **common
                )
        self.attrs = {**attrs, "complete": False, "stats_state": {}}
        self.stats = {layer: RunningStats(self.d_model) for layer in self.layers}
        self.root = root
        self._commit()

    def _reopen(self, attrs: dict) -> None:
        try:
            existing = dict(zarr.open_group(self.path, mode="r").attrs["atmpipe"])
        except Exception:
            raise UserError(
                f"{self.path} exists but is not an atmpipe store; pass another --out or --overwrite to replace it"
            ) from None
        if existing.get("creating"):  # a harvest was killed while creating it: nothing was committed
            self._create(attrs)
            return
        old, new = config_view(existing), config_view(attrs)
        if old != new:
            differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UserError(
                f"store {self.path} was harvested with another configuration (differs in: "
                f"{', '.join(differing)}); pass --overwrite to replace it or --out for a new store"
            )
        self.root = zarr.open_group(self.path, mode="r+")
        self.attrs = existing
        state = existing.get("stats_state") or {}
        self.stats = {layer: RunningStats(self.d_model, state.get(str(layer))) for layer in self.layers}

    # progress
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def shards_committed(self, split: str) -> int:
        return self.attrs["splits"][split]["shards_committed"]

    def owned(self, split: str) -> range:
        """The shards of `split` this writer writes (all of them; one rank's share in distributed.py)."""
        return range(self.attrs["splits"][split]["n_shards"])

    def todo(self, split: str) -> list[int]:
        """The owned shards not committed yet, in the order to put them."""
        return [i for i in self.owned(split) if i >= self.shards_committed(split)]

    def _commit(self) -> None:
        self.root.attrs["atmpipe"] = self.attrs

    # writing
    def put_shard(self, split: str, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue shard `index` of `split`: {"acts_l{L}": storage-dtype [n, d], "tokens", "positions", "bos"}."""
        expected = self._next_index.get(split, self.shards_committed(split))
        if index != expected:
            raise RuntimeError(f"shard {index} of {split} out of order (expected {expected})")
        self._next_index[split] = index + 1
        while True:
            self._raise_if_failed()
            try:
                self._queue.put((split, index, arrays), timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as e:  # re-raised in the producer thread
                    self._error = e

    def _write(self, split: str, index: int, arrays: dict[str, np.ndarray]) -> None:
        self._write_arrays(split, index, arrays)
        if split == "train":
            keep = ~np.asarray(arrays["bos"], bool)
            for layer in self.layers:
                self.stats[layer].update(arrays[acts_name(layer)][keep])
            self.attrs["stats_state"] = {str(k): s.state() for k, s in self.stats.items()}
        self.attrs["splits"][split]["shards_committed"] = index + 1
        self._commit()

    def _write_arrays(self, split: str, index: int, arrays: dict[str, np.ndarray]) -> None:
        meta = self.attrs["splits"][split]
        start = index * meta["shard_tokens"]
        stop = min(start + meta["shard_tokens"], meta["n_tokens"])
        group = self.root[split]
        for name, values in arrays.items():
            if len(values) != stop - start:
                raise RuntimeError(
                    f"shard {index} of {split}: {name} has {len(values)} rows, expected {stop - start}"
                )
            # The array config is not stored with the array: ask again, or an all-zero shard (equal to the
            # fill value) would not be written and would read as missing.
            group[name].with_config({"write_empty_chunks": True})[start:stop] = values

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every queued shard; mark the store complete when all shards are committed."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        self._finalise()

    def _finalise(self) -> None:
        if all(m["shards_committed"] == m["n_shards"] for m in self.attrs["splits"].values()):
            self.attrs["complete"] = True
            self.attrs["stats"] = {str(k): s.summary() for k, s in self.stats.items()}
            self.attrs.pop("stats_state", None)
            self._commit()

    def abandon(self) -> None:
        """Stop after the shard being written (on interrupt); committed shards stay valid."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()


def synthetic_attrs(
    layers: list[int], d_model: int, plans: dict, *, dtype: str = "float32", context_size: int = 128
) -> dict:
    """Store attributes for activations that come from no model (tests, benchmarks): `plans` per split."""
    return {
        "model": {
            "name": "synthetic",
            "source": "synthetic",
            "config_hash": "synthetic",
            "n_layers": max(layers) + 1,
        },
        "layers": list(layers),
        "hook_names": {str(layer): hook_name(layer) for layer in layers},
        "d_model": d_model,
        "dtype": dtype,
        "context_size": context_size,
        "seed": 0,
        "tokenizer": {"name_or_path": "synthetic", "bos_token_id": 0, "vocab_size": 0},
        "dataset": {"spec": "synthetic", "text_column": None, "n_documents": 0, "eval_documents": []},
        "splits": plans,
    }


def write_arrays_store(
    path: str | Path,
    splits: dict[str, dict],
    *,
    layer: int,
    dtype: str = "float32",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    attrs_extra: dict | None = None,
) -> Store:
    """Write a complete, valid store from in-memory arrays (tests, benchmarks). Replaces `path`."""
    d_model = next(iter(splits.values()))["acts"].shape[1]
    plans = {name: plan_split(len(s["acts"]), chunk_tokens, shard_tokens) for name, s in splits.items()}
    attrs = {**synthetic_attrs([layer], d_model, plans, dtype=dtype), **(attrs_extra or {})}
    writer = StoreWriter(path, attrs, overwrite=True)
    for name, s in splits.items():
        n = len(s["acts"])
        arrays = {
            acts_name(layer): encode_acts(np.asarray(s["acts"], np.float32), dtype),
            "tokens": np.asarray(s.get("tokens", np.zeros(n)), np.int32),
            "positions": np.asarray(s.get("positions", np.arange(n) % 128), np.int32),
            "bos": np.asarray(s.get("bos", np.zeros(n, bool)), bool),
        }
        step = plans[name]["shard_tokens"]
        for index in range(plans[name]["n_shards"]):
            writer.put_shard(
                name, index, {k: v[index * step : (index + 1) * step] for k, v in arrays.items()}
            )
    writer.close()
    return open_store(path)


# --- info -----------------------------------------------------------------------------------------


def info_table(store: Store):
    """A rich table: provenance, size, tokens, completion and statistics."""
    a = store.attrs
    table = Table(title=f"activation store {store.path}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    model = a["model"]
    table.add_row("model", f"{model['name']}  ({model['source']}, {model['n_layers']} layers)")
    table.add_row("config hash", str(model["config_hash"])[:16])
    table.add_row("layers", ", ".join(f"{layer} ({a['hook_names'][str(layer)]})" for layer in store.layers))
    table.add_row("d_model · dtype", f"{a['d_model']} · {a['dtype']}")
    tok = a["tokenizer"]
    table.add_row(
        "tokenizer", f"{tok['name_or_path']} (bos {tok['bos_token_id']}, vocab {tok['vocab_size']})"
    )
    ds = a["dataset"]
    table.add_row(
        "dataset", f"{ds['spec']}  ({ds['n_documents']} documents, text column {ds['text_column']})"
    )
    table.add_row("context · seed", f"{a['context_size']} · {a['seed']}")
    for name, meta in a["splits"].items():
        table.add_row(
            f"{name} split",
            f"{meta['n_tokens']:,} tokens · {meta['shards_committed']}/{meta['n_shards']} shards committed "
            f"· shard {meta['shard_tokens']:,} / chunk {meta['chunk_tokens']:,} tokens",
        )
    table.add_row("size on disk", f"{store.disk_bytes() / 1e9:.3f} GB")
    table.add_row("complete", "[green]yes[/]" if store.complete else "[yellow]no (re-run to resume)[/]")
    for layer, s in (a.get("stats") or {}).items():
        table.add_row(
            f"stats layer {layer}",
            f"mean norm {s['mean_norm']:.4g} · mean |μ| {float(np.abs(s['mean']).mean()):.4g} · "
            f"mean var {float(np.mean(s['var'])):.4g} · n {s['n']:,}",
        )
    return table
