"""atmpipe's Matryoshka training step equals SAELens's MatryoshkaBatchTopKTrainingSAE (run in .venv-peers,
`make peers`): the same initial weights, batches and dead latents give the same losses, gradients, and
weights after three Adam steps, in float64 (the first step to round-off, later ones within what Adam's ε
amplifies round-off to: see the test).

The differences, each set aside by the harness and tested here:
- decoder norms: SAELens divides by them inside the forward (`rescale_acts_by_decoder_norm`, default on);
  atmpipe keeps decoder rows at unit norm (the gradient along each row removed, rows renormalised after the
  step). The harness applies atmpipe's two decoder operations around SAELens's Adam step; with rows at unit
  norm SAELens's rescaling then changes nothing (tested with it on and off).
- AuxK: SAELens decodes the dead latents' raw pre-activations, negative ones too; atmpipe ReLUs them (a
  latent never outputs a negative value). SAELens with a ReLU put on its AuxK activations equals atmpipe;
  unpatched, its AuxK loss differs on these batches, whose dead latents have negative pre-activations.
- the inference threshold: SAELens's EMA starts at 0, atmpipe's at the first batch's smallest kept
  activation m₁ (both with rate 0.01), so after N batches atmpipe's is SAELens's + 0.99^N·m₁.
- the AuxK coefficient: SAELens's default is 1, atmpipe's 1/32 (TopK's recipe); SAELens is given 1/32.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from sae_helpers import make, planted
from safetensors.torch import load_file, save_file

from atmpipe.train import TrainConfig, make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
D_IN, D_SAE, K, STEPS, LR = 32, 96, 4, 3, 1e-2
PREFIXES = [0.125, 0.5, 1.0]

SCRIPT = r"""
import sys, warnings
import torch
from safetensors.torch import load_file, save_file
import sae_lens.saes.matryoshka_batchtopk_sae as mod
import sae_lens.saes.topk_sae as topk
from sae_lens.saes.sae import TrainStepInput

work, rescale, relu_aux = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
t = load_file(f"{work}/in.safetensors")
cfg = mod.MatryoshkaBatchTopKTrainingSAEConfig(
    d_in=t["W_enc"].shape[0], d_sae=t["W_enc"].shape[1], k=float(t["k"]), dtype="float64", device="cpu",
    matryoshka_widths=t["widths"].tolist(), rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=1 / 32,
    topk_threshold_lr=0.01)
if relu_aux:
    plain = topk.calculate_topk_aux_acts  # what TopK's AuxK calls
    topk.calculate_topk_aux_acts = lambda **kw: plain(**kw).relu()
sae = mod.MatryoshkaBatchTopKTrainingSAE(cfg)
with torch.no_grad():
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        getattr(sae, name).copy_(t[name])
opt = torch.optim.Adam(sae.parameters(), lr=float(t["lr"]), betas=(0.9, 0.999))
out = {}
for step in range(int(t["steps"])):
    res = sae.training_forward_pass(TrainStepInput(
        sae_in=t[f"x{step}"], coefficients={}, dead_neuron_mask=t[f"dead{step}"], n_training_steps=step,
        is_logging_step=False))
    opt.zero_grad()
    res.loss.backward()
    out[f"loss{step}"] = res.loss.detach().reshape(1)
    for name, v in res.losses.items():
        out[f"{name}{step}"] = v.detach().reshape(1)
    with torch.no_grad():  # atmpipe's decoder: no gradient along a row, rows back to unit norm
        g, w = sae.W_dec.grad, sae.W_dec
        g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        out[f"grad_{name}{step}"] = getattr(sae, name).grad.clone()
    opt.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
    out[name] = getattr(sae, name).detach().clone()
