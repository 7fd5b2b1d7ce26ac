"""The inspect stage: check the inputs, extract what each latent's page shows, write the browser.

Everything comes from the store's held-out split and the SAEs' weights; the model contributes only its
tied unembedding and tokenizer. The LM runs only for `--absorption`, and then only on the first-letter
prompts, which `atmpipe eval` has usually cached already.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from atmpipe.atomic import disk_full, sweep
from atmpipe.config import load_config
from atmpipe.errors import UserError
from atmpipe.eval.cache import ActivationCache
from atmpipe.eval.metrics import REGISTRY
from atmpipe.eval.metrics.absorption import summary
from atmpipe.eval.metrics.masking import diagnostics
from atmpipe.eval.run import Context, EvalConfig
from atmpipe.inspect import absorbed, extract, page, serve, texts, weights
from atmpipe.inspect.config import InspectConfig
from atmpipe.lm import load_lm
from atmpipe.progress import Progress
from atmpipe.stage_inputs import Phase, agreed, check_out, console, load_saes, open_sae_store, other_width
from atmpipe.writable import full_disk


def parse_latents(spec: str | None, top: int | None, d_sae: int, name: str) -> list[int] | None:
    """The latents given a page in one SAE (None: every latent)."""
    if spec is not None and top is not None:
        raise UserError("--latents and --top were both given; pass one of them")
    if top is not None and top <= 0:
        raise UserError(f"--top must be a positive number of latents (got {top}); pass e.g. --top 200")
    if spec is None:
        return None
    try:
        chosen = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise UserError(
            f"--latents {spec!r} is not a comma list of latent numbers; pass e.g. --latents 12,407"
        ) from None
    bad = [j for j in chosen if not 0 <= j < d_sae]
    if bad or not chosen:
        raise UserError(
            f"unknown latent {', '.join(map(str, bad)) or '(none)'} for SAE {name}, which has latents "
            f"0-{d_sae - 1}; pass latent numbers below {d_sae}"
        )
    return chosen


def check_inputs(cfg: InspectConfig):
    """SAEs, store, model checkpoint and page selections, all refused before anything is written."""
    out = Path(cfg.out)
    check_out(out)
    saes = load_saes(cfg.sae)
    layer = agreed(saes, "layer", None, "layer")
    store = open_sae_store(cfg, saes, layer)
    if store is None:
        raise UserError("no store given and the SAEs do not record theirs; pass --store PATH")
    layer = store.layers[0] if layer is None else layer
    selections = [parse_latents(cfg.latents, cfg.top, s.info["d_sae"], s.name) for s in saes]
    held = extract.read_held_out(store, cfg.max_tokens)
    if held.n_scored == 0:
        raise UserError(
            f"store {store.path} has no held-out tokens to inspect (its eval split is empty); "
            "harvest it with --eval-tokens above 0"
        )
    model = cfg.model or agreed(saes, "model_name", None, "model") or store.attrs["model"]["name"]
    if model in (None, "", "synthetic"):
        raise UserError("neither the SAEs nor the store name their model; pass --model")
    ckpt = weights.checkpoint_dir(model)
    user_texts = texts.read_texts(cfg.text) if cfg.text is not None else None
    if cfg.serve and not 0 <= cfg.port <= 65535:
        raise UserError(
            f"--port {cfg.port} is not a port number; pass one from 1 to 65535 (0: any free port)"
        )
    return out, saes, layer, store, selections, held, model, ckpt, user_texts


def check_model(U: torch.Tensor, saes, held, model: str) -> None:
    if int(held.tokens.max()) >= U.shape[0]:
        raise UserError(
            f"the store holds token id {int(held.tokens.max())} but model {model} has {U.shape[0]} tokens; "
            "pass the store's model with --model"
        )
    if s := other_width(saes, U.shape[1]):
        raise UserError(
            f"SAE {s.name} has width d_in={s.info['d_in']} but model {model} has d_model={U.shape[1]}; "
            "pass the SAE's model with --model"
        )


def eval_result(cfg: InspectConfig, out: Path) -> Path | None:
    if cfg.eval is not None:
        path = Path(cfg.eval)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(
                f"eval result {path} does not exist; pass a results.json written by `atmpipe eval`"
            )
        return path
    beside = out.parent / "results.json"
    return beside if beside.is_file() else None


def absorption_data(
    cfg, saes, layer: int, model: str, out: Path, progress
) -> tuple[list, dict | None, dict | None]:
    """Per SAE the absorption view's data (or None), the absorption words' latents per SAE, and the probe
    gate (each letter's probe F1, so the page can list the letters that were not scored)."""
    if cfg.absorption:
        return computed_absorption(cfg, saes, layer, model, progress)
    path = eval_result(cfg, out)
    views = []
    for s in saes:
        records = absorbed.from_eval_results(path, s.name) if path else None
        letters = {c: r.to_json() for c, r in sorted(records.items())} if records else None
        views.append({"source": f"read from {path}", "letters": letters} if letters else None)
    shared = absorbed.read_eval_results(path).get("shared", {}).get("absorption") if path else None
    return views, None, absorbed.gate_summary(shared)


def computed_absorption(cfg, saes, layer: int, model: str, progress) -> tuple[list, dict, dict | None]:
    """Run the eval's absorption plug-in (its options from --absorption-config, else their defaults; its
    cache: after `atmpipe eval` with the same options the prompts are not run again), then each SAE's
    per-letter records and each absorption word's latents."""
    lm = load_lm(model)
    ecfg = load_config(EvalConfig, cfg.absorption_config, sae=cfg.sae, seed=cfg.seed)
    metric = REGISTRY["absorption"].from_config(ecfg)
    ctx = Context(ecfg, saes, layer, lm=lm, cache=ActivationCache(lm.config_hash, layer), progress=progress)
    metric.collect(ctx)
    task, acfg, probe = metric.task, metric.acfg, metric.probe
    acts_all = np.concatenate([task["x_train"], task["x_test"]])
    words_all = list(task["words_train"]) + list(task["words_test"])
    source = f"computed by atmpipe inspect --absorption ({len(words_all)} words, probe F1 gate {acfg.probe_f1_gate})"
    views, per_word = [], {}
    phase = Phase(progress, "absorption · SAEs", len(saes))
    for k, s in enumerate(saes):
        records = absorbed.compute(s.sae, task, probe, acfg)
        views.append({"source": source, "letters": {c: r.to_json() for c, r in sorted(records.items())}})
        for w, latents in absorbed.word_latents(s.sae, acts_all, words_all).items():
            per_word.setdefault(w, [[] for _ in saes])[k] = latents
        phase()
    return views, per_word, absorbed.gate_summary(summary(task, probe, acfg))


def build(cfg: InspectConfig) -> Path:
    try:
        return _build(cfg)
    except OSError as e:
        if not disk_full(e):
            raise
        raise full_disk(
            Path(cfg.out), e, "index.html is written last, so no half-written browser opens"
        ) from None


def clear_browser(out: Path) -> None:
    """Remove a browser built here before, or half built by a run that was killed: index.html first, so
    from here on no index stands over missing or mixed data; then its data files (whose chunks must not
    outlive it) and the temporary files of a killed run."""
    built = (out / "index.html").is_file()
    (out / "index.html").unlink(missing_ok=True)
    sweep(out)
    data = out / "data"
    if data.is_dir() and (built or all(p.suffix == ".js" or ".js.tmp-" in p.name for p in data.iterdir())):
        shutil.rmtree(data)


def _build(cfg: InspectConfig) -> Path:
    started = time.monotonic()
    out, saes, layer, store, selections, held, model, ckpt, user_texts = check_inputs(cfg)
    U = weights.unembedding(ckpt)
    check_model(U, saes, held, model)
    U_half = weights.product_copy(U)  # once: the logit effects' product reads it
    rng = np.random.default_rng(cfg.seed)
    index, used_tokens, token_view, maxes = [], set(held.tokens.tolist()), {}, []
    with Progress(console) as progress:
        views, word_view, gate = absorption_data(cfg, saes, layer, model, out, progress)
        firings = extract.encode_held_out(
            [s.sae for s in saes],
            store,
            layer,
            held,
            progress=Phase(progress, "encode held-out tokens", held.n),
        )
        clear_browser(out)
        (out / "data").mkdir(parents=True, exist_ok=True)
        for k, (s, fr) in enumerate(zip(saes, firings, strict=True)):
            stats = extract.latent_stats(fr, held)
            maxes.append(stats["max"])
            pages = pages_of(selections[k], cfg.top, stats, views[k])
            nn = weights.nearest_latents(s.sae.W_dec.detach())
            detail_latents = np.arange(s.info["d_sae"]) if pages is None else np.array(pages)
            phase = Phase(progress, f"latent pages · {s.name}", len(detail_latents))
            write_details(out, k, s.sae, fr, held, (U, U_half), nn, detail_latents, rng, used_tokens, phase)
            for t, latents in extract.token_latents(fr, held, stats["max"]).items():
                token_view.setdefault(t, [[] for _ in saes])[k] = latents
            entry = page.sae_index_entry(s.name, s.sae, stats, nn, atm_stats(s), pages, views[k])
            index.append(entry | {"masking": masking_summary(s), "groups": latent_groups(s.sae)})
        if user_texts is not None:
            view = own_texts(user_texts, saes, maxes, layer, model, progress)
            used_tokens.update(t for v in view for t in v["ids"])
            page.write_js(out / "data" / "texts.js", "texts", view)
    vocab = weights.token_strings(ckpt, sorted(used_tokens))
    page.write_js(out / "data" / "compare.js", "compare", {"tokens": token_view, "words": word_view})
    page.write_js(
        out / "data" / "held.js",
        "held",
        {"tokens": held.tokens.tolist(), "positions": held.positions.tolist()},
    )
    title = f"atmpipe feature browser · {', '.join(s.name for s in saes)} · {model} layer {layer}"
    meta = page.index_meta(title, held.n_scored, atm_stat_names(saes), vocab)
    meta |= {"saes": index, "absorption_gate": gate, "n_texts": len(user_texts or [])}
    page.write_index(out, meta)  # index.html last: its presence marks a whole browser
    console.print(f"feature browser written to {out / 'index.html'} in {time.monotonic() - started:.0f} s")
    if cfg.serve:
        runner = serve.TextRunner(load_lm(model), [s.sae for s in saes], maxes, layer)
        serve.serve(out, runner, cfg.port, console)
    return out / "index.html"


def pages_of(selected, top: int | None, stats: dict, view: dict | None) -> list[int] | None:
    """Latents with a page: all (None), the chosen ones, or the `top` densest, plus absorption's latents."""
    if selected is None and top is None:
        return None
    chosen = set(selected or np.argsort(-stats["density"], kind="stable")[:top].tolist())
    for rec in (view or {}).get("letters", {}).values():
        chosen |= set(rec["main"]) | {j for j, _ in rec["absorbers"]}
    return sorted(chosen)


def write_details(out, k, sae, fr, held, U: tuple, nn, latents, rng, used_tokens: set, progress) -> None:
    """Per chunk of latents: contexts, histograms, logit effects and neighbours (by decoder cosine and by
    co-activation), into data/s{k}c{c}.js."""
    chunks: dict[int, list[int]] = {}
    for j in latents.tolist():
        chunks.setdefault(j // page.CHUNK, []).append(j)
    W_dec = sae.W_dec.detach().float()
    coact = extract.coactive_latents(fr, held.n_scored, latents.tolist())
    for c, js in chunks.items():
        effects = weights.logit_effects(W_dec[js], *U)
        data = {}
        for i, j in enumerate(js):
            d = extract.latent_detail(fr, j, held, rng)
            d["pos_ids"], d["neg_ids"] = effects["pos_ids"][i].tolist(), effects["neg_ids"][i].tolist()
            d["pos"], d["neg"] = page.sig(effects["pos"][i]), page.sig(effects["neg"][i])
            d["logit_hist"] = {"lo": float(effects["hist_lo"][i]), "hi": float(effects["hist_hi"][i]),
                               "counts": effects["hist"][i].tolist()}  # fmt: skip
            d["coact"] = coact[j]
            d["nn"] = [[int(a), round(float(b), 4)] for a, b in zip(nn[0][j], nn[1][j], strict=True)]
            used_tokens.update(d["pos_ids"] + d["neg_ids"])
            data[j] = d
        page.write_js(out / "data" / f"s{k}c{c}.js", f"s{k}c{c}", data)
        progress(len(js))


def atm_stat_names(saes) -> tuple:
    """The names of the per-latent masking statistics (ATM's M, F, R, I, p), from the first SAE holding them."""
    return next((tuple(stats) for stats in map(atm_stats, saes) if stats), ())


def masking_stats(s) -> dict | None:
    """An SAE's masking statistics (ATM's, `SAE.masking_statistics`): per-latent arrays and θ; None for a
    method without them, or an SAE saved without them (all zero)."""
    stats = s.sae.masking_statistics()
    if stats is None:
        return None
    per_latent = {n: v.detach().cpu().numpy() for n, v in stats.items() if v.dim() == 1}
    if not any(v.any() for v in per_latent.values()):
        return None
    return {**per_latent, "theta": float(stats["theta"])}


def atm_stats(s) -> dict | None:
    """An SAE's per-latent masking statistics (ATM's final M, F, R, I and p), None where it has none."""
    stats = masking_stats(s)
    return None if stats is None else {n: v for n, v in stats.items() if n != "theta"}


def masking_summary(s) -> dict | None:
    """An SAE's masking threshold θ and diagnostics (the eval's masking plug-in, from its statistics)."""
    stats = masking_stats(s)
    if stats is None:
        return None
    d = diagnostics(stats, s.sae.cfg.hparams)
    keys = ("theta", "threshold_kind", "targeting", "frac_above_theta", "mean_p", "effective_masking_rate",
            "targeting_index", "corr_p_firing")  # fmt: skip
    return {k: d[k] for k in keys} if d["status"] == "ok" else None


def latent_groups(sae) -> list[int] | None:
    """Each latent's group, for methods that nest latents in groups (None for the others)."""
    groups = sae.latent_groups()
    return None if groups is None else groups.long().tolist()


def own_texts(user_texts: list[str], saes, maxes: list, layer: int, model: str, progress) -> list[dict]:
    """--text: the LM's residuals on the user's texts (cached), then each SAE's latents per token."""
    phase = Phase(progress, "your texts · LM and SAEs", 2)
    lm = load_lm(model)
    runs = texts.residuals(lm, layer, user_texts, ActivationCache(lm.config_hash, layer))
    phase()
    view = texts.text_view([s.sae for s in saes], maxes, runs)
    phase()
    return view
