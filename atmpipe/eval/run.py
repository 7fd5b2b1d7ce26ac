"""The eval stage: load SAEs, check they fit the store and model, compute each metric, write the report.

LM work (absorption prompts, probing and bias texts, the clean and zero-ablated splice baselines) goes through
`ActivationCache`, so it is paid once per model and layer; each SAE then costs only its own share.
"""

from __future__ import annotations

import errno
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from atmpipe.errors import UserError
from atmpipe.eval import absorption as absorption_mod
from atmpipe.eval import bias as bias_mod
from atmpipe.eval import core, data, probing
from atmpipe.eval.cache import ActivationCache
from atmpipe.progress import Progress
from atmpipe.writable import cannot_write, require_writable

METRICS = ("core", "absorption", "probing", "bias")
LM_METRICS = {"absorption", "probing", "bias"}  # core needs the LM only for the splice
console = Console(stderr=True)


@dataclass
class EvalConfig:
    sae: list[str]
    out: str = "reports/eval"
    store: str | None = None  # default: the store recorded in the SAEs' metadata
    model: str | None = None  # default: the SAEs' model
    layer: int | None = None  # default: the SAEs' layer
    metrics: str = ",".join(METRICS)
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    batch_size: int = 16
    core_tokens: int = 32768  # held-out store tokens for reconstruction metrics
    splice_windows: int = 8  # eval-split context windows for the downstream loss
    absorption_words_per_letter: int = 80
    absorption_icl: int = 2  # in-context examples (2 measured best on gemma-3-270m: 0.76 probe accuracy)
    absorption_f1_gate: float = 0.6
    absorption_min_letters: int = 20
    probing_tasks: str = ",".join(data.TASKS)
    probing_train: int = 128
    probing_test: int = 64
    probing_context: int = 128
    probing_data: str | None = None  # directory of the sae-probes *.csv.zst files
    bias_occupations: str = "politician,singer"
    bias_people_per_cell: int = 0  # 0: every person the data has (~750 people)


@dataclass
class LoadedSAE:
    name: str
    path: Path
    sae: torch.nn.Module
    info: dict  # method, width, model, layer, hyper-parameters, provenance


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class Phase:
    """One progress bar for one long phase; `advance(n)` with a per-second rate shown."""

    def __init__(self, progress: Progress, description: str, total: int):
        self.progress, self.task = progress, progress.add_task(description, total=total, rate="")

    def __call__(self, n: int = 1) -> None:
        task = self.progress.tasks[self.task]
        rate = f"{task.speed:.1f}/s" if task.speed else ""
        self.progress.update(self.task, advance=n, rate=rate)


# --- inputs ---------------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """The report is written last: an unwritable --out must fail before the minutes of LM work, not after."""
    if out.exists() and not out.is_dir():
        raise cannot_write(out, FileExistsError(errno.EEXIST, "it is a file", str(out)))
    require_writable(out)


