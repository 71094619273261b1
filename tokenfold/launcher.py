"""Run the TokenFold pipeline from Python or a notebook, through submitit.

    from tokenfold.launcher import run_pipeline
    result = run_pipeline("slurm/config/demo.env")            # SLURM when sbatch is on PATH, else local
    result = run_pipeline("slurm/config/demo.env", cluster="local",
                          overrides={"S05_ARGS": "--max-steps 20"})
    for stage in result.stages:
        print(stage.stage, stage.name, stage.status, stage.job_ids, f"{stage.seconds:.0f}s")
    print(result.reports())

    python -m tokenfold.launcher --config slurm/config/demo.env [--cluster local] [--from 05] [--until 04]

It runs the jobs of ``tokenfold.pipeline.plan`` (the plan ``slurm/run_pipeline.sh`` submits), through
the same per-stage scripts (``slurm/NN_*.sbatch``, under bash) and with the same config; only the
submission differs: each job is a submitit job (``AutoExecutor``: SLURM when available, local
processes otherwise), an array job a submitit job array (``map_array``). The launcher waits for each
job before it submits the next, so a notebook sees every stage end; a failed job raises
`StageFailed` (with its log) and nothing after it is submitted. Stages whose final artifact exists are
skipped, so calling it again after a failure resumes from the failed stage.

Resources are the plan's (from the config's S<NN>_* values, see tokenfold/pipeline.py), as submitit
parameters. Requeue after preemption is run_pipeline.sh's job (stage 05's batch script requeues
itself); a stage preempted under the launcher fails, and calling the launcher again resumes it from
its last checkpoint.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .config import ROOT, ConfigError, load_config
from .pipeline import Job, plan

DEFAULT_TIME_MIN = 24 * 60      # a stage with no S<NN>_TIME: this limit (submitit needs one)


class StageFailed(RuntimeError):
    """A stage's job failed; `log` is the path of its output, `tail` its last lines."""

    def __init__(self, stage: str, name: str, job_id: str, log: str, tail: str):
        self.stage, self.name, self.job_id, self.log, self.tail = stage, name, job_id, log, tail
        super().__init__(f"stage {stage} {name} failed (job {job_id}); log: {log}\n{tail}")


@dataclass
class StageRun:
    stage: str
    name: str
    status: str                # skipped (was complete) | completed
    job_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reports: list[str] = field(default_factory=list)


@dataclass
class PipelineRun:
    config: str
    cluster: str
    stages: list[StageRun]

    def reports(self) -> list[str]:
        """The report files (JSON/PNG/TSV) that exist, stage by stage."""
        return [r for s in self.stages for r in s.reports if Path(r).exists()]


class StageCommand:
    """What one submitit job runs: ``bash slurm/NN_*.sbatch ARGS`` in the repo, with the pipeline's
    config values laid over the job's own environment (so SLURM's per-job variables stay right)."""

    def __init__(self, script: str, args: list[str], config_env: Mapping[str, str]):
        self.script, self.args, self.config_env = script, list(args), dict(config_env)

    def __call__(self, shard_index: int | None = None, num_shards: int | None = None) -> dict:
        argv = ["bash", self.script, *self.args]
        if num_shards is not None:
            argv += ["--num-shards", str(num_shards), "--shard-index", str(shard_index)]
        env = {**os.environ, **self.config_env}
        t0 = time.time()
        print("+ " + shlex.join(argv), flush=True)
        # the stage's stderr goes to this job's log as it comes; its last lines also go into the
        # exception, which submitit hands back to the launcher
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True, errors="replace")
        tail: collections.deque = collections.deque(maxlen=12)
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
        rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited with status {rc}; its last lines:\n{''.join(tail)}")
        return {"argv": argv, "seconds": round(time.time() - t0, 1)}


def _minutes(t: str) -> int:
    """SLURM time (D-HH:MM:SS, D-HH:MM, D-HH, HH:MM:SS, MM:SS, MM) -> minutes (rounded up); '' -> the default."""
    if not t:
        return DEFAULT_TIME_MIN
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
    parts = [int(x) for x in t.split(":")]
    if len(parts) == 1:   # D-HH, or MM
        h, m, s = (parts[0], 0, 0) if days else (0, parts[0], 0)
    elif len(parts) == 2:
        h, m, s = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    else:
        h, m, s = parts[-3:]
    return max(1, days * 1440 + h * 60 + m + (1 if s else 0))


def _gigabytes(mem: str) -> float | None:
    """SLURM memory (e.g. 500M, 2G, 1T, plain number = MB) -> GB."""
    if not mem:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", mem.strip().upper())
    if not m:
        raise ValueError(f"cannot read memory size {mem!r}")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "": 1 / 1024, "G": 1, "T": 1024}[m.group(2)]
    return float(m.group(1)) * scale


