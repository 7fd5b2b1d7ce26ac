"""The shuffled shard stream: coverage, determinism, resumable position, partial and damaged stores."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from atmpipe.errors import UserError
from atmpipe.store import (
    StoreWriter,
    acts_name,
    compressors,
    open_store,
    plan_split,
    synthetic_attrs,
    write_arrays_store,
)
from atmpipe.stream import ChunkReader, ShardStream

LAYER, D = 3, 8
CHUNK, SHARD = 256, 1024


def labelled(n: int, sign: float = 1.0, bos_every: int = 16, seed: int = 0) -> dict:
    """Rows whose first column is their index (negative for eval), so every delivered row names its source."""
    acts = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    acts[:, 0] = sign * np.arange(n)
    positions = np.arange(n) % bos_every
    return {"acts": acts, "positions": positions, "bos": positions == 0}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "s.zarr"
    # 5000 tokens: 20 chunks, the last one partial, in 5 shards.
    splits = {"train": labelled(5000), "eval": labelled(700, sign=-1.0, seed=1)}
    return write_arrays_store(path, splits, layer=LAYER, chunk_tokens=CHUNK, shard_tokens=SHARD)


def non_bos_rows(store) -> np.ndarray:
    return np.flatnonzero(~store.split("train").bos[:])


def take(stream: ShardStream, n_batches: int) -> np.ndarray:
    return np.array([next(stream).numpy()[:, 0] for _ in range(n_batches)]).reshape(
        n_batches, stream.batch_size
    )


def test_every_non_bos_train_token_exactly_once_per_epoch(store):
    expected = non_bos_rows(store)
    logs: list[str] = []
    with ShardStream(store, LAYER, batch_size=109, buffer_chunks=3, log=logs.append) as s:
        assert s.rows_per_epoch == expected.size == 43 * 109  # 5000 tokens minus 313 BOS
        epoch0, epoch1 = take(s, 43).ravel(), take(s, 43).ravel()
    assert (epoch0 >= 0).all()  # nothing from the eval split
    np.testing.assert_array_equal(np.sort(epoch0), expected)
    np.testing.assert_array_equal(np.sort(epoch1), expected)
    assert not np.array_equal(epoch0, epoch1)  # a new epoch is a new shuffle
    assert logs == ["stream: epoch 1 begins after 4,687 tokens (new shuffle of 20 chunks)"]


def test_batches_mix_chunks_from_different_shards(store):
    with ShardStream(store, LAYER, batch_size=512, buffer_chunks=8) as s:
        first = take(s, 1)[0]
    assert len(np.unique(first // SHARD)) >= 3


def test_deterministic_for_a_seed(store):
    with ShardStream(store, LAYER, 300, seed=7) as a, ShardStream(store, LAYER, 300, seed=7) as b:
        np.testing.assert_array_equal(take(a, 20), take(b, 20))
    with ShardStream(store, LAYER, 300, seed=7) as a, ShardStream(store, LAYER, 300, seed=8) as b:
        assert not np.array_equal(take(a, 5), take(b, 5))


def test_batches_follow_the_documented_recipe(store):
    # The module docstring's recipe, written out slowly: chunk permutation, rounds of buffer_chunks chunks,
    # their non-BOS rows in chunk order permuted together, cut into batches (each batch's rows of one round
    # in that round's buffer order). The sequence is part of every checkpoint's position: fast paths must
    # never change it.
    seed, buffer_chunks, batch = 5, 3, 64
    bos = store.split("train").bos[:]
    n_chunks = -(-len(bos) // CHUNK)
    order = np.random.default_rng([seed, 0]).permutation(n_chunks)
    picks = []  # (round, place in the round's buffer, store row), in delivery order
    for r, first in enumerate(range(0, n_chunks, buffer_chunks)):
        chunks = order[first : first + buffer_chunks]
        rows = np.concatenate([np.flatnonzero(~bos[c * CHUNK : (c + 1) * CHUNK]) + c * CHUNK for c in chunks])
        picks += [
            (r, int(i), int(rows[i])) for i in np.random.default_rng([seed, 0, r, 1]).permutation(len(rows))
        ]
    n_batches = len(picks) // batch
    want = [[row for _, _, row in sorted(picks[b * batch : (b + 1) * batch])] for b in range(n_batches)]
    with ShardStream(store, LAYER, batch, seed=seed, buffer_chunks=buffer_chunks) as stream:
        got = take(stream, n_batches)
    np.testing.assert_array_equal(got, np.array(want))


@pytest.mark.parametrize("consumed", [0, 1, 6, 15, 16, 17, 40])  # inside rounds, at and past epoch ends
def test_resumed_stream_continues_the_same_sequence(store, consumed):
    with ShardStream(store, LAYER, 293, seed=3, buffer_chunks=3) as a:
        take(a, consumed)
        position = a.state_dict()
        expected = take(a, 12)
    assert position["rows_consumed"] == consumed * 293
    with ShardStream(store, LAYER, 293, seed=3, buffer_chunks=3, position=position) as b:
        assert b.epoch == consumed * 293 // b.rows_per_epoch
        np.testing.assert_array_equal(take(b, 12), expected)


def test_position_of_another_seed_is_refused(store):
    with ShardStream(store, LAYER, 100, seed=1) as a:
        position = a.state_dict()
    with pytest.raises(UserError, match="resume with the same seed and store"):
        ShardStream(store, LAYER, 100, seed=2, position=position)


def partial_store(path, committed_shards: int):
    """A harvest interrupted after `committed_shards` of 4 shards, with garbage in the next, uncommitted one."""
    data = labelled(4 * SHARD)
    plans = {"train": plan_split(4 * SHARD, CHUNK, SHARD), "eval": plan_split(SHARD, CHUNK, SHARD)}
    attrs = synthetic_attrs([LAYER], D, plans, context_size=16)
    writer = StoreWriter(path, attrs)
    for i in range(committed_shards):
        rows = slice(i * SHARD, (i + 1) * SHARD)
        arrays = {acts_name(LAYER): data["acts"][rows], "bos": data["bos"][rows]}
        writer.put_shard(
            "train", i, {**arrays, "tokens": np.zeros(SHARD, np.int32), "positions": data["positions"][rows]}
        )
    writer.close()
    # A shard being written right now: on disk, but not committed in the attributes.
    half = zarr.open_group(path, mode="r+")["train"]
    rows = slice(committed_shards * SHARD, (committed_shards + 1) * SHARD)
    half[acts_name(LAYER)][rows] = np.full((SHARD, D), 1e6, np.float32)
    half["bos"][rows] = np.zeros(SHARD, bool)
    return open_store(path)


def test_incomplete_store_is_refused_unless_allow_partial(tmp_path):
    store = partial_store(tmp_path / "p.zarr", committed_shards=2)
    with pytest.raises(UserError) as e:
        ShardStream(store, LAYER, 64)
    assert str(e.value) == (
        f"store {store.path} is incomplete (its harvest has not finished); resume the harvest, "
        "or pass --allow-partial to train on its committed shards only"
    )
    with ShardStream(store, LAYER, 64, allow_partial=True) as s:
        n = s.rows_per_epoch
        rows = take(s, n // 64).ravel()
    committed = 2 * SHARD
    assert n == committed - committed // 16
    assert rows.max() < committed and len(np.unique(rows)) == rows.size  # never the half-written shard


def test_store_without_training_tokens_is_refused(tmp_path):
    data = labelled(512, bos_every=1)  # every token is BOS
    store = write_arrays_store(
        tmp_path / "e.zarr", {"train": data, "eval": data}, layer=LAYER, chunk_tokens=CHUNK
    )
    with pytest.raises(UserError, match="has no non-BOS training tokens committed"):
        ShardStream(store, LAYER, 64)


def test_layer_not_in_store_is_refused(store):
    with pytest.raises(UserError, match=r"layer 5 is not in this store \(it has \[3\]\); pick one of those"):
        ShardStream(store, 5, 64)


def damage_chunk(store, chunk: int) -> None:
    """Flip a checksum byte of one inner chunk of the acts array, found through the shard index."""
    per_shard = SHARD // CHUNK
    shard_file = store.path / "train" / acts_name(LAYER) / "c" / str(chunk // per_shard) / "0"
    raw = bytearray(shard_file.read_bytes())
    index = np.frombuffer(bytes(raw[-(16 * per_shard + 4) : -4]), "<u8").reshape(per_shard, 2)
    offset, nbytes = index[chunk % per_shard]
    raw[offset + nbytes - 1] ^= 0xFF
    shard_file.write_bytes(bytes(raw))


def test_damaged_chunk_is_named_or_skipped(tmp_path):
    splits = {"train": labelled(5000), "eval": labelled(300, sign=-1.0)}
    store = write_arrays_store(
        tmp_path / "d.zarr", splits, layer=LAYER, chunk_tokens=CHUNK, shard_tokens=SHARD
    )
    damage_chunk(store, 6)
    with pytest.raises(UserError) as e:
        with ShardStream(store, LAYER, 4000) as s:
            next(s)
    assert str(e.value).startswith(f"chunk 6 (tokens 1536-1791) of {store.path}/train/acts_l3 is damaged (")
    assert str(e.value).endswith("); re-harvest the store, or pass --skip-damaged to train without it")

    with ShardStream(store, LAYER, 1000, skip_damaged=True, buffer_chunks=4) as s:
        delivered = take(s, 8).ravel()  # more than one epoch
        assert s.state_dict()["skipped"] == [6]
        per_epoch = s.rows_per_epoch
    expected = np.setdiff1d(non_bos_rows(store), np.arange(6 * CHUNK, 7 * CHUNK))
    assert per_epoch == expected.size
    np.testing.assert_array_equal(np.sort(delivered[: expected.size]), expected)


def test_damaged_chunk_cannot_be_skipped_by_one_of_several_processes(tmp_path):
    splits = {"train": labelled(5000), "eval": labelled(300, sign=-1.0)}
    store = write_arrays_store(
        tmp_path / "d.zarr", splits, layer=LAYER, chunk_tokens=CHUNK, shard_tokens=SHARD
    )
    damage_chunk(store, 6)
    failures = []
    for rank in range(2):  # one round of all 20 chunks: the rank that owns chunk 6 decodes it, the other not
        with ShardStream(store, LAYER, 4000, skip_damaged=True, buffer_chunks=20, rank=rank, world=2) as s:
            try:
                next(s)
            except UserError as e:
                failures.append(str(e))
    assert len(failures) == 1
    assert failures[0].startswith(f"damaged chunk 6 (tokens 1536-1791) of {store.path}/train/acts_l3 (")
    assert failures[0].endswith(
        "), which only this one of 2 processes reads; train past it on one process with --skip-damaged "
        "(--resume continues on any number), or re-harvest"
    )


# --- the direct chunk reader: the same bits as zarr, the same checks --------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunk_reader_decodes_every_chunk_as_zarr_does(tmp_path, dtype):
    store = write_arrays_store(
        tmp_path / "s.zarr", {"train": labelled(5000)}, layer=LAYER, dtype=dtype, chunk_tokens=CHUNK,
        shard_tokens=SHARD,
    )  # fmt: skip
    acts = store.split("train").acts(LAYER)
    reader = ChunkReader.for_array(store.path, acts)
    assert reader is not None  # the layout atmpipe writes is read directly
    for chunk in range(-(-5000 // CHUNK)):  # the last one partial
        start, stop = chunk * CHUNK, min((chunk + 1) * CHUNK, 5000)
        out = np.full((stop - start, D), 7, acts.dtype)
        assert reader.read(chunk, out)
        np.testing.assert_array_equal(out, acts[start:stop])


def test_batches_are_the_same_bits_with_zarr_reads(store, monkeypatch):
    def batches() -> list[np.ndarray]:
        with ShardStream(store, LAYER, 700, seed=3, buffer_chunks=5) as s:
            return [next(s).numpy().copy() for _ in range(9)]  # past an epoch

    direct = batches()
    monkeypatch.setattr(ChunkReader, "for_array", classmethod(lambda cls, root, array: None))
    np.testing.assert_array_equal(np.stack(direct), np.stack(batches()))


def test_damaged_shard_index_is_named(tmp_path):
    store = write_arrays_store(
        tmp_path / "d.zarr", {"train": labelled(5000)}, layer=LAYER, chunk_tokens=CHUNK, shard_tokens=SHARD
    )
    shard_file = store.path / "train" / acts_name(LAYER) / "c" / "1" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[-20] ^= 0xFF  # inside the index (its last entry), not its checksum
    shard_file.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"^chunk [4-7] \(tokens \d+-\d+\) of .* is damaged \(.*checksum"):
        with ShardStream(store, LAYER, 4000, buffer_chunks=20) as s:
            next(s)


def test_chunk_reader_leaves_other_layouts_and_unwritten_chunks_to_zarr(tmp_path):
    plain = zarr.create_array(tmp_path / "plain.zarr", shape=(64, D), chunks=(16, D), dtype="float32")
    assert ChunkReader.for_array(tmp_path / "plain.zarr", plain) is None  # not sharded
    sharded = zarr.create_array(
        tmp_path / "sparse.zarr", shape=(64, D), chunks=(16, D), shards=(32, D), dtype="float32",
        compressors=compressors(), fill_value=0, config={"write_empty_chunks": False},
    )  # fmt: skip
    assert ChunkReader.for_array("memory://sparse.zarr", sharded) is None  # not a local directory
    sharded[:] = np.ones((64, D), np.float32)
    sharded[16:32] = 0  # an all-fill chunk: not written, its index entry marks it empty
    reader = ChunkReader.for_array(tmp_path / "sparse.zarr", sharded)
    assert reader is not None
    out = np.full((16, D), 7, np.float32)
    assert not reader.read(1, out)
    assert reader.read(2, out) and (out == 1).all()
