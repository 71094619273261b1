"""The hand-crafted "6D" structure tokens: binned C-alpha geometry, secondary structure and burial.

The ESM-2 k-means tokenizer that inspired stage 03 compares its learned codes with a hand-crafted
"6D" codebook of backbone dihedrals, secondary structure and neighbour density. The protein DB
stores only C-alpha coordinates (no N, C, O: no phi/psi), so this is that baseline as far as
C-alpha allows. Per residue i of a segment (a run of residues without a chain break):

* ``theta``   the virtual bond angle at i, between C-alpha i-1, i, i+1 (helix ~91 deg, strand ~120);
* ``tau``     the virtual dihedral of C-alpha i-1, i, i+1, i+2 (helix ~ +50 deg, strand ~ -170);
* ``ss``      a P-SEA-like secondary-structure estimate from C-alpha distances (Labesse et al. 1997):
              helix where two consecutive 5-residue windows have d(i,i+2), d(i,i+3), d(i,i+4) within
              5.5 +- 0.5, 5.3 +- 0.5, 6.4 +- 0.6 A; strand where two consecutive windows have them
              within 6.4 +- 0.6, 9.9 +- 0.9, 12.4 +- 1.1 A (and it is not helix); coil elsewhere;
* ``density`` the number of other C-alphas within 10 A (the whole chain, gaps included): < 14
              exposed, 14-19 intermediate, >= 20 buried (about the terciles of ../shared's train split).

The bins are fixed, written here, not fitted: tau in six 60-degree sectors centred on -120, -60, 0,
60, 120, 180 deg; theta < 100, 100-120, >= 120 deg. The angle state is 3 * tau bin + theta bin (18
states), 18 + theta bin where tau is undefined (the second-to-last residue of a segment), and 21 where
theta is undefined too (a segment's first and last residue). A code is::

    code = 9 * angle_state + 3 * ss + density_bin        (22 * 3 * 3 = 198 codes)

`decode` rebuilds a C-alpha trace from codes with each bin's centre and 3.8 A bonds (NeRF), open
loop: the error accumulates along the chain. It exists to measure how little of the coordinates such
a codebook keeps; stage 06 does not decode these tokens.
"""
from __future__ import annotations

import numpy as np

from .geotokens import segment_starts

VERSION = 1
TAU_CENTRES = np.array([-120.0, -60.0, 0.0, 60.0, 120.0, 180.0])   # degrees, 60-degree sectors
THETA_EDGES = np.array([100.0, 120.0])                              # degrees
THETA_CENTRES = np.array([91.0, 110.0, 124.0])                      # decode: typical helix / middle / strand
DENSITY_EDGES = np.array([14, 20])                                  # neighbours within RADIUS
RADIUS = 10.0
BOND = 3.8
SS_NAMES = ("coil", "helix", "strand")
N_ANGLE = len(TAU_CENTRES) * len(THETA_CENTRES) + len(THETA_CENTRES) + 1   # 22
N_CODES = N_ANGLE * len(SS_NAMES) * (len(DENSITY_EDGES) + 1)             # 198
HELIX = ((5.5, 0.5), (5.3, 0.5), (6.4, 0.6))    # d(i,i+2), d(i,i+3), d(i,i+4): centre, tolerance (A)
STRAND = ((6.4, 0.6), (9.9, 0.9), (12.4, 1.1))  # d(i,i+2), d(i,i+3), d(i,i+4)


def definition() -> dict:
    """What the codes mean (stored in the vocabulary's meta)."""
    return {"version": VERSION, "n_codes": N_CODES, "code": "9 * angle_state + 3 * ss + density_bin",
            "tau_centres_deg": TAU_CENTRES.tolist(), "theta_edges_deg": THETA_EDGES.tolist(),
            "ss": list(SS_NAMES), "density_radius_A": RADIUS, "density_edges": DENSITY_EDGES.tolist(),
            "angle_states": "3 * tau_bin + theta_bin (0-17); 18 + theta_bin: no tau; 21: no theta"}


def _within_segment(starts: np.ndarray, span: int) -> np.ndarray:
    """bool [L]: residues i..i+span all exist and lie in one segment."""
    L = len(starts)
    ok = np.zeros(L, bool)
    if L > span:
        seg = np.cumsum(starts)
        ok[:L - span] = seg[span:] == seg[:L - span]
    return ok


