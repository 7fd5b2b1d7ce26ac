"""Shared fixtures: tiny randomly initialised Gemma-2 / Gemma-3 checkpoints with a small real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_VOCAB = 300


def tiny_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained in a second on `texts`, with Gemma's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_model(arch: str, n_layers: int = 4, seed: int = 0):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=8,  # smaller than the windows, so the local-attention layers really are local
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    if arch == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**common)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(**common)).eval()


SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "Sparse autoencoders decompose the residual stream of a language model into features.",
    "BBC News reported that the markets rose on Tuesday after the central bank's decision.",
    "Wikipedia articles about history, science and the arts make a varied English corpus.",
] * 20


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{"gemma2": dir, "gemma3": dir}: local checkpoints (config, safetensors, tokenizer) of tiny models."""
    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = tiny_tokenizer(SAMPLE_TEXT)
    out = {}
    for arch in ("gemma2", "gemma3"):
        path = root / arch
        tiny_model(arch).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[arch] = path
    return out
