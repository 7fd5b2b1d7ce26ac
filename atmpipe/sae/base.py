"""The SAE body every method shares: parameters, encode/decode, unit-norm decoder, save/load.

Training sees normalised activations x_n = s·x (s = `cfg.norm_scale`). A saved SAE applies to raw
activations: latents scale with 1/s (decoder rows stay unit norm), so b_enc, b_dec and any activation
threshold are divided by s when saving, W_enc and W_dec are kept. Then pre_raw = pre_n/s, every
activation here is positively homogeneous (ReLU, TopK order, JumpReLU with θ/s) so f_raw = f_n/s,
and decode(f_raw) = x̂_n/s exactly.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from atmpipe.atomic import atomic_file
from atmpipe.distributed import BatchShare
from atmpipe.errors import UserError
from atmpipe.sae import sparse
from atmpipe.sae.sparse import Entries

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
META_FILE = "atmpipe.json"
FORMAT_VERSION = 1
# The SAELens config layout we write (v6: top-level d_in/d_sae/dtype/architecture, the rest under metadata).
SAELENS_LAYOUT_VERSION = "6.0.0"
# Parameters that carry the latent scale and so are divided by s when folding the normalisation.
FOLD_BY_SCALE = ("b_enc", "b_dec", "threshold")
# Hyper-parameters earlier versions saved that are now training options (TrainConfig.compile, .latents):
# dropped when loading such an SAE.
RETIRED_HPARAMS = ("compile", "sparse_kernels")
LATENT_PATHS = ("auto", "sparse", "dense")


@dataclass
class SAEConfig:
    method: str  # "relu" | "topk" | "jumprelu" | "atm"
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


def parse_hparams(params_cls: type, hparams: dict, method: str) -> Any:
    known = {f.name for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise UserError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for method {method}; known: {', '.join(sorted(known))}"
        )
    from atmpipe.config import check_types

    check_types(params_cls, hparams, "hyper-parameter", loose_ints=True)  # each method checks its ints
    return params_cls(**hparams)


class SAE(nn.Module):
    method: ClassVar[str]
    architecture: ClassVar[str]  # SAELens architecture: standard | topk | jumprelu
    Params: ClassVar[type] = CommonParams
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    # How data-parallel training reduces each buffer a training forward updates from one rank's rows
    # (`distributed.sync_state`): "mean" for a mean over tokens (weighted by each rank's rows), "min" for a
    # value monotone in the batch's minimum, "dead_clock" for tokens-since-fired counts. Unlisted buffers
    # agree on every rank unreduced.
    rank_reductions: ClassVar[dict[str, str]] = {"tokens_since_fired": "dead_clock"}
    # This step's rows of the global batch (`train.train_step` sets it): a forward that needs a statistic of
    # the whole batch (ATM's, JumpReLU's target L0) or the global position of a row asks it. The default is
    # a single process holding the whole batch.
    share: BatchShare = BatchShare()
    # The training step's latents: "sparse" (active entries only, sparse.py), "dense", or "auto": sparse when
    # the batch's density is below the device's sparse.crossover_density. A training option, not a
    # hyper-parameter (the result is the same to float round-off); `atmpipe train --latents` sets it.
    latents: str = "auto"

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.path: tuple[str, float | None] = ("dense", None)  # the last step's path and density
        if cfg.d_in <= 0 or cfg.d_sae <= 0:
            raise UserError(
                f"d_in and d_sae must be positive (got {cfg.d_in}, {cfg.d_sae}); fix the SAE shape"
            )
        if not cfg.norm_scale > 0:
            raise UserError(f"norm_scale must be positive (got {cfg.norm_scale}); check the store statistics")
        self.hp = parse_hparams(self.Params, dict(cfg.hparams), self.method)
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

    # ----- what a method may override -----
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

    def sparse_entries(self, support: Tensor) -> Entries | None:
        """The entries of `support` ([batch, d_sae] bool: the latents this step needs) when the step takes
        the sparse path, else None (dense). Records the choice and the density in `self.path`."""
        crossover = sparse.crossover_density(support.device)
        if self.latents == "dense" or (self.latents == "auto" and crossover == 0):
            self.path = ("dense", None)  # no density read-back (on an accelerator it would sync)
            return None
        density = int(torch.count_nonzero(support)) / max(support.numel(), 1)
        # On several ranks the global density decides: every rank must take the same path (their collectives).
        if self.share.world.size > 1:
            density = float(self.share.mean(torch.tensor(density, dtype=torch.float64)))
        if self.latents == "auto" and density >= crossover:
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
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.folded_tensors()
        dtype = str(self.W_enc.dtype).removeprefix("torch.")
        # Every file lands whole (temp + rename) and atmpipe.json comes last: its presence marks a complete save.
        with atomic_file(path / WEIGHTS_FILE) as tmp:
            save_file({k: v.to(self.W_enc.dtype) for k, v in tensors.items()}, str(tmp))
        sl_cfg = {
            "architecture": self.architecture,
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "dtype": dtype,
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",  # the scale is folded into the weights
            "reshape_activations": "none",
            **self.saelens_cfg_extra(),
            "metadata": {
                "sae_lens_version": SAELENS_LAYOUT_VERSION,
                "sae_lens_training_version": SAELENS_LAYOUT_VERSION,
                "model_name": self.cfg.model_name,
                "hook_name": self.cfg.hook_name,
                "hook_head_index": None,
                "prepend_bos": True,
                "trained_with": "atmpipe",
            },
        }
        with atomic_file(path / CFG_FILE) as tmp:
            tmp.write_text(json.dumps(sl_cfg, indent=2) + "\n")
        for name, extra in self.extra_files().items():
            with atomic_file(path / name) as tmp:
                save_file({k: v.detach().float().cpu().contiguous() for k, v in extra.items()}, str(tmp))
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "architecture": self.architecture,
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "hparams": self.cfg.hparams,
            "model_name": self.cfg.model_name,
            "layer": self.cfg.layer,
            "hook_name": self.cfg.hook_name,
            "norm_scale_folded": self.cfg.norm_scale,
            "store": self.cfg.store,
            "provenance": _provenance(),
            "metadata": metadata or {},
        }
        with atomic_file(path / META_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Load an atmpipe SAE directory or a plain SAELens-format one (cfg.json + sae_weights.safetensors)."""
        from atmpipe.sae import make_sae

        path = Path(path)
        if not path.is_dir():
            raise UserError(
                f"{path} is not a directory; pass an SAE directory holding {CFG_FILE} and {WEIGHTS_FILE}"
            )
        sl_cfg = _read_json(path / CFG_FILE)
        meta = _read_json(path / META_FILE) if (path / META_FILE).exists() else None
        arch, shape_and_names = _shape_and_names(sl_cfg, path / CFG_FILE)
        tensors = _read_weights(path / WEIGHTS_FILE)
        what = _what_was_trained(path, sl_cfg, meta, arch, shape_and_names["hook_name"])
        sae = make_sae(SAEConfig(**what, **shape_and_names))
        _check_weight_shapes(path / WEIGHTS_FILE, tensors, sae, arch)
        sae.load_weights(tensors, apply_b_dec_to_input=sl_cfg.get("apply_b_dec_to_input", True) is not False)
        if meta is not None:
            sae.load_extra_files(path)
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


