"""TESTING ONLY: tiny RANDOMLY INITIALISED stand-ins for a downloaded LLM, for stage 05 --init-from.

Real LLM weights cannot be downloaded here (no network). These are the smallest real stand-ins: a
model built from transformers' own classes and a byte-level BPE tokenizer trained with `tokenizers`,
saved with ``save_pretrained`` in the same files a download has (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json)::

    llama   Llama-3-style: LlamaForCausalLM, untied head, <|begin_of_text|> / <|end_of_text|>,
            embedding rows = tokenizer length
    qwen2   Qwen2-style: Qwen2ForCausalLM (q/k/v biases), tied head, <|endoftext|> <|im_start|> <|im_end|>,
            embedding rows padded past the tokenizer (as Qwen2.5's 151,936 rows for 151,665 tokens)

The tokenizer is trained on seeded random protein sequences and a little English, so its BPE merges
amino acids ("MKV" becomes fewer tokens than residues): the failure that added tokens avoid.
config.json carries ``"tokenfold_random_weights": true`` and the directory name says RANDOM; stage 05
logs a warning and records ``random_weights`` in run_config.json for such a model. ``--shape PRESET``
(tokenfold/model.py, e.g. llama3.2-1b) and ``--rows N`` give a llama model of a real size instead
(bench/bench_big.py: speed does not depend on the weights).

    python -m tokenfold.random_llm --arch llama --out data/models/llama_RANDOM_seed0
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .hf_vocab import RANDOM_MARK

ARCHS = ("llama", "qwen2")
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096)
ENGLISH = ("The quick brown fox jumps over the lazy dog. Proteins fold into structures; "
           "a language model reads amino acids and writes structure tokens.")


def _bpe(specials: list[str], seed: int, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(seed)
    letters = list("ACDEFGHIKLMNPQRSTVWY")
    corpus = ["".join(rng.choice(letters, size=int(n))) for n in rng.integers(30, 120, size=300)] + [ENGLISH] * 30
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def write_random_llm(out: str | Path, arch: str = "llama", seed: int = 0, shape: str | None = None,
                     rows: int | None = None) -> Path:
    """Write a RANDOM model + tokenizer of style `arch` to `out` (see the module docstring): tiny, or a
    llama of preset `shape` with `rows` embedding rows (default: the tokenizer's length)."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if shape and arch != "llama":
        raise ValueError("--shape is a llama preset: use --arch llama")
    out = Path(out)
    if arch == "llama":
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
        tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials, seed), bos_token=specials[0],
                                      eos_token=specials[1])
        if shape:
            from .model import PRESETS

            kw = {k: v for k, v in PRESETS[shape].items() if v is not None}
        else:
            kw = dict(SHAPE, tie_word_embeddings=False, rope_theta=500000.0)
        cfg = LlamaConfig(**kw, vocab_size=max(rows or 0, len(tok)), bos_token_id=0, eos_token_id=1)
        cls = LlamaForCausalLM
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials, seed), eos_token=specials[0],
                                      pad_token=specials[0])
        rows = -(-(len(tok) + 32) // 64) * 64   # spare rows past the tokenizer, as Qwen has
        cfg = Qwen2Config(**SHAPE, vocab_size=rows, tie_word_embeddings=True, eos_token_id=0, rope_theta=1e6)
        cls = Qwen2ForCausalLM
    setattr(cfg, RANDOM_MARK, True)
    torch.manual_seed(seed)
    model = cls(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="llama", help="model family to imitate (default: llama)")
    p.add_argument("--out", required=True, help="directory to write (config, weights, tokenizer files)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the tokenizer corpus")
    p.add_argument("--shape", help="a llama preset of tokenfold/model.py instead of the tiny shape")
    p.add_argument("--rows", type=int, help="embedding rows (default: the tokenizer's length)")
    a = p.parse_args(argv)
    print(write_random_llm(a.out, a.arch, a.seed, a.shape, a.rows), "(RANDOM WEIGHTS: for tests only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
