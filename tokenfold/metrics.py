"""How close is a predicted structure? Token metrics and C-alpha trace metrics, per protein and aggregated.

Trace metrics compare a predicted C-alpha trace with the true one residue by residue (the residue
correspondence is fixed: residue i of the prediction is residue i of the truth, nothing is aligned):

- ``rmsd``      C-alpha RMSD after the optimal rigid superposition (Kabsch), Angstrom.
- ``tm``        TM-score normalised by the true length, from tmtools (TM-align's code) called with the
                fixed identity alignment, i.e. what the TM-score program reports for a model.
- ``lddt``      lDDT on C-alpha (superposition-free): pairs closer than 15 A in the truth, fraction of
                their distances preserved within 0.5/1/2/4 A, averaged over thresholds, over all pairs.
- ``gdt_ts``    GDT-TS: mean over 1/2/4/8 A of the largest fraction of residues within that distance,
                each cutoff with its own superposition (found by an iterative search from fragments,
                the way the TM-score program computes GDT).
- ``frac_lt2``, ``frac_lt4``  fraction of residues within 2 / 4 A after the RMSD superposition.
- ``rmsd_seg``  like ``rmsd`` but each segment of the true chain (between chain breaks) superposed on
                its own, residue-weighted: what is left when the relative placement of segments,
                which no structure token can know across a gap, is not counted. Equals ``rmsd``
                for chains without breaks.

Token metrics: per-residue accuracy and the confusion matrix; perplexity comes from the model
(`tokenfold.teacher_forcing.teacher_forced`).
"""
from __future__ import annotations

import numpy as np

TRACE_METRICS = ("rmsd", "tm", "lddt", "gdt_ts", "frac_lt2", "frac_lt4", "rmsd_seg")
LDDT_RADIUS = 15.0
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
GDT_CUTOFFS = (1.0, 2.0, 4.0, 8.0)