out["threshold"] = sae.topk_threshold.detach().reshape(1)
save_file({k: v.contiguous() for k, v in out.items()}, f"{work}/out_{int(rescale)}{int(relu_aux)}.safetensors")
"""


def _saelens(work: Path, rescale: bool, relu_aux: bool) -> dict[str, torch.Tensor]:
    if not PEERS_PYTHON.exists():
        pytest.fail(f"{PEERS_PYTHON} is missing: run `make peers` to create the SAELens venv for this test")
    done = subprocess.run(
        [str(PEERS_PYTHON), "-c", SCRIPT, str(work), str(int(rescale)), str(int(relu_aux))],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(work / f"out_{int(rescale)}{int(relu_aux)}.safetensors"))


def _case(work: Path):
    """An atmpipe SAE with biases that make some dead latents' pre-activations negative, its batches and
    dead masks (a third of the latents dead at the second and third steps), written for SAELens."""
    sae = make("matryoshka", d_in=D_IN, d_sae=D_SAE, k=K, prefix_fractions=PREFIXES).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g, dtype=torch.float64))
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g, dtype=torch.float64))
    xs = [planted(128, seed=s)[0].double() * 3 for s in range(STEPS)]
    deads = [torch.zeros(D_SAE, dtype=torch.bool)] + [torch.arange(D_SAE) % 3 == s for s in range(1, STEPS)]
    tensors = {name: p.detach().clone() for name, p in sae.named_parameters()}
    tensors |= {f"x{s}": x for s, x in enumerate(xs)} | {f"dead{s}": d for s, d in enumerate(deads)}
    tensors |= {
        "k": torch.tensor(float(K)),
        "widths": torch.tensor(sae.widths),
        "lr": torch.tensor(LR),
        "steps": torch.tensor(STEPS),
    }
    save_file(tensors, str(work / "in.safetensors"))
    return sae, xs, deads


def _atmpipe(sae, xs, deads):
    """atmpipe's own training step (train.train_step: Adam, the decoder's gradient projection and
    renormalisation; clipping out of reach), with the dead-latent clock set to each step's mask."""
    opt = make_optimizer(sae, TrainConfig(lr=LR))
    lrs = [group["lr"] for group in opt.param_groups]
    steps, thresholds = [], []
    for s, (x, dead) in enumerate(zip(xs, deads, strict=True)):
        sae.tokens_since_fired.copy_(torch.where(dead, sae.hp.dead_tokens, 0))
        out, loss, _ = train_step(sae, sae.training_forward, opt, lrs, x, s, STEPS, 1.0, 1e9)
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        steps.append((loss.detach(), {k: v.detach() for k, v in out.losses.items()}, grads))
        thresholds.append(float(sae.running_threshold))
    return steps, thresholds


def test_training_steps_equal_saelens_matryoshka(tmp_path):
    sae, xs, deads = _case(tmp_path)
    ref = _saelens(tmp_path, rescale=False, relu_aux=True)
    steps, thresholds = _atmpipe(sae, xs, deads)
    for s, (loss, losses, grads) in enumerate(steps):
        # The first step to the last bit of float64 round-off; later ones within what Adam makes of it: its
        # step g/(|g| + ε) moves a weight whose gradient is near 0 by up to lr/ε = 10⁶ times a gradient's
        # round-off (~1e-16), so after the first step the weights differ by ~1e-10 (measured: gradients by
        # ≤ 1e-8 at the second and third steps).
        rtol, atol = (1e-12, 1e-13) if s == 0 else (1e-6, 1e-7)
        torch.testing.assert_close(loss, ref[f"loss{s}"][0], rtol=rtol, atol=0)
        # SAELens's terms: the full width's mse, one inner_mse_loss_<width> per inner prefix, and AuxK.
        torch.testing.assert_close(losses["mse"], ref[f"mse_loss{s}"][0], rtol=rtol, atol=0)
        inner = sum(ref[f"inner_mse_loss_{w}{s}"][0] for w in sae.widths[:-1])
        torch.testing.assert_close(losses["inner_mse"], inner, rtol=rtol, atol=0)
        aux = ref[f"auxiliary_reconstruction_loss{s}"][0]
        torch.testing.assert_close(losses.get("aux", aux.new_tensor(0.0)), aux, rtol=rtol, atol=0)
        assert (float(aux) > 0) == (s > 0)  # AuxK ran where latents were dead
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref[f"grad_{name}{s}"], rtol=rtol, atol=atol, msg=f"{name} {s}")
    for name, p in sae.named_parameters():  # after three Adam steps of lr 1e-2
        torch.testing.assert_close(p.detach(), ref[name], rtol=1e-7, atol=1e-8, msg=name)
    # The threshold: the same EMA, started from the first kept minimum instead of 0.
    expected = float(ref["threshold"][0]) + 0.99**STEPS * thresholds[0]  # the first: that batch's kept min
    assert float(sae.running_threshold) == pytest.approx(expected, rel=1e-8)


def test_the_differences_set_aside_are_real_and_only_those(tmp_path):
    sae, xs, deads = _case(tmp_path)
    plain = _saelens(tmp_path, rescale=False, relu_aux=False)
    relu = _saelens(tmp_path, rescale=False, relu_aux=True)
    rescaled = _saelens(tmp_path, rescale=True, relu_aux=True)
    # AuxK on negative pre-activations: SAELens's own AuxK differs where latents were dead, nothing else does.
    assert float(plain["auxiliary_reconstruction_loss1"][0]) != pytest.approx(
        float(relu["auxiliary_reconstruction_loss1"][0]), rel=1e-6
    )
    torch.testing.assert_close(plain["mse_loss1"], relu["mse_loss1"], rtol=1e-12, atol=0)
    # SAELens's decoder-norm rescaling (its default): with rows kept at unit norm it changes nothing, the
    # gradient it adds along each row included (the projection removes it). Its rounding differs by an ulp,
    # which Adam's ε amplifies as above.
    for key, value in relu.items():
        torch.testing.assert_close(rescaled[key], value, rtol=1e-6, atol=1e-7, msg=key)
