"""Stage 01 end to end: build the protein DB from structure files, Foldseek databases and FASTA files.

`run` does the whole stage, or one SLURM array task's share of it:

1. **Plan** (`db_plan`): the inputs become one numbered item list dealt into DB shards; a run with
   other inputs or options than the DB's plan refuses to mix them (``--overwrite`` rebuilds).
2. **Shards** (`db_shard`): each DB shard is built independently and its HDF5 file is written last,
   so a killed run resumes where it stopped. SLURM array tasks take shards round-robin
   (`sharding.my_units`); ``workers`` parallelises structure parsing within a task.
3. **Finalize** (`db_finalize`; automatic when unsharded, else ``finalize_only`` once every task is
   done): duplicate ids, the homology split, the final report and, last, the manifest.

Files: see data/README.md, section stage 01. 01_prepare_db.py is the command line.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Iterable

from .artifacts import read_json, write_json_atomic
from .db_finalize import finalize
from .db_plan import Inputs, PlanMismatch, PrepareOptions, make_plan
from .db_shard import build_shard, make_pool, shard_paths
from .sharding import my_units
from .split import SplitOptions

log = logging.getLogger("tokenfold.prepare")

FINAL_FILES = ("manifest.json", "split.npy", "cluster.npy", "rejects.tsv", "notes.tsv", "report.json", "report.png")


def _remove_outputs(out: Path, shards: Iterable[int] | None) -> None:
    """--overwrite: drop the final artifacts and the given shards (all shard files when None)."""
    for name in FINAL_FILES:
        (out / name).unlink(missing_ok=True)
    if shards is None:
        shutil.rmtree(out / "shards", ignore_errors=True)
        shutil.rmtree(out / "work", ignore_errors=True)
    else:
        for k in shards:
            for p in shard_paths(out, k).values():
                p.unlink(missing_ok=True)


def run(inputs: Inputs, out: str | os.PathLike, opts: PrepareOptions | None = None,
        split_opts: SplitOptions | None = None, num_tasks: int = 1, task_index: int = 0, workers: int = 1,
        finalize_only: bool = False, overwrite: bool = False) -> dict:
    """Stage 01 end to end (or this SLURM array task's share of it). Returns a small status dict."""
    opts = opts or PrepareOptions()
    split_opts = split_opts or SplitOptions()
    out = Path(out)
    plan = make_plan(inputs, opts)
    if plan.n_items == 0:
        raise PlanMismatch("no input items: the given inputs hold no files or entries")
    manifest = out / "manifest.json"
    mine = list(range(plan.n_shards)) if finalize_only else my_units(plan.n_shards, num_tasks, task_index)
    if overwrite and not finalize_only:
        _remove_outputs(out, None if num_tasks == 1 else mine)
    if manifest.exists():
        m = read_json(manifest)
        if m.get("plan") != plan.fingerprint:
            raise PlanMismatch(f"{out} holds a finished DB built from other inputs/options "
                               f"(plan {m.get('plan')} vs {plan.fingerprint}); use --overwrite or another --out")
        log.info("%s is complete (%d entries); nothing to do (use --overwrite to rebuild)", out, m["n_entries"])
        return {"status": "complete", "n_entries": m["n_entries"], "shards_built": 0}
    plan_path = out / "work" / "plan.json"
    if plan_path.exists():
        old = read_json(plan_path)
        if old.get("fingerprint") != plan.fingerprint:
            raise PlanMismatch(f"{out} holds a partial DB from other inputs/options (plan {old.get('fingerprint')} "
                               f"vs {plan.fingerprint}); use --overwrite or another --out")
    else:
        write_json_atomic(plan_path, {"fingerprint": plan.fingerprint, "n_items": plan.n_items,
                                      "n_shards": plan.n_shards, "options": plan.options,
                                      "structure_files": len(plan.structure_files),
                                      "foldseek": plan.foldseek, "fasta": plan.fasta})
    built = 0
    if not finalize_only:
        todo = [k for k in mine if not shard_paths(out, k)["h5"].exists()]
        log.info("plan %s: %d items in %d DB shards; task %d/%d owns %d, %d to build",
                 plan.fingerprint, plan.n_items, plan.n_shards, task_index, num_tasks, len(mine), len(todo))
        pool = None
        try:
            if workers > 1 and todo and plan.structure_files:
                pool = make_pool(workers)
            for k in todo:
                build_shard(out, plan, k, pool)
                built += 1
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    if num_tasks == 1 or finalize_only:
        missing = [k for k in range(plan.n_shards) if not shard_paths(out, k)["h5"].exists()]
        if missing:
            raise PlanMismatch(f"cannot finalize: {len(missing)} of {plan.n_shards} DB shards are missing "
                               f"(e.g. shard {missing[0]}); run the array tasks first")
        man = finalize(out, plan, split_opts)
        return {"status": "finalized", "n_entries": man["n_entries"], "shards_built": built}
    log.info("task %d/%d done; run with --finalize once every array task has finished", task_index, num_tasks)
    return {"status": "shards", "shards_built": built}
