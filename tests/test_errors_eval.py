"""Every user error of the eval side (the docs/errors.md rows of atmpipe.eval and of loading saved SAEs),
triggered as a user would: through the CLI, on real stores, saved SAEs and tiny model checkpoints. Each
checks the whole message, exit code 2, one line on stderr, no traceback, and that nothing that existed
before changed (the train side: tests/test_errors_train.py, whose helpers these share).

The tests are tables (case id → what the user passes, the exact message), inside the test functions because
scripts/errors_table.py names a test for a message only when the test's own source holds it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from reliability_helpers import assert_message
from safetensors.torch import load_file, save_file
from test_errors_train import one_line_error
from test_reliability_inputs import LAYER, D, make_store

from atmpipe.errors import UserError
from atmpipe.eval.metrics import REGISTRY
from atmpipe.sae import SAEConfig, make_sae
from atmpipe.store import hook_name, write_arrays_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A complete 2048-token, d_model 16, layer 1 store (tests/test_reliability_inputs.py::make_store)."""
    return make_store(tmp_path_factory.mktemp("errors-eval") / "s.zarr")


# --- eval: SAE directories it cannot load ------------------------------------------------------------


def saved_sae(path: Path, *, d_in: int = D, layer: int = LAYER, model: str = "synthetic", method: str = "relu",
              store: Path | None = None) -> Path:  # fmt: skip
    """An SAE saved by the SAE class's own save(), as `atmpipe train` writes it."""
    torch.manual_seed(0)
    cfg = SAEConfig(method, d_in, 4 * d_in, {}, model_name=model, layer=layer, hook_name=hook_name(layer),
                    store={"path": str(store)} if store else {})  # fmt: skip
    return make_sae(cfg).save(path)


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def as_saelens(path: Path, **cfg_changes) -> Path:
    """The SAE as SAELens alone would save it (cfg.json + weights, no atmpipe.json)."""
    (path / "atmpipe.json").unlink()
    edit_json(path / "cfg.json", **cfg_changes)
    return path


def edit_tensors(file: Path, **changes: torch.Tensor | None) -> None:
    """Replace tensors of a safetensors file (None: drop it)."""
    tensors = {**load_file(file), **changes}
    save_file({k: v for k, v in tensors.items() if v is not None}, str(file))


