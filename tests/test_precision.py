"""bf16 training and the LM's compute dtype (atmpipe/precision.py): the hardware rule (both branches forced),
a bf16 training step against the fp32 one (loss and gradients within bf16's round-off, weights, Adam state and
ATM's statistics still fp32), the quality study's emulated bf16 step against the native one, and the choice
recorded in atmpipe.json and the store's provenance."""

from __future__ import annotations

import json

import pytest
import torch
from sae_helpers import make, planted
from test_train import config
from test_train import store as store  # noqa: F401 (the module's planted store fixture)

from atmpipe import precision
from atmpipe.lm import load_lm
from atmpipe.train import TrainConfig, make_optimizer, train, train_step

CPU = torch.device("cpu")
HPARAMS = {
    "topk": {"k": 4},
    "relu": {"l1": 1.0},
    "jumprelu": {"threshold_init": 0.5, "sparsity_warmup_steps": 0},
    "atm": {"l1": 1.0, "warmup_steps": 0, "r": 3.0},
}


def units(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [
    (False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"),
])  # fmt: skip
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_units(monkeypatch, amx, avx512_bf16, expected):
    units(monkeypatch, amx, avx512_bf16)
    assert precision.resolve("auto", CPU) == expected
    assert precision.default_lm_dtype(CPU) == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    # An explicit choice stands whatever the hardware.
    assert precision.resolve("fp32", CPU) == "fp32" and precision.resolve("bf16", CPU) == "bf16"


@pytest.mark.parametrize("supported", [False, True])
def test_on_cuda_auto_follows_the_gpus_bf16_support(monkeypatch, supported):
    units(monkeypatch, True, True)  # the host CPU's units do not matter for a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert precision.resolve("auto", torch.device("cuda")) == ("bf16" if supported else "fp32")


def _step(method: str, latents: str, prec: str, emulate: bool, monkeypatch):
    """One training step from the same init and batch; returns (loss, grads, sae, opt, output)."""
    monkeypatch.setenv(precision.EMULATE_ENV, "1" if emulate else "0")
    x, _ = planted(512)
    torch.manual_seed(0)
    sae = make(method, **HPARAMS[method])
    sae.latent_path, sae.precision = latents, prec
    opt = make_optimizer(sae, TrainConfig(lr=1e-3))
    out, loss, _ = train_step(
        sae, sae.training_forward, opt, [g["lr"] for g in opt.param_groups], x * 3, 50, 100, 1.0, 1e9
    )
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    return loss.detach(), grads, sae, opt, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# Per-step differences bf16 vs fp32 measured on this case (d_in 32, d_sae 128, 512 tokens): loss ≤ 2.1e-3;
# the weights' gradients ≤ 1.0e-2 for ReLU, ATM and JumpReLU and ≤ 7.2e-2 for TopK, whose top-k selections
# change where two pre-activations are within bf16's round-off; JumpReLU's threshold gradient 0.17 (which
# pre-activations fall inside the window ε around θ moves with their rounding).
GRAD_TOLERANCE = {"relu": 0.03, "atm": 0.03, "jumprelu": 0.03, "topk": 0.15}


@pytest.mark.parametrize("latents", ["dense", "sparse"])
@pytest.mark.parametrize("method", ["relu", "topk", "jumprelu", "atm"])
def test_a_bf16_step_matches_the_fp32_step_and_keeps_the_state_fp32(method, latents, monkeypatch):
    loss32, grads32, *_ = _step(method, latents, "fp32", False, monkeypatch)
    loss16, grads16, sae, opt, out = _step(method, latents, "bf16", False, monkeypatch)
    assert loss16.dtype == torch.float32 and loss16 != loss32  # the step did run its products in bf16
    assert abs(float(loss16 / loss32) - 1) < 0.01
    for name, g in grads32.items():
        tolerance = 0.5 if name == "log_threshold" else GRAD_TOLERANCE[method]
        assert _rel(grads16[name], g) < tolerance, name
    # Master weights, their gradients, Adam's moments and every buffer (ATM's EMAs, λ) stay fp32.
    for name, p in sae.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "step"), name
    for name, b in sae.named_buffers():
        assert b.dtype in (torch.float32, torch.int64), name
    if method == "atm":
        assert float(sae.atm_M.sum()) > 0 and sae.atm_M.dtype == torch.float32
    if latents == "dense" and method in ("relu", "atm", "jumprelu"):
        assert out.x_hat.dtype == torch.bfloat16  # the decoder GEMM ran in bf16


class _CountGemms(precision.EmulatedBF16):
    seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in precision._GEMMS and any(getattr(a, "dtype", None) == torch.bfloat16 for a in args):
            _CountGemms.seen += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("latents", ["dense", "sparse"])
@pytest.mark.parametrize("method", ["relu", "topk", "jumprelu", "atm"])
def test_the_emulated_bf16_step_equals_the_native_one(method, latents, monkeypatch):
    """The quality study's ATMPIPE_EMULATE_BF16=1 (bf16 GEMMs as fp32 GEMMs of the bf16 operands, rounded to
    bf16) against torch's native bf16 kernels: loss and gradients agree to 1e-3 relative (measured: equal to
    the bit at these sizes), a tenth of bf16's own distance from fp32 at least."""
    monkeypatch.setattr(precision, "EmulatedBF16", _CountGemms)
    _CountGemms.seen = 0
    native_loss, native, *_ = _step(method, latents, "bf16", False, monkeypatch)
    assert _CountGemms.seen == 0
    emulated_loss, emulated, *_ = _step(method, latents, "bf16", True, monkeypatch)
    assert _CountGemms.seen >= 1  # the emulation saw the encoder's GEMM at least
    assert abs(float(emulated_loss / native_loss) - 1) < 1e-3
    for name, g in native.items():
        assert _rel(emulated[name], g) < 1e-3, name


def test_emulation_is_off_unless_asked_for_and_only_for_bf16(monkeypatch):
    monkeypatch.delenv(precision.EMULATE_ENV, raising=False)
    assert not isinstance(precision.emulation("bf16"), precision.EmulatedBF16)
    monkeypatch.setenv(precision.EMULATE_ENV, "1")
    assert isinstance(precision.emulation("bf16"), precision.EmulatedBF16)
    assert not isinstance(precision.emulation("fp32"), precision.EmulatedBF16)


def test_train_records_what_precision_resolved_to(store, tmp_path, monkeypatch):  # noqa: F811
    units(monkeypatch, False, False)
    run = train(config(store, tmp_path / "auto", "relu", steps=5))
    meta = json.loads((run / "atmpipe.json").read_text())["metadata"]
    assert meta["precision"] == "fp32" and meta["train_config"]["precision"] == "auto"
    units(monkeypatch, True, False)
    run = train(config(store, tmp_path / "units", "relu", steps=5))
    assert json.loads((run / "atmpipe.json").read_text())["metadata"]["precision"] == "bf16"


def test_the_lms_default_dtype_follows_the_units(tiny_checkpoints, monkeypatch):
    units(monkeypatch, False, False)
    assert load_lm(str(tiny_checkpoints["gemma3"]), device="cpu").dtype == torch.float32
    units(monkeypatch, False, True)
    assert load_lm(str(tiny_checkpoints["gemma3"]), device="cpu").dtype == torch.bfloat16
    # --dtype still wins.
    assert load_lm(str(tiny_checkpoints["gemma3"]), device="cpu", dtype="float32").dtype == torch.float32
