"""Shuffled shard stream: the training split of a store as an endless, seeded, resumable run of batches.

The sequence of rows is a pure function of (seed, extent, chunk size, buffer size):
  * epoch e visits the store's chunks in a seeded permutation (whole contiguous Zarr chunks are read);
  * consecutive groups of `buffer_chunks` chunks of that permutation form a round: a shuffle buffer that
    mixes chunks from many shards, whose non-BOS rows are permuted together;
  * the rows of round after round, epoch after epoch, are cut into batches.
So the position is one number, the rows consumed, and a resumed stream recomputes exactly where it was from
the per-chunk row counts. A background thread decodes the next round and cuts batches into a bounded queue
while the trainer works on the current one.

Data parallel (rank r of `world` processes): every rank knows the whole recipe (the row counts come from the
small `bos` array), but reads and decodes only the chunks at slots i ≡ r (mod world) of each round's chunk
list, into a buffer of those chunks alone. Each global batch is the single-process one; a rank delivers the
rows of it that lie in its own chunks, with their positions in the global batch (`positions`). Shares are
therefore uneven (about batch/world each, none when a round has fewer chunks than there are ranks). The rule
depends only on the round's chunk list and the world size, and the position still counts global rows, so a
run resumes on any number of processes. A chunk found damaged then cannot be skipped (--skip-damaged): only
its own rank reads it, the others would still count its rows.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import torch
from numcodecs import Blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.core.buffer.cpu import NDBuffer

from atmpipe import remote
from atmpipe.errors import UserError
from atmpipe.store import Store, decode_acts

SPLIT = "train"  # training never sees the held-out documents


def check_store(store: Store, layer: int, allow_partial: bool = False) -> None:
    """Refuse an incomplete store (unless allow_partial) and a layer it does not hold."""
    if not store.complete and not allow_partial:
        raise UserError(
            f"store {store.path} is incomplete (its harvest has not finished); resume the harvest, "
            "or pass --allow-partial to train on its committed shards only"
        )
    store.split(SPLIT).acts(layer)  # raises for a layer the store does not hold


class ChunkReader:
    """Whole inner chunks of a local store's sharded array, read and decoded straight into a buffer.

    Zarr's read of one chunk copies it twice more and allocates fresh buffers on the way (≈ 1.7× the
    time of this path, measured in benchmarks/README.md); this does what zarr does for the layout atmpipe writes and
    nothing else: the shard index (n × (offset, nbytes) little-endian uint64, crc32c-checked) at the end of
    the shard file, then the chunk's bytes, their crc32c checked exactly as zarr's Crc32cCodec does, Blosc-
    decoded into `out`. `for_array` gives None for any other layout (or a remote store): zarr reads those.
    """

    EMPTY = 2**64 - 1  # the index entry of a chunk never written (zarr: fill value)

    def __init__(self, root: Path, array):
        self.array, self.root = array, root
        self.chunk_rows = array.chunks[0]
        self.per_shard = array.shards[0] // self.chunk_rows
        self._scratch = threading.local()
        self._blosc = Blosc()  # decoding reads cname, shuffle and sizes from each chunk's Blosc header

    @classmethod
    def for_array(cls, root, array) -> ChunkReader | None:
        codecs = array.metadata.codecs
        sharding = codecs[0] if len(codecs) == 1 else None
        ok = (
            isinstance(root, Path)
            and sys.byteorder == "little"
            and isinstance(sharding, ShardingCodec)
            and array.shards is not None
            and tuple(sharding.chunk_shape) == (array.chunks[0], *array.shape[1:])
            and [type(c) for c in sharding.codecs] == [BytesCodec, BloscCodec, Crc32cCodec]
            and [type(c) for c in sharding.index_codecs] == [BytesCodec, Crc32cCodec]
            and sharding.index_location == ShardingCodecIndexLocation.end
            and all(
                c.endian is None or c.endian.value == "little"
                for c in (sharding.codecs[0], sharding.index_codecs[0])
            )
        )
        return cls(root, array) if ok else None

    @staticmethod
    def _checked(data: np.ndarray, what: str) -> np.ndarray:
        """`data` without its trailing crc32c, which must match (as zarr's Crc32cCodec checks it)."""
        if np.uint32(google_crc32c.value(data[:-4])).tobytes() != data[-4:].tobytes():
            raise ValueError(f"Stored and computed checksum of the {what} do not match")
        return data[:-4]

    def read(self, chunk: int, out: np.ndarray) -> bool:
        """Decode chunk `chunk` (its first len(out) rows) into `out`; False if it was never written (left to
        zarr, which fills it)."""
        shard, inner = divmod(chunk, self.per_shard)
        path = self.root / self.array.path / self.array.metadata.encode_chunk_key((shard, 0))
        fd = os.open(path, os.O_RDONLY)
        try:
            index_bytes = 16 * self.per_shard + 4
            index = np.frombuffer(os.pread(fd, index_bytes, os.fstat(fd).st_size - index_bytes), np.uint8)
            if len(index) != index_bytes:
                raise ValueError(f"shard file {path} is too short for its index")
            offset, nbytes = (
                int(v) for v in self._checked(index, "shard index").view("<u8")[2 * inner :][:2]
            )
            if offset == nbytes == self.EMPTY:
                return False
            data = self._buffer(nbytes)
            if os.preadv(fd, [data], offset) != nbytes:
                raise ValueError(f"shard file {path} ends inside chunk {chunk}")
        finally:
            os.close(fd)
        encoded = self._checked(data, "chunk")
        full_bytes = self.chunk_rows * out[:1].nbytes
        if len(encoded) < 16 or int(encoded[4:8].view("<u4")[0]) != full_bytes:  # Blosc header: nbytes
            raise ValueError(f"chunk {chunk} does not decode to {full_bytes} bytes")
        if len(out) == self.chunk_rows:
            self._blosc.decode(encoded, out=out)
        else:  # the array's last, partial chunk: stored padded to the full chunk shape
            full = np.empty((self.chunk_rows, *out.shape[1:]), out.dtype)
            self._blosc.decode(encoded, out=full)
            out[:] = full[: len(out)]
        return True

    def _buffer(self, nbytes: int) -> np.ndarray:
        """A per-thread read buffer, grown as needed (a fresh 10 MB one per chunk would cost page faults)."""
        buffer = getattr(self._scratch, "data", None)
        if buffer is None or len(buffer) < nbytes:
            buffer = self._scratch.data = np.empty(nbytes, np.uint8)
        return buffer[:nbytes]


class _Failure:
    """An exception raised in the producer thread, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class ShardStream:
    """Iterate shuffled [batch_size, d_model] float32 batches of one layer's training activations (on rank
    `rank` of `world` processes: [rows, d_model], this rank's rows of each global batch; `positions`).

    `position` is a `state_dict()` of an earlier stream of the same store: the new stream continues with
    exactly the batches the old one would have produced next.
    """

    def __init__(
        self,
        store: Store,
        layer: int,
        batch_size: int,
        *,
        seed: int = 0,
        buffer_chunks: int = 32,
        allow_partial: bool = False,
        skip_damaged: bool = False,
        device: str | torch.device = "cpu",
        prefetch: int = 4,
        workers: int = 2,
        position: dict | None = None,
        log: Callable[[str], None] = print,
        rank: int = 0,
        world: int = 1,
    ):
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}; pass e.g. --batch-size 4096")
        # Data parallel: every rank forms the same global batches and keeps their rows that lie in its own
        # chunks (batch_size stays the global size; the position counts global rows, whatever the world).
        self.rank, self.world = rank, world
        self.positions = torch.zeros(0, dtype=torch.int64)  # of the rows __next__ returned last
        check_store(store, layer, allow_partial)
        self.store, self.layer, self.batch_size = store, layer, batch_size
        self.split = store.split(SPLIT)
        self.acts = self.split.acts(layer)
        self.seed, self.buffer_chunks, self.skip_damaged = seed, max(1, buffer_chunks), skip_damaged
        self.device = torch.device(device)
        self.log = log
        self.chunk_tokens = self.split.chunk_tokens
        # Only committed shards are ever read: a harvest may still be appending to the rest.
        self.n_tokens = self.split.n_tokens if store.complete else self.split.n_committed_tokens
        self.rows_consumed = 0
        self.skipped: set[int] = set()
        self._skip_lock = threading.Lock()
        if position is not None:
            self._check_position(position)
            self.n_tokens, self.rows_consumed = position["n_tokens"], position["rows_consumed"]
            self.skipped = set(position["skipped"])
        self.n_chunks = -(-self.n_tokens // self.chunk_tokens)
        self.chunk_rows = self._count_rows()
        if self.rows_per_epoch == 0:
            raise UserError(
                f"store {store.path} has no non-BOS training tokens committed ({self.n_tokens} tokens); "
                "harvest more text before training"
            )
        self._scratch = threading.local()
        self._reader = ChunkReader.for_array(store.path, self.acts)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="atmpipe-stream-decode")
        self._queue: queue.Queue = queue.Queue(max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="atmpipe-stream", daemon=True)
        self._thread.start()

    # --- the deterministic recipe ----------------------------------------------------------------

    @property
    def rows_per_epoch(self) -> int:
        return int(self.chunk_rows.sum())

    @property
    def epoch(self) -> int:
        return self.rows_consumed // self.rows_per_epoch

    def _chunk_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)

    def _row_order(self, epoch: int, round_index: int, n_rows: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, round_index, 1]).permutation(n_rows)

    def _rounds(self, epoch: int) -> list[np.ndarray]:
        order = self._chunk_order(epoch)
        return [order[i : i + self.buffer_chunks] for i in range(0, self.n_chunks, self.buffer_chunks)]

    def _chunk_span(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_tokens, min((chunk + 1) * self.chunk_tokens, self.n_tokens)

    def _locate(self, rows: int) -> tuple[int, int, int]:
        """Rows consumed → (epoch, round, offset of the next row within that round's permutation)."""
        epoch, rest = divmod(rows, self.rows_per_epoch)
        for round_index, chunks in enumerate(self._rounds(epoch)):
            size = int(self.chunk_rows[chunks].sum())
            if rest < size:
                return epoch, round_index, rest
            rest -= size
        raise AssertionError("unreachable: rest < rows_per_epoch")

    def _count_rows(self) -> np.ndarray:
        """Non-BOS rows per chunk (0 for chunks skipped as damaged); reads `bos` many chunks at a time.

        Also keeps where the BOS rows are (`self._bos_at`, store-global row numbers: one per context
        window), so chunk loads never read `bos` again.
        """
        counts = np.zeros(self.n_chunks, np.int64)
        bos_at = []
        group = 256
        for first in range(0, self.n_chunks, group):
            last = min(first + group, self.n_chunks)
            try:
                bos = self.split.bos[first * self.chunk_tokens : self._chunk_span(last - 1)[1]]
            except Exception:  # a damaged chunk in there: find, name or skip it chunk by chunk
                for chunk in range(first, last):
                    bos = self._read(self.split.bos, chunk)
                    counts[chunk] = 0 if bos is None else int((~bos).sum())
                    if bos is not None:
                        bos_at.append(np.flatnonzero(bos) + self._chunk_span(chunk)[0])
                continue
            counts[first:last] = np.add.reduceat(~bos, np.arange(0, len(bos), self.chunk_tokens))
            bos_at.append(np.flatnonzero(bos) + first * self.chunk_tokens)
        counts[sorted(self.skipped)] = 0
        self._bos_at = np.concatenate(bos_at) if bos_at else np.zeros(0, np.int64)
        return counts

    def _kept_rows(self, chunk: int) -> np.ndarray:
        """The chunk's non-BOS rows, as offsets within the chunk."""
        start, stop = self._chunk_span(chunk)
        lo, hi = np.searchsorted(self._bos_at, [start, stop])
        keep = np.ones(stop - start, bool)
        keep[self._bos_at[lo:hi] - start] = False
        return np.flatnonzero(keep)

    def _check_position(self, position: dict) -> None:
        mine = {"seed": self.seed, "chunk_tokens": self.chunk_tokens, "buffer_chunks": self.buffer_chunks}
        theirs = {k: position.get(k) for k in mine}
        if mine != theirs:
            raise UserError(
                f"the saved stream position was made with {theirs}, this stream has {mine}; "
                "resume with the same seed and store"
            )
        committed = self.split.n_tokens if self.store.complete else self.split.n_committed_tokens
        if position["n_tokens"] > committed:
            raise UserError(
                f"the saved stream read {position['n_tokens']} tokens of {self.store.path}, which now has only "
                f"{committed} committed; resume against the store the run was started with"
            )

    def state_dict(self) -> dict:
        """JSON-able position: enough to continue the exact same sequence of batches."""
        with self._skip_lock:
            skipped = sorted(self.skipped)
        return {
            "seed": self.seed,
            "chunk_tokens": self.chunk_tokens,
            "buffer_chunks": self.buffer_chunks,
            "n_tokens": self.n_tokens,
            "rows_consumed": self.rows_consumed,
            "skipped": skipped,
        }

    # --- reading ---------------------------------------------------------------------------------

    def _read(self, array, chunk: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """One whole chunk (into `out` if given); a failed checksum is an error naming it, or a counted skip."""
        start, stop = self._chunk_span(chunk)
        try:
            if out is None:
                return array[start:stop]
            if array is self.acts and self._reader is not None and self._reader.read(chunk, out):
                return out
            array.get_basic_selection(slice(start, stop), out=NDBuffer.from_numpy_array(out))
            return out
        except Exception as e:  # zarr raises ValueError for a checksum mismatch, codecs their own errors
            if what := remote.fault(
                e
            ):  # the chunk could not be fetched: it is not damaged, and never skipped
                raise remote.StoreFault(
                    f"the object store holding {self.store.path} failed ({what}) after its retries"
                ) from None
            if not self.skip_damaged:
                raise UserError(
                    f"chunk {chunk} (tokens {start}-{stop - 1}) of {self.store.path}/{SPLIT}/{array.basename} "
                    f"is damaged ({e}); re-harvest the store, or pass --skip-damaged to train without it"
                ) from None
            if array is self.acts and self.world > 1:  # the other ranks never read it, so cannot skip it
                raise UserError(
                    f"damaged chunk {chunk} (tokens {start}-{stop - 1}) of {self.store.path}/{SPLIT}/"
                    f"{array.basename} ({e}), which only this one of {self.world} processes reads; train past it "
                    "on one process with --skip-damaged (--resume continues on any number), or re-harvest"
                ) from None
            with self._skip_lock:
                self.skipped.add(chunk)
            return None

    def _load_chunk(self, chunk: int, dest: np.ndarray) -> bool:
        """Decode a whole chunk straight into `dest` (its slot in the round buffer, BOS rows included:
        they are never picked, see _load_round); False if skipped as damaged."""
        if self.acts.dtype == np.float32:
            return self._read(self.acts, chunk, out=dest) is not None
        scratch = getattr(self._scratch, "acts", None)
        if scratch is None:  # one decode buffer per worker thread, reused
            scratch = self._scratch.acts = np.empty((self.chunk_tokens, self.store.d_model), self.acts.dtype)
        acts = self._read(self.acts, chunk, out=scratch[: len(dest)])
        if acts is None:
            return False
        dest[:] = decode_acts(acts)
        return True

    def _own_slots(self, chunks: np.ndarray) -> list[tuple[int, int]]:
        """(chunk, slot i in the round) of the round's chunks this rank loads: i ≡ rank (mod world)."""
        return [(int(c), i) for i, c in enumerate(chunks) if i % self.world == self.rank]

    def _load_round(
        self, chunks: np.ndarray, buffer: np.ndarray
    ) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Start decoding this rank's chunks of a round into `buffer` (its j-th at row j·chunk_tokens) on the
        pool; the returned function waits for them and gives (buffer, the round's non-BOS rows in chunk
        order). Rows are numbered slot·chunk_tokens + offset over the whole round, every rank's chunks."""
        ct = self.chunk_tokens
        futures = {}
        for c, i in self._own_slots(chunks):
            if self.chunk_rows[c] > 0:
                start, stop = self._chunk_span(c)
                at = i // self.world * ct
                futures[c] = self._pool.submit(self._load_chunk, c, buffer[at : at + stop - start])

        def assemble() -> tuple[np.ndarray, np.ndarray]:
            rows = []
            for i, c in enumerate(map(int, chunks)):
                if c in futures and not futures[c].result():
                    self.chunk_rows[c] = 0  # skipped: later positions are counted without it
                if self.chunk_rows[c] > 0:
                    rows.append(self._kept_rows(c) + i * ct)
            return buffer, np.concatenate(rows) if rows else np.zeros(0, np.int64)

        return assemble

    def _own_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of some round rows (slot·chunk_tokens + offset), those in this rank's chunks: (their rows in this
        rank's buffer, their places in `rows`)."""
        slot, offset = np.divmod(rows, self.chunk_tokens)
        mine = np.flatnonzero(slot % self.world == self.rank)
        return slot[mine] // self.world * self.chunk_tokens + offset[mine], mine

    def _shuffled_rounds(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(round buffer, its non-BOS rows, permutation of those still to deliver), forever; the next round
        loads ahead.

        Two buffers, allocated once, each for this rank's chunks of a round: one is cut into batches while
        the next round decodes into the other.
        """
        rows = -(-min(self.buffer_chunks, self.n_chunks) // self.world) * self.chunk_tokens
        buffers = [np.empty((rows, self.store.d_model), np.float32) for _ in range(2)]
        epoch, round_index, offset = self._locate(self.rows_consumed)
        rounds = self._rounds(epoch)
        slot = 0
        pending = self._load_round(rounds[round_index], buffers[slot])
        while True:
            next_epoch, next_round = (
                (epoch, round_index + 1) if round_index + 1 < len(rounds) else (epoch + 1, 0)
            )
            next_rounds = rounds if next_epoch == epoch else self._rounds(next_epoch)
            following = self._load_round(next_rounds[next_round], buffers[1 - slot])
            acts, kept = pending()
            yield acts, kept, self._row_order(epoch, round_index, len(kept))[offset:]
            epoch, round_index, rounds, pending, offset = next_epoch, next_round, next_rounds, following, 0
            slot = 1 - slot

    def _batches(self) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """This rank's rows of each global batch, and their positions in it."""
        parts, positions, filled = [], [], 0
        for acts, kept, order in self._shuffled_rounds():
            done = 0
            while done < len(order):
                take = min(self.batch_size - filled, len(order) - done)
                # Rows of one batch in buffer order: the same set, gathered with far better locality.
                local, mine = self._own_rows(np.sort(kept[order[done : done + take]]))
                positions.append(filled + mine)
                filled, done = filled + take, done + take
                if filled < self.batch_size:  # gather now: the round after next decodes into this buffer
                    parts.append(np.take(acts, local, axis=0))
                    continue
                yield self._gather(parts, acts, local), np.concatenate(positions)
                parts, positions, filled = [], [], 0

    def _gather(self, parts: list[np.ndarray], acts: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """One batch: the rows gathered from earlier rounds, then `rows` of `acts`, into one (pinned) tensor."""
        size = sum(len(p) for p in parts) + len(rows)
        batch = torch.empty((size, acts.shape[1]), dtype=torch.float32, pin_memory=self.device.type == "cuda")
        out = batch.numpy()
        at = 0
        for part in parts:
            out[at : at + len(part)] = part
            at += len(part)
        # mode="clip" (rows are always in range): with the default "raise", numpy gathers into a temporary
        # and copies it into `out`, twice the time.
        np.take(acts, rows, axis=0, out=out[at:], mode="clip")
        return batch

    def _produce(self) -> None:
        try:
            for item in self._batches():
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the trainer, which raises it
            self._put(_Failure(e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # --- consuming -------------------------------------------------------------------------------

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> torch.Tensor:
        """This rank's rows of the next global batch (all of it in a single process); `positions` then holds
        their positions in the global batch."""
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        item, positions = item
        self.positions = torch.from_numpy(positions).to(self.device, non_blocking=True)
        before, self.rows_consumed = self.rows_consumed, self.rows_consumed + self.batch_size
        epoch_of_last = (self.rows_consumed - 1) // self.rows_per_epoch
        if epoch_of_last > (max(before, 1) - 1) // self.rows_per_epoch:
            self.log(
                f"stream: epoch {epoch_of_last} begins after {epoch_of_last * self.rows_per_epoch:,} tokens "
                f"(new shuffle of {self.n_chunks} chunks)"
            )
        if self.device.type == "cpu":
            return item
        return item.to(self.device, non_blocking=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
