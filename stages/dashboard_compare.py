"""`make dashboard-compare`: SAEDashboard's feature page beside atmpipe's, for the same latents of the demo's SAEs.

Run with the main venv's python after `make demo` and `make dashboard`:
    .venv/bin/python stages/dashboard_compare.py [--latents 'atm:376,852,853;topk:1329,2129,1685']
        [--runs runs/demo] [--store cache/demo-l9.zarr] [--eval reports/demo/results.json]
1. the held-out token windows of the store (the tokens atmpipe's browser reads), written as an array;
2. atmpipe's browser for those latents (`atmpipe inspect --latents`), with the demo's absorption records;
3. SAEDashboard's pages for the same latents on the same windows (stages/dashboard_render.py, in
   .venv-dashboard: TransformerLens runs the LM, SAELens loads the SAEs);
4. both pages in headless Chromium at 1400 px, what each page shows counted in its DOM, side-by-side
   screenshots, and the numbers both report for each latent (activation max, density, promoted tokens)
   into OUT/compare.{json,md}; the first latent of each SAE's pair of screenshots also into docs/img/.
The default latents: per SAE, the main latent for C, the latent absorbing most C words (both from the demo's
absorption eval) and one the browser's issue named (ATM #853 repeated a passage, TopK #1685 has outliers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from atmpipe.inspect.extract import read_held_out  # noqa: E402
from atmpipe.inspect.weights import checkpoint_dir, token_strings  # noqa: E402
from atmpipe.store import open_store  # noqa: E402

DEFAULT_LATENTS = "atm:376,852,853;topk:1329,2129,1685"
WIDTH, HEIGHT = 1400, 1700  # each page's screenshot
# What SAEDashboard's page draws, counted in its DOM once its scripts ran (its element classes and ids).
DASHBOARD_PARTS = {
    "sequence groups": ".seq-group",
    "sequences": ".seq",
    "plotly charts": ".js-plotly-plot",
    "feature tables": ".feature-tables table",
    "logit table rows": ".logits-table tr",
}
ATMPIPE_PARTS = {
    "contexts (top and quantile bands)": "tr.context",
    "histogram bars": "#histogram rect.bin",
    "nearest latents (decoder cosine)": "#nearest a",
    "co-activating latents": "#coactive a",
    "logit histogram bars": "#logit-histogram rect",
    "promoted/suppressed tokens": ".pos, .neg",
    "absorption role": "#absorption-role",
}


def token_windows(store_path: str, out: Path) -> tuple[Path, int]:
    """The held-out split as [windows, context] (every window full and BOS first, as harvested)."""
    held = read_held_out(open_store(store_path), 1 << 62)
    starts = np.flatnonzero(held.positions == 0)
    ctx = int(np.bincount(np.diff(np.r_[starts, held.n])).argmax())
    full = [s for s in starts if s + ctx <= held.n and held.positions[s + ctx - 1] == ctx - 1]
    windows = np.stack([held.tokens[s : s + ctx] for s in full])
    np.save(out / "tokens.npy", windows)
    return out / "tokens.npy", held.n


def build_atmpipe(saes: list[Path], latents: dict, args, out: Path) -> Path:
    union = sorted({j for js in latents.values() for j in js})
    cmd = [sys.executable, "-m", "atmpipe", "inspect", *(f"--sae={s}" for s in saes), "--store", args.store,
           "--latents", ",".join(map(str, union)), "--out", str(out / "atmpipe")]  # fmt: skip
    cmd += ["--eval", args.eval] if args.eval else []
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    return out / "atmpipe" / "index.html"


def render_dashboard(saes: list[Path], latents: dict, tokens: Path, args, out: Path) -> dict:
    d3 = Path(args.dashboard_python).parent.parent / "share" / "d3.v6.min.js"
    spec = ";".join(",".join(map(str, latents[s.name])) for s in saes)
    cmd = [args.dashboard_python, str(ROOT / "stages" / "dashboard_render.py"), *map(str, saes),
           "--tokens", str(tokens), "--latents", spec, "--d3", str(d3), "--out", str(out / "dashboard")]  # fmt: skip
    cmd += ["--keep-bos"] * args.keep_bos + ["--no-processing"] * args.no_processing
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "dashboard" / "dashboard.json").read_text())


def count_parts(driver, parts: dict) -> dict:
    from selenium.webdriver.common.by import By

    return {name: len(driver.find_elements(By.CSS_SELECTOR, css)) for name, css in parts.items()}


def screenshots(index: Path, dash: Path, saes: list[Path], latents: dict, out: Path) -> dict:
    """Each latent's two pages at WIDTH px: their parts counted, a screenshot of each, and no console error."""
    from test_inspect import chromium, console_errors, open_page

    driver, seen = chromium(), {}
    try:
        driver.set_window_size(WIDTH, HEIGHT)
        for k, s in enumerate(saes):
            for j in latents[s.name]:
                open_page(driver, index.as_uri() + f"#sae={k}&latent={j}", "tr.context")
                ours = count_parts(driver, ATMPIPE_PARTS) | {"console errors": len(console_errors(driver))}
                driver.save_screenshot(str(out / f"atmpipe-{s.name}-{j}.png"))
                open_page(driver, (dash / f"{s.name}_feature_{j}.html").as_uri(), ".seq")
                time.sleep(1.0)  # plotly draws its histograms after the sequences
                theirs = count_parts(driver, DASHBOARD_PARTS) | {
                    "console errors": len(console_errors(driver))
                }
                driver.save_screenshot(str(out / f"dashboard-{s.name}-{j}.png"))
                seen[f"{s.name}/{j}"] = {"atmpipe": ours, "sae-dashboard": theirs}
    finally:
        driver.quit()
    return seen


