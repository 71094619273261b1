"""The generated part of examples from their prompt part: batched generation with a KV cache.

Direction-generic (`tokenfold.vocab`): from amino acids to structure tokens (seq2struct), or from
structure tokens to amino acids (struct2seq, inverse folding). A *source* is one protein's prompt
side: an amino-acid string (seq2struct) or its structure codes (struct2seq).

Constrained decoding (the default) makes the output valid by construction: exactly one target token
per residue, only tokens of `Vocab.choice_range` at those positions (the structure tokens; for
struct2seq the 20 standard amino acids, never X), ``<eos>`` after the L-th. In the interleaved layout
the source tokens are not generated at all: they are fed between the generated tokens
(``<bos> <m> x_1 [y_1] x_2 [y_2] .. x_L [y_L] <eos>``, brackets = generated).

How the next token is chosen (greedy, sampling, repetition penalty, n-gram blocking):
`tokenfold.sampling`. Each `Generation` also carries the model's log-likelihood of what it generated:
the sum over the L generated tokens of log p(token | prefix) under the model's own distribution over
its whole vocabulary (before penalties, temperature and truncation; <eos> not included).

Batching. Proteins are grouped by length (`tokenfold.batching.budget_batches`), each group runs as one batch:

- plain layout: prompts ``<bos> x_1..x_L <sep> <m>`` differ in length, so they are LEFT-padded;
  the attention mask hides the padding and position ids count only real tokens, so every row sees
  exactly what it would see alone. Each step feeds one token per row.
- interleaved layout: every prompt is ``<bos> <m> x_1`` (no padding); each step feeds the
  generated token, then the forced next source token, so a protein of length L takes 2L forwards
  (the same number of tokens as the plain layout's prompt + generation).

Rows that are finished keep being fed (their outputs are ignored) until the longest row ends; the
length grouping keeps that waste small. `tokenfold.generate_reference` is the plain
one-protein-at-a-time HF ``generate()`` with the same constraints, the reference that batched
generation must reproduce (tests, bench/bench_generate.py).

Unconstrained mode lets the model choose freely among all tokens (source tokens still fed in the
interleaved layout) and reports whether its output was valid (only target tokens before the end)
and whether it had exactly L of them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .batching import budget_batches
from .cli import progress
from .sampling import Picker, Sampling
from .recipe import Recipe, recipe_inputs
from .vocab import Vocab


@dataclass
class Generation:
    """One protein's output. `codes`: target codes (`Vocab.target_codes`: structure codes, or amino-acid
    indices into AA_LETTERS for struct2seq; constrained: exactly L of them).

    `valid`: only target tokens before the end; `length_match`: valid and exactly L of them, then <eos>.
    `loglik`: the model's log-likelihood of the generated tokens (module docstring).
    """

    codes: np.ndarray
    valid: bool
    length_match: bool
    loglik: float = 0.0


def default_batch_size(device) -> int:
    """Proteins per batch: 64 on a GPU; 16 on a CPU, where bigger batches only add padding and cache
    misses (tiny preset, 64 real proteins of 51-291 residues, 1 thread: 10.5 proteins/s at 16 rows,
    7.6 at 64; bench/bench_generate.py)."""
    return 64 if torch.device(device).type == "cuda" else 16


def _forward(model, ids, cache, attention_mask=None, position_ids=None):
    """Logits of the last position only."""
    out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits


def _new_cache(model, max_len: int):
    """A KV cache preallocated for `max_len` positions that hands attention only the positions
    written so far: no per-step concatenation (DynamicCache copies the whole cache every step) and no
    attention over empty slots (StaticCache attends to all `max_len`). Built from transformers'
    cache classes."""
    from transformers.cache_utils import Cache

    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_preallocated_layer_class()(max_len) for _ in range(n_layers)])


@functools.lru_cache(maxsize=None)
def _preallocated_layer_class():
    """Defined on first use: its base class lives in transformers (imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """DynamicLayer whose keys/values live in buffers of `max_len` positions, filled in place."""

        def __init__(self, max_len: int):
            super().__init__()
            self.max_len = int(max_len)
            self.n = 0

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, dk = key_states.shape
            self._k = key_states.new_empty((b, h, self.max_len, dk))
            self._v = value_states.new_empty((b, value_states.shape[1], self.max_len, value_states.shape[-1]))
            self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            if self.n + q > self.max_len:
                raise RuntimeError(f"KV cache of {self.max_len} positions is full")
            self._k[:, :, self.n:self.n + q] = key_states
            self._v[:, :, self.n:self.n + q] = value_states
            self.n += q
            self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n if self.is_initialized else 0

    return PreallocatedLayer


def _unconstrained_budget(L: int) -> int:
    """How many tokens the plain layout may produce in unconstrained mode (room to overshoot L)."""
    return L + max(8, L // 8)


class _Steps:
    """Per-batch bookkeeping of the choices: the columns picked so far (for the repetition controls)
    and the summed log-likelihood of the tokens that count."""

    def __init__(self, pick: Picker, vocab: Vocab, B: int, constrained: bool, device):
        self.pick = pick
        self.lo, self.hi = vocab.choice_range if constrained else (0, vocab.size)
        self.eos, self.pad = vocab.eos, vocab.pad
        self.hist = torch.zeros((B, 0), dtype=torch.long, device=device)
        self.loglik = torch.zeros(B, dtype=torch.float64, device=device)

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Token ids [B] chosen from the last-position `logits` [B, V]; <pad> where not `live`."""
        col = self.pick(logits[:, self.lo:self.hi], self.hist if self.pick.needs_history else None)
        tok = col + self.lo
        lp = torch.log_softmax(logits.float(), -1).gather(1, tok[:, None])[:, 0]
        self.loglik += torch.where(live & (tok != self.eos), lp, torch.zeros_like(lp)).double()
        if self.pick.needs_history:
            self.hist = torch.cat([self.hist, col[:, None]], 1)
        return torch.where(live, tok, torch.full_like(tok, self.pad))


@torch.inference_mode()
def _plain_batch(model, vocab: Vocab, srcs: list, constrained: bool, pick: Picker, device) -> list[Generation]:
    B = len(srcs)
    Ls = torch.tensor([len(s) for s in srcs], device=device)
    prompts = [vocab.prompt(s) for s in srcs]
    P = max(len(p) for p in prompts)
    ids = torch.full((B, P), vocab.pad, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, P - len(p):] = torch.from_numpy(p)
        mask[i, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    prompt_mask = mask
    extra = recipe_inputs(ids, mask.bool(), vocab, Recipe.of(model.config))  # {} for the plain causal LM
    if extra:   # the prompt under the recipe's mask and positions; then each new token attends causally
        pos, prompt_mask = extra["position_ids"], extra["attention_mask"]
    budget = Ls if constrained else torch.tensor([_unconstrained_budget(len(s)) for s in srcs], device=device)
    n_steps = int(budget.max())
    cache = _new_cache(model, P + n_steps)
    # attention mask over all positions the batch will have: padding 0, everything else 1; each step
    # passes the prefix up to the current length
    full_mask = torch.cat([mask, torch.ones((B, n_steps), dtype=mask.dtype, device=device)], dim=1)
    logits = _forward(model, ids, cache, prompt_mask, pos)[:, -1]
    next_pos = pos[:, -1:] + 1
    out = torch.full((B, n_steps), vocab.pad, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    step = _Steps(pick, vocab, B, constrained, device)
    for t in range(n_steps):
        tok = step(logits, (t < Ls) if constrained else (~ended & (t < budget)))
        if not constrained:
            ended |= tok == vocab.eos
        out[:, t] = tok
        if t == n_steps - 1 or (not constrained and bool((ended | (t + 1 >= budget)).all())):
            break
        logits = _forward(model, tok[:, None], cache, full_mask[:, :P + t + 1], next_pos)[:, -1]
        next_pos = next_pos + 1
    out, ll = out.cpu().numpy(), step.loglik.cpu().numpy()
    return [_result(vocab, out[i][out[i] != vocab.pad], len(s), constrained, ll[i]) for i, s in enumerate(srcs)]


@torch.inference_mode()
def _interleaved_batch(model, vocab: Vocab, srcs: list, constrained: bool, pick: Picker, device) -> list[Generation]:
    B = len(srcs)
    Ls = [len(s) for s in srcs]
    Lt = torch.tensor(Ls, device=device)
    n_slots = max(Ls) + (0 if constrained else 1)  # unconstrained also asks the model for the end slot
    src = torch.full((B, max(Ls) + 1), vocab.pad, dtype=torch.long)
    for i, s in enumerate(srcs):
        src[i, :len(s)] = torch.from_numpy(vocab.source_ids(s))
    src = src.to(device)
    first = torch.stack([torch.full((B,), vocab.bos, device=device), torch.full((B,), vocab.target_marker, device=device),
                         src[:, 0]], 1)
    cache = _new_cache(model, 3 + 2 * n_slots + 1)
    logits = _forward(model, first, cache)[:, -1]
    out = torch.full((B, n_slots), vocab.pad, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    step = _Steps(pick, vocab, B, constrained, device)
    for t in range(n_slots):  # slot t < L: after x_{t+1}; slot L: after y_L (the end slot)
        tok = step(logits, (t < Lt) if constrained else ((t <= Lt) & ~ended))
        if not constrained:
            ended |= tok == vocab.eos
        out[:, t] = tok
        if t == n_slots - 1 or not bool(((t + 1 < Lt) if constrained else ((t + 1 <= Lt) & ~ended)).any()):
            break
        # feed y_{t+1}, then x_{t+2}, one token per forward: a two-token step would need an explicit
        # attention mask, with which transformers' SDPA path copies every cached key/value to repeat
        # the grouped KV heads (measured ~3x slower on CPU at 64 rows)
        after_y = _forward(model, tok[:, None], cache)[:, -1]
        after_x = _forward(model, src[:, t + 1, None], cache)[:, -1]  # <pad> past a row's end: ignored
        # rows whose next slot is the end slot read the logits right after y_L, the others after x_{t+2}
        at_end = (t + 1 == Lt)[:, None]
        logits = torch.where(at_end, after_y, after_x)
    out, ll = out.cpu().numpy(), step.loglik.cpu().numpy()
    return [_result(vocab, out[i][out[i] != vocab.pad], Ls[i], constrained, ll[i]) for i in range(B)]


def _result(vocab: Vocab, toks: np.ndarray, L: int, constrained: bool, loglik: float) -> Generation:
    toks = toks.astype(np.int64)
    lo = vocab.target_range[0]
    if constrained:
        codes = toks - lo
        assert len(codes) == L and vocab.is_target(toks).all()
        return Generation(codes=codes, valid=True, length_match=True, loglik=float(loglik))
    stop = np.flatnonzero(toks == vocab.eos)
    body = toks[: stop[0]] if len(stop) else toks
    target = vocab.is_target(body)
    valid = bool(target.all())
    codes = body[target] - lo
    return Generation(codes=codes, valid=valid, length_match=valid and len(stop) > 0 and len(codes) == L,
                      loglik=float(loglik))


def generate(model, vocab: Vocab, sources: list, *, constrained: bool = True, sampling: Sampling | None = None,
             batch_size: int | None = None, max_batch_tokens: int = 65536, show_progress: bool = False) -> list[Generation]:
    """The generated part for each source (same order as `sources`), batched with a KV cache.

    `sources`: amino-acid strings (seq2struct) or structure-code arrays (struct2seq), see `Vocab.source`;
    `batch_size`: proteins per batch (default `default_batch_size` of the model's device);
    `max_batch_tokens` bounds rows x longest protein per batch (GPU memory).
    """
    if not len(sources):
        return []
    if any(len(s) == 0 for s in sources):
        raise ValueError("empty sequence")
    sampling = sampling or Sampling()
    if vocab.interleaved and not Recipe.of(model.config).is_default:
        raise ValueError("this checkpoint's prefix-LM / aligned-positions recipe needs the plain layout")
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    pick = Picker(sampling, device)
    per_token = 2 if vocab.interleaved else 1
    batches = budget_batches([len(s) * per_token for s in sources], max_batch_tokens, max_rows=batch_size)
    run = _interleaved_batch if vocab.interleaved else _plain_batch
    results: list[Generation | None] = [None] * len(sources)
    was_training = model.training
    model.eval()
    try:
        for b in (progress(batches, desc="generate", unit="batch") if show_progress else batches):
            for i, g in zip(b, run(model, vocab, [sources[i] for i in b], constrained, pick, device)):
                results[i] = g
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
