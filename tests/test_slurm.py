"""The pipeline on a real SLURM cluster: `sbatch slurm/run_pipeline.sh`, a failure that cancels the
dependants and a re-run that resumes, stage 05 requeueing itself after USR1, the submitit launcher.

Needs a cluster answering on this machine (slurmctld, slurmd, slurmdbd for sacct); as root,
`bash slurm/ci/start-local-slurm.sh` starts one on localhost. Without one these tests skip with a
message, except in CI (TOKENFOLD_CI=1), where that is a failure.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import IN_CI
from test_pipeline import DEMO, FAST, PIPELINE, ROOT, STAGES, clean_env
from tokenfold.config import load_config
from tokenfold.launcher import run_pipeline
from tokenfold.pipeline import plan

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
# the SLURM run tokenizes with the stage-03 codebook (esm kind), so that the 02 -> 03 -> 04 contract
# is exercised too; the local test in test_pipeline.py runs the demo's own kind
SLURM_FAST = {**FAST, "TOKEN_KIND": "esm"}
JOB_TIMEOUT = 900


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def cluster_problem() -> str | None:
    """Why this machine cannot run the SLURM tests, or None."""
    for tool in ("sbatch", "squeue", "sacct", "scontrol", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    try:
        if "is UP" not in _run(["scontrol", "ping"]).stdout:
            return "slurmctld does not answer (scontrol ping)"
        states = _run(["sinfo", "-h", "-o", "%T"]).stdout.split()
        if not any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states):
            return f"no usable node (sinfo states: {states})"
        if _run(["sacct", "-n", "-X", "-S", "now-1minutes"]).returncode != 0:
            return "sacct fails (no slurmdbd accounting)"
    except subprocess.TimeoutExpired as e:
        return f"{e.cmd[0]} timed out"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"TOKENFOLD_CI=1 but no SLURM cluster: {problem} (.ci/run starts one)")
        pytest.skip(f"no SLURM cluster: {problem} (as root: bash slurm/ci/start-local-slurm.sh)")


# ----------------------------------------------------------------------------- helpers
def sacct(ids, duplicates=False) -> list[dict]:
    """sacct rows (JobID, JobName, State, ExitCode) of these jobs; array tasks as <id>_<i>."""
    cmd = ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,JobName,State,ExitCode"]
    if duplicates:
        cmd.insert(1, "--duplicates")
    rows = []
    for line in _run(cmd).stdout.splitlines():
        jid, name, state, code = line.split("|")
        rows.append({"id": jid, "name": name, "state": state.split()[0], "exit": code})
    return rows


def wait_for(ids, timeout=JOB_TIMEOUT) -> list[dict]:
    """Wait until these jobs (and all their array tasks) have left the queue and sacct shows a final
    state for each; return the sacct rows."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"]).stdout.split()
        rows = sacct(ids)
        if not queued and rows and all(r["state"] in TERMINAL for r in rows):
            return rows
        time.sleep(2)
    subprocess.run(["scancel", *ids])
    raise AssertionError(f"jobs {ids} did not finish within {timeout}s: {sacct(ids)}")


