"""The pipeline orchestration without SLURM: the job plan (tokenfold/pipeline.py), what
run_pipeline.sh submits (against a stand-in sbatch), the local chain, and the submitit launcher on
local processes. (tests/test_slurm.py runs the same chain on a real cluster; tests/test_config.py
tests the config files.)"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenfold.config import ConfigError, load_config, parse_config
from tokenfold.pipeline import plan

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "slurm" / "run_pipeline.sh"
DEMO = ROOT / "slurm" / "config" / "demo.env"
CONFIGS = sorted((ROOT / "slurm" / "config").glob("*.env"))
STAGES = ["01", "02", "03", "04", "05", "06"]

# The reduced-size demo the end-to-end tests run (here and in test_slurm.py): the demo config with a
# few values overridden from the environment, which is also how users override it.
FAST = {
    "S03_ARGS": "--n-init 1 --max-iter 20",
    "S05_ARGS": "--max-steps 4 --max-tokens 4096 --eval-every 0 --save-every 1000 --log-every 1",
    "S06_ARGS": "--max-proteins 3 --n-pdb 1 --no-unconstrained",
}


def clean_env(**extra) -> dict:
    """The test process's environment without any pipeline config key (so the file's values count)."""
    cfg_keys = set()
    for c in CONFIGS:
        cfg_keys |= set(parse_config(c.read_text(), env={}))
    env = {k: v for k, v in os.environ.items() if k not in cfg_keys and not k.startswith("SLURM_")
           and k not in ("TOKENFOLD_CONFIG", "TOKENFOLD_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_slurm_time_limits_in_minutes():
    from tokenfold.launcher import _minutes

    assert [_minutes(t) for t in ("30", "10:30", "1:00:00", "2-12", "2-12:30", "1-00:00:01")] == \
        [30, 11, 60, 3600, 3630, 1441]


# ----------------------------------------------------------------------------- the job plan
def test_plan_demo_arrays_finalize_jobs_and_selection(tmp_path):
    env = clean_env(TOKENFOLD_DATA=tmp_path)
    jobs = plan(load_config(DEMO, env=env))
    assert [(j.stage, j.phase) for j in jobs] == [
        ("01", "array"), ("01", "finalize"), ("02", "array"), ("02", "finalize"), ("03", "job"),
        ("04", "array"), ("04", "finalize"), ("05", "job"), ("06", "job")]
    assert all(j.status == "todo" for j in jobs)
    assert jobs[0].tasks == 2 and jobs[1].args == ["--finalize"]
    # 05 asks SLURM for its warning signal, to save and requeue in time
    assert f"--signal=B:USR1@{load_config(DEMO, env=env)['S05_SIGNAL_SECS']}" in jobs[7].resources.sbatch_options()
    # --from/--until, and STAGES for pipelines that need no ESM-2
    sel = plan(load_config(DEMO, env=env), start="04", until="05")
    assert [j.stage for j in sel] == ["01", "01", "02", "02", "03", "04", "04", "05"]
    assert sel[5].args == ["--overwrite"] and sel[0].args == []
    assert [j.stage for j in plan(load_config(DEMO, env=dict(env, STAGES="01 04 05 06", S04_ARRAY="1")))] == \
        ["01", "01", "04", "05", "06"]
    with pytest.raises(ConfigError, match="unknown stage '07'"):
        plan(load_config(DEMO, env=dict(env, STAGES="01 07")))
    # on one machine every stage is one job that finalizes itself
    assert [(j.stage, j.phase, j.tasks, j.args) for j in plan(load_config(DEMO, env=env), until="02", local=True)] == \
        [("01", "job", 1, []), ("02", "job", 1, [])]
    # a stage whose marker exists is complete; --from redoes it
    Path(jobs[0].marker).parent.mkdir(parents=True)
    Path(jobs[0].marker).write_text("{}")
    assert [j.status for j in plan(load_config(DEMO, env=env), until="02")] == ["complete"] * 2 + ["todo"] * 2
    assert [j.status for j in plan(load_config(DEMO, env=env), start="01", until="01")] == ["todo"] * 2


def test_geo_tokens_fit_the_codebook_in_a_job_before_stage_04(tmp_path):
    """TOKEN_KIND=geo: stage 04 starts with one job that fits the geo codebook (S04_FIT_* resources,
    else S04_*); the tokenizing jobs come after it, on SLURM and on one machine."""
    env = clean_env(TOKENFOLD_DATA=tmp_path, TOKEN_KIND="geo", S04_ARGS="--geo-k 64")
    jobs = [j for j in plan(load_config(DEMO, env=env)) if j.stage == "04"]
    assert [(j.phase, j.tasks) for j in jobs] == [("fit", 1), ("array", 2), ("finalize", 1)]
    fit = jobs[0]
    assert fit.args == ["--fit-geo-codebook"] and fit.script == "slurm/04_tokenize.sbatch"
    assert fit.job_name == "tf-04-tokenize-fit"
    assert fit.resources == jobs[1].resources                        # nothing of its own: S04_*
    fit = plan(load_config(DEMO, env=dict(env, S04_FIT_CPUS="3", S04_FIT_TIME="01:00:00")))[5]
    assert (fit.phase, fit.resources.cpus, fit.resources.time, fit.resources.mem) == ("fit", 3, "01:00:00", "2G")
    # --from 04 redoes the tokens (--overwrite); the fit job only verifies the codebook, keyed on its inputs
    redo = [j for j in plan(load_config(DEMO, env=env), start="04") if j.stage == "04"]
    assert [j.args for j in redo] == [["--fit-geo-codebook"], ["--overwrite"], ["--finalize", "--overwrite"]]
    local = [(j.phase, j.args) for j in plan(load_config(DEMO, env=env), local=True) if j.stage == "04"]
    assert local == [("fit", ["--fit-geo-codebook"]), ("job", [])]
    # other kinds need no fit job
    assert not [j for j in plan(load_config(DEMO, env=clean_env(TOKENFOLD_DATA=tmp_path))) if j.phase == "fit"]


RULES = """# resources: what each job asks for, from S<NN>_* keys and the cluster-wide ones
TOKENFOLD_DATA=/nonexistent
PARTITION=cpu
GPU_PARTITION=gpu
ACCOUNT=acct
GPU_GRES=gpu:a100
SBATCH_EXTRA="--constraint=x"
TOKEN_KIND=geo
S01_ARRAY=4
S01_CPUS=2
S01_MEM=3G
S01_FIN_CPUS=9
S02_ARRAY=2
S02_GPUS=1
S03_GPUS=1
S03_PARTITION=special
S04_ARRAY=2
S04_CPUS=4
S04_GPUS=1
S04_FIT_MEM=50G
S04_SBATCH_EXTRA=--exclusive
S05_NODES=2
S05_NTASKS_PER_NODE=4
S05_GPUS=4
S05_SIGNAL_SECS=600
S06_ARRAY=2
S06_NODES=2
S06_FIN_GPUS=1
"""


def test_plan_resources_follow_the_rules(tmp_path):
    """Finalize jobs read S<NN>_FIN_* first and ask for no GPU unless told; the fit job reads S04_FIT_*
    first and inherits everything else, GPUs included; fit and finalize jobs are one task. GPU jobs
    go to GPU_PARTITION with --gres, the others to PARTITION; S<NN>_PARTITION wins over both."""
    cfg_file = tmp_path / "rules.env"
    cfg_file.write_text(RULES)
    jobs = plan(load_config(cfg_file, env=clean_env()))
    opts = {(j.stage, j.phase): j.resources.sbatch_options() for j in jobs}
    assert opts["01", "array"] == ["--cpus-per-task=2", "--mem=3G", "--partition=cpu", "--account=acct",
                                   "--constraint=x"]
    assert opts["01", "finalize"] == ["--cpus-per-task=9", "--mem=3G", "--partition=cpu", "--account=acct",
                                      "--constraint=x"]
    assert {"--gres=gpu:a100:1", "--partition=gpu"} <= set(opts["02", "array"])
    assert "--partition=cpu" in opts["02", "finalize"] and not any(o.startswith("--gres") for o in opts["02", "finalize"])
    assert {"--gres=gpu:a100:1", "--partition=special"} <= set(opts["03", "job"])
    assert opts["04", "fit"] == ["--cpus-per-task=4", "--mem=50G", "--gres=gpu:a100:1", "--partition=gpu",
                                 "--account=acct", "--constraint=x", "--exclusive"]
    assert {"--gres=gpu:a100:4", "--nodes=2", "--ntasks-per-node=4", "--signal=B:USR1@600", "--partition=gpu"} \
        <= set(opts["05", "job"])
    assert "--nodes=2" in opts["06", "array"] and not any(o.startswith("--nodes") for o in opts["06", "finalize"])
    assert {"--gres=gpu:a100:1", "--partition=gpu"} <= set(opts["06", "finalize"])
    assert [j for j, o in opts.items() if any(x.startswith("--signal") for x in o)] == [("05", "job")]
    bad = tmp_path / "bad.env"
    bad.write_text("S01_CPUS=two\n")
    with pytest.raises(ConfigError, match="S01_CPUS must be a whole number"):
        plan(load_config(bad, env=clean_env()))
    for config in CONFIGS:                  # the shipped configs plan
        assert plan(load_config(config, env=clean_env(USER="alice", TOKENFOLD_DATA="/nonexistent")))


# ----------------------------------------------------------------------------- what run_pipeline.sh submits
FAKE_SBATCH = """#!/bin/bash
# a stand-in for sbatch: records its arguments (one shell-quoted line per call), answers a job id
n=0; [ -f "$FAKE_SBATCH_LOG" ] && n=$(wc -l < "$FAKE_SBATCH_LOG")
printf '%q ' "$@" >> "$FAKE_SBATCH_LOG"; echo >> "$FAKE_SBATCH_LOG"
echo "$((1000 + n));fake"
"""


def fake_sbatch_env(tmp_path: Path, **extra) -> dict:
    """clean_env with a stand-in sbatch first on PATH (its calls go to tmp_path/sbatch.log)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = clean_env(TOKENFOLD_DATA=tmp_path / "data", FAKE_SBATCH_LOG=tmp_path / "sbatch.log", **extra)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def test_run_pipeline_submits_each_job_after_the_one_before(tmp_path):
    """The chain: every job waits for the previous one (afterok, cancelled when it fails), arrays get
    --array and their own log names, each job asks for its planned resources; the geo fit job
    precedes stage 04's array. --plan prints the plan."""
    env = fake_sbatch_env(tmp_path, TOKEN_KIND="geo")
    p = subprocess.run(["bash", str(PIPELINE), "--config", str(DEMO)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    calls = [shlex.split(line) for line in (tmp_path / "sbatch.log").read_text().splitlines()]
    jobs = plan(load_config(DEMO, env=env))
    assert len(calls) == len(jobs) == 10
    for i, (call, job) in enumerate(zip(calls, jobs)):
        k = call.index(job.script)
        opts, args = call[:k], call[k + 1:]
        assert args == job.args and f"--job-name={job.job_name}" in opts
        assert {"--parsable", f"--chdir={ROOT}", "--kill-on-invalid-dep=yes"} <= set(opts)
        assert [o for o in opts if o.startswith("--dependency")] == ([f"--dependency=afterok:{1000 + i - 1}"] if i else [])
        assert set(job.resources.sbatch_options()) <= set(opts)
        assert [o for o in opts if o.startswith("--array")] == (["--array=0-1"] if job.phase == "array" else [])
    fit, array = calls[5], calls[6]
    assert fit[-1] == "--fit-geo-codebook" and "--job-name=tf-04-tokenize-fit" in fit
    assert "--dependency=afterok:1005" in array and "--job-name=tf-04-tokenize" in array
    record = next((tmp_path / "data" / "logs").glob("submitted-*.tsv")).read_text().splitlines()
    assert [tuple(r.split("\t")) for r in record] == [(j.stage, j.phase, str(1000 + i)) for i, j in enumerate(jobs)]
    assert "Submitted jobs: " + " ".join(str(1000 + i) for i in range(10)) in p.stdout
    # --plan: the same jobs, for people; nothing submitted
    out = subprocess.run(["bash", str(PIPELINE), "--plan", "--config", str(DEMO)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("# config=") and out[0].endswith("mode=slurm")
    assert out[1:] == [j.shell_line() for j in jobs]
    assert len((tmp_path / "sbatch.log").read_text().splitlines()) == 10
    bad = subprocess.run(["bash", str(PIPELINE), "--plan"], cwd=ROOT, env=dict(env, STAGES="01 07"),
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown stage '07'" in bad.stderr


FAKE_PYTHON = """#!/bin/bash
# a stand-in for the stage scripts (records their command lines); anything else runs in Python
case ${1:-} in 0[1-6]_*.py) printf '%s\\n' "$*" >> "$FAKE_PY_LOG"; exit 0 ;; esac
exec "$REAL_PYTHON" "$@"
"""


def test_local_chain_fits_the_geo_codebook_before_stage_04(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = clean_env(TOKENFOLD_DATA=tmp_path / "data", TOKEN_KIND="geo", PYTHON=fake, REAL_PYTHON=sys.executable,
                    FAKE_PY_LOG=tmp_path / "calls.log")
    p = subprocess.run(["bash", str(PIPELINE), "--local", "--config", str(DEMO), "--until", "04"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    calls = [line.split() for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert [(c[0], "--fit-geo-codebook" in c) for c in calls] == [
        ("01_prepare_db.py", False), ("02_extract_esm_embeddings.py", False), ("03_train_codebook.py", False),
        ("04_tokenize.py", True), ("04_tokenize.py", False)]
    assert calls[3][calls[3].index("--tokens") + 1] == "geo"
    times = [line.split("\t")[:3] for line in (tmp_path / "data" / "logs" / "local-stage-times.tsv").read_text().splitlines()]
    assert times[3:] == [["04", "tokenize-fit", "ran"], ["04", "tokenize", "ran"]]
    assert (tmp_path / "data" / "logs" / "04-tokenize-fit.log").is_file()


# ----------------------------------------------------------------------------- the local chain
@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`bash slurm/run_pipeline.sh --local` on the reduced demo (what `make demo` runs, smaller)."""
    data = tmp_path_factory.mktemp("local_pipeline")
    env = clean_env(TOKENFOLD_DATA=data, **FAST)
    p = subprocess.run(["bash", str(PIPELINE), "--local", "--config", str(DEMO)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1500)
    return {"data": data, "env": env, "proc": p}


@pytest.mark.slow
def test_local_chain_runs_every_stage_and_lists_the_reports(local_run):
    p, data, env = local_run["proc"], local_run["data"], local_run["env"]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    starts = [re.search(rf"stage {s} \S+: running", p.stderr).start() for s in STAGES]
    assert starts == sorted(starts)                                    # in order
    times = [line.split("\t") for line in (data / "logs" / "local-stage-times.tsv").read_text().splitlines()]
    assert [(t[0], t[2]) for t in times] == [(s, "ran") for s in STAGES]
    print("local reduced demo, seconds per stage:", {t[0]: float(t[3]) for t in times})
    cfg = load_config(DEMO, env=env)
    jobs = plan(cfg)
    assert all(j.status == "complete" for j in jobs)
    for j in jobs:
        for r in j.reports:
            assert Path(r).is_file(), r
            assert f"  {j.stage}  {r}" in p.stdout                      # printed at the end
    # the demo's ESM-2 is random, and says so
    emb = json.loads((Path(cfg["EMB_DIR"]) / "manifest.json").read_text())
    assert emb["random_weights"] is True


def shadow_path_without(tmp_path: Path, names: set[str]) -> str:
    """A PATH with the same programs as ours except `names` (e.g. no sbatch: 'no SLURM here')."""
    shadow = tmp_path / "bin"
    shadow.mkdir()
    for d in os.environ["PATH"].split(":"):
        if not os.path.isdir(d):
            continue
        for exe in os.scandir(d):
            if exe.name not in names and not (shadow / exe.name).exists() and os.access(exe.path, os.X_OK):
                (shadow / exe.name).symlink_to(exe.path)
    return f"{Path(sys.executable).parent}:{shadow}"


@pytest.mark.slow
def test_without_sbatch_the_chain_runs_locally_and_skips_complete_stages(local_run, tmp_path):
    env = dict(local_run["env"], PATH=shadow_path_without(tmp_path, {"sbatch", "srun", "squeue"}))
    p = subprocess.run(["bash", str(PIPELINE), "--config", str(DEMO)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "sbatch not found on PATH: running every stage locally" in p.stderr
    for s in STAGES:
        assert re.search(rf"stage {s} \S+: complete .* skipped", p.stderr), p.stderr


@pytest.mark.slow
def test_train_script_passes_the_requeue_status_through_locally(local_run):
    """Outside SLURM, 05's batch script returns 05's 'saved, run again' status (124), and running
    it again resumes the run to the end."""
    run_dir = local_run["data"] / "runs" / "sliced"
    env = dict(local_run["env"], RUN_DIR=str(run_dir), S05_ARGS="--max-steps 4 --max-tokens 2048 --eval-every 0")
    script = ["bash", str(ROOT / "slurm" / "05_train_lm.sbatch")]
    p = subprocess.run([*script, "--stop-after-steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 124, p.stderr[-2000:]
    assert "run the same command again to resume" in p.stderr
    p = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "resumed from" in p.stderr, p.stderr[-2000:]
    assert (run_dir / "final").is_dir()


@pytest.mark.slow
def test_local_failure_stops_the_chain_and_the_launcher_resumes_it(local_run):
    """A stage that fails locally stops the chain with its log named; the submitit launcher (local
    processes) then resumes from that stage, as a 2-task array + finalize; a failing stage raises."""
    from tokenfold.launcher import StageFailed, run_pipeline

    env, data = local_run["env"], local_run["data"]
    cfg = load_config(DEMO, env=env)
    shutil.rmtree(cfg["EVAL_DIR"])
    bad = dict(env, S06_ARGS=env["S06_ARGS"] + " --no-such-flag")
    p = subprocess.run(["bash", str(PIPELINE), "--local", "--config", str(DEMO)], cwd=ROOT, env=bad,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "stage 06 evaluate FAILED" in p.stderr and "06-evaluate.log" in p.stderr
    assert "unrecognized arguments: --no-such-flag" in (data / "logs" / "06-evaluate.log").read_text()

    overrides = {k: env[k] for k in FAST} | {"TOKENFOLD_DATA": str(data), "S06_ARRAY": "2"}
    with pytest.raises(StageFailed, match="stage 06 evaluate failed") as e:
        run_pipeline(DEMO, cluster="local", overrides=overrides | {"S06_ARGS": bad["S06_ARGS"]}, log=lambda m: None)
    assert "--no-such-flag" in e.value.tail
    res = run_pipeline(DEMO, cluster="local", overrides=overrides)
    assert res.cluster == "local"
    assert {s.stage: s.status for s in res.stages} == {**{s: "skipped" for s in STAGES[:5]}, "06": "completed"}
    assert len(res.stages[-1].job_ids) == 3                              # 2 array tasks + finalize
    assert (Path(cfg["EVAL_DIR"]) / "metrics.json").is_file()
    assert str(Path(cfg["EVAL_DIR"]) / "metrics.json") in res.reports()


@pytest.mark.parametrize("name, ranks, lora", [("llama31_8b_lora.env", 8, 64), ("qwen_interleaved.env", 4, 0)])
def test_big_model_configs_plan_and_their_stage05_flags_parse(name, ranks, lora, tmp_path):
    """The two pretrained-LLM recipes plan (one stage-05 job: one node, one task per GPU, requeued on
    USR1), and their S05_ARGS are flags stage 05 accepts, with the recipes' settings."""
    import importlib.util

    from tokenfold.model_setup import check_settings

    cfg = load_config(ROOT / "slurm" / "config" / name, env=clean_env(TOKENFOLD_DATA=tmp_path, USER="alice"))
    (j05,) = [j for j in plan(cfg) if j.stage == "05"]
    r = j05.resources
    assert (r.nodes, r.ntasks_per_node, r.gpus) == ("1", str(ranks), ranks) and cfg["MODEL_PRESET"] == ""
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "05_train_lm.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    tc = cli.config_from_args(cli.build_parser().parse_args(
        ["--tokens", cfg["TOKENS_DIR"], "--out", cfg["RUN_DIR"], *cfg.words("S05_ARGS")]))
    check_settings(tc)
    assert tc.fsdp and tc.grad_checkpointing and tc.init_from and tc.lora_rank == lora
    if lora:   # Structure Search: r=64, alpha=128, dropout 0.05 on q/k/v/o and gate/up/down; 3Di, plain layout
        assert (tc.lora_alpha, tc.lora_dropout) == (128, 0.05) and cfg["TOKEN_KIND"] == "3di"
        assert set(tc.lora_targets.split(",")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
        assert "--interleaved" not in cfg.words("S04_ARGS") and "02" not in cfg["STAGES"]
    else:      # the ESM-2 tokenizer project: Qwen, 512 ESM structure tokens, interleaved
        assert "Qwen" in tc.init_from and cfg["TOKEN_KIND"] == "esm" and cfg["CODEBOOK_K"] == "512"
        assert "--interleaved" in cfg.words("S04_ARGS") and cfg["TOKENS_DIR"].endswith("esm_interleaved")
