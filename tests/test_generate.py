"""Batched constrained generation: equal to one-by-one HF generate() under the same constraints,
sampling within top-k / top-p, unconstrained validity and length match.

The models (tests/stage06.py) are tiny transformers LlamaForCausalLM, randomly initialised or with
hand-written weights: what is tested is the decoding machinery, not what a model learned.
"""
import numpy as np
import pytest
import torch

from stage06 import bigram_llama, random_seqs, tiny_llama
from tokenfold.generate import Sampling, generate
from tokenfold.generate_reference import reference_generate
from tokenfold.vocab import AA_LETTERS, EOS, Vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")


VOCABS = {"3di": lambda il: Vocab.for_kind("3di", interleaved=il),
          "geo": lambda il: Vocab.for_kind("geo", n_struct=66, interleaved=il)}


@pytest.mark.parametrize("interleaved", [False, True], ids=["plain", "interleaved"])
@pytest.mark.parametrize("kind", ["3di", "geo"])
def test_constrained_greedy_is_hf_generate_under_the_same_constraints(kind, interleaved):
    """The whole example (prompt, one structure token per residue, <eos>) equals what HF generate()
    produces with the layout enforced by a logits processor, down to proteins of 1 and 2 residues."""
    v = VOCABS[kind](interleaved)
    m = tiny_llama(v, seed=1)
    seqs = ["M", "AC"] + random_seqs(9, 3, 40, seed=2)
    for s, g in zip(seqs, generate(m, v, seqs, batch_size=4)):
        assert g.codes.min() >= 0 and g.codes.max() < v.n_struct
        ref = reference_generate(m, v, s)
        assert ref[-1] == EOS and np.array_equal(v.encode(s, g.codes), ref), s


@pytest.mark.parametrize("interleaved", [False, True], ids=["plain", "interleaved"])
@pytest.mark.parametrize("kind", ["3di", "geo"])
def test_constrained_sampling_draws_within_top_k_and_top_p(kind, interleaved):
    """Each sampled structure token is among the top-k structure tokens and inside the top-p nucleus
    of the tempered distribution that a plain forward over the sampled example gives at its position."""
    v = VOCABS[kind](interleaved)
    m = tiny_llama(v, seed=1)
    seqs = ["M", "AC"] + random_seqs(9, 3, 40, seed=2)
    for k, p, temp in ((7, 0.9, 1.5), (0, 0.3, 0.7)):
        out = generate(m, v, seqs, sampling=Sampling(do_sample=True, temperature=temp, top_k=k, top_p=p, seed=3),
                       batch_size=4)
        n_below_top1 = 0
        for s, g in zip(seqs, out):
            ids = torch.as_tensor(v.encode(s, g.codes))   # raises unless exactly one code per residue
            with torch.no_grad():
                logits = m(input_ids=ids[None]).logits[0, :-1].float()
            at = torch.as_tensor(v.is_struct(ids[1:].numpy()))
            x = logits[at][:, v.struct_offset:v.size] / temp                  # [L, n_struct]
            codes = torch.as_tensor(g.codes)[:, None]
            rank = (x > x.gather(1, codes) + 1e-4).sum(1)
            if k:
                assert (rank < k).all(), s                                      # within the top k
                x = x.masked_fill(x < torch.topk(x, k, dim=1).values[:, -1:], float("-inf"))
            probs = torch.softmax(x, dim=1)
            mass_before = (probs * (probs > probs.gather(1, codes) + 1e-6)).sum(1)
            assert (mass_before < p + 1e-4).all(), s                            # within the nucleus
            n_below_top1 += int((rank > 0).sum())
        assert n_below_top1 > 0   # it did sample: not every token is the most likely one


def test_constraint_overrides_a_model_that_wants_amino_acids():
    v = Vocab.for_kind("3di")
    m = bigram_llama(v, {}, default=v.aa_offset + 3)  # always predicts an amino acid
    out = generate(m, v, ["MKVL", "GG"])
    # every structure token has logit 0: greedy takes the first, one per residue
    assert [g.codes.tolist() for g in out] == [[0] * 4, [0] * 2]
    unc = generate(m, v, ["MKVL", "GG"], constrained=False)
    assert not any(g.valid or g.length_match for g in unc)


@pytest.mark.parametrize("interleaved", [False, True], ids=["plain", "interleaved"])
def test_batched_equals_one_by_one_hf_generate(interleaved):
    """Left padding, position ids and the KV cache must not change a single greedy choice."""
    v = Vocab.for_kind("3di", interleaved=interleaved)
    m = tiny_llama(v, seed=4, hidden=96)
    seqs = random_seqs(10, 2, 45, seed=5)
    batched = generate(m, v, seqs, batch_size=6)   # two batches of mixed lengths
    for s, g in zip(seqs, batched):
        _, ref = v.decode(reference_generate(m, v, s))
        assert np.array_equal(g.codes, ref), s
    single = generate(m, v, seqs, batch_size=1)
    assert all(np.array_equal(a.codes, b.codes) for a, b in zip(batched, single))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    v = Vocab.for_kind("3di")
    m = tiny_llama(v, seed=6)
    seqs = random_seqs(5, 5, 30, seed=7)
    s = Sampling(do_sample=True, temperature=2.0, seed=11)
    a, b = generate(m, v, seqs, sampling=s), generate(m, v, seqs, sampling=s)
    assert all(np.array_equal(x.codes, y.codes) for x, y in zip(a, b))
    c = generate(m, v, seqs, sampling=Sampling(do_sample=True, temperature=2.0, seed=12))
    assert not all(np.array_equal(x.codes, y.codes) for x, y in zip(a, c))
    greedy = generate(m, v, seqs)
    k1 = generate(m, v, seqs, sampling=Sampling(do_sample=True, top_k=1, seed=13))
    assert all(np.array_equal(x.codes, y.codes) for x, y in zip(greedy, k1))
    with pytest.raises(ValueError):
        Sampling(temperature=0)


def test_unconstrained_validity_and_length_match():
    v = Vocab.for_kind("3di")
    s0 = v.struct_offset
    # plain layout, a model that never stops: valid (structure tokens only) but never the right length
    never_stops = bigram_llama(v, {}, default=s0 + 5)
    out = generate(never_stops, v, ["MKVLA", "G" * 20], constrained=False)
    assert all(g.valid and not g.length_match for g in out)
    assert [len(g.codes) for g in out] == [5 + 8, 20 + 8]   # ran to its budget of L + max(8, L/8)
    # a model that stops at once: nothing generated
    stops = bigram_llama(v, {v.kind_id: EOS}, default=s0)
    out = generate(stops, v, ["MKVLA"], constrained=False)
    assert out[0].valid and not out[0].length_match and len(out[0].codes) == 0
    # interleaved: a structure token after every amino acid, <eos> after a structure token -> exact length
    vi = Vocab.for_kind("3di", interleaved=True)
    table = {vi.aa_offset + i: vi.struct_offset + 2 for i in range(len(AA_LETTERS))}
    table.update({vi.struct_offset + k: EOS for k in range(vi.n_struct)})
    exact = bigram_llama(vi, table, default=EOS)
    out = generate(exact, vi, ["MKV", "ACDEFG", "W"], constrained=False)
    assert all(g.valid and g.length_match for g in out)
    assert [g.codes.tolist() for g in out] == [[2] * 3, [2] * 6, [2]]
    # interleaved, a model that emits <eos> right after the first amino acid: stops early
    early = bigram_llama(vi, {}, default=EOS)
    out = generate(early, vi, ["MKV"], constrained=False)
    assert out[0].valid and not out[0].length_match and len(out[0].codes) == 0
