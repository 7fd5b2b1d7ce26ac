"""The Zarr activation store: round trips per dtype, schema, statistics, checksums, resumable writer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atmpipe.errors import UserError
from atmpipe.store import (
    StoreWriter,
    encode_acts,
    open_store,
    plan_split,
    synthetic_attrs,
    write_arrays_store,
)


def _splits(rng, n_train=5000, n_eval=700, d=24):
    train = {
        "acts": (rng.normal(size=(n_train, d)) * 3 + 1).astype(np.float32),
        "tokens": rng.integers(0, 1000, n_train).astype(np.int32),
        "positions": (np.arange(n_train) % 64).astype(np.int32),
        "bos": np.arange(n_train) % 64 == 0,
    }
    train["acts"][train["bos"]] *= 100  # BOS activations are huge: the statistics must skip them
    return {"train": train, "eval": {"acts": rng.normal(size=(n_eval, d)).astype(np.float32)}}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_per_dtype(tmp_path, dtype):
    splits = _splits(np.random.default_rng(0))
    store = write_arrays_store(
        tmp_path / "s.zarr", splits, layer=5, dtype=dtype, chunk_tokens=512, shard_tokens=2048
    )
    got = store.read_acts("train", 5)
    want = splits["train"]["acts"]
    if dtype == "float32":
        np.testing.assert_array_equal(got, want)
    elif dtype == "float16":
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
    else:  # bfloat16 stored as uint16 bits: decoding equals torch's own bf16 rounding
        np.testing.assert_array_equal(got, torch.from_numpy(want).bfloat16().float().numpy())
        assert store.split("train").acts(5).dtype == np.uint16
    assert got.dtype == np.float32
    np.testing.assert_array_equal(store.split("train").tokens[:], splits["train"]["tokens"])
    np.testing.assert_array_equal(store.split("train").bos[:], splits["train"]["bos"])
    ev = store.split("eval")
    assert ev.n_tokens == ev.n_committed_tokens == 700
    np.testing.assert_array_equal(ev.positions[:], np.arange(700) % 128)  # default positions
    np.testing.assert_array_equal(store.read_acts("train", 5, 100, 130), got[100:130])


def test_schema_layout_and_attributes(tmp_path):
    store = write_arrays_store(
        tmp_path / "s.zarr", _splits(np.random.default_rng(1)), layer=2, chunk_tokens=512, shard_tokens=2048
    )
    a = store.attrs
    assert a["schema_version"] == 1 and a["complete"] is True
    assert a["layers"] == [2] and a["hook_names"] == {"2": "blocks.2.hook_resid_post"} and a["d_model"] == 24
    assert a["splits"]["train"] == {
        "n_tokens": 5000,
        "n_shards": 3,
        "shards_committed": 3,
        "shard_tokens": 2048,
        "chunk_tokens": 512,
    }
    assert "stats_state" not in a
    train = store.split("train")
    arr = train.acts(2)
    assert arr.shape == (5000, 24) and arr.chunks == (512, 24) and arr.shards == (2048, 24)
    codecs = json.loads((tmp_path / "s.zarr/train/acts_l2/zarr.json").read_text())["codecs"]
    assert codecs[0]["name"] == "sharding_indexed"
    assert [c["name"] for c in codecs[0]["configuration"]["codecs"]][-1] == "crc32c"
    assert sorted(p.name for p in (tmp_path / "s.zarr/train/acts_l2/c").iterdir()) == ["0", "1", "2"]
    with pytest.raises(UserError, match="layer 3 is not in this store"):
        train.acts(3)


def test_statistics_exclude_bos_and_match_numpy(tmp_path):
    splits = _splits(np.random.default_rng(2))
    store = write_arrays_store(tmp_path / "s.zarr", splits, layer=0, chunk_tokens=512, shard_tokens=1024)
    x = splits["train"]["acts"][~splits["train"]["bos"]].astype(np.float64)
    s = store.stats(0)
    assert s["n"] == len(x)
    np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-12)
    np.testing.assert_allclose(s["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-12)
    assert store.norm_scale(0) == pytest.approx(np.sqrt(24) / s["mean_norm"])


def test_float16_refuses_out_of_range():
    with pytest.raises(UserError, match=r"activations of layer 7 reach 7e\+04, beyond float16's range"):
        encode_acts(np.array([1.0, -70000.0], np.float32), "float16", what="activations of layer 7")


def test_checksum_detects_damage(tmp_path):
    store = write_arrays_store(
        tmp_path / "s.zarr", _splits(np.random.default_rng(3)), layer=1, chunk_tokens=512, shard_tokens=2048
    )
    shard = tmp_path / "s.zarr/train/acts_l1/c/0/0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        store.read_acts("train", 1, 0, 512)


def _attrs(plans, d=8):
    return synthetic_attrs([0, 1], d, plans, context_size=16)


def _shard(rng, n, d=8):
    return {
        "acts_l0": rng.normal(size=(n, d)).astype(np.float32),
        "acts_l1": rng.normal(size=(n, d)).astype(np.float32),
        "tokens": rng.integers(0, 10, n).astype(np.int32),
        "positions": (np.arange(n) % 16).astype(np.int32),
        "bos": np.arange(n) % 16 == 0,
    }


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_writer_resumes_bit_identical(tmp_path):
    plans = {"train": plan_split(200, 16, 64, 16), "eval": plan_split(40, 16, 64, 16)}
    assert plans["train"]["n_shards"] == 4 and plans["eval"]["shard_tokens"] == 48
    rng = np.random.default_rng(4)
    shards = {"train": [_shard(rng, n) for n in (64, 64, 64, 8)], "eval": [_shard(rng, 40)]}

    def write(path, train_range, split_eval=True):
        w = StoreWriter(path, _attrs(plans))
        for i in train_range:
            w.put_shard("train", i, shards["train"][i])
        if split_eval:
            w.put_shard("eval", 0, shards["eval"][0])
        w.close()
        return w

    write(tmp_path / "full.zarr", range(4))
    part = write(tmp_path / "part.zarr", range(2), split_eval=False)
    assert not part.complete and open_store(tmp_path / "part.zarr").split("train").n_committed_tokens == 128
    again = StoreWriter(tmp_path / "part.zarr", _attrs(plans))
    assert again.shards_committed("train") == 2 and again.shards_committed("eval") == 0
    with pytest.raises(RuntimeError, match="out of order"):
        again.put_shard("train", 3, shards["train"][3])
    for i in (2, 3):
        again.put_shard("train", i, shards["train"][i])
    again.put_shard("eval", 0, shards["eval"][0])
    again.close()
    assert again.complete
    assert _files(tmp_path / "part.zarr") == _files(tmp_path / "full.zarr")
    np.testing.assert_array_equal(
        open_store(tmp_path / "part.zarr").read_acts("train", 1),
        np.concatenate([s["acts_l1"] for s in shards["train"]]),
    )


def test_writer_refuses_other_configuration(tmp_path):
    plans = {"train": plan_split(64, 16, 64, 16)}
    StoreWriter(tmp_path / "s.zarr", _attrs(plans)).close()
    other = _attrs(plans)
    other["seed"] = 1
    with pytest.raises(UserError, match=r"another configuration \(differs in: seed\); pass --overwrite"):
        StoreWriter(tmp_path / "s.zarr", other)
    StoreWriter(tmp_path / "s.zarr", other, overwrite=True).close()
    assert open_store(tmp_path / "s.zarr").attrs["seed"] == 1


def test_overwrite_never_deletes_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("precious")
    with pytest.raises(UserError, match="is not a Zarr store; refusing to replace it"):
        StoreWriter(tmp_path / "mine", _attrs({"train": plan_split(64, 16, 64, 16)}), overwrite=True)
    assert (tmp_path / "mine/notes.txt").read_text() == "precious"


def test_open_store_errors(tmp_path):
    with pytest.raises(UserError, match="no activation store at"):
        open_store(tmp_path / "missing.zarr")


def test_plan_split_rejects_misaligned_shards():
    with pytest.raises(UserError, match="must be a multiple of chunk_tokens"):
        plan_split(1000, 300, 1000, 100)


def test_an_all_zero_shard_is_written_and_verifies(tmp_path):
    # Zero equals the arrays' fill value: zarr skips such chunks unless told otherwise, and a committed
    # shard with no file would read as missing ("damaged") although nothing went wrong.
    from atmpipe.integrity import verify_store

    splits = _splits(np.random.default_rng(0), n_train=4096)
    splits["train"]["acts"][2048:] = 0.0
    splits["train"]["tokens"][2048:] = 0
    store = write_arrays_store(tmp_path / "s.zarr", splits, layer=5, chunk_tokens=512, shard_tokens=2048)
    assert (store.path / "train" / "acts_l5" / "c" / "1" / "0").is_file()
    assert (store.path / "train" / "tokens" / "c" / "1").is_file()
    assert verify_store(store.path).damaged == []
    np.testing.assert_array_equal(store.read_acts("train", 5), splits["train"]["acts"])