def executor_parameters(job: Job) -> dict:
    """submitit AutoExecutor parameters for one planned job (slurm_* ones are ignored locally)."""
    r = job.resources
    p: dict = {"name": job.job_name, "timeout_min": _minutes(r.time), "cpus_per_task": r.cpus}
    gb = _gigabytes(r.mem)
    if gb is not None:
        p["mem_gb"] = gb
    if r.gpus:
        p["gpus_per_node"] = r.gpus
    if r.nodes:
        p["nodes"] = int(r.nodes)
    if r.ntasks_per_node:
        p["tasks_per_node"] = int(r.ntasks_per_node)
    for key in ("partition", "account", "qos"):
        if getattr(r, key):
            p[f"slurm_{key}"] = getattr(r, key)
    extra = {}
    for word in r.extra:
        if not word.startswith("--"):
            raise ValueError(f"SBATCH_EXTRA: only --option[=value] words are supported, got {word!r}")
        k, _, v = word[2:].partition("=")
        extra[k] = v or None
    if extra:
        p["slurm_additional_parameters"] = extra
    return p


def _fail(job: Job, sub_job, err: Exception) -> StageFailed:
    log = str(getattr(sub_job.paths, "stderr", ""))
    return StageFailed(job.stage, job.name, str(sub_job.job_id), log, str(err))


def run_pipeline(config: str | os.PathLike | None = None, cluster: str | None = None,
                 overrides: Mapping[str, object] | None = None, start: str | None = None,
                 until: str | None = None, folder: str | os.PathLike | None = None,
                 log=print) -> PipelineRun:
    """Run every unfinished stage, in order, each as submitit job(s); return what ran.

    config: a pipeline .env file (default $TOKENFOLD_CONFIG, else slurm/config/demo.env).
    cluster: None/"auto" (SLURM when available, else local), "slurm", "local" or "debug" (in-process).
    overrides: KEY -> value, as if set in the environment (they win over the file).
    start/until: like run_pipeline.sh --from/--until ("05": redo 05 and later even if complete).
    folder: submitit's log folder (default $LOG_DIR/submitit).
    """
    import submitit

    cfg = load_config(config, overrides=overrides)
    env = cfg.environ({})
    env["TOKENFOLD_ROOT"] = str(ROOT)
    jobs = plan(cfg, start, until)
    log_dir = Path(cfg.lookup("LOG_DIR") or Path(cfg.lookup("TOKENFOLD_DATA", "data")) / "logs")
    if not log_dir.is_absolute():
        log_dir = ROOT / log_dir
    folder = Path(folder) if folder else log_dir / "submitit"
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=None if cluster in (None, "auto") else cluster)
    log(f"tokenfold launcher: config {cfg.path}, executor {executor.cluster}, logs {folder}")

    runs: dict[str, StageRun] = {}
    for job in jobs:
        run = runs.setdefault(job.stage, StageRun(job.stage, job.name, "completed", reports=job.reports))
        if job.status == "complete":
            if run.status != "skipped":
                log(f"stage {job.stage} {job.name}: complete ({job.marker} exists), skipped")
            run.status = "skipped"
            continue
        executor.update_parameters(**executor_parameters(job))
        command = StageCommand(job.script, job.args, env)
        t0 = time.time()
        if job.phase == "array":
            subs = executor.map_array(command, list(range(job.tasks)), [job.tasks] * job.tasks)
        else:
            subs = [executor.submit(command)]
        log(f"stage {job.stage} {job.label}: job(s) {', '.join(str(s.job_id) for s in subs)}")
        for s in subs:
            try:
                s.result()
            except Exception as e:  # FailedJobError, UncompletedJobError, or the stage's own error
                for other in subs:
                    if other is not s and not other.done():
                        other.cancel(check=False)
                raise _fail(job, s, e) from e
        run.job_ids += [str(s.job_id) for s in subs]
        run.seconds += time.time() - t0
        log(f"stage {job.stage} {job.label}: done in {time.time() - t0:.1f}s")
    return PipelineRun(str(cfg.path), executor.cluster, list(runs.values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenfold.launcher", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="pipeline config (default: $TOKENFOLD_CONFIG, else slurm/config/demo.env)")
    ap.add_argument("--cluster", default="auto", choices=["auto", "slurm", "local", "debug"],
                    help="auto: SLURM when sbatch is on PATH, else local processes (default: auto)")
    ap.add_argument("--from", dest="start", metavar="NN", help="redo stage NN and later even if complete")
    ap.add_argument("--until", metavar="NN", help="stop after stage NN")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable), like setting it in the environment")
    a = ap.parse_args(argv)
    overrides = {}
    for kv in a.set:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {kv!r}")
        overrides[k] = v
    try:
        res = run_pipeline(a.config, a.cluster, overrides, a.start, a.until)
    except (StageFailed, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nTokenFold pipeline finished ({res.cluster}). Wall time per stage:")
    for s in res.stages:
        print(f"  {s.stage} {s.name:<24} " + ("skipped (complete)" if s.status == "skipped"
                                              else f"{s.seconds:.1f}s  jobs {','.join(s.job_ids)}"))
    print("Reports:")
    for r in res.reports():
        print(f"  {r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
