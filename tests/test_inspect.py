"""`atmpipe inspect`: extraction against brute force, logit effects against the full model's own weights,
absorption records against the absorption metric, the bad inputs' one-line errors, and the written
browser loaded from file:// in a real headless Chromium (Debian's chromium + chromedriver, via selenium).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_model, tiny_tokenizer
from inspect_helpers import LAYER, make_sae_dir, make_store, word_checkpoint, write_eval_result
from reliability_helpers import assert_message, tree_digest
from safetensors.torch import save_file
from test_reliability_inputs import error_of, invoke

from atmpipe.inspect import absorbed, extract, weights
from atmpipe.sae import SAE
from atmpipe.store import write_arrays_store

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny Gemma-3 checkpoint, a store of its tokens, a ReLU and an ATM SAE, an eval result."""
    root = tmp_path_factory.mktemp("inspect")
    ckpt = root / "model"
    tiny_model("gemma3").save_pretrained(ckpt)
    tiny_tokenizer(SAMPLE_TEXT).save_pretrained(ckpt)
    store = make_store(root / "s.zarr")
    saes = {m: make_sae_dir(root / m, m, str(ckpt), seed=i) for i, m in enumerate(("relu", "atm"))}
    return {"root": root, "ckpt": ckpt, "store": store, "saes": saes}


# --- extraction -----------------------------------------------------------------------------------


def passage(i: int, held, half: int) -> list[int]:
    """Brute force: the held-out indices within `half` of i in i's context window (same window start)."""
    start = i - held.positions[i]
    return [t for t in range(max(0, i - half), min(held.n, i + half + 1)) if t - held.positions[t] == start]


def distinct_reference(order, held, k: int, taken: list) -> list[int]:
    """Brute force: walk the candidates, keep one whose shown passage shares no token index and no text
    with a kept one."""
    kept = []
    for i in order:
        idx = passage(int(i), held, extract.HALF_WINDOW)
        text = held.tokens[idx].tolist()
        if any(set(idx) & set(t_idx) or text == t_text for t_idx, t_text in taken):
            continue
        taken.append((idx, text))
        kept.append(int(i))
        if len(kept) == k:
            break
    return kept


def test_top_contexts_and_stats_equal_a_brute_force_recomputation(world):
    store, sae = world["store"], SAE.load(world["saes"]["relu"]).eval()
    held = extract.read_held_out(store, 10**9)
    (fr,) = extract.encode_held_out([sae], store, LAYER, held, batch=300)  # batches across windows
    with torch.no_grad():
        F = sae.encode(torch.from_numpy(store.read_acts("eval", LAYER))).numpy()
    F[held.bos] = 0
    stats = extract.latent_stats(fr, held)
    n = (~held.bos).sum()
    deduplicated = 0
    for j in range(F.shape[1]):
        col = F[:, j]
        order = [i for i in np.lexsort((np.arange(len(col)), -col)) if col[i] > 0]
        expected = distinct_reference(order, held, extract.N_TOP, [])
        deduplicated += expected != order[: extract.N_TOP]
        assert extract.top_token_indices(fr, j, held).tolist() == expected
        assert np.isclose(stats["density"][j], (col > 0).sum() / n)
        assert np.isclose(stats["max"][j], col.max())
        assert np.isclose(stats["mean"][j], col[col > 0].mean() if (col > 0).any() else 0.0)
        mass: dict[int, float] = {}
        for i in np.flatnonzero(col > 0):
            mass[int(held.tokens[i])] = mass.get(int(held.tokens[i]), 0.0) + float(col[i])
        if mass:
            best = max(mass.values())
            assert np.isclose(mass[int(stats["top_token"][j])], best, rtol=1e-5)
        detail = extract.latent_detail(fr, j, held, np.random.default_rng(0))
        assert [c[0] for c in detail["top"]] == expected
        for centre, value, offsets, values in detail["top"]:
            wide = passage(centre, held, extract.WIDE_WINDOW)
            nonzero = [t - centre for t in wide if col[t] > 0]
            assert offsets == nonzero and np.allclose(
                values, col[np.array(wide)][col[np.array(wide)] > 0], rtol=1e-3
            )
            assert np.isclose(value, col[centre], atol=1e-4)
        fired = col[col > 0]
        if len(fired):
            hist = detail["hist"]
            assert hist["hi"] == pytest.approx(
                np.sort(fired)[int(np.floor(0.99 * (len(fired) - 1)))], rel=1e-4
            )
            assert (
                sum(hist["counts"]) + hist["over"] == len(fired)
                and hist["over"] == (fired > hist["hi"]).sum()
            )
    assert int(stats["dead"].sum()) == int((F.max(0) <= 0).sum())
    assert deduplicated > 0  # the fixture's repeated text exercises the de-duplication


