"""Stage two: stream a store's training activations into an SAE.

One loop (`Trainer.run`): normalise, forward, loss, backward, project out the parallel decoder gradient, clip,
schedule the lr, step, renormalise. Around it: checkpoints (atomic, resumable to the bit on CPU),
metrics.jsonl, a live display, signal handling, and the final save in the SAELens layout.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atmpipe import distributed, precision, remote, schedule
from atmpipe.config import TrainConfig, load_config, recipe_paths, to_dict
from atmpipe.device import resolve_device
from atmpipe.errors import UserError
from atmpipe.interrupt import Interrupts
from atmpipe.lock import exclusive_writer
from atmpipe.progress import Progress
from atmpipe.sae import SAE, SAE_METHODS, SAEConfig, compiling, make_sae, sparse
from atmpipe.sae.base import META_FILE
from atmpipe.store import RunningStats, Store, hook_name, open_store
from atmpipe.stream import ShardStream, check_store
from atmpipe.writable import cannot_write, require_writable

RUN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2
# Dead = not fired in the last 10M tokens, or the last 256 steps' worth, or a quarter of the run, whichever is
# fewest: a window that closes within the run, so TopK's AuxK engages (its reference implementation counts
# a few hundred steps), and the "dead" statistic means something in short runs.
DEAD_WINDOW_TOKENS = 10_000_000
DEAD_WINDOW_STEPS = 256


class TrainingInterrupted(UserError):
    """SIGINT/SIGTERM: a checkpoint was saved; the message says how to resume."""

    exit_code = 130


# --- configuration ------------------------------------------------------------------------------


def default_out(store: str, method: str) -> Path:
    return Path("runs") / f"{Path(store).name.removesuffix('.zarr')}-{method}"


def load_train_config(
    config: str | Path | list | None = None,
    hparams: dict | None = None,
    method_flags: dict[str, str] | None = None,
    **flags: Any,
) -> TrainConfig:
    """Recipe(s) (TOML, layered in order), then flags; with --resume the saved run's settings stand in for
    the recipes. The method's hyper-parameters come from the recipe's [hparams], then `hparams`
    (--hparam), then `method_flags` (--k 64: the raw text of flags named after them). The recipe files and
    the overrides are recorded in the config (and so in the run)."""
    recipes = recipe_paths(config)
    cfg = load_config(TrainConfig, recipes, **flags)
    given = {k: v for k, v in flags.items() if v is not None}
    saved = _saved_run(cfg) if cfg.resume else None
    if saved is not None:
        cfg = load_config(TrainConfig, None, **{**_current_keys(saved["config"]), **given})
    hparams = {**(hparams or {}), **hparams_of_flags(cfg.method, method_flags or {})}  # the method that runs
    if saved is None:
        cfg.recipe = [str(p) for p in recipes]
        cfg.overrides = {k: v for k, v in given.items() if k not in ("resume", "overwrite")}
        if hparams:
            cfg.overrides["hparams"] = dict(hparams)
    cfg.hparams = {**cfg.hparams, **hparams}
    return cfg


def _current_keys(saved: dict) -> dict:
    """A saved run's config in today's keys. "compile" (a whole-step torch.compile, default off) was retired
    for the compile switch, no_compile; k, l1, target_l0 and adam_beta1 were train settings before the
    method's Params became their one place: a saved value moves into hparams, as it was applied then."""
    values = {k: v for k, v in saved.items() if k not in ("resume", "overwrite", "compile")}
    if "latents" in values:  # --latents was renamed --latent-path (inspect's --latents is a list of ids)
        values["latent_path"] = values.pop("latents")
    moved = {k: values.pop(k) for k in ("k", "l1", "target_l0", "adam_beta1") if k in values}
    saved_hparams = values.get("hparams", {})
    if isinstance(saved_hparams, dict):  # anything else is refused by the type check, with its key
        values["hparams"] = {**saved_hparams, **{k: v for k, v in moved.items() if v is not None}}
    return values


