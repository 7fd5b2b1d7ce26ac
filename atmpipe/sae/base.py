"""The SAE body every method shares: parameters, encode/decode, unit-norm decoder, the method registry
(files on disk: `atmpipe.sae.io`).

Training sees normalised activations x_n = s·x (s = `cfg.norm_scale`). A saved SAE applies to raw
activations: latents scale with 1/s (decoder rows stay unit norm), so b_enc, b_dec and any activation
threshold are divided by s when saving, W_enc and W_dec are kept. Then pre_raw = pre_n/s, every
activation here is positively homogeneous (ReLU, TopK order, JumpReLU with θ/s) so f_raw = f_n/s,
and decode(f_raw) = x̂_n/s exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from atmpipe.distributed import BatchShare
from atmpipe.errors import UserError
from atmpipe.sae import sparse
from atmpipe.sae.io import (  # noqa: F401  (the file names and read_tensor_file: re-exported, old imports)
    CFG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    check_weight_shapes,
    read_saved,
    read_tensor_file,
    save_sae,
)
from atmpipe.sae.sparse import Entries
from atmpipe.typecheck import check_types

# Parameters that carry the latent scale and so are divided by s when folding the normalisation.
FOLD_BY_SCALE = ("b_enc", "b_dec", "threshold")
LATENT_PATHS = ("auto", "sparse", "dense")


@dataclass
class SAEConfig:
    method: str  # a registered method (SAE_METHODS)
    d_in: int
    d_sae: int
    hparams: dict = field(default_factory=dict)  # the method's own dataclass, as a dict
    model_name: str = ""
    layer: int = -1
    hook_name: str = ""
    norm_scale: float = 1.0  # x is multiplied by this before the SAE while training; folded on save
    store: dict = field(default_factory=dict)  # store provenance


@dataclass
class CommonParams:
    """Hyper-parameters every method has; each method's dataclass extends this."""

    dead_tokens: int = 10_000_000  # a latent that has not fired for this many tokens counts as dead
    adam_beta1: float | None = None  # Adam's β1; None: the method's own (`SAE.method_betas`)


class TrainOutput:
    """What training_forward returns; loss = sum(losses.values())."""

    def __init__(
        self,
        x_hat: Tensor,  # reconstruction (what the loss sees; masked for ATM)
        f: Tensor | Callable[[], Tensor],  # inference latents (never masked), or a function building them
        losses: dict[str, Tensor],
        stats: dict[str, float | Tensor],  # logged; tensors are 0-d and stay on device (no sync)
    ):
        self.x_hat, self._f, self.losses, self.stats = x_hat, f, losses, stats

    @property
    def f(self) -> Tensor:
        """The inference latents, built on first use where a method passed a function (TopK's sparse
        path never needs a dense [batch, d_sae] tensor during training)."""
        if callable(self._f):
            self._f = self._f()
        return self._f


def parse_hparams(params_cls: type, hparams: dict, method: str, renamed: dict[str, str] | None = None) -> Any:
    """The method's Params from a dict; a hyper-parameter's old name (`renamed`: old → new, as SAEs saved
    before the rename hold it) is read as the new one."""
    hparams = dict(hparams)
    for old, new in (renamed or {}).items():
        if old in hparams:
            if new in hparams:
                raise UserError(f"{old} is the old name of {new}; pass only {new}")
            hparams[new] = hparams.pop(old)
    known = {f.name for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise UserError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for method {method}; known: {', '.join(sorted(known))}"
        )
    check_types(params_cls, hparams, "hyper-parameter", loose_ints=True)  # each method checks its ints
    return params_cls(**hparams)


