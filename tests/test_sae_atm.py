"""ATM: the fused statistics + masking kernel against its eager reference, the EMA equations, masking rules."""

from __future__ import annotations

import math

import pytest
import torch
from sae_helpers import make, planted, train

from atmpipe.errors import UserError
from atmpipe.sae import SAE, compiling, kernels

# One shape and one set of constants for every compiled call here, so torch.compile compiles once.
B, D = 256, 96
CONSTS = {"beta": 0.99, "c": 1.0, "p_max": 0.99, "combine": "product", "per_token": True}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.relu(torch.randn(B, D, generator=g) - 1.0)
    stats = [
        torch.rand(D, generator=g) * torch.rand(D, generator=g) ** 4 for _ in range(3)
    ]  # skewed importance
    return f, torch.rand(D, generator=g) + 0.5, stats


VARIANTS = {"default": {}, "log threshold": {"log_threshold": True}, "uniform": {"uniform": True}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_kernel_equals_eager_reference(variant):
    f, dec_norm, (M, F, R) = _inputs()
    recon, r, key = torch.tensor(3.0), torch.tensor(1.0), torch.tensor(kernels.step_key(7, 1234))
    consts = {**CONSTS, **VARIANTS[variant]}
    fused = kernels.atm_update_fused(f, dec_norm, M, F, R, recon, r, key, **consts)
    eager = kernels.atm_update(f, dec_norm, M, F, R, recon, r, key, **consts)
    for name, a, b in zip(("M", "F", "R", "I", "theta", "p"), fused[:6], eager[:6], strict=True):
        # p = 1 − exp(−r(θ − I)/θ): θ − I cancels, so p carries the absolute round-off of θ (~1e-7 at θ's
        # scale) whichever order the two kernels sum in; on log importance a small p then differs relatively.
        atol = 1e-6 if name == "p" else 1e-7
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=name)
    # The masks come from the same counter-based noise: they may differ only where u is within round-off of p.
    u = kernels.uniform_noise((B, D), key, f.device)
    differ = fused[6] != eager[6]
    gap = (u - eager[5].expand(B, D))[differ].abs()
    assert gap.numel() == 0 or float(gap.max()) < 1e-5
    assert 0 < (eager[6] == 0).float().mean() < 1  # the case actually masks something


@pytest.mark.parametrize(
    "controls", [{}, {"threshold": "log", "targeting": "uniform"}], ids=["default", "controls"]
)
def test_compiled_training_path_equals_eager(controls, monkeypatch):
    x, _ = planted(4096)
    runs = []
    for flag in (True, False):  # the compile switch (compiling.py), as `atmpipe train --no-compile` sets it
        monkeypatch.setattr(compiling, "_compile", flag)
        runs.append(train(make("atm", l1=1.0, warmup_steps=2, **controls), x, 12))
    for name in ("W_enc", "W_dec", "b_enc", "atm_M", "atm_F", "atm_R", "atm_p"):
        torch.testing.assert_close(
            getattr(runs[0], name), getattr(runs[1], name), rtol=1e-4, atol=1e-6, msg=name
        )


HAND_M, HAND_F, HAND_R = [1.5, 0.5, 1.0], [0.75, 0.25, 0.5], [0.6, 0.1, 0.35]


