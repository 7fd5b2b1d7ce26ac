"""Bookkeeping for stages/demo.sh and stages/reproduce.sh (the pipeline itself is the `atmpipe` commands).

experiment.py table REPORT_DIR             the headline metrics per SAE, and whether L0 is matched
experiment.py markdown REPORT_DIR          the same as a Markdown table (the README's)
experiment.py label-demo REPORT_DIR        mark a report's every page as a demonstration
experiment.py record RECORD_DIR OUT_DIR    commands, wall times, versions and hardware into OUT_DIR
experiment.py masking REPORT_DIR           ATM's masking controls side by side (Markdown)
experiment.py frontier RESULTS_DIR         the reproduction's aggregate (stages/frontier.py) from its evals
experiment.py converge RESULTS_DIR         the convergence part's aggregate: the verdict at the longest length
                                           and the training-length axis (stages/convergence.py)
experiment.py budget PLAN|- SECONDS_JSON   the wall time a plan (PLAN_ONLY=1 output) needs, from measured times
experiment.py results-md RESULTS_DIR       docs/results.md's generated tables (stages/results_doc.py)
experiment.py corpus-tokens MODEL_DIR      how many training tokens the embedded corpus packs into (context 128)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

L0_TOLERANCE = 0.10  # matched sparsity: every SAE's L0 within 10% of the others' median
HEADLINE = [  # (column, metric section, key)
    ("L0", "core", "l0"),
    ("FVU", "core", "fvu"),
    ("cos", "core", "cossim"),
    ("CE score", "core", "ce_loss_score"),
    ("dead", "core", "frac_dead"),
    ("full abs.", "absorption", "mean_full_absorption"),
    ("abs. frac.", "absorption", "mean_absorption_fraction"),
    ("probe top-1", "probing", "mean_sae_top_1"),
    ("SCR", "bias", "scr_headline"),
]
DEMO_NOTE = (
    "DEMONSTRATION ONLY (make demo): ~100k tokens, 200 training steps, 4× SAEs and reduced evaluation sizes, "
    "sized for 20 minutes on 2 CPU cores. These numbers show the pipeline working end to end; they are not "
    "results. The experiment is `make reproduce` (its outcome is committed under results/)."
)
PACKAGES = ["torch", "transformers", "zarr", "numcodecs", "safetensors", "numpy", "scikit-learn", "gguf"]


def _value(section: dict | None, key: str) -> str:
    if section is None:
        return "not run"
    if section.get("status") not in (None, "ok"):
        return str(section["status"])
    v = section.get(key)
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def l0_check(results: dict) -> dict:
    """Whether every SAE's L0 lies within L0_TOLERANCE of the median L0 (matched sparsity)."""
    l0 = {name: r["core"]["l0"] for name, r in results.items() if "l0" in r.get("core", {})}
    if not l0:
        return {"matched": None, "l0": {}}
    median = statistics.median(l0.values())
    off = {name: v / median - 1 for name, v in l0.items()}
    return {
        "matched": all(abs(d) <= L0_TOLERANCE for d in off.values()),
        "tolerance": L0_TOLERANCE,
        "median_l0": median,
        "l0": l0,
        "relative_to_median": off,
    }


def _rows(report_dir: Path) -> tuple[dict, list[list[str]]]:
    results = json.loads((report_dir / "results.json").read_text())["results"]
    rows = [["SAE", *(c for c, _, _ in HEADLINE)]]
    rows += [[name, *(_value(r.get(sec), key) for _, sec, key in HEADLINE)] for name, r in results.items()]
    return results, rows


DEMO_ABSORPTION = (
    "Absorption at demonstration sizes is not reproducible: one eval seed on ~1,000 words, where another "
    "eval seed, or an SAE differing in FVU's 4th digit, moves it by tenths; its [95% CI] is word sampling "
    "alone and does not cover that. `make reproduce` measures it with seeds."
)


def markdown(report_dir: Path) -> None:
    _, rows = _rows(report_dir)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")


