"""Stage 04's report: token frequencies, example lengths, geo reconstruction RMSD and robustness (JSON + PNGs).

The geo robustness table (`geo_robustness_report`): on up to ``--geo-robustness-chains`` held-out
(val + test) chains, spread evenly over them, a fraction of the tokens is replaced (random / near-miss,
0, 2, 5, 10, 20%: `tokenfold.georobust`), decoded and scored against the true chain (median RMSD,
TM-score, lDDT); printed to the log and stored as report.json ``geo.robustness``.

Built by `tokenfold.tokenize.finalize` from the merged per-DB-shard statistics. Files: see
data/README.md, section stage 04.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .db import SPLIT_CODES, SPLITS, ProteinDB
from .metrics import binned, summarize
from .report import save_figure, subplots
from .vocab import Vocab

if TYPE_CHECKING:
    from .tokenize import TokenizeConfig

log = logging.getLogger("tokenfold.tokenize_report")


def build_report(cfg: TokenizeConfig, vocab: Vocab, summaries, splits, stats, rejects: str) -> dict:
    """report.json's content (the PNGs are drawn on the way): `summaries` are the per-DB-shard
    markers, `splits` the manifest's per-split counts, `stats` the merged per-example statistics,
    `rejects` the text of rejects.tsv."""
    out = cfg.out_dir
    reasons: dict[str, int] = {}
    for line in rejects.splitlines():
        r = line.split("\t", 1)[1] if "\t" in line else line
        reasons[r] = reasons.get(r, 0) + 1
    cc = stats["code_counts"]
    freq = {}
    for s, row in zip(SPLITS, cc):
        tot = int(row.sum())
        p = row[row > 0] / max(tot, 1)
        freq[s] = {"n_tokens": tot, "codes_used": int((row > 0).sum()), "of": int(vocab.n_struct),
                   "perplexity": float(np.exp(-(p * np.log(p)).sum())) if tot else None}
    rep = {"stage": "04_tokenize", "name": cfg.name, "kind": cfg.kind, "interleaved": cfg.interleaved, "direction": cfg.direction,
           "vocab_size": vocab.size, "n_struct": vocab.n_struct, "max_length": cfg.max_length,
           "long_policy": cfg.long_policy, "seed": cfg.seed, "db": str(cfg.db),
           "splits": splits, "n_db_entries": int(sum(m["n_entries"] for m in summaries)),
           "n_dropped_too_long": int(sum(m["n_dropped_too_long"] for m in summaries)),
           "n_cropped": int(sum(m["n_cropped"] for m in summaries)),
           "rejected": reasons, "token_frequency": freq,
           "residues_per_example": {s: summarize(stats["n_res"][stats["split"] == SPLIT_CODES[s]]) for s in SPLITS},
           "tokens_per_example_max": int(stats["n_tokens"].max()) if len(stats["n_tokens"]) else 0,
           "config": {k: v for k, v in asdict(cfg).items() if k != "overwrite"}}
    if cfg.kind in ("esm", "kanzi"):   # tokens from a model: its RANDOM-weights label, as vocab.meta holds it
        rep["random_weights"] = bool(vocab.meta.get("random_weights"))
        if rep["random_weights"]:
            rep["WARNING"] = vocab.meta["WARNING"]
    if cfg.kind == "kanzi":
        rep["kanzi"] = vocab.meta.get("kanzi")
    files = [_plot_frequency(out, vocab, cc), _plot_lengths(out, stats)]
    if cfg.kind == "geo":
        rm, L, sp = stats["rmsd"], stats["n_res"], stats["split"]
        held = sp != SPLIT_CODES["train"]
        ref = vocab.meta["geo_codebook"]
        rep["geo"] = {
            "codebook": ref, "K": ref["K"], "beam": cfg.geo_beam,
            "rmsd_definition": "C-alpha RMSD of decode(encode(chain)) vs the chain, each segment between chain "
                               "breaks superposed on its own (residue-weighted), Angstrom",
            "rmsd": {s: summarize(rm[sp == SPLIT_CODES[s]]) for s in SPLITS},
            "rmsd_heldout": {**summarize(rm[held]), "p90": float(np.percentile(rm[held], 90)) if held.any() else None,
                             "fraction_le_1A": float((rm[held] <= 1.0).mean()) if held.any() else None},
            "rmsd_heldout_vs_length": binned(L[held], rm[held]),
            "rmsd_all_vs_length": binned(L, rm),
            "n_examples_with_breaks": int((stats["n_segments"] > 1).sum()),
            "note": "val/test chains were never seen by the codebook (fit on train chains only)"}
        if cfg.geo_robustness_chains > 0:
            rep["geo"]["robustness"] = geo_robustness_report(cfg, vocab)
        files += _plot_geo(out, stats)
    rep["files"] = [f.name for f in files]
    return rep


def geo_robustness_report(cfg: TokenizeConfig, vocab: Vocab) -> dict:
    """The substitution robustness table (module docstring) of the codebook behind `vocab`, on up to
    ``cfg.geo_robustness_chains`` held-out chains (each cut to its first ``cfg.max_length`` residues)."""
    from .georobust import format_table, geo_robustness
    from .geotokens import GeoCodebook

    cb = GeoCodebook.from_vocab(vocab, cfg.out_dir)
    db = ProteinDB(cfg.db)
    held = np.sort(np.concatenate([db.indices("val"), db.indices("test")]))
    n = min(len(held), cfg.geo_robustness_chains)
    cas, gaps = [], []
    for g in held[np.unique(np.linspace(0, len(held) - 1, n).astype(int))] if n else []:
        rec = db.get_global(int(g))
        if rec.ca is not None and len(rec.ca) >= 5 and np.isfinite(rec.ca).all():
            cas.append(rec.ca[:cfg.max_length])
            gaps.append(rec.gap_before[:cfg.max_length] if rec.gap_before is not None else None)
    if not cas:
        return {"n_chains": 0, "note": "no held-out chains with C-alpha"}
    rows = geo_robustness(cb, cas, gaps, seed=cfg.seed)
    log.info("geo robustness on %d held-out chains (medians):\n%s", len(cas),
             format_table({f"geo K={cb.K}, {cb.n_tokens} tokens": rows}))
    return {"n_chains": len(cas), "n_residues": int(sum(len(c) for c in cas)), "rows": rows,
            "definition": "a fraction p of the geometric tokens replaced (random: any other geometric token; "
                          "near: the nearest other token, one code of the pair moved to its nearest code), "
                          "decoded, scored against the true chain; medians over chains (tokenfold/georobust.py)"}


def _plot_frequency(out: Path, vocab: Vocab, cc: np.ndarray) -> Path:
    fig, (ax1, ax2) = subplots(2, ncols=2, size=5)
    row = cc[0] if cc[0].sum() else cc.sum(0)
    order = np.argsort(row)[::-1]
    frac = row[order] / max(row.sum(), 1)
    ax1.bar(np.arange(len(frac)), frac, width=1.0)
    ax1.set(title=f"{vocab.kind} token frequency (train), {int((row > 0).sum())}/{vocab.n_struct} used",
            xlabel="token rank", ylabel="fraction of tokens", yscale="log" if len(frac) > 30 else "linear")
    if vocab.kind == "3di":
        ax1.set_xticks(np.arange(len(frac)), [vocab.struct_symbols[i] for i in order])
    ax2.plot(np.arange(1, len(frac) + 1), np.cumsum(frac))
    ax2.set(title="cumulative", xlabel="number of most frequent tokens", ylabel="fraction of tokens", ylim=(0, 1.01))
    return save_figure(fig, out / "token_frequency.png")


def _plot_lengths(out: Path, stats: dict) -> Path:
    fig, (ax,) = subplots(1, ncols=1, size=5)
    L = stats["n_res"]
    bins = np.linspace(0, max(int(L.max()) if len(L) else 1, 1), 40)
    for s in SPLITS:
        v = L[stats["split"] == SPLIT_CODES[s]]
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{s} (n={len(v)})")
    ax.set(title="residues per example", xlabel="residues", ylabel="examples")
    if len(L):
        ax.legend()
    return save_figure(fig, out / "lengths.png")


def _plot_geo(out: Path, stats: dict) -> list[Path]:
    rm, L, sp = stats["rmsd"], stats["n_res"], stats["split"]
    held = sp != SPLIT_CODES["train"]
    fig, (ax,) = subplots(1, ncols=1, size=5)
    bins = np.linspace(0, max(1.1, float(np.nanmax(rm)) if len(rm) else 1), 40)
    for name, m in (("train (codebook saw these)", ~held), ("val+test (held out)", held)):
        if m.any():
            ax.hist(rm[m], bins=bins, alpha=0.6, label=f"{name}: median {np.median(rm[m]):.3f} A, n={int(m.sum())}")
    ax.axvline(1.0, color="k", ls=":", lw=1)     # the target: <= 1 A on held-out chains
    ax.set(title="geo reconstruction C-alpha RMSD", xlabel="RMSD (A)", ylabel="chains")
    ax.legend(fontsize=8)
    f1 = save_figure(fig, out / "geo_rmsd_hist.png")
    fig, (ax,) = subplots(1, ncols=1, size=5)
    for name, m, c in (("train", ~held, "C0"), ("val+test", held, "C1")):
        if m.any():
            ax.scatter(L[m], rm[m], s=8, alpha=0.6, color=c, label=name)
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set(title="geo reconstruction RMSD vs length", xlabel="residues", ylabel="RMSD (A)", ylim=(0, None))
    ax.legend(fontsize=8)
    f2 = save_figure(fig, out / "geo_rmsd_vs_length.png")
    return [f1, f2]