def test_examples_come_from_every_quantile_band(world):
    """Each band's examples lie in its activation range (bands split the firings by rank), in passages
    distinct from the top contexts and from each other."""
    store, sae = world["store"], SAE.load(world["saes"]["relu"]).eval()
    held = extract.read_held_out(store, 10**9)
    (fr,) = extract.encode_held_out([sae], store, LAYER, held)
    j = int(np.argmax(np.diff(fr.starts)))  # the most often firing latent
    toks, vals = fr.of(j)
    detail = extract.latent_detail(fr, j, held, np.random.default_rng(0))
    ranked = np.sort(vals)
    bands = np.array_split(ranked, extract.N_BANDS)
    assert len(detail["bands"]) == extract.N_BANDS
    taken = [(passage(c[0], held, extract.HALF_WINDOW), None) for c in detail["top"]]
    picked = 0
    for (lo, hi, examples), band in zip(detail["bands"], bands, strict=True):
        assert np.isclose(lo, band[0], atol=1e-4) and np.isclose(hi, band[-1], atol=1e-4)
        for centre, value, *_ in examples:
            assert lo - 1e-4 <= value <= hi + 1e-4
            idx = passage(centre, held, extract.HALF_WINDOW)
            assert not any(set(idx) & set(t) for t, _ in taken)
            taken.append((idx, None))
            picked += 1
    assert picked > extract.N_BANDS  # the fixture's latent fires on enough distinct passages


# --- weights --------------------------------------------------------------------------------------


def test_logit_effects_equal_decoder_times_unembedding(world):
    """Against the full model loaded by transformers: its lm_head times its final norm's (1 + weight)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["ckpt"]).eval()
    with torch.no_grad():
        model.model.norm.weight.normal_()  # a non-trivial gain (a fresh model's is zero: a gain of one)
        model.save_pretrained(world["root"] / "model-gain")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (world["ckpt"] / f).exists():
            shutil.copy(world["ckpt"] / f, world["root"] / "model-gain" / f)
    U_ref = (model.lm_head.weight * (1 + model.model.norm.weight)).detach()
    U = weights.unembedding(world["root"] / "model-gain")
    assert torch.allclose(U, U_ref, atol=1e-6)
    W_dec = SAE.load(world["saes"]["relu"]).W_dec.detach()
    ref = W_dec @ U_ref.T
    got = weights.logit_effects(W_dec, U, chunk=40)
    top, bottom = ref.topk(weights.N_LOGITS, dim=1), (-ref).topk(weights.N_LOGITS, dim=1)
    assert torch.equal(got["pos_ids"], top.indices) and torch.allclose(got["pos"], top.values, atol=1e-5)
    assert torch.equal(got["neg_ids"], bottom.indices) and torch.allclose(
        got["neg"], -bottom.values, atol=1e-5
    )
    # the histogram of every latent's effects over the whole vocabulary: numpy's, on the same range
    assert torch.allclose(got["hist_lo"], ref.min(1).values, atol=1e-5)
    assert torch.allclose(got["hist_hi"], ref.max(1).values, atol=1e-5)
    assert (got["hist"].sum(1) == U.shape[0]).all()
    for j in range(0, W_dec.shape[0], 13):
        lo, hi = float(got["hist_lo"][j]), float(got["hist_hi"][j])
        expected = np.histogram(ref[j].numpy(), bins=weights.LOGIT_BINS, range=(lo, hi))[0]
        # a value on a bin edge may fall either way
        assert np.abs(got["hist"][j].numpy() - expected).sum() <= 2


def test_coactive_latents_equal_numpys_correlation(world):
    """Pearson r of two latents' activations over the held-out tokens (BOS left out), against np.corrcoef
    on the dense activations; the k best other latents, never the latent itself."""
    store, sae = world["store"], SAE.load(world["saes"]["relu"]).eval()
    held = extract.read_held_out(store, 10**9)
    (fr,) = extract.encode_held_out([sae], store, LAYER, held, batch=300)
    with torch.no_grad():
        F = sae.encode(torch.from_numpy(store.read_acts("eval", LAYER))).double().numpy()[~held.bos]
    alive = F.std(0) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.corrcoef(F.T)
    latents = [j for j in range(F.shape[1]) if alive[j]][:40]
    got = extract.coactive_latents(fr, held.n_scored, latents, chunk=7)
    assert set(got) == set(latents)
    for j in latents:
        r = np.where(alive, R[j], -np.inf)
        r[j] = -np.inf
        expected = [t for t in np.argsort(-r, kind="stable")[: extract.N_COACTIVE] if r[t] > 0]
        assert [t for t, _ in got[j]] == [int(t) for t in expected], j
        assert np.allclose([v for _, v in got[j]], r[expected], atol=1e-4)
    assert any(got[j] for j in latents)


def test_nearest_latents_by_decoder_cosine(world):
    W = SAE.load(world["saes"]["relu"]).W_dec.detach()
    ids, cos = weights.nearest_latents(W, chunk=7)
    Wn = W / W.norm(dim=1, keepdim=True)
    C = Wn @ Wn.T
    C.fill_diagonal_(-2)
    ref = C.topk(weights.N_NEIGHBOURS, dim=1)
    assert torch.allclose(cos, ref.values, atol=1e-6)
    assert ids[0, 0] == 1 and ids[1, 0] == 0 and cos[0, 0] > 0.999  # the planted duplicate pair


# --- absorption -----------------------------------------------------------------------------------


def planted_absorption(seed: int = 0):
    """Letters on orthogonal axes; a third of the A and B words also carry a word feature (axis 26). On
    those A words a latent along A + feature fires instead of A's main latent: planted absorption. It
    fires on those B words too, so it cannot sharpen A's probe (it is no split of A)."""
    from atmpipe.sae import SAEConfig, make_sae

    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(26), 30)
    acts = 3 * np.eye(32)[y] + 0.3 * rng.normal(size=(len(y), 32))
    absorbed_words = (y == 0) & (np.arange(len(y)) % 3 == 0)
    acts[absorbed_words | ((y == 1) & (np.arange(len(y)) % 3 == 0)), 26] += 4
    sae = make_sae(SAEConfig("relu", 32, 27))
    with torch.no_grad():
        W_enc, W_dec = torch.zeros(32, 27), torch.zeros(27, 32)
        W_enc[:26, :26], W_dec[:26, :26] = torch.eye(26), torch.eye(26)
        W_enc[26, 0] = -1.0  # A's main latent is silenced by the word feature...
        W_enc[[0, 1, 26], 26] = 1.0  # ...and the absorber needs the feature and A or B
        W_dec[26, [0, 26]] = 2**-0.5
        b_enc = torch.full((27,), -1.0)
        b_enc[26] = -4.0
        sae.W_enc.copy_(W_enc), sae.W_dec.copy_(W_dec), sae.b_enc.copy_(b_enc), sae.b_dec.zero_()
    words = np.array([f"{chr(97 + c)}word{i}" for i, c in enumerate(y)])
    return sae.eval(), acts.astype(np.float32), y, words, absorbed_words


