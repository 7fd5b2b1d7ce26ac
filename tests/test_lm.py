"""lm.py: model resolution, residual capture (== hidden_states[L+1], exactly), early stop, splice."""

import shutil

import pytest
import torch

from atmpipe.errors import UserError
from atmpipe.lm import capture, forward_with_splice, load_lm

ARCHS = ["gemma2", "gemma3"]


@pytest.fixture(scope="module")
def lms(tiny_checkpoints):
    return {arch: load_lm(str(path)) for arch, path in tiny_checkpoints.items()}


def _ids(lm, batch=3, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm.tokenizer.vocab_size, (batch, seq), generator=g)
    ids[:, 0] = lm.bos_token_id
    return ids


def test_load_local_checkpoint(lms, tiny_checkpoints):
    lm = lms["gemma3"]
    assert (lm.n_layers, lm.d_model, lm.bos_token_id) == (4, 32, 2)
    assert lm.dtype == torch.float32 and lm.device.type == "cpu" and not lm.model.training
    assert lm.source == str(tiny_checkpoints["gemma3"])
    assert lm.config_hash == load_lm(str(tiny_checkpoints["gemma3"])).config_hash
    assert lm.config_hash != lms["gemma2"].config_hash
    assert load_lm(str(tiny_checkpoints["gemma3"]), dtype="bfloat16").dtype == torch.bfloat16


def test_config_hash_ignores_where_the_model_was_loaded_from(lms, tiny_checkpoints, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_checkpoints["gemma3"], moved)
    assert load_lm(str(moved)).config_hash == lms["gemma3"].config_hash


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", [[0], [2], [1, 3], [0, 2, 3]])
@pytest.mark.parametrize("early_stop", [True, False])
def test_capture_equals_hidden_states(lms, arch, layers, early_stop):
    lm = lms[arch]
    ids = _ids(lm)
    with torch.inference_mode():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    got = capture(lm, ids, layers, early_stop=early_stop)
    assert sorted(got) == layers
    for layer in layers:
        if layer == lm.n_layers - 1:
            continue  # transformers applies the final norm to the last entry of hidden_states
        assert torch.equal(got[layer], hidden[layer + 1]), (arch, layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_last_layer_is_pre_norm(lms, arch):
    lm = lms[arch]
    ids = _ids(lm)
    last = lm.n_layers - 1
    got = capture(lm, ids, [last])[last]
    with torch.inference_mode():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
        assert torch.equal(lm.model.model.norm(got), hidden[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stop_runs_no_later_layer(lms, arch):
    lm = lms[arch]
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(lm.blocks)]
    try:
        capture(lm, _ids(lm), [1])
        assert ran == [0, 1]
        ran.clear()
        capture(lm, _ids(lm), [1], early_stop=False)
        assert ran == [0, 1, 2, 3]
    finally:
        for h in handles:
            h.remove()


def test_capture_with_attention_mask_matches(lms):
    lm = lms["gemma2"]
    ids = _ids(lm)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        hidden = lm.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(capture(lm, ids, [2], attention_mask=mask)[2], hidden[3])


@pytest.mark.parametrize("arch", ARCHS)
def test_splice_identity_and_reference(lms, arch):
    lm = lms[arch]
    ids = _ids(lm)
    with torch.inference_mode():
        full = lm.model(ids).logits
    assert torch.equal(forward_with_splice(lm, ids, 1, lambda r: r), full)

    # Splicing the last layer: logits must equal the unembedding of the spliced residual, by hand.
    last, delta = lm.n_layers - 1, torch.randn(lm.d_model)
    spliced = forward_with_splice(lm, ids, last, lambda r: r + delta)
    with torch.inference_mode():
        resid = capture(lm, ids, [last])[last] + delta
        ref = lm.model.lm_head(lm.model.model.norm(resid))
        cap = getattr(lm.model.config, "final_logit_softcapping", None)
        if cap:
            ref = torch.tanh(ref / cap) * cap
    torch.testing.assert_close(spliced, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spliced, full)


def test_layer_out_of_range(lms):
    with pytest.raises(UserError, match=r"layer 4 is out of range: .* has 4 layers \(0\.\.3\)"):
        capture(lms["gemma3"], _ids(lms["gemma3"]), [1, 4])


def test_unknown_model():
    with pytest.raises(UserError, match="unknown model 'no-such-model'; pass gemma-3-270m, gemma-2-2b"):
        load_lm("no-such-model")


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="model path .*nothing.gguf does not exist"):
        load_lm(str(tmp_path / "nothing.gguf"))
    with pytest.raises(UserError, match="has no config.json, so it is not a model checkpoint"):
        load_lm(str(tmp_path))


def test_hub_unreachable_says_what_to_pass(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        UserError, match=r"cannot reach the Hugging Face hub to download 'google/gemma-2-2b'.*local"
    ):
        load_lm("gemma-2-2b")
