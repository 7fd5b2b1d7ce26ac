"""The sparse training path (sae/sparse.py): each kernel against its dense twin, each method's sparse step
against its dense step (loss, every gradient, the updated weights and state), whole runs on both paths, and
the automatic path choice."""

from __future__ import annotations

import pytest
import torch
from sae_helpers import make, planted, train

from atmpipe.sae import kernels, sparse
from atmpipe.train import TrainConfig, make_optimizer, train_step

F64 = dict(dtype=torch.float64)


def _entries(n=64, d_sae=96, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(n, d_sae, generator=g) < density
    support[3] = False  # a token with no entry at all
    return sparse.entries_where(support), g


def test_entries_hold_the_support_in_row_major_order():
    e, _ = _entries()
    support = torch.zeros(e.n, e.d_sae, dtype=torch.bool)
    support[e.rows, e.cols] = True
    assert torch.equal(sparse.entries_where(support).cols, e.cols)
    assert torch.equal(e.crow, torch.cat([torch.zeros(1, dtype=torch.long), support.sum(1).cumsum(0)]))
    assert (e.rows.diff() >= 0).all() and e.crow[4] == e.crow[3]


def test_encoder_gradients_from_the_entries_equal_the_dense_ones():
    e, g = _entries()
    d_in = 16
    x = torch.randn(e.n, d_in, generator=g, **F64)
    init = [torch.randn(*s, generator=g, **F64) for s in [(d_in, e.d_sae), (e.d_sae,), (d_in,)]]
    weight = torch.randn(len(e.cols), generator=g, **F64)  # a loss that weighs each entry differently
    grads = []
    for at_entries in (True, False):
        W_enc, b_enc, b_dec = (t.clone().requires_grad_() for t in init)
        x_c = x - b_dec.detach()
        raw = x_c @ W_enc.detach()
        if at_entries:
            pre = sparse.pre_acts_at(raw, x_c, W_enc, b_enc, b_dec, e)
        else:
            pre = sparse.pre_acts_dense(raw, x_c, W_enc, b_enc, b_dec)[e.rows, e.cols]
        torch.testing.assert_close(pre, ((x - b_dec) @ W_enc + b_enc)[e.rows, e.cols])
        (pre * weight).sum().backward()
        grads.append([W_enc.grad, b_enc.grad, b_dec.grad])
    for fast, dense in zip(*grads, strict=True):
        torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)


def test_decoder_from_the_entries_equals_the_dense_gemm():
    e, g = _entries()
    d_in = 16
    init = [torch.randn(len(e.cols), generator=g, **F64), torch.randn(e.d_sae, d_in, generator=g, **F64)]
    b_dec, target = torch.randn(d_in, generator=g, **F64), torch.randn(e.n, d_in, generator=g, **F64)
    results = []
    for decode in (sparse.decode, sparse.decode_dense):
        vals, W_dec = (t.clone().requires_grad_() for t in init)
        x_hat = decode(vals, e, W_dec, b_dec)
        (x_hat - target).pow(2).sum().backward()
        results.append([x_hat, vals.grad, W_dec.grad])
    for fast, dense in zip(*results, strict=True):
        torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)
    assert results[0][0][3].eq(b_dec).all()  # the token without entries decodes to b_dec


