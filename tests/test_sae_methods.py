"""SAE methods on planted dictionaries, and the pieces each method is built from."""

from __future__ import annotations

import math

import pytest
import torch
from sae_helpers import fvu, make, planted, recovered, train

from atmpipe.errors import UserError
from atmpipe.sae import SAE_METHODS, SAEConfig, kernels, make_sae
from atmpipe.sae.relu import balance

# method, hyper-parameters, steps, FVU bound (on normalised activations), fraction of atoms recovered
PLANTED = [
    ("relu", {"l1": 0.3}, 1000, 0.10, 0.95),
    ("topk", {"k": 4}, 1000, 0.15, 0.95),
    ("topk", {"k": 4, "batch_topk": True}, 1000, 0.15, 0.95),
    ("jumprelu", {"l0_coeff": 0.05, "sparsity_warmup_steps": 200}, 1000, 0.10, 0.9),
    ("atm", {"l1": 2.0, "warmup_steps": 200}, 1000, 0.20, 0.8),
    # Its first prefix (12 latents) must reconstruct 48 atoms alone: those latents learn blends, not atoms.
    ("matryoshka", {"k": 4, "prefix_fractions": [0.125, 0.5, 1.0]}, 1000, 0.15, 0.85),
]
OWN_HPARAMS = {"matryoshka": {"prefix_fractions": [0.125, 0.5, 1.0]}}  # its defaults need d_sae ≥ 256


@pytest.mark.parametrize(("method", "hparams", "steps", "max_fvu", "min_recovered"), PLANTED)
def test_planted_dictionary_is_learned(method, hparams, steps, max_fvu, min_recovered):
    x, atoms = planted(20_000)
    s = math.sqrt(x.shape[1]) / float(x.norm(dim=1).mean())
    sae = train(make(method, norm_scale=s, **hparams), x, steps)
    sae.eval()
    assert fvu(sae, x * s) < max_fvu
    assert recovered(sae, atoms) >= min_recovered


@pytest.mark.parametrize("method", sorted(SAE_METHODS))
def test_decoder_rows_stay_unit_norm(method):
    x, _ = planted(4096)
    sae = train(make(method, **OWN_HPARAMS.get(method, {})), x, 20, lr=1e-2)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-5)


def test_parallel_gradient_is_removed():
    sae = make("relu")
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grads()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_topk_keeps_exactly_k():
    sae = make("topk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive, never fewer
    x = torch.randn(64, 32)
    assert ((sae.encode(x) != 0).sum(-1) == 5).all()
    assert ((sae.training_forward(x, 0, 10).f != 0).sum(-1) == 5).all()


def test_topk_sparse_kernels_equal_dense_twins():
    g = torch.Generator().manual_seed(1)
    B, d_in, d_sae, k = 64, 16, 96, 5
    x = torch.randn(B, d_in, dtype=torch.float64, generator=g)
    target = torch.randn(B, d_in, dtype=torch.float64, generator=g)
    init = [
        torch.randn(*shape, dtype=torch.float64, generator=g)
        for shape in [(d_in, d_sae), (d_sae,), (d_in,), (d_sae, d_in)]
    ]
    dead = torch.rand(d_sae, generator=g) < 0.3
    results = []
    for encode, decode in [
        (kernels.topk_encode, kernels.sparse_decode),
        (kernels.topk_encode_dense, kernels.dense_decode),
    ]:
        W_enc, b_enc, b_dec, W_dec = (t.clone().requires_grad_() for t in init)
        vals, idx, aux_vals, aux_idx = encode(x, W_enc, b_enc, b_dec, k, dead, 8)
        x_hat = decode(vals, idx, W_dec, b_dec)
        e_hat = decode(aux_vals, aux_idx, W_dec)
        ((x_hat - x).pow(2).sum() + (e_hat - target).pow(2).sum()).backward()
        results.append([x_hat, e_hat, W_enc.grad, b_enc.grad, b_dec.grad, W_dec.grad])
    for fast, dense in zip(*results, strict=True):
        torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-10)


def test_topk_training_matches_dense_path():
    x, _ = planted(4096)
    fast = train(make("topk", k=4), x, 30)
    dense = make("topk", k=4)
    dense.latent_path = "dense"
    dense = train(dense, x, 30)
    torch.testing.assert_close(fast.W_enc, dense.W_enc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.W_dec, dense.W_dec, rtol=1e-4, atol=1e-5)