def angles(ca: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(theta [L], tau [L]) in degrees, NaN where undefined: theta_i from C-alpha i-1..i+1, tau_i from
    i-1..i+2, both only inside one segment."""
    x = np.asarray(ca, np.float64)
    L = len(x)
    theta, tau = np.full(L, np.nan), np.full(L, np.nan)
    if L < 3:
        return theta, tau
    ok3 = _within_segment(starts, 2)[:L - 2]                  # window i-1..i+1, indexed by i-1
    b1, b2 = x[1:-1] - x[:-2], x[2:] - x[1:-1]
    cos = -(b1 * b2).sum(1) / np.maximum(np.linalg.norm(b1, axis=1) * np.linalg.norm(b2, axis=1), 1e-9)
    theta[1:-1] = np.where(ok3, np.degrees(np.arccos(np.clip(cos, -1, 1))), np.nan)
    if L >= 4:
        ok4 = _within_segment(starts, 3)[:L - 3]
        a, b, c = b1[:-1], b2[:-1], b2[1:]
        n1, n2 = np.cross(a, b), np.cross(b, c)
        t = np.degrees(np.arctan2(np.linalg.norm(b, axis=1) * (a * n2).sum(1), (n1 * n2).sum(1)))
        tau[1:-2] = np.where(ok4, t, np.nan)
    return theta, tau


def secondary_structure(ca: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """uint8 [L]: 0 coil, 1 helix, 2 strand (the P-SEA-like rule of the module docstring)."""
    x = np.asarray(ca, np.float64)
    L = len(x)
    ss = np.zeros(L, np.uint8)

    def dist(k: int) -> np.ndarray:
        d = np.full(L, np.nan)
        if L > k:
            d[:L - k] = np.linalg.norm(x[k:] - x[:L - k], axis=1)
        return d

    def window(crit, span: int) -> np.ndarray:
        ok = _within_segment(starts, span)
        for k, (c, tol) in enumerate(crit, start=2):
            ok &= np.abs(np.nan_to_num(dist(k), nan=1e9) - c) <= tol
        return ok

    h = window(HELIX, 4)
    h2 = h & np.roll(h, -1) & (np.arange(L) < L - 1)          # two consecutive helical windows
    for s in np.flatnonzero(h2):
        ss[s:s + 6] = 1
    e = window(STRAND, 4)
    for s in np.flatnonzero(e & np.roll(e, -1) & (np.arange(L) < L - 1)):
        part = ss[s:s + 6]
        part[part == 0] = 2
    return ss


def neighbour_counts(ca: np.ndarray, radius: float = RADIUS) -> np.ndarray:
    """int [L]: other C-alphas within `radius` A of each one."""
    from scipy.spatial import cKDTree

    x = np.asarray(ca, np.float64)
    if len(x) == 0:
        return np.zeros(0, np.int64)
    return cKDTree(x).query_ball_point(x, radius, return_length=True).astype(np.int64) - 1


def encode(ca: np.ndarray, gap_before: np.ndarray | None = None) -> np.ndarray:
    """int64 codes [L] of a chain (C-alpha [L, 3]); chain breaks from `gap_before` and long bonds."""
    ca = np.asarray(ca, np.float64)
    if not np.isfinite(ca).all():
        raise ValueError("C-alpha coordinates contain NaN")
    starts = segment_starts(ca, gap_before)
    theta, tau = angles(ca, starts)
    tb = np.digitize(np.nan_to_num(theta), THETA_EDGES)
    sector = np.round(np.nan_to_num(tau) / 60.0).astype(np.int64) % 6     # 0, 60, 120, 180, -120, -60 deg
    tau_bin = np.array([2, 3, 4, 5, 0, 1])[sector]                       # index into TAU_CENTRES
    state = np.where(np.isnan(theta), N_ANGLE - 1, np.where(np.isnan(tau), 18 + tb, 3 * tau_bin + tb))
    dens = np.digitize(neighbour_counts(ca), DENSITY_EDGES)
    return (9 * state + 3 * secondary_structure(ca, starts).astype(np.int64) + dens).astype(np.int64)


def nerf(theta: np.ndarray, tau: np.ndarray, bond: np.ndarray) -> np.ndarray:
    """C-alpha trace [L, 3] from internal coordinates: bond[i] = |x_i - x_{i-1}| (i >= 1), theta[i] the
    angle at i (1..L-2), tau[i] the dihedral of i-1..i+2 (1..L-3), degrees; the inverse of `angles`."""
    L = len(bond)
    x = np.zeros((max(L, 0), 3))
    if L < 2:
        return x
    x[1] = [bond[1], 0.0, 0.0]
    if L >= 3:
        t = np.radians(theta[1])
        x[2] = x[1] + bond[2] * np.array([-np.cos(t), np.sin(t), 0.0])
    for i in range(3, L):
        a, b, c = x[i - 3], x[i - 2], x[i - 1]
        bc = (c - b) / np.linalg.norm(c - b)
        n = np.cross(b - a, bc)
        n /= max(np.linalg.norm(n), 1e-9)
        t, p = np.radians(theta[i - 1]), np.radians(tau[i - 2])
        d = np.array([-np.cos(t), np.sin(t) * np.cos(p), np.sin(t) * np.sin(p)])
        x[i] = c + bond[i] * (d[0] * bc + d[1] * np.cross(n, bc) + d[2] * n)
    return x


def decode(codes) -> np.ndarray:
    """C-alpha trace [L, 3] from codes: bin centres, 3.8 A bonds, open loop (see the module docstring).
    Where a code carries no tau (or theta), 180 deg (or the middle theta) stands in."""
    codes = np.asarray(codes, np.int64)
    state = codes // 9
    full = state < 18
    theta = np.where(state == N_ANGLE - 1, THETA_CENTRES[1], THETA_CENTRES[np.where(full, state % 3, (state - 18) % 3)])
    tau = np.where(full, TAU_CENTRES[np.minimum(state // 3, 5)], 180.0)
    return nerf(theta, tau, np.full(len(codes), BOND))
