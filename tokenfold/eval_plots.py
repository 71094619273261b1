"""Stage 06's pictures: token accuracy (struct2seq: sequence recovery) against length and the baselines,
the 3Di confusion matrix (struct2seq: the amino-acid substitution matrix), and for decodable kinds RMSD/TM-score against length, their distributions, and 3-D C-alpha traces.
Files: see data/README.md, section stage 06.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluate import TRACES
from .metrics import TRACE_METRICS, superpose


_TRACE_STYLE = {"pred": ("model", "C0"), "ceiling": ("tokenizer ceiling (true tokens)", "C2"),
                "base_most_frequent": ("baseline: most frequent token", "C7"),
                "base_per_aa": ("baseline: per-amino-acid token", "C1")}


def token_plots(out: Path, lengths, acc, base_acc: dict, tokens: dict, what: str = "token accuracy") -> list[Path]:
    """accuracy_vs_length.png: per-protein accuracy (`what`: token accuracy, sequence recovery) versus
    length (model and baselines), and the overall (per-residue) accuracies side by side."""
    from .report import save_figure, subplots

    fig, (a, b) = subplots(2, ncols=2, size=5.0)
    for k, (name, vals) in enumerate(base_acc.items()):
        a.scatter(lengths, vals, s=10, alpha=0.6, marker="x", color=f"C{k + 1}", label=f"baseline: {name}")
    a.scatter(lengths, acc, s=16, color="C0", label="model (constrained decoding)")
    a.set_xlabel("length (residues)")
    a.set_ylabel(what)
    a.set_ylim(0, 1)
    a.legend(fontsize=7)
    a.set_title(f"{what} per protein")
    names = ["model", "model\nteacher-forced"] + list(tokens["baselines"])
    vals = [tokens["accuracy"], tokens["teacher_forced_accuracy"]] + [d["accuracy"] for d in tokens["baselines"].values()]
    b.bar(range(len(vals)), vals, color=["C0", "C9"] + [f"C{k + 1}" for k in range(len(vals) - 2)])
    b.set_xticks(range(len(vals)), [n.replace("_", "\n") for n in names], fontsize=7)
    for x, y in enumerate(vals):
        b.text(x, y + 0.01, f"{y:.3f}", ha="center", fontsize=7)
    b.set_ylim(0, 1)
    b.set_title(f"per-residue {what} (all proteins)")
    return [save_figure(fig, out / "accuracy_vs_length.png")]


def confusion_plot(path: Path, cm: np.ndarray, letters, what: str = "3Di",
                   axes: tuple[str, str] = ("true", "predicted")) -> Path:
    """Row-normalised confusion matrix (rows: true letter, columns: predicted letter; struct2seq's
    substitution matrix: `what` = "amino acid", `axes` = native, designed)."""
    from .report import plt, save_figure

    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(letters)), letters)
    ax.set_yticks(range(len(letters)), [f"{c} ({n})" for c, n in zip(letters, cm.sum(1))], fontsize=7)
    ax.set_xlabel(f"{axes[1]} {what}")
    ax.set_ylabel(f"{axes[0]} {what} (residues)")
    title = "substitutions" if axes[0] == "native" else "confusion"
    ax.set_title(f"{what} {title} (row-normalised), accuracy {np.trace(cm) / max(cm.sum(), 1):.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def structure_plots(out: Path, lengths, tm: np.ndarray, P: dict, n_pictures: int) -> list[Path]:
    """rmsd_tm_vs_length.png and rmsd_tm_hist.png (every trace of `TRACES`), and ca_traces_3d.png: the
    predicted trace superposed on the truth for `n_pictures` proteins from best to worst TM-score."""
    from .report import plt, save_figure, subplots

    ir, it = TRACE_METRICS.index("rmsd"), TRACE_METRICS.index("tm")
    paths = []
    fig, axes = subplots(2, ncols=2, size=5.0)
    for ax, j, label in zip(axes, (ir, it), ("C-alpha RMSD (A)", "TM-score")):
        for t, name in enumerate(TRACES):
            if np.isfinite(tm[t, :, j]).any():
                ax.scatter(lengths, tm[t, :, j], s=12 if name == "pred" else 8, alpha=0.8 if name == "pred" else 0.5,
                           color=_TRACE_STYLE[name][1], label=_TRACE_STYLE[name][0])
        ax.set_xlabel("length (residues)")
        ax.set_ylabel(label)
        if j == it:
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.suptitle("structure versus length")
    paths.append(save_figure(fig, out / "rmsd_tm_vs_length.png"))

    fig, axes = subplots(2, ncols=2, size=5.0)
    for ax, j, label, rng in zip(axes, (ir, it), ("C-alpha RMSD (A)", "TM-score"), (None, (0, 1))):
        finite = tm[:, :, j][np.isfinite(tm[:, :, j])]
        if not len(finite):
            continue
        bins = np.linspace(*(rng or (0, float(finite.max()) + 1e-6)), 26)
        for t, name in enumerate(TRACES):
            v = tm[t, :, j][np.isfinite(tm[t, :, j])]
            if len(v):
                ax.hist(v, bins=bins, histtype="step", linewidth=1.6, color=_TRACE_STYLE[name][1],
                        label=f"{_TRACE_STYLE[name][0]} (median {np.median(v):.2f})")
        ax.set_xlabel(label)
        ax.set_ylabel("proteins")
        ax.legend(fontsize=7)
    fig.suptitle("distributions over the evaluated proteins")
    paths.append(save_figure(fig, out / "rmsd_tm_hist.png"))

    # 3-D pictures: best, median and worst TM-score (predicted superposed on the truth)
    tmv = tm[0, :, it]
    ok = np.flatnonzero(np.isfinite(tmv))
    if len(ok) and n_pictures > 0:
        order = ok[np.argsort(-tmv[ok], kind="stable")]
        pick = sorted({int(order[int(round(q * (len(order) - 1)))]) for q in np.linspace(0, 1, min(n_pictures, len(order)))},
                      key=lambda i: -tmv[i])
        fig = plt.figure(figsize=(4.6 * len(pick), 4.4))
        for k, i in enumerate(pick):
            ax = fig.add_subplot(1, len(pick), k + 1, projection="3d")
            true, pred = P["true_ca"][i].astype(np.float64), P["pred_ca"][i].astype(np.float64)
            moved = superpose(pred, true)
            c = true.mean(0)
            ax.plot(*(true - c).T, color="0.25", linewidth=1.4, label="true C-alpha")
            ax.plot(*(moved - c).T, color="C3", linewidth=1.2, alpha=0.85, label="predicted (superposed)")
            half = float(np.abs(true - c).max()) * 1.05
            ax.set_xlim(-half, half); ax.set_ylim(-half, half); ax.set_zlim(-half, half)  # noqa: E702
            ax.set_box_aspect((1, 1, 1))
            ax.set_title(f"{P['ids'][i]}  L={len(true)}\nTM {tmv[i]:.2f}  RMSD {tm[0, i, ir]:.1f} A", fontsize=8)
            ax.set_xticks([]); ax.set_yticks([]); ax.set_zticks([])  # noqa: E702
            if k == 0:
                ax.legend(fontsize=7, loc="upper left")
        paths.append(save_figure(fig, out / "ca_traces_3d.png"))
    return paths
