"""Write the browser: index.html (page.html, one template with its CSS and JS) and data/*.js beside it.

Data travels as JavaScript files (`ATM.feed(key, {...})`) loaded by <script> tags, because pages opened
from file:// may not fetch() their neighbours. The index data loads with the page; each latent's details
come in chunks of CHUNK latents, loaded when one of them is opened, so the index stays fast at any width.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from atmpipe.atomic import atomic_file
from atmpipe.inspect.extract import DENSE_DENSITY, HALF_WINDOW, WIDE_WINDOW, sig

TEMPLATE = Path(__file__).with_name("page.html")
CHUNK = 64  # latents per lazily loaded data file
INDEX_ROWS = 300  # index rows drawn at once (search and sort cover every latent; "show more" adds rows)
DUP_COS = 0.9  # decoder cosine above which a pair of latents is flagged as possible duplicates


def write_js(path: Path, key: str, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(f"ATM.feed({json.dumps(key)},{json.dumps(data, separators=(',', ':'))});\n")


def write_index(out: Path, index: dict) -> None:
    with atomic_file(out / "data" / "index.js") as tmp:
        tmp.write_text(f"ATM.index={json.dumps(index, separators=(',', ':'))};\n")
    with atomic_file(out / "index.html") as tmp:  # whole or absent: its presence marks a whole browser
        shutil.copyfile(TEMPLATE, tmp)


def sae_index_entry(name: str, sae, stats: dict, nn: tuple, atm: dict | None, pages, absorption) -> dict:
    """One SAE's index data: columns per latent (so 5,120 latents cost a few hundred kB)."""
    return {
        "name": name,
        "method": sae.cfg.method,
        "d_sae": sae.cfg.d_sae,
        "stats": {
            "density": sig(stats["density"], 3),
            "mean": sig(stats["mean"]),
            "max": sig(stats["max"]),
            "top_token": stats["top_token"].tolist(),
            "dead": stats["dead"].astype(int).tolist(),
            "dense": stats["dense"].astype(int).tolist(),
            "nn": nn[0][:, 0].tolist(),
            "nn_cos": sig(nn[1][:, 0], 3),
        },
        "atm": {k: sig(v, 6 if k == "p" else 4) for k, v in atm.items()} if atm else None,
        "pages": None if pages is None else sorted(int(j) for j in pages),
        "absorption": absorption,
    }


def index_meta(title: str, n_tokens: int, atm_stats: tuple, vocab: dict[int, str]) -> dict:
    return {
        "title": title,
        "n_tokens": n_tokens,
        "chunk": CHUNK,
        "index_rows": INDEX_ROWS,
        "dup_cos": DUP_COS,
        "dense_density": DENSE_DENSITY,
        "half_window": HALF_WINDOW,
        "wide_window": WIDE_WINDOW,
        "atm_stats": list(atm_stats),
        "vocab": {str(k): v for k, v in vocab.items()},
    }
