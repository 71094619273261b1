"""Data-parallel training (DDP) on one CPU, one GPU, or many GPUs over many nodes.

Who launched us decides the ranks (`detect_launch`), in this order:

1. **torchrun** (or anything that sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
   ``MASTER_PORT``): used as given. ``torchrun --nproc-per-node 8 05_train_lm.py ...``.
2. **srun** (one task per GPU: ``srun --ntasks-per-node=8 --gpus-per-task=1 python 05_train_lm.py``):
   rank = ``SLURM_PROCID``, world size = ``SLURM_STEP_NUM_TASKS`` (set by srun for the step; falls
   back to ``SLURM_NTASKS``), local rank = ``SLURM_LOCALID``. The master is the first host of the
   step's node list (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``), expanded with
   ``scontrol show hostnames``; where ``scontrol`` is not on PATH we expand the list ourselves
   (`expand_nodelist`: ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5). ``MASTER_PORT``
   when set, else 20000 + SLURM_JOB_ID mod 20000, so two jobs sharing a node do not collide.
   A batch script running python directly (``SLURM_NTASKS`` > 1 but no srun step) runs as a single
   process, with a warning, rather than waiting forever for ranks that will never come.
3. Otherwise one process.

Backend: NCCL when the processes drive GPUs, gloo on CPU. Each rank drives ``cuda:LOCAL_RANK``.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("tokenfold.distributed")


@dataclass
class Launch:
    launcher: str          # "single" | "torchrun" | "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, e.g. ``a[1-3,05],b`` -> a1 a2 a3 a05 b.

    Handles ranges with zero padding and several bracket groups per name (``r[1-2]n[3-4]``).
    """
    hosts: list[str] = []
    # split on commas outside brackets
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.search(r"\[([^\]]+)\]", part)
        if not m:
            hosts.append(part)
            continue
        prefix, suffix = part[: m.start()], part[m.end():]
        for item in m.group(1).split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                names = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                names = [item]
            for name in names:
                hosts.extend(expand_nodelist(prefix + name + suffix))  # further bracket groups
    return hosts


def slurm_master_addr(nodelist: str) -> str:
    """First host of a SLURM node list: `scontrol show hostnames` when available, else our parser."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (FileNotFoundError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pass
    return expand_nodelist(nodelist)[0]


def detect_launch(env=None) -> Launch:
    """Ranks and rendezvous address from the environment (see the module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env:
        step_tasks = env.get("SLURM_STEP_NUM_TASKS")
        world = int(step_tasks or env.get("SLURM_NTASKS", 1))
        if world > 1 and step_tasks is None:
            log.warning("SLURM_NTASKS=%s but this is not an srun step: running as ONE process "
                        "(launch with srun or torchrun for data parallelism)", world)
            return Launch("single")
        if world > 1:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = env.get("MASTER_ADDR") or (slurm_master_addr(nodelist) if nodelist else "127.0.0.1")
            port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
            return Launch("slurm", int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), addr, port)
    return Launch("single")


@dataclass
class Dist:
    """What the training loop needs to know about the process group."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str
    owns_group: bool = False   # we created the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no-op for one process). Returns `t`."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` on every rank (small picklable objects only: RNG states, flags)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init(device: str = "auto", timeout_min: float = 30.0, group_of_one: bool = False) -> Dist:
    """Join (or create) the process group; pick this rank's device ('auto': cuda:LOCAL_RANK if any GPU).
    `group_of_one`: a single process still gets a process group (of one rank, FSDP needs one)."""
    from .device import pick_device

    launch = detect_launch()
    dev = pick_device(device, launch.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if launch.world_size == 1:
        if not group_of_one or dist.is_initialized():
            return Dist(0, 1, 0, dev, launch.launcher)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return Dist(0, 1, 0, dev, launch.launcher, owns_group=True)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), launch.local_rank, dev, launch.launcher)
    # env:// rendezvous, whoever launched us
    os.environ.update(MASTER_ADDR=str(launch.master_addr), MASTER_PORT=str(launch.master_port),
                      RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    kw = dict(backend=backend, rank=launch.rank, world_size=launch.world_size, timeout=timedelta(minutes=timeout_min))
    if dev.type == "cuda":
        kw["device_id"] = dev
    dist.init_process_group(**kw)
    log.info("rank %d/%d (local %d) on %s, %s via %s, master %s:%s", launch.rank, launch.world_size,
             launch.local_rank, dev, backend, launch.launcher, launch.master_addr, launch.master_port)
    return Dist(launch.rank, launch.world_size, launch.local_rank, dev, launch.launcher, owns_group=True)
