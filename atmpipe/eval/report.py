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

from atmpipe.atomic import atomic_file, sweep
from atmpipe.eval.metric import paper_values

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIG_SIZE, FIG_DPI = (8, 5), 100  # every figure is 800 × 500 pixels


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
    ci = section.get("ci95_" + key.removeprefix("mean_"))  # a 95% interval, where the metric gives one
    return fmt(section.get(key)) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


# --- figures --------------------------------------------------------------------------------------


def png(fig) -> bytes:
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
    return png(fig)


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
    return png(fig)


# --- document -------------------------------------------------------------------------------------


def build_blocks(saes, results: dict, shared: dict, run: dict, metrics) -> list[tuple]:
    """The whole document: the run, every metric side by side, each metric's own section, provenance.
    `metrics` are the Metric objects that ran (given, not looked up: the metrics import this module)."""
    names = [s.name for s in saes]
    blocks: list[tuple] = [("h1", "atmpipe evaluation report")]
    blocks.append(
        (
            "p",
            f"Model {run['model']} (config {str(run['model_config_hash'])[:12]}), layer {run['layer']}, "
            f"store {run['store']}. Metrics: {', '.join(run['metrics'])}. Definitions: docs/metrics.md "
            "(SAEBench's code where its paper and code differ).",
        )
    )
    blocks += side_by_side(metrics, names, results)
    for m in metrics:
        blocks += m.blocks(names, results, shared)
    return blocks + provenance(saes, run)


def side_by_side(metrics, names: list[str], results: dict) -> list[tuple]:
    header = ["metric", *names, "paper (Gemma-2-2b, SAEBench)"]
    rows = [
        [label, *[cell(results[n].get(m.name), key) for n in names], m.paper.get(paper, "")]
        for m in metrics
        if any(m.name in results[n] for n in names)
        for label, key, paper in m.rows
    ]
    note = (
        "The paper column holds the paper's own numbers on Gemma-2-2b, not ours: read it as a "
        "reference point only. Its absorption 0.0068 is most likely the full-absorption rate."
    )
    return [("h2", "All metrics side by side"), ("table", header, rows), ("p", note)] if rows else []


def provenance(saes, run: dict) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Provenance and hyper-parameters")]
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
        elif kind == "link":
            out.append(f"[{b[2]}]({b[1]})")
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
        elif kind == "link":
            body.append(f'<p><a href="{html.escape(b[1])}">{html.escape(b[2])}</a></p>')
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


BROWSER = "features/index.html"  # where `atmpipe inspect` writes beside a report


def write_report(out: Path, saes, results: dict, shared: dict, run: dict, metrics=()) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    sweep(out)  # temporary files of a report write that was killed
    blocks = build_blocks(saes, results, shared, run, metrics)
    if (out / BROWSER).is_file():  # `atmpipe inspect --out <this report>/features` was run
        blocks.insert(
            2, ("link", BROWSER, "Feature browser: each latent's contexts, logit effects and absorption")
        )
    payload = {
        "run": run,
        "saes": {s.name: s.info for s in saes},
        "results": results,
        "shared": shared,
        "paper_gemma_2_2b": paper_values(metrics),  # the paper's own table, of the metrics that ran
    }
    files = {b[1]: b[3] for b in blocks if b[0] == "img"}
    files["report.md"] = render_markdown(blocks).encode()
    files["report.html"] = render_html(blocks).encode()
    files["results.json"] = (json.dumps(_jsonable(payload), indent=2, default=str) + "\n").encode()
    for name, data in files.items():  # each file whole or not at all (a kill or a full disk mid-write)
        with atomic_file(out / name) as tmp:
            tmp.write_bytes(data)
    return out