@pytest.mark.parametrize(
    "case",
    [
        "saelens topk without k", "cfg.json not an object", "cfg.json not JSON", "d_in missing",
        "d_sae negative", "weights not safetensors", "atm statistics of another width",
        "layer not a number", "weights of another shape", "cfg.json missing", "weights missing",
        "atm statistics missing a tensor", "activations normalised", "weights missing a tensor",
    ],
)  # fmt: skip
def test_eval_refuses_an_sae_directory_it_cannot_load(tmp_path, monkeypatch, case):
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    sae = saved_sae(tmp_path / "sae", method="atm" if case.startswith("atm statistics") else "relu")
    cfg, weights = sae / "cfg.json", sae / "sae_weights.safetensors"
    break_it, expected = {
        "saelens topk without k": (
            lambda: as_saelens(sae, architecture="topk"),
            f"{cfg}: key 'k' is missing (a topk SAE needs it); add it to cfg.json",
        ),
        "cfg.json not an object": (
            lambda: cfg.write_text("[16, 64]"),
            f"{cfg} must hold a JSON object, found list; re-save the SAE",
        ),
        "cfg.json not JSON": (
            lambda: cfg.write_text('{"d_in": 16,'),
            f"{cfg} is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 13 "
            "(char 12)); re-save the SAE",
        ),
        "d_in missing": (lambda: edit_json(cfg, d_in=None), f"{cfg}: key 'd_in' is missing; re-save the SAE"),
        "d_sae negative": (
            lambda: edit_json(cfg, d_sae=-64),
            f"{cfg}: key 'd_sae' has invalid value -64 (expected a positive int); fix it",
        ),
        "weights not safetensors": (
            lambda: weights.write_bytes(b"<html>404 Not Found</html>"),
            re.compile(
                re.escape(f"{weights} is not a readable safetensors file (")
                + r".+"  # the safetensors library's own words
                + re.escape("); re-save the SAE")
            ),
        ),
        "atm statistics of another width": (
            lambda: edit_tensors(sae / "atm_stats.safetensors", M=torch.zeros(3)),
            f"{sae}/atm_stats.safetensors: tensor 'M' has shape [3], expected [64]; re-save",
        ),
        "layer not a number": (
            lambda: edit_json(sae / "atmpipe.json", layer="../1"),
            f"{sae}/atmpipe.json: key 'layer' has invalid value '../1' (expected a layer number); fix it",
        ),
        "weights of another shape": (
            lambda: edit_tensors(weights, W_enc=torch.zeros(64, D)),
            f"{weights}: tensor 'W_enc' has shape [64, 16], expected [16, 64] from cfg.json "
            "(d_in=16, d_sae=64); re-save the SAE",
        ),
        "cfg.json missing": (
            lambda: cfg.unlink(),
            f"{cfg} does not exist; pass a directory written by `atmpipe train` or SAELens",
        ),
        "weights missing": (
            lambda: weights.unlink(),
            f"{weights} does not exist; the SAE directory is incomplete, re-save it",
        ),
        "atm statistics missing a tensor": (
            lambda: edit_tensors(sae / "atm_stats.safetensors", theta=None),
            f"{sae}/atm_stats.safetensors: missing tensor 'theta'; re-save the SAE",
        ),
        "activations normalised": (  # SAELens can save SAEs that scale their input at run time
            lambda: edit_json(cfg, normalize_activations="expected_average_only_in"),
            f"{cfg}: normalize_activations='expected_average_only_in' is not supported; "
            "fold the activation scaling into the weights and set it to 'none'",
        ),
        "weights missing a tensor": (
            lambda: edit_tensors(weights, W_dec=None),
            f"{weights}: missing tensor 'W_dec' (a standard SAE needs W_enc, b_enc, W_dec, b_dec); "
            "re-save the SAE",
        ),
    }[case]
    break_it()
    message = one_line_error(tmp_path, "eval", "--sae", sae, "--out", tmp_path / "report", "--device", "cpu")
    assert_message(message, expected)
    assert not (tmp_path / "report").exists()


# --- eval: options, and SAEs that do not fit each other or the store ---------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "unknown metric",
        "bias occupations",
        "unknown TPP set",
        "core without a store",
        "labelled data not installed",
        "SAE directory missing",
        "labelled data of another layout",
    ],
)
def test_eval_refuses_options_it_cannot_use(store, tmp_path, monkeypatch, case):
    """Options, or the data they name, that the eval cannot use."""
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    a = ["--sae", tmp_path / "a"]  # a relu SAE of the store's layer and width (saved below)

    def labelled_data() -> Path:
        (tmp_path / "data").mkdir()
        csv = b"text,label\nA wonderful film.,1\nDull and long.,0\n"
        (tmp_path / "data" / "92_glue_sst2.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(csv))
        return tmp_path / "data"

    args, expected = {  # args: a function, so each case builds only its own inputs
        "unknown metric": (
            lambda: [*a, "--metrics", "core,speed"],
            "unknown metric speed; known metrics: " + ", ".join(REGISTRY),  # core, absorption, … in order
        ),
        "bias occupations": (
            lambda: [*a, "--metrics", "bias", "--bias-occupations", "doctor"],
            "--bias-occupations needs 'all' or two of journalist, athlete, actor, politician, singer, "
            "researcher, got 'doctor'",
        ),
        "unknown TPP set": (
            lambda: [*a, "--metrics", "tpp", "--tpp-sets", "news_class,ag_news"],
            "unknown TPP set ag_news; known: news_class, tweet_emotion, science_category, athlete_sport, art_type",
        ),
        "core without a store": (
            lambda: [*a, "--metrics", "core"],
            "metric 'core' needs the activation store the SAEs were trained on; pass --store PATH",
        ),
        "labelled data not installed": (
            lambda: [*a, "--metrics", "probing"],
            "the labelled datasets (sae-probes==0.4.2) are not installed; run `make setup`",
        ),
        "SAE directory missing": (
            lambda: ["--sae", tmp_path / "a-typo", "--metrics", "probing"],
            f"SAE directory {tmp_path / 'a-typo'} does not exist; pass a directory written by `atmpipe train`",
        ),
        "labelled data of another layout": (  # a --probing-data file with other columns than sae-probes'
            lambda: [
                *a,
                "--metrics",
                "probing",
                "--probing-tasks",
                "sst2",
                "--probing-data",
                labelled_data(),
            ],
            f"labelled dataset {tmp_path / 'data' / '92_glue_sst2.csv.zst'} lacks column(s) prompt, target; "
            "expected prompt, target",
        ),
    }[case]
    saved_sae(tmp_path / "a")
    if case == "labelled data not installed":  # they are installed here: hide the package, nothing more
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "sae_probes" else find_spec(name, *rest))  # fmt: skip
    assert eval_error(tmp_path, args()) == expected


