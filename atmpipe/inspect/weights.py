"""What the browser needs from the model's weights: the tied unembedding alone, and the tokenizer.

Logit effects are decoder row × unembedding, with the final RMSNorm's per-dimension gain folded into the
unembedding (as TransformerLens does): on gemma-3-270m that gain ranges from ~0 to 301, so leaving it out
ranks the wrong tokens. Only two tensors are read from the checkpoint's safetensors, never the whole LM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from atmpipe.errors import UserError
from atmpipe.lm import resolve_model

N_LOGITS = 10  # promoted and suppressed tokens per latent
N_NEIGHBOURS = 8  # nearest latents by decoder cosine
LOGIT_BINS = 40  # bins of the histogram of a latent's logit effects over the whole vocabulary
BF16_UNITS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's probes


def checkpoint_dir(model: str) -> Path:
    """The local directory of `model`'s checkpoint (converted once for the embedded model and GGUFs)."""

    _, source, _ = resolve_model(model)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download  # only for a hub model

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model"]))


def _tensor_files(ckpt: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (one file, or a sharded checkpoint's index)."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        return {k: ckpt / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            files.update({k: file for k in f.keys()})  # noqa: SIM118
    return files


def _read(files: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(files[name]), framework="pt") as f:
        return f.get_tensor(name).float()


def unembedding(ckpt: Path) -> torch.Tensor:
    """[vocab, d_model] unembedding (lm_head, or the tied embeddings) times the final norm's gain."""
    files = _tensor_files(ckpt)
    head = next((k for k in files if k.endswith("lm_head.weight")), None)
    head = head or next((k for k in files if k.endswith("embed_tokens.weight") and "vision" not in k), None)
    if head is None:
        raise UserError(
            f"checkpoint {ckpt} holds no lm_head or embed_tokens tensor; pass the SAE's model with --model"
        )
    U = _read(files, head)
    norm = [k for k in files if k.endswith("norm.weight") and "layers." not in k and "vision" not in k]
    if len(norm) == 1:
        w = _read(files, norm[0])
        config = json.loads((ckpt / "config.json").read_text())
        model_type = config.get("text_config", {}).get("model_type", config.get("model_type", ""))
        U = U * ((1.0 + w) if "gemma" in model_type else w)  # Gemma's RMSNorm scales by (1 + weight)
    return U


def product_copy(U: torch.Tensor) -> torch.Tensor:
    """U as the logit-effect product should read it: bfloat16 where the CPU has bfloat16 units (AVX-512
    BF16, AMX), else U itself: on an AVX2-only CPU a bfloat16 product takes ~3x the CPU time of float32."""
    bf16 = any(getattr(torch.cpu, probe, lambda: False)() for probe in BF16_UNITS)
    return U.to(torch.bfloat16) if bf16 else U


def logit_effects(
    W_dec: torch.Tensor,
    U: torch.Tensor,
    U_half: torch.Tensor | None = None,
    k: int = N_LOGITS,
    chunk: int = 256,
) -> dict:
    """Top-k promoted and suppressed token ids and values of W_dec @ Uᵀ, per latent, and the histogram of
    each latent's effects over the whole vocabulary (`hist_lo`, `hist_hi`, `hist`: LOGIT_BINS counts).

    The full product is the browser's largest cost (d_sae × vocab × d_model). It runs on `U_half`
    (`product_copy(U)`, made once by the caller: bfloat16 where that is faster) and picks 4k candidates
    a side; their values are then recomputed in float32, so every value shown is exact (the histogram
    bins the product as computed).
    """
    U_half = product_copy(U) if U_half is None else U_half
    out = {"pos_ids": [], "pos": [], "neg_ids": [], "neg": [], "hist_lo": [], "hist_hi": [], "hist": []}
    m = min(4 * k, U.shape[0])
    for s in range(0, W_dec.shape[0], chunk):
        w = W_dec[s : s + chunk].float()
        approx = w.to(U_half.dtype) @ U_half.T
        for key, v in zip(("hist_lo", "hist_hi", "hist"), row_histograms(approx.float()), strict=True):
            out[key].append(v)
        for side, sign in (("pos", 1.0), ("neg", -1.0)):
            cand = approx.topk(m, dim=1, largest=sign > 0).indices  # [c, m]
            exact = torch.einsum("cd,cmd->cm", w, U[cand])
            best = (sign * exact).topk(min(k, m), dim=1).indices
            out[f"{side}_ids"].append(cand.gather(1, best))
            out[side].append(exact.gather(1, best))
    return {key: torch.cat(v) for key, v in out.items()}


def row_histograms(x: torch.Tensor, bins: int = LOGIT_BINS) -> tuple[torch.Tensor, ...]:
    """Each row's min, max and counts in `bins` equal bins between them (row by row: no index tensor the
    size of the product)."""
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    # A flat row (a dead latent's zero decoder) falls into one bin.
    edges = [(float(a), float(b) if b > a else float(a) + 1.0) for a, b in zip(lo, hi, strict=True)]
    counts = torch.stack([torch.histc(r, bins, a, b) for r, (a, b) in zip(x, edges, strict=True)])
    return lo, hi, counts.long()


def nearest_latents(W_dec: torch.Tensor, k: int = N_NEIGHBOURS, chunk: int = 1024) -> tuple:
    """The k latents whose decoder rows have the highest cosine with each latent's, and those cosines."""
    W = W_dec.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, W.shape[0] - 1)
    ids, cos = [], []
    for s in range(0, W.shape[0], chunk):
        c = W[s : s + chunk] @ W.T
        c[torch.arange(c.shape[0]), torch.arange(s, s + c.shape[0])] = -2.0  # never itself
        top = c.topk(k, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    return torch.cat(ids), torch.cat(cos)


def token_strings(ckpt: Path, ids: list[int]) -> dict[int, str]:
    """Each token id decoded on its own (spaces kept; the page shows newlines and tabs as symbols).

    The fast `tokenizers` file when the checkpoint has one (a second, where transformers' wrapper takes
    several); otherwise transformers' tokenizer."""
    if (ckpt / "tokenizer.json").is_file():
        from tokenizers import Tokenizer  # heavy: only when reading tokenizer files

        tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        return {i: tok.decode([i], skip_special_tokens=False) for i in ids}
    from transformers import AutoTokenizer  # heavy: only as the fallback

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    return {i: tokenizer.decode([i]) for i in ids}