def test_jumprelu_on_entries_equals_the_dense_kernel_threshold_gradient_included():
    n, d_sae, eps = 128, 96, 0.2
    g = torch.Generator().manual_seed(2)
    raw, b_enc = torch.randn(n, d_sae, generator=g, **F64), torch.randn(d_sae, generator=g, **F64) * 0.1
    log_theta = (torch.rand(d_sae, generator=g, **F64) * 0.5 + 0.2).log()
    w_f, w_l0 = torch.randn(n, d_sae, generator=g, **F64), torch.randn(n, generator=g, **F64)
    e = sparse.entries_where(sparse.jumprelu_support(raw, b_enc, log_theta.exp(), eps))
    pre = raw + b_enc
    results = []
    for on_entries in (True, False):
        p, lt = pre.clone().requires_grad_(), log_theta.clone().requires_grad_()
        theta = lt.exp()
        if on_entries:
            f_e, l0 = sparse.JumpReLUEntries.apply(p[e.rows, e.cols], theta[e.cols], e.rows, n, eps)
            f = sparse.to_dense(f_e, e)
        else:
            f, l0, _ = kernels.JumpReLU.apply(p, theta, eps)
        ((f * w_f).sum() + (l0 * w_l0).sum()).backward()
        results.append([f, l0, p.grad, lt.grad])
    for fast, dense in zip(*results, strict=True):
        torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)
    u = (pre - log_theta.exp()) / eps
    window = (u > -0.5) & (u < 0.5)
    assert (window & (u <= 0)).any()  # inactive entries inside the window: their θ gradient counts
    assert sparse.to_dense(torch.ones(len(e.cols), **F64), e)[window].eq(1).all()  # all in the support


# --- one training step, sparse vs dense -------------------------------------------------------------

STEP_CASES = {
    "relu": {"l1": 1.0},
    "jumprelu": {"threshold_init": 0.5, "bandwidth": 0.3, "sparsity_warmup_steps": 0},
    "atm": {"l1": 1.0, "warmup_steps": 0, "r": 3.0},
    "atm-per-step": {"l1": 1.0, "warmup_steps": 0, "r": 3.0, "granularity": "step"},
    "atm-exact-norm": {"l1": 1.0, "warmup_steps": 0, "r": 3.0, "recon_norm": "exact"},
    "atm-controls": {"l1": 1.0, "warmup_steps": 0, "r": 3.0, "threshold": "log", "targeting": "uniform"},
    "matryoshka": {"k": 4, "prefix_fractions": [0.125, 0.5, 1.0]},
    # AuxK on: latents silent for one batch are dead
    "matryoshka-aux": {"k": 4, "prefix_fractions": [0.125, 0.5, 1.0], "dead_tokens": 1},
}


def _one_step(case: str, latents: str):
    x, _ = planted(512)
    sae = make(case.split("-")[0], **STEP_CASES[case]).double()
    sae.latent_path = latents
    opt = make_optimizer(sae, TrainConfig(lr=1e-3))
    lrs = [g["lr"] for g in opt.param_groups]
    steps = []
    for step in (50, 51):  # two steps: the second starts from state (EMAs, λ, clocks) the first left
        out, loss, _ = train_step(sae, sae.training_forward, opt, lrs, x.double() * 3, step, 100, 1.0, 1e9)
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        steps.append((loss.detach(), out.x_hat.detach(), out.f.detach(), grads, dict(out.stats)))
    return sae, steps


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_sparse_step_equals_the_dense_step(case):
    (fast, fast_steps), (dense, dense_steps) = _one_step(case, "sparse"), _one_step(case, "dense")
    assert fast.path[0] == "sparse" and dense.path[0] == "dense"
    for (loss, x_hat, f, grads, stats), (loss_d, x_hat_d, f_d, grads_d, stats_d) in zip(
        fast_steps, dense_steps, strict=True
    ):
        torch.testing.assert_close(loss, loss_d, rtol=1e-12, atol=0)
        torch.testing.assert_close(x_hat, x_hat_d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f, f_d, rtol=1e-12, atol=1e-12)
        assert grads.keys() == grads_d.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_d[name], rtol=1e-10, atol=1e-12, msg=name)
        for name in stats:
            torch.testing.assert_close(
                torch.as_tensor(stats[name]).double(), torch.as_tensor(stats_d[name]).double()
            )
    for name, value in dense.state_dict().items():  # weights after the Adam steps, EMAs, clocks, λ
        torch.testing.assert_close(fast.state_dict()[name], value, rtol=1e-10, atol=1e-12, msg=name)
    if case.startswith("atm"):
        assert float(fast_steps[-1][4]["masked_frac"]) > 0.1  # the case really masks
    if case == "matryoshka-aux":
        assert int(fast_steps[0][4]["dead"]) > 0  # dead after the first step: the second runs AuxK
    if case == "jumprelu":
        assert float(dense_steps[-1][3]["log_threshold"].abs().max()) > 0  # θ really gets a gradient