@pytest.mark.parametrize(
    "case",
    [
        "SAEs of different layers",
        "--layer of another layer",
        "store without the SAE's layer",
        "store of another width",
        "store of another model",
        "SAE without a layer",
        "SAE without a model",
    ],
)
def test_eval_refuses_saes_that_do_not_fit(store, tmp_path, monkeypatch, case):
    """SAEs that do not fit each other, the store or the flags."""
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    a = ["--sae", tmp_path / "a"]  # a relu SAE of the store's layer and width (saved below)
    other_model = tmp_path / "g2.zarr"
    args, expected = {  # args: a function, so each case builds only its own inputs
        "SAEs of different layers": (
            lambda: [*a, "--sae", saved_sae(tmp_path / "b", layer=5), "--metrics", "probing"],
            "the SAEs were trained on different layers (a: 1, b: 5); "
            "evaluate SAEs of one model and layer together",
        ),
        "--layer of another layer": (
            lambda: [*a, "--layer", "3", "--metrics", "probing"],
            "SAE a was trained on layer 1, but --layer 3 was given; evaluate it on its own layer or drop --layer",
        ),
        "store without the SAE's layer": (
            lambda: [
                "--sae",
                saved_sae(tmp_path / "l5", layer=5),
                "--store",
                store.path,
                "--metrics",
                "core",
            ],
            f"store {store.path} holds layers [1], not layer 5 of the SAEs; "
            "pass the store the SAEs were trained on (--store)",
        ),
        "store of another width": (
            lambda: [
                "--sae",
                saved_sae(tmp_path / "wide", d_in=32),
                "--store",
                store.path,
                "--metrics",
                "core",
            ],
            f"SAE wide has width d_in=32 but store {store.path} has d_model=16; "
            "pass the store the SAE was trained on (--store)",
        ),
        "store of another model": (
            lambda: [
                "--sae",
                saved_sae(tmp_path / "g3", model="gemma-3-270m"),
                "--store",
                other_model,
                "--metrics",
                "core",
            ],
            f"SAE g3 was trained on model gemma-3-270m but store {other_model} holds gemma-2-2b; "
            "pass the matching --store",
        ),  # fmt: skip
        "SAE without a layer": (
            lambda: [
                "--sae",
                as_saelens(saved_sae(tmp_path / "hf"), metadata={"hook_name": "model.layers.resid"}),
                "--metrics",
                "absorption",
            ],
            "the SAEs do not record their layer; pass --layer",
        ),  # fmt: skip
        "SAE without a model": (
            lambda: [
                "--sae",
                as_saelens(saved_sae(tmp_path / "hf"), metadata={"hook_name": hook_name(LAYER)}),
                "--metrics",
                "absorption",
            ],
            "the SAEs do not record their model; pass --model",
        ),  # fmt: skip
    }[case]
    saved_sae(tmp_path / "a")
    if case == "store of another model":
        shutil.copytree(store.path, other_model)
        group = json.loads((other_model / "zarr.json").read_text())
        group["attributes"]["atmpipe"]["model"]["name"] = "gemma-2-2b"
        (other_model / "zarr.json").write_text(json.dumps(group))
    assert eval_error(tmp_path, args()) == expected