def _shape_and_names(sl_cfg: dict, file: Path) -> tuple[str, dict]:
    """cfg.json's architecture, and the SAEConfig fields it gives for any SAE: its shape and the model and
    hook it reads. Activation scaling it would have to apply at load time is refused."""
    arch = _get(sl_cfg, "architecture", file, str, default="standard")
    d_in = _get(sl_cfg, "d_in", file, int)
    d_sae = _get(sl_cfg, "d_sae", file, int)
    sl_meta = sl_cfg.get("metadata") if isinstance(sl_cfg.get("metadata"), dict) else {}
    hook_name = _text(sl_meta.get("hook_name") or sl_cfg.get("hook_name") or "", "hook_name", file)
    model_name = _text(sl_meta.get("model_name") or sl_cfg.get("model_name") or "", "model_name", file)
    norm = sl_cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise UserError(
            f"{file}: normalize_activations={norm!r} is not supported; "
            "fold the activation scaling into the weights and set it to 'none'"
        )
    return arch, {"d_in": d_in, "d_sae": d_sae, "model_name": model_name, "hook_name": hook_name}


def _what_was_trained(path: Path, sl_cfg: dict, meta: dict | None, arch: str, hook_name: str) -> dict:
    """The SAEConfig fields method, hparams, layer and store: from atmpipe.json, or for a plain SAELens
    SAE from its architecture and hook."""
    from atmpipe.sae import SAE_METHODS

    if meta is not None:
        method = _get(meta, "method", path / META_FILE, str)
        hparams = _get(meta, "hparams", path / META_FILE, dict)
        layer = meta.get("layer", -1)
        if type(layer) is not int:  # it names cache directories: never anything but a number
            raise UserError(
                f"{path / META_FILE}: key 'layer' has invalid value {layer!r} (expected a layer number); fix it"
            )
        store = meta.get("store") or {}
    else:
        method, hparams = _method_from_saelens(arch, sl_cfg, path / CFG_FILE), {}
        layer, store = _layer_from_hook(hook_name), {}
    if method not in SAE_METHODS:
        raise UserError(
            f"{path / (META_FILE if meta else CFG_FILE)}: unknown method {method!r}; "
            f"known: {', '.join(sorted(SAE_METHODS))}"
        )
    hparams = {k: v for k, v in hparams.items() if k not in RETIRED_HPARAMS}
    if "k" in sl_cfg and method == "topk":
        hparams = {**hparams, "k": int(sl_cfg["k"])}
    return {"method": method, "hparams": hparams, "layer": layer, "store": store}


