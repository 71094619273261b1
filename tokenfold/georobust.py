"""How well decodable tokens survive prediction errors: substitute tokens, decode, score against the truth.

Substitutions touch geometric tokens only (START/BREAK stay where they are), a fraction p of them per
chain (rounded, positions drawn without replacement, seeded):

- ``random``: a uniformly random *other* geometric token;
- ``near``:   the "2nd-nearest code", i.e. the geometric token nearest to the true one. For geo pair
  tokens (`tokenfold.geotokens`) that is the true pair with one half replaced by its nearest
  placement code (the half whose nearest code is closer); for one-code-per-residue tokens (geo v1)
  the nearest centroid.

Each decoded chain is scored against its true C-alpha trace: RMSD = `metrics.segment_rmsd` (every
segment between chain breaks superposed on its own); TM-score and lDDT = residue-weighted mean over
the chain's segments of >= 20 residues, each scored alone (tokens carry no pose across a gap, so a
whole-chain TM would score the arbitrary segment placement). Tables report medians over chains.

`simulated_probs` makes per-position probability arrays for measuring `GeoCodebook.decode_probs`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .geoframes import segment_starts
from .metrics import lddt_ca, segment_rmsd, tm_score

SUBSTITUTION_RATES = (0.0, 0.02, 0.05, 0.10, 0.20)
MODES = ("random", "near")
MIN_SEGMENT = 20


def near_miss_tokens(centroids: np.ndarray, pair: bool) -> np.ndarray:
    """int [n_geometric]: the nearest other geometric token of every geometric token."""
    C = np.asarray(centroids, np.float64)
    K = len(C)
    d = ((C[:, None] - C[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn, nd = d.argmin(1), d.min(1)
    if not pair:
        return nn
    c, o = np.divmod(np.arange(K * K), K)
    return np.where(nd[c] < nd[o], nn[c] * K + o, c * K + nn[o])


def substitute(tokens, p: float, mode: str, n_geometric: int, near: np.ndarray | None,
               rng: np.random.Generator) -> np.ndarray:
    """A copy of `tokens` with round(p * #geometric) geometric tokens replaced (see module docstring)."""
    t = np.array(tokens, dtype=np.int64)
    geo = np.flatnonzero(t < n_geometric)
    n = int(round(p * len(geo)))
    if n == 0:
        return t
    pos = rng.choice(geo, n, replace=False)
    if mode == "random":
        r = rng.integers(0, n_geometric - 1, n)
        t[pos] = r + (r >= t[pos])
    elif mode == "near":
        t[pos] = near[t[pos]]
    else:
        raise ValueError(f"unknown substitution mode {mode!r}; expected one of {MODES}")
    return t


def score_trace(x: np.ndarray, ca: np.ndarray, gap_before=None) -> tuple[float, float, float]:
    """(segment RMSD, TM, lDDT) of a decoded trace against the truth (see module docstring)."""
    x = np.asarray(x, np.float64)
    ca = np.asarray(ca, np.float64)
    st = segment_starts(ca, gap_before)
    b = np.concatenate([np.flatnonzero(st), [len(ca)]])
    w = tm = ld = 0.0
    for s, e in zip(b[:-1], b[1:]):
        if e - s >= MIN_SEGMENT:
            w += e - s
            tm += (e - s) * tm_score(x[s:e], ca[s:e])
            ld += (e - s) * lddt_ca(x[s:e], ca[s:e])
    return segment_rmsd(x, ca, st), (tm / w if w else float("nan")), (ld / w if w else float("nan"))


def robustness_table(tokens: Sequence[np.ndarray], decode_many: Callable, n_geometric: int, near: np.ndarray,
                     cas: Sequence[np.ndarray], gaps: Sequence | None = None, rates=SUBSTITUTION_RATES,
                     modes=MODES, seed: int = 0) -> list[dict]:
    """Rows {mode, p, n, rmsd, tm, lddt (medians over chains)} for the clean `tokens` of `cas`.

    p = 0 is scored once (mode "clean"); the same positions are drawn for every token kind given the
    same chains, seed and number of geometric tokens per chain."""
    gaps = [None] * len(cas) if gaps is None else list(gaps)
    rows = []
    todo = [("clean", 0.0)] if 0 in rates else []
    todo += [(m, p) for m in modes for p in rates if p > 0]
    for mode, p in todo:
        rng = np.random.default_rng([seed, int(round(p * 1000)), MODES.index(mode) if mode in MODES else 9])
        sub = [substitute(t, p, "random" if mode == "clean" else mode, n_geometric, near, rng) for t in tokens]
        s = np.array([score_trace(x, ca, g) for x, ca, g in zip(decode_many(sub), cas, gaps)])
        med = np.nanmedian(s, axis=0)
        rows.append({"mode": mode, "p": p, "n": len(cas), "rmsd": float(med[0]), "tm": float(med[1]),
                     "lddt": float(med[2])})
    return rows


def geo_robustness(cb, cas, gaps=None, rates=SUBSTITUTION_RATES, modes=MODES, seed: int = 0) -> list[dict]:
    """`robustness_table` for a `tokenfold.geotokens.GeoCodebook` (its own encoder and decoder)."""
    tokens = cb.encode_many(cas, gaps)
    return robustness_table(tokens, cb.decode_many, cb.K * cb.K, near_miss_tokens(cb.centroids, pair=True),
                            cas, gaps, rates, modes, seed)


def format_table(tables: dict[str, list[dict]]) -> str:
    """Side-by-side text table: one row per (mode, p), one RMSD | TM | lDDT block per label."""
    labels = list(tables)
    head = f"{'substitution':14s}" + "".join(f" | {lab:^22s}" for lab in labels)
    sub = f"{'':14s}" + " | RMSD     TM    lDDT " * len(labels)
    lines = [head, sub]
    keys = [(r["mode"], r["p"]) for r in tables[labels[0]]]
    for mode, p in keys:
        name = "none" if mode == "clean" else f"{mode} {p * 100:.0f}%"
        cells = []
        for lab in labels:
            r = next((r for r in tables[lab] if (r["mode"], r["p"]) == (mode, p)), None)
            cells.append(f" | {r['rmsd']:6.2f}  {r['tm']:.3f}  {r['lddt']:.3f}" if r else " | " + " " * 21)
        lines.append(f"{name:14s}" + "".join(cells))
    return "\n".join(lines)


def simulated_probs(cb, tokens, rng: np.random.Generator, kind: str = "random", strength: float = 4.5,
                    noise: float = 1.0) -> np.ndarray:
    """Per-position probabilities [L, n_tokens] around the true `tokens`, standing in for a model.

    kind ``random``: logits = `strength` on the true token + N(0, `noise`) on every geometric token
    (wrong argmaxes are arbitrary tokens); kind ``geometric``: logits = -D^2 / `strength` + N(0, `noise`)
    with D the distance (A) between a token's two placement codes and the true ones (wrong argmaxes
    are near misses). START/BREAK positions get probability 1 on their token."""
    t = np.asarray(tokens, dtype=np.int64)
    K, G = cb.K, cb.K * cb.K
    C = cb.centroids
    d = ((C[:, None] - C[None]) ** 2).sum(-1)
    c_all, o_all = np.divmod(np.arange(G), K)
    P = np.zeros((len(t), cb.n_tokens))
    for i, ti in enumerate(t):
        if ti >= G:
            P[i, ti] = 1.0
            continue
        lg = noise * rng.normal(size=G)
        if kind == "random":
            lg[ti] += strength
        elif kind == "geometric":
            c, o = divmod(int(ti), K)
            lg -= (d[c, c_all] + d[o, o_all]) / strength
        else:
            raise ValueError(f"unknown kind {kind!r}")
        e = np.exp(lg - lg.max())
        P[i, :G] = e / e.sum()
    return P
