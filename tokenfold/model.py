"""The translator: a Llama-architecture causal LM (transformers' `LlamaForCausalLM`) over the minimal
vocabulary of stage 04 (`tokenfold.vocab`), trained from random initialisation.

Presets (`PRESETS`) fix the architecture; any `LlamaConfig` field can be overridden
(`--set hidden_size=512 --set num_hidden_layers=6` on the command line, values parsed as JSON)::

    mini            ~0.8M params  4 layers, d=128, FFN 384, 4 heads (2 KV)   the CPU recipe (README)
    tiny            ~3.0M params  4 layers, d=256, 4 heads (2 KV)    a laptop CPU trains it in minutes
    small           ~75M          12 layers, d=768, 12 heads (4 KV)
    tinyllama-1.1b  TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json: 22 layers,
                    d=2048, FFN 5632, 32 heads, 4 KV heads, RoPE theta 1e4, 2048 positions, untied
    llama3.2-1b     meta-llama/Llama-3.2-1B config.json: 16 layers, d=2048, FFN 8192, 32 heads,
                    8 KV heads, head_dim 64, RoPE theta 5e5 with "llama3" scaling (factor 32, low 1,
                    high 4, original 8192 positions), 131072 positions, tied embeddings
    llama3.1-8b     meta-llama/Llama-3.1-8B config.json: 32 layers, d=4096, FFN 14336, 32 heads, 8 KV
                    heads, RoPE theta 5e5 with "llama3" scaling (factor 8), 131072 positions, untied.
                    To fine-tune the released weights use stage 05's --init-from (tokenfold/hf_vocab.py);
                    the preset is the shape (memory plans, from-scratch runs)

Positions: stage 05 raises a preset's ``max_position_embeddings`` to its --max-len when that is longer
(2,052 tokens for stage 04's default 1,024-residue crop; `build_config(min_positions=)`): RoPE has no
position parameters, so the shape and parameter count stay the published ones.

The two published shapes are written here, nothing is downloaded. With their own vocabularies
(32000 / 128256 / 128256) they have exactly the published parameter counts (1,100,048,384,
1,235,814,400 and 8,030,261,248; pinned by tests/test_model.py); with ours (~50-550 tokens) the
embeddings shrink and they have 969M, 973M and 6.98B parameters.

Attention: `flash_attention_2` when the `flash_attn` package is installed and the model runs on a GPU,
else PyTorch SDPA (`pick_attention`). The batch layout follows the attention (tokenfold/data.py).
"""
from __future__ import annotations

import json
import logging

import torch

from .vocab import BOS, EOS, PAD, Vocab

log = logging.getLogger("tokenfold.model")

PRESETS: dict[str, dict] = {
    "mini": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, hidden_act="silu"),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192),
                        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu"),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192),
                        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu"),
}


def parse_overrides(items: list[str] | None) -> dict:
    """`["hidden_size=512", "rope_scaling=null"]` -> dict; values are JSON when they parse, else strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"model override {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_config(preset: str, vocab: Vocab, overrides: dict | None = None, min_positions: int | None = None):
    """A `LlamaConfig` for `preset` sized to `vocab`, with `overrides` applied (unknown keys refused).

    `min_positions` (stage 05: the longest example, --max-len): a preset with fewer positions gets
    exactly that many (RoPE: no parameter changes); an explicit `max_position_embeddings` override
    below it is refused."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    overrides = dict(overrides or {})
    known = set(LlamaConfig().to_dict()) | {"rope_theta", "rope_scaling", "head_dim"}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown LlamaConfig field(s) {bad}; e.g. {sorted(k for k in known if not k.startswith('_'))[:12]}")
    if "vocab_size" in overrides and overrides["vocab_size"] < vocab.size:
        raise ValueError(f"vocab_size {overrides['vocab_size']} is smaller than the vocabulary ({vocab.size} tokens)")
    if "vocab_size" in overrides and overrides["vocab_size"] != vocab.size:
        log.warning("vocab_size overridden to %s (the vocabulary has %s tokens)", overrides["vocab_size"], vocab.size)
    kw.update(overrides)
    if min_positions and kw["max_position_embeddings"] < min_positions:
        if "max_position_embeddings" in overrides:
            raise ValueError(f"max_position_embeddings={kw['max_position_embeddings']} holds fewer than the "
                             f"{min_positions} tokens of the longest example (--max-len)")
        log.info("model positions: %d (preset %s: %d), to hold the longest example", min_positions, preset,
                 kw["max_position_embeddings"])
        kw["max_position_embeddings"] = min_positions
    kw.setdefault("vocab_size", vocab.size)
    kw.setdefault("attention_dropout", 0.0)   # --set attention_dropout=P is honoured, not overwritten
    kw.update(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, use_cache=True)
    if kw.get("rope_scaling", "absent") is None:
        kw.pop("rope_scaling")
    config = LlamaConfig(**kw)
    config.architectures = ["LlamaForCausalLM"]
    return config


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def pick_attention(device: torch.device | str, requested: str = "auto", recipe=None) -> str:
    """`auto`: flash_attention_2 on a GPU with flash-attn installed, else sdpa; sdpa always for a
    non-default `tokenfold.recipe.Recipe` (its 4-D attention mask). Anything else as given."""
    if requested != "auto":
        return requested
    if recipe is not None and not recipe.is_default:
        return "sdpa"
    if torch.device(device).type == "cuda" and flash_attn_available():
        return "flash_attention_2"
    return "sdpa"


def build_model(config, attn_implementation: str = "sdpa", seed: int | None = None):
    """A randomly initialised `LlamaForCausalLM` (fp32 master weights; autocast handles bf16)."""
    from transformers import LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    return model


def count_params(model, exclude_embeddings: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
        # tied head: the embedding matrix is also the output projection, which does compute: count it once
        if model.config.tie_word_embeddings:
            n += model.get_input_embeddings().weight.numel()
    return n


def flops_per_token(config, attn_len: float) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention.

    6 * N (N = parameters that do matmuls: all but the input embedding lookup) plus the attention
    scores/values 12 * layers * (heads * head_dim) * attn_len, where attn_len is the number of keys a
    token attends over without the causal discount: for varlen batches, sum(L_i^2) / sum(L_i).
    """
    d, f, nl = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    n_matmul_params = nl * (d * q + 2 * d * kv + q * d + 3 * d * f) + config.vocab_size * d
    return 6.0 * n_matmul_params + 12.0 * nl * q * attn_len
