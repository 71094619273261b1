"""Batched constrained generation: valid by construction, and equal to one-by-one HF generate().

The models here are tiny *randomly initialised* transformers LlamaForCausalLM (the library's own
class): what is tested is the decoding machinery, not what a model learned (tests/test_evaluate.py
trains one).
"""
import numpy as np
import pytest
import torch

from tokenfold.generate import Sampling, generate, reference_generate, teacher_forced
from tokenfold.vocab import AA_LETTERS, EOS, Vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(vocab: Vocab, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab.size, hidden_size=kw.get("hidden", 64), intermediate_size=128,
                      num_hidden_layers=kw.get("layers", 2), num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def bigram_llama(vocab: Vocab, next_of: dict[int, int], default: int):
    """A Llama whose next token depends only on the current one (layers zeroed to identity, one-hot
    embeddings, lm_head = the table): a model with a known, hand-written behaviour."""
    m = tiny_llama(vocab, hidden=max(64, vocab.size + 1), layers=1)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        E = m.model.embed_tokens.weight
        E.zero_()
        E[torch.arange(vocab.size), torch.arange(vocab.size)] = 1.0
        W = m.lm_head.weight
        W.zero_()
        for cur in range(vocab.size):
            W[next_of.get(cur, default), cur] = 10.0
    return m


def random_seqs(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(AA_LETTERS[:20]), size=int(L))) for L in rng.integers(lo, hi, size=n)]


VOCABS = {"3di": lambda il: Vocab.for_kind("3di", interleaved=il),
          "geo": lambda il: Vocab.for_kind("geo", n_struct=66, interleaved=il)}


@pytest.mark.parametrize("interleaved", [False, True], ids=["plain", "interleaved"])
@pytest.mark.parametrize("kind", ["3di", "geo"])
def test_constrained_gives_exactly_L_structure_tokens(kind, interleaved):
    v = VOCABS[kind](interleaved)
    m = tiny_llama(v, seed=1)
    seqs = ["M", "AC"] + random_seqs(9, 3, 40, seed=2)
    for sampling in (Sampling(), Sampling(do_sample=True, temperature=1.5, top_k=7, top_p=0.9, seed=3)):
        out = generate(m, v, seqs, sampling=sampling, batch_size=4)
        for s, g in zip(seqs, out):
            assert len(g.codes) == len(s)
            assert g.codes.min() >= 0 and g.codes.max() < v.n_struct
            assert v.is_struct(g.tokens[:-1]).all() and g.tokens[-1] == EOS
            aa, codes = v.decode(v.encode(s, g.codes))  # a well-formed example of the layout
            assert aa == s and np.array_equal(codes, g.codes)


def test_constraint_overrides_a_model_that_wants_amino_acids():
    v = Vocab.for_kind("3di")
    m = bigram_llama(v, {}, default=v.aa_offset + 3)  # always predicts an amino acid
    out = generate(m, v, ["MKVL", "GG"])
    assert [len(g.codes) for g in out] == [4, 2]
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
        ref = reference_generate(m, v, s)
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
