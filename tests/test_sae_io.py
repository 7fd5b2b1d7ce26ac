"""Saved SAEs: normalisation folding, round trips, SAELens compatibility, and malformed files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_helpers import make, planted, train
from safetensors.torch import load_file, save_file

from atmpipe.errors import UserError
from atmpipe.sae import SAE, SAE_METHODS
from atmpipe.sae.atm import STATS_FILE

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SCALE = 2.7  # a norm scale far from 1, so a folding mistake shows

HPARAMS = {  # hyper-parameters that make a short run fire enough latents; a method not listed uses its own
    "relu": {"l1": 0.3},
    "topk": {"k": 4},
    "jumprelu": {"l0_coeff": 0.05, "sparsity_warmup_steps": 20},
    "atm": {"l1": 1.0, "warmup_steps": 5},
    "matryoshka": {"k": 4, "prefix_fractions": [0.125, 0.5, 1.0]},
}
METHODS = [(m, HPARAMS.get(m, {})) for m in sorted(SAE_METHODS)] + [("topk", {"k": 4, "batch_topk": True})]
IDS = [*sorted(SAE_METHODS), "batchtopk"]


def _trained(method, hparams):
    x, _ = planted(4096)
    sae = train(make(method, norm_scale=SCALE, **hparams), x, 60, lr=1e-2)
    with torch.no_grad():  # biases away from anything special, so they must be folded right
        sae.b_enc.add_(0.05 * torch.randn_like(sae.b_enc))
        sae.b_dec.add_(0.1 * torch.randn_like(sae.b_dec))
    return sae.eval(), x


@pytest.mark.parametrize(("method", "hparams"), METHODS, ids=IDS)
def test_saved_sae_on_raw_activations_equals_training_sae_on_normalised(tmp_path, method, hparams):
    sae, x = _trained(method, hparams)
    sae.save(tmp_path / "sae", {"tokens_seen": 15360})
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.norm_scale == 1.0 and loaded.method == method
    with torch.no_grad():
        f_train, f_raw = sae.encode(x * SCALE), loaded.encode(x)
        assert (f_train > 0).sum() > 0
        assert torch.equal(f_train > 0, f_raw > 0)  # the same latents fire
        torch.testing.assert_close(f_raw, f_train / SCALE, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(x), sae(x * SCALE) / SCALE, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "hparams"), METHODS, ids=IDS)
def test_save_load_round_trip(tmp_path, method, hparams):
    sae, _ = _trained(method, hparams)
    sae.save(tmp_path / "a", {"tokens_seen": 15360, "final": {"fvu": 0.1}})
    loaded = SAE.load(tmp_path / "a")
    assert loaded.cfg.hparams == sae.cfg.hparams
    assert (loaded.cfg.layer, loaded.cfg.hook_name, loaded.cfg.model_name) == (
        3,
        "blocks.3.hook_resid_post",
        "planted",
    )
    meta = json.loads((tmp_path / "a" / "atmpipe.json").read_text())
    assert meta["method"] == method and meta["norm_scale_folded"] == SCALE
    assert meta["metadata"] == {"tokens_seen": 15360, "final": {"fvu": 0.1}}
    assert meta["hparams"] == sae.cfg.hparams and "torch_version" in meta["provenance"]
    loaded.save(tmp_path / "b", {})  # a loaded SAE saves the same tensors again
    a, b = (
        load_file(tmp_path / "a" / "sae_weights.safetensors"),
        load_file(tmp_path / "b" / "sae_weights.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)  # θ passes through log θ
    if method == "atm":
        stats = load_file(tmp_path / "a" / STATS_FILE)
        assert set(stats) == {"M", "F", "R", "I", "p", "theta"}
        torch.testing.assert_close(stats["M"], sae.atm_M)
        torch.testing.assert_close(loaded.atm_p, sae.atm_p)
        assert float(stats["theta"][0]) == pytest.approx(float(sae.atm_theta))


SAELENS_SCRIPT = r"""
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE

work = Path(sys.argv[1])
x = load_file(str(work / "x.safetensors"))["x"]

def run(sae, name):
    with torch.no_grad():
        f = sae.encode(x)
        save_file({"f": f.contiguous(), "x_hat": sae.decode(f).contiguous()}, str(work / f"out_{name}.safetensors"))

for d in sorted(work.glob("ours_*")):
    run(SAE.load_from_disk(str(d)), d.name)

torch.manual_seed(0)
for arch, extra in [("standard", {}), ("topk", {"k": 5}), ("jumprelu", {})]:
    sae = SAE.from_dict({"architecture": arch, "d_in": 32, "d_sae": 96, "dtype": "float32", "device": "cpu",
                         "metadata": {"model_name": "m", "hook_name": "blocks.3.hook_resid_post"}, **extra})
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # JumpReLU thresholds of both signs
    sae.save_model(str(work / f"native_{arch}"))
    run(sae, f"native_{arch}")
