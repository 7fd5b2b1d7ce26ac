"""Integrity, bad input and safety: damaged stores found by `atmpipe verify`, stores refused for their
schema or layout, unwritable outputs, broken SAE files, real SIGINT/SIGKILL during GGUF conversion, crafted
attributes that try to steer writes, and no pickle / remote code anywhere.

Every CLI error here is checked the same way: exit code 2, one line on stderr, no traceback, and the
files that existed are unchanged (docs/errors.md lists them all).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from reliability_helpers import freeze, read_only_dir, tally, tree_digest
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.lock import lock_path
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


def test_unwritable_out_fails_before_any_work(tiny_checkpoints, sae_dir, tmp_path, monkeypatch):
    """harvest, train and eval probe --out first: the model, the store and the SAEs are never opened."""
    import atmpipe.eval.run
    import atmpipe.harvest
    import atmpipe.train

    def never(*args, **kwargs):
        raise AssertionError("heavy work started before --out was checked")

    monkeypatch.setattr(atmpipe.harvest, "load_lm", never)
    monkeypatch.setattr(atmpipe.train, "open_store", never)
    monkeypatch.setattr(atmpipe.eval.run, "load_saes", never)
    store = make_store(tmp_path / "s.zarr", n_train=512)
    (tmp_path / "notes.txt").write_text("the user's own file\n")
    before = [tree_digest(store.path), tree_digest(sae_dir), (tmp_path / "notes.txt").read_text()]
    harvest = ["harvest", "--model", tiny_checkpoints["gemma2"], "--tokens", 128, "--context-size", 32]
    train = ["train", "--store", store.path, "--method", "relu", "--d-sae", 64, "--device", "cpu"]
    evaluate = ["eval", "--sae", sae_dir, "--store", store.path, "--metrics", "core"]
    denied = "Read-only file system" if os.geteuid() == 0 else "Permission denied"  # see read_only_dir
    with read_only_dir(tmp_path / "ro") as ro:
        for out, reason in ((ro / "a" / "b", denied), (tmp_path / "notes.txt" / "out", "Not a directory")):
            assert error_of(invoke(*harvest, "--out", out)) == (
                f"cannot write to {out} ({reason}: {out}); pass an --out in a writable directory"
            )
            for argv in (train, evaluate):
                assert error_of(invoke(*argv, "--out", out)) == (
                    f"cannot write to {out} ({reason}); pass an --out in a writable directory"
                )
        assert not any(ro.iterdir())
    report = tmp_path / "notes.txt"  # eval writes a directory: an existing file is refused, untouched
    assert error_of(invoke(*evaluate, "--out", report)) == (
        f"cannot write to {report} (it is a file); pass an --out in a writable directory"
    )
    assert [tree_digest(store.path), tree_digest(sae_dir), report.read_text()] == before


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


def write_tiny_gguf(path: Path, n_layers: int = 2):
    """A real GGUF file (F32 tensors, a sentencepiece-style vocabulary, as llama.cpp writes Gemma 3) of a
    tiny random Gemma 3, which transformers reads like the embedded model; returns the model it holds."""
    import gguf
    from conftest import TINY_VOCAB, tiny_model

    model = tiny_model("gemma3", n_layers=n_layers)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(cfg.sliding_window)
    # <pad> <eos> <bos> <unk>, the 256 byte fallbacks, then pieces with falling scores
    pieces = ["▁", "▁the", "▁a", "▁of", "▁and", "▁to", *"etaoinsrhldcumfpgwybvk"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    tokens += [f"▁w{i}" for i in range(TINY_VOCAB - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 260 + [-float(i) for i in range(len(tokens) - 260)])
    writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * (len(tokens) - 260))  # control, unknown, byte
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layers)
    for name, weight in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding
            array = weight.numpy().astype(np.float32)
            # llama.cpp stores Gemma's norm weights as 1 + w; transformers subtracts the 1 again
            array = array + 1 if "norm" in name else array
            writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def converted_name(gguf: Path) -> str:
    import hashlib

    return f"{gguf.stem}-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:12]}"


def assert_loads_as(checkpoint: Path, reference) -> None:
    """The converted checkpoint loads with the GGUF's weights and tokenizer."""
    import torch

    from atmpipe.lm import load_lm

    lm = load_lm(str(checkpoint), device="cpu")
    state = lm.model.state_dict()
    for name, weight in reference.state_dict().items():
        assert torch.equal(state[name], weight), name
    ids = lm.tokenizer("the cat and the dog").input_ids
    assert ids[0] == lm.bos_token_id == 2 and len(ids) > 3


