"""Matryoshka BatchTopK: its loss against a slow reference (one decode per prefix), its selection against a
sort of the whole batch, its groups and its hyper-parameter errors. (Sparse = dense path: test_sae_sparse;
save/load and SAELens: test_sae_io; resume: test_train; DDP: test_distributed; SAELens's own training SAE:
test_matryoshka_saelens.)"""

from __future__ import annotations

import pytest
import torch
from sae_helpers import make, planted

from atmpipe.errors import UserError
from atmpipe.sae.matryoshka import MatryoshkaSAE

PREFIXES = [0.125, 0.5, 1.0]  # 12 / 48 / 96 latents


def _sae(**hparams) -> MatryoshkaSAE:
    sae = make("matryoshka", **{"k": 4, "prefix_fractions": PREFIXES, **hparams}).double()
    with torch.no_grad():  # biases of both signs: some latents always win, some never fire
        sae.b_enc.copy_(0.3 * torch.randn(sae.cfg.d_sae, dtype=torch.float64))
    return sae


def reference_loss(
    sae: MatryoshkaSAE, x: torch.Tensor, dead: torch.Tensor | None
) -> tuple[torch.Tensor, dict]:
    """The loss written out plainly: dense pre-activations, BatchTopK by sorting the whole flattened batch,
    one dense decode per prefix, each prefix's squared error summed; AuxK as TopK's."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    acts = pre.relu()
    n = x.shape[0]
    order = acts.detach().flatten().argsort(descending=True)[: sae.hp.k * n]
    keep = torch.zeros(acts.numel(), dtype=torch.bool)
    keep[order] = True
    f = acts * keep.view_as(acts)
    losses = []
    for width in sae.widths:
        x_hat = f[:, :width] @ sae.W_dec[:width] + sae.b_dec
        losses.append((x_hat - x).pow(2).sum(-1).mean())
    total = torch.stack(losses).sum()
    if dead is not None:
        masked = pre.masked_fill(~dead, float("-inf"))
        vals, idx = masked.topk(sae.aux_k, dim=-1)
        aux_f = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        residual = (x - x_hat).detach()
        scale = min(int(dead.sum()) / sae.aux_k, 1.0)
        total = total + sae.hp.aux_coeff * scale * (aux_f @ sae.W_dec - residual).pow(2).sum(-1).mean()
    return total, {"prefix_mse": [float(v) for v in losses], "kept_min": float(f.detach()[f > 0].min())}


@pytest.mark.parametrize("latents", ["sparse", "dense"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_loss_and_gradients_equal_one_decode_per_prefix(latents, with_dead):
    x, _ = planted(256, seed=4)
    x = x.double() * 3
    sae, ref = _sae(), _sae()
    sae.latent_path = latents
    dead = None
    if with_dead:  # a third of the latents dead (the clock says so): AuxK runs
        dead = torch.arange(sae.cfg.d_sae) % 3 == 0
        for s in (sae, ref):
            s.tokens_since_fired.masked_fill_(dead, s.hp.dead_tokens)
    out = sae.training_forward(x, 0, 10)
    assert sae.path[0] == latents
    assert ("aux" in out.losses) == with_dead
    loss = sum(out.losses.values())
    loss.backward()
    ref_loss, parts = reference_loss(ref, x, dead)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for (name, p), q in zip(sae.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    # The logged terms: the full width as mse, each inner prefix under its width.
    assert float(out.losses["mse"]) == pytest.approx(parts["prefix_mse"][-1], rel=1e-12)
    assert [float(out.stats[f"mse_{w}"]) for w in sae.widths[:-1]] == pytest.approx(parts["prefix_mse"][:-1])
    assert float(out.stats["l0"]) == sae.hp.k  # k·batch entries kept, all positive here
    assert float(sae.running_threshold) == pytest.approx(parts["kept_min"], rel=1e-12)  # the first batch's


@pytest.mark.parametrize("guess", ["none", "below", "above"])
def test_the_selection_is_the_top_k_batch_whatever_the_guess_it_starts_from(guess):
    """The candidate pass starts from last step's cutoff: below it, the cutoff is exact; above it (too few
    candidates), it falls back to every positive entry. Either way the kept set is the sort's."""
    sae = _sae(k=6)
    x, _ = planted(300, seed=2)
    raw, _ = sae.train_pre_acts_parts(x.double())
    pre = raw + sae.b_enc.detach()
    true_cutoff = pre.flatten().topk(6 * 300).values.min()
    sae.last_cutoff.fill_(
        {"none": 0.0, "below": float(true_cutoff) * 1.1, "above": float(true_cutoff) * 3}[guess]
    )
    e = sae._select(raw)
    expected = (pre >= true_cutoff).nonzero()
    assert torch.equal(torch.stack([e.rows, e.cols], 1), expected)  # row-major, as the decode needs
    assert len(e.cols) == 6 * 300 and float(sae.last_cutoff) == float(true_cutoff)
    assert torch.equal(
        e.crow, torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(e.rows, minlength=300).cumsum(0)])
    )


