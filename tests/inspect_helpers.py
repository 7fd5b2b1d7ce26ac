"""Inputs for the `atmpipe inspect` tests: a store of real text tokens, saved SAEs, an eval result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import SAMPLE_TEXT, tiny_tokenizer

from atmpipe.sae import SAEConfig, make_sae
from atmpipe.store import write_arrays_store

LAYER, D, CTX = 1, 32, 64  # the tiny checkpoints' hidden size is 32


def text_tokens(n: int) -> np.ndarray:
    """Real English text as token ids of the tiny tokenizer (the one saved with the tiny checkpoints)."""
    tok = tiny_tokenizer(SAMPLE_TEXT)
    ids = []
    while len(ids) < n:
        for t in SAMPLE_TEXT[:4]:
            ids += tok(t)["input_ids"]
    return np.array(ids[:n], dtype=np.int64)


def make_store(path: Path, n_eval: int = 1024, seed: int = 0):
    """Windows of CTX tokens, BOS first; activations with a shared direction per token id, so latents
    respond to tokens as real ones do."""
    rng = np.random.default_rng(seed)
    per_token = rng.normal(size=(400, D)).astype(np.float32)
    splits = {}
    for name, n in (("train", 512), ("eval", n_eval)):
        tokens = text_tokens(n)
        positions = np.arange(n) % CTX
        tokens[positions == 0] = 2  # <bos>
        acts = per_token[tokens] + 0.5 * rng.normal(size=(n, D)).astype(np.float32)
        splits[name] = {"acts": acts, "tokens": tokens, "positions": positions, "bos": positions == 0}
    return write_arrays_store(path, splits, layer=LAYER, chunk_tokens=128, shard_tokens=512)


def make_sae_dir(path: Path, method: str, model: str, d_sae: int = 96, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    hparams = {"k": 8} if method == "topk" else {}
    sae = make_sae(SAEConfig(method, D, d_sae, hparams, model_name=model, layer=LAYER))
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # sparse: most latents fire on a minority of tokens
        sae.W_dec[1] = sae.W_dec[0]  # a planted duplicate pair
        if method == "atm":
            for i, name in enumerate(("M", "F", "R", "I", "p")):
                getattr(sae, f"atm_{name}").copy_(torch.linspace(0, 1, d_sae) * (i + 1))
    sae.save(path)
    return path


def write_eval_result(path: Path, names: list[str]) -> Path:
    """An `atmpipe eval` results.json as the eval writes it: words keep their leading space (they are
    vocabulary tokens), letters carry full absorption and absorbers, `shared` holds every letter's probe F1
    (s and t pass the 0.6 gate). Words: some occur in the held-out text (" quick", " brown"), " zebra" does
    not; "Sparse" has no leading space; t has absorbers but fraction 0 (full absorption only)."""
    letters = {
        "s": {"absorption_fraction": 0.25, "full_absorption": 0.125, "n_probe_true_positives": 8, "main_latents": [3],
              "absorbers": [{"latent": 7, "words": [" sea", " small", "Sparse"]}, {"latent": 11, "words": [" sea"]}]},
        "t": {"absorption_fraction": 0.0, "full_absorption": 0.2, "n_probe_true_positives": 5, "main_latents": [5, 6],
              "absorbers": [{"latent": 9, "words": [" the", " zebra"]}]},
        "q": {"absorption_fraction": 0.5, "full_absorption": 0.0, "n_probe_true_positives": 2, "main_latents": [4],
              "absorbers": [{"latent": 7, "words": [" quick"]}]},
    }  # fmt: skip
    f1 = {chr(97 + i): round(0.3 + 0.01 * i, 2) for i in range(26)} | {"s": 0.9, "t": 0.8, "q": 0.7}
    per_sae = {n: {"absorption": {"status": "ok", "per_letter": letters}} for n in names}
    per_sae[names[-1]]["absorption"]["per_letter"] = {"s": letters["s"]}  # another SAE scores fewer letters
    shared = {"absorption": {"probe_f1": f1, "probe_f1_gate": 0.6}}
    path.write_text(json.dumps({"results": per_sae, "shared": shared}))
    return path


def word_checkpoint(path: Path) -> Path:
    """A tiny Gemma-3 whose tokenizer holds SAMPLE_TEXT's words whole (the first-letter task needs words)."""
    from conftest import tiny_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SAMPLE_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = tiny_model("gemma3").config.to_dict() | {"vocab_size": len(fast)}
    Gemma3ForCausalLM(Gemma3TextConfig(**config)).save_pretrained(path)
    fast.save_pretrained(path)
    return path