# ----------------------------------------------------------------------------- superposition
def kabsch(mobile: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R and translation t minimising sum w_i |R x_i + t - y_i|^2 (x = mobile, y = target).

    Apply as ``mobile @ R.T + t``. Proper rotations only (a reflection is never returned).
    """
    x = np.asarray(mobile, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    cx, cy = w @ x, w @ y
    h = ((x - cx) * w[:, None]).T @ (y - cy)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cy - r @ cx


def superpose(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`mobile` moved onto `target` by the RMSD-optimal rigid motion."""
    r, t = kabsch(mobile, target)
    return np.asarray(mobile, dtype=np.float64) @ r.T + t


def rmsd(pred: np.ndarray, true: np.ndarray) -> float:
    """C-alpha RMSD after optimal superposition."""
    moved = superpose(pred, true)
    return float(np.sqrt(np.mean(np.sum((moved - np.asarray(true, np.float64)) ** 2, axis=1))))


# ----------------------------------------------------------------------------- TM-score (tmtools)
def tm_score(pred: np.ndarray, true: np.ndarray, seq: str | None = None) -> float:
    """TM-score of `pred` against `true` (normalised by the true length), residue i <-> residue i.

    tmtools' TM-align is given the identity alignment, so it only searches the superposition; this
    equals the TM-score program's number for a model of the same sequence.
    """
    from tmtools import tm_align

    L = len(true)
    if seq is None or len(seq) != L:
        seq = "A" * L
    x = np.ascontiguousarray(pred, dtype=np.float64)
    y = np.ascontiguousarray(true, dtype=np.float64)
    return float(tm_align(x, y, seq, seq, [seq, seq]).tm_norm_chain2)


def tm_d0(L: int) -> float:
    """TM-score's length-dependent distance scale (TM-align: 0.5 A floor for short chains)."""
    return max(0.5, 1.24 * np.cbrt(L - 15) - 1.8) if L > 21 else 0.5


# ----------------------------------------------------------------------------- lDDT
def lddt_ca(pred: np.ndarray, true: np.ndarray, radius: float = LDDT_RADIUS,
            thresholds=LDDT_THRESHOLDS, per_residue: bool = False):
    """lDDT on C-alpha atoms (no superposition). Pairs i != j with true distance < `radius` are scored.

    Global score = preserved pair-threshold checks / (pairs x thresholds), as in AlphaFold's `lddt`.
    With `per_residue`, also returns each residue's score (NaN for residues with no pair in range).
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    dt = np.sqrt(((t[:, None] - t[None]) ** 2).sum(-1))
    dp = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    scored = (dt < radius) & ~np.eye(len(t), dtype=bool)
    err = np.abs(dt - dp)
    kept = sum((err < thr).astype(np.float64) for thr in thresholds) / len(thresholds)
    n = scored.sum()
    glob = float((kept * scored).sum() / n) if n else float("nan")
    if not per_residue:
        return glob
    n_i = scored.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        res = np.where(n_i > 0, (kept * scored).sum(1) / np.maximum(n_i, 1), np.nan)
    return glob, res


# ----------------------------------------------------------------------------- GDT
def _fragment_seeds(L: int, min_len: int = 4, per_length: int = 8) -> list[np.ndarray]:
    """Contiguous residue windows that start the superposition search: lengths L, L/2, L/4, ... >= 4,
    at most `per_length` evenly spaced windows of each length."""
    seeds = []
    n = L
    while True:
        n_frag = min(L, max(n, min_len))
        starts = np.unique(np.linspace(0, L - n_frag, num=min(per_length, L - n_frag + 1)).round().astype(int))
        seeds.extend(np.arange(s, s + n_frag) for s in starts)
        if n_frag <= min_len:
            break
        n //= 2
    return seeds


def max_fraction_within(pred: np.ndarray, true: np.ndarray, cutoff: float, max_iter: int = 20) -> float:
    """Largest fraction of residues that one rigid superposition brings within `cutoff` of the truth.

    Search as in the TM-score program's GDT: superpose on a seed fragment, keep the residues within
    the cutoff, superpose on those, repeat until the set stops changing; best over all seeds.
    """
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(true, dtype=np.float64)
    L = len(x)
    if L < 3:
        return float(np.mean(np.linalg.norm(superpose(x, y) - y, axis=1) < cutoff)) if L else float("nan")
    best = 0
    c2 = cutoff * cutoff
    for seed in _fragment_seeds(L):
        sel = seed
        prev = None
        for _ in range(max_iter):
            if len(sel) < 3:
                break
            r, t = kabsch(x[sel], y[sel])
            d2 = np.sum((x @ r.T + t - y) ** 2, axis=1)
            within = np.flatnonzero(d2 < c2)
            best = max(best, len(within))
            if best == L:
                return 1.0
            if prev is not None and np.array_equal(within, prev):
                break
            prev, sel = within, within
    return best / L


def gdt_ts(pred: np.ndarray, true: np.ndarray, cutoffs=GDT_CUTOFFS) -> float:
    return float(np.mean([max_fraction_within(pred, true, c) for c in cutoffs]))


# ----------------------------------------------------------------------------- all trace metrics
def segment_rmsd(pred: np.ndarray, true: np.ndarray, starts: np.ndarray | None = None) -> float:
    """C-alpha RMSD with each segment of the true chain superposed on its own (residue-weighted RMS).

    `starts` (bool [L]) is True where a segment begins (chain breaks); None: one segment, the
    ordinary superposed RMSD. Segments of 3+ residues are superposed; for 2 residues only their
    distance counts (the best superposition leaves half the distance error on each point); a single
    residue contributes 0. Stage 04 (tokenizer reconstruction) and stage 06 (``rmsd_seg``) share it.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {true.shape}")
    if starts is None:
        return rmsd(pred, true)
    bounds = np.concatenate([[0], np.flatnonzero(np.asarray(starts, bool)[1:]) + 1, [len(true)]])
    se = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a >= 3:
            se += (b - a) * rmsd(pred[a:b], true[a:b]) ** 2
        elif b - a == 2:
            d = abs(np.linalg.norm(pred[a + 1] - pred[a]) - np.linalg.norm(true[a + 1] - true[a]))
            se += 2 * (d / 2) ** 2
    return float(np.sqrt(se / max(len(true), 1)))


def trace_metrics(pred: np.ndarray, true: np.ndarray, seq: str | None = None, starts: np.ndarray | None = None) -> dict:
    """Every trace metric of one prediction (dict keyed by TRACE_METRICS). `starts` (bool [L]) marks
    where the true chain's segments begin (chain breaks), for ``rmsd_seg``.

    Residues where either trace has a non-finite coordinate are left out; with fewer than 3 residues
    left every metric is NaN.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"trace shapes differ: {pred.shape} vs {true.shape}")
    ok = np.isfinite(pred).all(1) & np.isfinite(true).all(1)
    if ok.sum() < 3:
        return {k: float("nan") for k in TRACE_METRICS}
    if not ok.all():
        pred, true = pred[ok], true[ok]
        seq = "".join(c for c, keep in zip(seq, ok) if keep) if seq is not None else None
        if starts is not None:  # a kept residue starts a segment if one began since the previous kept one
            seg = np.cumsum(np.asarray(starts, bool))[ok]
            starts = np.concatenate([[True], np.diff(seg) != 0])
    moved = superpose(pred, true)
    dev = np.linalg.norm(moved - true, axis=1)
    return {
        "rmsd": float(np.sqrt(np.mean(dev ** 2))),
        "tm": tm_score(pred, true, seq),
        "lddt": lddt_ca(pred, true),
        "gdt_ts": gdt_ts(pred, true),
        "frac_lt2": float(np.mean(dev < 2.0)),
        "frac_lt4": float(np.mean(dev < 4.0)),
        "rmsd_seg": segment_rmsd(pred, true, starts),
    }


# ----------------------------------------------------------------------------- tokens
def token_accuracy(pred, true) -> float:
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"token arrays differ in length: {pred.shape} vs {true.shape}")
    return float(np.mean(pred == true)) if len(true) else float("nan")


def confusion_matrix(pred, true, n: int) -> np.ndarray:
    """int64 [n, n]: rows = true token, columns = predicted token."""
    pred, true = np.asarray(pred, np.int64), np.asarray(true, np.int64)
    return np.bincount(true * n + pred, minlength=n * n).reshape(n, n)


# ----------------------------------------------------------------------------- aggregation
DEFAULT_LENGTH_BINS = (0, 50, 100, 200, 300, 500, 1000)


def length_bin_labels(edges=DEFAULT_LENGTH_BINS) -> list[str]:
    return [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])] + [f">={edges[-1]}"]


def binned(lengths, values, edges=DEFAULT_LENGTH_BINS) -> list[dict]:
    """Per length bin: n, mean and median of `values` (NaNs ignored). Empty bins are left out."""
    lengths = np.asarray(lengths)
    values = np.asarray(values, dtype=np.float64)
    idx = np.searchsorted(np.asarray(edges), lengths, side="right") - 1
    out = []
    for b, label in enumerate(length_bin_labels(edges)):
        v = values[(idx == b) & np.isfinite(values)]
        if len(v):
            out.append({"bin": label, "n": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v))})
    return out


def summarize(values) -> dict:
    """n, mean, median, std, min, max of the finite values (NaN-only -> n 0)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0}
    return {"n": int(len(v)), "mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "min": float(v.min()), "max": float(v.max())}
