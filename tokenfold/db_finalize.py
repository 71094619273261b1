"""Finalizing the protein DB once every shard is built: merge the shards' reports, rejects and
notes, exclude later duplicates of an id, cluster the sequences (`split.cluster_fasta`, MMseqs2) and
deal whole clusters to train/val/test (`split.assign_splits`), then write the split, the final
report (JSON + PNG) and, last, the manifest. Files: see data/README.md, section stage 01.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .artifacts import atomic_path, read_json, write_json_atomic
from .db import EXCLUDED, FORMAT, SPLITS, VERSION
from .db_plan import Plan, PlanMismatch
from .db_shard import shard_paths, tsv_line
from .split import SplitOptions, assign_splits, cluster_fasta, sequence_hash

log = logging.getLogger("tokenfold.db_finalize")


def _shard_ids(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids as fixed-width bytes, lengths) of one shard, without loading its residue arrays. (Letting
    HDF5 convert the ids to fixed width, `.astype("S64")`, leaked ~50 bytes per id: measured.)"""
    with h5py.File(path, "r") as f:
        ids = f["id"][()]  # bytes objects (vlen UTF-8 read raw)
        lengths = np.diff(f["offsets"][()]).astype(np.int32)
    return np.array(ids, dtype="S") if len(ids) else np.zeros(0, dtype="S1"), lengths


def later_duplicates(ids: np.ndarray) -> dict[int, int]:
    """{position: position of the first entry with the same id} for every later duplicate in `ids`.
    One stable argsort and one sorted copy: +31 bytes per entry on top of `ids` at 10M entries
    (np.unique with its index and inverse: +100 at 2M; measured)."""
    if len(ids) < 2:
        return {}
    perm = np.argsort(ids, kind="stable")
    same = ids[perm]
    same = same[1:] == same[:-1]          # sorted position i+1 repeats position i
    if not same.any():
        return {}
    runs = np.flatnonzero(~np.concatenate([[False], same]))   # sorted positions where an id starts
    later = np.flatnonzero(same) + 1
    first = perm[runs[np.searchsorted(runs, later, side="right") - 1]]
    return dict(zip(perm[later].tolist(), first.tolist()))


