#!/usr/bin/env python
"""Stage 01 ingestion throughput on ../shared, as ratios against Foldseek `createdb`.

Reference (../shared/data/README.md): Foldseek createdb ingested the 1,151 shared structure chains
in 2.5 s on one thread, ~450 chains/s/core and ~110k residues/s/core. Targets: PDB/mmCIF files
>= 0.25x that per core, scaling with --workers; Foldseek DB ingestion >= 20,000 chains/s/core.

What is timed: building DB shards (parse/decode, filters, 3Di, writing the HDF5 shard), not the
finalize step (MMseqs2 clustering). "Per core" divides by CPU seconds of this process and its
worker processes, so a busy shared machine inflates wall time but not the per-core figure; wall
time and the host load are printed too.

    python bench/bench_prepare.py                # all of ../shared/data/structures + foldseek_db/shared
    python bench/bench_prepare.py --limit 300    # quicker: the first 300 structure files
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenfold.db_plan import Inputs, Plan, PrepareOptions, expand_structure_args, make_plan  # noqa: E402
from tokenfold.db_shard import build_shard, make_pool  # noqa: E402

REF_CHAINS = 450.0     # Foldseek createdb, chains/s/core on these structures
REF_RESIDUES = 110e3   # residues/s/core


def _cpu() -> tuple[float, float]:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def time_shard(plan: Plan, workers: int, repeats: int = 1) -> dict:
    """Build DB shard 0 of `plan` (all items) `repeats` times; chains, residues, wall and CPU seconds."""
    out = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        cpu0, ch0 = _cpu()
        t0 = time.perf_counter()
        for _ in range(repeats):
            pool = make_pool(workers) if workers > 1 else None
            try:
                rep = build_shard(out, plan, 0, pool)
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()
        wall = time.perf_counter() - t0
        cpu1, ch1 = _cpu()
        return {"chains": rep["n_entries"] * repeats, "residues": rep["n_residues"] * repeats, "wall": wall,
                "cpu": (cpu1 - cpu0) + (ch1 - ch0)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def replicate_foldseek_db(src: Path, dst: Path, times: int) -> Path:
    """A Foldseek DB holding `times` copies of `src` (data concatenated, index shifted, keys renumbered)."""
    for suf in ("", "_ss", "_ca", "_h"):
        data = Path(f"{src}{suf}").read_bytes()
        rows = [line.split("\t") for line in Path(f"{src}{suf}.index").read_text().splitlines()]
        n = len(rows)
        with open(f"{dst}{suf}", "wb") as f:
            f.write(data * times)
        with open(f"{dst}{suf}.index", "w") as f:
            for t in range(times):
                for k, off, ln in rows:
                    f.write(f"{int(k) + t * n}\t{int(off) + t * len(data)}\t{ln}\n")
        shutil.copy(f"{src}{suf}.dbtype", f"{dst}{suf}.dbtype")
    return dst


def fmt(name: str, r: dict, workers: int) -> str:
    per_core = r["chains"] / r["cpu"]
    res_core = r["residues"] / r["cpu"]
    return (f"{name:<34} {r['chains']:>7} chains  wall {r['wall']:6.2f}s ({r['chains'] / r['wall']:8.0f} chains/s, "
            f"{workers} worker{'s' if workers > 1 else ''})  per core: {per_core:8.0f} chains/s = "
            f"{per_core / REF_CHAINS:5.2f}x Foldseek, {res_core:9.0f} residues/s = {res_core / REF_RESIDUES:5.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="../shared/data")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N structure files (0: all)")
    ap.add_argument("--fs-copies", type=int, default=20, help="copies of foldseek_db/shared in the Foldseek benchmark DB")
    args = ap.parse_args()
    shared = Path(args.shared)
    if not (shared / "structures").is_dir():
        print(f"skipped: {shared}/structures not found")
        return 0
    print(f"host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; reference: Foldseek createdb "
          f"{REF_CHAINS:.0f} chains/s/core, {REF_RESIDUES / 1e3:.0f}k residues/s/core")

    files = expand_structure_args([shared / "structures"])
    if args.limit:
        files = files[: args.limit]
    # Foldseek's chain filter (length > 3, not all-X), so chain counts compare with createdb's
    opts = PrepareOptions(min_length=4, max_unknown=1.0, min_plddt=0, items_per_shard=10**9)
    plan = make_plan(Inputs(structures=[str(f) for f in files]), opts)
    time_shard(make_plan(Inputs(structures=[str(f) for f in files[:5]]), opts), 1)  # warm-up (imports)
    r1 = time_shard(plan, 1)
    print(fmt(f"PDB/mmCIF files ({len(files)})", r1, 1))
    r2 = time_shard(plan, 2)
    print(fmt(f"PDB/mmCIF files ({len(files)})", r2, 2))
    print(f"{'':<34} scaling 1 -> 2 workers: wall speed-up {r1['wall'] / r2['wall']:.2f}x "
          f"(per-core efficiency {(r2['chains'] / r2['cpu']) / (r1['chains'] / r1['cpu']):.2f})")

    fdb = shared / "foldseek_db" / "shared"
    with tempfile.TemporaryDirectory(prefix="bench_fdb_") as tmp:
        big = replicate_foldseek_db(fdb, Path(tmp) / "big", args.fs_copies)
        fplan = make_plan(Inputs(foldseek_dbs=[str(big)]), opts)
        time_shard(make_plan(Inputs(foldseek_dbs=[str(fdb)]), opts), 1)  # warm-up
        rf = time_shard(fplan, 1, repeats=3)
        per_core = rf["chains"] / rf["cpu"]
        print(fmt(f"Foldseek DB ({args.fs_copies} x shared)", rf, 1))
        print(f"{'':<34} Foldseek DB target 20,000 chains/s/core: {per_core / 20000:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
