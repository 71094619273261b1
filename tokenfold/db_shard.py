"""Building one DB shard: ingest its slice of the plan's items (structure files in worker
processes), then write its rejects, notes and report to work/ and, last, the shard's HDF5 file.
A shard whose HDF5 file exists is complete; a killed run rebuilds only the missing ones.
Files: see data/README.md, section stage 01; shard format: `tokenfold.db`.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .artifacts import write_json_atomic, write_text_atomic
from .cli import progress
from .db import Chunk, ProteinRecord, write_shard_arrays
from .db_plan import Plan, PrepareOptions
from .fasta import record_offsets
from .ingest import ItemResult, ingest_fasta_range, ingest_foldseek_range, ingest_structure_file

log = logging.getLogger("tokenfold.db_shard")


def shard_paths(out: Path, k: int) -> dict[str, Path]:
    """The files of DB shard k: its HDF5 file and, in work/, its report, rejects and notes."""
    return {"h5": out / "shards" / f"shard_{k:05d}.h5", "report": out / "work" / f"shard_{k:05d}.report.json",
            "rejects": out / "work" / f"shard_{k:05d}.rejects.tsv", "notes": out / "work" / f"shard_{k:05d}.notes.tsv"}


def tsv_line(*cols) -> str:
    """One rejects.tsv / notes.tsv line; tabs and newlines inside a column become spaces."""
    return "\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in cols) + "\n"


def _one_blas_thread() -> None:
    """Structure parsing and 3Di make many tiny numpy matrix products, on which OpenBLAS's threads only
    spin: the shared structures took 10.7 CPU-s with numpy's default threads and 5.3 CPU-s with one
    (5.4 s wall either way on 2 cores), so 2 worker processes could not run faster than 1. One BLAS
    thread per process (the main one and every pool worker) makes workers scale."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


# worker-process entry point (top level so that multiprocessing can pickle it)
def _structure_job(job):
    path, base, opts = job
    return ingest_structure_file(path, base, opts)


def make_pool(workers: int):
    """Worker processes for structure files, each with one BLAS thread. They are forked from a clean
    forkserver process where there is one (Linux), never from the caller: a caller that already runs
    threads (torch, gloo, a notebook) may hold a lock at fork time, and the forked worker then waits on
    it forever (seen in the test suite after an in-process FSDP test). Elsewhere they are spawned."""
    ctx = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(ctx).Pool(workers, initializer=_one_blas_thread)


def build_shard(out: Path, plan: Plan, k: int, pool=None) -> dict:
    """Ingest the items of DB shard k and write its files (h5 last). Returns the shard report."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):   # see _one_blas_thread
        return _build_shard(out, plan, k, pool)


def _build_shard(out: Path, plan: Plan, k: int, pool) -> dict:
    opts = PrepareOptions(**plan.options)
    lo, hi = plan.shard_range(k)
    t0 = time.time()
    chunks: list[Chunk] = []
    rejects: list[tuple] = []
    notes: list[tuple] = []
    items, kept, rejected_items = Counter(), Counter(), Counter()

    def collect(r: ItemResult, kind: str, pending: list):
        pending.extend(r.records)
        if r.chunk is not None:
            chunks.append(r.chunk)
        rejects.extend(r.rejects)
        notes.extend(r.notes)
        kept[kind] += r.n_kept
        rejected_items[kind] += len(r.rejects)

    bar = progress(total=hi - lo, desc=f"shard {k}", unit="item")
    for kind, src, start, n in plan.segments():
        a, b = max(lo, start), min(hi, start + n)
        if a >= b:
            continue
        la, lb = a - start, b - start
        items[kind] += b - a
        pending: list[ProteinRecord] = []
        if kind == "structure":
            jobs = [(plan.structure_files[i], plan.structure_bases[i], opts) for i in range(la, lb)]
            results = pool.imap(_structure_job, jobs, chunksize=4) if pool is not None else map(_structure_job, jobs)
            last_log = time.time()
            for i, r in enumerate(results, 1):
                collect(r, kind, pending)
                bar.update(1)
                if time.time() - last_log > 60:
                    last_log = time.time()
                    log.info("shard %d: %d/%d structure files, %.0f files/s", k, i, lb - la, i / (last_log - t0))
        elif kind == "foldseek":
            collect(ingest_foldseek_range(plan.foldseek[src]["prefix"], la, lb, opts), kind, pending)
            bar.update(b - a)
        else:
            path = plan.fasta[src]["path"]
            offs = plan.fasta_offsets.get(path)
            if offs is None:
                offs = plan.fasta_offsets[path] = record_offsets(path)
            collect(ingest_fasta_range(path, offs, la, lb, opts), kind, pending)
            bar.update(b - a)
        if pending:
            chunks.append(Chunk.from_records(pending))
    bar.close()
    chunk = Chunk.concat(chunks)
    rep = _shard_report(k, lo, hi, chunk, rejects, notes, items, kept, rejected_items, time.time() - t0)
    p = shard_paths(out, k)
    write_text_atomic(p["rejects"], "".join(tsv_line(*r) for r in rejects))
    write_text_atomic(p["notes"], "".join(tsv_line(*r) for r in notes))
    write_json_atomic(p["report"], rep)
    write_shard_arrays(p["h5"], chunk.arrays(), {"shard": k, "first_item": lo, "end_item": hi, "plan": plan.fingerprint})
    log.info("shard %d: items %d-%d, %d entries kept, %d rejected, %.1fs", k, lo, hi - 1, len(chunk), len(rejects), rep["seconds"])
    return rep


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0].strip()


def _letter_counts(arr: np.ndarray) -> dict:
    counts = np.bincount(arr, minlength=256)
    return {chr(i): int(counts[i]) for i in np.flatnonzero(counts) if i}


def _shard_report(k, lo, hi, chunk: Chunk, rejects, notes, items, kept, rejected_items, seconds) -> dict:
    starts = np.concatenate([[0], np.cumsum(chunk.lengths)[:-1]]).astype(np.int64)
    gap = chunk.gap_before.astype(np.int64)
    n_breaks = np.add.reduceat(gap, starts) - gap[starts] if len(chunk) and len(gap) else np.zeros(0)
    return {
        "shard": k, "items": [lo, hi], "seconds": round(seconds, 3),
        "items_by_source": dict(items), "kept_by_source": dict(kept), "rejected_by_source": dict(rejected_items),
        "rejected_by_reason": dict(Counter(_reason_kind(r[2]) for r in rejects)),
        "notes_by_kind": dict(Counter(_reason_kind(n[2]) for n in notes)),
        "n_entries": len(chunk), "n_residues": int(chunk.lengths.sum()),
        "n_no_ss": int((~chunk.has_ss).sum()), "n_no_ca": int((~chunk.has_ca).sum()),
        "n_plddt": int(chunk.has_plddt.sum()), "n_with_breaks": int((n_breaks > 0).sum()),
        "ss_counts": _letter_counts(chunk.ss), "aa_counts": _letter_counts(chunk.aa),
    }
