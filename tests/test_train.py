"""Stage 05 training on real proteins (Foldseek's 3Di of ../shared chains, in the stage 04 shard format):
a real learning test, exact resume after a SIGTERM, the batch planner, run outputs."""
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
from tokenfold.data import TrainStream, padding_fraction, plan_epoch
from tokenfold.shards import TokenDataset, TokenShardWriter
from tokenfold.stop import EXIT_OK, EXIT_REQUEUE
from tokenfold.train import train
from tokenfold.train_config import TrainConfig
from tokenfold.vocab import Vocab

torch.set_num_threads(1)   # 2 shared cores: one thread per process is the fastest and deterministic


def test_plan_is_seeded_complete_and_bucketed():
    rng = np.random.default_rng(0)
    lengths = np.array([2 * len(aa) + 4 for _, aa, _ in foldseek_chains()])   # real example lengths
    lengths = np.minimum(lengths, 1024)
    a = plan_epoch(lengths, 8192, "padded", seed=1, epoch=0, window=512)
    assert [x.tolist() for x in a] == [x.tolist() for x in plan_epoch(lengths, 8192, "padded", 1, 0, window=512)]
    assert [x.tolist() for x in a] != [x.tolist() for x in plan_epoch(lengths, 8192, "padded", 1, 1, window=512)]
    assert sorted(np.concatenate(a).tolist()) == list(range(len(lengths)))           # each example once
    assert all(len(b) * lengths[b].max() <= 8192 for b in a)
    pad = padding_fraction(a, lengths, "padded")
    # versus padding every example to 1024 (the reference recipe), and versus random batches of 8
    ref_pad = 1 - lengths.sum() / (1024 * len(lengths))
    rand = [b for b in np.array_split(rng.permutation(len(lengths)), len(lengths) // 8)]
    assert pad < 0.05 < padding_fraction(rand, lengths, "padded") and ref_pad > 0.5
    p = plan_epoch(lengths, 8192, "packed", seed=1, epoch=0)
    assert all(lengths[b].sum() <= 8192 for b in p) and padding_fraction(p, lengths, "packed") == 0.0


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_stream_splits_steps_over_ranks(tmp_path, noise):
    tok = write_threedi_tokens(tmp_path / "tok", {"train": foldseek_chains(30, 120)[:24]})
    ds, v = TokenDataset(tok, "train"), Vocab.load(tok)
    kw = dict(max_tokens=700, max_len=1024, layout="padded", seed=3, input_noise=noise)
    one = TrainStream(ds, v, grad_accum=2, **kw)
    two = [TrainStream(ds, v, grad_accum=1, world_size=2, rank=r, **kw) for r in range(2)]
    assert one.steps_per_epoch() == two[0].steps_per_epoch() >= 3
    for _ in range(one.steps_per_epoch() + 2):                        # across an epoch boundary
        a = one.next_step()
        b = [s.next_step()[0] for s in two]
        assert [x.input_ids.tolist() for x in a] == [x.input_ids.tolist() for x in b]
    assert one.state() == two[0].state() and one.state()["epoch"] == 1


def test_structure_input_noise_corrupts_only_structure_inputs(tmp_path):
    tok = write_threedi_tokens(tmp_path / "tok", {"train": foldseek_chains(30, 300)[:40]})
    ds, v = TokenDataset(tok, "train"), Vocab.load(tok)
    kw = dict(max_tokens=2000, max_len=1024, layout="padded", seed=5)
    clean, noisy = TrainStream(ds, v, **kw), TrainStream(ds, v, input_noise=0.4, **kw)
    changed = n_struct = 0
    for _ in range(clean.steps_per_epoch()):
        (a,), (b,) = clean.next_step(), noisy.next_step()
        assert torch.equal(a.labels, b.labels)                          # targets stay the true tokens
        diff = a.input_ids != b.input_ids
        assert v.is_struct(a.input_ids.numpy())[diff.numpy()].all()     # amino acids, specials untouched
        assert v.is_struct(b.input_ids.numpy()).sum() == v.is_struct(a.input_ids.numpy()).sum()
        changed += int(diff.sum())
        n_struct += int(v.is_struct(a.input_ids.numpy()).sum())
    # a replacement may draw the same token (1 in 20 for 3Di): expected changed fraction 0.4 * 19/20
    assert n_struct > 2000 and abs(changed / n_struct - 0.38) < 0.03
    # seeded by the data position: a stream restored from a saved position makes the same batches
    noisy2 = TrainStream(ds, v, input_noise=0.4, **kw)
    pos = noisy.state()
    x = noisy.next_step()[0].input_ids
    noisy2.load_state(pos)
    assert torch.equal(noisy2.next_step()[0].input_ids, x)
    with pytest.raises(ValueError, match="noise"):
        TrainStream(ds, v, input_noise=1.0, **kw)


def test_stream_skips_examples_without_a_target(tmp_path):
    v = Vocab.for_kind("3di")
    (_, aa, ss), = foldseek_chains(30, 40)[:1]
    v.save(tmp_path / "vocab.json")
    w = TokenShardWriter(tmp_path, "train", 0)
    w.add(np.zeros(0, np.int64), "empty", 0, 0)
    w.add(v.encode(aa, v.threedi_codes(ss)), "real", 1, len(aa))
    w.close()
    s = TrainStream(TokenDataset(tmp_path, "train"), v, max_tokens=1024, max_len=1024, layout="padded", seed=0)
    (b,) = s.next_step()
    assert b.n_examples == 1 and b.n_tokens == 2 * len(aa) + 4 and b.n_loss == len(aa) + 1


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
