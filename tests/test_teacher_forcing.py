"""Teacher-forced scoring equals a plain forward over each example, batched or not."""
import numpy as np
import pytest
import torch

from stage06 import random_seqs, tiny_llama
from tokenfold.generate import generate
from tokenfold.teacher_forcing import teacher_forced
from tokenfold.vocab import Vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_teacher_forced_scores_match_a_plain_forward():
    v = Vocab.for_kind("geo", n_struct=66, interleaved=True)
    m = tiny_llama(v, seed=8)
    seqs = random_seqs(4, 3, 25, seed=9)
    rng = np.random.default_rng(0)
    examples = [v.encode(s, rng.integers(0, v.n_struct, len(s))) for s in seqs]
    tf = teacher_forced(m, v, examples, batch_size=3)
    for s, ex, t in zip(seqs, examples, tf):
        ids = torch.as_tensor(ex)[None]
        with torch.no_grad():
            logits = m(input_ids=ids).logits[0, :-1].float()
        tgt = ids[0, 1:]
        lm = torch.as_tensor(v.loss_mask(tgt.numpy()))
        nll = -torch.log_softmax(logits, -1)[torch.arange(len(tgt)), tgt][lm].sum()
        assert t.n_targets == int(lm.sum()) == len(s) + 1   # structure tokens and <eos>
        assert t.nll == pytest.approx(float(nll), rel=1e-4)
        smask = torch.as_tensor(v.is_struct(tgt.numpy()))
        pred = logits[:, v.struct_offset:v.size].argmax(-1)[smask].numpy()
        assert np.array_equal(t.pred_codes, pred)
    # teacher-forced argmax on the model's own greedy output reproduces that output
    greedy = generate(m, v, seqs)
    tf = teacher_forced(m, v, [v.encode(s, g.codes) for s, g in zip(seqs, greedy)])
    assert all(np.array_equal(t.pred_codes, g.codes) for t, g in zip(tf, greedy))