def test_fewer_positive_entries_than_k_batch_keeps_them_all():
    sae = _sae()
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)
        sae.b_enc[:3] = 1.0  # three latents can fire, k = 4
    x, _ = planted(64, seed=1)
    raw, _ = sae.train_pre_acts_parts(x.double())
    e = sae._select(raw)
    assert torch.equal(e.cols.unique(), torch.tensor([0, 1, 2])) and len(e.cols) == int(
        ((raw + sae.b_enc) > 0).sum()
    )


def test_threshold_is_the_first_kept_minimum_then_its_ema():
    sae = _sae(threshold_beta=0.9)
    mins = []
    for seed in range(3):
        x, _ = planted(128, seed=seed)
        x = x.double() * 3
        with torch.no_grad():
            _, parts = reference_loss(sae, x, None)
            sae.training_forward(x, seed, 10)
        mins.append(parts["kept_min"])
    expected = mins[0]
    for m in mins[1:]:
        expected = 0.9 * expected + 0.1 * m
    assert float(sae.running_threshold) == pytest.approx(expected, rel=1e-12)
    # Inference is the JumpReLU with that threshold.
    x, _ = planted(32, seed=9)
    pre = sae.pre_acts(x.double())
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x.double()), pre * (pre > expected))


def test_latent_groups_follow_the_prefix_widths():
    sae = make("matryoshka", k=4, d_sae=100, prefix_fractions=[0.1, 0.35, 1])
    assert sae.widths == [10, 35, 100]
    assert sae.latent_groups().tolist() == [0] * 10 + [1] * 25 + [2] * 65
    recipe = make("matryoshka", k=64, d_sae=5120)  # the default nesting, the public releases'
    assert recipe.widths == [20, 80, 320, 1280, 5120]


FRACTIONS = "prefix_fractions must be a list of fractions of d_sae in (0, 1], the last 1 (got "
WIDTHS = "; they must be at least 1 and strictly increasing: use fewer or wider prefixes"
BAD_PREFIXES = [  # hyper-parameters, the error's message
    ({"prefix_fractions": [0.5, 0.9]},
     FRACTIONS + "[0.5, 0.9]); pass e.g. --hparam 'prefix_fractions=[0.0625, 0.25, 1]'"),
    ({"prefix_fractions": [0, 1]}, FRACTIONS + "[0, 1]); pass e.g. --hparam 'prefix_fractions=[0.0625, 0.25, 1]'"),
    ({"prefix_fractions": [0.5, 0.25, 1]},
     "prefix_fractions [0.5, 0.25, 1] give prefix widths [48, 24, 96] of d_sae = 96" + WIDTHS),
    ({},  # the default nesting needs d_sae ≥ 256
     "prefix_fractions [0.00390625, 0.015625, 0.0625, 0.25, 1.0] give prefix widths [0, 2, 6, 24, 96] of d_sae = 96"
     + WIDTHS),
    ({"batch_topk": False, "prefix_fractions": PREFIXES},
     "matryoshka always selects by BatchTopK; drop batch_topk from its hyper-parameters"),
]  # fmt: skip


@pytest.mark.parametrize(("hparams", "message"), BAD_PREFIXES)
def test_impossible_prefixes_are_user_errors(hparams, message):
    with pytest.raises(UserError) as e:
        make("matryoshka", k=4, **hparams)
    assert str(e.value) == message
