"""The scaling law of a sweep: L(N, D) = E + A / N^alpha + B / D^beta, its uncertainty, and a projection.

This is the form Cheng et al. 2024 ("Training compute-optimal protein language models") fitted for
protein LMs, after Hoffmann et al. 2022: N = non-embedding parameters, D = training tokens seen, L =
held-out loss (nats per structure token). The fit follows Hoffmann et al.: with E = e^e, A = e^a,
B = e^b the model is ``log L = logsumexp(e, a - alpha log N, b - beta log D)``, fitted to log L by
least squares from a grid of 18 starting points (`scipy.optimize.least_squares`, analytic Jacobian),
bounded: 0 < E < min(L), 0 <= alpha, beta <= 3. Hoffmann et al. used a Huber loss (delta 1e-3); on a
dozen points it took ten times the iterations here for the same parameters, so the loss is plain
least squares and the bootstrap below is the guard against single bad cells.

Five parameters from a dozen points are fragile, so the fit comes with its uncertainty: a residual
bootstrap (the fitted log-losses plus resampled log residuals, scaled by sqrt(n / (n - 5)) for the
degrees of freedom the fit used, refit `n_boot` times) gives
percentile intervals of every parameter and of the projection. Fewer than 6 points leave no degree
of freedom: no fit (`fit_law` raises `FitError`).

Projection (`project`): the D at which free-running accuracy would pass a target (the windowed
baseline). Accuracy is mapped from loss by a straight line fitted over the sweep's cells
(acc = c0 + c1 L; needs c1 < 0: lower loss, higher accuracy); the target loss L* = (target - c0) / c1
is then solved for D at each N: D* = (B / (L* - E - A / N^alpha))^(1 / beta), unreachable when L* is
below what that N can reach at infinite data (E + A / N^alpha). The line is an extrapolation beyond
the observed losses; the bootstrap interval covers the fit's noise, not that assumption.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

PARAMS = ("E", "A", "alpha", "B", "beta")
MIN_POINTS = 6


class FitError(ValueError):
    """The points cannot determine the law (too few, or N or D not varied)."""


def law(N, D, E, A, alpha, B, beta):
    """E + A / N^alpha + B / D^beta."""
    return E + A / np.asarray(N, float) ** alpha + B / np.asarray(D, float) ** beta


def _log_pred(x: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    e, a, alpha, b, beta = x
    return np.logaddexp(e, np.logaddexp(a - alpha * logN, b - beta * logD))


def _jac(x: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    """d log L_hat / d (e, a, alpha, b, beta): the softmax weights of the three terms."""
    e, a, alpha, b, beta = x
    t = np.stack([np.full_like(logN, e), a - alpha * logN, b - beta * logD], axis=1)
    w = np.exp(t - t.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return np.stack([w[:, 0], w[:, 1], -w[:, 1] * logN, w[:, 2], -w[:, 2] * logD], axis=1)


def _to_params(x: np.ndarray) -> dict:
    return {"E": float(np.exp(x[0])), "A": float(np.exp(x[1])), "alpha": float(x[2]),
            "B": float(np.exp(x[3])), "beta": float(x[4])}


def _solve(logN, logD, logL, starts) -> tuple[np.ndarray, float]:
    """Best least-squares solution over `starts` (vectors e, a, alpha, b, beta): (x, cost)."""
    from scipy.optimize import least_squares

    hi_e = float(logL.min()) - 1e-9
    lo = np.array([-30.0, -30.0, 0.0, -30.0, 0.0])
    hi = np.array([hi_e, 80.0, 3.0, 80.0, 3.0])
    best, best_cost = None, np.inf
    for x0 in starts:
        x0 = np.clip(np.asarray(x0, float), lo + 1e-6, hi - 1e-6)
        try:
            r = least_squares(lambda x: _log_pred(x, logN, logD) - logL, x0, jac=lambda x: _jac(x, logN, logD),
                              bounds=(lo, hi), x_scale="jac", max_nfev=500)
        except (ValueError, FloatingPointError):
            continue
        if r.cost < best_cost:
            best, best_cost = r.x, float(r.cost)
    if best is None:
        raise FitError("the least-squares fit failed from every starting point")
    return best, best_cost


def _starts(logN, logD, logL) -> list[np.ndarray]:
    """A grid of starting points, with A and B scaled so each term starts near a share of the data."""
    Lmin = float(np.exp(logL.min()))
    mN, mD = float(np.median(logN)), float(np.median(logD))
    out = []
    for frac_e, alpha, beta in itertools.product((0.3, 0.8), (0.2, 0.5, 1.0), (0.2, 0.5, 1.0)):
        E = frac_e * Lmin
        rest = max(float(np.exp(logL).mean()) - E, 1e-3)
        out.append(np.array([np.log(E), np.log(rest / 2) + alpha * mN, alpha, np.log(rest / 2) + beta * mD, beta]))
    return out


@dataclass
class Fit:
    params: dict                      # E, A, alpha, B, beta (best fit)
    n_points: int
    rms_log_residual: float           # RMS of log L - log L_hat
    residuals: list = field(default_factory=list)
    bootstrap: dict = field(default_factory=dict)   # param -> {p2.5, p16, p50, p84, p97.5}
    boot_params: np.ndarray | None = None           # [n_ok, 5] (E, A, alpha, B, beta) of the bootstrap fits
    n_boot: int = 0
    n_boot_failed: int = 0

    def predict(self, N, D, params: dict | None = None):
        p = params or self.params
        return law(N, D, *(p[k] for k in PARAMS))

    def to_dict(self) -> dict:
        return {"law": "L(N, D) = E + A / N^alpha + B / D^beta", "params": self.params, "n_points": self.n_points,
                "rms_log_residual": self.rms_log_residual, "log_residuals": self.residuals,
                "bootstrap": {"method": "residual bootstrap in log space (residuals x sqrt(n/(n-5))), percentiles", "n": self.n_boot,
                              "failed": self.n_boot_failed, "intervals": self.bootstrap},
                "loss": "least squares on log L"}


def fit_law(N, D, L, n_boot: int = 200, seed: int = 0) -> Fit:
    """Fit the law to points (N, D, L); see the module docstring."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    if not (len(N) == len(D) == len(L)):
        raise FitError("N, D and L differ in length")
    ok = np.isfinite(N) & np.isfinite(D) & np.isfinite(L) & (N > 0) & (D > 0) & (L > 0)
    N, D, L = N[ok], D[ok], L[ok]
    if len(L) < MIN_POINTS:
        raise FitError(f"{len(L)} points cannot determine 5 parameters with a residual (need >= {MIN_POINTS})")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise FitError(f"N takes {len(np.unique(N))} and D {len(np.unique(D))} distinct values; both must vary "
                       "(a sweep whose cells all see the same tokens, e.g. a fixed --max-steps, cannot fit D)")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    x, _ = _solve(logN, logD, logL, _starts(logN, logD, logL))
    fitted = _log_pred(x, logN, logD)
    res = logL - fitted
    fit = Fit(_to_params(x), len(L), float(np.sqrt(np.mean(res ** 2))), [float(r) for r in res])
    rng = np.random.default_rng(seed)
    boots, failed = [], 0
    pool = res * np.sqrt(len(res) / (len(res) - len(PARAMS)))   # fitted residuals are too small by the dof used
    for _ in range(n_boot):
        yb = fitted + rng.choice(pool, size=len(res), replace=True)
        try:
            xb, _ = _solve(logN, logD, yb, [x, *_starts(logN, logD, yb)[::9]])
        except FitError:
            failed += 1
            continue
        boots.append([np.exp(xb[0]), np.exp(xb[1]), xb[2], np.exp(xb[3]), xb[4]])
    fit.n_boot, fit.n_boot_failed = n_boot, failed
    if boots:
        fit.boot_params = np.array(boots)
        fit.bootstrap = {k: percentiles(fit.boot_params[:, j]) for j, k in enumerate(PARAMS)}
    return fit


