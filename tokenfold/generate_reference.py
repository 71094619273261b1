"""The reference that batched generation must reproduce: plain HF ``generate()``, one protein at a time.

`LayoutConstraint` is a transformers LogitsProcessor that makes ``model.generate()`` follow the
constrained layout of `tokenfold.generate` for one protein (either direction); `reference_generate`
decodes one protein greedily with it (the slow, obvious way), optionally with transformers' own
``repetition_penalty`` and ``no_repeat_ngram_size``. The tests and bench/bench_generate.py compare
`tokenfold.generate.generate` with it.
"""
from __future__ import annotations

import numpy as np
import torch

from .recipe import Recipe, recipe_inputs
from .vocab import Vocab


class LayoutConstraint:
    """A transformers LogitsProcessor that makes plain HF ``generate()`` follow the constrained layout
    for one protein: tokens of `Vocab.choice_range` only at target slots, the source tokens forced in
    the interleaved layout, <eos> after L."""

    def __init__(self, vocab: Vocab, source, prompt_len: int):
        self.vocab, self.L, self.prompt_len = vocab, len(source), prompt_len
        self.src = vocab.source_ids(source)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        v = self.vocab
        lo, hi = v.choice_range
        allow = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        if v.interleaved:
            if n == 2 * self.L:
                allow[v.eos] = True
            elif n % 2 == 0:
                allow[int(self.src[n // 2])] = True
            else:
                allow[lo:hi] = True
        elif n < self.L:
            allow[lo:hi] = True
        else:
            allow[v.eos] = True
        return scores.masked_fill(~allow, float("-inf"))


@torch.inference_mode()
def reference_generate(model, vocab: Vocab, source, repetition_penalty: float = 1.0,
                       no_repeat_ngram_size: int = 0) -> np.ndarray:
    """Greedy constrained decoding of ONE protein with HF ``generate()`` (the slow, obvious way): the
    token ids of the whole example, prompt to ``<eos>`` (``vocab.decode`` gives its codes). `source`:
    an amino-acid string (seq2struct) or structure codes (struct2seq).

    A checkpoint with a non-default `Recipe` (tokenfold/recipe.py): one plain forward fills a DynamicCache
    with the prefix ``<bos> x_1..x_L <sep>`` under the recipe's mask and positions, then ``generate()``
    continues from the target marker with the recipe's position ids (it adds 1 per new token) and plain
    causal attention."""
    from transformers import DynamicCache, LogitsProcessorList

    device = next(model.parameters()).device
    prompt = torch.as_tensor(vocab.prompt(source))[None].to(device)
    n_new = (2 * len(source) if vocab.interleaved else len(source)) + 1
    kw = {}
    extra = recipe_inputs(prompt, torch.ones_like(prompt, dtype=torch.bool), vocab, Recipe.of(model.config))
    if extra:
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt[:, :-1], attention_mask=extra["attention_mask"][..., :-1, :-1],
              position_ids=extra["position_ids"][:, :-1], past_key_values=cache, use_cache=True)
        kw = dict(past_key_values=cache, position_ids=extra["position_ids"])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                         do_sample=False, num_beams=1, eos_token_id=vocab.eos, pad_token_id=vocab.pad,
                         repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size or None,
                         logits_processor=LogitsProcessorList([LayoutConstraint(vocab, source, prompt.shape[1])]), **kw)
    return out[0].cpu().numpy()
