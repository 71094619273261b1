"""Placement codes: where each C-alpha sits relative to the three before it (the local part of geo tokens).

What a placement code means
---------------------------
Residue i is placed from the three residues before it. In the *local frame* of i (origin at
x[i-1]; e1 along the bond x[i-2] -> x[i-1]; e3 normal to the plane of x[i-3], x[i-2], x[i-1];
e2 = e3 x e1) its position is a 3-vector c. In spherical terms ``|c|`` is the virtual bond length
(~3.8 A, ~2.9 A for cis peptides), the angle between ``c`` and ``-e1`` is the virtual bond angle and
the azimuth of ``c`` around e1 the virtual dihedral of x[i-3..i]. A `PlacementCodebook` is K such
vectors (k-means on train chains), so the Euclidean distance k-means minimises is exactly the
placement error in Angstrom. Code sequences use ``K`` on the first residue of a chain and ``K + 1``
on the first residue after a chain break (no geometry crosses a break).

Closed-loop (beam) encoding
---------------------------
Each code is chosen against the already *decoded* chain: the target of residue i is the true x[i]
expressed in the frame of the decoded x^[i-3..i-1]. The error of x^[i] is therefore the
quantisation error of that one step; it does not accumulate along the chain (quantising the true
internal coordinates instead drifts like a random walk: the geo v1 bench measured 2.8 A at K=512
against 0.17 A closed loop). ``beam > 1`` keeps the ``beam`` best partial decodings (summed squared
placement error); at K=32 beam 4 lowers the held-out median RMSD from 0.84 to 0.65 A.

Segment starts (chain start and after a break) are placed in a canonical pose: the first residue at
the anchor (the origin for the first segment; ``GAP_OFFSET`` A along +x from the last decoded
residue for later ones), the second on the +x axis, the third in the xy plane (y > 0). Those residues
use the ordinary codes, matched only on what is defined there: ``|c|`` for the second residue,
(component along the bond, distance from the bond axis) for the third.

This is the whole of the previous token kind ("geo v1": token = placement code). `tokenfold.geotokens`
builds the robust tokens on top of it; `bench/bench_tokenize.py` keeps v1 as a reference.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

from .structure import BREAK_DISTANCE, chain_breaks

log = logging.getLogger("tokenfold.geoframes")

MAX_BOND = BREAK_DISTANCE   # 4.2 A: a longer CA-CA distance is a chain break (same rule as stage 01)
GAP_OFFSET = 10.0   # A: where decode puts the first residue of a later segment (along +x)
_EPS = 1e-9


# ----------------------------------------------------------------------------- geometry helpers
def _unit(v: np.ndarray) -> np.ndarray:
    n = np.sqrt((v * v).sum(-1, keepdims=True))
    return v / np.maximum(n, _EPS)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.cross for [..., 3] arrays, without its per-call overhead (this runs once per residue step)."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    out[..., 0] = a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1]
    out[..., 1] = a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2]
    out[..., 2] = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]
    return out


def frames(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Local frames [..., 3 axes, 3] from three consecutive positions (rows e1, e2, e3).

    Collinear input (no plane) falls back to a fixed perpendicular, the same in encoder and decoder.
    """
    e1 = _unit(c - b)
    n = _cross(b - a, e1)
    nn = np.sqrt((n * n).sum(-1, keepdims=True))
    bad = nn[..., 0] < 1e-6
    if np.any(bad):
        alt = _cross(e1, np.array([0.0, 0.0, 1.0]))
        alt2 = _cross(e1, np.array([0.0, 1.0, 0.0]))
        small = np.sqrt((alt * alt).sum(-1)) < 1e-3
        alt[small] = alt2[small]
        n = np.where(bad[..., None], alt, n)
    e3 = _unit(n)
    e2 = _cross(e3, e1)
    return np.stack([e1, e2, e3], axis=-2)


