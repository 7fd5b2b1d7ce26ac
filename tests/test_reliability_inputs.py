"""Integrity, bad input and safety: damaged stores found by `atmpipe verify`, stores refused for their
schema or layout, unwritable outputs, broken SAE files, a Ctrl-C during GGUF conversion, crafted
attributes that try to steer writes, and no pickle / remote code anywhere.

Every CLI error here is checked the same way: exit code 2, one line on stderr, no traceback, and the
files that existed are unchanged (docs/errors.md lists them all).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from reliability_helpers import read_only_dir, tally, tree_digest
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.store import acts_name, write_arrays_store

PACKAGE = Path(__file__).resolve().parents[1] / "atmpipe"
LAYER, D = 1, 16


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


def error_of(result) -> str:
    """The one-line error of a failed command (exit 2, nothing else on stderr but progress, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stderr.count("error:") == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    tally("bad inputs tested through the CLI (exit 2, one line, nothing changed)")
    return line.removeprefix("error: ")


def make_store(path: Path, n_train: int = 2048, seed: int = 0):
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in (("train", n_train), ("eval", 512)):
        splits[name] = {
            "acts": rng.normal(size=(n, D)).astype(np.float32),
            "tokens": rng.integers(1, 300, n),
            "positions": np.arange(n) % 64,
            "bos": np.arange(n) % 64 == 0,
        }
    return write_arrays_store(path, splits, layer=LAYER, chunk_tokens=128, shard_tokens=512)


def inner_chunk_span(shard_file: Path, chunks_per_shard: int, index: int) -> tuple[int, int]:
    """(offset, nbytes) of one inner chunk in a shard file (the index sits at the end, then its crc32c)."""
    raw = shard_file.read_bytes()
    table = np.frombuffer(raw[-(16 * chunks_per_shard + 4) : -4], "<u8").reshape(chunks_per_shard, 2)
    return int(table[index][0]), int(table[index][1])


def flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def set_attrs(store_path: Path, **changes) -> None:
    meta = json.loads((store_path / "zarr.json").read_text())
    meta["attributes"]["atmpipe"].update(changes)
    (store_path / "zarr.json").write_text(json.dumps(meta))


# --- integrity ------------------------------------------------------------------------------------


def test_verify_names_every_injected_corruption_and_training_refuses(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    assert invoke("verify", store.path).exit_code == 0
    acts = store.path / "train" / acts_name(LAYER) / "c"
    offset, nbytes = inner_chunk_span(acts / "0" / "0", 4, 1)
    injected = {  # what is done → the line verify must print for it
        "bit flip in an activation chunk": (
            lambda: flip_byte(acts / "0" / "0", offset + nbytes // 2),
            "train/acts_l1 chunk 1 (tokens 128-255): ",
        ),
        "activation shard file deleted": (
            lambda: (acts / "2" / "0").unlink(),
            "train/acts_l1 chunk 8 (tokens 1024-1151): shard file missing",
        ),
        "NaN written into activations": (
            lambda: zarr.open_group(store.path, mode="r+")["train"][acts_name(LAYER)].__setitem__(
                slice(1600, 1603), np.nan
            ),
            "train/acts_l1 chunk 12 (tokens 1536-1663): 3 rows hold non-finite activations",
        ),
        "shard file truncated": (
            lambda: (p := store.path / "eval" / acts_name(LAYER) / "c" / "0" / "0").write_bytes(
                p.read_bytes()[:-40]
            ),
            "eval/acts_l1 chunk 0 (tokens 0-127): ",
        ),
        "bit flip in a token chunk": (
            lambda: flip_byte(store.path / "train" / "tokens" / "c" / "1", 20),
            "train/tokens chunk 4 (tokens 512-639): ",
        ),
    }
    for damage, _ in injected.values():
        damage()
    result = invoke("verify", store.path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [
        line.removeprefix("damaged: ") for line in result.stderr.splitlines() if line.startswith("damaged: ")
    ]
    for what, (_, expected) in injected.items():
        assert any(line.startswith(expected) for line in lines), (what, lines)
    # Nothing is reported twice, nothing else is (a missing shard is each of its chunks; a truncated
    # shard loses its index, so each of its chunks fails).
    allowed = [e for _, e in injected.values()] + ["eval/acts_l1 chunk "]
    allowed += [
        f"train/acts_l1 chunk {c} (tokens {c * 128}-{c * 128 + 127}): shard file missing" for c in (9, 10, 11)
    ]
    assert len(lines) == len(set(lines)) and all(line.startswith(tuple(allowed)) for line in lines), lines
    assert re.search(r"\d+ chunks checked, \d+ damaged", result.stderr)
    tally("corruptions injected", len(injected))
    tally(
        "corruptions detected", sum(any(line.startswith(e) for line in lines) for _, e in injected.values())
    )
    # Training refuses the store (the missing shard is named) and changes nothing.
    before = tree_digest(store.path)
    message = error_of(invoke("train", "--store", store.path, "--out", tmp_path / "run", "--device", "cpu"))
    assert message == (
        f"store {store.path} is damaged: train/acts_l1 shard 2 (tokens 1024-1535) is missing; re-harvest it "
        f"(`atmpipe verify {store.path}` lists every damaged chunk)"
    )
    assert tree_digest(store.path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (
            2,
            "was written by a newer atmpipe (schema version 2; this one reads 1); upgrade atmpipe to read it",
        ),
        (0, "has the old schema version 0, which this atmpipe (schema 1) does not read; re-harvest it with "),
    ],
)
@pytest.mark.parametrize("command", ["info", "verify", "train"])
def test_other_schema_versions_are_refused(tmp_path, version, expected, command):
    store = make_store(tmp_path / "s.zarr", n_train=512)
    set_attrs(store.path, schema_version=version)
    before = tree_digest(store.path)
    args = [command, store.path] if command != "train" else ["train", "--store", store.path]
    assert error_of(invoke(*args)).startswith(f"store {store.path} {expected}")
    assert tree_digest(store.path) == before


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            "array shape",
            "train/acts_l1 has shape (999, 16), dtype float32, chunks (128, 16), shards (512, 16), "
            "the attributes say shape (2048, 16)",
        ),  # fmt: skip
        ("n_tokens attribute", "split train has contradictory sizes"),
        (
            "d_model attribute",
            "train/acts_l1 has shape (2048, 16), dtype float32, chunks (128, 16), shards (512, 16), "
            "the attributes say shape (2048, 32)",
        ),  # fmt: skip
        ("array deleted", "array eval/bos is missing"),
    ],
)
def test_store_whose_arrays_disagree_with_its_attributes(tmp_path, edit, expected):
    store = make_store(tmp_path / "s.zarr")
    if edit == "array shape":
        meta_file = store.path / "train" / acts_name(LAYER) / "zarr.json"
        meta = json.loads(meta_file.read_text())
        meta["shape"] = [999, D]
        meta_file.write_text(json.dumps(meta))
    elif edit == "n_tokens attribute":
        splits = store.attrs["splits"]
        splits["train"]["n_tokens"] = 9999
        set_attrs(store.path, splits=splits)
    elif edit == "d_model attribute":
        set_attrs(store.path, d_model=32)
    else:
        shutil.rmtree(store.path / "eval" / "bos")
    before = tree_digest(store.path)
    for args in (["info", store.path], ["verify", store.path], ["train", "--store", store.path]):
        message = error_of(invoke(*args))
        assert message.startswith(f"store {store.path} is inconsistent: {expected}"), message
        assert message.endswith("it is damaged or was edited: re-harvest it")
    assert tree_digest(store.path) == before