def table(report_dir: Path) -> None:
    results, rows = _rows(report_dir)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    check = l0_check(results)
    if check["matched"] is not None:
        verdict = "matched" if check["matched"] else "NOT matched"
        spread = ", ".join(f"{n} {d:+.0%}" for n, d in check["relative_to_median"].items())
        print(f"L0 {verdict} (within ±{L0_TOLERANCE:.0%} of the median {check['median_l0']:.1f}): {spread}")
    if "demonstration" in json.loads((report_dir / "results.json").read_text()):
        print(DEMO_ABSORPTION)


def label_demo(report_dir: Path) -> None:
    md = report_dir / "report.md"
    text = md.read_text()
    if "DEMONSTRATION ONLY" in text:
        return
    md.write_text(text.replace("\n", f"\n\n> **{DEMO_NOTE}**\n", 1))
    page = report_dir / "report.html"
    page.write_text(page.read_text().replace("<body>", f"<body>\n<p><strong>{DEMO_NOTE}</strong></p>", 1))
    results = report_dir / "results.json"
    payload = json.loads(results.read_text())
    results.write_text(json.dumps({"demonstration": DEMO_NOTE, **payload}, indent=2) + "\n")


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def hardware() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    mem = Path("/proc/meminfo")
    if mem.exists():
        kb = int(mem.read_text().split()[1])
        info["memory_gb"] = round(kb / 1e6, 1)
    import torch

    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ["atmpipe", *PACKAGES]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["git_commit"] = _run("git", "rev-parse", "HEAD")
    found["git_dirty"] = bool(_run("git", "status", "--porcelain", "--untracked-files=no"))
    return found


def wall_times(record_dir: Path) -> dict:
    """Seconds per stage, summed over interrupted and resumed runs, and every attempt as logged."""
    attempts = []
    for line in (record_dir / "wall_times.tsv").read_text().splitlines():
        name, seconds, status, when = line.split("\t")
        attempts.append({"stage": name, "seconds": int(seconds), "status": status, "finished_utc": when})
    per_stage: dict[str, int] = {}
    for a in attempts:
        per_stage[a["stage"]] = per_stage.get(a["stage"], 0) + a["seconds"]
    return {"per_stage_s": per_stage, "total_s": sum(per_stage.values()), "attempts": attempts}


def code_versions(record_dir: Path) -> dict[str, dict]:
    """{stage: {"commit", "diff_sha256", "finished_utc"}}: the code each finished stage ran (stages/lib.sh
    writes RECORD/provenance.tsv; the last run of a stage counts). diff_sha256 is None on a clean tree."""
    found = {}
    path = record_dir / "provenance.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        stage, commit, diff, when = line.split("\t")
        found[stage] = {"commit": commit, "diff_sha256": None if diff == "-" else diff, "finished_utc": when}
    return found


def content_sha256(path: Path) -> str:
    """sha256 over every file under `path` (or the file itself): relative names and bytes, in sorted order."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def cached_sha256(path: Path, cache_file: Path) -> str | None:
    """content_sha256, recomputed only when the files' names, sizes or times changed (a store is GBs)."""
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = hashlib.sha256(repr([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]).encode())
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    key = f"{path.resolve()}:{stamp.hexdigest()}"
    if key not in cache:
        cache[key] = content_sha256(path)
        cache_file.write_text(json.dumps(cache, indent=2) + "\n")
    return cache[key]


def provenance(record_dir: Path, out_dir: Path, payload: dict) -> dict:
    """Each stage's code version, and content hashes of the model, the store and the absorption word sample."""
    env = os.environ
    home = Path(env.get("ATMPIPE_HOME", Path.home() / ".cache" / "atmpipe"))
    hashes = record_dir / "hashes.json"
    samples = {
        group: ((e.get("shared") or {}).get("absorption") or {}).get("sample", {}).get("sha256")
        for group, e in payload.get("evals", {}).items()
    }
    return {
        "stages": code_versions(record_dir),
        "model_sha256": cached_sha256(home / "models" / env["MODEL"], hashes) if "MODEL" in env else None,
        "store_sha256": cached_sha256(Path(env["STORE"]), hashes) if "STORE" in env else None,
        "word_sample_sha256": samples,
    }


def crosscheck_commands(out_dir: Path) -> list[str]:
    """The crosscheck's own per-seed commands (atmpipe's side) and SAEBench's seeds, from its record."""
    path = out_dir / "crosscheck" / "crosscheck.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    cmds = [r["command"] for r in result.get("atmpipe_runs", [])]
    return cmds + [f"# SAEBench absorption run_eval, seed {r['seed']} (stages/crosscheck.py)" for r in result.get("saebench_runs", [])]  # fmt: skip


