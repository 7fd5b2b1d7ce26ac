"""Several processes, one job: `torchrun --nproc-per-node N -m atmpipe harvest|train ...`.

torch.distributed does the work; this module only says how atmpipe's stages split it:

* harvest: shard i of each split is computed and written by rank i % world, whole shards into the same
  store, each followed by a small commit marker that holds the shard's statistics. Rank 0 alone rewrites
  the root attributes: it folds the markers of the committed prefix, in shard order, into the progress
  counters and the running statistics, the same merges in the same order a single process makes, so a
  finished store is byte-identical to a single-process harvest. Each rank resumes its own unfinished
  shards, with any number of ranks.
* train: DDP. Every rank forms the same shuffled global batch sequence, but reads and decodes only its own
  chunks of each shuffle round and takes the batch's rows that lie in them (stream.py): the global batch
  is the 1-process one, split unevenly. `BatchShare` says which rows a rank holds; with it each rank's
  loss counts by its rows (so DDP's equal-weight gradient average is the global batch's gradient), the
  state a method keeps from batch statistics is reduced across ranks as the method declares
  (`SAE.rank_reductions`, weighted by rows), and a method that needs the whole batch inside its forward
  (ATM's statistics and masks, JumpReLU's target L0) reduces through `SAE.share`, so every rank holds the
  same state as the 1-process run.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from atmpipe import remote
from atmpipe.errors import UserError
from atmpipe.store import RunningStats, StoreWriter, acts_name

COMMITS = "commits"  # <store>/commits/<split>/<index>.json: shards written, not yet folded by rank 0


@dataclass(frozen=True)
class World:
    """This process's place in a launch; a plain run is rank 0 of 1 and never touches torch.distributed."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (a collective: every rank must call it)."""
        return not self.any(not ok)[0]

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks, in one collective (e.g. 'loss is not finite', 'stop requested')."""
        if self.size == 1:
            return tuple(flags)
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def min_(self, t: Tensor) -> Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t


@dataclass(frozen=True)
class BatchShare:
    """The rows of one global batch that this process holds, and the reductions over the whole batch.

    Under DDP, rank r holds the batch's rows that lie in its own chunks (stream.py): an uneven share,
    possibly none. The default is one process holding the whole batch, where every reduction is the
    identity and `rows`, `total` are not read.
    """

    world: World = World()
    rows: int = 0  # this rank's rows of the batch
    total: int = 0  # the global batch's rows, all ranks together
    positions: Tensor | None = None  # the global batch positions of this rank's rows (int64, on device)

    @property
    def loss_weight(self) -> float:
        """This rank's factor on its loss, a mean over its rows: DDP averages the ranks' gradients with
        equal weights, so rank r's counts rows·world/total and the average is the global batch's gradient."""
        return 1.0 if self.world.size == 1 else self.rows * self.world.size / self.total

    def mean(self, t: Tensor) -> Tensor:
        """The global batch's mean of a per-token quantity from `t`, its mean over this rank's rows (a new
        tensor when there are several ranks; a collective). Each rank counts by its rows; one without
        rows adds nothing (its mean over no rows is NaN)."""
        if self.world.size == 1:
            return t
        weighted = t * self.rows if self.rows else torch.zeros_like(t)
        dist.all_reduce(weighted, op=dist.ReduceOp.SUM)
        return weighted / self.total

    def global_rows(self, rows: Tensor) -> Tensor:
        """The global batch positions of some of this rank's rows (given by their local indices)."""
        return rows if self.positions is None else self.positions[rows]

    def mean_metrics(self, values: dict) -> dict:
        """Logged numbers over the global batch (a collective; every rank logs at the same steps): means over
        this rank's rows become the global means; a value that is the same on every rank stays as it is."""
        if self.world.size == 1:
            return values
        own = ("lr", "tokens_per_s", "elapsed_s")  # equal on every rank, or this rank's own clock
        keys = [k for k, v in values.items() if isinstance(v, float) and k not in own]
        t = self.mean(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {**values, **dict(zip(keys, t.tolist(), strict=True))}


@functools.cache
def world() -> World:
    """Join the launch torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), once per process.

    One process group serves both kinds of tensor: gloo for CPU ones, NCCL for CUDA ones when there is a
    GPU (each rank then uses GPU `LOCAL_RANK`).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
        atexit.register(dist.destroy_process_group)
    return World(rank, size, local_rank)


# --- harvest: one store, written by every rank ----------------------------------------------------


def store_writer(path, attrs: dict, *, overwrite: bool = False) -> StoreWriter:
    """The writer for this process: a plain StoreWriter, or a RankStoreWriter in a multi-process launch
    (or when resuming, with one process, a store a multi-process harvest left with commit markers)."""
    w = world()
    loc = remote.location(path)
    leftover = not overwrite and remote.exists(loc) and remote.list_names(loc, COMMITS)
    if w.size > 1 or leftover:
        return RankStoreWriter(loc, attrs, w, overwrite=overwrite)
    return StoreWriter(loc, attrs, overwrite=overwrite)


def _marker(split: str, index: int) -> str:
    return f"{COMMITS}/{split}/{index:08d}.json"


class RankStoreWriter(StoreWriter):
    """The StoreWriter of one rank: writes the shards i ≡ rank (mod world) and their commit markers.

    Ranks write distinct shards, which are distinct files (objects), so they never write the same
    bytes; only rank 0 writes the root attributes. A shard counts as committed once its marker exists
    (or once it lies in the prefix folded into the attributes).
    """

    def __init__(self, path, attrs: dict, w: World, *, overwrite: bool = False):
        self.world = w
        error = None
        if w.is_main:  # creates the store (or checks and reopens it) before any other rank touches it
            try:
                super().__init__(path, attrs, overwrite=overwrite)
            except BaseException as e:
                error = e
        if not w.all_ok(error is None):
            if error is not None:
                raise error
            raise UserError(
                "rank 0 could not open the store (its error is printed above); fix that and rerun"
            )
        if not w.is_main:
            super().__init__(path, attrs, overwrite=False)

    def owned(self, split: str) -> range:
        return range(self.world.rank, self.attrs["splits"][split]["n_shards"], self.world.size)

    def todo(self, split: str) -> list[int]:
        prefix = self.shards_committed(split)
        marked = set(remote.list_names(self.path, f"{COMMITS}/{split}"))
        return [i for i in self.owned(split) if i >= prefix and f"{i:08d}.json" not in marked]

    def put_shard(self, split: str, index: int, arrays: dict) -> None:
        self._next_index[split] = index  # this rank's shards are strided; todo() gives them in order
        super().put_shard(split, index, arrays)

    def _write(self, split: str, index: int, arrays: dict) -> None:
        self._write_arrays(split, index, arrays)
        part = {}
        if split == "train":
            keep = ~arrays["bos"].astype(bool)
            part = {str(layer): RunningStats.part(arrays[acts_name(layer)][keep]) for layer in self.layers}
        remote.write_bytes(self.path, _marker(split, index), json.dumps(part).encode())
        if self.world.is_main:
            self._fold()

    def _fold(self) -> None:
        """Rank 0: fold the markers that extend the committed prefix into the attributes, in shard order."""
        folded = []
        for split, meta in self.attrs["splits"].items():
            marked = set(remote.list_names(self.path, f"{COMMITS}/{split}"))
            while meta["shards_committed"] < meta["n_shards"]:
                key = _marker(split, meta["shards_committed"])
                if key.rsplit("/", 1)[1] not in marked:
                    break
                if split == "train":
                    part = json.loads(remote.read_bytes(self.path, key))
                    for layer in self.layers:
                        self.stats[layer].merge(part[str(layer)])
                    self.attrs["stats_state"] = {str(k): s.state() for k, s in self.stats.items()}
                meta["shards_committed"] += 1
                folded.append(key)
        if folded:
            self._commit()
            remote.delete(self.path, folded)  # a crash before this leaves markers below the prefix: ignored

    def _finalise(self) -> None:
        self.world.barrier()  # every rank's shards and markers are written
        if not self.world.is_main:
            return
        self._fold()
        if all(m["shards_committed"] == m["n_shards"] for m in self.attrs["splits"].values()):
            remote.delete_tree(self.path, COMMITS)
        super()._finalise()


# --- train: data-parallel SAE training ------------------------------------------------------------


class TrainingStep(nn.Module):
    """DDP hooks into a module's forward; this one is the SAE's training forward."""

    def __init__(self, sae: nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, x: Tensor, step: int, total_steps: int):
        return self.sae.training_forward(x, step, total_steps)


def data_parallel(sae: nn.Module, w: World, device: torch.device):
    """The callable that runs one training forward: the SAE's own, or through DDP across the ranks.

    Buffers are not broadcast from rank 0 (DDP's default): `sync_state` reduces them exactly instead, as
    each method's `rank_reductions` says.
    """
    if w.size == 1:
        return sae.training_forward
    ids = [device.index if device.index is not None else w.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(TrainingStep(sae), device_ids=ids, broadcast_buffers=False)


@torch.no_grad()
def sync_state(sae: nn.Module, share: BatchShare) -> None:
    """Reduce the buffers a training forward updated from this rank's rows alone (after backward, before
    the optimiser step), so every rank holds what a single process would after the whole global batch."""
    if share.world.size == 1:
        return
    buffers = dict(sae.named_buffers())
    for name, how in sae.rank_reductions.items():
        REDUCE[how](buffers[name], share)


def _mean(t: Tensor, share: BatchShare) -> None:
    """A mean over tokens: each rank's mean weighted by its rows."""
    t.copy_(share.mean(t))


def _min(t: Tensor, share: BatchShare) -> None:
    """The smallest over the ranks that had rows (one without rows saw nothing: it holds the largest value)."""
    if not share.rows:
        t.fill_(torch.finfo(t.dtype).max if t.is_floating_point() else torch.iinfo(t.dtype).max)
    share.world.min_(t)


def _dead_clock(t: Tensor, share: BatchShare) -> None:
    """Each rank added its rows to every latent's count and zeroed the latents that fired in them (a zero
    after adding rows: fired here). Globally: zero if the latent fired on any rank, else the count before
    the step plus the global batch."""
    fired = (t == 0) & (share.rows > 0)
    before = share.world.min_(torch.where(fired, -1, t - share.rows))  # the same count on every rank, or -1
    t.copy_(torch.where(before < 0, 0, before + share.total))


REDUCE = {"mean": _mean, "min": _min, "dead_clock": _dead_clock}  # what a method's `rank_reductions` may name
