"""`atmpipe inspect --text FILE`: the user's own texts, run through the LM once at build time (cached per
model, layer and text), and which latents fire on each of their tokens in every SAE.

The texts are the file's paragraphs (separated by blank lines), each cut at MAX_TOKENS tokens. The residual
stream after the SAEs' layer is taken exactly as the harvest takes it (BOS first, BOS itself not scored);
each SAE then encodes it, and each token keeps its PER_TOKEN latents with the largest activation as a share
of the latent's own max on the held-out split (raw activations put dense latents first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from atmpipe.errors import UserError
from atmpipe.lm import capture

MAX_TOKENS = 256  # tokens per text (a longer paragraph is cut)
PER_TOKEN = 5  # latents kept per token and SAE


def read_texts(path: str) -> list[str]:
    """The file's paragraphs, refused when the file is missing or holds no text."""
    file = Path(path)
    try:
        content = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --text {file} ({e}); pass a UTF-8 text file") from None
    texts = [t.strip() for t in content.replace("\r\n", "\n").split("\n\n") if t.strip()]
    if not texts:
        raise UserError(f"--text {file} holds no text; write one or more paragraphs into it")
    return texts


def residuals(lm, layer: int, texts: list[str], cache) -> list[tuple[list[int], torch.Tensor]]:
    """Per text: its token ids (BOS first) and the residual after block `layer` ([tokens, d_model])."""

    def compute() -> tuple[dict, dict]:
        runs = [residual(lm, layer, text) for text in texts]
        return {f"t{i}": resid for i, (_, resid) in enumerate(runs)}, {"ids": [ids for ids, _ in runs]}

    tensors, extra = cache.get_or_compute(
        "inspect-texts", {"texts": texts, "max_tokens": MAX_TOKENS}, compute
    )
    return [(ids, tensors[f"t{i}"]) for i, ids in enumerate(extra["ids"])]


@torch.no_grad()
def residual(lm, layer: int, text: str) -> tuple[list[int], torch.Tensor]:
    """One text's token ids (BOS first, cut at MAX_TOKENS) and its residual after block `layer`."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: MAX_TOKENS - 1]
    ids = [lm.bos_token_id, *ids]
    return ids, capture(lm, torch.tensor([ids]), [layer])[layer][0].float().cpu()


@torch.no_grad()
def text_view(saes: list, maxes: list[np.ndarray], runs: list[tuple[list[int], torch.Tensor]]) -> list[dict]:
    """Per text: its token ids and, per SAE and token, [[latent, activation, share of its max], ...]."""
    out = []
    for ids, resid in runs:
        per_sae = []
        for sae, vmax in zip(saes, maxes, strict=True):
            f = sae.encode(resid).float().numpy()
            f[0] = 0  # BOS, never scored
            share = f / np.maximum(vmax, 1e-12)
            top = np.argsort(-share, axis=1, kind="stable")[:, :PER_TOKEN]
            per_sae.append(
                [
                    [
                        [int(j), round(float(f[t, j]), 3), round(float(share[t, j]), 3)]
                        for j in top[t]
                        if f[t, j] > 0
                    ]
                    for t in range(len(ids))
                ]
            )
        out.append({"ids": ids, "latents": per_sae})
    return out
