"""Latent activations over the store's held-out split, kept sparse.

One pass encodes the stored activations with every SAE (no LM forward: the store already holds each
token's id and its position in its context window) and keeps the nonzero activations, sorted by
(latent, token). Firing statistics, top and random contexts and histograms are all read from that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

N_TOP = 20  # top-activating contexts per latent, each from a distinct passage
N_BANDS = 5  # quantile bands of a latent's activations (by rank) that examples are drawn from
N_PER_BAND = 3  # random contexts per band
HALF_WINDOW = 10  # tokens shown either side of the activating token
WIDE_WINDOW = 40  # ...and when a context is widened
MAX_SCAN = 4000  # candidates looked at for distinct passages (a dense latent's neighbours overlap)
HIST_BINS = 40
OUTLIER_Q = 0.99  # activations above this quantile are outliers: shading saturates, the histogram bins apart
DENSE_DENSITY = 0.1  # a latent firing on more than this share of tokens is flagged dense
N_COACTIVE = 8  # latents listed by correlation of activations with a latent's own


@dataclass
class HeldOut:
    """The held-out split's token ids, positions in their windows and BOS flags (first n tokens)."""

    tokens: np.ndarray  # int64 [n]
    positions: np.ndarray  # int64 [n]
    bos: np.ndarray  # bool [n]

    def __post_init__(self):
        """Each token's context window as [win_start, win_end) (a window: a run of consecutive positions)."""
        n = len(self.tokens)
        first = np.r_[True, self.positions[1:] != self.positions[:-1] + 1] if n else np.zeros(0, bool)
        starts = np.flatnonzero(first)
        run = np.cumsum(first) - 1
        self.win_start = starts[run] if n else np.zeros(0, np.int64)
        self.win_end = np.r_[starts[1:], n][run] if n else np.zeros(0, np.int64)

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def n_scored(self) -> int:
        return int((~self.bos).sum())


def read_held_out(store, max_tokens: int) -> HeldOut:
    split = store.split("eval")
    n = min(split.n_committed_tokens, max_tokens)
    return HeldOut(
        np.asarray(split.tokens[:n], dtype=np.int64),
        np.asarray(split.positions[:n], dtype=np.int64),
        np.asarray(split.bos[:n], dtype=bool),
    )


