"""Stage 03, the run: fit the k-means codebook on stage-02 vectors of train residues, measure it, plot it.

Files: see data/README.md, section stage 03. The codebook format and its one assignment:
`tokenfold.codebook`; the fit and the quality numbers: `tokenfold.codebook_fit`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import read_json
from .cli import die, option
from .codebook import Codebook, sha256_path
from .codebook_fit import evaluate, fit_codebook

log = logging.getLogger("tokenfold.train_codebook")


@dataclass
class CodebookConfig:
    """Settings of stage 03; each field is a flag of 03_train_codebook.py (`tokenfold.cli.add_options`)."""
    embeddings: str | None = option(None, f"stage-02 output directory (default: the only one under "
                                          f"{layout.EMBEDDINGS})")
    db: str = option(str(layout.DB), "protein DB of stage 01")
    out: str = option(str(layout.CODEBOOK), "output directory")
    k: int = option(512, "number of codes")
    seed: int = option(0, "k-means and sampling seed")
    normalize: bool = option(False, "L2-normalise vectors before k-means (recorded; applied again by Codebook.assign)")
    max_train_residues: int | None = option(1_000_000, "train residues drawn (seeded, uniform) for k-means")
    max_val_residues: int | None = option(200_000, "val residues for the quality numbers")
    batch_size: int = option(4096, "MiniBatchKMeans batch size")
    max_iter: int = option(100, "MiniBatchKMeans passes over the data")
    n_init: int = option(3, "MiniBatchKMeans initialisations")
    overwrite: bool = option(False, "retrain even if the summary exists")

    @property
    def embeddings_dir(self) -> Path:
        """--embeddings, else the only finished stage-02 output (`find_embeddings`)."""
        return Path(self.embeddings) if self.embeddings else find_embeddings()


def find_embeddings(root: str | os.PathLike = layout.EMBEDDINGS) -> Path:
    """The only finished stage-02 output under `root`; an error naming the candidates otherwise."""
    root = Path(root)
    found = sorted(p.parent for p in root.glob("*/manifest.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no finished stage-02 output under {root} (run 02_extract_esm_embeddings.py)")
    raise FileNotFoundError(f"several embedding sets under {root}: {', '.join(p.name for p in found)}; "
                            "choose one with --embeddings")


def outputs(out: Path, k: int) -> dict[str, Path]:
    return {"codebook": out / f"codebook_K{k}.pkl", "summary": out / f"summary_K{k}.json",
            "pca": out / "clustering_visualization.png", "sizes": out / f"cluster_sizes_K{k}.png"}


def run_train_codebook(cfg: CodebookConfig) -> dict:
    from .db import ProteinDB
    from .embedding_store import EmbeddingStore
    from .esm_checkpoint import RANDOM_BANNER

    paths = outputs(Path(cfg.out), cfg.k)
    if paths["summary"].exists() and not cfg.overwrite:
        Codebook.load(paths["codebook"])   # refuses a damaged file rather than reporting "done"
        log.info("%s exists; nothing to do (use --overwrite to retrain)", paths["summary"])
        return read_json(paths["summary"])
    if cfg.overwrite:              # a fresh start: no stale artifacts beside the new ones
        for p in [*paths.values(), sha256_path(paths["codebook"])]:
            p.unlink(missing_ok=True)
    emb_dir = cfg.embeddings_dir
    store = EmbeddingStore(emb_dir)
    db = ProteinDB(cfg.db)
    random_weights = store.random_weights
    if random_weights:
        log.warning("!!! %s: made from a %s", emb_dir, RANDOM_BANNER)
    t0 = time.time()
    train = store.residues(db, "train", cfg.max_train_residues, cfg.seed)
    val = store.residues(db, "val", cfg.max_val_residues, cfg.seed)
    log.info("read %d train and %d val residue vectors (dim %d) from %s in %.1f s", len(train["emb"]),
             len(val["emb"]), store.dim, emb_dir, time.time() - t0)
    if len(val["emb"]) == 0:
        log.warning("no val residues: utilisation and NMI are reported on train residues instead")
    meta = {"esm_model": store.meta["model"], "esm_model_path": store.meta.get("model_path"),
            "layer": int(store.meta["layer"]), "dim": store.dim, "random_weights": random_weights,
            "embeddings_dir": str(emb_dir), "embeddings_mode": store.mode,
            # stage 04 embeds unseen chains on the fly: it must use the same long-sequence rule
            "esm_window": store.meta.get("window"), "esm_overlap": store.meta.get("overlap"),
            "esm_truncate": store.meta.get("truncate"),
            "db": str(Path(cfg.db)), "n_val_residues": int(len(val["emb"]))}
    log.info("fitting MiniBatchKMeans K=%d on %d residues (normalize=%s, seed=%d)", cfg.k, len(train["emb"]),
             cfg.normalize, cfg.seed)
    try:
        cb = fit_codebook(train["emb"], cfg.k, cfg.seed, cfg.normalize, cfg.batch_size, cfg.max_iter, cfg.n_init,
                          meta)
    except ValueError as e:
        die(str(e))
    log.info("k-means done in %.1f s (%d mini-batch steps)", cb.meta["fit_seconds"], cb.meta["n_steps"])
    held_out = val if len(val["emb"]) else train   # no val residues: report on train (warned above)
    quality, codes_tr, codes_va = evaluate(cb, train, held_out, cfg.seed)
    cb.save(paths["codebook"])
    summary = {"stage": "03_train_codebook", "codebook": paths["codebook"].name,
               "sha256": sha256_path(paths["codebook"]).read_text().split()[0],  # written by save()
               "meta": cb.meta, "quality": quality}
    if random_weights:
        summary["warning"] = (RANDOM_BANNER + ". The NMI / accuracy numbers below are meaningless: they show "
                              "only that the pipeline runs, not whether ESM-2 codes carry structure.")
    _plots(cb, held_out, codes_va, codes_tr, quality, paths, random_weights, cfg.seed)
    from .report import write_report
    write_report(paths["summary"], summary)      # last: its presence means "stage complete"
    s = quality["structure"]
    log.info("val utilisation %.3f, perplexity %.1f, dead codes %d; NMI(code;3Di) %.3f vs NMI(aa;3Di) %.3f%s",
             quality["val"]["utilisation"], quality["val"]["perplexity"], quality["val"]["dead_codes"],
             s["nmi_code_3di"], s["nmi_aa_3di"], "  [RANDOM WEIGHTS: meaningless]" if random_weights else "")
    return summary


def _plots(cb: Codebook, ev: dict, codes_ev: np.ndarray, codes_tr: np.ndarray, quality: dict, paths: dict,
           random_weights: bool, seed: int) -> None:
    import matplotlib.pyplot as plt

    from .report import save_figure

    tag = "\nRANDOM-WEIGHT ESM-2 (test/demo): clusters are meaningless" if random_weights else ""
    color = "red" if random_weights else "black"
    # 2-D PCA of a residue sample coloured by code, centroids on top
    rng = np.random.default_rng(seed)
    n = len(ev["emb"])
    idx = np.sort(rng.choice(n, min(n, 5000), replace=False)) if n else np.zeros(0, int)
    x = cb.prepare(ev["emb"][idx])
    ok = np.isfinite(x).all(1)
    x, codes = x[ok], codes_ev[idx][ok]
    fig, ax = plt.subplots(figsize=(7, 6))
    if len(x) >= 2:
        mu = x.mean(0)
        _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
        pc = vt[:2].T
        xy = (x - mu) @ pc
        cxy = (cb.centroids - mu) @ pc
        hue = (codes * 0.618034) % 1.0          # neighbouring code numbers get distant colours
        ax.scatter(xy[:, 0], xy[:, 1], c=hue, cmap="hsv", s=6, alpha=0.7, linewidths=0)
        ax.scatter(cxy[:, 0], cxy[:, 1], c="k", marker="x", s=6, linewidths=0.4, alpha=0.4,
                   label=f"{cb.K} centroids")
        ax.legend(loc="upper right")
    ax.set(title=f"PCA of {len(x)} residues coloured by code (K={cb.K}){tag}", xlabel="PC1", ylabel="PC2")
    ax.title.set_color(color)
    save_figure(fig, paths["pca"])
    # cluster sizes: rank plot + histogram, train and evaluation residues
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, codes_, col in (("train", codes_tr, "tab:blue"), ("val", codes_ev, "tab:orange")):
        cnt = np.bincount(codes_[codes_ >= 0], minlength=cb.K)
        axes[0].plot(np.sort(cnt)[::-1], color=col, label=f"{name}: {int((cnt == 0).sum())} dead codes")
        axes[1].hist(cnt, bins=40, color=col, alpha=0.6, label=name)
    axes[0].set(yscale="symlog", xlabel="code rank", ylabel="residues", title="cluster sizes, largest first")
    axes[0].legend()
    axes[1].set(xlabel="residues per code", ylabel="codes", title="histogram of cluster sizes")
    axes[1].legend()
    q = quality["val"]
    fig.suptitle(f"K={cb.K}: val utilisation {q['utilisation']:.1%}, perplexity {q['perplexity']:.0f}, "
                 f"NMI(code;3Di) {quality['structure']['nmi_code_3di']:.3f} vs NMI(aa;3Di) "
                 f"{quality['structure']['nmi_aa_3di']:.3f}{tag}", color=color, y=1.0 + 0.07 * bool(tag) + 0.04)
    save_figure(fig, paths["sizes"])