def test_absorption_records_follow_the_absorption_metric():
    """The records' main latents and absorption fractions are the metric's own, letter by letter, on a
    planted absorber (which SAEBench's selection rule takes in as a main latent)."""
    from atmpipe.eval.compute.absorption import AbsorptionConfig, absorption_metrics, ground_truth_probe

    sae, acts, y, words, _ = planted_absorption()
    is_test = np.random.default_rng(1).random(len(y)) < 0.4
    task = {"x_train": acts[~is_test], "y_train": y[~is_test], "x_test": acts[is_test], "y_test": y[is_test]}
    task |= {"x_score": acts[is_test], "words_test": words[is_test].tolist()}
    cfg = AbsorptionConfig(min_letters=1, probe_batch=32, sparse_probe_batch=32)  # small data: more steps
    probe = ground_truth_probe(task["x_train"], task["y_train"], task["x_test"], task["y_test"], cfg)
    metric = absorption_metrics(sae, task, probe, cfg)
    records = absorbed.compute(sae, task, probe, cfg)
    assert set(records) == set(metric["per_letter"]) and len(records) >= 20
    for letter, rec in records.items():
        assert rec.main == metric["per_letter"][letter]["main_latents"]
        assert np.isclose(rec.absorption_fraction, metric["per_letter"][letter]["absorption_fraction"])
        assert rec.absorbers == {a["latent"]: a["words"] for a in metric["per_letter"][letter]["absorbers"]}
    # SAEBench's main-latent rule (L1 ranking, k grows while F1 jumps) takes the planted absorber in as a
    # second main latent of a: F1 jumps when it joins. Its words are then not absorbed, by either count.
    assert records["a"].main == [0, 26] and records["a"].absorption_fraction == 0.0
    assert all(not rec.absorbers for rec in records.values())