"""


def _saelens(work: Path) -> None:
    if not PEERS_PYTHON.exists():
        pytest.fail(f"{PEERS_PYTHON} is missing: run `make peers` to create the SAELens venv for this test")
    done = subprocess.run(
        [str(PEERS_PYTHON), "-c", SAELENS_SCRIPT, str(work)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_saelens_loads_our_saes_and_we_load_theirs(tmp_path):
    x, _ = planted(512, seed=3)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    ours = {}
    for (method, hparams), name in zip(METHODS, IDS, strict=True):
        sae, _ = _trained(method, hparams)
        sae.save(tmp_path / f"ours_{name}", {})
        ours[name] = sae
    _saelens(tmp_path)
    for name, sae in ours.items():
        out = load_file(tmp_path / f"out_ours_{name}.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(
                out["f"], sae.encode(x * SCALE) / SCALE, rtol=1e-5, atol=1e-6, msg=name
            )
            torch.testing.assert_close(out["x_hat"], sae(x * SCALE) / SCALE, rtol=1e-5, atol=1e-5, msg=name)
    for arch, method in [("standard", "relu"), ("topk", "topk"), ("jumprelu", "jumprelu")]:
        loaded = SAE.load(tmp_path / f"native_{arch}")
        out = load_file(tmp_path / f"out_native_{arch}.safetensors")
        assert loaded.method == method and loaded.cfg.layer == 3
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x), out["f"], rtol=1e-5, atol=1e-6, msg=arch)
            torch.testing.assert_close(loaded(x), out["x_hat"], rtol=1e-5, atol=1e-5, msg=arch)


# ----- malformed directories: one-line UserErrors naming the file and the key -----


@pytest.fixture
def saved(tmp_path) -> Path:
    make("topk", k=4).save(tmp_path / "sae", {})
    return tmp_path / "sae"


def _edit_cfg(d: Path, **changes):
    cfg = json.loads((d / "cfg.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(d: Path, drop: str | None = None, **replace):
    w = load_file(d / "sae_weights.safetensors")
    if drop:
        w.pop(drop)
    w.update(replace)
    save_file(w, str(d / "sae_weights.safetensors"))


CASES = {
    "no cfg": (lambda d: (d / "cfg.json").unlink(), "cfg.json does not exist"),
    "bad json": (lambda d: (d / "cfg.json").write_text("{not json"), "cfg.json is not valid JSON"),
    "no d_in": (lambda d: _edit_cfg(d, d_in=None), "cfg.json: key 'd_in' is missing"),
    "bad d_sae": (lambda d: _edit_cfg(d, d_sae="many"), "cfg.json: key 'd_sae' has invalid value 'many'"),
    "arch": (lambda d: _edit_cfg(d, architecture="gated"), None),
    "no weights": (
        lambda d: (d / "sae_weights.safetensors").unlink(),
        "sae_weights.safetensors does not exist",
    ),
    "garbage": (
        lambda d: (d / "sae_weights.safetensors").write_bytes(b"\x00" * 40),
        "is not a readable safetensors file",
    ),
    "no W_dec": (lambda d: _edit_weights(d, drop="W_dec"), "sae_weights.safetensors: missing tensor 'W_dec'"),
    "shape": (
        lambda d: _edit_weights(d, W_enc=torch.zeros(32, 95)),
        "tensor 'W_enc' has shape [32, 95], expected [32, 96]",
    ),
    "method": (
        lambda d: (d / "atmpipe.json").write_text(json.dumps({"method": "gated", "hparams": {}})),
        "atmpipe.json: unknown method 'gated'",
    ),
    "hparam": (
        lambda d: (d / "atmpipe.json").write_text(json.dumps({"method": "topk", "hparams": {"kk": 3}})),
        "atmpipe.json holds a hyper-parameter its method refuses: unknown hyper-parameter(s) kk",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_directory_is_a_user_error(saved, case):
    corrupt, message = CASES[case]
    corrupt(saved)
    if case == "arch":  # without atmpipe.json the architecture decides the method
        (saved / "atmpipe.json").unlink()
        message = "cfg.json: architecture 'gated' is not supported"
    with pytest.raises(UserError) as e:
        SAE.load(saved)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_saelens_topk_without_k_and_atm_stats_missing_a_key(tmp_path):
    d = tmp_path / "t"
    make("topk", k=4).save(d, {})
    (d / "atmpipe.json").unlink()
    _edit_cfg(d, k=None)
    with pytest.raises(UserError, match="cfg.json: key 'k' is missing"):
        SAE.load(d)
    a = tmp_path / "a"
    make("atm").save(a, {})
    stats = load_file(a / STATS_FILE)
    stats.pop("R")
    save_file(stats, str(a / STATS_FILE))
    with pytest.raises(UserError, match="atm_stats.safetensors: missing tensor 'R'"):
        SAE.load(a)


def test_not_a_directory(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        SAE.load(tmp_path / "nothing")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize(
    ("method", "retired"), [("atm", {"compile": False}), ("topk", {"sparse_kernels": True})]
)
def test_sae_saved_with_a_retired_training_option_still_loads(tmp_path, method, retired):
    """`compile` (ATM) and `sparse_kernels` (TopK) were hyper-parameters; now they are train options."""
    d = tmp_path / method
    sae = make(method)
    sae.save(d, {})
    meta = json.loads((d / "atmpipe.json").read_text())
    meta["hparams"].update(retired)
    (d / "atmpipe.json").write_text(json.dumps(meta))
    loaded = SAE.load(d)
    assert loaded.cfg.hparams == sae.cfg.hparams
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)