def _write_sequences(out: Path, plan: Plan, include: np.ndarray, fasta: Path, starts: np.ndarray) -> np.ndarray:
    """Stream the included entries' sequences, shard by shard, into a FASTA named by position
    among the included (what MMseqs2 clusters); returns a 16-byte hash per included sequence
    (the exact-sequence fallback). Nothing but one shard's amino acids is held in memory."""
    hashes = np.zeros((int(include.sum()), 16), dtype=np.uint8)
    pos = 0
    with atomic_path(fasta) as tmp, open(tmp, "w") as fh:
        for k in range(plan.n_shards):
            with h5py.File(shard_paths(out, k)["h5"], "r") as f:
                offs = f["offsets"][()]
                aa = f["aa"][()].tobytes().decode("ascii")
            inc = include[starts[k]:starts[k + 1]]
            lines = []
            for j in np.flatnonzero(inc).tolist():
                seq = aa[offs[j]:offs[j + 1]]
                hashes[pos] = sequence_hash(seq)
                lines.append(f">{pos}\n{seq}\n")
                pos += 1
            fh.write("".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
    return hashes


def _concat_texts(paths: Sequence[Path], dest: Path, extra: Sequence[tuple] = ()) -> None:
    with atomic_path(dest) as tmp, open(tmp, "w") as out:
        for p in paths:
            with open(p) as f:
                shutil.copyfileobj(f, out)
        out.write("".join(tsv_line(*r) for r in extra))


def finalize(out: Path, plan: Plan, split_opts: SplitOptions) -> dict:
    """Merge the shards' reports and rejects, exclude later duplicate ids, split by clusters, write
    split.npy, cluster.npy, rejects.tsv, notes.tsv, report.json/png and, last, manifest.json.

    Memory: the ids (fixed-width bytes), lengths and a 16-byte hash per entry (freed after the
    clustering), plus one shard at a time; sequences go to MMseqs2 through a FASTA file streamed shard
    by shard. Measured: bench/bench_scale.py (README, "At AFDB scale").
    """
    t0 = time.time()
    shard_infos, reports, id_parts, len_parts = [], [], [], []
    for k in range(plan.n_shards):
        p = shard_paths(out, k)
        ids, lengths = _shard_ids(p["h5"])
        shard_infos.append({"file": f"shards/{p['h5'].name}", "n_entries": int(len(ids)), "n_residues": int(lengths.sum())})
        id_parts.append(ids)
        len_parts.append(lengths)
        reports.append(read_json(p["report"]))
    starts = np.concatenate([[0], np.cumsum([len(x) for x in id_parts])]).astype(np.int64)
    n = int(starts[-1])
    if n == 0:
        reasons = Counter()
        for r in reports:
            reasons.update(r["rejected_by_reason"])
        top = ", ".join(f"{k} x{v}" for k, v in reasons.most_common(3)) or "no items"
        raise PlanMismatch(f"nothing could be ingested ({top}); see {out / 'work'}/*.rejects.tsv")
    lengths = np.concatenate(len_parts)
    width = max(x.dtype.itemsize for x in id_parts)
    ids = np.concatenate([x.astype(f"S{width}") for x in id_parts])
    del id_parts

    # later duplicates of an id are excluded (kept in the shard files, hidden by ProteinDB)
    first_of = later_duplicates(ids)
    dups = np.fromiter(first_of, dtype=np.int64, count=len(first_of))
    codes = np.zeros(n, dtype=np.uint8)
    codes[dups] = EXCLUDED
    dup_rejects = []
    if len(dups):
        origins = {}
        for g in [*first_of, *first_of.values()]:
            origins.setdefault(g, None)
        for k in range(plan.n_shards):  # origins only of the entries involved
            want = [g for g in origins if starts[k] <= g < starts[k + 1]]
            if want:
                with h5py.File(shard_paths(out, k)["h5"], "r") as f:
                    o = f["origin"]
                    for g in want:
                        origins[g] = o[g - starts[k]].decode()
        for g in dups.tolist():
            j = first_of[g]
            dup_rejects.append((origins[g], ids[g].decode(), f"duplicate id: same id as entry #{j} from {origins[j]}; excluded (split code 3)"))
    include = codes != EXCLUDED
    included = np.flatnonzero(include)
    fasta = out / "work" / "included.fasta"
    hashes = _write_sequences(out, plan, include, fasta, starts)
    try:
        clus = cluster_fasta(fasta, hashes, out / "work", split_opts.min_seq_id, split_opts.coverage,
                             split_opts.threads, split_opts.mmseqs, split_opts.use_mmseqs, split_opts.mmseqs_mode)
    finally:
        fasta.unlink(missing_ok=True)
    del hashes
    inc_codes = assign_splits(clus.rep, ids if len(included) == n else ids[included], split_opts.fractions,
                              split_opts.seed)
    codes[included] = inc_codes
    cluster = np.full(n, -1, dtype=np.int64)
    cluster[included] = included[clus.rep]

    with atomic_path(out / "split.npy", suffix=".npy") as tmp:
        np.save(tmp, codes)
    with atomic_path(out / "cluster.npy", suffix=".npy") as tmp:
        np.save(tmp, cluster)
    _concat_texts([shard_paths(out, k)["rejects"] for k in range(plan.n_shards)], out / "rejects.tsv", dup_rejects)
    _concat_texts([shard_paths(out, k)["notes"] for k in range(plan.n_shards)], out / "notes.tsv")

    report = _final_report(plan, reports, lengths, codes, cluster, clus, split_opts, len(dup_rejects))
    report["seconds_finalize"] = round(time.time() - t0, 2)
    from .report import write_report  # matplotlib: loaded by the finalize step only

    write_report(out / "report.json", report)
    _report_png(out / "report.png", report, lengths[codes != EXCLUDED])
    manifest = {
        "format": FORMAT, "version": VERSION, "stage": "01_prepare_db", "plan": plan.fingerprint,
        "n_entries": n, "n_included": int(len(included)), "n_residues": int(lengths.sum()),
        "shards": shard_infos,
        "split_sizes": report["split"]["entries"],
        "inputs": {"structure_files": len(plan.structure_files),
                   "structure_dirs": sorted({str(Path(f).parent) for f in plan.structure_files})[:50],
                   "foldseek": plan.foldseek, "fasta": plan.fasta},
        "options": plan.options,
        "split": {"method": clus.method, "detail": clus.detail, "mmseqs": clus.tool,
                  "fractions": list(split_opts.fractions),
                  "min_seq_id": split_opts.min_seq_id, "coverage": split_opts.coverage, "seed": split_opts.seed},
        "files": {"split": "split.npy", "cluster": "cluster.npy", "rejects": "rejects.tsv", "notes": "notes.tsv",
                  "report": "report.json"},
    }
    write_json_atomic(out / "manifest.json", manifest)
    log.info("finalized %s: %d entries (%d excluded duplicates), split %s by %s", out, n, len(dup_rejects),
             report["split"]["entries"], clus.method)
    return manifest


def _final_report(plan, reports, lengths, codes, cluster, clus, split_opts, n_dups) -> dict:
    tot = Counter()
    by = {k: Counter() for k in ("items_by_source", "kept_by_source", "rejected_by_source", "rejected_by_reason",
                                 "notes_by_kind", "ss_counts", "aa_counts")}
    for r in reports:
        for k in by:
            by[k].update(r[k])
        for k in ("n_entries", "n_residues", "n_no_ss", "n_no_ca", "n_plddt", "n_with_breaks"):
            tot[k] += r[k]
    if n_dups:
        by["rejected_by_reason"]["duplicate id"] += n_dups
    inc = codes != EXCLUDED
    L = lengths[inc]
    ss_total = sum(by["ss_counts"].values()) or 1
    split_entries = {name: int((codes == c).sum()) for c, name in enumerate(SPLITS)}
    split_clusters = {name: int(len(np.unique(cluster[codes == c]))) for c, name in enumerate(SPLITS)}
    return {
        "stage": "01_prepare_db", "plan": plan.fingerprint,
        "counts": {"items": plan.n_items, "entries": int(tot["n_entries"]), "included": int(inc.sum()),
                   "excluded_duplicates": n_dups, "residues": int(tot["n_residues"]),
                   "without_3di": int(tot["n_no_ss"]), "without_ca": int(tot["n_no_ca"]),
                   "with_plddt": int(tot["n_plddt"]), "with_chain_breaks": int(tot["n_with_breaks"])},
        "by_source": {k: {"items": by["items_by_source"].get(k, 0), "kept": by["kept_by_source"].get(k, 0),
                          "rejected": by["rejected_by_source"].get(k, 0)} for k in by["items_by_source"]},
        "rejected_by_reason": dict(by["rejected_by_reason"].most_common()),
        "notes_by_kind": dict(by["notes_by_kind"].most_common()),
        "length": {"min": int(L.min()) if len(L) else 0, "p05": float(np.percentile(L, 5)) if len(L) else 0,
                   "median": float(np.median(L)) if len(L) else 0, "mean": float(L.mean()) if len(L) else 0,
                   "p95": float(np.percentile(L, 95)) if len(L) else 0, "max": int(L.max()) if len(L) else 0},
        "split": {"method": clus.method, "detail": clus.detail, "mmseqs": clus.tool,
                  "fallback": clus.method != "mmseqs",
                  "note": ("FALLBACK: MMseqs2 was not available, entries were split by exact-sequence hash; "
                           "homologous chains may straddle splits") if clus.method != "mmseqs" else "",
                  "entries": split_entries, "clusters": split_clusters,
                  "fractions": list(split_opts.fractions), "seed": split_opts.seed,
                  "min_seq_id": split_opts.min_seq_id, "coverage": split_opts.coverage},
        "composition_3di": {c: round(by["ss_counts"].get(c, 0) / ss_total, 5) for c in sorted(by["ss_counts"])},
        "composition_aa": {c: round(v / max(1, sum(by["aa_counts"].values())), 5) for c, v in sorted(by["aa_counts"].items())},
        "options": plan.options,
        "seconds_shards": round(sum(r["seconds"] for r in reports), 2),
    }


def _report_png(path: Path, report: dict, lengths: np.ndarray) -> None:
    from .report import save_figure, subplots

    fig, ax = subplots(4, ncols=2, size=4.5)
    ax[0].hist(lengths, bins=min(50, max(5, len(lengths) // 3)), color="#4477aa")
    ax[0].set(title=f"chain length (n={len(lengths)})", xlabel="residues", ylabel="entries")
    comp = report["composition_3di"]
    ax[1].bar(list(comp), list(comp.values()), color="#228833")
    ax[1].set(title="3Di letter frequency", ylabel="fraction")
    sp = report["split"]
    names = list(sp["entries"])
    ax[2].bar(names, [sp["entries"][k] for k in names], color="#ccbb44", label="entries")
    ax[2].bar(names, [sp["clusters"][k] for k in names], color="#ee6677", width=0.4, label="clusters")
    ax[2].legend()
    ax[2].set(title=f"split ({sp['method']}{', FALLBACK' if sp['fallback'] else ''})")
    rej = report["rejected_by_reason"]
    if rej:
        keys = list(rej)[:10]
        ax[3].barh(keys, [rej[k] for k in keys], color="#aa3377", height=0.6)
        ax[3].invert_yaxis()
    ax[3].set(title=f"rejected items by reason (total {sum(rej.values())})")
    fig.tight_layout()
    save_figure(fig, path)
