"""How a sharded stage splits its work over SLURM array tasks.

Work units (DB shards) go round-robin to ``--num-shards`` tasks; the flags default from the SLURM
array (``SLURM_ARRAY_TASK_COUNT`` / ``SLURM_ARRAY_TASK_ID``), so the same command runs alone or as
one task of an array. A finalize step then merges the tasks' parts.
"""
from __future__ import annotations

import os


def add_shard_args(parser, what: str = "work units") -> None:
    """`--num-shards/--shard-index`, defaulting from a SLURM array (SLURM_ARRAY_TASK_COUNT/ID)."""
    g = parser.add_argument_group("sharding (SLURM arrays)")
    g.add_argument("--num-shards", type=int, default=None,
                   help=f"split the {what} over this many array tasks (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    g.add_argument("--shard-index", type=int, default=None,
                   help="this task's index, 0-based (default: $SLURM_ARRAY_TASK_ID minus $SLURM_ARRAY_TASK_MIN, else 0)")


def resolve_shard(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(num_tasks, task_index) from the flags, else from the SLURM array environment, else (1, 0)."""
    env = os.environ
    if num_shards is None:
        num_shards = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if shard_index is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            shard_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        else:
            shard_index = 0
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise SystemExit(f"error: --shard-index {shard_index} is outside 0..{num_shards - 1}")
    return num_shards, shard_index


def my_units(n_units: int, num_tasks: int, task_index: int) -> list[int]:
    """Work units (e.g. DB shards) of one array task: round-robin, so tasks get equal counts +-1."""
    return list(range(task_index, n_units, num_tasks))
