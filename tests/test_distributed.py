"""Several processes under torchrun (gloo, CPU): a multi-rank harvest writes the very store one process
writes, and resumes after a crash with any number of processes; DDP training on 2 ranks ends with the
1-rank weights; a 2-rank run resumes on 1 rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atmpipe.distributed import COMMITS
from atmpipe.harvest import HarvestConfig, harvest
from atmpipe.store import open_store, write_arrays_store
from atmpipe.stream import ShardStream
from atmpipe.train import TrainConfig, train

TORCHRUN = Path(sys.executable).parent / "torchrun"
HARVEST = dict(
    layers=[1],
    tokens=32 * 24,
    eval_tokens=32 * 4,
    context_size=32,
    batch_size=2,
    chunk_tokens=64,
    shard_tokens=128,
)  # fmt: skip  (6 train shards, 1 eval shard)

# Runs the CLI with one process dying (os._exit, as a kill would) right after its Nth commit: a root
# attribute write (single process) or a commit marker (a rank of a multi-process harvest).
CRASH_DRIVER = """
import os
from atmpipe import remote, store
rank, target, after = os.environ.get("RANK", "0"), os.environ["CRASH_RANK"], int(os.environ["CRASH_AFTER"])
count = [0]
def counted(real):
    def run(*args, **kwargs):
        result = real(*args, **kwargs)
        count[0] += 1
        if rank == target and count[0] == after:
            os._exit(9)
        return result
    return run