def eval_error(tmp_path: Path, args: list) -> str:
    """`atmpipe eval ARGS`'s one-line error; the report it would have written is not there."""
    message = one_line_error(tmp_path, "eval", *args, "--out", tmp_path / "report", "--device", "cpu")
    assert not (tmp_path / "report").exists()
    return message


def test_eval_needs_an_sae():
    # Not reachable through the CLI: `atmpipe eval` declares --sae required, so click refuses a command
    # without it. Library callers of load_saes / run_eval meet this one.
    from atmpipe.eval.run import load_saes

    with pytest.raises(UserError) as e:
        load_saes([])
    assert str(e.value) == "no SAE given; pass --sae DIR (one or more times)"


# --- eval: a model the SAEs or the store do not fit --------------------------------------------------


def model_store(
    path: Path, *, eval_tokens: int = 512, config_hash: str = "synthetic", model: str = "synthetic"
):
    """A 32-wide layer-1 store (the tiny models' width); the model attributes name what harvested it."""
    acts = np.random.default_rng(0).normal(size=(512, 32)).astype(np.float32)
    attrs = {"model": {"name": model, "source": model, "config_hash": config_hash, "n_layers": 4}}
    return write_arrays_store(path, {"train": {"acts": acts}, "eval": {"acts": acts[:eval_tokens]}},
                              layer=LAYER, chunk_tokens=64, attrs_extra=attrs).path  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["store too short for a window", "store of another model", "layer past the model", "SAE too narrow"],
)
def test_eval_refuses_a_model_the_saes_or_store_do_not_fit(tiny_checkpoints, tmp_path, monkeypatch, case):
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    model = str(tiny_checkpoints["gemma3"])  # 4 layers, d_model 32
    s = tmp_path / "s.zarr"
    args, expected = {
        "store too short for a window": (  # 100 eval tokens, windows of 128
            lambda: [
                "--sae",
                saved_sae(tmp_path / "a", d_in=32, model=model),
                "--store",
                model_store(s, eval_tokens=100),
                "--metrics",
                "core",
            ],
            "store eval split holds fewer than 128 tokens: no window for the downstream loss; "
            "harvest more eval documents or drop 'core'",
        ),  # fmt: skip
        "store of another model": (  # same name, other weights: the config hash differs
            lambda: [
                "--sae",
                saved_sae(tmp_path / "a", d_in=32, model=model),
                "--store",
                model_store(s, config_hash="0123456789abcdef", model=model),
                "--metrics",
                "core",
            ],
            f"model {model} ({model}) is not the model store {s} was harvested with (config hash differs); "
            "pass the store's --model",
        ),  # fmt: skip
        "layer past the model": (
            lambda: [
                "--sae",
                saved_sae(tmp_path / "a", d_in=32, layer=7, model=model),
                "--metrics",
                "absorption",
            ],
            f"layer 7 is out of range for {model} (4 layers); pass --layer",
        ),
        "SAE too narrow": (
            lambda: ["--sae", saved_sae(tmp_path / "a", d_in=16, model=model), "--metrics", "absorption"],
            f"SAE a has width d_in=16 but model {model} has d_model=32; "
            "evaluate it with the model it was trained on",
        ),
    }[case]
    message = one_line_error(tmp_path, "eval", *args(), "--out", tmp_path / "report", "--device", "cpu")
    assert message == expected
    assert not (tmp_path / "report").exists()
