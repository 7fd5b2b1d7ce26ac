"""Saving and loading SAEs: the SAELens v6 directory layout (cfg.json + sae_weights.safetensors) that
atmpipe writes and reads, plus atmpipe.json (method, hyper-parameters, provenance). `SAE.save` and
`SAE.load` are the entry points; every bad file is a one-line UserError naming the file and the key."""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from atmpipe.atomic import atomic_file
from atmpipe.errors import UserError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
META_FILE = "atmpipe.json"
FORMAT_VERSION = 1
# The SAELens config layout we write (v6: top-level d_in/d_sae/dtype/architecture, the rest under metadata).
SAELENS_LAYOUT_VERSION = "6.0.0"
# Hyper-parameters earlier versions saved that are now training options (`--no-compile`, `--latent-path`):
# dropped when loading such an SAE.
RETIRED_HPARAMS = ("compile", "sparse_kernels")


def save_sae(sae, path: str | Path, metadata: dict | None = None) -> Path:
    """Write `sae` as cfg.json + sae_weights.safetensors (SAELens v6 layout, normalisation folded) +
    atmpipe.json (`SAE.save`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = sae.folded_tensors()
    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    # Every file lands whole (temp + rename) and atmpipe.json comes last: its presence marks a complete save.
    with atomic_file(path / WEIGHTS_FILE) as tmp:
        save_file({k: v.to(sae.W_enc.dtype) for k, v in tensors.items()}, str(tmp))
    sl_cfg = {
        "architecture": sae.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the scale is folded into the weights
        "reshape_activations": "none",
        **sae.saelens_cfg_extra(),
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": SAELENS_LAYOUT_VERSION,
            "model_name": sae.cfg.model_name,
            "hook_name": sae.cfg.hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "trained_with": "atmpipe",
        },
    }
    with atomic_file(path / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(sl_cfg, indent=2) + "\n")
    for name, extra in sae.extra_files().items():
        with atomic_file(path / name) as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in extra.items()}, str(tmp))
    meta = {
        "format_version": FORMAT_VERSION,
        "method": sae.method,
        "architecture": sae.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "hparams": sae.cfg.hparams,
        "model_name": sae.cfg.model_name,
        "layer": sae.cfg.layer,
        "hook_name": sae.cfg.hook_name,
        "norm_scale_folded": sae.cfg.norm_scale,
        "store": sae.cfg.store,
        "provenance": _provenance(),
        "metadata": metadata or {},
    }
    with atomic_file(path / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    return path


@dataclass
class Saved:
    """What an SAE directory holds, read and checked: the SAEConfig fields, the weights, and how to apply them."""

    path: Path
    config: dict  # SAEConfig's fields
    architecture: str
    tensors: dict[str, Tensor]
    apply_b_dec_to_input: bool
    has_meta: bool  # an atmpipe SAE (atmpipe.json), not a plain SAELens one

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE


def read_saved(path: str | Path, methods: Mapping[str, Any]) -> Saved:
    """Read an atmpipe SAE directory or a plain SAELens-format one; `methods` are the known SAE methods."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"{path} is not a directory; pass an SAE directory holding {CFG_FILE} and {WEIGHTS_FILE}"
        )
    sl_cfg = _read_json(path / CFG_FILE)
    meta = _read_json(path / META_FILE) if (path / META_FILE).exists() else None
    arch, shape_and_names = _shape_and_names(sl_cfg, path / CFG_FILE)
    tensors = _read_weights(path / WEIGHTS_FILE)
    what = _what_was_trained(path, sl_cfg, meta, arch, shape_and_names["hook_name"], methods)
    apply_b_dec = sl_cfg.get("apply_b_dec_to_input", True) is not False
    return Saved(path, {**what, **shape_and_names}, arch, tensors, apply_b_dec, meta is not None)


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


def _what_was_trained(
    path: Path, sl_cfg: dict, meta: dict | None, arch: str, hook_name: str, methods: Mapping[str, Any]
) -> dict:
    """The SAEConfig fields method, hparams, layer and store: from atmpipe.json, or for a plain SAELens
    SAE from its architecture and hook."""
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
    if method not in methods:
        raise UserError(
            f"{path / (META_FILE if meta else CFG_FILE)}: unknown method {method!r}; "
            f"known: {', '.join(sorted(methods))}"
        )
    hparams = {k: v for k, v in hparams.items() if k not in RETIRED_HPARAMS}
    if "k" in sl_cfg and method == "topk":
        hparams = {**hparams, "k": int(sl_cfg["k"])}
    return {"method": method, "hparams": hparams, "layer": layer, "store": store}


def check_weight_shapes(file: Path, tensors: dict[str, Tensor], sae, arch: str) -> None:
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
