"""Each option written once: the harvest, train and eval flags are generated from their config dataclasses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass

import typer
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.config import HarvestConfig, TrainConfig
from atmpipe.eval.config import EvalConfig
from atmpipe.options import add_command, help_text, option

# The flags atmpipe harvest and train had when they were written by hand: generating them keeps every one.
HAND_WRITTEN = {
    "harvest": "model layer dataset text_column tokens eval_tokens context_size batch_size seed dtype device "
    "storage_dtype out overwrite config trust_remote_code",
    "train": "store method config layer d_sae expansion lr batch_size tokens seed checkpoint_every "
    "out resume overwrite allow_partial skip_damaged no_compile latent_path precision device hparam",
    "eval": "sae store model layer metrics out config device dtype seed batch_size core_tokens splice_windows "
    "absorption_sample_words absorption_min_words_per_letter absorption_sample_seed absorption_icl absorption_f1_gate "
    "absorption_min_letters probing_tasks "
    "probing_train probing_test probing_context probing_data bias_occupations bias_people_per_cell bias_min_cell "
    "tpp_sets tpp_train tpp_test "
    "training_max_points",
}


def _params(command: str) -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params if p.name != "help"}


def test_no_option_is_declared_twice():
    """Each option has one home. A method's hyper-parameters (k, l1, target_l0, adam_beta1, ...) live in its
    Params alone, never also in TrainConfig (their flags are generated from the chosen method's Params); an
    eval metric's options are in its Options alone, not also the run's; two metrics share an option only
    through one declaration (a common base)."""
    from atmpipe.eval.config import RunOptions
    from atmpipe.eval.metrics import REGISTRY
    from atmpipe.sae import SAE_METHODS

    train = {f.name for f in dataclasses.fields(TrainConfig)}
    for method in SAE_METHODS.values():
        assert train & {f.name for f in dataclasses.fields(method.Params)} == set(), method.method
    run = {f.name for f in dataclasses.fields(RunOptions)}
    declared: dict[str, dataclasses.Field] = {}
    for metric in REGISTRY.values():
        for f in dataclasses.fields(metric.Options):
            assert f.name not in run, f"{metric.name}: {f.name}"
            assert declared.setdefault(f.name, f) is f, f"{metric.name}: {f.name} declared a second time"


def test_the_method_hyper_parameters_are_flags_of_train(tmp_path):
    """--k, --target-l0, ... are read from the chosen method's Params: typed by its field, recorded as an
    override, and given over the recipe's [hparams] and --hparam."""
    from atmpipe.train import load_train_config

    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "relu"\n[hparams]\nl1 = 2.0\ntarget_l0 = 8.0\n')
    flags = {"target_l0": "16", "l1_warmup_frac": "0"}
    cfg = load_train_config(recipe, hparams={"l1": 3, "target_l0": 12}, method_flags=flags, store="s")
    assert cfg.hparams == {"l1": 3, "target_l0": 16.0, "l1_warmup_frac": 0.0}
    assert type(cfg.hparams["target_l0"]) is float  # a float field: 16 is read as 16.0, as its flag was typed
    assert cfg.overrides == {"store": "s", "hparams": {"l1": 3, "target_l0": 16.0, "l1_warmup_frac": 0.0}}


def test_train_help_lists_every_method_and_its_hyper_parameters():
    from atmpipe.sae import SAE_METHODS

    text = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output.split())
    for name, method in SAE_METHODS.items():
        assert f"{name}: {', '.join(f.name for f in dataclasses.fields(method.Params))}" in text


def test_the_stage_flags_are_the_hand_written_ones_with_the_configs_help():
    for command, cls in (("harvest", HarvestConfig), ("train", TrainConfig), ("eval", EvalConfig)):
        params = _params(command)
        assert set(params) == set(HAND_WRITTEN[command].split())
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag", f.name)
            if f.metadata.get("help"):
                assert params[flag].help == help_text(f)
                # a flag not given leaves the recipe's value (--sae has no default: it is required)
                assert params[flag].default in (None, False) or params[flag].required
            else:
                assert flag not in params  # a recipe key only (e.g. shard_tokens, warmup_steps)


@dataclass
class Settings:
    name: str = option("a", "The name.")
    layers: list[int] = option(help="Layers (repeatable).", flag="layer", factory=list)
    fast: bool = option(False, "Go fast.")
    hidden: int = 3  # a recipe key only


def _invoke(*args: str) -> tuple[int, list]:
    seen = []
    demo = typer.Typer()
    add_command(demo, "go", Settings, lambda config, flags: seen.append((config, flags)), "Go.", "A recipe.")
    add_command(demo, "other", Settings, lambda config, flags: None, "Other.", "A recipe.")
    result = CliRunner().invoke(demo, ["go", *args])
    return result.exit_code, seen


def test_only_the_flags_given_override_the_recipe():
    assert _invoke() == (0, [(None, {"name": None, "layers": None, "fast": None})])
    code, seen = _invoke("--name", "b", "--layer", "1", "--layer", "2", "--fast", "--config", "r.toml")
    assert code == 0 and [str(p) for p in seen[0][0]] == ["r.toml"]
    assert seen[0][1] == {"name": "b", "layers": [1, 2], "fast": True}


def test_a_field_without_help_is_no_flag():
    code, seen = _invoke("--hidden", "4")
    assert code == 2 and seen == []


def test_building_the_command_line_imports_no_heavy_library():
    """Every flag comes from the configs, yet `atmpipe` starts without torch, pandas or transformers."""
    heavy = ("torch", "pandas", "sklearn", "transformers", "zarr", "matplotlib")
    code = f"import sys, atmpipe.cli; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_help_shows_each_default_from_the_field():
    """ "(default X)" is generated from the field's default, never written by hand beside it."""
    assert help_text(dataclasses.fields(Settings)[0]) == "The name. (default a)"
    params = _params("train")
    assert params["lr"].help == "Adam learning rate. (default 0.0003)"
    assert params["batch_size"].help == "Tokens per step. (default 4,096)"
    assert params["out"].help == "Run directory (default runs/<store>-<method>)."  # None: the help says it
    assert _params("harvest")["tokens"].help == "Training tokens to harvest. (default 100,000)"
    for cls in (HarvestConfig, TrainConfig, EvalConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("help") and f.default not in (None, False, dataclasses.MISSING):
                shown = f"{f.default:,}" if isinstance(f.default, int) else str(f.default)
                assert f"default {shown}" not in f.metadata["help"], f"{f.name}: its default written by hand"