def side_by_side(left: Path, right: Path, dest: Path, width: int = 1800) -> None:
    """atmpipe's page on the left, SAEDashboard's on the right, scaled to `width` px in all."""
    from PIL import Image, ImageDraw

    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    pad, label = 12, 26
    canvas = Image.new("RGB", (a.width + b.width + pad, max(a.height, b.height) + label), "white")
    canvas.paste(a, (0, label))
    canvas.paste(b, (a.width + pad, label))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), "atmpipe inspect", fill="black")
    draw.text((a.width + pad + 8, 6), "SAEDashboard (sae-dashboard 0.8)", fill="black")
    scale = width / canvas.width
    small = canvas.resize((width, round(canvas.height * scale)), Image.LANCZOS)
    small.quantize(colors=256).save(dest, optimize=True)  # a palette keeps the PNG small


def atmpipe_numbers(index: Path, saes: list[Path], latents: dict) -> dict:
    """What atmpipe's page reports per latent: max, density, top promoted tokens (from its data files)."""
    data = index.parent / "data"
    meta = json.loads((data / "index.js").read_text().removeprefix("ATM.index=").rstrip(";\n"))
    out = {}
    for k, s in enumerate(saes):
        S = meta["saes"][k]["stats"]
        for j in latents[s.name]:
            chunk = f"s{k}c{j // meta['chunk']}"
            body = (data / f"{chunk}.js").read_text().removeprefix(f'ATM.feed("{chunk}",').rstrip(");\n")
            d = json.loads(body)[str(j)]
            out[f"{s.name}/{j}"] = {"max": S["max"][j], "density": S["density"][j], "pos_ids": d["pos_ids"],
                                    "n_top": len(d["top"]), "n_band_examples": sum(len(b[2]) for b in d["bands"]),
                                    "top_under_tenth_of_shading": sum(c[1] < 0.1 * d["p99"] for c in d["top"])}  # fmt: skip
    return out


def density_of(title: str) -> float:
    """SAEDashboard's density, read from its histogram's title ('ACTIVATIONS<br>DENSITY = 1.234%')."""
    return float(title.rsplit("=", 1)[1].strip().rstrip("%")) / 100


def compare_rows(ours: dict, theirs: dict, pages: dict, vocab: dict) -> list[dict]:
    """Per latent, the two sides' numbers and what each page draws."""
    rows = []
    for key, a in ours.items():
        name, j = key.split("/")
        b = theirs["saes"][name]["latents"][j]
        their_pos = [t for t, _ in b["top_logits"]][: len(a["pos_ids"])]
        rows.append({
            "latent": key,
            "max": {"atmpipe": a["max"], "sae-dashboard": b["top_activation"]},
            "density": {"atmpipe": a["density"], "sae-dashboard": density_of(b["density_title"])},
            "decoder_norm": b["decoder_norm"],
            "promoted": {"atmpipe": [vocab[t] for t in a["pos_ids"][:5]], "sae-dashboard": [vocab[t] for t in their_pos[:5]],
                         "top10_overlap": len(set(a["pos_ids"]) & set(their_pos))},
            "examples": {"atmpipe": {"top": a["n_top"], "quantile bands": a["n_band_examples"]},
                         "sae-dashboard": {g["title"]: g["n"] for g in b["groups"]}},
            "tokens_per_example": {"sae-dashboard": b["tokens_per_sequence"]},
            "top_under_tenth_of_shading": {"atmpipe": a["top_under_tenth_of_shading"],
                                           "sae-dashboard": b["top_under_tenth_of_shading"]},
            "top_repeated_text": {"sae-dashboard": b["top_repeated_text"]},
            "correlated_features": b["correlated_features"],
            "pages": pages[key],
        })  # fmt: skip
    return rows