def to_local(fr: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (fr * v[..., None, :]).sum(-1)


def from_local(fr: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (fr * c[..., :, None]).sum(-2)


def segment_starts(ca: np.ndarray, gap_before: np.ndarray | None = None, max_bond: float = MAX_BOND) -> np.ndarray:
    """bool [L]: True where a segment starts: residue 0, wherever `gap_before` says so, and wherever
    consecutive C-alphas are more than `max_bond` apart (`tokenfold.structure.chain_breaks`)."""
    starts = chain_breaks(np.asarray(ca, dtype=np.float64), max_bond)
    if len(starts):
        starts[0] = True
        if gap_before is not None:
            starts |= np.asarray(gap_before, dtype=bool)
    return starts


def segment_positions(starts: np.ndarray) -> np.ndarray:
    """int [L]: position of each residue within its segment (0 at every start)."""
    L = len(starts)
    idx = np.arange(L)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0)) if L else idx
    return idx - last_start


def canonical_pose(ca: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """True coordinates moved, segment by segment, into the canonical pose relative to the anchor.

    Residue s (segment start) -> origin, s+1 -> +x axis, s+2 -> xy plane with y > 0.
    """
    y = np.empty_like(ca)
    bounds = np.concatenate([np.flatnonzero(starts), [len(ca)]])
    for s, e in zip(bounds[:-1], bounds[1:]):
        seg = ca[s:e]
        x0 = seg[0]
        if e - s >= 2:
            e1 = _unit(seg[1] - x0)
            ref = seg[2] - seg[1] if e - s >= 3 else np.zeros(3)
            perp = ref - (ref @ e1) * e1
            if np.linalg.norm(perp) < 1e-6:  # no plane: any perpendicular
                perp = np.cross(e1, [0.0, 0.0, 1.0])
                if np.linalg.norm(perp) < 1e-3:
                    perp = np.cross(e1, [0.0, 1.0, 0.0])
            e2 = _unit(perp)
            R = np.stack([e1, e2, np.cross(e1, e2)])
        else:
            R = np.eye(3)
        y[s:e] = (seg - x0) @ R.T
    return y


def prepare(ca, gap_before) -> tuple[np.ndarray, np.ndarray]:
    """(canonical coordinates, segment positions) of one chain, with its input checked."""
    ca = np.asarray(ca, dtype=np.float64)
    if ca.ndim != 2 or ca.shape[1] != 3:
        raise ValueError(f"C-alpha coordinates must be [L,3], got {ca.shape}")
    if not np.isfinite(ca).all():
        raise ValueError("C-alpha coordinates contain NaN/inf")
    if gap_before is not None and len(gap_before) != len(ca):
        raise ValueError(f"gap_before has {len(gap_before)} entries for {len(ca)} residues")
    starts = segment_starts(ca, gap_before)
    return canonical_pose(ca, starts), segment_positions(starts)


# ----------------------------------------------------------------------------- the codebook
class PlacementCodebook:
    """K placement vectors; code sequences carry K (chain start) and K + 1 (after a break)."""

    def __init__(self, centroids: np.ndarray):
        C = np.asarray(centroids, dtype=np.float64)
        if C.ndim != 2 or C.shape[1] != 3 or len(C) < 2:
            raise ValueError(f"placement centroids must be [K,3] with K >= 2, got {C.shape}")
        self.centroids = C
        self._norm = np.sqrt((C * C).sum(1))
        self._rho = np.hypot(C[:, 1], C[:, 2])
        self._c2 = (C * C).sum(1)

    @property
    def K(self) -> int:
        return len(self.centroids)

    def internal_coordinates(self) -> dict:
        """Per code: virtual bond length (A), bond angle and dihedral (degrees)."""
        C = self.centroids
        angle = np.degrees(np.arccos(np.clip(-C[:, 0] / np.maximum(self._norm, _EPS), -1, 1)))
        # dihedral x[i-3],x[i-2],x[i-1],x[i] (IUPAC sign; ~ +50 in an alpha helix, ~ -170 in a strand)
        dihedral = np.degrees(np.arctan2(C[:, 2], C[:, 1]))
        return {"bond": self._norm.copy(), "angle": angle, "dihedral": dihedral}

    def segments(self, codes) -> np.ndarray:
        """bool [L]: True where a decoded segment starts (a code >= K, and position 0)."""
        c = np.asarray(codes, dtype=np.int64)
        st = c >= self.K
        if len(c):
            st[0] = True
        return st

    # ---- decoding
    def decode_many(self, code_lists: Sequence, batch: int = 256) -> list[np.ndarray]:
        """C-alpha traces float32 [L,3] of code sequences (vectorised over sequences of similar length)."""
        codes = [np.asarray(c, dtype=np.int64) for c in code_lists]
        out: list[np.ndarray | None] = [None] * len(codes)
        order = sorted(range(len(codes)), key=lambda j: -len(codes[j]))
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            for j, x in zip(idx, self._decode_batch([codes[j] for j in idx])):
                out[j] = x
        return out  # type: ignore[return-value]

    def _decode_batch(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        n = np.array([len(c) for c in codes], dtype=np.int64)
        B, Lmax = len(codes), int(n.max()) if len(codes) else 0
        cm = np.zeros((B, Lmax), dtype=np.int64)
        seg = np.full((B, Lmax), -1, dtype=np.int64)
        for b, c in enumerate(codes):
            cm[b, :len(c)] = c
            seg[b, :len(c)] = segment_positions(self.segments(c))
        xs = np.zeros((B, Lmax, 3))
        hist = np.zeros((B, 3, 3))
        for i in range(Lmax):
            act = np.flatnonzero(i < n)
            x = self._place(hist[act], seg[act, i], np.minimum(cm[act, i], self.K - 1), i)
            xs[act, i] = x
            hist[act] = np.concatenate([hist[act, 1:], x[:, None]], axis=1)
        return [xs[b, :n[b]].astype(np.float32) for b in range(B)]

    def _place(self, hist: np.ndarray, p: np.ndarray, k: np.ndarray, i: int) -> np.ndarray:
        """Decoded position of the current residue for rows with history `hist` (last three
        decoded positions), segment position `p` and code `k` (ignored where p == 0)."""
        x = np.empty((len(p), 3))
        m = p == 0
        if m.any():
            x[m] = hist[m, 2] + [GAP_OFFSET, 0.0, 0.0] if i > 0 else 0.0
        m = p == 1
        if m.any():
            x[m] = hist[m, 2]
            x[m, 0] += self._norm[k[m]]
        m = p == 2
        if m.any():
            x[m] = hist[m, 2]
            x[m, 0] += self.centroids[k[m], 0]
            x[m, 1] += self._rho[k[m]]
        m = p >= 3
        if m.any():
            F = frames(hist[m, 0], hist[m, 1], hist[m, 2])
            x[m] = hist[m, 2] + from_local(F, self.centroids[k[m]])
        return x

    # ---- closed-loop (beam) encoding
    def encode_many(self, cas: Sequence[np.ndarray], gaps: Sequence | None = None, beam: int = 1,
                    batch: int = 256) -> list[np.ndarray]:
        """Code sequences int64 [L] of chains (vectorised over chains of similar length)."""
        gaps = [None] * len(cas) if gaps is None else gaps
        preps = [prepare(ca, g) for ca, g in zip(cas, gaps)]
        out: list[np.ndarray | None] = [None] * len(preps)
        order = sorted(range(len(preps)), key=lambda j: -len(preps[j][0]))
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            for j, codes in zip(idx, self._encode_batch([preps[j] for j in idx], beam)):
                out[j] = codes
        return out  # type: ignore[return-value]

    def _costs(self, hist: np.ndarray, p: int, target: np.ndarray) -> np.ndarray:
        """Squared placement error [R, K] of every code for rows at segment position p (>= 1)."""
        v = target - hist[:, 2]
        if p == 1:
            d = np.sqrt((v * v).sum(-1))
            return (self._norm[None, :] - d[:, None]) ** 2
        if p == 2:
            tx, ty = v[:, 0], np.hypot(v[:, 1], v[:, 2])
            return (self.centroids[None, :, 0] - tx[:, None]) ** 2 + (self._rho[None, :] - ty[:, None]) ** 2
        t = to_local(frames(hist[:, 0], hist[:, 1], hist[:, 2]), v)
        return np.maximum(self._c2[None, :] - 2.0 * t @ self.centroids.T + (t * t).sum(-1)[:, None], 0.0)

    def _encode_batch(self, preps, beam: int) -> list[np.ndarray]:
        """Closed-loop (beam) search over a batch of prepared chains; returns their codes."""
        W, B, K = max(1, int(beam)), len(preps), self.K
        n = np.array([len(y) for y, _ in preps], dtype=np.int64)
        Lmax = int(n.max()) if B else 0
        Y = np.zeros((B, Lmax, 3))
        P = np.full((B, Lmax), -1, dtype=np.int64)
        for b, (y, sp) in enumerate(preps):
            Y[b, :len(y)] = y
            P[b, :len(y)] = sp
        R = B * W                                   # rows: chain b, beam w -> row b*W + w
        hist, anchor, cost = np.zeros((R, 3, 3)), np.zeros((R, 3)), np.zeros(R)
        cost.reshape(B, W)[:, 1:] = np.inf          # all beams start as copies of beam 0
        codes_t = np.zeros((Lmax, R), dtype=np.int64)
        parent_t = np.zeros((Lmax, R), dtype=np.int64)
        rows_of = np.arange(R).reshape(B, W)
        for i in range(Lmax):
            chains = np.flatnonzero(i < n)
            if W == 1:
                # the greedy case, vectorised without bookkeeping: chains inside a segment (p >= 3)
                inner = P[chains, i] >= 3
                full = chains[inner]
                if len(full):
                    h = hist[full]
                    F = frames(h[:, 0], h[:, 1], h[:, 2])
                    t = to_local(F, Y[full, i] + anchor[full] - h[:, 2])
                    k = np.argmin(self._c2[None, :] - 2.0 * t @ self.centroids.T, axis=1)
                    hist[full, 0], hist[full, 1] = h[:, 1], h[:, 2]
                    hist[full, 2] = h[:, 2] + from_local(F, self.centroids[k])
                    codes_t[i, full] = k
                parent_t[i] = np.arange(R)
                chains = chains[~inner]
                if not len(chains):
                    continue
            parent = np.arange(R)
            code = np.zeros(R, dtype=np.int64)
            for pv in np.unique(np.minimum(P[chains, i], 3)):
                cb = chains[np.minimum(P[chains, i], 3) == pv]
                rows = rows_of[cb].ravel()
                if pv == 0:   # a segment starts: fixed placement, no choice
                    anchor[rows] = (hist[rows, 2] + [GAP_OFFSET, 0.0, 0.0]) if i > 0 else 0.0
                    code[rows] = K if i == 0 else K + 1
                    continue
                target = Y[np.repeat(cb, W), i] + anchor[rows]
                c = self._costs(hist[rows], int(pv), target) + cost[rows][:, None]   # [len(cb)*W, K]
                if W == 1:
                    code[rows] = np.argmin(c, axis=1)
                    continue
                c = c.reshape(len(cb), W * K)
                m = min(W, c.shape[1])
                top = np.argpartition(c, m - 1, axis=1)[:, :m]
                topc = np.take_along_axis(c, top, 1)
                o = np.argsort(topc, axis=1, kind="stable")
                top = np.take_along_axis(top, o, 1)
                cost[rows] = np.take_along_axis(topc, o, 1).ravel()
                parent[rows] = (cb[:, None] * W + top // K).ravel()
                code[rows] = (top % K).ravel()
            if W > 1:   # move beam state along the chosen parents, then place the chosen codes
                hist, anchor = hist[parent], anchor[parent]
            live = rows_of[chains].ravel()
            pos = np.minimum(P[live // W, i], 3)
            x = self._place(hist[live], pos, np.minimum(code[live], K - 1), i)
            hist[live] = np.concatenate([hist[live, 1:], x[:, None]], axis=1)
            codes_t[i, live], parent_t[i] = code[live], parent
        out = []
        for b in range(B):   # backtrack the best beam of each chain
            r = int(rows_of[b, int(np.argmin(cost.reshape(B, W)[b]))])
            c = np.empty(int(n[b]), dtype=np.int64)
            for i in range(int(n[b]) - 1, -1, -1):
                c[i] = codes_t[i, r]
                r = int(parent_t[i, r])
            out.append(c)
        return out

    # ---- fitting
    @classmethod
    def fit(cls, chains: Iterable[tuple[np.ndarray, np.ndarray | None]], K: int, seed: int = 0,
            max_residues: int = 1_000_000, refine_iters: int = 3, beam: int = 1
            ) -> tuple["PlacementCodebook", list[np.ndarray], list[float]]:
        """Learn K codes from (ca, gap_before) pairs of TRAIN chains; returns (codebook, the chains'
        closed-loop codes under it, RMS step error after k-means and after each refinement).

        1. k-means (k-means++ init, `seed`) on the local-frame vectors of the true chains
           (at most `max_residues`, a seeded sample when there are more);
        2. `refine_iters` closed-loop Lloyd steps: encode the chains with the current codebook and
           move each code to the mean of the targets it was chosen for (the true residue in the
           decoded frame, which is what the closed loop actually quantises).
        """
        from sklearn.cluster import KMeans

        chains = [(np.asarray(ca, np.float64), g) for ca, g in chains]
        chains = [(ca, g) for ca, g in chains if len(ca) and np.isfinite(ca).all()]
        rng = np.random.default_rng(seed)
        local = [_true_local(ca, g) for ca, g in chains]
        X = np.concatenate(local) if local else np.zeros((0, 3))
        if len(X) < K:
            raise ValueError(f"{len(X)} residue placements to fit K={K} geo codes; need at least K")
        if len(X) > max_residues:
            X = X[rng.choice(len(X), max_residues, replace=False)]
        cb = cls(KMeans(n_clusters=K, n_init=1, random_state=seed, max_iter=100).fit(X).cluster_centers_)
        targets, codes, err, all_codes = _closed_loop(cb, chains, beam)
        hist = [err]
        log.info("placement codes K=%d: k-means on %d placements, closed-loop RMS step error %.3f A", K, len(X), err)
        for it in range(refine_iters):
            if len(targets) > max_residues:
                sel = rng.choice(len(targets), max_residues, replace=False)
                targets, codes = targets[sel], codes[sel]
            sums = np.zeros((K, 3))
            np.add.at(sums, codes, targets)
            cnt = np.bincount(codes, minlength=K)
            C = cb.centroids.copy()
            used = cnt > 0
            C[used] = sums[used] / cnt[used, None]
            cb = cls(C)
            targets, codes, err, all_codes = _closed_loop(cb, chains, beam)
            hist.append(err)
            log.info("placement codes refine %d/%d: closed-loop RMS step error %.3f A (%d codes were unused)",
                     it + 1, refine_iters, err, int((~used).sum()))
        return cb, all_codes, hist


# ----------------------------------------------------------------------------- fit helpers
def _true_local(ca: np.ndarray, gap_before) -> np.ndarray:
    """Local-frame vectors of every residue at segment position >= 3, from the true chain."""
    p = segment_positions(segment_starts(ca, gap_before))
    i = np.flatnonzero(p >= 3)
    if not len(i):
        return np.zeros((0, 3))
    return to_local(frames(ca[i - 3], ca[i - 2], ca[i - 1]), ca[i] - ca[i - 1])


def _closed_loop(cb: PlacementCodebook, chains, beam: int = 1):
    """Closed-loop encode `chains`; returns (targets [N,3], codes [N]) of every residue at segment
    position >= 3 (the true residue in the frame of the decoded chain), the RMS distance of all decoded
    residues from their true positions (canonical pose, no superposition) and all code sequences."""
    all_codes = cb.encode_many([c for c, _ in chains], [g for _, g in chains], beam=beam)
    dec = cb.decode_many(all_codes)
    T, Kc, se, n = [], [], 0.0, 0
    for (ca, g), c, xh in zip(chains, all_codes, dec):
        y, p = prepare(ca, g)
        xh = xh.astype(np.float64)
        starts = p == 0
        truth = y + xh[np.flatnonzero(starts)][np.cumsum(starts) - 1]     # + the anchor of each segment
        se += float(((truth - xh) ** 2).sum())
        n += len(y)
        i = np.flatnonzero(p >= 3)
        if len(i):
            T.append(to_local(frames(xh[i - 3], xh[i - 2], xh[i - 1]), truth[i] - xh[i - 1]))
            Kc.append(c[i])
    if not T:
        return np.zeros((0, 3)), np.zeros(0, np.int64), 0.0, all_codes
    return np.concatenate(T), np.concatenate(Kc), float(np.sqrt(se / max(n, 1))), all_codes