def test_statistics_follow_the_ema_equations_by_hand():
    f = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    dec_norm = torch.tensor([1.0, 2.0, 1.0])
    M0, F0, R0 = torch.ones(3), torch.full((3,), 0.5), torch.full((3,), 0.2)
    out = kernels.atm_update(
        f, dec_norm, M0, F0, R0, torch.tensor(2.0), torch.tensor(2.0), torch.tensor(0),
        beta=0.5, c=0.5, p_max=0.8, combine="product", per_token=True,
    )  # fmt: skip
    M, F, R, imp, theta, p, _ = out
    # mean_t f = [2, 0, 1]; fired fraction = [1, 0, .5]; mean_t f·‖W_dec‖ / recon_norm 2 = [1, 0, .5]
    torch.testing.assert_close(M, torch.tensor([1.5, 0.5, 1.0]))
    torch.testing.assert_close(F, torch.tensor([0.75, 0.25, 0.5]))
    torch.testing.assert_close(R, torch.tensor([0.6, 0.1, 0.35]))
    want_imp = [
        (m / 1.0) * (fr / 0.5) * (rr / (1.05 / 3)) for m, fr, rr in zip(HAND_M, HAND_F, HAND_R, strict=True)
    ]
    torch.testing.assert_close(imp, torch.tensor(want_imp))
    mu = sum(want_imp) / 3
    want_theta = mu + 0.5 * math.sqrt(sum((i - mu) ** 2 for i in want_imp) / 3)
    assert float(theta) == pytest.approx(want_theta, rel=1e-6)
    want_p = [
        0.0 if i >= want_theta else min(1 - math.exp(-2 * (want_theta - i) / want_theta), 0.8)
        for i in want_imp
    ]
    assert want_p[0] == 0.0 and want_p[1] == 0.8 and 0 < want_p[2] < 0.8  # all three branches covered
    torch.testing.assert_close(p, torch.tensor(want_p))
    mean = kernels.atm_update(
        f, dec_norm, M0, F0, R0, torch.tensor(2.0), torch.tensor(2.0), torch.tensor(0),
        beta=0.5, c=0.5, p_max=0.8, combine="mean", per_token=True,
    )[3]  # fmt: skip
    want_mean = [
        (m / 1.0 + fr / 0.5 + rr / (1.05 / 3)) / 3 for m, fr, rr in zip(HAND_M, HAND_F, HAND_R, strict=True)
    ]
    torch.testing.assert_close(mean, torch.tensor(want_mean))


def _masked(c: float, r: float, per_token: bool = True):
    f, dec_norm, (M, F, R) = _inputs(1)
    big = torch.zeros(4096, D)  # β = 1 freezes the statistics: the masks depend on c and r only
    out = kernels.atm_update(
        big, dec_norm, M, F, R, torch.tensor(1.0), torch.tensor(r), torch.tensor(kernels.step_key(0, 5)),
        beta=1.0, c=c, p_max=0.99, combine="product", per_token=per_token,
    )  # fmt: skip
    imp, theta, p, keep = out[3], out[4], out[5], out[6]
    return imp, theta, p, keep


@pytest.mark.parametrize("per_token", [True, False])
def test_masked_fraction_follows_the_formula_in_c_and_r(per_token):
    fractions = {}
    for c in (0.0, 0.5, 1.0, 2.0):
        for r in (0.5, 1.0, 2.0, 5.0):
            imp, theta, p, keep = _masked(c, r, per_token)
            mu, sd = imp.mean(), imp.std(correction=0)
            torch.testing.assert_close(theta, mu + c * sd)
            expected_p = torch.where(imp < theta, 1 - torch.exp(-r * (theta - imp) / theta), 0.0).clamp(
                max=0.99
            )
            torch.testing.assert_close(p, expected_p)
            realised = (keep == 0).float().mean(0) if per_token else (keep == 0).float()
            if per_token:  # per latent, the masked share of 4096 tokens estimates p_i
                assert (realised - p).abs().max() < 0.04
            fractions[c, r] = float(p.mean())
    for c in (0.0, 0.5, 1.0, 2.0):  # more masking with larger r ...
        assert all(fractions[c, a] < fractions[c, b] for a, b in [(0.5, 1.0), (1.0, 2.0), (2.0, 5.0)])
    for r in (0.5, 1.0, 2.0, 5.0):  # ... and with a higher threshold
        assert all(fractions[a, r] <= fractions[b, r] for a, b in [(0.0, 0.5), (0.5, 1.0), (1.0, 2.0)])


