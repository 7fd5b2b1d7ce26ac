"""The eval stage: splice on a tiny random Gemma, bad inputs through the CLI, and an end-to-end report."""

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from atmpipe.cli import app
from atmpipe.eval.compute.core import baseline_losses, downstream_scores, spliced_losses
from atmpipe.sae import SAEConfig, make_sae
from atmpipe.store import write_arrays_store

runner = CliRunner()


class ScaledIdentity(torch.nn.Module):
    """encode = x, decode = scale · f: scale 1 reconstructs perfectly, scale 0 is zero ablation."""

    def __init__(self, d, scale):
        super().__init__()
        self.W_dec, self.scale = scale * torch.eye(d), scale

    def encode(self, x):
        return x

    def decode(self, f):
        return self.scale * f


def test_splice_perfect_reconstruction_and_zero_ablation(tiny_checkpoints):
    from atmpipe.lm import load_lm

    lm = load_lm(str(tiny_checkpoints["gemma3"]), device="cpu")
    torch.manual_seed(0)
    windows = torch.randint(4, 300, (3, 12))
    windows[:, 0] = lm.bos_token_id
    special = [lm.bos_token_id]
    base = baseline_losses(lm, 1, windows, special)
    # Slow reference for the clean CE: the model's own logits and F.cross_entropy.
    with torch.no_grad():
        logits = lm.model(input_ids=windows).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert base["ce_clean"] == pytest.approx(float(ref), rel=1e-5)
    assert base["ce_zero"] != pytest.approx(base["ce_clean"], rel=1e-3)  # zeroing the layer matters

    perfect = spliced_losses(lm, 1, windows, special, ScaledIdentity(lm.d_model, 1.0))
    assert perfect["ce_sae"] == pytest.approx(base["ce_clean"], rel=1e-5)
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    zeros = spliced_losses(lm, 1, windows, special, ScaledIdentity(lm.d_model, 0.0))
    assert zeros["ce_sae"] == pytest.approx(base["ce_zero"], rel=1e-6)
    assert zeros["kl_sae"] == pytest.approx(base["kl_zero"], rel=1e-6)
    assert downstream_scores(base, perfect)["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert downstream_scores(base, zeros)["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


# --- bad inputs: one line on stderr, exit code 2 ------------------------------------------------------


def save_sae(path, d_in=16, layer=2, model="synthetic", store=None, method="relu"):
    torch.manual_seed(0)
    cfg = SAEConfig(
        method,
        d_in,
        4 * d_in,
        {},
        model_name=model,
        layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post",
        store=store or {},
    )
    make_sae(cfg).save(path)
    return path


@pytest.fixture
def synthetic_store(tmp_path):
    rng = np.random.default_rng(0)
    acts = {s: rng.standard_normal((512, 16)).astype(np.float32) for s in ("train", "eval")}
    return write_arrays_store(
        tmp_path / "l2.zarr",
        {s: {"acts": a} for s, a in acts.items()},
        layer=2,
        chunk_tokens=128,
        shard_tokens=256,
    )


def run_cli(*args):
    result = runner.invoke(app, ["eval", *args])
    return result.exit_code, result.stderr if hasattr(result, "stderr") else result.output


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    text = " ".join(lines)
    assert text.startswith("error:") and "Traceback" not in err
    for f in fragments:
        assert f in text, text


def test_missing_sae_directory(tmp_path):
    assert_one_line_error(*run_cli("--sae", str(tmp_path / "nope")), "nope", "does not exist")


def test_malformed_sae_names_file_and_key(tmp_path):
    path = save_sae(tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["d_in"]
    (path / "cfg.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_cli("--sae", str(path)), "cfg.json", "d_in")


def test_unknown_metric_lists_known(tmp_path):
    path = save_sae(tmp_path / "sae")
    assert_one_line_error(
        *run_cli("--sae", str(path), "--metrics", "core,absorbtion"),
        "absorbtion",
        "core, absorption, probing, bias",
    )


def test_width_and_layer_mismatch(tmp_path, synthetic_store):
    wide = save_sae(tmp_path / "wide", d_in=32)
    assert_one_line_error(
        *run_cli("--sae", str(wide), "--store", str(synthetic_store.path)), "d_in=32", "d_model=16"
    )
    other_layer = save_sae(tmp_path / "l5", layer=5)
    assert_one_line_error(
        *run_cli("--sae", str(other_layer), "--store", str(synthetic_store.path)), "layer 5"
    )
    ok = save_sae(tmp_path / "ok")
    assert_one_line_error(
        *run_cli("--sae", str(ok), "--sae", str(other_layer), "--metrics", "probing"), "different layers"
    )
    assert_one_line_error(
        *run_cli("--sae", str(ok), "--layer", "3", "--metrics", "probing"), "trained on layer 2", "--layer 3"
    )
    other_model = save_sae(tmp_path / "m", model="gemma-2-2b")
    assert_one_line_error(
        *run_cli("--sae", str(other_model), "--model", "gemma-3-270m", "--metrics", "bias"),
        "gemma-2-2b",
        "--model gemma-3-270m",
    )


def test_unreadable_labelled_dataset(tmp_path):
    path = save_sae(tmp_path / "sae")
    data = tmp_path / "data"
    data.mkdir()
    (data / "92_glue_sst2.csv.zst").write_bytes(b"not zstd at all" + struct.pack("<I", 7))
    assert_one_line_error(
        *run_cli(
            "--sae", str(path), "--metrics", "probing", "--probing-tasks", "sst2", "--probing-data", str(data)
        ),
        "cannot read labelled dataset",
        "92_glue_sst2.csv.zst",
    )
    assert_one_line_error(
        *run_cli("--sae", str(path), "--metrics", "probing", "--probing-tasks", "imdb"),
        "unknown probing task imdb",
    )


# --- end to end on the real embedded model ------------------------------------------------------------


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_end_to_end_report_on_embedded_model(tmp_path, monkeypatch):
    """Two small SAEs on a real gemma-3-270m layer-6 store: every report file and section, cache reuse."""
    from pathlib import Path

    from atmpipe.eval.data import read_dataset
    from atmpipe.home import atmpipe_home
    from atmpipe.lm import capture, load_lm

    real_models = atmpipe_home() / "models"
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    if real_models.is_dir():  # reuse the converted embedded model; the eval cache starts empty
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "models").symlink_to(real_models)
    lm = load_lm("gemma-3-270m", device="cpu")
    layer, ctx = 6, 32
    texts = read_dataset("113_movie_sent").prompt.tolist()[:40]
    ids = lm.tokenizer(" ".join(texts))["input_ids"][: 8 * ctx]
    windows = torch.tensor(ids).reshape(8, ctx)
    windows[:, 0] = lm.bos_token_id
    acts = capture(lm, windows, [layer])[layer].reshape(-1, lm.d_model).float().numpy()
    tokens = windows.reshape(-1).numpy()

    def split(sl):
        return {
            "acts": acts[sl],
            "tokens": tokens[sl],
            "positions": np.arange(len(tokens))[sl] % ctx,
            "bos": tokens[sl] == lm.bos_token_id,
        }

    model_attrs = {
        "name": lm.name,
        "source": lm.source,
        "config_hash": lm.config_hash,
        "n_layers": lm.n_layers,
    }
    store = write_arrays_store(
        tmp_path / "l6.zarr",
        {"train": split(slice(0, 4 * ctx)), "eval": split(slice(4 * ctx, None))},
        layer=layer,
        chunk_tokens=32,
        shard_tokens=64,
        attrs_extra={"model": model_attrs, "context_size": ctx},
    )
    provenance = {"path": str(store.path), "layer": layer}
    relu = save_sae(tmp_path / "relu", d_in=lm.d_model, layer=layer, model=lm.name, store=provenance)
    topk = save_sae(
        tmp_path / "topk", d_in=lm.d_model, layer=layer, model=lm.name, store=provenance, method="topk"
    )
    out = tmp_path / "reports" / "tiny"
    sizes = ["--splice-windows", "1", "--absorption-sample-words", "80", "--absorption-icl", "2",
             "--absorption-f1-gate", "0", "--absorption-min-letters", "1", "--probing-tasks", "sst2,wikidata_gender",
             "--probing-train", "8", "--probing-test", "8", "--probing-context", "16", "--bias-people-per-cell", "8",
             "--bias-occupations", "actor,journalist", "--tpp-sets", "art_type", "--tpp-train", "8", "--tpp-test", "4"]  # fmt: skip
    result = runner.invoke(app, ["eval", "--sae", str(relu), "--sae", str(topk), "--out", str(out), *sizes])
    assert result.exit_code == 0, result.output

    for name in ("report.md", "report.html", "results.json"):
        assert (out / name).is_file()
    for png in ("frontier.png", "absorption_letters.png", "probing_tasks.png"):
        assert png_size(out / png) == (800, 500)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for section in (
        "All metrics side by side",
        "Sparsity vs reconstruction",
        "Absorption per letter",
        "Sparse probing per task",
        "Bias: spurious correlation removal",
        "Provenance and hyper-parameters",
    ):
        assert f"## {section}" in md and f"<h2>{section}</h2>" in page
    assert "paper (Gemma-2-2b, SAEBench)" in md and "ATM 0.0068" in md
    assert (
        page.count("data:image/png;base64,") == 3 and "<img alt" in page and 'src="frontier.png"' not in page
    )
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["model"] == "gemma-3-270m" and results["run"]["layer"] == layer
    for name in ("relu", "topk"):
        r = results["results"][name]
        assert set(r) == {"core", "absorption", "probing", "bias", "tpp"}
        assert 0 < r["core"]["n_tokens"] < 4 * ctx  # eval split, BOS excluded
        assert r["core"]["ce_clean"] < r["core"]["ce_zero"]
        assert r["absorption"]["status"] == "ok" and "per_letter" in r["absorption"]
        assert set(r["probing"]["per_task"]) == {"sst2", "wikidata_gender"}
        assert r["bias"]["per_pair"]["actor/journalist"]["construction"]["n_test"] > 0
        assert set(r["probing"]["groups"]) == {"all", "people", "sentiment"}
        assert (
            r["probing"]["ci95_sae_top_1"][0]
            <= r["probing"]["mean_sae_top_1"]
            <= r["probing"]["ci95_sae_top_1"][1]
        )
        assert set(r["tpp"]["per_set"]) == {"art_type"} and str(r["tpp"]["headline_n"]) in r["tpp"]["tpp"]
    assert results["saes"]["topk"]["method"] == "topk"

    # A second eval reuses every cached LM activation: the cache files are not rewritten.
    cache_files = sorted(Path(results["run"]["cache_dir"]).glob("*"))
    assert {f.name.split("-")[0] for f in cache_files} >= {"absorption", "probing", "bias", "tpp", "splice"}
    before = {f: f.stat().st_mtime_ns for f in cache_files}
    result = runner.invoke(app, ["eval", "--sae", str(topk), "--out", str(tmp_path / "again"), *sizes])
    assert result.exit_code == 0, result.output
    assert {f: f.stat().st_mtime_ns for f in cache_files} == before
    assert sorted(Path(results["run"]["cache_dir"]).glob("*")) == cache_files