def test_next_conversion_removes_only_temp_directories_of_dead_processes(tiny_gguf, tmp_path, monkeypatch):
    """A SIGKILLed conversion leaves its temp directory; the next conversion of that model removes it, but
    never one whose process still runs (a concurrent conversion), nor another host's."""
    import socket
    import subprocess

    import atmpipe.lm as lm_module

    gguf, reference = tiny_gguf
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    models = tmp_path / "home" / "models"
    dest = models / converted_name(gguf)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID that existed and is gone
    host = socket.gethostname()
    stale = [
        models / f".{dest.name}.convert-{host}-{dead.pid}-a1b2",
        models / f".{dest.name}.gguf-{host}-{dead.pid}-c3",
    ]
    kept = [
        models / f".{dest.name}.convert-{host}-{os.getpid()}-live",
        models / f".{dest.name}.convert-elsewhere-{dead.pid}-x",
    ]
    for d in stale + kept:
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half written")
    other_model = models / f".other-0123456789ab.convert-{host}-{dead.pid}-z"
    other_model.mkdir()

    assert lm_module.gguf_checkpoint(gguf) == dest
    assert not any(d.exists() for d in stale)
    assert all((d / "model.safetensors").exists() for d in kept) and other_model.exists()
    assert sorted(p.name for p in models.iterdir()) == sorted(
        [dest.name, other_model.name, *(d.name for d in kept)]
    )
    assert_loads_as(dest, reference)
    tally("stale GGUF conversion temp directories removed")


def freeze_mid_conversion(zygote, argv, log: Path, home: Path):
    """Start `argv`; stop it (SIGSTOP) while its GGUF conversion is under way: temp directory present,
    converted model not yet in place. Returns (pid, temp dir), or None if it finished the conversion
    between two polls (the caller tries again)."""
    import signal
    import time

    models = home / "models"
    pid = zygote.start(argv, log, env={"ATMPIPE_HOME": str(home)})
    while zygote.poll(pid) is None:
        if models.exists() and list(models.glob(".*.convert-*")):
            freeze(pid)
            temps = list(models.glob(".*.convert-*"))
            if temps and not any(
                (p / "config.json").exists() for p in models.iterdir() if not p.name.startswith(".")
            ):
                return pid, temps[0]
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
    return None


@pytest.mark.slow  # a forked CLI parent plus three harvests: 13-29 s on 2 loaded cores
def test_real_sigint_and_sigkill_during_gguf_conversion(tiny_gguf, tmp_path, monkeypatch):
    """Real `atmpipe harvest --model tiny.gguf` processes, frozen mid-conversion, then sent SIGINT (one-line
    error, exit 130, nothing left behind) or SIGKILL (its temp directory stays, and a concurrent check leaves
    it while the process lives); a re-run removes the leftovers, converts, harvests and loads correctly."""
    import signal

    from reliability_helpers import Zygote

    import atmpipe.lm as lm_module

    gguf, reference = tiny_gguf
    home, out = tmp_path / "home", tmp_path / "s.zarr"
    models = home / "models"
    dest = models / converted_name(gguf)
    # The forked CLI runs must import this checkout, whatever `pip install -e` points the venv at.
    monkeypatch.setenv("PYTHONPATH", str(PACKAGE.parent))
    argv = ["harvest", "--model", gguf, "--tokens", 128, "--eval-tokens", 32, "--context-size", 32,
            "--out", out]  # fmt: skip
    zygote = Zygote()
    try:
        for sig in (signal.SIGINT, signal.SIGKILL):
            log = tmp_path / f"{sig.name}.log"
            for _attempt in range(5):
                frozen = freeze_mid_conversion(zygote, argv, log, home)
                if frozen:
                    break
                shutil.rmtree(home)  # it converted between two polls: again, from scratch
                shutil.rmtree(out, ignore_errors=True)
            assert frozen, "never caught the conversion under way"
            pid, temp = frozen
            assert f"-{pid}-" in temp.name
            lm_module.remove_stale_temps(dest)  # a live conversion's temp directory is never removed
            assert temp.is_dir()
            os.kill(pid, sig)
            os.kill(pid, signal.SIGCONT)
            code = zygote.wait(pid)
            assert not dest.exists() and not out.exists()  # no half-converted model, no store
            if sig == signal.SIGINT:
                assert code == 130, log.read_text()
                assert log.read_text().strip().splitlines()[-1] == (
                    "error: stopped by SIGINT; nothing committed is lost: re-run the same command to resume"
                )
                assert "Traceback" not in log.read_text()
                assert list(models.iterdir()) == []  # its temp directory went with it
            else:
                assert code == -signal.SIGKILL
                assert [p.name for p in models.iterdir()] == [temp.name]  # left behind by the kill
            tally("interrupted GGUF conversions left no model")
        log = tmp_path / "rerun.log"
        assert zygote.run(argv, log, env={"ATMPIPE_HOME": str(home)}) == 0, log.read_text()
    finally:
        zygote.close()
    assert [p.name for p in models.iterdir()] == [dest.name]  # converted, the killed run's temp removed
    assert_loads_as(dest, reference)
    assert json.loads((out / "zarr.json").read_text())["attributes"]["atmpipe"]["model"]["source"] == str(
        dest
    )


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
    # (and the write lock beside it, atmpipe.lock)
    assert created and all(p.is_relative_to(run) or p == lock_path(run) for p in created), created
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