store.StoreWriter._commit = counted(store.StoreWriter._commit)
remote.write_bytes = counted(remote.write_bytes)
from atmpipe.cli import app
app()
"""


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_recipe(path: Path, **values) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def torchrun(n: int, *args, env: dict | None = None, script: Path | None = None, check: bool = True):
    cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={n}"]
    cmd += [str(script)] if script else ["-m", "atmpipe"]
    done = subprocess.run([*cmd, *map(str, args)], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, tmp_path_factory) -> Path:
    """The store one process harvests."""
    out = tmp_path_factory.mktemp("ref") / "one.zarr"
    return harvest(HarvestConfig(model=str(tiny_checkpoints["gemma3"]), out=str(out), **HARVEST))


# --- the stream's share of a global batch ---------------------------------------------------------


def test_ranks_decode_only_their_chunks_and_deliver_the_single_process_batches(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n = 700
    store = write_arrays_store(
        tmp_path / "s.zarr",
        {"train": {"acts": rng.normal(size=(n, 4)), "tokens": np.arange(n) + 1, "bos": rng.random(n) < 0.1},
         "eval": {"acts": rng.normal(size=(64, 4)), "tokens": np.arange(64) + 1, "bos": np.arange(64) % 32 == 0}},
        layer=0, chunk_tokens=50, shard_tokens=100,
    )  # fmt: skip
    # 12-row batches across 3-chunk shuffle rounds of ~135 rows (the last of an epoch 2 chunks): batches
    # straddle rounds and epochs. One decode worker: chunks decode in the order they are asked for.
    kw = dict(seed=3, buffer_chunks=3, workers=1, log=lambda _: None)
    decoded: dict[tuple[int, int], list[int]] = {}
    load_chunk = ShardStream._load_chunk

    def counted(self, chunk, dest):
        decoded.setdefault((self.rank, self.world), []).append(chunk)
        return load_chunk(self, chunk, dest)

    monkeypatch.setattr(ShardStream, "_load_chunk", counted)

    def batches(rank, world, count=70, position=None):
        decoded.pop((rank, world), None)
        with ShardStream(store, 0, 12, rank=rank, world=world, position=position, **kw) as s:
            got = [(next(s).clone(), s.positions.clone()) for _ in range(count)]
            return got, s.state_dict(), s

    single, state, stream = batches(0, 1)
    rounds = [r for epoch in range(3) for r in stream._rounds(epoch)]  # 70 batches span 2 epochs
    delivered = int(np.searchsorted(np.cumsum([stream.chunk_rows[r].sum() for r in rounds]), 70 * 12)) + 1
    empty_shares = 0
    for world in (2, 3):
        shares = [batches(rank, world)[0] for rank in range(world)]
        for step, (whole, _) in enumerate(single):
            # Each rank's rows are the single-process batch's rows at its positions, bit for bit ...
            for rank in range(world):
                rows, positions = shares[rank][step]
                torch.testing.assert_close(
                    rows, whole[positions], rtol=0, atol=0, msg=f"{world} {rank} {step}"
                )
                empty_shares += len(rows) == 0
            # ... and together the ranks hold every position of the batch once.
            placed = torch.cat([shares[rank][step][1] for rank in range(world)])
            assert sorted(placed.tolist()) == list(range(12))
        for rank in range(world):
            # Rank r decoded the chunks at slots i ≡ r (mod world) of each round, those alone, in order (the
            # stream runs ahead: a prefix of what the coming rounds hold, at least the rounds it delivered).
            own = [
                [int(c) for i, c in enumerate(r) if i % world == rank and stream.chunk_rows[c]]
                for r in rounds
            ]
            got = decoded[(rank, world)]
            assert got == sum(own, [])[: len(got)] and len(got) >= len(sum(own[:delivered], []))
            first_epoch = [c for r in rounds[:5] for i, c in enumerate(r) if i % world == rank]
            assert abs(len(first_epoch) - 14 / world) <= 5  # 1/world of the 14 chunks, ± one per round
    assert empty_shares > 0  # world 3 on a 2-chunk round: some batches have no rows on some rank

    # The position counts global rows: a 2-rank stream resumes a 1-rank one (and the other way round).
    after, _, _ = batches(0, 1, count=5, position=state)
    resumed, _, _ = batches(1, 2, count=5, position=state)
    for (whole, _), (rows, positions) in zip(after, resumed, strict=True):
        torch.testing.assert_close(rows, whole[positions], rtol=0, atol=0)


# --- harvest --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crashed(tiny_checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, store) of a 2-process harvest whose rank 1 died right after committing its first shard."""
    root = tmp_path_factory.mktemp("crashed")
    recipe = write_recipe(root / "h.toml", model=str(tiny_checkpoints["gemma3"]), **HARVEST)
    driver = root / "crash.py"
    driver.write_text(CRASH_DRIVER)
    out = root / "two.zarr"
    done = torchrun(2, "harvest", "--config", recipe, "--out", out, script=driver, check=False,
                    env={"CRASH_RANK": "1", "CRASH_AFTER": "1"})  # fmt: skip
    assert done.returncode != 0
    return recipe, out


def _committed(store: Path, split: str, index: int) -> bool:
    prefix = open_store(store).attrs["splits"][split]["shards_committed"]
    return index < prefix or (store / COMMITS / split / f"{index:08d}.json").is_file()


@pytest.mark.parametrize("processes", [2, 1])
def test_killed_two_process_harvest_resumes_to_the_single_process_store(
    reference, crashed, tmp_path, processes
):
    recipe, partial = crashed
    assert not open_store(partial).complete
    assert _committed(partial, "train", 1)  # rank 1's first shard (shard i belongs to rank i % 2)
    assert not _committed(partial, "train", 3)  # rank 1 died before its second
    out = tmp_path / "resumed.zarr"
    shutil.copytree(partial, out)
    if processes == 2:
        done = torchrun(2, "harvest", "--config", recipe, "--out", out)
        assert "resuming" in done.stderr
    else:  # one process finishes what two started
        harvest(HarvestConfig(model=_recipe_model(recipe), out=str(out), **HARVEST))
    assert open_store(out).complete
    assert files(out) == files(reference)  # byte for byte: arrays, statistics, attributes; no markers left


