"""Stage 05 data parallelism: launch detection (torchrun, srun) and DDP over gloo on two CPU processes
giving the losses of one process with the same global batch."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import torch

from conftest import ROOT, SMALL_MODEL, foldseek_chains, metric_records, write_threedi_tokens
from tokenfold.distributed import detect_launch, expand_nodelist, slurm_master_addr
from tokenfold.stop import EXIT_OK
from tokenfold.train import train
from tokenfold.train_config import TrainConfig

torch.set_num_threads(1)


def test_expand_nodelist():
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert expand_nodelist("a[098-101]") == ["a098", "a099", "a100", "a101"]


def test_detect_launch(monkeypatch):
    assert detect_launch({}).launcher == "single"
    t = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h1", "MASTER_PORT": "1234"})
    assert (t.launcher, t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port) == \
        ("torchrun", 3, 8, 1, "h1", 1234)
    # srun: ranks from SLURM, master = first host of the step's node list (scontrol absent here -> our parser)
    monkeypatch.setenv("PATH", "/nonexistent")
    s = detect_launch({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                       "SLURM_STEP_NODELIST": "gpu[12-13]", "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4242"})
    assert (s.launcher, s.rank, s.world_size, s.local_rank, s.master_addr, s.master_port) == \
        ("slurm", 5, 8, 1, "gpu12", 24242)
    assert slurm_master_addr("c[3-4]") == "c3"
    # a batch script that runs python itself (no srun step) must not wait for ranks that never come
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}).launcher == "single"
    # one task under srun is a single process too
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}).world_size == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_equal_one_process(tmp_path):
    chains = foldseek_chains(30, 120)
    tok = write_threedi_tokens(tmp_path / "tok", {"train": chains[:24], "val": chains[24:30]})
    common = dict(preset="tiny", max_steps=5, lr=2e-3, max_tokens=600, eval_every=5, save_every=0, log_every=1,
                  threads=1, eval_max_examples=None, device="cpu")
    # one process, 2 micro-batches per step
    one = train(TrainConfig(tokens=str(tok), out=str(tmp_path / "one"), model_overrides=SMALL_MODEL, grad_accum=2, **common))
    assert one.exit_code == EXIT_OK

    # two processes launched the way srun does (SLURM_* variables), gloo, 1 micro-batch each
    port = _free_port()
    cmd = [sys.executable, str(ROOT / "05_train_lm.py"), "--tokens", str(tok), "--out", str(tmp_path / "two"),
           "--preset", "tiny", *sum((["--set", f"{k}={v}"] for k, v in SMALL_MODEL.items()), []), "--max-steps", "5",
           "--lr", "2e-3", "--max-tokens", "600", "--grad-accum", "1", "--eval-every", "5", "--save-every", "0",
           "--log-every", "1", "--threads", "1", "--eval-max-examples", "100000", "--device", "cpu"]
    procs, logs = [], []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
               "SLURM_JOB_ID": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        logs.append(open(tmp_path / f"rank{rank}.log", "w"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    for p, f in zip(procs, logs):
        p.wait(timeout=400)
        f.close()
    for r, p in enumerate(procs):
        assert p.returncode == EXIT_OK, (tmp_path / f"rank{r}.log").read_text()[-3000:]

    cfg2 = json.loads((tmp_path / "two" / "run_config.json").read_text())
    assert cfg2["world_size"] == 2 and cfg2["launcher"] == "slurm"
    a, b = metric_records(tmp_path / "one", "train"), metric_records(tmp_path / "two", "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["tokens_seen"] for r in b] == [r["tokens_seen"] for r in a]      # same global batches
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=2e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=2e-4)
    va, vb = metric_records(tmp_path / "one", "val")[-1], metric_records(tmp_path / "two", "val")[-1]
    assert va["n_struct"] == vb["n_struct"]
    np.testing.assert_allclose(vb["loss"], va["loss"], rtol=2e-5)
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
