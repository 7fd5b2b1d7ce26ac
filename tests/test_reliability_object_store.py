"""Harvest into and train from s3:// on a local S3 server (moto) with faults injected in front of it
(tests/object_store_faults.py: timeouts, 500 InternalError, 503 SlowDown, connection resets, PUTs that
land but whose answer is lost, GET bodies cut short), each retried by the bounded retries atmpipe
configures through fsspec (botocore's standard retry mode, s3fs's own retries; atmpipe has no retry loop):
the store is byte-identical to the one written to local disk without faults, and training from it ends
with the same weights. An outage that outlasts the retries stops the harvest, and the training, with one
line naming the fault; once it is over the same command (or --resume) ends with the same result.
"""

from __future__ import annotations

import json
import os
import re

import fsspec.config
import pytest
import s3fs
import torch
from object_store_faults import KINDS, Faults, FaultyS3
from reliability_helpers import files, tally
from safetensors.torch import load_file
from test_reliability_inputs import invoke

from atmpipe import remote
from atmpipe.harvest import HarvestConfig, harvest
from atmpipe.store import open_store

BUCKET = "atmpipe-faults"
SEED = 20261208
RATE = float(
    os.environ.get("ATMPIPE_FAULT_RATE", "0.03")
)  # `make reliability`: 0.1  # of the requests to the bucket
TIMEOUT_S = 0.5  # the client's read timeout in these tests (the injected timeouts answer after 1 s)
# What a user would write in ~/.config/fsspec/conf.json under "s3": tighter timeouts than atmpipe's defaults,
# so an injected timeout costs a second, and fewer botocore attempts, so an outage is given up in seconds
# (s3fs's own 5 retries of a SlowDown or a cut-short body stay).
USER_CONFIG = {
    "config_kwargs": {
        "retries": {"max_attempts": 3, "mode": "standard"},
        "read_timeout": TIMEOUT_S,
        "connect_timeout": TIMEOUT_S,
    },
}
HARVEST = dict(
    layers=[1],
    tokens=32 * 96,
    eval_tokens=32 * 8,
    context_size=32,
    batch_size=2,
    chunk_tokens=64,
    shard_tokens=128,
)  # fmt: skip  (24 train shards, 2 eval shards)
TRAIN = ["--method", "relu", "--d-sae", 64, "--batch-size", 64, "--tokens", 64 * 24, "--checkpoint-every", 4,
         "--device", "cpu", "--no-compile"]  # fmt: skip


def named(line: str) -> str:
    """The line, once its fault is checked to be the outage's 503 (a HEAD's has no body to name SlowDown),
    with the fault written as …"""
    fault = re.search(r" failed \((SlowDown \(HTTP 503\): Please reduce your request rate\.|HTTP 503: "
                      r"Service Unavailable)\) after its retries", line)  # fmt: skip
    assert fault, line
    return line.replace(fault.group(0), " failed (…) after its retries")


@pytest.fixture(scope="module")
def s3():
    """The faulty server, with AWS's standard variables pointing at it and the user's fsspec settings."""
    faults = Faults(SEED, 0.0, TIMEOUT_S + 0.5)
    server = FaultyS3(faults, BUCKET)
    env = {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "atmpipe-test", "AWS_SECRET_ACCESS_KEY": "secret",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec.config.conf.pop("s3", None)
    os.environ.update(env)
    fsspec.config.conf["s3"] = json.loads(json.dumps(USER_CONFIG))
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    try:
        yield faults
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        fsspec.config.conf.pop("s3", None)
        if saved_conf is not None:
            fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        print("faults injected:", dict(faults.counts))
        for kind, n in faults.counts.items():
            tally(f"object-store faults injected: {KINDS.get(kind, kind)}", n)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, tmp_path_factory):
    """The store harvested to local disk without faults, and the recipe that made it."""
    root = tmp_path_factory.mktemp("object-store-faults")
    recipe = root / "harvest.toml"
    recipe.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in HARVEST.items()))
    model = str(tiny_checkpoints["gemma3"])
    path = harvest(HarvestConfig(model=model, out=str(root / "local.zarr"), **HARVEST))
    train = root / "train.toml"
    train.write_text("buffer_chunks = 2\n")  # rounds of two chunks: the reads go on as training does
    return {
        "store": path,
        "harvest": ["harvest", "--model", model, "--config", recipe],
        "train": ["--config", train],
    }


