"""Stage 05 with FSDP2 (tokenfold/fsdp.py) on CPU/gloo: 2 processes give the losses of 1 process (to
rtol 1e-6), sharded (DCP) checkpoints resume exactly, also with another number of ranks, and the
final/ of a sharded run is a plain transformers checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import ROOT, SMALL_MODEL, foldseek_chains, metric_records, write_threedi_tokens
from test_distributed import _free_port
from tokenfold import checkpoint as ckpt
from tokenfold.stop import EXIT_OK, EXIT_REQUEUE
from tokenfold.train import train
from tokenfold.train_config import TrainConfig

torch.set_num_threads(1)
COMMON = dict(max_steps=6, lr=5e-3, max_tokens=700, eval_every=3, save_every=0, log_every=1, threads=1,
              eval_max_examples=None, device="cpu")


def _tokens(tmp_path, n_val=4):
    chains = foldseek_chains(30, 100)
    return write_threedi_tokens(tmp_path / "tok", {"train": chains[:16], "val": chains[16:16 + n_val]})


def test_fsdp_sharded_checkpoints_resume_exactly(tmp_path):
    """A from-scratch preset run on FSDP2 (one rank): stopped and resumed from its sharded checkpoints, it
    equals the uninterrupted run; final/ is a plain checkpoint with the same weights."""
    tok = _tokens(tmp_path)
    cfg = dict(tokens=str(tok), preset="tiny", model_overrides=SMALL_MODEL, grad_accum=2, fsdp=True, **COMMON)
    assert train(TrainConfig(out=str(tmp_path / "ref"), **cfg)).exit_code == EXIT_OK
    run = tmp_path / "resumed"
    assert train(TrainConfig(out=str(run), stop_after_steps=4, **cfg)).exit_code == EXIT_REQUEUE
    step = ckpt.latest_checkpoint(run)
    assert ckpt.weights_kind(step) == "sharded" and (step / "sharded" / ".metadata").exists()
    assert not (step / "model.safetensors").exists() and "optimizer" not in ckpt.load_trainer_state(step)
    assert train(TrainConfig(out=str(run), **cfg)).exit_code == EXIT_OK
    np.testing.assert_allclose([r["loss"] for r in metric_records(run)],
                               [r["loss"] for r in metric_records(tmp_path / "ref")], rtol=1e-6, atol=0)
    a, b = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(b[k], a[k], rtol=1e-6, atol=1e-7) for k in a)
    assert ckpt.weights_kind(run / "final") == "hf"


def _launch(tmp_path, name, args, srun: bool):
    """05_train_lm.py on 2 gloo processes, ranks from torchrun's variables or srun's (SLURM_*)."""
    port = _free_port()
    cmd = [sys.executable, str(ROOT / "05_train_lm.py"), *args]
    procs, logs = [], []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
               and not k.startswith("SLURM_")}
        env.update(PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if srun:
            env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2",
                       SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="1")
        else:
            env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        logs.append(open(tmp_path / f"{name}.rank{rank}.log", "w"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    for p, f in zip(procs, logs):
        p.wait(timeout=600)
        f.close()
    return [p.returncode for p in procs], (tmp_path / f"{name}.rank0.log").read_text()[-3000:]


def test_fsdp_lora_two_processes_equal_one_process_and_resume_on_one(tmp_path, random_llm):
    """The 8B recipe's path at toy size: --init-from + LoRA + FSDP2 on 2 gloo processes (srun-style ranks),
    1 micro-batch each, stopped at step 4; resumed by ONE process (2 micro-batches: the same global
    batch), which reads the 2 ranks' shards. Every loss equals one process training alone throughout.
    One validation example: rank 1 has no validation batch, and its FSDP forwards must still match rank 0's."""
    tok = _tokens(tmp_path, n_val=1)
    llm = random_llm("llama")
    lora = dict(init_from=str(llm), lora_rank=4, lora_dropout=0.0)
    one = train(TrainConfig(tokens=str(tok), out=str(tmp_path / "one"), grad_accum=2, **lora, **COMMON))
    assert one.exit_code == EXIT_OK
    run = tmp_path / "two"
    args = ["--tokens", str(tok), "--out", str(run), "--init-from", str(llm), "--lora-rank", "4", "--lora-dropout",
            "0", "--fsdp", "--grad-accum", "1", "--stop-after-steps", "4",
            *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in COMMON.items() if k != "eval_max_examples"), []),
            "--eval-max-examples", "100000"]
    codes, log = _launch(tmp_path, "two", args, srun=True)
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], log
    step = ckpt.latest_checkpoint(run)
    assert len(list((step / "sharded").glob("*.distcp"))) == 2 and ckpt.load_trainer_state(step)["world_size"] == 2
    assert json.loads((run / "run_config.json").read_text())["launcher"] == "slurm"
    res = train(TrainConfig(tokens=str(tok), out=str(run), grad_accum=2, fsdp=True, **lora, **COMMON))
    assert res.exit_code == EXIT_OK and res.step == 6
    a, b = metric_records(tmp_path / "one"), metric_records(run)
    assert [r["step"] for r in b] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    np.testing.assert_allclose([r["loss"] for r in metric_records(run, "val")],
                               [r["loss"] for r in metric_records(tmp_path / "one", "val")], rtol=1e-6)
    wa, wb = load_file(tmp_path / "one" / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert set(wa) == set(wb) and all(torch.allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6) for k in wa)
    assert json.loads((run / "final" / "checkpoint.json").read_text())["exported_from"]["weights"] == "sharded"