def parse_metrics(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UserError(
            f"unknown metric {', '.join(unknown) or '(none)'}; known metrics: {', '.join(METRICS)}"
        )
    return names


def load_saes(paths: list[str]) -> list[LoadedSAE]:
    from atmpipe.sae import SAE

    if not paths:
        raise UserError("no SAE given; pass --sae DIR (one or more times)")
    loaded, names = [], set()
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError(
                f"SAE directory {path} does not exist; pass a directory written by `atmpipe train`"
            )
        sae = SAE.load(path).eval()
        meta_file = path / "atmpipe.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        name = path.name if path.name not in names else f"{path.parent.name}/{path.name}"
        names.add(name)
        cfg = sae.cfg
        loaded.append(
            LoadedSAE(
                name,
                path,
                sae,
                {
                    "path": str(path),
                    "method": cfg.method,
                    "architecture": sae.architecture,
                    "d_in": cfg.d_in,
                    "d_sae": cfg.d_sae,
                    "model_name": cfg.model_name,
                    "layer": cfg.layer,
                    "hook_name": cfg.hook_name,
                    "hparams": cfg.hparams,
                    "store": cfg.store,
                    "provenance": meta.get("provenance", {}),
                    "format": "atmpipe" if meta else "saelens",
                },
            )
        )
    return loaded


def same_model(a: str, b: str) -> bool:
    """'google/gemma-2-2b' and 'gemma-2-2b' name the same model."""
    if not a or not b:
        return True
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def agreed(saes: list[LoadedSAE], key: str, flag, what: str):
    """The value all SAEs record for `key` (flag wins); SAEs disagreeing with each other or the flag are refused."""
    values = {s.name: s.info[key] for s in saes if s.info[key] not in ("", -1, None)}
    if flag is not None:
        for name, v in values.items():
            if (key == "model_name" and not same_model(v, flag)) or (key != "model_name" and v != flag):
                raise UserError(
                    f"SAE {name} was trained on {what} {v}, but --{what} {flag} was given; "
                    f"evaluate it on its own {what} or drop --{what}"
                )
        return flag
    distinct = sorted({str(v) for v in values.values()})
    if len(distinct) > 1:
        raise UserError(
            f"the SAEs were trained on different {what}s ({', '.join(f'{n}: {v}' for n, v in values.items())}); "
            "evaluate SAEs of one model and layer together"
        )
    return next(iter(values.values()), None)


def open_eval_store(cfg: EvalConfig, saes: list[LoadedSAE], layer: int | None):
    from atmpipe.store import open_store

    path = cfg.store or next((s.info["store"].get("path") for s in saes if s.info["store"].get("path")), None)
    if path is None:
        return None
    store = open_store(path)
    if layer is not None and layer not in store.layers:
        raise UserError(
            f"store {path} holds layers {store.layers}, not layer {layer} of the SAEs; "
            "pass the store the SAEs were trained on (--store)"
        )
    for s in saes:
        if s.info["d_in"] != store.d_model:
            raise UserError(
                f"SAE {s.name} has width d_in={s.info['d_in']} but store {path} has d_model="
                f"{store.d_model}; pass the store the SAE was trained on (--store)"
            )
        store_model = store.attrs["model"]["name"]
        if store_model != "synthetic" and not same_model(s.info["model_name"], store_model):
            raise UserError(
                f"SAE {s.name} was trained on model {s.info['model_name']} but store {path} holds "
                f"{store_model}; pass the matching --store"
            )
    return store


# --- the cached LM-side inputs ---------------------------------------------------------------------


def core_batches(store, layer: int, max_tokens: int, batch: int = 4096):
    """Held-out store activations with BOS removed, up to `max_tokens` rows."""
    split = store.split("eval")
    n = min(split.n_committed_tokens if hasattr(split, "n_committed_tokens") else split.n_tokens, max_tokens)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        x = torch.from_numpy(store.read_acts("eval", layer, start, stop))
        keep = ~torch.from_numpy(np.asarray(split.bos[start:stop], dtype=bool))
        yield x[keep]


def splice_windows(store, n_windows: int) -> torch.Tensor:
    """The first `n_windows` whole context windows of the eval split's tokens."""
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


def absorption_inputs(lm, layer, cfg: EvalConfig, cache: ActivationCache, progress: Progress) -> dict:
    acfg = absorption_config(cfg)
    key = {
        "words_per_letter": acfg.words_per_letter,
        "icl": acfg.icl_examples,
        "template": acfg.template,
        "min_letters_word": acfg.min_word_letters,
        "test_fraction": acfg.test_fraction,
        "seed": acfg.seed,
    }

    def compute():
        ds = absorption_mod.first_letter_dataset(lm.tokenizer, acfg)
        phase = Phase(progress, "absorption prompts (LM)", len(ds["words"]))
        acts = absorption_mod.word_activations(
            lm, layer, ds["input_ids"], ds["positions"], cfg.batch_size, phase
        )
        tensors = {
            "acts": acts,
            "labels": torch.from_numpy(ds["labels"]),
            "is_test": torch.from_numpy(ds["is_test"]),
        }
        return tensors, {"words": ds["words"], "vocab_size": ds["vocab_size"], "dropped": ds["dropped"]}

    tensors, extra = cache.get_or_compute("absorption", key, compute)
    is_test = tensors["is_test"].numpy().astype(bool)
    acts, labels = tensors["acts"].numpy(), tensors["labels"].numpy()
    return {
        "acts_train": acts[~is_test],
        "y_train": labels[~is_test],
        "acts_test": acts[is_test],
        "y_test": labels[is_test],
        **extra,
    }


def absorption_config(cfg: EvalConfig) -> absorption_mod.AbsorptionConfig:
    return absorption_mod.AbsorptionConfig(
        words_per_letter=cfg.absorption_words_per_letter,
        icl_examples=cfg.absorption_icl,
        probe_f1_gate=cfg.absorption_f1_gate,
        min_letters=cfg.absorption_min_letters,
        seed=cfg.seed,
    )


def text_inputs(
    lm, layer, kind: str, texts: list[str], context: int, cfg: EvalConfig, cache, progress, key: dict
):
    def compute():
        phase = Phase(progress, f"{kind} texts (LM)", len(texts))
        acts, offsets = probing.text_activations(
            lm, layer, texts, context, max(1, cfg.batch_size // 2), phase
        )
        return {"acts": acts, "offsets": offsets}, {}

    texts_sha = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    return cache.get_or_compute(kind, key | {"context": context, "texts_sha256": texts_sha}, compute)[0]


def split_ragged(
    acts: torch.Tensor, offsets: torch.Tensor, idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [acts[offsets[i] : offsets[i + 1]] for i in idx]
    new = torch.zeros(len(idx) + 1, dtype=torch.long)
    new[1:] = torch.cumsum(torch.tensor([r.shape[0] for r in rows]), 0)
    return torch.cat(rows), new


# --- the stage -------------------------------------------------------------------------------------


def run_eval(cfg: EvalConfig) -> Path:
    metrics = parse_metrics(cfg.metrics)
    tasks = [t.strip() for t in cfg.probing_tasks.split(",") if t.strip()]
    unknown_tasks = [t for t in tasks if t not in data.TASKS]
    if "probing" in metrics and (unknown_tasks or not tasks):
        raise UserError(
            f"unknown probing task {', '.join(unknown_tasks) or '(none)'}; known: {', '.join(data.TASKS)}"
        )
    occupations = [o.strip() for o in cfg.bias_occupations.split(",")]
    if "bias" in metrics and (len(occupations) != 2 or not set(occupations) <= set(data.OCCUPATIONS)):
        raise UserError(
            f"--bias-occupations needs two of {', '.join(data.OCCUPATIONS)}, got {cfg.bias_occupations!r}"
        )
    check_out(Path(cfg.out))
    saes = load_saes(cfg.sae)
    layer = agreed(saes, "layer", cfg.layer, "layer")
    model_name = agreed(saes, "model_name", cfg.model, "model")
    store = open_eval_store(cfg, saes, layer)
    if store is not None and layer is None:
        layer = store.layers[0]
    if "core" in metrics and store is None:
        raise UserError(
            "metric 'core' needs the activation store the SAEs were trained on; pass --store PATH"
        )
    if layer is None:
        raise UserError("the SAEs do not record their layer; pass --layer")
    if model_name is None and store is not None and store.attrs["model"]["name"] != "synthetic":
        model_name = store.attrs["model"]["name"]
    data_dir = Path(cfg.probing_data) if cfg.probing_data else None
    # Read every labelled dataset before any LM work, so a broken file fails fast.
    probe_splits = (
        {
            t: data.task_split(data.TASKS[t], cfg.probing_train, cfg.probing_test, cfg.seed, data_dir)
            for t in tasks
        }
        if "probing" in metrics
        else {}
    )
    bias_cfg = bias_mod.BiasConfig(
        occupation_a=occupations[0],
        occupation_b=occupations[-1],
        seed=cfg.seed,
        people_per_cell=cfg.bias_people_per_cell,
    )
    bias_data = (
        bias_mod.scr_dataset(data.occupation_gender_table(data_dir), bias_cfg) if "bias" in metrics else None
    )

    needs_lm = bool(set(metrics) & LM_METRICS) or "core" in metrics
    lm = None
    if needs_lm:
        from atmpipe.lm import load_lm

        if model_name is None:
            raise UserError("the SAEs do not record their model; pass --model")
        lm = load_lm(model_name, device=cfg.device, dtype=cfg.dtype)
        if store is not None and store.attrs["model"]["config_hash"] not in ("synthetic", lm.config_hash):
            raise UserError(
                f"model {model_name} ({lm.source}) is not the model store {store.path} was harvested "
                "with (config hash differs); pass the store's --model"
            )
        for s in saes:
            if s.info["d_in"] != lm.d_model:
                raise UserError(
                    f"SAE {s.name} has width d_in={s.info['d_in']} but model {model_name} has "
                    f"d_model={lm.d_model}; evaluate it with the model it was trained on"
                )
        if not 0 <= layer < lm.n_layers:
            raise UserError(
                f"layer {layer} is out of range for {model_name} ({lm.n_layers} layers); pass --layer"
            )
    cache = ActivationCache(lm.config_hash if lm else "store", layer)
    for s in saes:
        s.sae.to(lm.device if lm else "cpu")

    results: dict[str, dict] = {s.name: {} for s in saes}
    shared: dict = {"sizes": {}}
    with progress_bar() as progress:
        if "core" in metrics:
            n_core = min(store.split("eval").n_tokens, cfg.core_tokens)
            windows = splice_windows(store, cfg.splice_windows)
            special = [lm.bos_token_id]
            base_key = {
                "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
                "shape": list(windows.shape),
                "special": special,
            }

            def compute_base():
                phase = Phase(progress, "splice baselines (LM)", windows.shape[0])
                return {}, core.baseline_losses(lm, layer, windows, special, phase)

            base = cache.get_or_compute("splice-baseline", base_key, compute_base)[1]
            shared["sizes"]["core"] = {
                "eval_tokens_read": n_core,
                "splice_windows": int(windows.shape[0]),
                "context": int(windows.shape[1]),
            }
            for s in saes:
                phase = Phase(progress, f"core · {s.name}", windows.shape[0] + 1)
                rec = core.reconstruction_metrics(s.sae, core_batches(store, layer, cfg.core_tokens))
                phase()
                spliced = core.spliced_losses(lm, layer, windows, special, s.sae, phase)
                results[s.name]["core"] = rec | core.downstream_scores(base, spliced)
        if "absorption" in metrics:
            inputs = absorption_inputs(lm, layer, cfg, cache, progress)
            acfg = absorption_config(cfg)
            probe = absorption_mod.ground_truth_probe(
                inputs["acts_train"], inputs["y_train"], inputs["acts_test"], inputs["y_test"], cfg.seed
            )
            shared["sizes"]["absorption"] = {
                "vocab_words": inputs["vocab_size"],
                "words": len(inputs["words"]),
                "dropped_prompts": inputs["dropped"],
            }
            phase = Phase(progress, "absorption · SAEs", len(saes))
            for s in saes:
                results[s.name]["absorption"] = absorption_mod.absorption_metrics(
                    s.sae,
                    inputs["acts_train"],
                    inputs["y_train"],
                    inputs["acts_test"],
                    inputs["y_test"],
                    acfg,
                    probe,
                )
                phase()
        if "probing" in metrics:
            shared["probing_baselines"], task_data = {}, {}
            for t, sp in probe_splits.items():
                texts = sp["train_texts"] + sp["test_texts"]
                key = {"task": t, "n_train": cfg.probing_train, "n_test": cfg.probing_test, "seed": cfg.seed}
                got = text_inputs(
                    lm, layer, f"probing-{t}", texts, cfg.probing_context, cfg, cache, progress, key
                )
                n_tr = len(sp["train_texts"])
                tr = split_ragged(got["acts"], got["offsets"], np.arange(n_tr))
                te = split_ragged(got["acts"], got["offsets"], np.arange(n_tr, len(texts)))
                task_data[t] = {
                    "train_acts": tr[0],
                    "train_offsets": tr[1],
                    "test_acts": te[0],
                    "test_offsets": te[1],
                    "train_labels": np.array(sp["train_labels"]),
                    "test_labels": np.array(sp["test_labels"]),
                }
                R = {
                    k: probing.mean_pool(task_data[t][f"{k}_acts"], task_data[t][f"{k}_offsets"])
                    for k in ("train", "test")
                }
                shared["probing_baselines"][t] = probing.residual_baselines(
                    R["train"],
                    task_data[t]["train_labels"],
                    R["test"],
                    task_data[t]["test_labels"],
                    seed=cfg.seed,
                )
            shared["sizes"]["probing"] = {
                t: {"train": len(sp["train_texts"]), "test": len(sp["test_texts"])}
                for t, sp in probe_splits.items()
            }
            phase = Phase(progress, "probing · SAEs", len(saes) * len(task_data))
            for s in saes:
                per_task = {}
                for t, td in task_data.items():
                    per_task[t] = probing.sae_task_accuracies(s.sae, td, seed=cfg.seed)
                    phase()
                results[s.name]["probing"] = summarise_probing(per_task)
        if "bias" in metrics:
            key = {"occupations": occupations, "seed": cfg.seed, "per_cell": cfg.bias_people_per_cell}
            got = text_inputs(
                lm, layer, "bias", bias_data["texts"], cfg.probing_context, cfg, cache, progress, key
            )
            full = {k: v for k, v in bias_data.items() if k != "texts"} | got
            phase = Phase(progress, "bias (SCR) · SAEs", len(saes))
            for s in saes:
                results[s.name]["bias"] = bias_mod.scr_metrics(s.sae, full, bias_cfg)
                phase()

    from atmpipe.eval.report import write_report

    run_info = {
        "model": model_name,
        "model_source": lm.source if lm else None,
        "model_config_hash": lm.config_hash if lm else None,
        "layer": layer,
        "store": str(store.path) if store is not None else None,
        "metrics": metrics,
        "config": {k: v for k, v in asdict(cfg).items() if k != "sae"},
        "cache_dir": str(cache.dir),
    }
    try:
        out = write_report(Path(cfg.out), saes, results, shared, run_info)
    except OSError as e:  # checked at the start, but the disk may have filled or changed since
        raise cannot_write(Path(cfg.out), e) from None
    console.print(f"report written to {out}")
    return out


def summarise_probing(per_task: dict) -> dict:
    """Per-task accuracies plus their means over all tasks and over the sentiment tasks."""
    out = {"per_task": per_task}
    for k in probing.K_VALUES:
        key = f"sae_top_{k}"
        out[f"mean_{key}"] = float(np.mean([v[key] for v in per_task.values()]))
        senti = [v[key] for t, v in per_task.items() if data.TASKS[t].group == "sentiment"]
        if senti:
            out[f"sentiment_{key}"] = float(np.mean(senti))
    return out