# --- unwritable and full outputs ------------------------------------------------------------------


def test_read_only_output_directory(tiny_checkpoints, tmp_path):
    store = make_store(tmp_path / "s.zarr", n_train=1024)
    with read_only_dir(tmp_path / "ro") as ro:
        out = ro / "s.zarr"
        message = error_of(invoke("harvest", "--model", tiny_checkpoints["gemma2"], "--tokens", 128,
                                  "--eval-tokens", 32, "--context-size", 32, "--out", out))  # fmt: skip
        assert message.startswith(f"cannot write to {out} (")
        assert message.endswith("; pass an --out in a writable directory")
        run = ro / "run"
        message = error_of(invoke("train", "--store", store.path, "--method", "relu", "--d-sae", 64,
                                  "--batch-size", 64, "--tokens", 640, "--device", "cpu", "--out", run))  # fmt: skip
        assert message.startswith(f"cannot write to {run} (") and message.endswith("writable directory")
        assert not any(ro.iterdir())


# --- SAE files ------------------------------------------------------------------------------------


@pytest.fixture
def sae_dir(tmp_path):
    import torch

    from atmpipe.sae import SAEConfig, make_sae

    torch.manual_seed(0)
    sae = make_sae(
        SAEConfig(
            "relu", D, 64, {}, model_name="synthetic", layer=LAYER, hook_name="blocks.1.hook_resid_post"
        )
    )
    return sae.save(tmp_path / "sae", {})


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("cfg.json", "cfg.json"),
        ("sae_weights.safetensors", "sae_weights.safetensors"),
        ("atmpipe.json layer", "atmpipe.json"),
    ],
)
def test_corrupted_sae_files_are_refused_by_eval(sae_dir, tmp_path, broken, expected):
    store = make_store(tmp_path / "s.zarr", n_train=512)
    if broken == "cfg.json":
        (sae_dir / "cfg.json").write_text('{"architecture": "standard", "d_in": 16,')  # cut short
    elif broken == "sae_weights.safetensors":
        weights = sae_dir / "sae_weights.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # a crafted layer that would name a cache directory outside $ATMPIPE_HOME
        meta = json.loads((sae_dir / "atmpipe.json").read_text())
        meta["layer"] = "../../../escape"
        (sae_dir / "atmpipe.json").write_text(json.dumps(meta))
    before = tree_digest(sae_dir)
    message = error_of(invoke("eval", "--sae", sae_dir, "--store", store.path, "--metrics", "core",
                              "--out", tmp_path / "report"))  # fmt: skip
    assert str(sae_dir) in message and expected in message, message
    assert tree_digest(sae_dir) == before and not (tmp_path / "report").exists()