def hparams_of_flags(method: str, flags: dict[str, str]) -> dict:
    """The hyper-parameters given as flags (`--k 64`), each a field of the method's Params: its value read
    as JSON (else as text), an integer for a float field made a float. A flag that names no hyper-parameter of
    the method is refused, never dropped."""
    cls = SAE_METHODS.get(method)
    if cls is None or not flags:
        return {}  # an unknown method is refused by TrainConfig.validate
    hints = typing.get_type_hints(cls.Params)
    known = ", ".join(sorted(hints))
    values = {}
    for name, text in flags.items():
        flag = "--" + name.replace("_", "-")
        if name not in hints:
            if any(name in typing.get_type_hints(m.Params) for m in SAE_METHODS.values()):
                raise UserError(
                    f"{flag} does not apply to method {method}; its hyper-parameters are: {known}"
                )
            raise UserError(
                f"no such option {flag}: neither a flag of `atmpipe train` (see --help) nor a hyper-parameter "
                f"of method {method} ({known})"
            )
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        floats = float in (typing.get_args(hints[name]) or (hints[name],))
        values[name] = float(value) if floats and type(value) is int else value
    return values


def _saved_run(cfg: TrainConfig) -> dict | None:
    return read_run_config(Path(cfg.out or default_out(cfg.store, cfg.method)) / RUN_CONFIG)


def read_run_config(file: Path) -> dict | None:
    """A run's saved train_config.json ({"identity", "config"}), None if it has none."""
    try:
        saved = json.loads(file.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); pass --overwrite to start the run again") from None
    identity = saved.get("identity") if isinstance(saved, dict) else None
    if not (
        isinstance(identity, dict)
        and isinstance(saved.get("config"), dict)
        and isinstance(identity.get("method"), str)
        and all(type(identity.get(k)) is int for k in ("d_in", "d_sae", "layer"))
    ):
        raise UserError(
            f"{file} is not a run configuration atmpipe wrote (no method and shape in it); pass --overwrite "
            "to start the run again"
        )
    return saved


def method_hparams(cfg: TrainConfig, total_tokens: int) -> dict:
    """The method's hyper-parameters: `hparams`, with the run's seed and dead-latent window where the method
    has them and they are not set apart."""
    method = SAE_METHODS[cfg.method]
    params = {f.name for f in dataclasses.fields(method.Params)}
    hparams = dict(cfg.hparams)
    own = method.seed_hparam  # a method's own randomness (ATM's masks) follows --seed unless set apart
    given = {own, *(old for old, new in method.renamed_hparams.items() if new == own)} & hparams.keys()
    if own and not given:
        hparams[own] = cfg.seed
    if "dead_tokens" in params:
        hparams.setdefault("dead_tokens", dead_window(cfg.batch_size, total_tokens))
    return hparams