def record(record_dir: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "results.json"
    payload = json.loads(results_file.read_text()) if results_file.exists() else {}
    experiment = {
        "commands": (record_dir / "commands.sh").read_text().splitlines(),
        # the seeds `make crosscheck` ran inside its one stage
        "crosscheck_commands": crosscheck_commands(out_dir),
        "provenance": provenance(record_dir, out_dir, payload),
        "wall_times": wall_times(record_dir),
        "versions": versions(),
        "hardware": hardware(),
        # an eval's results.json (make demo) or the reproduction's aggregate, which has its own L0 check
        "matched_l0": payload.get("l0_match") or l0_check(payload.get("results", {})),
        "environment": {
            k: v for k, v in os.environ.items() if k in ("MODEL", "LAYER", "ATMPIPE_HOME", "STORE", "RUNS")
        },
    }
    (out_dir / "experiment.json").write_text(json.dumps(experiment, indent=2) + "\n")
    (out_dir / "commands.sh").write_text(
        "# The exact commands stages/reproduce.sh ran, in order (a resumed stage appears once per attempt).\n"
        + (record_dir / "commands.sh").read_text()
    )


MASKING = [  # (column, metric section, key) of the masking-controls table
    ("L0", "core", "l0"),
    ("FVU", "core", "fvu"),
    ("CE score", "core", "ce_loss_score"),
    ("abs. frac.", "absorption", "mean_absorption_fraction"),
    ("full abs.", "absorption", "mean_full_absorption"),
    ("targeting index", "masking", "targeting_index"),
    ("corr(p, F)", "masking", "corr_p_firing"),
    ("effective masking rate", "masking", "effective_masking_rate"),
    ("mean p", "masking", "mean_p"),
    ("above θ", "masking", "frac_above_theta"),
]


def masking(report_dir: Path) -> None:
    """ATM's masking controls as a Markdown table (stages/masking-controls.sh; the README's)."""
    results = json.loads((report_dir / "results.json").read_text())["results"]
    print("| SAE | " + " | ".join(c for c, _, _ in MASKING) + " |")
    print("|" + "---|" * (len(MASKING) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(_value(r.get(sec), key) for _, sec, key in MASKING) + " |")
    check = l0_check(results)
    print(f"\nL0 matched within {L0_TOLERANCE:.0%} of the median: {check['matched']}")


def frontier_aggregate(results_dir: Path) -> None:
    import frontier

    frontier.write(results_dir)


def converge_aggregate(results_dir: Path) -> None:
    import convergence
    import frontier

    longest = max((r["tokens_multiplier"] for r in frontier.collect(results_dir).values()), default=1)
    frontier.write(results_dir, suffix=f"-x{longest}" if longest > 1 else "")
    convergence.write(results_dir)


def corpus_tokens(model_dir: Path) -> None:
    """The whole embedded corpus packed as the harvest packs it (context 128, 65,536 held-out tokens)."""
    from transformers import AutoTokenizer

    from atmpipe.corpus import build_corpus

    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus = build_corpus(
        tok, tok.bos_token_id, context_size=128, train_tokens=10**10, eval_tokens=65536, seed=0
    )
    print(
        f"{corpus.n_documents} documents; {len(corpus.train)} training windows = {len(corpus.train) * 128} tokens"
    )


def results_md(results_dir: Path) -> None:
    import results_doc

    print(results_doc.block(results_dir), end="")


def budget(plan: Path, seconds: Path) -> None:
    import frontier

    text = sys.stdin.read() if str(plan) == "-" else plan.read_text()
    frontier.print_budget(text, json.loads(seconds.read_text()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    verb, *args = sys.argv[1:]
    verbs = {"table": table, "markdown": markdown, "label-demo": label_demo, "record": record}
    verbs |= {
        "masking": masking,
        "frontier": frontier_aggregate,
        "budget": budget,
        "converge": converge_aggregate,
        "corpus-tokens": corpus_tokens,
        "results-md": results_md,
    }
    verbs[verb](*map(Path, args))