def test_topk_auxk_trains_dead_latents_only():
    sae = make("topk", k=4, dead_tokens=1)
    x = torch.randn(8, 32)  # 8 tokens fire at most 32 of the 96 latents
    sae.training_forward(x, 0, 10)  # latents that did not fire in this batch are now dead
    dead = sae.dead_mask().clone()
    assert dead.any()
    out = sae.training_forward(x, 1, 10)
    assert "aux" in out.losses
    out.losses["aux"].backward()
    grad_cols = sae.W_enc.grad.abs().sum(0) > 0
    assert grad_cols.any() and not (grad_cols & ~dead).any()
    n_dead, k_aux = int(dead.sum()), 16  # d_in // 2
    residual = (x - out.x_hat).detach()
    pre = sae.pre_acts(x).masked_fill(~dead, float("-inf"))
    vals, idx = pre.topk(k_aux, dim=-1)
    e_hat = torch.zeros(8, 96).scatter(1, idx, vals.relu()) @ sae.W_dec
    expected = min(n_dead / k_aux, 1.0) / 32 * (e_hat - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["aux"], expected, rtol=1e-5, atol=1e-6)


def test_topk_auxk_engages_on_a_planted_dead_latent_within_its_window():
    from atmpipe.train import dead_window

    # The window `atmpipe train` gives: a quarter of the run, at most 256 steps, at most 10M tokens.
    assert dead_window(1024, 200 * 1024) == 50 * 1024  # the demo: 50 of its 200 steps
    assert dead_window(4096, 512 * 4096) == 128 * 4096  # the reproduction: 128 of 512
    assert dead_window(4096, 100_000 * 4096) == 256 * 4096
    sae = make("topk", k=4, dead_tokens=4 * 64)
    with torch.no_grad():  # latent 5 is planted dead: its pre-activation is tiny, never among the top 4
        sae.W_enc[:, 5] *= 0.001
        sae.b_enc[5] = 0.01
    x = torch.randn(8 * 64, 32)
    for step in range(6):
        sae.zero_grad(set_to_none=True)
        dead_before = bool(sae.dead_mask()[5])
        out = sae.training_forward(x[step * 64 : (step + 1) * 64], step, 10)
        assert int(sae.tokens_since_fired[5]) == 64 * (step + 1)  # it never fired
        assert dead_before == (step >= 4)  # dead once 4 batches of 64 tokens passed without it
        if step >= 4:
            out.losses["aux"].backward()  # AuxK trains it: its encoder column gets a gradient
            assert float(sae.W_enc.grad[:, 5].abs().sum()) > 0


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


@pytest.mark.parametrize("eager", [False, True], ids=["fused", "eager"])
def test_jumprelu_threshold_gradient_is_the_rectangle_kernel(eager, monkeypatch):
    if eager:
        monkeypatch.setenv("ATMPIPE_EAGER", "1")
    sae = make("jumprelu", threshold_init=0.3, bandwidth=0.2)
    x = torch.randn(128, 32)
    w_f, w_l0 = torch.randn(128, 96), torch.randn(128)
    pre = sae.pre_acts(x).detach().requires_grad_()
    theta = sae.threshold
    f, l0, fires = kernels.JumpReLU.apply(pre, theta, 0.2)
    ((f * w_f).sum() + (l0 * w_l0).sum()).backward()
    th, p = theta.detach(), pre.detach()
    rect = rectangle((p - th) / 0.2)
    # The straight-through estimators, written out: ∂/∂θ of f (−θ/ε per window hit) and of L0 (−1/ε).
    d_theta = (-(th / 0.2) * rect * w_f - (1 / 0.2) * rect * w_l0[:, None]).sum(0)
    torch.testing.assert_close(sae.log_threshold.grad, d_theta * th)  # chain rule through θ = exp(log θ)
    torch.testing.assert_close(pre.grad, w_f * (p > th))
    assert rect.sum() > 0  # the case exercises the kernel
    torch.testing.assert_close(f, p * (p > th))
    torch.testing.assert_close(l0, (p > th).sum(-1).float())
    assert torch.equal(fires, (p > th).sum(0).int())


