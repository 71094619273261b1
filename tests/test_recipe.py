"""The checkpoint recipe (tokenfold/recipe.py): its mask and positions, applied alike by training
batches, a saved checkpoint loaded with plain transformers, batched generation, the HF generate()
reference and teacher forcing."""
import numpy as np
import pytest
import torch

from conftest import foldseek_chains
from stage06 import random_seqs, tiny_llama
from tokenfold import checkpoint as ckpt
from tokenfold.data import collate
from tokenfold.generate import generate
from tokenfold.generate_reference import reference_generate
from tokenfold.model import build_config, build_model
from tokenfold.recipe import Recipe, recipe_inputs
from tokenfold.teacher_forcing import teacher_forced
from tokenfold.vocab import Vocab

RECIPES = [Recipe(prefix_lm=True), Recipe(aligned_positions=True),
           Recipe(prefix_lm=True, aligned_positions=True, aa_window=3)]
IDS = ["prefix", "aligned", "prefix+aligned+window"]


def _examples(vocab, n=3):
    chains = foldseek_chains(20, 60)[:n]
    return [vocab.encode(aa, vocab.threedi_codes(ss)) for _, aa, ss in chains]


def _alone(x, vocab, recipe):
    return recipe_inputs(x, torch.ones_like(x, dtype=torch.bool), vocab, recipe)


