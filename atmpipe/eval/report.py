"""The comparison report: report.md, report.html (self-contained: PNGs inlined as base64) and results.json.

The document is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice,
so the markdown and the HTML always say the same thing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIG_SIZE, FIG_DPI = (8, 5), 100  # every figure is 800 × 500 pixels

# The paper's own table (Gemma-2-2b, SAEBench), shown beside ours and never mixed with it.
PAPER = {
    "absorption": "ATM 0.0068 · TopK 0.1402 · JumpReLU 0.0114",
    "mse": "ATM 0.5508",
    "cossim": "ATM 0.9727",
    "probing": "ATM 0.7161",
    "bias": "ATM 0.796",
    "sentiment": "ATM 0.853",
}

# (row label, metric section, key, paper entry)
ROWS = [
    ("MSE (Σ_d, per token)", "core", "mse", "mse"),
    ("FVU", "core", "fvu", None),
    ("explained variance", "core", "explained_variance", None),
    ("cosine similarity", "core", "cossim", "cossim"),
    ("L2 ratio", "core", "l2_ratio", None),
    ("relative reconstruction bias", "core", "relative_reconstruction_bias", None),
    ("L0", "core", "l0", None),
    ("L1", "core", "l1", None),
    ("dead fraction", "core", "frac_dead", None),
    ("dense fraction (>10%)", "core", "frac_dense", None),
    ("max decoder cosine", "core", "max_decoder_cosine", None),
    ("duplicate fraction (cos > 0.8)", "core", "frac_duplicate", None),
    ("CE clean", "core", "ce_clean", None),
    ("CE with SAE", "core", "ce_sae", None),
    ("CE zero-ablated", "core", "ce_zero", None),
    ("ce_loss_score", "core", "ce_loss_score", None),
    ("kl_div_score", "core", "kl_div_score", None),
    ("full absorption (mean over letters)", "absorption", "mean_full_absorption", "absorption"),
    ("absorption fraction (mean over letters)", "absorption", "mean_absorption_fraction", None),
    ("split features (mean main latents)", "absorption", "mean_num_split_features", None),
    ("letters evaluated", "absorption", "letters_evaluated", None),
    ("sparse probing top-1 (mean over tasks)", "probing", "mean_sae_top_1", "probing"),
    ("sparse probing top-2", "probing", "mean_sae_top_2", None),
    ("sparse probing top-5", "probing", "mean_sae_top_5", None),
    ("sentiment top-1", "probing", "sentiment_sae_top_1", "sentiment"),
    ("SCR (bias) at headline N", "bias", "scr_headline", "bias"),
]


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def cell(section: dict | None, key: str) -> str:
    """A metric's value, or why it is missing (not run, or not computable with the reason's counts)."""
    if section is None:
        return "not run"
    if section.get("status") not in (None, "ok"):
        if section.get("status") == "insufficient" and "letters_passed" in section:
            return f"insufficient: {section['letters_passed']}/26 letters passed (need {section['letters_required']})"
        return str(section["status"])
    return fmt(section.get(key))


# --- figures --------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)
    plt.close(fig)
    return buf.getvalue()


def frontier_plot(names: list[str], results: dict) -> bytes | None:
    pts = [(n, results[n]["core"]) for n in names if "core" in results[n] and "l0" in results[n]["core"]]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    for name, c in pts:
        ax.scatter(c["l0"], c["fvu"], s=60)
        ax.annotate(name, (c["l0"], c["fvu"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("Sparsity vs reconstruction (lower-left is better)")
    ax.grid(alpha=0.3)
    return _png(fig)


def grouped_bars(categories: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(categories))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(categories))])
    ax.set_xticklabels(
        categories, rotation=45 if len(max(categories, key=len, default="")) > 3 else 0, ha="right"
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# --- document -------------------------------------------------------------------------------------


def build_blocks(saes, results: dict, shared: dict, run: dict) -> list[tuple]:
    names = [s.name for s in saes]
    blocks: list[tuple] = [("h1", "atmpipe evaluation report")]
    blocks.append(
        (
            "p",
            f"Model {run['model']} (config {str(run['model_config_hash'])[:12]}), layer {run['layer']}, "
            f"store {run['store']}. Metrics: {', '.join(run['metrics'])}. Definitions: EVAL.md "
            "(SAEBench's code where its paper and code differ).",
        )
    )
    blocks.append(("h2", "All metrics side by side"))
    header = ["metric", *names, "paper (Gemma-2-2b, SAEBench)"]
    rows = [
        [label, *[cell(results[n].get(sec), key) for n in names], PAPER.get(paper, "")]
        for label, sec, key, paper in ROWS
        if any(sec in results[n] for n in names)
    ]
    blocks.append(("table", header, rows))
    blocks.append(
        (
            "p",
            "The paper column holds the paper's own numbers on Gemma-2-2b, not ours: read it as a "
            "reference point only. Its absorption 0.0068 is most likely the full-absorption rate.",
        )
    )

    if any("core" in results[n] for n in names):
        blocks.append(("h2", "Sparsity vs reconstruction"))
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

    if any("absorption" in results[n] for n in names):
        blocks.append(("h2", "Absorption per letter"))
        ab = {n: results[n]["absorption"] for n in names if "absorption" in results[n]}
        size = shared["sizes"].get("absorption", {})
        first = next(iter(ab.values()))
        blocks.append(
            (
                "p",
                f"First-letter task on {size.get('words')} words sampled by letter from "
                f"{size.get('vocab_words')} alphabetic tokens ({size.get('dropped_prompts')} prompts "
                f"dropped for a tokenisation merge), {first['n_words_train']} train / "
                f"{first['n_words_test']} test; ground-truth probe accuracy {fmt(first['probe_accuracy'])}, "
                f"{first['letters_passed']} of 26 letters above F1 {first['probe_f1_gate']} "
                f"(need {first['letters_required']}).",
            )
        )
        for n, a in ab.items():
            if a.get("status") != "ok":
                blocks.append(("p", f"{n}: not computed — {a.get('reason')}"))
        letters = sorted({c for a in ab.values() for c in a.get("per_letter", {})})
        if letters:
            series = {
                n: [a.get("per_letter", {}).get(c, {}).get("full_absorption", 0.0) for c in letters]
                for n, a in ab.items()
            }
            blocks.append(
                (
                    "img",
                    "absorption_letters.png",
                    "full absorption per letter",
                    grouped_bars(letters, series, "full-absorption rate", "Full absorption per letter"),
                )
            )
            rows = [
                [
                    c,
                    *[
                        fmt(ab[n].get("per_letter", {}).get(c, {}).get("absorption_fraction"))
                        + " / "
                        + fmt(ab[n].get("per_letter", {}).get(c, {}).get("full_absorption"))
                        for n in ab
                    ],
                    fmt(first["probe_f1"][c]),
                ]
                for c in letters
            ]
            blocks.append(("table", ["letter", *[f"{n} (fraction / full)" for n in ab], "probe F1"], rows))

    if any("probing" in results[n] for n in names):
        blocks.append(("h2", "Sparse probing per task"))
        pr = {n: results[n]["probing"]["per_task"] for n in names if "probing" in results[n]}
        tasks = list(next(iter(pr.values())))
        base = shared["probing_baselines"]
        series = {n: [pr[n][t]["sae_top_1"] for t in tasks] for n in pr}
        series["residual top-1"] = [base[t]["resid_top_1"] for t in tasks]
        series["full residual"] = [base[t]["resid_full"] for t in tasks]
        blocks.append(
            (
                "img",
                "probing_tasks.png",
                "probing accuracy per task",
                grouped_bars(tasks, series, "test accuracy", "Sparse probing: top-1 latent vs baselines"),
            )
        )
        header = ["task", "train/test", *[f"{n} k=1/2/5" for n in pr], "resid k=1/2/5", "full resid"]
        rows = []
        for t in tasks:
            sz = shared["sizes"]["probing"][t]
            rows.append(
                [
                    t,
                    f"{sz['train']}/{sz['test']}",
                    *["/".join(fmt(pr[n][t][f"sae_top_{k}"]) for k in (1, 2, 5)) for n in pr],
                    "/".join(fmt(base[t][f"resid_top_{k}"]) for k in (1, 2, 5)),
                    fmt(base[t]["resid_full"]),
                ]
            )
        blocks.append(("table", header, rows))

    if any("bias" in results[n] for n in names):
        blocks.append(("h2", "Bias: spurious correlation removal"))
        bi = {n: results[n]["bias"] for n in names if "bias" in results[n]}
        con = next(iter(bi.values())).get("construction", {})
        blocks.append(
            (
                "p",
                "Bias in Bios is not available offline. Construction: Wikidata people from the "
                "sae-probes data, one occupation each (a person positive for two occupations is "
                "dropped), joined with the gender dataset on the same text. Target "
                f"{con.get('target')}, spurious {con.get('spurious')}; the training split is biased "
                f"(only {', '.join(con.get('biased_train_cells', []))}; {con.get('n_biased_train')} people), "
                f"the oracle and gender probes use {con.get('n_balanced_train')} balanced people, the test "
                f"has {con.get('n_test')} people balanced over all four cells (cell sizes "
                f"{con.get('cell_sizes')}). Latents are ranked by their effect on the gender probe and "
                "zero-ablated with the SAE error kept.",
            )
        )
        ns = sorted({int(k) for b in bi.values() for k in b.get("ablated_accuracy", {})})
        header = ["SAE", "A_base", "A_oracle", *[f"SCR N={n}" for n in ns], "status"]
        rows = [
            [
                n,
                fmt(b.get("a_base")),
                fmt(b.get("a_oracle")),
                *[fmt(b.get("scr", {}).get(str(k))) for k in ns],
                b.get("status", "") + (f": {b['reason']}" if b.get("reason") else ""),
            ]
            for n, b in bi.items()
        ]
        blocks.append(("table", header, rows))

    blocks.append(("h2", "Provenance and hyper-parameters"))
    for s in saes:
        i = s.info
        blocks.append(("h3", s.name))
        rows = [
            ["path", i["path"]],
            ["format", i["format"]],
            ["method", f"{i['method']} ({i['architecture']})"],
            ["width", f"d_in {i['d_in']} · d_sae {i['d_sae']}"],
            ["model · layer", f"{i['model_name']} · {i['layer']}"],
            ["hyper-parameters", json.dumps(i["hparams"], sort_keys=True)],
            ["store", json.dumps(i["store"], sort_keys=True, default=str)],
            ["provenance", json.dumps(i["provenance"], sort_keys=True, default=str)],
        ]
        blocks.append(("table", ["field", "value"], rows))
    blocks.append(
        (
            "p",
            f"Evaluation settings: {json.dumps(run['config'], sort_keys=True)}. LM activations cached in "
            f"{run['cache_dir']}.",
        )
    )
    return blocks


def render_markdown(blocks) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "table":
            esc = [[str(c).replace("|", "\\|") for c in row] for row in [b[1], *b[2]]]
            out.append("| " + " | ".join(esc[0]) + " |")
            out.append("|" + "---|" * len(esc[0]))
            out += ["| " + " | ".join(row) + " |" for row in esc[1:]]
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})")
        out.append("")
    return "\n".join(out)


def render_html(blocks) -> str:
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(b[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[2]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(b[3]).decode()
            body.append(
                f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b[2])}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>atmpipe evaluation report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, float) and math.isnan(o):
        return None
    return o


def write_report(out: Path, saes, results: dict, shared: dict, run: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(saes, results, shared, run)
    for b in blocks:
        if b[0] == "img":
            (out / b[1]).write_bytes(b[3])
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks))
    payload = {
        "run": run,
        "saes": {s.name: s.info for s in saes},
        "results": results,
        "shared": shared,
        "paper_gemma_2_2b": PAPER,
    }
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=2, default=str) + "\n")
    return out
