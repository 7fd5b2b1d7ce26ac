"""Stores on object storage, through fsspec and Zarr's FsspecStore: an in-memory filesystem, and a real
S3-compatible server (moto's server mode) on 127.0.0.1: a 2-process harvest into it killed part-way,
resumed by one process, byte-identical to the store on disk; training from it equals training from disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file
from test_distributed import CRASH_DRIVER, HARVEST, TORCHRUN, files, write_recipe

from atmpipe import remote
from atmpipe.distributed import COMMITS
from atmpipe.errors import UserError
from atmpipe.harvest import HarvestConfig, harvest
from atmpipe.store import open_store, write_arrays_store
from atmpipe.stream import ShardStream
from atmpipe.train import TrainConfig, train

BUCKET = "atmpipe-test"
SECRET = "never-print-this-secret-0123456789"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port; credentials and endpoint in the standard AWS variables."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "atmpipe-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def object_files(url: str) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = url.removeprefix("s3://")
    return {p.removeprefix(root + "/"): fs.cat_file(p) for p in sorted(fs.find(root))}


def test_memory_url_store_round_trip_and_stream(tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        "train": {"acts": rng.normal(size=(300, 8)), "tokens": np.arange(300) + 1, "bos": np.arange(300) % 30 == 0},
        "eval": {"acts": rng.normal(size=(60, 8)), "tokens": np.arange(60) + 1, "bos": np.arange(60) % 30 == 0},
    }  # fmt: skip
    url = "memory://atmpipe/s.zarr"
    local = write_arrays_store(tmp_path / "s.zarr", splits, layer=2, chunk_tokens=50, shard_tokens=100)
    store = write_arrays_store(url, splits, layer=2, chunk_tokens=50, shard_tokens=100)
    assert store.path == url and store.complete and store.disk_bytes() == local.disk_bytes()
    np.testing.assert_array_equal(store.read_acts("eval", 2), splits["eval"]["acts"].astype(np.float32))
    assert open_store(url).attrs == local.attrs
    with ShardStream(store, 2, 16, seed=1, log=print) as a, ShardStream(local, 2, 16, seed=1, log=print) as b:
        for _ in range(25):
            torch.testing.assert_close(next(a), next(b), rtol=0, atol=0)
    assert remote.location("file:///tmp/x.zarr") == Path("/tmp/x.zarr")


def test_unknown_or_uninstalled_schemes_are_one_line_errors():
    with pytest.raises(
        UserError, match=r"^unknown storage scheme nosuch:// in nosuch://b/s.zarr; use a local"
    ):
        open_store("nosuch://b/s.zarr")
    with pytest.raises(UserError, match=r"^gs:// stores need a package that is not installed \(.*gcsfs"):
        open_store("gs://b/s.zarr")


@pytest.mark.slow  # a torchrun launch, a resume and two trainings: ~30 s on 2 loaded cores
def test_s3_harvest_killed_resumed_then_trained_from(s3, tiny_checkpoints, tmp_path):
    model = str(tiny_checkpoints["gemma3"])
    reference = harvest(HarvestConfig(model=model, out=str(tmp_path / "local.zarr"), **HARVEST))
    recipe = write_recipe(tmp_path / "h.toml", model=model, **HARVEST)
    driver = tmp_path / "crash.py"
    driver.write_text(CRASH_DRIVER)
    url = f"s3://{BUCKET}/l1.zarr"
    env = {**os.environ, **s3}
    cmd = ["harvest", "--config", str(recipe), "--out", url]

    # Two processes write the bucket; rank 1 dies right after committing its first shard (shard 1).
    killed = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node=2", str(driver), *cmd],
                            env={**env, "CRASH_RANK": "1", "CRASH_AFTER": "1"}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert killed.returncode != 0
    partial = open_store(url)
    marked = remote.list_names(url, f"{COMMITS}/train")
    assert not partial.complete
    assert partial.split("train").shards_committed > 1 or "00000001.json" in marked
    assert "00000003.json" not in marked and partial.split("train").shards_committed <= 3  # not shard 3

    # One process finishes what two started (from the shards committed and the markers in the bucket).

    done = subprocess.run([sys.executable, "-m", "atmpipe", *cmd], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr and url in done.stderr
    assert SECRET not in done.stdout + done.stderr + killed.stdout + killed.stderr
    assert object_files(url) == files(reference)  # the same objects, byte for byte, as on local disk

    # Training streams from the bucket exactly what it streams from the local copy.
    common = dict(method="relu", d_sae=64, batch_size=64, tokens=64 * 12, checkpoint_every=6, device="cpu")
    runs = [train(TrainConfig(store=store, out=str(tmp_path / name), **common))
            for store, name in ((url, "from-s3"), (str(reference), "from-disk"))]  # fmt: skip
    a, b = (load_file(str(run / "sae_weights.safetensors")) for run in runs)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
