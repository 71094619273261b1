"""How generation picks the next token from the model's logits: greedy or sampled, with IF_GPT's
repetition controls.

Order of operations at each step, on the logits of the allowed tokens (`tokenfold.generate` passes
only the columns constrained decoding may choose from), as in transformers' ``generate()``:

1. **repetition penalty** ``p`` (CTRL, Keskar et al. 2019; transformers' ``repetition_penalty``; IF_GPT's
   option): the logit ``x`` of every token this row has *already generated* becomes ``x / p`` if
   ``x > 0``, else ``x * p``. ``p > 1`` discourages repeats, ``p = 1`` is off, ``p < 1`` encourages
   them. Applied by transformers' own ``RepetitionPenaltyLogitsProcessor`` to the columns generated so
   far. Only the generated part counts: prompt tokens (the source side) are never among the choices
   of constrained decoding, so this equals ``generate(repetition_penalty=p)``, which looks at the
   whole sequence (tests/test_generate.py checks both layouts against it).
2. **n-gram blocking** ``n`` (IF_GPT's option; transformers' ``no_repeat_ngram_size``): a token that would
   complete an n-gram already present in this row's generated tokens is forbidden. Only the
   generated tokens form n-grams (in the plain layout this is what transformers does; in the
   interleaved layout transformers would count n-grams across the interleaved source tokens). A row
   in which every allowed token is forbidden (possible with tiny alphabets) is left unblocked at
   that step rather than forced onto a forbidden token.
3. greedy: the argmax. Sampling: logits / temperature, then top-k, then top-p (nucleus), then a
   draw from the softmax with a seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """Greedy by default; ``do_sample`` draws from softmax(logits / temperature) after top-k / top-p.
    ``repetition_penalty`` and ``no_repeat_ngram`` apply to greedy decoding and sampling alike."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0        # 0: off
    top_p: float = 1.0    # 1.0: off
    seed: int = 0
    repetition_penalty: float = 1.0   # 1.0: off
    no_repeat_ngram: int = 0          # 0: off

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use greedy decoding for temperature 0)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition penalty must be > 0 (1.0: off)")
        if self.no_repeat_ngram < 0:
            raise ValueError("no-repeat n-gram size must be >= 0 (0: off)")


def ngram_ban(history: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """bool [B, width]: the tokens that would repeat an n-gram of `history` [B, t] (columns 0..width-1),
    i.e. those that followed an earlier occurrence of the last n-1 tokens."""
    B, t = history.shape
    ban = torch.zeros((B, width), dtype=torch.bool, device=history.device)
    if n < 1 or t < n:
        return ban
    if n == 1:
        return ban.scatter_(1, history, True)
    win = history.unfold(1, n, 1)                                   # [B, t-n+1, n]: every n-gram so far
    hit = (win[:, :, :-1] == history[:, None, t - n + 1:]).all(-1)   # n-grams whose head is the last n-1 tokens
    rows, cols = hit.nonzero(as_tuple=True)
    ban[rows, win[rows, cols, -1]] = True
    return ban


class Picker:
    """Chooses one column per row of a logits matrix, following a `Sampling` (module docstring)."""

    def __init__(self, sampling: Sampling, device: torch.device):
        from transformers import RepetitionPenaltyLogitsProcessor

        self.s = sampling
        self.penalty = (RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
                        if sampling.repetition_penalty != 1.0 else None)   # scores the columns of `history`
        self.gen = None
        if sampling.do_sample:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(int(sampling.seed))

    @property
    def needs_history(self) -> bool:
        return self.s.repetition_penalty != 1.0 or self.s.no_repeat_ngram > 0

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] -> chosen column [B] (int64). `history` [B, t]: the columns chosen so far."""
        x = logits.float()
        if history is not None and history.shape[1]:
            if self.penalty is not None:
                x = self.penalty(history, x)
            if self.s.no_repeat_ngram:
                ban = ngram_ban(history, self.s.no_repeat_ngram, x.shape[1])
                ban &= ~ban.all(1, keepdim=True)
                x = x.masked_fill(ban, float("-inf"))
        if not self.s.do_sample:
            return x.argmax(-1)
        x = x / self.s.temperature
        if self.s.top_k and self.s.top_k < x.shape[-1]:
            kth = torch.topk(x, self.s.top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.s.top_p < 1.0:
            srt, order = torch.sort(x, dim=-1, descending=True)
            cum = torch.softmax(srt, dim=-1).cumsum(-1)
            drop_sorted = (cum - torch.softmax(srt, dim=-1)) >= self.s.top_p  # mass before this token already >= p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            x = x.masked_fill(drop, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        return torch.multinomial(probs, 1, generator=self.gen)[:, 0]