def percentiles(v) -> dict:
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {}
    q = np.percentile(v, [2.5, 16, 50, 84, 97.5])
    return dict(zip(("p2.5", "p16", "p50", "p84", "p97.5"), (float(x) for x in q)))


# ----------------------------------------------------------------------------- the projection
def accuracy_map(loss, acc) -> dict:
    """acc = c0 + c1 * loss, least squares over the cells, with Pearson's r."""
    loss, acc = np.asarray(loss, float), np.asarray(acc, float)
    if len(loss) < 2 or np.ptp(loss) == 0:
        return {"c0": float("nan"), "c1": float("nan"), "r": float("nan"), "n": int(len(loss))}
    if np.ptp(acc) == 0:                     # every cell the same accuracy (e.g. all collapsed to one token)
        return {"c0": float(acc[0]), "c1": 0.0, "r": 0.0, "n": int(len(loss))}
    c1, c0 = np.polyfit(loss, acc, 1)
    r = float(np.corrcoef(loss, acc)[0, 1])
    return {"c0": float(c0), "c1": float(c1), "r": r, "n": int(len(loss))}


def data_needed(params: dict, N, target_loss: float) -> float:
    """D at which L(N, D) = target_loss (N = inf: no parameter term); inf when unreachable at that N."""
    floor = params["E"] + (0.0 if not np.isfinite(N) else params["A"] / float(N) ** params["alpha"])
    gap = target_loss - floor
    if not np.isfinite(target_loss) or gap <= 0:
        return float("inf")
    return float((params["B"] / gap) ** (1.0 / params["beta"]))


def project(fit: Fit, loss, acc, target: float, Ns) -> dict:
    """The data size at which free-running accuracy would reach `target` (module docstring), for each N
    in `Ns` and N = inf; with bootstrap intervals (the accuracy line refit on the same resampled cells)."""
    amap = accuracy_map(loss, acc)
    out = {"target_accuracy": float(target), "accuracy_vs_loss": amap, "per_N": []}
    if not np.isfinite(amap["c1"]) or amap["c1"] >= 0:
        out["status"] = ("no projection: free-running accuracy does not rise as the loss falls across these cells "
                         f"(slope {amap['c1']:.3g} per nat)")
        return out
    L_star = (target - amap["c0"]) / amap["c1"]
    out["target_loss"] = float(L_star)
    rng = np.random.default_rng(1)
    loss, acc = np.asarray(loss, float), np.asarray(acc, float)
    boot_L = []
    for _ in range(fit.n_boot):   # the accuracy line's own uncertainty: resample the cells
        idx = rng.integers(0, len(loss), len(loss))
        m = accuracy_map(loss[idx], acc[idx])
        boot_L.append((target - m["c0"]) / m["c1"] if np.isfinite(m["c1"]) and m["c1"] < 0 else np.nan)
    for N in [*Ns, float("inf")]:
        row = {"N": float(N), "D_star": data_needed(fit.params, N, L_star)}
        if fit.boot_params is not None:
            ds = [data_needed(dict(zip(PARAMS, p)), N, lb) if np.isfinite(lb) else np.inf
                  for p, lb in zip(fit.boot_params, boot_L)]
            ds = np.array(ds)
            row["bootstrap"] = {"reachable_fraction": float(np.isfinite(ds).mean()), **percentiles(ds[np.isfinite(ds)])}
        out["per_N"].append(row)
    out["status"] = "ok"
    return out