# --- whole runs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["relu", "jumprelu", "atm"])
def test_short_runs_on_each_path_end_close(method):
    """fp32 runs of 100 steps: the paths differ by summation order only, so they stay within round-off
    amplified by training (measured ≤ 1.7e-6 here; the bound leaves room for other CPUs' kernels)."""
    x, _ = planted(4096)
    hp = {
        "relu": {"l1": 0.3},
        "jumprelu": {"sparsity_warmup_steps": 20},
        "atm": {"l1": 1.0, "warmup_steps": 20},
    }
    runs = []
    for latents in ("sparse", "dense"):
        sae = make(method, **hp[method])
        sae.latent_path = latents
        runs.append(train(sae, x, 100))
    for name, value in runs[1].state_dict().items():
        torch.testing.assert_close(runs[0].state_dict()[name], value, rtol=1e-4, atol=2e-5, msg=name)


# --- the path choice --------------------------------------------------------------------------------


def test_auto_takes_the_sparse_path_below_the_crossover_only():
    sae = make("relu")
    x = torch.randn(256, 32)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every latent active: dense
    sae.training_forward(x, 0, 10)
    assert sae.path == ("dense", 1.0)
    with torch.no_grad():
        sae.b_enc.fill_(-2.5)  # ~1% active: sparse
    sae.training_forward(x, 1, 10)
    assert sae.path[0] == "sparse" and 0 < sae.path[1] < sparse.CROSSOVER_DENSITY
    sae.latent_path = "dense"
    sae.training_forward(x, 2, 10)
    assert sae.path == ("dense", None)  # a forced path never measures the density


def test_the_crossover_is_per_device_and_dense_where_none_was_measured():
    assert sparse.crossover_density(torch.device("cpu")) == sparse.CROSSOVER_DENSITY
    assert sparse.crossover_density(torch.device("cuda")) == sparse.CUDA_CROSSOVER_DENSITY
    # bf16's crossover is not measured yet: fp32's stands in for it on every device.
    for device in ("cpu", "cuda"):
        assert sparse.crossover_density(torch.device(device), "bf16") == sparse.crossover_density(
            torch.device(device), "fp32"
        )
    sae = make("relu")
    # A device with no measured crossover: dense, without reading the density back.
    assert sae.sparse_entries(torch.ones(4, 8, dtype=torch.bool, device="meta")) is None
    assert sae.path == ("dense", None)


# --- mixed precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["topk", "relu", "jumprelu", "atm"])
def test_under_bf16_autocast_the_sparse_step_matches_the_dense_step(method):
    """Under autocast the latents come out bf16 while the weights stay fp32: every sparse kernel must take
    that (CUDA's sparse-dense product has no bf16 kernel at all) and give fp32 gradients, equal to the
    dense step's up to bf16 round-off."""
    x, _ = planted(512)
    hp = {
        "topk": {"k": 4},
        "relu": {"l1": 1.0},
        "jumprelu": {"threshold_init": 0.5, "sparsity_warmup_steps": 0},
        "atm": {"l1": 1.0, "warmup_steps": 0, "r": 3.0},
    }
    grads = {}
    for latents in ("sparse", "dense"):
        torch.manual_seed(0)
        sae = make(method, **hp[method])
        sae.latent_path = latents
        opt = make_optimizer(sae, TrainConfig(lr=1e-3))

        def forward(x, i, total, sae=sae):
            with torch.autocast("cpu", torch.bfloat16):
                return sae.training_forward(x, i, total)

        train_step(sae, forward, opt, [g["lr"] for g in opt.param_groups], x * 3, 50, 100, 1.0, 1e9)
        assert sae.path[0] == latents or method == "topk"
        grads[latents] = {name: p.grad.clone() for name, p in sae.named_parameters()}
    for name, g in grads["dense"].items():
        assert grads["sparse"][name].dtype == torch.float32, name
        assert float((grads["sparse"][name] - g).norm() / g.norm()) < 0.02, name  # measured ≤ 0.007
