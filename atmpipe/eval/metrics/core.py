"""The core metrics as a plug-in: reconstruction over held-out store tokens and the spliced downstream loss
(the computations are in `atmpipe.eval.compute.core`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from atmpipe.errors import UserError
from atmpipe.eval.metric import Metric, option

if TYPE_CHECKING:
    import torch  # lazy (eval/metric.py)


@dataclass
class CoreOptions:
    core_tokens: int = option(32768, "Held-out store tokens for the core metrics.")
    splice_windows: int = option(8, "Eval windows for the downstream loss.")


class Core(Metric):
    name = "core"
    Options = CoreOptions
    needs = frozenset({"store", "lm"})  # the LM only for the splice
    paper = {"mse": "ATM 0.5508", "cossim": "ATM 0.9727"}
    rows = [
        ("MSE (Σ_d, per token)", "mse", "mse"),
        ("FVU", "fvu", None),
        ("explained variance", "explained_variance", None),
        ("cosine similarity", "cossim", "cossim"),
        ("L2 ratio", "l2_ratio", None),
        ("relative reconstruction bias", "relative_reconstruction_bias", None),
        ("L0", "l0", None),
        ("L1", "l1", None),
        ("dead fraction", "frac_dead", None),
        ("dense fraction (>10%)", "frac_dense", None),
        ("max decoder cosine", "max_decoder_cosine", None),
        ("duplicate fraction (cos > 0.8)", "frac_duplicate", None),
        ("CE clean", "ce_clean", None),
        ("CE with SAE", "ce_sae", None),
        ("CE zero-ablated", "ce_zero", None),
        ("ce_loss_score", "ce_loss_score", None),
        ("kl_div_score", "kl_div_score", None),
    ]

    def collect(self, ctx) -> None:
        self.windows = splice_windows(ctx.store, self.opts.splice_windows)
        self.special = [ctx.lm.bos_token_id]
        key = {
            "windows_sha256": hashlib.sha256(self.windows.numpy().tobytes()).hexdigest(),
            "shape": list(self.windows.shape),
            "special": self.special,
        }

        def compute_base():
            from atmpipe.eval.compute import core  # lazy (eval/metric.py)

            phase = ctx.phase("splice baselines (LM)", self.windows.shape[0])
            return {}, core.baseline_losses(ctx.lm, ctx.layer, self.windows, self.special, phase)

        self.base = ctx.cached("splice-baseline", key, compute_base)[1]
        ctx.shared["sizes"]["core"] = {
            "eval_tokens_read": min(ctx.store.split("eval").n_tokens, self.opts.core_tokens),
            "splice_windows": int(self.windows.shape[0]),
            "context": int(self.windows.shape[1]),
        }

    def compute(self, ctx, sae) -> dict:
        from atmpipe.eval.compute import core  # lazy (eval/metric.py)

        phase = ctx.phase(f"core · {sae.name}", self.windows.shape[0] + 1)
        rec = core.reconstruction_metrics(sae.sae, core_batches(ctx.store, ctx.layer, self.opts.core_tokens))
        phase()
        spliced = core.spliced_losses(ctx.lm, ctx.layer, self.windows, self.special, sae.sae, phase)
        return rec | core.downstream_scores(self.base, spliced)

    def blocks(self, names, results, shared) -> list[tuple]:
        from atmpipe.eval.report import frontier_plot  # lazy (eval/metric.py)

        blocks: list[tuple] = [("h2", "Sparsity vs reconstruction")]
        png = frontier_plot(names, results)
        if png:
            blocks.append(("img", "frontier.png", "L0 vs FVU frontier", png))
        sizes = shared["sizes"].get("core", {})
        blocks.append(
            (
                "p",
                f"Reconstruction over {sizes.get('eval_tokens_read')} held-out store tokens (BOS "
                f"excluded); downstream loss over {sizes.get('splice_windows')} eval windows of "
                f"{sizes.get('context')} tokens, BOS positions left clean in the spliced and the "
                "zero-ablated runs.",
            )
        )
        return blocks


def core_batches(store, layer: int, max_tokens: int, batch: int = 4096):
    """Held-out store activations with BOS removed, up to `max_tokens` rows."""
    import torch  # lazy (eval/metric.py)

    split = store.split("eval")
    n = min(split.n_committed_tokens, max_tokens)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        x = torch.from_numpy(store.read_acts("eval", layer, start, stop))
        keep = ~torch.from_numpy(np.asarray(split.bos[start:stop], dtype=bool))
        yield x[keep]


def splice_windows(store, n_windows: int) -> torch.Tensor:
    """The first `n_windows` whole context windows of the eval split's tokens."""
    import torch  # lazy (eval/metric.py)

    split = store.split("eval")
    ctx = int(store.attrs["context_size"])
    n = min(n_windows, split.n_tokens // ctx)
    if n == 0:
        raise UserError(
            f"store eval split holds fewer than {ctx} tokens: no window for the downstream loss; "
            "harvest more eval documents or drop 'core'"
        )
    tokens = np.asarray(split.tokens[: n * ctx], dtype=np.int64).reshape(n, ctx)
    return torch.from_numpy(tokens)
