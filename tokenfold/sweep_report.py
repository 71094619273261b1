"""The collect step of a sweep (`tokenfold.sweep`): the cells' numbers, the scaling-law fit and its
projection per token set, the plots, and (with several token sets) the token kinds side by side.

Per token set with at least two sizes and two fractions: L(N, D) fitted to the cells' held-out loss
(`tokenfold.scaling_fit`: N = non-embedding parameters, D = training tokens seen, L = ln of stage
06's perplexity on the evaluated split, nats per structure token), then the data size at which
free-running accuracy would pass the windowed baseline (the best baseline when there is no windowed
one). The baselines drawn and used are those of the fraction-1 cells (fitted on the whole train
split by stage 06). Files: data/README.md, section ``sweeps/<name>/``.
"""
from __future__ import annotations

import logging

import numpy as np
from matplotlib import colormaps

from .artifacts import read_json, write_text_atomic
from .report import save_figure, subplots, write_report
from .scaling_fit import FitError, fit_law, project

log = logging.getLogger("tokenfold.sweep")

TSV_COLUMNS = ("cell", "tokens_set", "kind", "size", "fraction", "N", "N_total", "D", "train_examples", "epochs_seen",
               "loss", "val_loss_stage05", "accuracy", "teacher_forced_accuracy", "train_seconds", "eval_seconds")


def collect(sw, n_boot: int = 200) -> dict:
    """Read every cell's result, fit, plot, write report.json (last); returns the report."""
    missing = [c.name for c in sw.cells if not sw.done(c)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(sw.cells)} cells have no result yet (first: {missing[0]}); "
                                "run the cell phase (or wait for the array) first")
    recs = [read_json(sw.result_path(c)) for c in sw.cells]
    write_text_atomic(sw.dir / "cells.tsv", cells_tsv(recs))
    report = {"stage": "sweep", "sweep": sw.describe(), "cells": recs, "sets": {}, "files": ["cells.tsv"]}
    for t in sw.tokens:
        cells = [r for r in recs if r["tokens_set"] == t.name]
        sec = scaling_section(cells, n_boot)
        if "fit_object" in sec:
            fit = sec.pop("fit_object")
            report["files"] += [save_scaling_plot(sw.dir / f"scaling_{t.name}.png", cells, fit, sec).name,
                                save_projection_plot(sw.dir / f"projection_{t.name}.png", cells, fit, sec).name]
        report["sets"][t.name] = sec
    if len(sw.tokens) > 1:
        from .token_compare import compare, write_tables

        table = compare(sw.tokens, recs, split=_eval_split(recs))
        report["token_kinds"] = table
        report["files"] += write_tables(sw.dir, table)
    report["summary"] = summary(report)
    write_report(sw.dir / "report.json", report)
    log.info("sweep report: %s", sw.dir / "report.json")
    return report


def _eval_split(recs) -> str:
    splits = {r["eval_split"] for r in recs}
    return splits.pop() if len(splits) == 1 else "val"


def cells_tsv(recs) -> str:
    base = sorted({b for r in recs for b in r["baselines"]})
    lines = ["\t".join([*TSV_COLUMNS, *(f"base_{b}" for b in base)])]
    for r in recs:
        row = [r.get(k) for k in TSV_COLUMNS] + [r["baselines"].get(b) for b in base]
        lines.append("\t".join(f"{v:.5g}" if isinstance(v, float) else str(v) for v in row))
    return "\n".join(lines) + "\n"


def full_data_baselines(cells) -> dict:
    """The baselines of the largest-fraction cells (the same train split for every size)."""
    top = max(r["fraction"] for r in cells)
    rows = [r["baselines"] for r in cells if r["fraction"] == top]
    return {b: float(np.mean([x[b] for x in rows])) for b in rows[0]} if rows else {}


