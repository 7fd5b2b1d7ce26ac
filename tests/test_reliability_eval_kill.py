"""`atmpipe eval` and `atmpipe inspect` SIGKILLed at seeded random moments, on a tiny real model, store and
SAEs: while an LM activation-cache entry is written, while the report's files are written, while the
browser's data files are written, and anywhere at all. After each kill what is on disk is whole (every
cache entry that is there passes its checksum; every report file and a browser's index.html stand only
whole), and the next run from exactly that state reuses the complete entries, recomputes the rest and
writes files byte-identical to an uninterrupted run's, with no temporary file left.

Kills per stage: ATMPIPE_KILLS (`make reliability` runs 12 each; pytest a few).
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
KILLS = int(os.environ.get("ATMPIPE_KILLS", "3"))
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


def resume_copy(zygote, argv, out: Path, home: Path, tmp: Path) -> tuple[Path, Path, str]:
    """Re-run from a copy of exactly what the kill left; returns (its out, its home, its log)."""
    for name in ("resume-out", "resume-home"):
        shutil.rmtree(tmp / name, ignore_errors=True)
    if out.exists():
        shutil.copytree(out, tmp / "resume-out", copy_function=shutil.copy2)
    if home.exists():
        shutil.copytree(home, tmp / "resume-home", copy_function=shutil.copy2)
    log = tmp / "resume.log"
    code = zygote.run(argv(tmp / "resume-out"), log, env={"ATMPIPE_HOME": str(tmp / "resume-home")})
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    return tmp / "resume-out", tmp / "resume-home", log.read_text()


def test_eval_sigkill_at_random_points_then_rerun_is_identical(world, zygote, tmp_path):
    argv = lambda out: eval_argv(world, out)  # noqa: E731
    started = time.monotonic()
    log = tmp_path / "ref.log"
    assert zygote.run(argv(tmp_path / "ref"), log, env={"ATMPIPE_HOME": str(tmp_path / "ref-home")}) == 0, (
        log.read_text()
    )
    duration = time.monotonic() - started
    reference, reference_cache = files(tmp_path / "ref"), files(tmp_path / "ref-home")
    assert {n.split("-")[0] for n in map(os.path.basename, reference_cache)} >= {
        "absorption",
        "probing",
        "splice",
    }
    rng = np.random.default_rng(SEED)
    out, home, landed, trial = tmp_path / "out", tmp_path / "home", Counter(), 0
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
        for name, data in files(out).items() if out.exists() else ():
            assert Path(name).name.startswith(".") or data == reference[name], name  # a report file: whole
        again, again_home, text = resume_copy(zygote, argv, out, home, tmp_path)
        assert files(again) == reference and not temporaries(again)
        assert files(again_home) == reference_cache and not temporaries(again_home)
        reused = {n: t for n, t in valid_entries(again_home).items() if n in before}
        assert reused == before, "a complete cache entry was computed again"
        tally("eval runs SIGKILLed at seeded random points, next run identical")
    print("eval kills:", dict(landed))
    for name, n in landed.items():
        tally(f"eval kills {name}", n)


def test_inspect_sigkill_at_random_points_then_rerun_is_identical(world, zygote, tmp_path):
    argv = lambda out: inspect_argv(world, out)  # noqa: E731
    started = time.monotonic()
    log = tmp_path / "ref.log"
    assert zygote.run(argv(tmp_path / "ref"), log) == 0, log.read_text()
    duration = time.monotonic() - started
    reference = files(tmp_path / "ref")
    assert sum(name.startswith("data/s") for name in reference) >= 16  # chunk files to be killed amid
    rng = np.random.default_rng(SEED)
    out, home, landed, trial = tmp_path / "out", tmp_path / "home", Counter(), 0
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
        again, _, _ = resume_copy(zygote, argv, out, home, tmp_path)
        assert files(again) == reference and not leftovers(again) and not temporaries(again)
        tally("inspect runs SIGKILLed at seeded random points, next run identical")
    print("inspect kills:", dict(landed))
    for name, n in landed.items():
        tally(f"inspect kills {name}", n)