# --- the stage and its errors ---------------------------------------------------------------------


def test_inspect_refuses_bad_inputs(world, tmp_path):
    relu, store, ckpt = world["saes"]["relu"], world["store"].path, world["ckpt"]
    write_arrays_store(
        tmp_path / "empty.zarr",
        {"train": {"acts": np.ones((256, 32), np.float32)}, "eval": {"acts": np.zeros((0, 32), np.float32)}},
        layer=LAYER, chunk_tokens=128, shard_tokens=256,
    )  # fmt: skip
    noname = make_sae_dir(tmp_path / "noname", "relu", "")
    wide_store = tmp_path / "wide.zarr"
    write_arrays_store(
        wide_store, {s: {"acts": np.ones((256, 16), np.float32)} for s in ("train", "eval")}, layer=LAYER,
        chunk_tokens=128, shard_tokens=256,
    )  # fmt: skip
    out = tmp_path / "out"
    common = ["--store", store, "--model", ckpt, "--out", out]
    cases = [
        (["--sae", relu, "--store", tmp_path / "empty.zarr", "--model", ckpt, "--out", out],
         f"store {tmp_path / 'empty.zarr'} has no held-out tokens to inspect (its eval split is empty); "
         "harvest it with --eval-tokens above 0"),
        (["--sae", relu, "--store", wide_store, "--model", ckpt, "--out", out],
         f"SAE relu has width d_in=32 but store {wide_store} has d_model=16; "
         "pass the store the SAE was trained on (--store)"),
        (["--sae", relu, *common, "--latents", "12,96"],
         "unknown latent 96 for SAE relu, which has latents 0-95; pass latent numbers below 96"),
        (["--sae", relu, *common, "--latents", "12,x"],
         "--latents '12,x' is not a comma list of latent numbers; pass e.g. --latents 12,407"),
        (["--sae", relu, *common, "--latents", "1", "--top", "5"],
         "--latents and --top were both given; pass one of them"),
        (["--sae", relu, *common, "--top", "0"],
         "--top must be a positive number of latents (got 0); pass e.g. --top 200"),
        (["--sae", relu, *common, "--eval", tmp_path / "nope.json"],
         f"eval result {tmp_path / 'nope.json'} does not exist; pass a results.json written by `atmpipe eval`"),
        (["--sae", relu, "--model", ckpt, "--out", out],
         "no store given and the SAEs do not record theirs; pass --store PATH"),
        (["--sae", noname, "--store", store, "--out", out],
         "neither the SAEs nor the store name their model; pass --model"),
    ]  # fmt: skip
    (tmp_path / "bad.json").write_text("{not json")
    cases.append(
        (["--sae", relu, *common, "--eval", tmp_path / "bad.json"],
         f"cannot read eval result {tmp_path / 'bad.json'} (Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1)); pass a results.json written by `atmpipe eval`")
    )  # fmt: skip
    before = tree_digest(tmp_path)
    for args, expected in cases:
        result = invoke("inspect", *args)
        assert_message(error_of(result), expected)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert tree_digest(tmp_path) == before and not out.exists()


def test_inspect_refuses_a_model_that_does_not_fit(world, tmp_path):
    """The unembedding must cover the store's token ids and match the SAEs' width."""

    def refusal(model: Path) -> str:
        result = invoke("inspect", "--sae", world["saes"]["relu"], "--store", world["store"].path,
                        "--model", model, "--out", tmp_path / "out")  # fmt: skip
        return error_of(result)

    small_vocab = tmp_path / "small"
    model = tiny_model("gemma3")
    model.resize_token_embeddings(100)
    model.save_pretrained(small_vocab)
    tiny_tokenizer(SAMPLE_TEXT).save_pretrained(small_vocab)
    top = int(np.asarray(world["store"].split("eval").tokens[:]).max())
    assert_message(
        refusal(small_vocab),
        f"the store holds token id {top} but model {small_vocab} has 100 tokens; pass the store's model with --model",
    )
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    wide = tmp_path / "wide"
    cfg = tiny_model("gemma3").config.to_dict() | {"hidden_size": 48}
    Gemma3ForCausalLM(Gemma3TextConfig(**cfg)).save_pretrained(wide)
    tiny_tokenizer(SAMPLE_TEXT).save_pretrained(wide)
    assert_message(
        refusal(wide),
        f"SAE relu has width d_in=32 but model {wide} has d_model=48; pass the SAE's model with --model",
    )
    headless = tmp_path / "headless"
    headless.mkdir()
    shutil.copy(world["ckpt"] / "config.json", headless / "config.json")
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2)}, headless / "model.safetensors")
    assert_message(
        refusal(headless),
        f"checkpoint {headless} holds no lm_head or embed_tokens tensor; pass the SAE's model with --model",
    )
    assert not (tmp_path / "out").exists()


