"""Stage 05 loss: only structure tokens and <eos> are targets, in both batch layouts, and the summed
cross-entropy of `token_stats` counts exactly those targets."""
import pytest
import torch

from conftest import foldseek_chains
from tokenfold.data import collate
from tokenfold.loss import token_stats
from tokenfold.vocab import EOS, IGNORE_INDEX, Vocab

torch.set_num_threads(1)


def _examples(vocab, n=3):
    chains = foldseek_chains(20, 60)[:n]
    return [vocab.encode(aa, vocab.threedi_codes(ss)) for _, aa, ss in chains]


@pytest.mark.parametrize("interleaved", [False, True])
def test_loss_mask_never_on_amino_acids(interleaved):
    v = Vocab.for_kind("3di", interleaved=interleaved)
    exs = _examples(v, 4)
    for layout in ("padded", "packed"):
        b = collate(exs, v, layout)
        ids, lab = b.input_ids.numpy(), b.labels.numpy()
        on = lab != IGNORE_INDEX
        assert on.sum() == b.n_loss == sum(int(v.loss_mask(e).sum()) for e in exs)
        assert (ids[on] == lab[on]).all()
        assert v.is_struct(ids[on]).sum() + (ids[on] == EOS).sum() == on.sum()     # structure or <eos> only
        aa = (ids >= v.aa_offset) & (ids < v.struct_offset)
        assert aa.sum() == sum((len(e) - (3 if interleaved else 4)) // 2 for e in exs)  # every residue is there
        assert not on[aa].any()                                                     # never an amino acid
        assert (ids[on & (ids < v.aa_offset)] == EOS).all()                         # of the specials, only <eos>
        # the training loss counts exactly those targets: shifting by one never puts an aa in the loss
        V = v.size
        logits = torch.randn(ids.shape[0], ids.shape[1], V)
        loss_sum, _ = token_stats(logits, b.labels)
        lp = torch.log_softmax(logits[:, :-1], -1)
        tgt = torch.from_numpy(ids[:, 1:])
        keep = torch.from_numpy(v.loss_mask(ids[:, 1:]) & (lab[:, 1:] != IGNORE_INDEX))
        manual = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[keep].sum()
        assert torch.allclose(loss_sum, manual)