def object_files(url: str) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    root = url.removeprefix("s3://")
    return {p.removeprefix(root + "/"): fs.cat_file(p) for p in sorted(fs.find(root))}


def one_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stderr.count("error:") == 1, result.stderr
    return result.stderr.strip().splitlines()[-1]


def weights(run) -> dict:
    return load_file(str(run / "sae_weights.safetensors"))


def assert_same_weights(a, b) -> None:
    for name, value in weights(a).items():
        assert torch.equal(value, weights(b)[name]), name


def test_retries_are_bounded_and_the_users_fsspec_settings_win(s3):
    remote.location(f"s3://{BUCKET}/x.zarr")  # installs atmpipe's defaults where the user said nothing
    assert fsspec.config.conf["s3"]["config_kwargs"]["read_timeout"] == TIMEOUT_S
    assert fsspec.config.conf["s3"]["config_kwargs"]["retries"]["mode"] == "standard"
    saved = fsspec.config.conf.pop("s3")
    try:
        remote.location(f"s3://{BUCKET}/x.zarr")
        assert fsspec.config.conf["s3"] == remote.S3_RETRIES  # bounded, when the user says nothing
    finally:
        fsspec.config.conf["s3"] = saved


def test_harvest_into_and_train_from_s3_through_faults_equal_local_disk(s3, reference, tmp_path):
    url = f"s3://{BUCKET}/faults.zarr"
    s3.rate, before = RATE, s3.injected
    result = invoke(*reference["harvest"], "--out", url)
    s3.rate = 0.0
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert object_files(url) == files(reference["store"])  # byte for byte, every object
    harvested = s3.injected - before
    s3.rate = RATE
    result = invoke("train", "--store", url, *TRAIN, *reference["train"], "--out", tmp_path / "from-s3")
    s3.rate = 0.0
    assert result.exit_code == 0, result.output
    assert (
        invoke(
            "train", "--store", reference["store"], *TRAIN, *reference["train"], "--out", tmp_path / "local"
        ).exit_code
        == 0
    )
    assert_same_weights(tmp_path / "from-s3", tmp_path / "local")
    print(f"faults injected: {harvested} while harvesting, {s3.injected - before - harvested} while training")
    assert harvested and s3.injected - before - harvested  # faults landed in both (`make reliability`: ~100)
    tally("object-store runs through injected faults, result identical to local disk", 2)


def test_an_outage_stops_harvest_and_training_in_one_line_and_they_resume_to_the_same_result(
    s3, reference, tmp_path
):
    url = f"s3://{BUCKET}/outage.zarr"
    s3.outage_after = s3.requests + 300  # the service goes down part-way through the harvest (~shard 10)
    line = one_line(invoke(*reference["harvest"], "--out", url))
    s3.outage_after = None
    assert named(line) == (
        f"error: the object store holding {url} failed (…) after its retries; the store keeps its committed "
        "shards: re-run the same command to resume"
    )
    store = open_store(url)
    assert not store.complete and 0 < store.split("train").shards_committed < 24
    result = invoke(*reference["harvest"], "--out", url)
    assert result.exit_code == 0 and "resuming" in result.output, result.output
    assert object_files(url) == files(reference["store"])

    out = tmp_path / "run"
    train = ["train", "--store", url, *TRAIN, *reference["train"], "--out", out]
    s3.outage_when = lambda: (out / "checkpoints").is_dir()  # down again, once training has checkpointed
    line = one_line(invoke(*train))
    s3.outage_when = lambda: False
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert named(line) == (
        f"error: the object store holding {url} failed (…) after its retries; the run keeps its last checkpoint "
        f"({checkpoints[-1]}): resume with: atmpipe train --store {url} --method relu --out {out} --resume"
    )
    assert not (out / "sae_weights.safetensors").exists()
    result = invoke("train", "--store", url, "--method", "relu", "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert (
        invoke(
            "train", "--store", reference["store"], *TRAIN, *reference["train"], "--out", tmp_path / "local"
        ).exit_code
        == 0
    )
    assert_same_weights(out, tmp_path / "local")
    tally("object-store outages that stopped a run in one line, then resumed to the same result", 2)