def test_training_pre_acts_equal_the_inference_ones():
    sae = make("relu")
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(64, 32)
    torch.testing.assert_close(sae.train_pre_acts(x), sae.pre_acts(x), rtol=1e-5, atol=1e-5)


def test_topk_builds_its_dense_latents_only_when_asked():
    sae = make("topk", k=5)
    out = sae.training_forward(torch.randn(16, 32), 0, 10)
    assert callable(out._f)  # nothing dense was built by the forward itself
    assert out.f.shape == (16, 96) and ((out.f != 0).sum(-1) <= 5).all()
    assert float(out.stats["l0"]) == pytest.approx(float((out.f > 0).sum(-1).float().mean()))


def test_jumprelu_uses_beta1_zero_and_its_threshold_lr():
    sae = make("jumprelu", threshold_lr_scale=10.0)
    assert sae.adam_betas[0] == 0.0
    groups = sae.param_groups(1e-3)
    assert groups[1]["params"] == [sae.log_threshold] and groups[1]["lr"] == pytest.approx(1e-2)
    assert sum(len(g["params"]) for g in groups) == len(list(sae.parameters()))


def test_relu_l1_warms_up_without_control():
    sae = make("relu", l1=2.0, l1_warmup_frac=0.1, target_l0=1.0, l0_controller_rate=0.5)
    x = torch.randn(64, 32)
    out = sae.training_forward(x, 5, 100)  # half-way through the 10-step warm-up
    assert float(out.stats["l1_coeff"]) == pytest.approx(1.0)
    sae.after_optimizer_step()
    assert float(sae.l1_coeff) == pytest.approx(2.0)  # no control during warm-up


@pytest.mark.parametrize("latents", ["dense", "sparse"])
def test_l1_balance_is_where_the_loss_is_flat_along_the_latent_scale(latents):
    """λ_bal against autograd: scale every latent by s; d/ds at s = 1 of the MSE and of the L1 term are the
    recorded slopes, and mse + λ_bal·l1 is flat there."""
    sae = make("relu", l1=0.5, target_l0=4.0)
    sae.latent_path = latents
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # a sparse code, so that the sparse path is a real one
    x = torch.randn(128, 32) + 0.3
    out = sae.training_forward(x, 50, 100)
    assert sae.path[0] == latents
    f = sae.encode(x).detach()
    s = torch.ones((), requires_grad=True)
    x_hat = (s * f) @ sae.W_dec + sae.b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l1 = ((s * f) @ sae.W_dec.norm(dim=1)).mean()
    slopes = torch.stack([torch.autograd.grad(term, s, retain_graph=True)[0] for term in (mse, l1)])
    torch.testing.assert_close(sae.last_slopes, slopes.detach(), rtol=1e-4, atol=1e-5)
    balance = float(out.stats["l1_balance"])
    assert balance == pytest.approx(float(-slopes[0] / slopes[1]), rel=1e-4)
    assert float(torch.autograd.grad(mse + balance * l1, s)[0]) == pytest.approx(0.0, abs=1e-3)


def test_a_checkpoint_without_the_controllers_slopes_still_loads():
    sae = make("relu", target_l0=4.0)
    sae.training_forward(torch.randn(64, 32), 0, 10)
    sae.after_optimizer_step()
    state = {k: v for k, v in sae.state_dict().items() if k not in ("last_slopes", "slopes_ema")}
    fresh = make("relu", target_l0=4.0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.l1_coeff, sae.l1_coeff) and not fresh.slopes_ema.any()


def controlled_step(sae, x: torch.Tensor) -> tuple[float, dict]:
    """One training step with the controller on from step 0; (λ's factor, the step's stats)."""
    before = float(sae.l1_coeff)
    out = sae.training_forward(x, 0, 100)
    sae.after_optimizer_step()
    return float(sae.l1_coeff) / before, {k: float(v) for k, v in out.stats.items()}


