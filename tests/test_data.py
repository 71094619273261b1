"""Stage 05 training batches on real proteins (Foldseek's 3Di of ../shared chains, in the stage 04 shard
format): the seeded, length-bucketed batch planner, the per-rank stream, structure-input noise, the
layout chosen for an attention implementation."""
import numpy as np
import pytest
import torch
from conftest import foldseek_chains, write_threedi_tokens

from tokenfold.batching import budget_batches
from tokenfold.data import padding_fraction, pick_layout, plan_epoch
from tokenfold.shards import TokenDataset, TokenShardWriter
from tokenfold.train_stream import TrainStream
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


def _plan_per_window(lengths, max_tokens, layout, seed, epoch, window):
    """The planner as first written (one budget_batches call per window), the reference of the vectorised one."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches = []
    for w in range(0, len(order), window):
        chunk = order[w: w + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(budget_batches(lengths, max_tokens, padded=layout == "padded", order=chunk))
    return [batches[k] for k in rng.permutation(len(batches))]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_vectorised_plan_equals_the_per_window_planner(layout, monkeypatch):
    monkeypatch.setattr("tokenfold.data.PLAN_BLOCK", 1000)   # several blocks of windows, as at scale
    real = np.array([2 * len(aa) + 4 for _, aa, _ in foldseek_chains()])
    rng = np.random.default_rng(0)
    for seed, window, max_tokens in ((0, 64, 4096), (1, 333, 9000), (2, 4096, 2500), (3, 1, 3000)):
        lengths = np.minimum(rng.choice(real, 5000), 2048)
        lengths[:7] = 2
        got = plan_epoch(lengths, max_tokens, layout, seed, epoch=seed % 2, window=window)
        want = _plan_per_window(lengths, max_tokens, layout, seed, seed % 2, window)
        assert [b.tolist() for b in got] == [b.tolist() for b in want]
        assert padding_fraction(got, lengths, layout) == padding_fraction(want, lengths, layout)
        assert got.order.dtype == np.int32 and got[0].dtype == np.int64


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
        TrainStream(ds, v, input_noise=1.01, **kw)


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


def test_layout_follows_attention_unless_asked():
    assert pick_layout("sdpa") == "padded" and pick_layout("eager") == "padded"
    assert pick_layout("flash_attention_2") == "packed" and pick_layout("flash_attention_2", "padded") == "padded"
    assert pick_layout("sdpa", "packed") == "packed"   # transformers >= 5 masks packed rows for SDPA too


def test_loader_workers_give_the_same_steps_and_resume(tmp_path):
    """DataLoader workers read ahead: same batches (order, noise), across an epoch boundary and a resume."""
    tok = write_threedi_tokens(tmp_path / "tok", {"train": foldseek_chains(30, 160)[:40]}, shard_size=16)
    ds, v = TokenDataset(tok, "train"), Vocab.load(tok)
    kw = dict(max_tokens=900, max_len=1024, layout="padded", seed=2, grad_accum=2, world_size=2, rank=1,
              input_noise=0.3)
    plain, ahead = TrainStream(ds, v, **kw), TrainStream(ds, v, workers=2, **kw)
    n = plain.steps_per_epoch() + 3
    want = [[b.input_ids.tolist() for b in plain.next_step()] + [plain.state()] for _ in range(n)]
    got = [[b.input_ids.tolist() for b in ahead.next_step()] + [ahead.state()] for _ in range(n)]
    assert got == want and want[-1][-1]["epoch"] >= 1
    ahead.load_state(want[1][-1])                 # back to step 2, as a resumed run does
    assert [b.input_ids.tolist() for b in ahead.next_step()] == want[2][:-1]
    ahead.close()


def test_stream_never_loads_the_ids(tmp_path):
    tok = write_threedi_tokens(tmp_path / "tok", {"train": foldseek_chains(30, 160)[:20]}, shard_size=8)
    ds, v = TokenDataset(tok, "train"), Vocab.load(tok)
    s = TrainStream(ds, v, max_tokens=900, max_len=1024, layout="padded", seed=0)
    s.next_step()
    assert ds._columns == {} and s.index is None and s.lengths.dtype == np.int32
