"""Stage one end to end: store contents vs direct capture, dtypes, BOS, crash-and-resume, bad inputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from atmpipe import harvest as harvest_module
from atmpipe.cli import app
from atmpipe.harvest import HarvestConfig, harvest
from atmpipe.lm import capture, load_lm
from atmpipe.store import open_store

runner = CliRunner()


def _cfg(checkpoint, out, **kw):
    base = dict(model=str(checkpoint), layers=[1], tokens=32 * 12, eval_tokens=32 * 3, context_size=32,
                batch_size=2, out=str(out), chunk_tokens=64, shard_tokens=128)  # fmt: skip
    return HarvestConfig(**{**base, **kw})


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_store_matches_direct_capture(tiny_checkpoints, tmp_path, arch):
    out = harvest(_cfg(tiny_checkpoints[arch], tmp_path / "s.zarr", layers=[2, 0]))
    store, lm = open_store(out), load_lm(str(tiny_checkpoints[arch]))
    assert store.layers == [0, 2] and store.complete
    for split, n_windows in (("train", 12), ("eval", 3)):
        s = store.split(split)
        tokens = s.tokens[:].reshape(n_windows, 32)
        assert s.n_tokens == n_windows * 32
        # Recompute batch by batch, as harvest does: the store must hold exactly these bits.
        for start in range(0, n_windows, 2):
            ids = torch.from_numpy(tokens[start : start + 2].astype(np.int64))
            ref = capture(lm, ids, [0, 2], early_stop=False)
            for layer in (0, 2):
                got = store.read_acts(split, layer, start * 32, (start + 2) * 32)
                np.testing.assert_array_equal(got, ref[layer].reshape(-1, 32).numpy())
        np.testing.assert_array_equal(s.positions[:], np.tile(np.arange(32), n_windows))
        bos = s.bos[:].reshape(n_windows, 32)
        assert bos[:, 0].all()  # every window starts with BOS
        np.testing.assert_array_equal(bos, tokens == lm.bos_token_id)
        assert bos[:, 1:].any() or split == "eval"  # document boundaries inside windows are marked too


def test_attributes_record_provenance(tiny_checkpoints, tmp_path):
    out = harvest(_cfg(tiny_checkpoints["gemma3"], tmp_path / "s.zarr", seed=5))
    a = open_store(out).attrs
    lm = load_lm(str(tiny_checkpoints["gemma3"]))
    assert a["schema_version"] == 1 and a["complete"] is True
    assert a["model"] == {"name": str(tiny_checkpoints["gemma3"]), "source": str(tiny_checkpoints["gemma3"]),
                          "config_hash": lm.config_hash, "n_layers": 4}  # fmt: skip
    assert a["layers"] == [1] and a["hook_names"] == {"1": "blocks.1.hook_resid_post"}
    assert a["d_model"] == 32 and a["dtype"] == "float32" and a["context_size"] == 32 and a["seed"] == 5
    assert a["tokenizer"]["bos_token_id"] == 2 and a["tokenizer"]["vocab_size"] == 300
    assert a["dataset"]["spec"] == "embedded" and len(a["dataset"]["eval_documents"]) >= 1
    assert a["splits"]["train"]["n_tokens"] == 384 and a["splits"]["train"]["shards_committed"] == 3
    s = a["stats"]["1"]
    acts = open_store(out).read_acts("train", 1).astype(np.float64)
    keep = ~open_store(out).split("train").bos[:]
    assert s["n"] == keep.sum()
    np.testing.assert_allclose(s["mean"], acts[keep].mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s["mean_norm"], np.linalg.norm(acts[keep], axis=1).mean(), rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtypes(tiny_checkpoints, tmp_path, dtype):
    ref = open_store(harvest(_cfg(tiny_checkpoints["gemma2"], tmp_path / "f32.zarr"))).read_acts("train", 1)
    store = open_store(harvest(_cfg(tiny_checkpoints["gemma2"], tmp_path / "x.zarr", storage_dtype=dtype)))
    want = torch.from_numpy(ref).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(store.read_acts("train", 1), want)
    assert store.attrs["dtype"] == dtype


def test_rerun_of_complete_store_is_a_no_op(tiny_checkpoints, tmp_path):
    cfg = _cfg(tiny_checkpoints["gemma3"], tmp_path / "s.zarr")
    harvest(cfg)
    before = _files(tmp_path / "s.zarr")
    harvest(cfg)
    assert _files(tmp_path / "s.zarr") == before


def _write_recipe(path: Path, **values) -> Path:
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()))
    return path


def test_harvest_records_its_recipe_beside_the_store_whose_bytes_it_leaves_alone(tiny_checkpoints, tmp_path):
    """Harvest records what ran, as train does (the recipe files in order, the flags given), beside the store:
    two harvests of one configuration, one from a recipe and flags and one from Python, write the same bytes."""
    ckpt = tiny_checkpoints["gemma3"]
    values = dict(layers=[1], tokens=32 * 12, eval_tokens=32 * 3, context_size=32, batch_size=2, chunk_tokens=64,
                  shard_tokens=128)  # fmt: skip
    recipe = _write_recipe(tmp_path / "h.toml", **values)
    a = tmp_path / "a.zarr"
    args = ["harvest", "--config", str(recipe), "--model", str(ckpt), "--out", str(a)]
    assert runner.invoke(app, args).exit_code == 0
    b = harvest(_cfg(ckpt, tmp_path / "b.zarr"))  # the same configuration
    assert _files(a) == _files(b)
    recorded = {"recipe": [str(recipe)], "overrides": {"model": str(ckpt), "out": str(a)}}
    assert json.loads((tmp_path / "a.zarr.recipe.json").read_text()) == recorded
    assert json.loads((tmp_path / "b.zarr.recipe.json").read_text()) == {"recipe": [], "overrides": {}}
    assert runner.invoke(app, [*args, "--seed", "0"]).exit_code == 0  # complete already: nothing runs
    assert json.loads((tmp_path / "a.zarr.recipe.json").read_text()) == recorded


def _harvest_cmd(checkpoint, out, recipe):
    return [sys.executable, "-m", "atmpipe", "harvest", "--model", str(checkpoint), "--out", str(out),
            "--config", str(recipe)]  # fmt: skip


def _committed(out: Path) -> int:
    try:
        attrs = json.loads((out / "zarr.json").read_text())["attributes"]["atmpipe"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0
    if attrs.get("creating"):  # the store's arrays are still being laid out: nothing committed yet
        return 0
    return attrs["splits"]["train"]["shards_committed"]


@pytest.mark.slow  # two processes plus one in-process run: ~1 min on 2 loaded cores
def test_sigkill_then_rerun_equals_uninterrupted_run(tiny_checkpoints, tmp_path):
    # 150 one-batch shards: long enough to kill part-way, tiny enough to stay fast.
    values = dict(layers=[1, 3], tokens=16 * 300, eval_tokens=16 * 20, context_size=16, batch_size=2,
                  chunk_tokens=32, shard_tokens=32)  # fmt: skip
    recipe = _write_recipe(tmp_path / "h.toml", **values)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    harvest(HarvestConfig(model=str(tiny_checkpoints["gemma2"]), out=str(full), **values))  # uninterrupted

    proc = subprocess.Popen(_harvest_cmd(tiny_checkpoints["gemma2"], part, recipe), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while _committed(part) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _committed(part)
    assert 5 <= killed_at < 150, f"the harvest was not killed part-way ({killed_at} shards committed)"
    assert not open_store(part).complete

    done = subprocess.run(_harvest_cmd(tiny_checkpoints["gemma2"], part, recipe), env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert _files(part) == _files(full)  # byte for byte, statistics included


def _invoke(*args):
    return runner.invoke(app, ["harvest", *map(str, args)])


def _assert_user_error(result, message):
    assert result.exit_code == 2, (result.exit_code, result.output)
    last = result.stderr.strip().splitlines()[-1]  # a progress bar may precede it
    assert last.startswith("error: ") and message in last, result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.output


def test_bad_inputs(tiny_checkpoints, tmp_path, monkeypatch):
    tiny = tiny_checkpoints["gemma3"]
    common = ["--tokens", 128, "--eval-tokens", 32, "--context-size", 32, "--batch-size", 2]
    _assert_user_error(_invoke("--model", "nonsense-model", *common), "unknown model 'nonsense-model'; pass")
    _assert_user_error(
        _invoke("--model", tiny, "--layer", 7, *common),
        "layer 7 is out of range: " + str(tiny) + " has 4 layers (0..3)",
    )
    _assert_user_error(_invoke("--model", tiny, "--context-size", 1), "context size must be at least 2")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "   "}))
    _assert_user_error(
        _invoke(
            "--model", tiny, "--dataset", tmp_path / "empty.jsonl", *common, "--out", tmp_path / "e.zarr"
        ),
        "has no text",
    )
    (tmp_path / "garbage.parquet").write_bytes(b"\x00\x01 not parquet")
    _assert_user_error(
        _invoke("--model", tiny, "--dataset", tmp_path / "garbage.parquet", *common),
        "cannot read the corpus at",
    )

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _assert_user_error(_invoke("--model", "gemma-2-2b", *common), "cannot reach the Hugging Face hub")


def test_store_with_another_configuration_is_refused(tiny_checkpoints, tmp_path):
    tiny, out = tiny_checkpoints["gemma3"], tmp_path / "s.zarr"
    common = [
        "--model",
        tiny,
        "--layer",
        1,
        "--tokens",
        128,
        "--eval-tokens",
        32,
        "--context-size",
        32,
        "--out",
        out,
    ]
    assert _invoke(*common, "--seed", 0).exit_code == 0
    before = _files(out)
    _assert_user_error(_invoke(*common, "--seed", 1), "another configuration (differs in: dataset, seed)")
    assert _files(out) == before  # nothing lost
    assert _invoke(*common, "--seed", 1, "--overwrite").exit_code == 0
    assert open_store(out).attrs["seed"] == 1


def test_not_enough_disk(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(harvest_module, "free_disk_bytes", lambda path: 1000)
    result = _invoke("--model", tiny_checkpoints["gemma3"], "--tokens", 128, "--eval-tokens", 32,
                     "--context-size", 32, "--out", tmp_path / "s.zarr")  # fmt: skip
    _assert_user_error(result, "not enough free disk for")
    assert not (tmp_path / "s.zarr").exists()


def test_non_finite_activations_say_where(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma2"])
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("inf")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_checkpoints["gemma2"]).save_pretrained(broken)
    common = ["--tokens", 128, "--eval-tokens", 32, "--context-size", 32, "--out", tmp_path / "s.zarr"]
    assert _invoke("--model", broken, "--layer", 1, *common).exit_code == 0  # before the damage: fine
    _assert_user_error(
        _invoke("--model", broken, "--layer", 2, *common, "--overwrite"),
        "non-finite activation (",
    )
    result = _invoke("--model", broken, "--layer", 2, *common, "--overwrite")
    assert "at layer 2, train window 0, position 0 (token id 2)" in result.stderr


def test_float16_out_of_range_is_refused(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma2"])
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)  # Gemma norms each block output: grow the stream itself
    big = tmp_path / "big"
    model.save_pretrained(big)
    AutoTokenizer.from_pretrained(tiny_checkpoints["gemma2"]).save_pretrained(big)
    result = _invoke("--model", big, "--layer", 0, "--tokens", 128, "--eval-tokens", 32, "--context-size", 32,
                     "--storage-dtype", "float16", "--out", tmp_path / "s.zarr")  # fmt: skip
    _assert_user_error(result, "activations of layer 0 reach")
    assert "beyond float16's range" in result.stderr and "bfloat16" in result.stderr


def test_info_command(tiny_checkpoints, tmp_path):
    out = harvest(_cfg(tiny_checkpoints["gemma3"], tmp_path / "s.zarr"))
    result = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("blocks.1.hook_resid_post", "384 tokens", "3/3 shards committed", "complete", "mean norm"):
        assert text in result.stdout
    missing = runner.invoke(app, ["info", str(tmp_path / "nope.zarr")])
    _assert_user_error(missing, "no activation store at")


@pytest.mark.slow
def test_real_embedded_model_end_to_end(tmp_path):
    """The real gemma-3-270m (converted once into $ATMPIPE_HOME) on the real embedded corpus."""
    out = harvest(HarvestConfig(tokens=384, eval_tokens=128, batch_size=3, out=str(tmp_path / "l9.zarr")))
    store = open_store(out)
    assert store.layers == [9] and store.d_model == 640 and store.complete
    assert store.attrs["model"]["name"] == "gemma-3-270m" and store.attrs["tokenizer"]["vocab_size"] == 262144
    train = store.read_acts("train", 9)
    assert train.shape == (384, 640) and np.isfinite(train).all()
    stats = store.stats(9)
    assert stats["n"] == (~store.split("train").bos[:]).sum() and 10 < stats["mean_norm"] < 1e5
    # The stored residual equals a fresh full forward's hidden_states[10] (same batch of windows).
    lm = load_lm()
    ids = torch.from_numpy(store.split("train").tokens[: 3 * 128].reshape(3, 128).astype(np.int64))
    with torch.inference_mode():
        ref = lm.model(ids, output_hidden_states=True).hidden_states[10]
    np.testing.assert_array_equal(train[: 3 * 128], ref.reshape(-1, 640).numpy())
    text = lm.tokenizer.decode(store.split("eval").tokens[1:40])
    assert sum(c.isalpha() for c in text) > 20  # real English text went in
