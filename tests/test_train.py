"""Stage 05 training on real proteins (Foldseek's 3Di of ../shared chains, in the stage 04 shard format):
a real learning test, exact resume after a SIGTERM, run outputs."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SMALL_MODEL, foldseek_chains, metric_records, write_threedi_tokens
from tokenfold import checkpoint as ckpt
from tokenfold.stop import EXIT_OK, EXIT_REQUEUE
from tokenfold.train import train
from tokenfold.train_config import TrainConfig

torch.set_num_threads(1)   # 2 shared cores: one thread per process is the fastest and deterministic


def test_tiny_preset_overfits_real_proteins(tmp_path):
    """Six real chains (3Di from Foldseek): the tiny preset must memorise their structure tokens."""
    chains = foldseek_chains(40, 70)[:6]
    tok = write_threedi_tokens(tmp_path / "tok", {"train": chains, "val": chains})
    res = train(TrainConfig(tokens=str(tok), out=str(tmp_path / "run"), preset="tiny", max_steps=100, lr=3e-3,
                            warmup_steps=5, weight_decay=0.0, max_tokens=4096, eval_every=50, log_every=10,
                            save_every=0, threads=1))
    assert res.exit_code == EXIT_OK
    val = metric_records(tmp_path / "run", "val")
    assert val[0]["step"] == 0 and val[0]["acc"] < 0.2                  # starts at chance (1/20)
    assert res.val["step"] == 100 and res.val["acc"] >= 0.95, res.val   # teacher-forced, 3Di tokens
    assert res.val["n_struct"] == sum(len(aa) for _, aa, _ in chains)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["val"]["acc"] == res.val["acc"] and (tmp_path / "run" / "curves.png").stat().st_size > 10_000


def _cfg(tok, out, **kw):
    base = dict(tokens=str(tok), out=str(out), preset="tiny", model_overrides=SMALL_MODEL, max_steps=9, lr=2e-3,
                max_tokens=700, grad_accum=2, eval_every=4, save_every=4, keep_last=2, log_every=1, threads=1,
                eval_max_examples=6)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_sigterm_equals_uninterrupted_run(tmp_path):
    chains = foldseek_chains(30, 120)
    tok = write_threedi_tokens(tmp_path / "tok", {"train": chains[:20], "val": chains[20:26]})
    ref = train(_cfg(tok, tmp_path / "ref"))
    assert ref.exit_code == EXIT_OK

    # 1. the real CLI, killed by SIGTERM (what SLURM sends) once training is under way
    run = tmp_path / "run"
    c = _cfg(tok, run)
    cmd = [sys.executable, str(ROOT / "05_train_lm.py"), "--tokens", c.tokens, "--out", c.out, "--preset", "tiny",
           *sum((["--set", f"{k}={v}"] for k, v in SMALL_MODEL.items()), []), "--max-steps", "9", "--lr", "2e-3",
           "--max-tokens", "700", "--grad-accum", "2", "--eval-every", "4", "--save-every", "4", "--keep-last", "2",
           "--log-every", "1", "--threads", "1", "--eval-max-examples", "6"]
    log = open(tmp_path / "cli.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and metric_records(run):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    proc.wait(timeout=300)
    log.close()
    assert proc.returncode == EXIT_REQUEUE, (tmp_path / "cli.log").read_text()[-2000:]
    stopped = ckpt.list_checkpoints(run)[-1][0]
    assert 1 <= stopped < 9 and not (run / "final").exists()

    # 2. changed settings are refused, the same settings resume (twice: --stop-after-steps then to the end)
    with pytest.raises(ValueError, match="settings changed"):
        train(_cfg(tok, run, lr=1e-3))
    assert train(_cfg(tok, run, stop_after_steps=2)).exit_code == EXIT_REQUEUE
    assert ckpt.list_checkpoints(run)[-1][0] == stopped + 2
    res = train(_cfg(tok, run))
    assert res.exit_code == EXIT_OK and res.step == 9

    # same losses, same validation, same weights as the uninterrupted run
    a, b = metric_records(tmp_path / "ref"), metric_records(run)
    assert [r["step"] for r in b] == list(range(1, 10))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6, atol=0)
    np.testing.assert_allclose([r["loss"] for r in metric_records(run, "val")],
                               [r["loss"] for r in metric_records(tmp_path / "ref", "val")], rtol=1e-6, atol=0)
    wa, wb = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7)
    # keep-last-2, and a finished run is left alone
    assert len(ckpt.list_checkpoints(run)) == 2 and ckpt.list_checkpoints(run)[-1][0] == 9
    mtime = (run / "final" / "model.safetensors").stat().st_mtime_ns
    assert train(_cfg(tok, run)).exit_code == EXIT_OK
    assert (run / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    state = ckpt.load_trainer_state(run / "final")
    assert state["step"] == 9 and state["data"]["microbatch"] > 0


def test_recipe_is_trained_stored_and_applied_at_inference(tmp_path):
    """--prefix-lm --aligned-positions --aa-window: config.json carries the recipe, and the checkpoint loaded for
    inference scores the val split exactly as training's validation did (same mask and positions)."""
    from tokenfold.shards import TokenDataset
    from tokenfold.teacher_forcing import teacher_forced

    chains = foldseek_chains(30, 120)
    tok = write_threedi_tokens(tmp_path / "tok", {"train": chains[:12], "val": chains[12:16]})
    kw = dict(max_steps=4, grad_accum=1, eval_every=0, save_every=0, eval_max_examples=None)
    res = train(_cfg(tok, tmp_path / "run", prefix_lm=True, aligned_positions=True, aa_window=4, **kw))
    assert res.exit_code == EXIT_OK
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["tokenfold"] == \
        {"prefix_lm": True, "aligned_positions": True, "aa_window": 4}
    model, vocab = ckpt.load_for_inference(tmp_path / "run", device="cpu")
    ds = TokenDataset(tok, "val")
    tf = teacher_forced(model, vocab, [ds[i] for i in range(len(ds))])
    assert res.val["loss"] == pytest.approx(sum(t.nll for t in tf) / sum(t.n_targets for t in tf), rel=1e-4)
    plain = train(_cfg(tok, tmp_path / "plain", **kw))
    assert json.loads((tmp_path / "plain" / "final" / "config.json").read_text())["tokenfold"] == \
        {"prefix_lm": False, "aligned_positions": False, "aa_window": 0}
    assert abs(plain.val["loss"] - res.val["loss"]) > 1e-4