# --- GGUF conversion interrupted -----------------------------------------------------------------


def test_ctrl_c_during_gguf_conversion_leaves_no_model(tiny_checkpoints, tmp_path, monkeypatch):
    """A KeyboardInterrupt (what Ctrl-C and the harvest's signal handler raise) in the middle of writing the
    converted checkpoint: no model directory appears, no temp directory stays, and the next run converts."""
    import transformers

    import atmpipe.lm as lm_module

    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in: the loaders below are patched")
    real_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma2"])
    real_tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoints["gemma2"])
    monkeypatch.setattr(lm_module.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok)
    monkeypatch.setattr(lm_module.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: real_model)
    save = type(real_model).save_pretrained

    def interrupted_save(self, path, **kw):
        save(self, path, **kw)  # the weights are on disk, the tokenizer is not yet: then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(type(real_model), "save_pretrained", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        lm_module.gguf_checkpoint(gguf)
    models = tmp_path / "home" / "models"
    assert list(models.iterdir()) == []  # neither a half-converted model nor its temp directory
    monkeypatch.setattr(type(real_model), "save_pretrained", save)
    converted = lm_module.gguf_checkpoint(gguf)
    assert (converted / "config.json").is_file() and (converted / "tokenizer.json").is_file()
    assert [p.name for p in models.iterdir()] == [converted.name]
    tally("interrupted GGUF conversions left no model")


# --- crafted attributes ---------------------------------------------------------------------------


def test_store_attributes_never_steer_writes_outside_the_output(tmp_path, monkeypatch):
    """Provenance strings that look like paths are only ever recorded; layer numbers must be numbers."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    store = make_store(work / "s.zarr")
    escape = str(tmp_path / "escaped")
    set_attrs(
        store.path,
        model={"name": escape, "source": escape, "config_hash": "../../x", "n_layers": 2},
        tokenizer={"name_or_path": escape, "bos_token_id": 0, "vocab_size": 0},
        dataset={"spec": escape, "text_column": "../x", "n_documents": 0, "eval_documents": []},
        hook_names={str(LAYER): f"../../{escape}"},
    )
    before = sorted(p for p in tmp_path.rglob("*"))
    run = work / "run"
    result = invoke("train", "--store", store.path, "--method", "relu", "--d-sae", 64, "--batch-size", 64,
                    "--tokens", 640, "--device", "cpu", "--out", run)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert invoke("verify", store.path).exit_code == 0 and invoke("info", store.path).exit_code == 0
    created = [p for p in tmp_path.rglob("*") if p not in before]
    assert created and all(p.is_relative_to(run) for p in created), created
    assert not Path(escape).exists()
    # Layer numbers name arrays (and files): anything else is refused before it is used.
    set_attrs(store.path, layers=["../../escaped"])
    message = error_of(invoke("train", "--store", store.path, "--out", work / "run2"))
    assert message.startswith(f"store {store.path} is inconsistent: attribute layers is ['../../escaped']")
    assert not Path(escape).exists() and not (work / "run2").exists()


# --- no pickle, no remote code --------------------------------------------------------------------


def test_no_pickle_anywhere_in_the_package():
    offences = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(file.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\b(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", code):
                offences.append(f"{file.name}:{n}: {line.strip()}")
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                offences.append(f"{file.name}:{n}: {line.strip()}")
            if re.search(r"allow_pickle\s*=\s*True|trust_remote_code\s*=\s*True", code):
                offences.append(f"{file.name}:{n}: {line.strip()}")
    assert not offences, offences
    tally("safety checks (no pickle, no remote code by default, no writes outside --out)")


def test_trust_remote_code_is_off_unless_the_risk_flag_is_passed(tiny_checkpoints, tmp_path, monkeypatch):
    import atmpipe.lm as lm_module
    from atmpipe.harvest import HarvestConfig

    assert HarvestConfig().trust_remote_code is False
    seen = []
    real = lm_module.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_module.AutoModelForCausalLM, "from_pretrained", recording)
    common = ["harvest", "--model", tiny_checkpoints["gemma2"], "--tokens", 64, "--eval-tokens", 32,
              "--context-size", 32, "--batch-size", 2]  # fmt: skip
    assert invoke(*common, "--out", tmp_path / "a.zarr").exit_code == 0
    assert invoke(*common, "--out", tmp_path / "b.zarr", "--trust-remote-code").exit_code == 0
    assert seen == [False, True]
    assert "RISK: runs Python code from the model's repository" in " ".join(
        invoke("harvest", "--help").output.split()
    )