def submit_pipeline(env: dict, data: Path, *args) -> tuple[str, list[tuple[str, str, str]]]:
    """`sbatch slurm/run_pipeline.sh --config demo.env ARGS` as a user would; wait for the driver job;
    return its log and the (stage, phase, job id) lines it recorded (empty when it submitted nothing)."""
    before = set((data / "logs").glob("submitted-*.tsv"))
    p = _run(["sbatch", "--parsable", f"--output={data}/driver-%j.out", str(PIPELINE), "--config", str(DEMO), *args],
             cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    driver = p.stdout.strip().split(";")[0]
    rows = wait_for([driver], timeout=120)
    log = (data / f"driver-{driver}.out").read_text()
    assert rows[0]["state"] == "COMPLETED", log
    new = set((data / "logs").glob("submitted-*.tsv")) - before
    assert len(new) <= 1, new
    jobs = [tuple(line.split("\t")) for f in new for line in f.read_text().splitlines()]
    return log, jobs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def job_ids(jobs) -> list[str]:
    return [j for _, _, j in jobs]


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """The reduced demo submitted with `sbatch slurm/run_pipeline.sh`, waited for."""
    data = tmp_path_factory.mktemp("slurm_pipeline")
    env = clean_env(TOKENFOLD_DATA=data, **SLURM_FAST)
    t0 = time.time()
    log, jobs = submit_pipeline(env, data)
    rows = wait_for(job_ids(jobs))
    return {"data": data, "env": env, "log": log, "jobs": jobs, "rows": rows, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- tests
def test_sbatch_pipeline_completes_every_stage(slurm_run):
    jobs, rows, data = slurm_run["jobs"], slurm_run["rows"], slurm_run["data"]
    states = {r["id"]: r["state"] for r in rows}
    assert all(s == "COMPLETED" for s in states.values()), rows
    # one job per stage; arrays of 2 tasks + a finalize job for the sharded stages (S<NN>_ARRAY=2)
    by_stage = {}
    for stage, phase, jid in jobs:
        by_stage.setdefault(stage, []).append(phase)
    assert by_stage == {"01": ["array", "finalize"], "02": ["array", "finalize"], "03": ["job"],
                        "04": ["array", "finalize"], "05": ["job"], "06": ["job"]}
    for stage, phase, jid in jobs:
        if phase == "array":
            assert {f"{jid}_0", f"{jid}_1"} <= set(states), (stage, states)
    # the driver printed the ids and how to watch them
    assert "Submitted jobs:" in slurm_run["log"] and "squeue -j" in slurm_run["log"]
    # each array task did its share of the DB shards, each job left a log
    assert "task 1/2" in (data / "logs" / f"tf-01-prepare_db-{jobs[0][2]}_1.out").read_text()
    # every stage is complete and every report exists
    cfg = load_config(DEMO, env=slurm_run["env"])
    for job in plan(cfg):
        assert job.status == "complete", job
        for r in job.reports:
            assert Path(r).is_file(), r
    print(f"SLURM pipeline (reduced demo, esm tokens): {slurm_run['seconds']:.0f}s")


def test_failed_stage_cancels_dependants_and_rerun_resumes(slurm_run):
    data, env = slurm_run["data"], slurm_run["env"]
    cfg = load_config(DEMO, env=env)
    markers = {j.stage: Path(j.marker) for j in plan(cfg)}
    before = {s: markers[s].stat().st_mtime_ns for s in ("01", "02", "03", "04")}
    # the user starts training over, with a broken flag: 05 fails, 06 must be cancelled, not left pending
    shutil.rmtree(cfg["RUN_DIR"])
    shutil.rmtree(cfg["EVAL_DIR"])
    bad = dict(env, S05_ARGS=env["S05_ARGS"] + " --no-such-flag")
    log, jobs = submit_pipeline(bad, data)
    assert [s for s, _, _ in jobs] == ["05", "06"], jobs          # 01-04 complete: skipped
    for s in ("01", "02", "03", "04"):
        assert re.search(rf"stage {s} \S+: complete .* skipped", log), log
    rows = {r["id"]: r for r in wait_for(job_ids(jobs))}
    assert rows[jobs[0][2]]["state"] == "FAILED" and rows[jobs[0][2]]["exit"] == "2:0", rows
    assert rows[jobs[1][2]]["state"] == "CANCELLED", rows         # --kill-on-invalid-dep=yes
    # fixed: the re-run resubmits only 05 and 06, and finishes
    log, jobs = submit_pipeline(env, data)
    assert [s for s, _, _ in jobs] == ["05", "06"], (jobs, log)
    assert all(r["state"] == "COMPLETED" for r in wait_for(job_ids(jobs))), jobs
    assert {s: markers[s].stat().st_mtime_ns for s in before} == before      # untouched
    assert all(j.status == "complete" for j in plan(cfg))
    # nothing left to do: the driver says so and submits nothing
    log, jobs = submit_pipeline(env, data)
    assert jobs == [] and "Every stage is complete" in log


def test_training_requeues_itself_after_usr1_and_resumes(slurm_run):
    """SLURM's warning signal (--signal=B:USR1@secs, here sent by hand): stage 05 saves, exits 124,
    its batch script requeues the job, and the requeued job resumes from the checkpoint. Two tasks:
    DDP over gloo started by srun, which passes the signal on to both ranks."""
    data = slurm_run["data"]
    run_dir = data / "runs" / "requeue"
    env = dict(slurm_run["env"], RUN_DIR=str(run_dir),
               S05_ARGS="--max-steps 20 --max-tokens 1024 --eval-every 0 --save-every 1000 --log-every 1")
    p = _run(["sbatch", "--parsable", f"--output={data}/requeue-%j.out", "--ntasks=2", "--cpus-per-task=1",
              # --overwrite, as run_pipeline.sh --from passes it: the requeued job must resume, not restart
              str(ROOT / "slurm" / "05_train_lm.sbatch"), "--overwrite"], cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    jid = p.stdout.strip()
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and any(r["split"] == "train" for r in read_jsonl(metrics))):  # training runs
        assert time.time() < deadline, (data / f"requeue-{jid}.out").read_text()
        time.sleep(0.5)
    assert _run(["scancel", "--batch", "--signal=USR1", jid]).returncode == 0
    rows = wait_for([jid], timeout=JOB_TIMEOUT)
    log = (data / f"requeue-{jid}.out").read_text()
    assert rows[0]["state"] == "COMPLETED", log
    states = [r["state"] for r in sacct([jid], duplicates=True)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    assert "got SIGUSR1" in log and f"requeueing job {jid}" in log, log
    assert "stage 05 (restart 1)" in log and re.search(r"resumed from .*step_0*\d+", log), log
    assert "srun" in log and "rank 1/2" in log and log.count("received SIGUSR1") == 2, log
    assert (run_dir / "final").is_dir()
    assert max(r["step"] for r in read_jsonl(metrics) if r["split"] == "train") == 20


def test_launcher_submits_stages_with_submitit(slurm_run):
    """The Python launcher on SLURM: 06 redone as a submitit job array (2 tasks) + finalize job."""
    env = slurm_run["env"]
    overrides = {k: env[k] for k in SLURM_FAST} | {"TOKENFOLD_DATA": env["TOKENFOLD_DATA"], "S06_ARRAY": "2"}
    res = run_pipeline(DEMO, cluster="slurm", overrides=overrides, start="06")
    assert res.cluster == "slurm"
    status = {s.stage: s.status for s in res.stages}
    assert status == {**{s: "skipped" for s in STAGES[:5]}, "06": "completed"}
    ids = res.stages[-1].job_ids
    assert len(ids) == 3 and ids[0].endswith("_0") and ids[1].endswith("_1"), ids   # array + finalize
    # submitit has the result once the job wrote it; SLURM records the end a moment later
    rows = wait_for(sorted({i.split("_")[0] for i in ids}), timeout=120)
    assert len(rows) == 3 and all(r["state"] == "COMPLETED" for r in rows), rows
    assert any(r.endswith("metrics.json") for r in res.reports())