def test_no_masking_during_warmup_then_a_linear_ramp():
    sae = make("atm", mask_warmup_steps=10, r=2.0)
    assert [sae.rate_at(s, 100) for s in (0, 9, 10, 15, 20, 40)] == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0]
    x = torch.randn(64, 32) * 3
    out = sae.training_forward(x, 5, 100)
    torch.testing.assert_close(out.x_hat, sae.decode(torch.relu(sae.pre_acts(x))))
    assert float(out.stats["masked_frac"]) == 0.0
    out = sae.training_forward(x, 15, 100)  # r = 1 now: latents below θ get masked
    assert float(out.stats["masked_frac"]) > 0
    assert not torch.allclose(out.x_hat, sae.decode(out.f))


def test_eval_mode_and_inference_never_mask():
    sae = make("atm", mask_warmup_steps=0, r=5.0)
    x = torch.randn(64, 32) * 3
    for step in range(3):
        sae.training_forward(x, step, 10)
    assert float(sae.atm_p.mean()) > 0.3
    assert torch.equal(sae.encode(x), torch.relu(sae.pre_acts(x)))  # encode ignores the masks
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.eval()
    out = sae.training_forward(x, 5, 10)
    torch.testing.assert_close(out.x_hat, sae(x))
    assert "masked_frac" not in out.stats
    for k, v in sae.state_dict().items():  # statistics frozen outside training (the dead-latent clock aside)
        if k.startswith("atm_"):
            assert torch.equal(v, before[k]), k