class SAE(nn.Module):
    method: ClassVar[str]
    architecture: ClassVar[str]  # SAELens architecture: standard | topk | jumprelu
    Params: ClassVar[type] = CommonParams
    method_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)  # Adam's betas for this method
    # How data-parallel training reduces each buffer a training forward updates from one rank's rows
    # (`distributed.sync_state`): "mean" for a mean over tokens (weighted by each rank's rows), "min" for a
    # value monotone in the batch's minimum, "dead_clock" for tokens-since-fired counts. Unlisted buffers
    # agree on every rank unreduced.
    rank_reductions: ClassVar[dict[str, str]] = {"tokens_since_fired": "dead_clock"}
    # The hyper-parameter that seeds the method's own randomness (ATM's masks), None for none: training sets
    # it to the run's --seed unless it is given.
    seed_hparam: ClassVar[str | None] = None
    # Hyper-parameters renamed since SAEs were saved with them, old name → new (read as the new one).
    renamed_hparams: ClassVar[dict[str, str]] = {}
    # This step's rows of the global batch (`train.train_step` sets it): a forward that needs a statistic of
    # the whole batch (ATM's, JumpReLU's target L0) or the global position of a row asks it. The default is
    # a single process holding the whole batch.
    share: BatchShare = BatchShare()
    # The training step's latents: "sparse" (active entries only, sparse.py), "dense", or "auto": sparse when
    # the batch's density is below the device's sparse.crossover_density. A training option, not a
    # hyper-parameter (the result is the same to float round-off); `atmpipe train --latent-path` sets it.
    latent_path: str = "auto"
    # The dtype of the training step's matrix products, "bf16" or "fp32" (precision.resolve): a training
    # option like `latents`, set from `atmpipe train --precision`; train_step runs the forward under autocast.
    precision: str = "fp32"

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.path: tuple[str, float | None] = ("dense", None)  # the last step's path and density
        if cfg.d_in <= 0 or cfg.d_sae <= 0:
            raise UserError(
                f"d_in and d_sae must be positive (got {cfg.d_in}, {cfg.d_sae}); fix the SAE shape"
            )
        if not cfg.norm_scale > 0:
            raise UserError(f"norm_scale must be positive (got {cfg.norm_scale}); check the store statistics")
        self.hp = parse_hparams(self.Params, dict(cfg.hparams), self.method, self.renamed_hparams)
        self.cfg = dataclasses.replace(cfg, method=self.method, hparams=asdict(self.hp))
        self.validate_hparams()
        d_in, d_sae = cfg.d_in, cfg.d_sae
        W_dec = torch.randn(d_sae, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # Tokens since each latent last fired: dead-latent count, and TopK's AuxK mask.
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    @property
    def adam_betas(self) -> tuple[float, float]:
        """The betas training's Adam uses: the method's, β1 replaced by the hyper-parameter `adam_beta1`."""
        beta1 = getattr(self.hp, "adam_beta1", None)  # a plug-in's Params need not extend CommonParams
        return (self.method_betas[0] if beta1 is None else beta1, self.method_betas[1])

    # ----- what a method may override -----
    @property
    def steers_l0(self) -> bool:
        """Whether training steers L0 toward a target (recorded in the run as `target_l0_controller`)."""
        return False

    def masking_statistics(self) -> dict[str, Tensor] | None:
        """A masking method's per-latent statistics at the end of training (ATM's M, F, R, I, p and θ), read by
        the eval's masking metric; None for a method that masks nothing."""
        return None

    def auto_path_reason(self) -> str | None:
        """Why `--latent-path auto` takes the path it takes, for a method that decides it itself (None: the
        device's measured crossover density decides)."""
        return None

    def validate_hparams(self) -> None:
        """Raise UserError for impossible hyper-parameters (called at construction)."""

    def inference_tensors(self) -> dict[str, Tensor]:
        """Tensors beyond the four weights that the saved (SAELens) layout holds, unfolded."""
        return {}

    def load_inference_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of inference_tensors, for already-folded tensors."""

    def saelens_cfg_extra(self) -> dict[str, Any]:
        return {}

    def extra_files(self) -> dict[str, dict[str, Tensor]]:
        """Additional safetensors files saved beside the SAE (e.g. ATM statistics)."""
        return {}

    def load_extra_files(self, path: Path) -> None:
        pass

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups (a method may give some parameters their own lr)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    # ----- the shared body -----
    def pre_acts(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def train_pre_acts_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(raw, x_c) for training: x_c = x − b_dec and raw = x_c @ W_enc (pre = raw + b_enc), both without
        autograd. The caller attaches the encoder's gradients from all of pre (sparse.pre_acts_dense) or from
        the entries it keeps (sparse.pre_acts_at); b_dec's comes from a mat-vec either way."""
        with torch.no_grad():
            x_c = x - self.b_dec
            return x_c @ self.W_enc, x_c

    def train_pre_acts(self, x: Tensor) -> Tensor:
        """The training pre-activations with the dense encoder gradients (five GEMMs per dense step)."""
        raw, x_c = self.train_pre_acts_parts(x)
        return sparse.pre_acts_dense(raw, x_c, self.W_enc, self.b_enc, self.b_dec)

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f, self.W_dec)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def training_forward(self, x: Tensor, step: int, total_steps: int) -> TrainOutput:
        raise NotImplementedError

    @torch.no_grad()
    def init_b_dec(self, x_sample: Tensor) -> None:
        """Set b_dec to the mean of a sample of (normalised) activations."""
        self.b_dec.copy_(x_sample.to(self.b_dec).mean(0))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each decoder row, so the row norm is untouched to first order."""
        g, w = self.W_dec.grad, self.W_dec
        if g is None:
            return
        # In place, row dot products by vecdot: no [d_sae, d_in] temporaries (three of them cost ~0.15 GEMM).
        coef = torch.linalg.vecdot(g, w) / torch.linalg.vecdot(w, w).clamp_min(1e-12)
        g.addcmul_(w, coef.unsqueeze(1), value=-1)

    @torch.no_grad()
    def after_optimizer_step(self, grad_scale: Tensor | float = 1.0) -> None:
        """After each optimizer step; grad_scale: the factor gradient clipping put on this step's gradient."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ----- helpers for training_forward -----
    def common_stats(self, x: Tensor, x_hat: Tensor, fires: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction loss (squared error summed over d_in, mean over tokens), and shared stats.

        fires: how many of this batch's tokens each latent fired on (inference latents) [d_sae]; it
        advances the dead-latent clock and gives L0.
        """
        err = (x_hat - x).pow(2).sum(-1)
        mse = err.mean()
        with torch.no_grad():
            total = (x - x.mean(0)).pow(2).sum()
            self.tokens_since_fired.add_(x.shape[0]).masked_fill_(fires > 0, 0)
            stats = {
                "fvu": err.detach().sum() / total.clamp_min(1e-12),
                "l0": fires.sum() / x.shape[0],
                "dead": (self.tokens_since_fired >= self.hp.dead_tokens).sum(),
            }
        return mse, stats

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.hp.dead_tokens

    def latent_groups(self) -> Tensor | None:
        """Each latent's group index ([d_sae] integers) for methods that nest latents in groups (Matryoshka's
        prefixes), None for methods without groups; the feature browser shows it as a column."""
        return None

    def sparse_entries(self, support: Tensor) -> Entries | None:
        """The entries of `support` ([batch, d_sae] bool: the latents this step needs) when the step takes
        the sparse path, else None (dense). Records the choice and the density in `self.path`."""
        crossover = sparse.crossover_density(support.device, self.precision)
        if self.latent_path == "dense" or (self.latent_path == "auto" and crossover == 0):
            self.path = ("dense", None)  # no density read-back (on an accelerator it would sync)
            return None
        density = int(torch.count_nonzero(support)) / max(support.numel(), 1)
        # On several ranks the global density decides: every rank must take the same path (their collectives).
        if self.share.world.size > 1:
            density = float(self.share.mean(torch.tensor(density, dtype=torch.float64)))
        if self.latent_path == "auto" and density >= crossover:
            self.path = ("dense", density)
            return None
        self.path = ("sparse", density)
        return sparse.entries_where(support)

    # ----- save / load -----
    def folded_tensors(self) -> dict[str, Tensor]:
        """The inference tensors with the normalisation folded in (apply to raw activations)."""
        s = self.cfg.norm_scale
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        tensors.update(self.inference_tensors())
        out = {}
        for name, t in tensors.items():
            t = t.detach().float().cpu()
            out[name] = (t / s if name in FOLD_BY_SCALE else t).contiguous()
        return out

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write cfg.json + sae_weights.safetensors (SAELens v6 layout, normalisation folded) + atmpipe.json."""
        return save_sae(self, path, metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load an atmpipe SAE directory or a plain SAELens-format one (cfg.json + sae_weights.safetensors)."""
        saved = read_saved(path, SAE_METHODS)
        try:
            sae = make_sae(SAEConfig(**saved.config))
        except UserError as e:  # name the file the refused value came from
            file = saved.path / (META_FILE if saved.has_meta else CFG_FILE)
            raise UserError(f"{file} holds a hyper-parameter its method refuses: {e}") from None
        check_weight_shapes(saved.weights_file, saved.tensors, sae, saved.architecture)
        sae.load_weights(saved.tensors, apply_b_dec_to_input=saved.apply_b_dec_to_input)
        if saved.has_meta:
            sae.load_extra_files(saved.path)
        return sae.to(device)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a saved SAE of this method holds, with its shape."""
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        return {
            "W_enc": (d_in, d_sae),
            "b_enc": (d_sae,),
            "W_dec": (d_sae, d_in),
            "b_dec": (d_in,),
            **{k: tuple(v.shape) for k, v in self.inference_tensors().items()},
        }

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, Tensor], apply_b_dec_to_input: bool = True) -> None:
        """Copy in saved weights (checked by `_check_weight_shapes`). An SAE that does not subtract b_dec
        from its input gets it folded into b_enc instead."""
        b_enc = tensors["b_enc"].float()
        if not apply_b_dec_to_input:
            # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
            b_enc = b_enc + tensors["b_dec"].float() @ tensors["W_enc"].float()
        self.W_enc.copy_(tensors["W_enc"])
        self.b_enc.copy_(b_enc)
        self.W_dec.copy_(tensors["W_dec"])
        self.b_dec.copy_(tensors["b_dec"])
        self.load_inference_tensors({k: tensors[k].float() for k in self.inference_tensors()})


# The SAE methods by name. `atmpipe.sae` fills it, one line per method; it lives here, beside the class,
# so that loading a saved SAE finds its method without this module importing the methods that import it.
SAE_METHODS: dict[str, type[SAE]] = {}


def make_sae(cfg: SAEConfig) -> SAE:
    if cfg.method not in SAE_METHODS:
        raise UserError(f"unknown method {cfg.method!r}; known methods: {', '.join(sorted(SAE_METHODS))}")
    return SAE_METHODS[cfg.method](cfg)