def _recipe_model(recipe: Path) -> str:
    import tomllib

    return tomllib.loads(recipe.read_text())["model"]


# --- training -------------------------------------------------------------------------------------

TRAIN = dict(d_sae=64, batch_size=64, tokens=64 * 24, lr=1e-3, checkpoint_every=8, seed=1, device="cpu")
MASKED = ("masks really were drawn", lambda log: max(m["masked_frac"] for m in log) > 0.05)
METHODS = {  # case: (TrainConfig values, the same as CLI flags, what the 1-rank log shows really happened)
    # ATM with per-token masks from step 3 on: its statistics and masks must be the global batch's; with the
    # λ controller on (L0 below the target: λ moves every step), whose inputs are batch means too.
    "atm": ({"hparams": {"warmup_steps": 3, "target_l0": 40.0}, "no_compile": True},
            ["--hparam", "warmup_steps=3", "--no-compile", "--target-l0", "40"], MASKED),
    # The same on the sparse path: batch means averaged over the ranks, masks drawn at the global rows.
    "atm-sparse": ({"hparams": {"warmup_steps": 3}, "no_compile": True, "latent_path": "sparse"},
                   ["--hparam", "warmup_steps=3", "--no-compile", "--latent-path", "sparse"], MASKED),
    # ATM's controls (log threshold, uniform targeting) pass through the cross-rank statistics step.
    "atm-controls": ({"hparams": {"warmup_steps": 3, "threshold": "log", "targeting": "uniform"}, "no_compile": True},
                     ["--hparam", "warmup_steps=3", "--no-compile", "--hparam", "threshold=log",
                      "--hparam", "targeting=uniform"], MASKED),
    # TopK whose AuxK sees dead latents: the dead-latent clock must count every rank's rows.
    "topk": ({"hparams": {"k": 2, "dead_tokens": 128}}, ["--k", "2", "--hparam", "dead_tokens=128"],
             ("AuxK had dead latents to work on", lambda log: max(m["dead"] for m in log) > 0)),
    # ReLU with the λ controller on rounds of one chunk: rank 1 holds no row of any batch, yet joins every
    # collective (with zero weight, and NaN means over no rows that must count for nothing).
    "relu-target": ({"hparams": {"target_l0": 40.0}, "buffer_chunks": 1}, ["--target-l0", "40"],
                    ("the controller moved λ", lambda log: len({m["l1_coeff"] for m in log}) > 1)),
    # JumpReLU's target-L0 penalty, not linear in the batch's L0 (taken at the global one), on rounds of
    # three chunks: shares of about 2:1.
    "jumprelu-target": ({"hparams": {"target_l0": 20.0, "sparsity": "target"}, "buffer_chunks": 3},
                        ["--target-l0", "20", "--hparam", "sparsity=target"],
                        ("the penalty was on", lambda log: min(m["sparsity"] for m in log) > 0)),
    # Matryoshka: BatchTopK's cutoff over the global batch (each rank's candidates gathered), its threshold
    # the smallest kept activation over the ranks, AuxK on the global dead-latent clock.
    "matryoshka": ({"hparams": {"k": 2, "dead_tokens": 128, "prefix_fractions": [0.125, 0.5, 1.0]}},
                   ["--k", "2", "--hparam", "dead_tokens=128", "--hparam", "prefix_fractions=[0.125,0.5,1.0]"],
                   ("AuxK had dead latents to work on", lambda log: max(m["dead"] for m in log) > 0)),
}  # fmt: skip