def test_l1_controller_steps_while_the_push_is_short():
    """After one step the slopes' EMA is 0.1·the batch's, so λ_bal is the batch's: the factor by hand."""
    x = torch.randn(256, 32) + 0.3
    for l1, target in ((1e-3, 1.0), (50.0, 80.0)):  # too weak a shrink (L0 high); too strong (L0 low)
        sae = make("relu", l1=l1, l1_warmup_frac=0.0, target_l0=target, l0_controller_rate=0.5)
        with torch.no_grad():
            sae.W_enc.mul_(0.2)  # reconstructions too small: the MSE asks the latents to grow (λ_bal > 0)
        factor, stats = controlled_step(sae, x)
        gap = math.log(stats["l0"] / target)
        asked = stats["l1_balance"] * max(1 + 2.0 * gap, 0.0)
        assert stats["l1_balance"] > 0 and (asked - l1) * gap > 0  # the push is short
        assert factor == pytest.approx(math.exp(0.5 * gap), rel=1e-5)
        assert (factor > 1) == (gap > 0)


def test_l1_controller_holds_while_the_sae_already_gets_the_push():
    x = torch.randn(256, 32) + 0.3
    # A fresh SAE's reconstructions are too large: the MSE alone shrinks its latents (λ_bal < 0), so λ holds
    # although L0 is far above the target (a plain integrator would raise it: windup).
    sae = make("relu", l1=0.5, l1_warmup_frac=0.0, target_l0=1.0)
    with torch.no_grad():
        sae.W_enc.mul_(3.0)
    factor, stats = controlled_step(sae, x)
    assert stats["l1_balance"] < 0 and stats["l0"] > 10 and factor == 1.0
    # λ far above λ_bal: the shrink push exceeds 1 + push·ln(L0/target), so λ holds too.
    sae = make("relu", l1=1e3, l1_warmup_frac=0.0, target_l0=1.0)
    with torch.no_grad():
        sae.W_enc.mul_(0.2)
    factor, stats = controlled_step(sae, x)
    gap = math.log(stats["l0"] / 1.0)
    assert 0 < stats["l1_balance"] * (1 + 2.0 * gap) < 1e3 and gap > 0 and factor == 1.0


def test_l1_balance_weighs_each_batch_as_the_clipped_gradient_does():
    """Clipping scales a batch's gradient by c, so the optimizer's balance weighs that batch's slopes by c:
    λ_bal of the EMA is −Σ w·c·m / Σ w·c·L1 over the batches (EMA weights w)."""
    sae = make("relu", l1=0.5, l1_warmup_frac=0.0, target_l0=4.0)
    batches = [torch.randn(128, 32) + 0.3, 3.0 * torch.randn(128, 32)]  # the second: outlier-sized tokens
    weighted = torch.zeros(2)
    for x, c in zip(batches, (1.0, 0.1), strict=True):
        sae.training_forward(x, 50, 100)
        weighted = 0.9 * weighted + 0.1 * c * sae.last_slopes
        sae.after_optimizer_step(torch.tensor(c))
    torch.testing.assert_close(sae.slopes_ema, weighted)
    assert float(balance(sae.slopes_ema)) == pytest.approx(float(-weighted[0] / weighted[1]), rel=1e-6)


def test_relu_l1_term_weights_by_decoder_norm():
    sae = make("relu", l1=3.0, l1_warmup_frac=0.0)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    x = torch.randn(16, 32)
    out = sae.training_forward(x, 0, 10)
    f = torch.relu(sae.pre_acts(x))
    torch.testing.assert_close(out.losses["l1"], 3.0 * (f * 2.0).sum(-1).mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "hparams", "message"),
    [
        ("topk", {"k": 96}, "k must be an integer with 0 < k < d_sae = 96"),
        ("topk", {"k": 0}, "k must be an integer with 0 < k < d_sae = 96"),
        ("relu", {"l1": 0.0}, "l1 coefficient must be positive"),
        ("relu", {"lambda": 1.0}, "unknown hyper-parameter(s) lambda for method relu"),
        ("jumprelu", {"sparsity": "target"}, "needs a positive target_l0"),
        ("atm", {"combine": "max"}, "combine must be 'product' or 'mean'"),
        ("nope", {}, "unknown method 'nope'; known methods: atm, jumprelu, matryoshka, relu, topk"),
    ],
)
def test_bad_hyper_parameters_are_user_errors(method, hparams, message):
    with pytest.raises(UserError) as e:
        make_sae(SAEConfig(method, 32, 96, hparams))
    assert message in str(e.value)