def summary_md(result: dict) -> str:
    lines = [
        "# atmpipe's feature page beside SAEDashboard's (`make dashboard-compare`)",
        "",
        f"Same latents, same held-out windows ({result['tokens'][0]} × {result['tokens'][1]} tokens; atmpipe "
        f"reads {result['atmpipe_tokens']}); versions {json.dumps(result['versions'])}. "
        f"SAEDashboard's wall time per SAE: {result['dashboard_seconds']} (CPU, shared cores).",
        "",
        "| latent | max act. atmpipe / SAEDashboard | density atmpipe / SAEDashboard | decoder norm | "
        "top-10 promoted tokens in common | atmpipe's top 5 promoted | SAEDashboard's top 5 | examples atmpipe | "
        "examples SAEDashboard | top examples under 1/10 of full shading atmpipe / SAEDashboard | "
        "SAEDashboard's top examples repeating a text |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ex = r["examples"]
        lines.append(
            f"| {r['latent']} | {r['max']['atmpipe']:.4g} / {r['max']['sae-dashboard']:.4g} | "
            f"{100 * r['density']['atmpipe']:.3g}% / {100 * r['density']['sae-dashboard']:.3g}% | "
            f"{r['decoder_norm']:.4g} | {r['promoted']['top10_overlap']} | "
            f"{' '.join(repr(t) for t in r['promoted']['atmpipe'])} | "
            f"{' '.join(repr(t) for t in r['promoted']['sae-dashboard'])} | "
            f"{ex['atmpipe']['top']} top + {ex['atmpipe']['quantile bands']} in bands | "
            f"{sum(ex['sae-dashboard'].values())} in {len(ex['sae-dashboard'])} groups | "
            f"{r['top_under_tenth_of_shading']['atmpipe']} / {r['top_under_tenth_of_shading']['sae-dashboard']} | "
            f"{r['top_repeated_text']['sae-dashboard']} |"
        )
    lines += ["", "What each page draws (counted in its DOM in headless Chromium at 1400 px):", ""]
    for r in result["rows"]:
        p = r["pages"]
        lines.append(
            f"- {r['latent']}: atmpipe {json.dumps(p['atmpipe'])}; SAEDashboard {json.dumps(p['sae-dashboard'])}"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--latents", default=DEFAULT_LATENTS, help="'sae:j,j;sae:j' (SAE directory names under --runs)"
    )
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--store", default="cache/demo-l9.zarr")
    p.add_argument("--eval", default="reports/demo/results.json", help="the demo's eval (absorption records)")
    p.add_argument("--dashboard-python", default=str(ROOT / ".venv-dashboard" / "bin" / "python"))
    p.add_argument("--work", default="reports/dashboard-compare", help="pages and screenshots")
    p.add_argument("--out", default="results/dashboard-compare", help="compare.{json,md}")
    p.add_argument("--img", default=str(ROOT / "docs" / "img"), help="where the first pair per SAE goes")
    p.add_argument("--keep-bos", action="store_true", help="SAEDashboard leaves out position 0 only")
    p.add_argument("--no-processing", action="store_true", help="SAEDashboard's LM without folded norm gains")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    latents = {
        n: [int(j) for j in js.split(",")] for n, js in (s.split(":") for s in args.latents.split(";"))
    }
    saes = [Path(args.runs).resolve() / n for n in latents]
    work, out = Path(args.work).resolve(), Path(args.out)
    (work / "shots").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tokens, n_held = token_windows(args.store, work)
    index = build_atmpipe(saes, latents, args, work)
    theirs = render_dashboard(saes, latents, tokens, args, work)
    pages = screenshots(index, work / "dashboard", saes, latents, work / "shots")
    ours = atmpipe_numbers(index, saes, latents)
    model = json.loads((saes[0] / "cfg.json").read_text())["metadata"]["model_name"]
    ids = {t for a in ours.values() for t in a["pos_ids"]}
    ids |= {t for s in theirs["saes"].values() for b in s["latents"].values() for t, _ in b["top_logits"]}
    vocab = token_strings(checkpoint_dir(model), sorted(ids))
    result = {
        "versions": theirs["versions"],
        "tokens": theirs["tokens"],
        "atmpipe_tokens": n_held,
        "dashboard_seconds": {n: round(s["seconds"]) for n, s in theirs["saes"].items()},
        "rows": compare_rows(ours, theirs, pages, vocab),
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "compare.md").write_text(summary_md(result))
    for s in saes:
        for j in latents[s.name]:
            shots = work / "shots"
            side_by_side(shots / f"atmpipe-{s.name}-{j}.png", shots / f"dashboard-{s.name}-{j}.png",
                         shots / f"side-by-side-{s.name}-{j}.png")  # fmt: skip
        first = latents[s.name][0]
        (Path(args.img) / f"dashboard-vs-atmpipe-{s.name}.png").write_bytes(
            (work / "shots" / f"side-by-side-{s.name}-{first}.png").read_bytes()
        )
    print(summary_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