def test_masking_warmup_is_capped_for_short_runs():
    sae = make("atm", mask_warmup_steps=1000, r=1.0)  # mask_warmup_frac 0.1: W = 20 in a 200-step run
    assert sae.masking_warmup(200) == 20 and sae.masking_warmup(100_000) == 1000
    assert [sae.rate_at(s, 200) for s in (0, 19, 20, 30, 40, 199)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    x = torch.randn(64, 32) * 3
    assert float(sae.training_forward(x, 19, 200).stats["masked_frac"]) == 0.0
    out = sae.training_forward(x, 40, 200)
    assert float(out.stats["masked_frac"]) > 0 and not torch.allclose(out.x_hat, sae.decode(out.f))


def _probabilities(imp, r=1.0, c=1.0, p_max=0.99, **kw):
    return kernels.atm_probabilities(torch.tensor(imp), torch.tensor(r), c, p_max, **kw)


def test_uniform_targeting_gives_every_latent_the_mean_adaptive_p():
    f, dec_norm, (M, F, R) = _inputs(1)
    args = (f, dec_norm, M, F, R, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(kernels.step_key(0, 5)))
    adaptive = kernels.atm_update(*args, **CONSTS)
    uniform = kernels.atm_update(*args, **CONSTS, uniform=True)
    for a, b in zip(adaptive[:5], uniform[:5], strict=True):  # statistics, importance and θ are the same
        torch.testing.assert_close(a, b)
    p_adaptive, p_uniform = adaptive[5], uniform[5]
    assert float(p_adaptive.std()) > 0.1  # the adaptive p really differ across latents here
    assert torch.equal(p_uniform, p_uniform[:1].expand(D))
    assert float(p_uniform[0]) == pytest.approx(float(p_adaptive.mean()), rel=1e-6)
    realised = (uniform[6] == 0).float().mean(0)  # every latent is dropped at that one rate
    assert (realised - p_uniform).abs().max() < 0.12 and abs(float(realised.mean() - p_uniform[0])) < 0.01


# A heavy tail by hand: log I = −2 (four latents), 0 (three), 4 (one). Mean of log I −0.5, std √3.75.
HEAVY = [math.exp(-2)] * 4 + [1.0] * 3 + [math.exp(4)]


def test_log_threshold_on_a_hand_computed_heavy_tailed_case():
    # linear: mean(I) 7.27 and std 17.8 put θ = 25.1 above every latent but the tail, and p is nearly flat.
    theta, p = _probabilities(HEAVY)
    mu = sum(HEAVY) / 8
    want_theta = mu + math.sqrt(sum((i - mu) ** 2 for i in HEAVY) / 8)
    assert float(theta) == pytest.approx(want_theta, rel=1e-5)
    assert 0.61 < float(p[:7].min()) and float(p[:7].max()) < 0.64 and float(p[7]) == 0.0
    # log: θ_s = −0.5 + √3.75 = 1.436, so 7 of 8 below θ and p = 1 − exp(−(c − z)) with z = (s + 0.5)/√3.75.
    theta, p = _probabilities(HEAVY, log_threshold=True)
    sd = math.sqrt(3.75)
    assert float(theta) == pytest.approx(math.exp(-0.5 + sd), rel=1e-4)
    want = [1 - math.exp(-(1 - (s + 0.5) / sd)) for s in (-2, 0)]  # 0.830 and 0.524
    torch.testing.assert_close(p, torch.tensor([want[0]] * 4 + [want[1]] * 3 + [0.0]), rtol=1e-4, atol=1e-5)
    assert float((torch.tensor(HEAVY) < theta).float().mean()) == 7 / 8
    # At c = 0 the threshold is the mean of log I: half the latents (those at −2) are below it, against
    # 7 of 8 below the linear mean of I.
    theta0, p0 = _probabilities(HEAVY, c=0.0, log_threshold=True)
    assert float((torch.tensor(HEAVY) < theta0).float().mean()) == 4 / 8 and float(p0[4:].max()) == 0.0
    assert float((torch.tensor(HEAVY) < _probabilities(HEAVY, c=0.0)[0]).float().mean()) == 7 / 8
    # Scale-free: multiplying I by 1000 leaves the log-threshold p unchanged (up to the 1e-6 floor).
    torch.testing.assert_close(
        _probabilities([i * 1000 for i in HEAVY], log_threshold=True)[1], p, rtol=1e-4, atol=1e-5
    )


def test_combine_mean_bounds_the_tail():
    """combine = "mean": I is the average of three mean-1 factors, so mean(I) is exactly 1 and no latent's I
    is below a third of its largest factor (a latent strong in one statistic is never close to I = 0), and
    none above the mean of its factors' maxima; the product multiplies the tails. On these skewed statistics
    the product's largest I is 75× its mean, the mean's 4.6×, and θ = mean + std leaves 2% of the latents
    unmasked under the product against 13% under the mean."""
    f, dec_norm, (M, F, R) = _inputs()
    args = (f, dec_norm, M, F, R, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0))
    consts = {**CONSTS, "beta": 1.0}  # β = 1: the skewed statistics as they are
    product = kernels.atm_update(*args, **consts)[3]
    mean = kernels.atm_update(*args, **{**consts, "combine": "mean"})[3]
    factors = torch.stack([M / M.mean(), F / F.mean(), R / R.mean()])
    assert float(mean.mean()) == pytest.approx(1.0, rel=1e-6)
    assert bool((mean >= factors.max(0).values / 3 - 1e-6).all())
    assert bool((mean <= factors.max(1).values.sum() / 3 + 1e-6).all())
    assert float(product.max() / product.mean()) > 50 and float(mean.max() / mean.mean()) < 5
    above = [float((i >= i.mean() + i.std(correction=0)).float().mean()) for i in (product, mean)]
    assert above[0] < 0.03 and above[1] > 0.1


def test_the_mask_warmup_old_names_still_read(tmp_path):
    """`warmup_steps` / `warmup_frac` (the mask warm-up's names before it got its own) are read as
    `mask_warmup_*`, in a saved SAE's hparams too; given with the new name as well, they are refused."""
    old = make("atm", warmup_steps=7, warmup_frac=0.5)
    assert (old.hp.mask_warmup_steps, old.hp.mask_warmup_frac) == (7, 0.5)
    path = old.save(tmp_path / "sae")
    meta = tmp_path / "sae" / "atmpipe.json"
    saved = meta.read_text()
    assert '"mask_warmup_steps": 7' in saved
    meta.write_text(
        saved.replace('"mask_warmup_steps"', '"warmup_steps"')
    )  # as an SAE saved before the rename
    assert SAE.load(path).hp.mask_warmup_steps == 7
    with pytest.raises(UserError) as e:
        make("atm", warmup_steps=7, mask_warmup_steps=8)
    assert str(e.value) == "warmup_steps is the old name of mask_warmup_steps; pass only mask_warmup_steps"
