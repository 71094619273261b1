"""Stage 05 training batches on real proteins (Foldseek's 3Di of ../shared chains, in the stage 04 shard
format): the seeded, length-bucketed batch planner, the per-rank stream, structure-input noise, the
layout chosen for an attention implementation."""
import numpy as np
import pytest
import torch

from conftest import foldseek_chains, write_threedi_tokens
from tokenfold.data import TrainStream, padding_fraction, pick_layout, plan_epoch
from tokenfold.shards import TokenDataset, TokenShardWriter
from tokenfold.vocab import Vocab


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


def test_layout_follows_attention_and_packed_rows_need_a_varlen_kernel(monkeypatch):
    assert pick_layout("sdpa") == "padded" and pick_layout("eager") == "padded"
    assert pick_layout("flash_attention_2") == "packed" and pick_layout("flash_attention_2", "padded") == "padded"
    monkeypatch.setattr("tokenfold.data._packed_sdpa_supported", lambda: True)     # transformers >= 5
    assert pick_layout("sdpa", "packed") == "packed"
    monkeypatch.setattr("tokenfold.data._packed_sdpa_supported", lambda: False)    # transformers 4.x
    with pytest.raises(ValueError, match="packed layout needs flash_attention_2"):
        pick_layout("sdpa", "packed")
    assert pick_layout("flash_attention_2", "packed") == "packed"