@dataclass
class Firing:
    """One SAE's nonzero activations on the held-out tokens, sorted by (latent, token index)."""

    latent: np.ndarray  # int64 [nnz]
    token: np.ndarray  # int64 [nnz] index into the held-out split
    value: np.ndarray  # float32 [nnz]
    starts: np.ndarray  # int64 [d_sae + 1]: latent j's entries are starts[j]:starts[j+1]
    n_tokens: int

    def of(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.starts[j], self.starts[j + 1]
        return self.token[s:e], self.value[s:e]

    def at(self, j: int, idx: np.ndarray) -> np.ndarray:
        """Latent j's activation at held-out tokens idx (0 where it does not fire)."""
        toks, vals = self.of(j)  # tokens ascending
        if len(toks) == 0:
            return np.zeros(idx.shape, np.float32)
        pos = np.minimum(np.searchsorted(toks, idx), len(toks) - 1)
        return np.where(toks[pos] == idx, vals[pos], 0.0).astype(np.float32)


@torch.no_grad()
def encode_held_out(
    saes: list, store, layer: int, held: HeldOut, batch: int = 4096, progress: Callable | None = None
) -> list[Firing]:
    """Encode the held-out activations once per batch with every SAE; BOS tokens never fire."""
    parts: list[list] = [[] for _ in saes]
    for start in range(0, held.n, batch):
        stop = min(start + batch, held.n)
        x = torch.from_numpy(store.read_acts("eval", layer, start, stop))
        bos = torch.from_numpy(held.bos[start:stop])
        for k, sae in enumerate(saes):
            f = sae.encode(x).float()
            f[bos] = 0
            rows, cols = f.nonzero(as_tuple=True)
            parts[k].append((cols.numpy(), rows.numpy() + start, f[rows, cols].numpy()))
        if progress is not None:
            progress(stop - start)
    return [firing_from(p, sae.cfg.d_sae, held.n) for p, sae in zip(parts, saes, strict=True)]


def firing_from(parts: list[tuple], d_sae: int, n_tokens: int) -> Firing:
    if parts:
        lat, tok, val = (np.concatenate([p[i] for p in parts]) for i in range(3))
    else:
        lat, tok, val = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    order = np.argsort(lat, kind="stable")  # tokens stay ascending within a latent
    lat, tok, val = lat[order].astype(np.int64), tok[order].astype(np.int64), val[order].astype(np.float32)
    starts = np.searchsorted(lat, np.arange(d_sae + 1))
    return Firing(lat, tok, val, starts, n_tokens)


def latent_stats(fr: Firing, held: HeldOut) -> dict[str, np.ndarray]:
    """Per latent: firing density, mean activation when firing, max activation, top token id."""
    d = len(fr.starts) - 1
    counts = np.diff(fr.starts)
    sums = np.bincount(fr.latent, weights=fr.value, minlength=d)
    maxes = np.zeros(d, np.float32)
    np.maximum.at(maxes, fr.latent, fr.value)
    # Top token: the token id carrying most of the latent's activation mass.
    top = np.full(d, -1, np.int64)
    if len(fr.latent):
        vocab = int(held.tokens.max()) + 1
        uniq, inv = np.unique(fr.latent * vocab + held.tokens[fr.token], return_inverse=True)
        mass = np.bincount(inv.ravel(), weights=fr.value)
        u_lat = uniq // vocab
        order = np.lexsort((-mass, u_lat))
        first = order[np.r_[True, u_lat[order][1:] != u_lat[order][:-1]]]
        top[u_lat[first]] = uniq[first] % vocab
    density = counts / max(held.n_scored, 1)
    return {
        "density": density,
        "mean": np.where(counts > 0, sums / np.maximum(counts, 1), 0.0),
        "max": maxes,
        "top_token": top,
        "dead": counts == 0,
        "dense": density > DENSE_DENSITY,
    }


def window_bounds(i: int, held: HeldOut, half: int) -> tuple[int, int]:
    """[lo, hi): held-out tokens within `half` of token i that share its context window."""
    return max(int(held.win_start[i]), i - half), min(int(held.win_end[i]), i + half + 1)


def distinct_passages(candidates: np.ndarray, held: HeldOut, k: int, taken: list) -> list[int]:
    """Positions in `candidates` of up to k of them (in their order) whose shown windows neither overlap
    one already taken nor repeat its text (stores often hold a passage twice); `taken` grows in place."""
    chosen = []
    for pos, i in enumerate(candidates[:MAX_SCAN].tolist()):
        lo, hi = window_bounds(i, held, HALF_WINDOW)
        text = held.tokens[lo:hi].tobytes()
        if any(lo < t_hi and t_lo < hi or text == t_text for t_lo, t_hi, t_text in taken):
            continue
        taken.append((lo, hi, text))
        chosen.append(pos)
        if len(chosen) == k:
            break
    return chosen


def top_token_indices(
    fr: Firing, j: int, held: HeldOut, k: int = N_TOP, taken: list | None = None
) -> np.ndarray:
    """Held-out indices of latent j's k largest activations in distinct passages (ties: earlier first)."""
    toks, vals = fr.of(j)
    order = toks[np.argsort(-vals, kind="stable")]
    return order[distinct_passages(order, held, k, [] if taken is None else taken)]


def quantile_bands(vals: np.ndarray) -> list[np.ndarray]:
    """Latent j's activations split by rank into N_BANDS equal bands, lowest first (indices into vals)."""
    return [b for b in np.array_split(np.argsort(vals, kind="stable"), N_BANDS) if len(b)]


def band_examples(
    fr: Firing, j: int, held: HeldOut, rng: np.random.Generator, taken: list
) -> list[tuple[float, float, np.ndarray]]:
    """Per quantile band (lowest first): its activation range and a few random distinct passages in it,
    by activation."""
    toks, vals = fr.of(j)
    out = []
    for band in quantile_bands(vals):
        perm = rng.permutation(band)
        picks = perm[distinct_passages(toks[perm], held, N_PER_BAND, taken)]
        picks = picks[np.argsort(vals[picks], kind="stable")]
        out.append((float(vals[band[0]]), float(vals[band[-1]]), toks[picks]))
    return out


def contexts(fr: Firing, j: int, centres: np.ndarray, held: HeldOut) -> list[list]:
    """Each context as [centre's held-out index, its activation, offsets, activations]: the latent's
    nonzero activations within WIDE_WINDOW of the centre in its context window (the page reads the tokens
    from the held-out split it loads once, and shows HALF_WINDOW either side until widened)."""
    if not len(centres):
        return []
    offsets = np.arange(-WIDE_WINDOW, WIDE_WINDOW + 1)
    idx = centres[:, None] + offsets
    lo = np.maximum(held.win_start[centres], centres - WIDE_WINDOW)[:, None]
    hi = np.minimum(held.win_end[centres], centres + WIDE_WINDOW + 1)[:, None]
    acts = np.where((idx >= lo) & (idx < hi), fr.at(j, np.clip(idx, 0, held.n - 1)), 0.0)
    nonzero = acts != 0
    ends = np.cumsum(nonzero.sum(1)).tolist()
    offs, vals = offsets[np.nonzero(nonzero)[1]].tolist(), sig(acts[nonzero], 4)
    centre_acts = acts[:, WIDE_WINDOW].round(4).tolist()
    return [
        [i, a, offs[s:e], vals[s:e]]
        for i, a, s, e in zip(centres.tolist(), centre_acts, [0, *ends[:-1]], ends, strict=True)
    ]


def histogram(vals: np.ndarray) -> dict:
    """Counts in HIST_BINS bins from 0 to the 99th percentile, and how many lie above it (outliers)."""
    if not len(vals):
        return {"counts": [], "hi": 0.0, "over": 0, "lo": 0.0}
    hi = float(np.quantile(vals, OUTLIER_Q, method="lower"))
    lo = min(0.0, float(vals.min()))
    hi = hi if hi > lo else float(vals.max()) or 1.0
    counts = np.histogram(vals[vals <= hi], bins=HIST_BINS, range=(lo, hi))[0]
    return {"counts": counts.tolist(), "lo": lo, "hi": hi, "over": int((vals > hi).sum())}


def latent_detail(fr: Firing, j: int, held: HeldOut, rng: np.random.Generator) -> dict:
    """What a latent's page shows from the store: top contexts, examples from each quantile band, and
    its histogram (x up to the 99th percentile, which is also the shading's default scale)."""
    _, vals = fr.of(j)
    taken: list = []
    top = top_token_indices(fr, j, held, taken=taken)
    bands = band_examples(fr, j, held, rng, taken)
    hist = histogram(vals)
    shown = contexts(fr, j, np.concatenate([top, *(c for _, _, c in bands)]).astype(np.int64), held)
    ends = np.cumsum([len(top), *(len(c) for _, _, c in bands)]).tolist()
    return {
        "top": shown[: ends[0]],
        "bands": [
            [round(a, 4), round(b, 4), shown[s:e]]
            for (a, b, _), s, e in zip(bands, ends[:-1], ends[1:], strict=True)
        ],
        "hist": hist,
        "p99": hist["hi"],
    }


def coactive_latents(fr: Firing, n_scored: int, latents: list[int], k: int = N_COACTIVE, chunk: int = 256):
    """Per latent in `latents`: the k other latents whose activations correlate most with its own over the
    held-out tokens (Pearson, BOS left out), as [[latent, r], ...]. Decoder cosine finds latents that write
    alike; this finds latents that fire together, as SAEDashboard's "correlated features" does (there among
    the latents rendered at once, here among all)."""
    from scipy import sparse  # only here: the rest of the browser needs no sparse algebra

    d, n = len(fr.starts) - 1, max(n_scored, 1)
    X = sparse.csc_matrix((fr.value.astype(np.float64), (fr.token, fr.latent)), shape=(fr.n_tokens, d))
    mean = np.asarray(X.sum(0)).ravel() / n
    sd = np.sqrt(np.maximum(np.asarray(X.multiply(X).sum(0)).ravel() / n - mean**2, 0.0))
    out, k = {}, min(k, d - 1)
    for s in range(0, len(latents), chunk):
        js = np.asarray(latents[s : s + chunk])
        cov = (X[:, js].T @ X).toarray() / n - mean[js, None] * mean[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(sd[js, None] * sd[None, :] > 0, cov / (sd[js, None] * sd[None, :]), -np.inf)
        r[np.arange(len(js)), js] = -np.inf  # never itself
        top = np.argsort(-r, axis=1, kind="stable")[:, :k]
        for i, j in enumerate(js.tolist()):
            out[j] = [
                [int(t), round(float(r[i, t]), 4)] for t in top[i] if np.isfinite(r[i, t]) and r[i, t] > 0
            ]
    return out


def sig(a, digits: int = 4) -> list:
    """Numbers rounded to `digits` significant digits, as a JSON-able list."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(a, dtype=np.float64).tolist()]


def token_latents(fr: Firing, held: HeldOut, maxes: np.ndarray, per_token: int = 6) -> dict[int, list]:
    """For each token id: the latents with the largest mean activation over its held-out occurrences
    relative to the latent's own max (raw means rank dense latents first), as [latent, mean, share]."""
    if not len(fr.latent):
        return {}
    d = len(fr.starts) - 1
    tok_ids = held.tokens[fr.token]
    uniq, inv = np.unique(tok_ids * d + fr.latent, return_inverse=True)
    occurrences = np.bincount(held.tokens[~held.bos])
    mean = np.bincount(inv.ravel(), weights=fr.value) / occurrences[uniq // d]
    share = mean / np.maximum(maxes[uniq % d], 1e-12)
    tok = uniq // d
    order = np.lexsort((-share, tok))
    first = np.r_[True, tok[order][1:] != tok[order][:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    kept = order[np.arange(len(order)) - group_start < per_token]
    out: dict[int, list] = {}
    for i in kept:
        out.setdefault(int(tok[i]), []).append(
            [int(uniq[i] % d), round(float(mean[i]), 3), round(float(share[i]), 3)]
        )
    return out
