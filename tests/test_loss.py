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
        loss_sum, _ = token_stats(logits, b.labels, v.eos)
        lp = torch.log_softmax(logits[:, :-1], -1)
        tgt = torch.from_numpy(ids[:, 1:])
        keep = torch.from_numpy(v.loss_mask(ids[:, 1:]) & (lab[:, 1:] != IGNORE_INDEX))
        manual = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[keep].sum()
        assert torch.allclose(loss_sum, manual)


def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients():
    """`chunked_stats` (LM head applied at the loss targets only, a few rows at a time, recomputed in
    backward) gives the loss, the accuracy count and the gradients of `token_stats` over full logits."""
    from tokenfold.loss import LossModel, chunked_stats
    from tokenfold.model import build_config, build_model

    v = Vocab.for_kind("3di")
    b = collate(_examples(v, 3), v, "padded")
    model = build_model(build_config("tiny", v, {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96}),
                        seed=0)
    full_loss, full_correct = token_stats(model(input_ids=b.input_ids).logits, b.labels, v.eos)
    full_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lm = LossModel(model, chunk=7)      # far fewer rows per chunk than the ~100 loss targets
    assert b.n_loss > 10 * lm.chunk
    loss, correct = lm(b.input_ids, b.labels, v.eos)
    loss.backward()
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-4)
    assert int(correct) == int(full_correct)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)
    with torch.no_grad():   # validation: no recomputation, the same numbers
        h = model.model(input_ids=b.input_ids).last_hidden_state
        nl, nc = chunked_stats(h, model.lm_head, b.labels, v.eos, chunk=5)
    torch.testing.assert_close(nl, full_loss.detach(), rtol=1e-5, atol=1e-4)
    assert int(nc) == int(full_correct)