def _flags(values: dict) -> list[str]:
    return [str(a) for k, v in values.items() for a in (f"--{k.replace('_', '-')}", v)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run / "sae_weights.safetensors"))
    if (run / "atm_stats.safetensors").exists():
        tensors.update({f"atm.{k}": v for k, v in load_file(str(run / "atm_stats.safetensors")).items()})
    return tensors


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", list(METHODS))
def test_two_rank_ddp_matches_one_rank_and_resumes_on_one_rank(reference, tmp_path, case):
    values, flags, (what, happened) = METHODS[case]
    method = case.split("-")[0]
    one = tmp_path / "one"
    cfg = TrainConfig(store=str(reference), method=method, out=str(one), **TRAIN, **values)
    train(cfg)
    log = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert happened(log), what

    two = tmp_path / "two"
    recipe = write_recipe(tmp_path / "train.toml", buffer_chunks=cfg.buffer_chunks)  # no flag for it
    torchrun(2, "train", "--config", recipe, "--store", reference, "--method", method, "--out", two,
             *_flags(TRAIN), *flags)  # fmt: skip
    _assert_same_weights(one, two)
    last = Path("checkpoints") / "step_00000024" / "model.safetensors"  # every buffer (λ, EMAs, clocks)
    state_one, state_two = load_file(str(one / last)), load_file(str(two / last))
    assert state_one.keys() == state_two.keys()
    for name in state_one:
        torch.testing.assert_close(state_two[name], state_one[name], rtol=1e-5, atol=1e-5, msg=name)
    meta = json.loads((two / "atmpipe.json").read_text())["metadata"]
    assert meta["world_size"] == 2 and meta["tokens_seen"] == TRAIN["tokens"]
    # The logged loss and L0 are the global batch's, whatever each rank's share.
    log_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "mse", "l0"):
        assert [m[key] for m in log_two] == pytest.approx([m[key] for m in log], rel=1e-5), key

    # A 2-rank run killed after its step-16 checkpoint, resumed on 1 rank: the 1-rank result again.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for name in ("cfg.json", "sae_weights.safetensors", "atmpipe.json", "atm_stats.safetensors"):
        (resumed / name).unlink(missing_ok=True)
    shutil.rmtree(resumed / "checkpoints" / "step_00000024")
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000016"]
    train(TrainConfig(**{**cfg.__dict__, "out": str(resumed), "resume": True}))
    _assert_same_weights(one, resumed)


# --- a method added from outside: one file, one registry line, one recipe -------------------------

PLUGIN_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import plugin_method
plugin_method.register()
from atmpipe.cli import app
app()
"""


@pytest.fixture
def plugin(monkeypatch):
    import plugin_method

    from atmpipe.sae import SAE_METHODS

    monkeypatch.setitem(SAE_METHODS, plugin_method.NAME, plugin_method.DensityL1SAE)
    return plugin_method


def test_a_method_defined_outside_atmpipe_trains_on_one_and_two_ranks(reference, tmp_path, plugin):
    from atmpipe.train import load_train_config

    recipe = tmp_path / f"train-{plugin.NAME}.toml"
    lines = [f"store = {str(reference)!r}", f"method = {plugin.NAME!r}"]
    lines += [f"{k} = {v!r}" for k, v in TRAIN.items()] + ["", "[hparams]", "l1 = 0.5"]
    recipe.write_text("\n".join(lines) + "\n")

    one = tmp_path / "one"
    train(load_train_config(recipe, out=str(one)))
    log = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["fvu"] < log[0]["fvu"] and 0 < log[-1]["density"] < 1

    two = tmp_path / "two"
    driver = tmp_path / "driver.py"
    driver.write_text(PLUGIN_DRIVER.format(tests=str(Path(__file__).parent)))
    torchrun(2, "train", "--config", recipe, "--out", two, script=driver)
    _assert_same_weights(one, two)
    # The buffers too (the checkpoint holds them): the density reduced across ranks is the 1-rank one.
    last = "checkpoints/step_00000024/model.safetensors"
    a, b = load_file(str(one / last)), load_file(str(two / last))
    torch.testing.assert_close(b["density"], a["density"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b["tokens_since_fired"], a["tokens_since_fired"], rtol=0, atol=0)
    assert json.loads((two / "atmpipe.json").read_text())["metadata"]["world_size"] == 2