def dead_window(batch_size: int, total_tokens: int) -> int:
    """Tokens without firing after which a latent counts as dead (and AuxK trains it)."""
    return max(batch_size, min(DEAD_WINDOW_TOKENS, DEAD_WINDOW_STEPS * batch_size, total_tokens // 4))


# --- schedule -----------------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    """Linear warm-up over `warmup` steps, constant, then linear decay to 0 over the last decay_frac."""
    decay_start = total - int(decay_frac * total)
    return min(
        schedule.ramp(step + 1, 0, warmup), 1.0 - schedule.ramp(step, decay_start, total - decay_start)
    )


# --- store --------------------------------------------------------------------------------------


def store_stats(store: Store, layer: int) -> dict:
    """mean_norm and mean of the training activations (of the committed shards, for a partial store)."""
    if store.complete:
        return store.stats(layer)
    state = (store.attrs.get("stats_state") or {}).get(str(layer))
    if not state or not state["n"]:
        raise UserError(f"store {store.path} has no committed training tokens yet; wait for its first shard")
    return RunningStats(store.d_model, state).summary()


def store_provenance(store: Store, layer: int, n_tokens: int) -> dict:
    a = store.attrs
    return {
        "path": str(store.path),
        "model": a["model"],
        "layer": layer,
        "hook_name": hook_name(layer),
        "dtype": a["dtype"],
        "context_size": a["context_size"],
        "dataset": a["dataset"].get("spec"),
        "complete": store.complete,
        "train_tokens_used": n_tokens,
    }


# --- checkpoints --------------------------------------------------------------------------------


def save_checkpoint(run: Path, step: int, sae: SAE, opt: torch.optim.Optimizer, state: dict) -> Path:
    """Write checkpoints/step_XXXXXXXX atomically (temp dir, then rename); keep the last two."""
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.exists():  # already saved at this step (interrupted right after a checkpoint)
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=root))
    opt_state = opt.state_dict()
    tensors = {
        "model.safetensors": {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()},
        "optimizer.safetensors": {
            f"{index}.{key}": value.detach().cpu().contiguous()
            for index, per_param in opt_state["state"].items()
            for key, value in per_param.items()
        },
        "rng.safetensors": {
            "torch_cpu": torch.get_rng_state(),
            **({"torch_cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
        },
    }
    try:
        for name, content in tensors.items():
            save_file(content, str(tmp / name))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer_groups": groups}, indent=1) + "\n")
        for file in tmp.iterdir():
            _fsync(file)
        os.rename(tmp, final)
    except (OSError, SafetensorError) as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "(os error 28)" in str(e)
        if not full:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give back what the half checkpoint took
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
    _fsync(root)
    for old in sorted(root.glob("step_*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint (temp dirs of a write that was cut short are never renamed)."""
    found = sorted((run / CHECKPOINTS).glob("step_*"))
    return found[-1] if found else None


def _unreadable(checkpoint: Path, e: BaseException) -> UserError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(
        f"checkpoint {checkpoint} is unreadable ({reason}); delete it to resume from the one before"
    )


# What a checkpoint's state.json must hold for --resume to continue from it.
_STATE_TYPES = {
    "step": int,
    "norm_scale": (int, float),
    "stream": dict,
    "identity": dict,
    "optimizer_groups": list,
}


def read_checkpoint_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError(f"state.json holds {type(state).__name__}, not an object")
        for key, typ in _STATE_TYPES.items():
            if not isinstance(state.get(key), typ) or isinstance(state.get(key), bool):
                raise ValueError(f"state.json key {key!r} is {state.get(key)!r}")
        if state["step"] < 0 or not (math.isfinite(state["norm_scale"]) and state["norm_scale"] > 0):
            raise ValueError(f"state.json has step {state['step']}, norm_scale {state['norm_scale']}")
        return state
    except (OSError, ValueError, UnicodeDecodeError) as e:  # (JSONDecodeError is a ValueError)
        raise _unreadable(checkpoint, e) from None


def _like(value: Any, current: Any) -> bool:
    """Can a saved optimiser setting stand in for the current one (same kind, finite numbers)?"""
    if isinstance(current, bool) or current is None:
        return type(value) is type(current)
    if isinstance(current, (int, float)):
        return type(value) in (int, float) and math.isfinite(value)
    if isinstance(current, (list, tuple)):
        return isinstance(value, list) and len(value) == len(current) and all(map(_like, value, current))
    return type(value) is type(current)


def load_checkpoint(checkpoint: Path, sae: SAE, opt: torch.optim.Optimizer) -> None:
    """Restore the SAE, the optimiser and the RNG from `checkpoint`; anything missing, of the wrong shape
    or not finite refuses it before the run directory is touched."""
    state = read_checkpoint_state(checkpoint)
    try:
        model = load_file(str(checkpoint / "model.safetensors"))
        moments = load_file(str(checkpoint / "optimizer.safetensors"))
        rng = load_file(str(checkpoint / "rng.safetensors"))
        for name, value in {**model, **moments}.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"tensor {name} holds NaN or infinite values")
        sae.load_state_dict(model)
        opt_state = opt.state_dict()
        per_param: dict[int, dict] = {}
        for name, value in moments.items():
            index, key = name.split(".", 1)
            per_param.setdefault(int(index), {})[key] = value
        params = [p for group in opt.param_groups for p in group["params"]]
        for index, moment in per_param.items():  # Adam's state per parameter, each of that parameter's shape
            shapes = {k: tuple(v.shape) for k, v in moment.items()}
            if index >= len(params) or shapes != {"exp_avg": params[index].shape, "exp_avg_sq": params[index].shape,
                                                  "step": ()}:  # fmt: skip
                raise ValueError(f"optimizer state of parameter {index} is {shapes}")
        for group, saved in zip(opt_state["param_groups"], state["optimizer_groups"], strict=True):
            if not isinstance(saved, dict) or any(
                k == "params" or not _like(v, group.get(k)) for k, v in saved.items()
            ):
                raise ValueError(f"optimizer group {saved!r} does not fit Adam's")
            # Adam's own checks of its settings (lr, betas, eps, weight decay) raise ValueError
            torch.optim.Adam(
                [torch.zeros(1)],
                **{k: saved[k] for k in ("lr", "betas", "eps", "weight_decay") if k in saved},
            )
            group.update(saved)
        opt.load_state_dict({"state": per_param, "param_groups": opt_state["param_groups"]})
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise _unreadable(checkpoint, e) from None


# --- the run directory --------------------------------------------------------------------------


def run_identity(cfg: TrainConfig, d_in: int, d_sae: int, layer: int) -> dict:
    return {"method": cfg.method, "d_in": d_in, "d_sae": d_sae, "layer": layer}


def _describe(identity: dict) -> str:
    return f"a {identity['method']} SAE (layer {identity['layer']}, d_in {identity['d_in']}, d_sae {identity['d_sae']})"


def inspect_run_dir(out: Path, cfg: TrainConfig, identity: dict) -> tuple[Path | None, bool]:
    """Decide, without writing anything: (checkpoint to resume from, whether the dir must be cleared)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None, False
    if not (out / RUN_CONFIG).is_file():
        raise UserError(f"{out} exists and is not an atmpipe run directory; pass another --out")
    if cfg.overwrite:
        return None, True
    if not cfg.resume:
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it, --overwrite to replace it, "
            "or --out for a new run"
        )
    saved = read_run_config(out / RUN_CONFIG)["identity"]
    if saved != identity:
        raise UserError(
            f"cannot resume {out}: it holds {_describe(saved)}, this run asks for {_describe(identity)}; "
            "resume with the same method and shape, or pass --out for a new run"
        )
    return latest_checkpoint(out), False


# --- display ----------------------------------------------------------------------------------


def format_metrics(m: dict) -> str:
    skip = {"step", "tokens", "lr", "tokens_per_s", "elapsed_s"}
    return " · ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items() if k not in skip
    )


# --- the loop -----------------------------------------------------------------------------------


def make_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with the SAE's betas (the method's, β1 replaced by the hyper-parameter `adam_beta1`), fused: one
    pass per parameter instead of ~10 element-wise passes (on CPU it cost a third of a GEMM per step at 640 →
    5120)."""
    return torch.optim.Adam(sae.param_groups(cfg.lr), betas=sae.adam_betas, fused=True)


class NonFiniteLoss(FloatingPointError):
    def __init__(self, loss: torch.Tensor):
        super().__init__(f"loss is {loss.item()}")
        self.loss = loss


def train_step(
    sae: SAE,
    forward,
    opt: torch.optim.Optimizer,
    base_lrs: list[float],
    x: torch.Tensor,
    step: int,
    total: int,
    lr_scale: float,
    grad_clip: float,
    share: distributed.BatchShare = distributed.BatchShare(),
    stop: bool = False,
) -> tuple[Any, torch.Tensor, bool]:
    """One optimisation step on the (normalised) batch x; the loop's body, also what the benchmark times.

    forward: sae.training_forward, or its DDP wrapper; share: which rows of the global batch x holds (all of
    them in a single process). Returns (TrainOutput, loss over x's rows, whether a stop was requested on any
    rank); raises NonFiniteLoss (on every rank) before touching the weights.
    """
    sae.share = share
    with precision.emulation(sae.precision):  # (a no-op unless the quality study asks for it)
        with precision.autocast(x.device, sae.precision):  # bf16: the products; the weights stay fp32
            output = forward(x, step, total)
        loss = sum(output.losses.values())
        # One collective answers both for every rank, so all ranks stop at the same step. (A rank without
        # rows has means over nothing, NaN, which count for nothing.)
        not_finite, stopping = share.world.any(len(x) > 0 and not torch.isfinite(loss), stop)
        if not_finite:
            raise NonFiniteLoss(loss)
        opt.zero_grad(set_to_none=True)
        if len(x):
            (loss * share.loss_weight).backward()
        else:  # still a backward through every parameter, for DDP's gradient all-reduce: zero gradients
            (sum(p.sum() for p in sae.parameters()) * 0.0).backward()
    distributed.sync_state(sae, share)
    sae.remove_parallel_grads()
    grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    for group, base in zip(opt.param_groups, base_lrs, strict=True):
        group["lr"] = base * lr_scale
    opt.step()
    sae.after_optimizer_step(clip_scale(grad_norm, grad_clip))
    return output, loss, stopping


def clip_scale(grad_norm: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """The factor clip_grad_norm_ put on the gradient (its own formula; on the device, no sync)."""
    return (grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)


# --- one run, step by step ----------------------------------------------------------------------


@dataclasses.dataclass
class RunPlan:
    """What `train` settles before it builds or writes anything."""

    out: Path
    store: Store
    layer: int
    d_in: int
    d_sae: int
    total: int  # optimisation steps
    hparams: dict
    device: torch.device
    identity: dict
    checkpoint: Path | None  # the one to resume from
    clear: bool  # --overwrite of an existing run: empty the directory first


def plan_run(cfg: TrainConfig, world: distributed.World) -> RunPlan:
    """Check --out, the store, the method's options and the run directory, writing nothing."""
    out = Path(cfg.out or default_out(cfg.store, cfg.method))
    require_writable(out)  # an unwritable --out fails now, not once the store is open and streaming
    store = open_store(cfg.store)
    layer = store.layers[0] if cfg.layer is None else cfg.layer
    check_store(store, layer, cfg.allow_partial)
    d_in, d_sae = store.d_model, cfg.d_sae or cfg.expansion * store.d_model
    total = max(1, cfg.tokens // cfg.batch_size)
    hparams = method_hparams(cfg, total * cfg.batch_size)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    identity = run_identity(cfg, d_in, d_sae, layer)
    checkpoint, clear = inspect_run_dir(out, cfg, identity)
    return RunPlan(out, store, layer, d_in, d_sae, total, hparams, device, identity, checkpoint, clear)


def finished_already(cfg: TrainConfig, plan: RunPlan) -> bool:
    """--resume of a run that reached its last step and saved its SAE (SAE.save writes META_FILE last)."""
    return (
        (plan.out / META_FILE).exists()
        and cfg.resume
        and plan.checkpoint is not None
        and read_checkpoint_state(plan.checkpoint)["step"] >= plan.total
    )


def build_sae(cfg: TrainConfig, plan: RunPlan, resumed: dict | None) -> tuple[SAE, float]:
    """The seeded SAE with b_dec at the mean activation, and the scale that normalises the activations
    (the saved one on resume, so that the run continues on the same inputs)."""
    stats = store_stats(plan.store, plan.layer)
    scale = resumed["norm_scale"] if resumed else math.sqrt(plan.d_in) / stats["mean_norm"]
    torch.manual_seed(cfg.seed)
    sae_cfg = SAEConfig(
        cfg.method, plan.d_in, plan.d_sae, plan.hparams, model_name=plan.store.attrs["model"]["name"],
        layer=plan.layer, hook_name=hook_name(plan.layer), norm_scale=scale,
        store=store_provenance(plan.store, plan.layer, 0),
    )  # fmt: skip
    compiling.set_compile(not cfg.no_compile)
    sae = make_sae(sae_cfg).to(plan.device)
    sae.latent_path = cfg.latent_path
    sae.precision = precision.resolve(cfg.precision, plan.device)
    sae.init_b_dec(torch.tensor(stats["mean"], dtype=torch.float32).unsqueeze(0) * scale)
    return sae, scale


class _Throughput:
    """Tokens per second since the previous reading, and seconds since the first."""

    def __init__(self, step: int, batch_size: int):
        self.batch_size = batch_size
        self.since, self.since_step = time.perf_counter(), step
        self.started = self.since

    def read(self, step: int) -> tuple[float, float]:
        now = time.perf_counter()
        rate = (step - self.since_step) * self.batch_size / max(now - self.since, 1e-9)
        self.since, self.since_step = now, step
        return rate, now - self.started


@dataclasses.dataclass
class Trainer:
    """One run in progress: the SAE, its optimiser and the activation stream, `step` steps in."""

    cfg: TrainConfig
    plan: RunPlan
    world: distributed.World
    console: Console
    sae: SAE
    opt: torch.optim.Optimizer
    base_lrs: list[float]  # what the lr schedule scales (taken before a checkpoint overwrites the lrs)
    stream: ShardStream
    scale: float
    step: int
    last: dict = dataclasses.field(default_factory=dict)  # the metrics last logged

    @classmethod
    def start(cls, cfg: TrainConfig, plan: RunPlan, world: distributed.World, console: Console) -> Trainer:
        """A fresh run, or the one the plan's checkpoint holds, restored with its stream position."""
        resumed = read_checkpoint_state(plan.checkpoint) if plan.checkpoint else None
        sae, scale = build_sae(cfg, plan, resumed)
        opt = make_optimizer(sae, cfg)
        base_lrs = [g["lr"] for g in opt.param_groups]
        if resumed:
            load_checkpoint(plan.checkpoint, sae, opt)
        stream = ShardStream(
            plan.store, plan.layer, cfg.batch_size, seed=cfg.seed, buffer_chunks=cfg.buffer_chunks,
            allow_partial=cfg.allow_partial, skip_damaged=cfg.skip_damaged, device=plan.device,
            position=resumed["stream"] if resumed else None, log=console.print, rank=world.rank, world=world.size,
        )  # fmt: skip
        sae.cfg.store["train_tokens_used"] = stream.n_tokens
        step = resumed["step"] if resumed else 0
        return cls(cfg, plan, world, console, sae, opt, base_lrs, stream, scale, step)

    def open_run_dir(self) -> None:
        """Rank 0 alone writes the run directory: cleared for --overwrite, the run's config, metrics.jsonl
        cut back to the resumed step, no checkpoint writes left half done by a crash."""
        if not self.world.is_main:
            return
        out = self.plan.out
        if self.plan.clear:
            shutil.rmtree(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # read-only or not permitted: the user's to fix
            raise cannot_write(out, e) from None
        config = {"identity": self.plan.identity, "config": to_dict(self.cfg)}
        (out / RUN_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        self.last = _truncate_metrics(out / METRICS, self.step)
        for stale in (out / CHECKPOINTS).glob(".tmp-*"):
            shutil.rmtree(stale)

    def run(self) -> None:
        """Step until the token budget is spent; log and checkpoint as configured; on a signal, checkpoint
        and stop with TrainingInterrupted."""
        cfg, total, out = self.cfg, self.plan.total, self.plan.out
        warmup = max(1, schedule.warmup_length(cfg.warmup_steps, cfg.warmup_frac, total))
        forward = distributed.data_parallel(self.sae, self.world, self.plan.device)
        paths_logged: set[str] = set()
        with (
            self.stream,
            Interrupts() as stop,  # checked between steps, so a checkpoint is never cut in half
            Progress(self.console) as progress,
            open(out / METRICS, "a") if self.world.is_main else open(os.devnull, "w") as log,
        ):
            task = progress.add_task("train", total=total, completed=self.step)
            throughput = _Throughput(self.step, cfg.batch_size)
            while self.step < total:
                x = next(self.stream) * self.scale
                share = distributed.BatchShare(self.world, len(x), cfg.batch_size, self.stream.positions)
                lr_scale = lr_factor(self.step, total, warmup, cfg.decay_frac)
                try:
                    output, loss, stopping = train_step(
                        self.sae, forward, self.opt, self.base_lrs, x, self.step, total, lr_scale,
                        cfg.grad_clip, share, bool(stop),
                    )  # fmt: skip
                except NonFiniteLoss as e:
                    raise _nan_error(self.step, e.loss, x, out) from None
                self.step += 1
                progress.update(task, completed=self.step)
                if self.sae.path[0] not in paths_logged:  # once per path and run: which one, from when, why
                    paths_logged.add(self.sae.path[0])
                    self.console.print(_path_line(self.sae, self.step - 1, cfg.latent_path))
                if self.step % cfg.log_every == 0 or self.step == total:
                    rate, elapsed = throughput.read(self.step)
                    self.last = share.mean_metrics(
                        _metrics(self.step, cfg.batch_size, self.opt, loss, output, rate, elapsed)
                    )
                    log.write(json.dumps(self.last) + "\n")
                    log.flush()
                    progress.update(task, rate=f"{rate:,.0f} tok/s", info=format_metrics(self.last))
                if stopping:
                    raise self.interrupted(stop.names, self.checkpoint())
                if self.step % cfg.checkpoint_every == 0 and self.step < total:
                    self.checkpoint()
            self.checkpoint()

    def checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "norm_scale": self.scale,
            "stream": self.stream.state_dict(),
            "identity": self.plan.identity,
        }
        # Every rank holds the same state (and the stream position counts global rows): rank 0 saves it.
        if self.world.is_main:
            return save_checkpoint(self.plan.out, self.step, self.sae, self.opt, state)
        return latest_checkpoint(self.plan.out)

    def interrupted(self, signals: list[str], saved: Path) -> TrainingInterrupted:
        cfg = self.cfg
        return TrainingInterrupted(
            f"stopped by {(signals or ['a signal to another rank'])[0]} at step {self.step}/{self.plan.total}; "
            f"checkpoint saved in {saved}; resume with: "
            f"atmpipe train --store {cfg.store} --method {cfg.method} --out {self.plan.out} --resume"
        )

    def metadata(self) -> dict:
        """What atmpipe.json records about the training next to the saved SAE."""
        return {
            "tokens_seen": self.step * self.cfg.batch_size,
            "steps": self.step,
            "epochs": self.stream.rows_consumed / self.stream.rows_per_epoch,
            "skipped_damaged_chunks": self.stream.state_dict()["skipped"],
            "final_metrics": self.last,
            "target_l0_controller": self.sae.steers_l0,  # the method says whether it steers L0
            "train_config": to_dict(self.cfg),
            "hparams": self.sae.cfg.hparams,
            "norm_scale": self.scale,
            "adam_betas": list(self.opt.defaults["betas"]),
            "world_size": self.world.size,
            "precision": self.sae.precision,  # what --precision resolved to on this device
        }


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train an SAE as `cfg` says; returns the run directory holding the saved SAE."""
    world = distributed.world()  # under torchrun: DDP over the ranks (distributed.py)
    console = console or Console(stderr=True)
    if not world.is_main:
        console = Console(stderr=True, quiet=True)
    cfg.validate()
    plan = plan_run(cfg, world)
    if finished_already(cfg, plan):
        console.print(f"{plan.out} already holds the finished run; nothing to resume")
        return plan.out
    trainer = Trainer.start(cfg, plan, world, console)
    # One writer per run directory: a second `train` with this --out is refused (the lock dies with us).
    # (--out was found writable when planning.)
    with exclusive_writer(plan.out, "run directory", world.is_main):
        # Everything is validated: only now touch the run directory.
        trainer.open_run_dir()
        if plan.checkpoint:
            console.print(
                f"resuming {plan.out} from {plan.checkpoint.name} ({trainer.step * cfg.batch_size:,} tokens seen)"
            )
        console.print(_precision_line(trainer.sae.precision, cfg.precision, plan.device))
        try:
            trainer.run()
            if world.is_main:
                trainer.sae.save(plan.out, trainer.metadata())
        except remote.StoreFault as e:
            kept = latest_checkpoint(plan.out)
            raise UserError(
                f"{e}; the run keeps its last checkpoint ({kept.name if kept else 'none yet'}): resume with: "
                f"atmpipe train --store {cfg.store} --method {cfg.method} --out {plan.out} --resume"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = latest_checkpoint(plan.out)
            raise UserError(
                f"the disk holding the run directory {plan.out} is full ({e.strerror}); the run keeps its last checkpoint "
                f"({kept.name if kept else 'none yet'}): free some space, then resume with: atmpipe train "
                f"--store {cfg.store} --method {cfg.method} --out {plan.out} --resume"
            ) from None
        console.print(f"saved the {cfg.method} SAE to {plan.out}")
    return plan.out


def _precision_line(resolved: str, option: str, device: torch.device) -> str:
    if option != "auto":
        return f"precision: {resolved} (--precision {option})"
    units = "has" if resolved == "bf16" else "has no"
    return f"precision: {resolved} (auto: this {device.type.upper()} {units} bf16 matrix units)"


def _path_line(sae: SAE, step: int, option: str) -> str:
    path, density = sae.path
    at = "" if density is None else f", latent density {density:.2%}"
    why = f"--latent-path {option}"
    if option == "auto" and sae.auto_path_reason():
        why = sae.auto_path_reason()
    elif option == "auto" and density is not None:
        why = f"auto: sparse below {sparse.crossover_density(sae.W_enc.device, sae.precision):.0%}"
    elif option == "auto":
        why = "auto: dense on this device (no measured crossover)"
    return f"latents: {path} path from step {step}{at} ({why})"


def _metrics(step, batch_size, opt, loss, output, rate, elapsed) -> dict:
    values = {"step": step, "tokens": step * batch_size, "lr": opt.param_groups[0]["lr"], "loss": loss.item()}
    for name, value in {**output.losses, **output.stats}.items():
        values[name] = value.item() if isinstance(value, torch.Tensor) else value
    return {**values, "tokens_per_s": rate, "elapsed_s": elapsed}


def _truncate_metrics(file: Path, step: int) -> dict:
    """On resume, drop the lines logged after the checkpoint (they will be logged again) and any line that
    is not a logged step (a kill mid-write leaves half a line); return the last line kept."""
    if not file.exists():
        return {}
    kept = []
    for line in file.read_text(errors="replace").splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if isinstance(m, dict) and type(m.get("step")) is int and m["step"] <= step:
            kept.append(m)
    file.write_text("".join(json.dumps(m) + "\n" for m in kept))
    return kept[-1] if kept else {}


def _nan_error(step: int, loss: torch.Tensor, x: torch.Tensor, out: Path) -> UserError:
    checkpoint = latest_checkpoint(out)
    where = (
        f"the last checkpoint ({checkpoint.name}) is intact"
        if checkpoint
        else "no checkpoint was written yet"
    )
    if not torch.isfinite(x).all():
        cause = "the batch holds non-finite activations; check the store with `atmpipe verify`"
    else:
        cause = "the training diverged; lower --lr (or the sparsity coefficient)"
    return UserError(f"loss is {loss.item()} at step {step}: {cause}; {where}, continue with --resume")
