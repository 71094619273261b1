"""Stage 05 model: presets with the published shapes, overrides, the FLOP count, and batch layouts
without leakage between examples."""
import pytest
import torch

from conftest import foldseek_chains
from tokenfold.data import collate
from tokenfold.model import PRESETS, build_config, build_model, count_params, flops_per_token, parse_overrides
from tokenfold.vocab import EOS, Vocab

torch.set_num_threads(1)


def _meta_model(preset, vocab, **overrides):
    with torch.device("meta"):
        return build_model(build_config(preset, vocab, overrides), "sdpa")


def test_presets_have_the_published_shapes():
    v = Vocab.for_kind("3di")
    # with their own vocabularies the published shapes have exactly the published parameter counts
    tl = _meta_model("tinyllama-1.1b", v, vocab_size=32000)
    assert count_params(tl) == 1_100_048_384
    c = tl.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.max_position_embeddings, c.tie_word_embeddings) == (22, 2048, 5632, 32, 4, 2048, False)
    # Llama 3 shapes: parameters, layers, KV heads, head_dim, tied head, RoPE scaling factor
    for name, n, shape, factor in (("llama3.2-1b", 1_235_814_400, (16, 8, 64, True), 32.0),
                                   ("llama3.1-8b", 8_030_261_248, (32, 8, 128, False), 8.0)):
        m = _meta_model(name, v, vocab_size=128256)
        assert count_params(m) == n
        c = m.config
        rope = c.rope_parameters if hasattr(c, "rope_parameters") else {**c.rope_scaling, "rope_theta": c.rope_theta}
        assert (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == shape
        assert rope["rope_type"] == "llama3" and rope["factor"] == factor and rope["rope_theta"] == 500000.0
        assert rope["original_max_position_embeddings"] == 8192
    # ours: sized to the vocabulary
    assert 1e6 < count_params(_meta_model("tiny", v)) < 1e7
    assert 7e5 < count_params(_meta_model("mini", v)) < 9e5
    assert 5e7 <= count_params(_meta_model("small", v)) <= 1e8
    assert set(PRESETS) == {"mini", "tiny", "small", "tinyllama-1.1b", "llama3.2-1b", "llama3.1-8b"}


def test_overrides_and_flops():
    v = Vocab.for_kind("geo", n_struct=512)
    over = parse_overrides(["hidden_size=128", "num_hidden_layers=3", "rms_norm_eps=1e-6", "hidden_act=gelu"])
    assert over == {"hidden_size": 128, "num_hidden_layers": 3, "rms_norm_eps": 1e-6, "hidden_act": "gelu"}
    cfg = build_config("tiny", v, over)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.eos_token_id) == (128, 3, v.size, EOS)
    assert cfg.attention_dropout == 0.0 and build_config("tiny", v, {"attention_dropout": 0.1}).attention_dropout == 0.1
    with pytest.raises(ValueError, match="unknown LlamaConfig field"):
        build_config("tiny", v, {"hidden_sise": 64})
    with pytest.raises(ValueError, match="smaller than the vocabulary"):
        build_config("tiny", v, {"vocab_size": 10})
    # the FLOP formula's matmul parameter count is the model's parameter count minus norms and embedding lookup
    with torch.device("meta"):
        m = build_model(cfg)
    norms = sum(p.numel() for n, p in m.named_parameters() if "norm" in n)
    n_matmul = count_params(m, exclude_embeddings=True) - norms
    assert flops_per_token(cfg, 0) == 6 * n_matmul
    assert flops_per_token(cfg, 100) - flops_per_token(cfg, 0) == 12 * 3 * 128 * 100


def _examples(vocab, n=3):
    chains = foldseek_chains(20, 60)[:n]
    return [vocab.encode(aa, vocab.threedi_codes(ss)) for _, aa, ss in chains]


def test_packed_and_padded_layouts_do_not_leak_between_examples():
    """Every example gets the same logits alone, in a padded length-bucketed batch, and packed in one row."""
    v = Vocab.for_kind("3di")
    exs = _examples(v, 3)
    model = build_model(build_config("tiny", v, {"num_hidden_layers": 2}), "sdpa", seed=0).eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.from_numpy(e)[None], use_cache=False).logits[0] for e in exs]
        bp = collate(exs, v, "padded")
        padded = model(**bp.model_inputs("cpu"), use_cache=False).logits
        bk = collate(exs, v, "packed")
        packed = model(**bk.model_inputs("cpu"), use_cache=False).logits[0]
    assert bk.n_positions == bk.n_tokens and bp.n_positions > bp.n_tokens
    start = 0
    for r, (e, ref) in enumerate(zip(exs, alone)):
        torch.testing.assert_close(padded[r, : len(e)], ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(packed[start: start + len(e)], ref, atol=2e-5, rtol=1e-4)
        start += len(e)