def _check_weight_shapes(file: Path, tensors: dict[str, Tensor], sae: SAE, arch: str) -> None:
    expected, d_in, d_sae = sae.weight_shapes(), sae.cfg.d_in, sae.cfg.d_sae
    for key, shape in expected.items():
        if key not in tensors:
            raise UserError(
                f"{file}: missing tensor {key!r} (a {arch} SAE needs {', '.join(expected)}); re-save the SAE"
            )
        if not tensors[key].is_floating_point():
            raise UserError(
                f"{file}: tensor {key!r} has dtype {str(tensors[key].dtype).removeprefix('torch.')}, "
                "expected a floating-point dtype; re-save the SAE"
            )
        if tuple(tensors[key].shape) != shape:
            raise UserError(
                f"{file}: tensor {key!r} has shape {list(tensors[key].shape)}, "
                f"expected {list(shape)} from {CFG_FILE} (d_in={d_in}, d_sae={d_sae}); re-save the SAE"
            )
        if bad := int((~torch.isfinite(tensors[key])).sum()):
            raise UserError(f"{file}: tensor {key!r} holds {bad} NaN or infinite values; re-save the SAE")


def _method_from_saelens(arch: str, sl_cfg: dict, file: Path) -> str:
    methods = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
    if arch not in methods:
        raise UserError(f"{file}: architecture {arch!r} is not supported; supported: {', '.join(methods)}")
    if arch == "topk" and "k" not in sl_cfg:
        raise UserError(f"{file}: key 'k' is missing (a topk SAE needs it); add it to {CFG_FILE}")
    return methods[arch]


def _layer_from_hook(hook_name: str) -> int:
    parts = hook_name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else -1


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{file} does not exist; pass a directory written by `atmpipe train` or SAELens"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); re-save the SAE") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object, found {type(data).__name__}; re-save the SAE")
    return data


def _get(d: dict, key: str, file: Path, typ: type, default: Any = None) -> Any:
    if key not in d:
        if default is not None:
            return default
        raise UserError(f"{file}: key {key!r} is missing; re-save the SAE")
    value = d[key]
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok or (typ is int and value <= 0):
        raise UserError(
            f"{file}: key {key!r} has invalid value {value!r} (expected a positive {typ.__name__}); fix it"
        )
    return value


def _text(value: Any, key: str, file: Path) -> str:
    """A name cfg.json gives (model, hook): text, never anything else."""
    if not isinstance(value, str):
        raise UserError(f"{file}: key {key!r} has invalid value {value!r} (expected a string); fix it")
    return value


def _read_weights(file: Path) -> dict[str, Tensor]:
    if not file.exists():
        raise UserError(f"{file} does not exist; the SAE directory is incomplete, re-save it")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e}); re-save the SAE") from None


def read_tensor_file(
    file: Path, keys: list[str], shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, Tensor]:
    """Read named tensors from a safetensors file, with a UserError naming the file and the key."""
    tensors = _read_weights(file)
    for key in keys:
        if key not in tensors:
            raise UserError(f"{file}: missing tensor {key!r}; re-save the SAE")
        if shapes and key in shapes and tuple(tensors[key].shape) != shapes[key]:
            raise UserError(
                f"{file}: tensor {key!r} has shape {list(tensors[key].shape)}, expected {list(shapes[key])}; re-save"
            )
    return tensors


def _provenance() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        atmpipe_version = version("atmpipe")
    except PackageNotFoundError:
        atmpipe_version = "unknown"
    return {
        "atmpipe_version": atmpipe_version,
        "torch_version": torch.__version__,
        "saved_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