# --- the page, in a real browser -------------------------------------------------------------------


def chromium():
    """Headless Debian Chromium under selenium's driver for it: no browser download, no network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "Chromium is missing: `make test` installs it (apt)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,900", f"--user-data-dir={tempfile.mkdtemp(prefix='atmpipe-chromium-')}"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def wait_for(driver, css: str, timeout: float = 10.0):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # Poll every 10 ms, not selenium's default 500 ms: benchmarks/bench_inspect.py times pages with this.
    WebDriverWait(driver, timeout, poll_frequency=0.01).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    return driver.find_elements(By.CSS_SELECTOR, css)


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def open_page(driver, url: str, css: str):
    """Load a route afresh (a hash change alone keeps the page) and wait for `css`."""
    driver.get("about:blank")
    driver.get(url)
    return wait_for(driver, css)


def check_layout(driver, width: int, shots: Path, name: str) -> None:
    """At `width` px: nothing wider than the window, the sticky column headers below the header (their
    offset is the header's measured height), and a screenshot."""
    metrics = driver.execute_script(
        "const th = document.querySelector('#index th');"
        "return [document.documentElement.scrollWidth, window.innerWidth, document.querySelector('header').offsetHeight,"
        " th ? th.getBoundingClientRect().top : null, window.scrollY];"
    )
    assert metrics[0] <= metrics[1], f"{name} at {width} px is {metrics[0]} px wide"
    if metrics[3] is not None and metrics[4] > 0:  # scrolled: the column headers sit right below the header
        assert abs(metrics[3] - metrics[2]) <= 1, metrics
    driver.save_screenshot(str(shots / f"{name}-{width}.png"))


def test_browser_in_chromium(world, tmp_path):
    """Every view at 1000 and 1400 px, every absorbed-word chip clicked (none lands on "not found"), the
    malformed routes, widening and shading, filters, and no console error anywhere."""
    from selenium.webdriver.common.by import By

    report = tmp_path / "report"
    report.mkdir()
    write_eval_result(report / "results.json", ["relu", "atm"])  # found beside --out
    (tmp_path / "mine.txt").write_text("The quick brown fox.\n\nSparse autoencoders decompose the stream.\n")
    result = invoke("inspect", "--sae", world["saes"]["relu"], "--sae", world["saes"]["atm"],
                    "--store", world["store"].path, "--model", world["ckpt"], "--out", report / "features",
                    "--text", tmp_path / "mine.txt")  # fmt: skip
    assert result.exit_code == 0, result.output
    uri = (report / "features" / "index.html").resolve().as_uri()
    data = json.loads(
        (report / "features" / "data" / "index.js").read_text().removeprefix("ATM.index=").rstrip(";\n")
    )
    assert [s["name"] for s in data["saes"]] == ["relu", "atm"] and data["saes"][1]["atm"]["p"]
    assert data["saes"][1]["masking"]["theta"] == 0.0 and data["saes"][0]["masking"] is None
    driver = chromium()
    try:
        for width in (1400, 1000):
            driver.set_window_size(width, 900)
            rows = open_page(driver, uri, "#index tr.latent-row")
            assert len(rows) == 96 and "#" in rows[0].text
            assert "duplicate?" in driver.find_element(By.ID, "index").text  # the planted pair
            driver.execute_script("window.scrollTo(0, 600)")
            check_layout(driver, width, tmp_path, "index")
            open_page(driver, uri + "#sae=1", "#masking")
            assert "θ" in driver.find_element(By.ID, "masking").text
            titles = {
                th.text: th.get_attribute("title")
                for th in driver.find_elements(By.CSS_SELECTOR, "#index th")
            }
            assert all(titles[k] for k in ("M", "F", "R", "log₁₀ I", "p", "top token"))
            check_layout(driver, width, tmp_path, "atm-index")
            j = int(np.argmax(data["saes"][0]["stats"]["density"]))
            open_page(driver, uri + f"#sae=0&latent={j}", "tr.context")
            check_layout(driver, width, tmp_path, "latent")
            open_page(driver, uri + "#view=absorption", "table.absorption")
            check_layout(driver, width, tmp_path, "absorption")
            open_page(driver, uri + "#view=compare&q=%20the", "table.compare")
            check_layout(driver, width, tmp_path, "compare")
            open_page(driver, uri + "#view=texts", "#text-0")
            check_layout(driver, width, tmp_path, "texts")
        assert console_errors(driver) == []

        # the index: sort, and filter by flag
        open_page(driver, uri, "#index tr.latent-row")
        driver.find_element(By.CSS_SELECTOR, "#index th[data-k=latent]").click()
        assert wait_for(driver, "#index tr.latent-row")[0].text.startswith("#0")
        driver.find_element(By.CSS_SELECTOR, "#filter option[value=dup]").click()
        dups = wait_for(driver, "#index tr.latent-row")
        assert {r.text.split()[0] for r in dups} >= {"#0", "#1"} and all("duplicate?" in r.text for r in dups)
        driver.execute_script(  # a lower cutoff flags more pairs (the page prints the highest cosine)
            "const e = document.getElementById('dup-cos'); e.value = '0.5'; e.dispatchEvent(new Event('change'))"
        )
        assert len(wait_for(driver, "#index tr.latent-row")) > len(dups)

        # a latent: top contexts (one per passage), quantile bands, histogram, widening, shading
        j = int(np.argmax(data["saes"][0]["stats"]["density"]))
        contexts = open_page(driver, uri + f"#sae=0&latent={j}", "tr.context")
        assert len(contexts) > extract.N_TOP and driver.find_elements(By.CSS_SELECTOR, ".tok.max")
        assert f"latent #{j}" in driver.find_element(By.ID, "latent-title").text
        assert "Top 20 activating contexts" in driver.page_source
        ticks = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#histogram text")]
        assert "1" in ticks and "10" in ticks and "Q1" in ticks and f"Q{extract.N_BANDS}" in ticks
        vocab_size = json.loads((world["ckpt"] / "config.json").read_text())["vocab_size"]
        in_bars = driver.execute_script(  # each bar's title ends with its token count
            "return [...document.querySelectorAll('#logit-histogram rect title')]"
            ".reduce((n, t) => n + +t.textContent.split(': ')[1].split(' ')[0].replace(/,/g, ''), 0)"
        )
        assert in_bars == vocab_size and f"all {vocab_size:,} tokens" in driver.page_source
        assert driver.find_elements(By.CSS_SELECTOR, "#coactive a") and driver.find_elements(
            By.CSS_SELECTOR, "#nearest a"
        )
        before = len(driver.find_elements(By.CSS_SELECTOR, "#top-0 .tok"))
        driver.find_element(By.CSS_SELECTOR, "#top-0 button.widen").click()
        after = len(driver.find_elements(By.CSS_SELECTOR, "#top-0 .tok"))
        assert after > before and after <= 2 * extract.WIDE_WINDOW + 1
        driver.find_element(By.CSS_SELECTOR, "#shade option[value=context]").click()
        assert wait_for(driver, "tr.context") and console_errors(driver) == []

        # absorption: a table per letter with both SAEs, the gated letters with their probe F1
        open_page(driver, uri + "#view=absorption", "table.absorption")
        tables = driver.find_elements(By.CSS_SELECTOR, "table.absorption")
        assert len(tables) == 3 and all(
            len(t.find_elements(By.CSS_SELECTOR, "tbody tr")) == 2 for t in tables
        )
        assert "A 0.3" in driver.find_element(By.ID, "failed-letters").text
        chips = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.word")]
        open_page(driver, uri + "#view=compare", "a.word")
        chips += [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.word")]
        open_page(driver, uri + "#sae=0&latent=7", "#absorption-role")
        role = driver.find_element(By.ID, "absorption-role").text
        assert "absorbs in S" in role and "absorbs in Q" in role and "␣sea" in role
        chips += [
            a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#absorption-role a.word")
        ]
        assert len(set(chips)) == 6  # ␣sea ␣small Sparse ␣the ␣zebra ␣quick
        for href in chips:
            open_page(driver, href, "table.compare")
            assert not driver.find_elements(By.ID, "not-found"), href
            marked = driver.find_elements(By.CSS_SELECTOR, ".flag.role")
            assert any(m.text.startswith("absorbs") for m in marked), href
        assert "␣" in driver.find_element(By.CSS_SELECTOR, "h3 .chip").text or "Sparse" in driver.page_source

        # your texts: a token's latents in every SAE
        open_page(driver, uri + "#view=texts", "#text-1 .tok")
        driver.find_elements(By.CSS_SELECTOR, "#text-1 .tok")[0].click()
        assert (
            len(wait_for(driver, "#token-latents td")) == 2
            and "(text 2, token 1)" in driver.find_element(By.TAG_NAME, "h3").text
        )

        # malformed routes: a clear message instead of the old page
        for bad in ("#sae=9", "#sae=0&latent=x", "#sae=0&latent=96", "#view=nope", "#sae=-1"):
            open_page(driver, uri + bad, "#route-error")
            assert "No such page" in driver.find_element(By.ID, "route-error").text
        assert console_errors(driver) == []
    finally:
        driver.quit()
    assert all(
        (tmp_path / f"{v}-{w}.png").stat().st_size > 10_000 for v in ("index", "latent") for w in (1000, 1400)
    )


def test_own_texts_latents_equal_the_model_and_saes_run_directly(world, tmp_path, monkeypatch):
    """--text: each token's latents are the SAE's encoding of the LM's own hidden state after the layer
    (transformers' output_hidden_states), ranked by share of the latent's max; a second build reads the
    residuals from the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atmpipe.eval.cache import ActivationCache
    from atmpipe.inspect import texts
    from atmpipe.lm import load_lm

    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    (tmp_path / "t.txt").write_text("\n\nThe lazy dog.\n\n\nBBC News reported the markets rose.\n")
    mine = texts.read_texts(str(tmp_path / "t.txt"))
    assert mine == ["The lazy dog.", "BBC News reported the markets rose."]
    lm = load_lm(str(world["ckpt"]))
    cache = ActivationCache(lm.config_hash, LAYER)
    runs = texts.residuals(lm, LAYER, mine, cache)
    assert texts.residuals(lm, LAYER, mine, cache)[1][1].equal(runs[1][1])  # read back from the cache
    sae = SAE.load(world["saes"]["relu"]).eval()
    vmax = np.linspace(0.5, 5, sae.cfg.d_sae).astype(np.float32)
    view = texts.text_view([sae], [vmax], runs)
    model = AutoModelForCausalLM.from_pretrained(world["ckpt"]).eval()
    tok = AutoTokenizer.from_pretrained(world["ckpt"])
    for text, v in zip(mine, view, strict=True):
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
        assert v["ids"] == ids
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
            f = sae.encode(h).numpy()
        assert v["latents"][0][0] == []  # BOS is not scored
        for t in range(1, len(ids)):
            share = f[t] / vmax
            expected = [j for j in np.argsort(-share, kind="stable")[: texts.PER_TOKEN] if f[t, j] > 0]
            assert [e[0] for e in v["latents"][0][t]] == expected
            assert np.allclose([e[1] for e in v["latents"][0][t]], f[t, expected], atol=2e-3)
    (tmp_path / "empty.txt").write_text("\n\n")
    result = invoke("inspect", "--sae", world["saes"]["relu"], "--store", world["store"].path,
                    "--model", world["ckpt"], "--out", tmp_path / "out", "--text", tmp_path / "empty.txt")  # fmt: skip
    assert_message(
        error_of(result),
        f"--text {tmp_path / 'empty.txt'} holds no text; write one or more paragraphs into it",
    )
    result = invoke("inspect", "--sae", world["saes"]["relu"], "--store", world["store"].path,
                    "--model", world["ckpt"], "--out", tmp_path / "out", "--text", tmp_path / "nope.txt")  # fmt: skip
    assert error_of(result).startswith(f"cannot read --text {tmp_path / 'nope.txt'} (")
    assert not (tmp_path / "out").exists()


def test_serve_runs_a_text_through_the_lm_and_saes_on_loopback(world, tmp_path):
    """--serve: the browser's files and POST /api/text over a real Flask server on 127.0.0.1; the answer is
    the SAEs' encoding of the LM's own hidden state (transformers' output_hidden_states); bad requests get
    a 400 with what to send; the live box works in Chromium; a taken port is refused."""
    import threading
    import urllib.error
    import urllib.request

    from selenium.webdriver.common.by import By
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atmpipe.errors import UserError
    from atmpipe.inspect import serve, texts
    from atmpipe.lm import load_lm

    out = tmp_path / "features"
    result = invoke("inspect", "--sae", world["saes"]["relu"], "--sae", world["saes"]["atm"],
                    "--store", world["store"].path, "--model", world["ckpt"], "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "data" / "index.js").read_text().removeprefix("ATM.index=").rstrip(";\n"))
    saes = [SAE.load(world["saes"][m]).eval() for m in ("relu", "atm")]
    maxes = [np.array(s["stats"]["max"], np.float32) for s in meta["saes"]]
    runner = serve.TextRunner(load_lm(str(world["ckpt"])), saes, maxes, LAYER)
    server = serve.start(out, runner, 0)
    assert server.socket.getsockname()[0] == "127.0.0.1"
    with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{server.port} "):
        serve.start(out, runner, server.port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.port}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to loopback

    def post(body: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(base + "api/text", body, {"Content-Type": "application/json"})
        try:
            with opener.open(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        with opener.open(base) as r:
            assert b"atmpipe feature browser" in r.read()
        assert post(b"{}") == (400, {"error": 'send JSON {"text": "..."} with some text in it'})
        assert post(json.dumps({"text": "x" * 20_001}).encode())[0] == 400
        status, got = post(json.dumps({"text": "The lazy dog."}).encode())
        assert status == 200
        tok = AutoTokenizer.from_pretrained(world["ckpt"])
        ids = [tok.bos_token_id, *tok("The lazy dog.", add_special_tokens=False)["input_ids"]]
        assert got["ids"] == ids and set(got["vocab"]) == {str(i) for i in ids}
        model = AutoModelForCausalLM.from_pretrained(world["ckpt"]).eval()
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
        for k, (sae, vmax) in enumerate(zip(saes, maxes, strict=True)):
            f = sae.encode(h).detach().numpy()
            for t in range(1, len(ids)):
                share = f[t] / np.maximum(vmax, 1e-12)
                expected = [j for j in np.argsort(-share, kind="stable")[: texts.PER_TOKEN] if f[t, j] > 0]
                assert [e[0] for e in got["latents"][k][t]] == expected

        driver = chromium()
        try:
            open_page(driver, base + "#view=texts", "#live-text")
            driver.find_element(By.ID, "live-text").send_keys("The quick brown fox.")
            driver.find_element(By.ID, "live-run").click()
            assert wait_for(driver, "#text-0 .tok") and len(wait_for(driver, "#token-latents td")) == 2
            assert "live" in driver.find_element(By.ID, "text-0").text
            assert console_errors(driver) == []
        finally:
            driver.quit()
    finally:
        server.shutdown()
        server.server_close()
    result = invoke("inspect", "--sae", world["saes"]["relu"], "--store", world["store"].path,
                    "--model", world["ckpt"], "--out", tmp_path / "other", "--serve", "--port", "70000")  # fmt: skip
    assert_message(
        error_of(result), "--port 70000 is not a port number; pass one from 1 to 65535 (0: any free port)"
    )
    assert not (tmp_path / "other").exists()


def test_eval_report_links_to_the_browser(tmp_path):
    """`atmpipe eval`'s report links to features/index.html when a browser was built beside it."""
    from atmpipe.eval.report import write_report

    run = {"model": "m", "model_config_hash": "h", "layer": 1, "store": "s", "metrics": [], "config": {}}
    run["cache_dir"] = "c"
    write_report(tmp_path / "plain", [], {}, {"sizes": {}}, run)
    assert "features/index.html" not in (tmp_path / "plain" / "report.html").read_text()
    (tmp_path / "with" / "features").mkdir(parents=True)
    (tmp_path / "with" / "features" / "index.html").write_text("<html></html>")
    write_report(tmp_path / "with", [], {}, {"sizes": {}}, run)
    assert '<a href="features/index.html">Feature browser' in (tmp_path / "with" / "report.html").read_text()
    assert "](features/index.html)" in (tmp_path / "with" / "report.md").read_text()


def test_absorption_on_request_runs_the_first_letter_task(world, tmp_path, monkeypatch):
    """`--absorption` loads the model, runs the first-letter prompts (cached under $ATMPIPE_HOME as the
    eval caches them) and records, per SAE, each absorption word's strongest latents."""
    monkeypatch.setenv("ATMPIPE_HOME", str(tmp_path / "home"))
    out, ckpt = tmp_path / "features", word_checkpoint(tmp_path / "model")
    result = invoke("inspect", "--sae", world["saes"]["relu"], "--store", world["store"].path,
                    "--model", ckpt, "--absorption", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    index = json.loads((out / "data" / "index.js").read_text().removeprefix("ATM.index=").rstrip(";\n"))
    view = index["saes"][0]["absorption"]
    assert view["source"].startswith("computed by atmpipe inspect --absorption")
    compare = json.loads((out / "data" / "compare.js").read_text().split(",", 1)[1].removesuffix(");\n"))
    words = compare["words"]
    assert words and all(len(per_sae) == 1 for per_sae in words.values())
    assert list((tmp_path / "home" / "eval-cache").glob("*/absorption-*.safetensors"))
