"""`atmpipe eval` and `atmpipe inspect` SIGKILLed at seeded random moments, on a tiny real model, store and
SAEs: while an LM activation-cache entry is written, while the report's files are written, while the
browser's data files are written, and anywhere at all. After each kill what is on disk is whole (every
cache entry that is there passes its checksum; every report file and a browser's index.html stand only
whole), and the next run from exactly that state reuses the complete entries, recomputes the rest and
writes files byte-identical to an uninterrupted run's (but for the wall-clock seconds results.json
records), with no temporary file left.

Kills per stage: ATMPIPE_KILLS (`make reliability` runs 12 each; pytest one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from inspect_helpers import make_sae_dir, word_checkpoint
from reliability_helpers import Zygote, files, leftovers, tally

from atmpipe.eval.cache import ActivationCache

SEED = 20261208
KILLS = int(os.environ.get("ATMPIPE_KILLS", "1"))
HARVEST = dict(layers=[1], tokens=16 * 48, eval_tokens=16 * 64, context_size=16, batch_size=8)
EVAL = ["--metrics", "core,absorption,probing", "--splice-windows", "2", "--absorption-sample-words", "60",
        "--absorption-icl", "2", "--absorption-f1-gate", "0", "--absorption-min-letters", "1",
        "--probing-tasks", "sst2,wikidata_gender", "--probing-train", "16", "--probing-test", "8",
        "--probing-context", "16", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, zygote) -> dict:
    """A tiny Gemma-3 with whole-word tokens, a store harvested from it, a ReLU and an ATM SAE of 512
    latents (eight browser chunks each)."""
    root = tmp_path_factory.mktemp("reliability-eval")
    ckpt = word_checkpoint(root / "model")
    recipe = root / "harvest.toml"
    recipe.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in HARVEST.items()))
    store = root / "s.zarr"
    log = root / "harvest.log"
    assert zygote.run(["harvest", "--model", ckpt, "--out", store, "--config", recipe], log) == 0, (
        log.read_text()
    )
    saes = [make_sae_dir(root / m, m, str(ckpt), d_sae=512, seed=i) for i, m in enumerate(("relu", "atm"))]
    return {"root": root, "ckpt": ckpt, "store": store, "saes": saes}


def eval_argv(world, out: Path) -> list:
    return ["eval", *(a for s in world["saes"] for a in ("--sae", s)), "--store", world["store"], "--out", out,
            *EVAL]  # fmt: skip


def inspect_argv(world, out: Path) -> list:
    return ["inspect", *(a for s in world["saes"] for a in ("--sae", s)), "--store", world["store"],
            "--model", world["ckpt"], "--out", out]  # fmt: skip


def without_timings(report: dict[str, bytes]) -> dict[str, bytes]:
    """A report's files with the wall-clock durations results.json records ("seconds") taken out: all the
    rest must be byte-identical."""

    def drop(o):
        if isinstance(o, dict):
            return {k: drop(v) for k, v in o.items() if k != "seconds"}
        return [drop(v) for v in o] if isinstance(o, list) else o

    if "results.json" in report:
        report = {**report, "results.json": json.dumps(drop(json.loads(report["results.json"]))).encode()}
    return report


def temporaries(folder: Path) -> list[Path]:
    return list(folder.rglob(".*.tmp-*")) if folder.exists() else []


def valid_entries(home: Path) -> dict[str, int]:
    """Cache entries that pass their checksum, by name, with their tensors' modification time; asserts
    that every entry whose metadata is there is whole."""
    found = {}
    for meta in (home / "eval-cache").glob("*/*.json"):
        tensors = meta.with_suffix(".safetensors")
        config = json.loads(meta.read_text())["config"]
        assert ActivationCache._read(tensors, meta, config) is not None, meta  # metadata written last
        found[meta.name] = tensors.stat().st_mtime_ns
    return found


class Trial:
    """Where a kill is aimed: the process is SIGKILLed once `ready()` holds, after a seeded random delay
    (`ready` None: at a random moment, `delay` seconds after the start)."""

    def __init__(self, name: str, ready, delay: float):
        self.name, self.ready, self.delay = name, ready, float(delay)
        if ready is None:
            self.ready = lambda t=time.monotonic(), d=self.delay: time.monotonic() - t > d
            self.delay = 0.0

    def kill(self, pid: int) -> None:
        time.sleep(self.delay)
        os.kill(pid, signal.SIGKILL)


def kill_and_rerun(zygote, argv, out: Path, home: Path, trial: Trial, log: Path) -> bool:
    """Run `argv` over the state in (out, home), SIGKILL it as `trial` says; False when it finished first."""
    code, acted = zygote.run_until(argv(out), log, trial.ready, trial.kill, env={"ATMPIPE_HOME": str(home)})
    if code == 0:
        return False
    assert acted and code == -signal.SIGKILL, (code, log.read_text())
    return True


def resume_here(zygote, argv, out: Path, home: Path, tmp: Path) -> tuple[dict, dict, dict]:
    """Re-run from exactly what the kill left (where it left it: the report names its own paths), then put
    that state back for the next kill; returns the re-run's files in out and home, and its whole cache
    entries."""
    snapshot = {place: tmp / f"snapshot-{place.name}" for place in (out, home)}
    for place, copy in snapshot.items():
        shutil.rmtree(copy, ignore_errors=True)
        if place.exists():
            shutil.copytree(place, copy, copy_function=shutil.copy2)
    log = tmp / "resume.log"
    code = zygote.run(argv(out), log, env={"ATMPIPE_HOME": str(home)})
    assert code == 0 and "Traceback" not in log.read_text(), log.read_text()
    assert not temporaries(out) and not temporaries(home) and not leftovers(out)
    result = files(out), files(home), valid_entries(home)
    for place, copy in snapshot.items():
        shutil.rmtree(place, ignore_errors=True)
        if copy.exists():
            shutil.copytree(copy, place, copy_function=shutil.copy2)
    return result


def test_eval_sigkill_at_random_points_then_rerun_is_identical(world, zygote, tmp_path):
    argv = lambda out: eval_argv(world, out)  # noqa: E731
    out, home = tmp_path / "out", tmp_path / "home"  # the reference and every run: the report names them
    started = time.monotonic()
    log = tmp_path / "ref.log"
    assert zygote.run(argv(out), log, env={"ATMPIPE_HOME": str(home)}) == 0, log.read_text()
    duration = time.monotonic() - started
    reference, reference_cache = without_timings(files(out)), files(home)
    assert {n.split("-")[0] for n in map(os.path.basename, reference_cache)} >= {
        "absorption",
        "probing",
        "splice",
    }
    rng = np.random.default_rng(SEED)
    landed, trial = Counter(), 0
    while sum(landed.values()) < KILLS:
        assert trial < 3 * KILLS, landed  # the kills must land
        if trial % 3 == 0:  # start over: an empty cache, no report
            shutil.rmtree(home, ignore_errors=True)
        if trial % 3 != 1:
            shutil.rmtree(out, ignore_errors=True)  # (the eval makes --out when it starts the report)
        aim = [
            Trial("while writing an LM cache entry", lambda: bool(temporaries(home)), rng.uniform(0, 0.004)),
            Trial("at a random moment", None, rng.uniform(0, duration)),
            Trial("while writing the report", out.exists, rng.uniform(0, 0.4)),
        ][trial % 3]
        trial += 1
        if not kill_and_rerun(zygote, argv, out, home, aim, tmp_path / f"kill{trial}.log"):
            continue
        landed[aim.name] += 1
        before = valid_entries(home)  # whole entries only (asserted), and what the next run must reuse
        for name, data in without_timings(files(out)).items() if out.exists() else ():
            assert Path(name).name.startswith(".") or data == reference[name], name  # a report file: whole
        again, again_home, entries = resume_here(zygote, argv, out, home, tmp_path)
        assert without_timings(again) == reference and again_home == reference_cache
        assert {n: t for n, t in entries.items() if n in before} == before, "a whole cache entry was redone"
        tally("eval runs SIGKILLed at seeded random points, next run identical")
    print("eval kills:", dict(landed))
    for name, n in landed.items():
        tally(f"eval kills {name}", n)


def test_inspect_sigkill_at_random_points_then_rerun_is_identical(world, zygote, tmp_path):
    argv = lambda out: inspect_argv(world, out)  # noqa: E731
    started = time.monotonic()
    log = tmp_path / "ref.log"
    out, home = tmp_path / "out", tmp_path / "home"
    assert zygote.run(argv(out), log) == 0, log.read_text()
    duration = time.monotonic() - started
    reference = files(out)
    assert sum(name.startswith("data/s") for name in reference) >= 16  # chunk files to be killed amid
    rng = np.random.default_rng(SEED)
    landed, trial = Counter(), 0
    data_files = lambda: len(list((out / "data").glob("s*.js"))) if out.exists() else 0  # noqa: E731
    while sum(landed.values()) < KILLS:
        assert trial < 3 * KILLS, landed
        if trial % 3 == 0:
            shutil.rmtree(out, ignore_errors=True)
        elif trial % 3 == 2:  # over a browser built whole before: the rebuild is killed
            assert zygote.run(argv(out), tmp_path / "whole.log") == 0
        aim = [
            Trial("while writing the browser's data files", lambda n=int(rng.integers(1, 16)): data_files() >= n,
                  rng.uniform(0, 0.003)),
            Trial("at a random moment", None, rng.uniform(0, duration)),
            Trial("while rebuilding a whole browser", lambda: bool(temporaries(out)), rng.uniform(0, 0.003)),
        ][trial % 3]  # fmt: skip
        trial += 1
        if not kill_and_rerun(zygote, argv, out, home, aim, tmp_path / f"kill{trial}.log"):
            continue
        landed[aim.name] += 1
        if (out / "index.html").exists():  # an index stands only over a whole browser
            assert {k: v for k, v in files(out).items() if not Path(k).name.startswith(".")} == reference
        assert resume_here(zygote, argv, out, home, tmp_path)[0] == reference
        tally("inspect runs SIGKILLed at seeded random points, next run identical")
    print("inspect kills:", dict(landed))
    for name, n in landed.items():
        tally(f"inspect kills {name}", n)
