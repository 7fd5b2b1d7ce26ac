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

N_TOP = 20  # top-activating contexts per latent
N_RANDOM_PER_BAND = 2  # random contexts from each third of a latent's activations (by quantile)
HALF_WINDOW = 10  # tokens shown either side of the activating token
HIST_BINS = 24
DENSE_DENSITY = 0.1  # a latent firing on more than this share of tokens is flagged dense


@dataclass
class HeldOut:
    """The held-out split's token ids, positions in their windows and BOS flags (first n tokens)."""

    tokens: np.ndarray  # int64 [n]
    positions: np.ndarray  # int64 [n]
    bos: np.ndarray  # bool [n]

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


def top_token_indices(fr: Firing, j: int, k: int = N_TOP) -> np.ndarray:
    """Held-out indices of latent j's k largest activations (ties: earlier token first)."""
    toks, vals = fr.of(j)
    return toks[np.argsort(-vals, kind="stable")[:k]]


def random_token_indices(fr: Firing, j: int, rng: np.random.Generator, exclude: np.ndarray) -> np.ndarray:
    """A few tokens from each third of latent j's activations (by quantile), lowest band first."""
    toks, vals = fr.of(j)
    keep = ~np.isin(toks, exclude)
    toks, vals = toks[keep], vals[keep]
    chosen = []
    for band in np.array_split(np.argsort(vals, kind="stable"), 3):
        if len(band):
            pick = rng.choice(band, size=min(N_RANDOM_PER_BAND, len(band)), replace=False)
            chosen += sorted(pick.tolist(), key=lambda i: vals[i])
    return toks[np.array(chosen, dtype=np.int64)]


def windows(centres: np.ndarray, held: HeldOut) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ±HALF_WINDOW tokens around each centre, and which lie in the centre's context window."""
    idx = centres[:, None] + np.arange(-HALF_WINDOW, HALF_WINDOW + 1)
    inside = (idx >= 0) & (idx < held.n)
    clipped = np.clip(idx, 0, held.n - 1)
    start = centres - held.positions[centres]
    valid = inside & (clipped - held.positions[clipped] == start[:, None])
    return clipped, valid


def contexts(fr: Firing, j: int, centres: np.ndarray, held: HeldOut, vmax: float) -> list[list]:
    """Each context as [token ids, activations in percent of the latent's max, centre's offset, value]."""
    if len(centres) == 0:
        return []
    idx, valid = windows(centres, held)
    acts = fr.at(j, idx)
    pct = np.rint(100 * acts / max(vmax, 1e-12)).astype(np.int64)
    out = []
    for r in range(len(centres)):
        cols = np.flatnonzero(valid[r])
        ids, p = held.tokens[idx[r, cols]], pct[r, cols]
        centre = int(np.flatnonzero(idx[r, cols] == centres[r])[0])
        out.append([ids.tolist(), p.tolist(), centre, round(float(acts[r, HALF_WINDOW]), 4)])
    return out


def latent_detail(fr: Firing, j: int, held: HeldOut, rng: np.random.Generator) -> dict:
    """What a latent's page shows from the store: top and random contexts, and its histogram."""
    toks, vals = fr.of(j)
    vmax = float(vals.max()) if len(vals) else 0.0
    top = top_token_indices(fr, j)
    rand = random_token_indices(fr, j, rng, top)
    hist = np.histogram(vals, bins=HIST_BINS, range=(0.0, vmax or 1.0))[0] if len(vals) else []
    return {
        "top": contexts(fr, j, top, held, vmax),
        "random": contexts(fr, j, rand, held, vmax),
        "hist": [int(c) for c in hist],
        "hist_max": round(vmax, 4),
    }


def token_latents(fr: Firing, held: HeldOut, per_token: int = 3) -> dict[int, list]:
    """For each token id: the latents with the largest mean activation over its held-out occurrences."""
    if not len(fr.latent):
        return {}
    d = len(fr.starts) - 1
    tok_ids = held.tokens[fr.token]
    uniq, inv = np.unique(tok_ids * d + fr.latent, return_inverse=True)
    occurrences = np.bincount(held.tokens[~held.bos])
    mean = np.bincount(inv.ravel(), weights=fr.value) / occurrences[uniq // d]
    tok = uniq // d
    order = np.lexsort((-mean, tok))
    first = np.r_[True, tok[order][1:] != tok[order][:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    kept = order[np.arange(len(order)) - group_start < per_token]
    out: dict[int, list] = {}
    for i in kept:
        out.setdefault(int(tok[i]), []).append([int(uniq[i] % d), round(float(mean[i]), 3)])
    return out
