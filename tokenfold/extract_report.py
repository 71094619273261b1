"""The stage-02 report: throughput per DB shard, entry lengths and vector norms (report.json + report.png).

Files: see data/README.md, section stage 02.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .embedding_store import EmbeddingShard
from .esm_checkpoint import RANDOM_BANNER
from .report import save_figure, subplots, write_report


def write_extract_report(out: Path, manifest: dict, reports: list[dict], window: int) -> dict:
    """``report.json`` and ``report.png`` of the stage-02 output `out` (`manifest`: what finalize will write;
    `reports`: the per-DB-shard work reports; `window`: the long-sequence window, drawn on the lengths)."""
    secs = sum(r["seconds"] for r in reports)
    embedded = sum(r.get("residues_embedded_now", r["n_residues"]) for r in reports)
    summary = {"mode": manifest["mode"], "model": manifest["model"], "layer": manifest["layer"],
               "dim": manifest["dim"], "random_weights": manifest["random_weights"],
               "n_db_shards": len(reports), "n_residues_stored": manifest["n_residues"],
               "compute_seconds": secs, "residues_per_s": embedded / max(secs, 1e-9),
               "n_long_entries_windowed": int(sum(r.get("n_long", 0) for r in reports)),
               "n_truncated_entries": int(sum(r.get("n_truncated", 0) for r in reports))}
    rep = {"stage": "02_extract_esm_embeddings", "summary": summary, "shards": reports}
    if manifest["random_weights"]:
        rep["warning"] = RANDOM_BANNER
    # a residue sample for the plots: norms and a few coordinates
    rng = np.random.default_rng(0)
    if manifest["mode"] == "full":
        files = [out / s["file"] for s in manifest["shards"][:8]]
        vec = []
        for p in files:
            with h5py.File(p, "r") as f:
                R = f["emb"].shape[0]
                if R:
                    idx = np.sort(rng.choice(R, min(R, 2000), replace=False))
                    vec.append(f["emb"][idx].astype(np.float32))
        lengths = np.concatenate([np.diff(EmbeddingShard(p).offsets) for p in files]) if files else np.zeros(0)
    else:
        with h5py.File(out / "sample.h5", "r") as f:
            R = f["train/emb"].shape[0]
            idx = np.sort(rng.choice(R, min(R, 10000), replace=False)) if R else np.zeros(0, int)
            vec = [f["train/emb"][idx].astype(np.float32)] if R else []
        lengths = np.zeros(0)
    vec = np.concatenate(vec) if vec else np.zeros((0, manifest["dim"]), np.float32)
    fig, axes = subplots(3)
    if len(lengths):
        axes[0].hist(lengths, bins=40, color="tab:blue")
        axes[0].axvline(window, color="r", ls="--", label=f"window {window}")
        axes[0].legend()
    axes[0].set(title="entry lengths (first DB shards)", xlabel="residues", ylabel="entries")
    axes[1].bar([r["db_shard"] for r in reports], [r["residues_per_s"] for r in reports], color="tab:green")
    axes[1].set(title="throughput per DB shard", xlabel="DB shard", ylabel="residues/s")
    if len(vec):
        axes[2].hist(np.linalg.norm(vec, axis=1), bins=50, color="tab:purple")
        summary["mean_vector_norm"] = float(np.linalg.norm(vec, axis=1).mean())
    axes[2].set(title=f"L2 norm of layer-{manifest['layer']} vectors", xlabel="norm", ylabel="residues")
    title = f"stage 02: {manifest['model']} layer {manifest['layer']} ({manifest['mode']})"
    if manifest["random_weights"]:
        title += "\nRANDOM WEIGHTS - test/demo only, no learned information"
    axes[1].set_xticks([r["db_shard"] for r in reports][:20])
    fig.suptitle(title, color="red" if manifest["random_weights"] else "black", y=1.0 + 0.07 * title.count("\n") + 0.04)
    save_figure(fig, out / "report.png")
    write_report(out / "report.json", rep)
    return rep