def scaling_section(cells, n_boot: int) -> dict:
    """Fit and projection of one token set's cells (a reason instead when they cannot be fitted)."""
    N, D, L, acc = (np.array([r[k] for r in cells], float) for k in ("N", "D", "loss", "accuracy"))
    base = full_data_baselines(cells)
    target_name = "window" if "window" in base else (max(base, key=base.get) if base else None)
    sec = {"n_cells": len(cells), "baselines_full_data": base, "target_baseline": target_name,
           "best_cell": max(cells, key=lambda r: r["accuracy"])["cell"] if cells else None}
    try:
        fit = fit_law(N, D, L, n_boot=n_boot)
    except FitError as e:
        sec["fit"] = {"status": f"not fitted: {e}"}
        return sec
    sec["fit"] = {"status": "ok", **fit.to_dict()}
    sec["fit_object"] = fit
    if target_name is not None:
        proj = project(fit, L, acc, base[target_name], sorted(set(N)))
        full = next(r for r in cells if r["fraction"] == max(c["fraction"] for c in cells))
        per_chain = full["D"] / max(full["train_examples"], 1)      # tokens seen per train chain (epochs included)
        for row in proj["per_N"]:
            row["train_chains_at_sweep_epochs"] = row["D_star"] / per_chain if np.isfinite(row["D_star"]) else None
        proj["tokens_seen_per_train_chain"] = per_chain
        proj["note"] = ("D_star in training tokens seen (amino acids + structure tokens); train chains = D_star / "
                        "tokens seen per chain of the fraction-1 cells (their epochs). Accuracy from loss by a "
                        "straight line over the cells, extrapolated.")
        sec["projection"] = proj
    return sec


def summary(report: dict) -> dict:
    out = {"dir": report["sweep"]["dir"], "cells": len(report["cells"]),
           "train_seconds": round(sum(r["train_seconds"] for r in report["cells"]), 1),
           "eval_seconds": round(sum(r["eval_seconds"] for r in report["cells"]), 1)}
    for name, sec in report["sets"].items():
        s = {"fit": sec["fit"]["status"]}
        if sec["fit"]["status"] == "ok":
            p, b = sec["fit"]["params"], sec["fit"]["bootstrap"]["intervals"]
            s["params"] = {k: [round(p[k], 4), *(round(b[k][q], 4) for q in ("p16", "p84"))] if k in b else round(p[k], 4)
                           for k in p}
            s["params_note"] = "best fit, 16th and 84th bootstrap percentiles"
        if "projection" in sec:
            pr = sec["projection"]
            s["projection"] = pr["status"] if pr["status"] != "ok" else {
                f"N={row['N']:.3g}": f"D*={row['D_star']:.3g} tokens" for row in pr["per_N"]}
        s["baselines_full_data"] = sec["baselines_full_data"]
        s["best_cell"] = sec["best_cell"]
        out[name] = s
    return out


# ----------------------------------------------------------------------------- plots
_BASE_STYLE = {"most_frequent": ":", "per_aa": "--", "window": "-."}


def _baseline_lines(ax, base: dict) -> None:
    for b, v in base.items():
        ax.axhline(v, color="grey", ls=_BASE_STYLE.get(b, "-"), lw=1, label=f"baseline {b} {v:.3f}")