def test_mask_and_positions():
    """Prefix-LM: a_1 sees a_L, the prefix never sees <kind> or a structure token, s_i sees every amino
    acid and s_<i but never s_{i+1}, nobody sees padding. Aligned: the query for s_i sits at a_i's position."""
    v = Vocab.for_kind("3di")
    exs = _examples(v, 3)
    b = collate(exs, v, "padded", Recipe(prefix_lm=True, aligned_positions=True))
    m, pos = b.attention_mask[:, 0].numpy(), b.position_ids.numpy()
    for r, e in enumerate(exs):
        L = (len(e) - 4) // 2
        kind, s1 = L + 2, L + 3       # <bos> a_1..a_L <sep> <kind> s_1..s_L <eos>
        assert m[r, 1, L] and m[r, L, 1] and m[r, 0, L + 1]                # bidirectional prefix
        assert not m[r, :kind, kind:].any()                                  # prefix never sees <kind> or s
        for i in range(L):
            q = s1 + i
            assert m[r, q, 1:L + 1].all() and m[r, q, s1:q + 1].all()      # all a, s_<=i
            assert not m[r, q, q + 1:].any()                                 # never s_{i+1} (nor padding)
        assert not m[r, :len(e), len(e):].any()                              # no real token sees padding
        assert m[r, len(e):, len(e):].diagonal().all()                       # padding queries: themselves
        np.testing.assert_array_equal(pos[r, :kind], np.arange(kind))
        np.testing.assert_array_equal(pos[r, kind:len(e)], np.arange(1, L + 3))   # <kind> at a_1, s_j at a_{j+1}
    plain = collate(exs, v, "padded", Recipe(aligned_positions=True)).attention_mask[:, 0].numpy()
    causal = np.tril(np.ones(plain.shape[1:], bool))
    for r, e in enumerate(exs):
        np.testing.assert_array_equal(plain[r, :len(e), :len(e)], causal[:len(e), :len(e)])
    assert collate(exs, v, "padded", Recipe()).attention_mask is None
    w = collate(exs, v, "padded", Recipe(prefix_lm=True, aa_window=2)).attention_mask[:, 0].numpy()
    for r, e in enumerate(exs):
        L = (len(e) - 4) // 2
        i, j = np.meshgrid(np.arange(L + 2), np.arange(L + 2), indexing="ij")
        np.testing.assert_array_equal(w[r, :L + 2, :L + 2], np.abs(i - j) <= 2)   # the prefix: a band
        np.testing.assert_array_equal(w[r, L + 2:], m[r, L + 2:])                 # <kind> on: unchanged
    with pytest.raises(ValueError, match="padded"):
        collate(exs, v, "packed", Recipe(prefix_lm=True))
    vi = Vocab.for_kind("3di", interleaved=True)
    with pytest.raises(ValueError, match="plain layout"):
        collate(_examples(vi, 2), vi, "padded", Recipe(prefix_lm=True))


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_batches_give_each_example_its_own_logits(recipe):
    """A right-padded batch under the recipe gives every example the logits it gets alone (left padding:
    the generation test), and the recipe does change the logits."""
    v = Vocab.for_kind("3di")
    exs = _examples(v, 3)
    model = build_model(build_config("tiny", v, {"num_hidden_layers": 2}), "sdpa", seed=0).eval()
    with torch.no_grad():
        alone = [model(input_ids=x, use_cache=False, **_alone(x, v, recipe)).logits[0]
                 for x in (torch.from_numpy(e)[None] for e in exs)]
        batched = model(**collate(exs, v, "padded", recipe).model_inputs("cpu"), use_cache=False).logits
        causal = model(input_ids=torch.from_numpy(exs[0])[None], use_cache=False).logits[0]
    for r, (e, ref) in enumerate(zip(exs, alone)):
        torch.testing.assert_close(batched[r, : len(e)], ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(alone[0], causal, atol=1e-3)


def test_checkpoint_stores_the_recipe(tmp_path):
    """config.json carries the recipe; AutoModelForCausalLM + the stored recipe reproduce the logits
    (the documented plain-transformers snippet); load_for_inference picks SDPA for it."""
    from transformers import AutoModelForCausalLM

    v = Vocab.for_kind("3di")
    cfg = build_config("tiny", v, {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128})
    recipe = Recipe(prefix_lm=True, aligned_positions=True)
    recipe.store(cfg)
    model = build_model(cfg, "sdpa", seed=1).eval()
    d = ckpt.save(tmp_path / "ckpt", model, v, {"step": 1}, {"step": 1})
    x = torch.from_numpy(_examples(v, 1)[0])[None]
    with torch.no_grad():
        ref = model(input_ids=x, **_alone(x, v, recipe)).logits
        auto = AutoModelForCausalLM.from_pretrained(d).eval()
        assert Recipe.of(auto.config) == recipe
        torch.testing.assert_close(auto(input_ids=x, **_alone(x, v, Recipe.of(auto.config))).logits, ref)
        assert not torch.allclose(auto(input_ids=x).logits, ref, atol=1e-3)   # without it: another model
    loaded, _ = ckpt.load_for_inference(d, device="cpu")
    assert loaded.config._attn_implementation == "sdpa" and Recipe.of(loaded.config) == recipe
    assert Recipe.of(build_config("tiny", v)) == Recipe()                        # old checkpoints: plain causal LM
    cfg.tokenfold = {"prefix_lm": True, "window_size": 3}
    with pytest.raises(ValueError, match="unknown recipe fields"):
        Recipe.of(cfg)


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_batched_generation_and_teacher_forcing_apply_it_like_hf_generate(recipe):
    """Batched generation (left padding, mixed lengths) equals HF generate() after a prefix forward under
    the recipe's mask and positions; teacher forcing scores with the same mask and positions."""
    v = Vocab.for_kind("3di")
    m = tiny_llama(v, seed=4, hidden=96)
    seqs = random_seqs(8, 2, 45, seed=5)
    recipe.store(m.config)
    batched = generate(m, v, seqs, batch_size=5)
    for s, g in zip(seqs, batched):
        np.testing.assert_array_equal(v.decode(reference_generate(m, v, s))[1], g.codes)
    examples = [v.encode(s, g.codes) for s, g in zip(seqs, batched)]
    tf = teacher_forced(m, v, examples, batch_size=4)
    causal = teacher_forced(tiny_llama(v, seed=4, hidden=96), v, examples, batch_size=4)
    assert all(abs(a.nll - b.nll) > 1e-3 for a, b in zip(tf, causal))   # the recipe is in use
    assert all(np.array_equal(t.pred_codes, g.codes) for t, g in zip(tf, batched))
    for ex, t in zip(examples[:3], tf):
        ids = torch.as_tensor(ex)[None]
        with torch.no_grad():
            logits = m(input_ids=ids, **_alone(ids, v, recipe)).logits
        tgt = ids[0, 1:]
        nll = -torch.log_softmax(logits[0, :-1], -1)[torch.arange(len(tgt)), tgt][torch.as_tensor(v.loss_mask(tgt.numpy()))]
        assert t.nll == pytest.approx(float(nll.sum()), rel=1e-4)
    vi = Vocab.for_kind("3di", interleaved=True)
    mi = tiny_llama(vi)
    recipe.store(mi.config)
    with pytest.raises(ValueError, match="plain layout"):
        generate(mi, vi, seqs[:2])


def test_a_recipe_picks_sdpa_where_flash_attention_would_be_chosen(monkeypatch):
    """A recipe's 4-D mask needs SDPA: `auto` never picks flash-attn for it (training and loading alike)."""
    from tokenfold import model as M

    monkeypatch.setattr(M, "flash_attn_available", lambda: True)
    assert M.pick_attention("cuda") == "flash_attention_2"
    assert M.pick_attention("cuda", "auto", Recipe()) == "flash_attention_2"
    assert M.pick_attention("cuda", "auto", Recipe(prefix_lm=True)) == "sdpa"
    assert M.pick_attention("cuda", "eager", Recipe(prefix_lm=True)) == "eager"