def save_scaling_plot(path, cells, fit, sec):
    """Loss and free-running accuracy against N and against D; fitted curves; baselines as lines."""
    fig, ax = subplots(4, ncols=2, size=5.0)
    base = sec["baselines_full_data"]
    groups = {"fraction": sorted({r["fraction"] for r in cells}), "size": sorted({r["size"] for r in cells},
                                                                                 key=lambda s: [int(x) for x in s.split("x")])}
    cmap = {k: colormaps["viridis"](np.linspace(0, 0.9, len(v))) for k, v in groups.items()}
    for row, (y, ylab) in enumerate((("loss", "held-out loss (nats / structure token)"), ("accuracy", "free-running accuracy"))):
        for col, (x, other) in enumerate((("N", "fraction"), ("D", "size"))):
            a = ax[2 * row + col]
            for j, g in enumerate(groups[other]):
                pts = sorted((r for r in cells if r[other] == g), key=lambda r: r[x])
                xs, ys = [r[x] for r in pts], [r[y] for r in pts]
                a.plot(xs, ys, "o", color=cmap[other][j], label=f"{other} {g}")
                if y == "loss" and pts:
                    grid = np.geomspace(min(r[x] for r in cells) / 1.5, max(r[x] for r in cells) * 1.5, 60)
                    fixed = np.mean([r["D" if x == "N" else "N"] for r in pts])
                    curve = fit.predict(grid, fixed) if x == "N" else fit.predict(fixed, grid)
                    a.plot(grid, curve, "-", color=cmap[other][j], lw=1)
            if y == "accuracy":
                _baseline_lines(a, base)
            a.set_xscale("log")
            a.set_xlabel("non-embedding parameters N" if x == "N" else "training tokens seen D")
            a.set_ylabel(ylab)
            a.legend(fontsize=7)
    p = fit.params
    fig.suptitle(f"L = {p['E']:.3f} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}  "
                 f"(RMS log residual {fit.rms_log_residual:.3f}, {fit.n_points} cells)", fontsize=10)
    return save_figure(fig, path)


def save_projection_plot(path, cells, fit, sec):
    """Left: accuracy against loss with the straight line and the target; right: loss against D
    extrapolated for each N and N = inf, with the target loss and D*."""
    fig, ax = subplots(2, ncols=2, size=5.0)
    proj = sec.get("projection", {})
    L = np.array([r["loss"] for r in cells])
    acc = np.array([r["accuracy"] for r in cells])
    ax[0].plot(L, acc, "o", label="cells")
    m = proj.get("accuracy_vs_loss", {})
    if np.isfinite(m.get("c1", np.nan)):
        xs = np.linspace(min(L.min(), proj.get("target_loss", L.min())) - 0.05, L.max() + 0.05, 50)
        ax[0].plot(xs, m["c0"] + m["c1"] * xs, "-", lw=1, label=f"acc = {m['c0']:.3f} + {m['c1']:.3f} L (r {m['r']:.2f})")
    if "target_accuracy" in proj:
        ax[0].axhline(proj["target_accuracy"], color="grey", ls="-.", label=f"{sec['target_baseline']} baseline")
    ax[0].set_xlabel("held-out loss L")
    ax[0].set_ylabel("free-running accuracy")
    ax[0].legend(fontsize=7)
    Ds = [r["D"] for r in cells]
    finite = [row["D_star"] for row in proj.get("per_N", []) if np.isfinite(row["D_star"])]
    grid = np.geomspace(min(Ds) / 2, max([max(Ds) * 100, *[d * 3 for d in finite]]), 100)
    for row in proj.get("per_N", []) or [{"N": n} for n in sorted({r["N"] for r in cells})] + [{"N": float("inf")}]:
        N = row["N"]
        y = fit.predict(N, grid) if np.isfinite(N) else fit.params["E"] + fit.params["B"] / grid ** fit.params["beta"]
        ax[1].plot(grid, y, lw=1, label=f"N = {N:.3g}" if np.isfinite(N) else "N = inf")
    ax[1].plot(Ds, L, "ko", ms=3, label="cells")
    if "target_loss" in proj:
        ax[1].axhline(proj["target_loss"], color="grey", ls="-.", label=f"target loss {proj['target_loss']:.3f}")
        for d in finite:
            ax[1].axvline(d, color="red", lw=0.5)
    ax[1].set_xscale("log")
    ax[1].set_xlabel("training tokens seen D")
    ax[1].set_ylabel("loss (fit, extrapolated)")
    ax[1].legend(fontsize=7)
    fig.suptitle(proj.get("status", "no projection") if proj.get("status") != "ok" else
                 "where free-running accuracy would pass the baseline (red: D*)", fontsize=10)
    return save_figure(fig, path)
