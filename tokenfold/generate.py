"""Structure tokens from amino acids: batched generation with a KV cache.

Constrained decoding (the default) makes the model's output a valid structure by construction:
exactly one structure token per residue, only structure tokens at those positions, ``<eos>`` after
the L-th. In the interleaved layout the amino acids are not generated at all: they are fed between
the generated tokens (``<bos> <kind> a_1 [s_1] a_2 [s_2] .. a_L [s_L] <eos>``, brackets = generated).

Batching. Proteins are grouped by length (`tokenfold.batching.budget_batches`), each group runs as one batch:

- plain layout: prompts ``<bos> a_1..a_L <sep> <kind>`` differ in length, so they are LEFT-padded;
  the attention mask hides the padding and position ids count only real tokens, so every row sees
  exactly what it would see alone. Each step feeds one token per row.
- interleaved layout: every prompt is ``<bos> <kind> a_1`` (no padding); each step feeds the
  generated token, then the forced next amino acid, so a protein of length L takes 2L forwards
  (the same number of tokens as the plain layout's prompt + generation).

Rows that are finished keep being fed (their outputs are ignored) until the longest row ends; the
length grouping keeps that waste small. `tokenfold.generate_reference` is the plain
one-protein-at-a-time HF ``generate()`` with the same constraints, the reference that batched
generation must reproduce (tests, bench/bench_generate.py).

Unconstrained mode lets the model choose freely among all tokens (amino acids still fed in the
interleaved layout) and reports whether its output was valid (only structure tokens before the end)
and whether it had exactly L structure tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .batching import budget_batches
from .cli import progress
from .recipe import Recipe, recipe_inputs
from .vocab import Vocab


@dataclass
class Sampling:
    """Greedy by default; ``do_sample`` draws from softmax(logits / temperature) after top-k / top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0        # 0: off
    top_p: float = 1.0    # 1.0: off
    seed: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use greedy decoding for temperature 0)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


@dataclass
class Generation:
    """One protein's output. `codes`: structure codes (constrained: exactly L of them).

    `valid`: only structure tokens before the end; `length_match`: valid and exactly L of them, then <eos>.
    """

    codes: np.ndarray
    valid: bool
    length_match: bool


class _Picker:
    def __init__(self, sampling: Sampling, device: torch.device):
        self.s = sampling
        self.gen = None
        if sampling.do_sample:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(int(sampling.seed))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> chosen column [B] (int64)."""
        if not self.s.do_sample:
            return logits.argmax(-1)
        x = logits.float() / self.s.temperature
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
    cache classes (>= 5); where that API differs, a plain DynamicCache (same results, slower)."""
    from transformers import DynamicCache

    try:
        from transformers.cache_utils import Cache

        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        layer = _preallocated_layer_class()
        return Cache(layers=[layer(max_len) for _ in range(n_layers)])
    except (ImportError, TypeError, AttributeError):
        return DynamicCache(config=model.config)


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


@torch.inference_mode()
def _plain_batch(model, vocab: Vocab, seqs: list[str], constrained: bool, pick: _Picker, device) -> list[Generation]:
    B = len(seqs)
    Ls = torch.tensor([len(s) for s in seqs], device=device)
    prompts = [vocab.prompt(s) for s in seqs]
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
    budget = Ls if constrained else torch.tensor([_unconstrained_budget(len(s)) for s in seqs], device=device)
    n_steps = int(budget.max())
    cache = _new_cache(model, P + n_steps)
    # attention mask over all positions the batch will have: padding 0, everything else 1; each step
    # passes the prefix up to the current length
    full_mask = torch.cat([mask, torch.ones((B, n_steps), dtype=mask.dtype, device=device)], dim=1)
    logits = _forward(model, ids, cache, prompt_mask, pos)[:, -1]
    next_pos = pos[:, -1:] + 1
    out = torch.full((B, n_steps), vocab.pad, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    so, sz = vocab.struct_offset, vocab.size
    for t in range(n_steps):
        if constrained:
            tok = pick(logits[:, so:sz]) + so
            tok = torch.where(t < Ls, tok, torch.full_like(tok, vocab.pad))
        else:
            tok = pick(logits[:, :sz])
            tok = torch.where(ended | (t >= budget), torch.full_like(tok, vocab.pad), tok)
            ended |= tok == vocab.eos
        out[:, t] = tok
        if t == n_steps - 1 or (not constrained and bool((ended | (t + 1 >= budget)).all())):
            break
        logits = _forward(model, tok[:, None], cache, full_mask[:, :P + t + 1], next_pos)[:, -1]
        next_pos = next_pos + 1
    out = out.cpu().numpy()
    return [_result(vocab, out[i][out[i] != vocab.pad], len(s), constrained) for i, s in enumerate(seqs)]


@torch.inference_mode()
def _interleaved_batch(model, vocab: Vocab, seqs: list[str], constrained: bool, pick: _Picker, device) -> list[Generation]:
    B = len(seqs)
    Ls = [len(s) for s in seqs]
    Lt = torch.tensor(Ls, device=device)
    n_slots = max(Ls) + (0 if constrained else 1)  # unconstrained also asks the model for the end slot
    aa = torch.full((B, max(Ls) + 1), vocab.pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        aa[i, :len(s)] = torch.from_numpy(vocab.aa_ids(s))
    aa = aa.to(device)
    first = torch.stack([torch.full((B,), vocab.bos, device=device), torch.full((B,), vocab.kind_id, device=device),
                         aa[:, 0]], 1)
    cache = _new_cache(model, 3 + 2 * n_slots + 1)
    logits = _forward(model, first, cache)[:, -1]
    out = torch.full((B, n_slots), vocab.pad, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    so, sz = vocab.struct_offset, vocab.size
    for t in range(n_slots):  # slot t < L: after a_{t+1}; slot L: after s_L (the end slot)
        live = (t < Lt) if constrained else ((t <= Lt) & ~ended)
        if constrained:
            tok = pick(logits[:, so:sz]) + so
        else:
            tok = pick(logits[:, :sz])
            ended |= live & (tok == vocab.eos)
        tok = torch.where(live, tok, torch.full_like(tok, vocab.pad))
        out[:, t] = tok
        if t == n_slots - 1 or not bool(((t + 1 < Lt) if constrained else ((t + 1 <= Lt) & ~ended)).any()):
            break
        # feed s_{t+1}, then a_{t+2}, one token per forward: a two-token step would need an explicit
        # attention mask, with which transformers' SDPA path copies every cached key/value to repeat
        # the grouped KV heads (measured ~3x slower on CPU at 64 rows)
        after_s = _forward(model, tok[:, None], cache)[:, -1]
        after_a = _forward(model, aa[:, t + 1, None], cache)[:, -1]  # <pad> past a row's end: ignored
        # rows whose next slot is the end slot read the logits right after s_L, the others after a_{t+2}
        at_end = (t + 1 == Lt)[:, None]
        logits = torch.where(at_end, after_s, after_a)
    out = out.cpu().numpy()
    return [_result(vocab, out[i][out[i] != vocab.pad], Ls[i], constrained) for i in range(B)]


def _result(vocab: Vocab, toks: np.ndarray, L: int, constrained: bool) -> Generation:
    toks = toks.astype(np.int64)
    if constrained:
        codes = toks - vocab.struct_offset
        assert len(codes) == L and (codes >= 0).all() and (codes < vocab.n_struct).all()
        return Generation(codes=codes, valid=True, length_match=True)
    stop = np.flatnonzero(toks == vocab.eos)
    body = toks[: stop[0]] if len(stop) else toks
    struct = vocab.is_struct(body)
    valid = bool(struct.all())
    codes = body[struct] - vocab.struct_offset
    return Generation(codes=codes, valid=valid, length_match=valid and len(stop) > 0 and len(codes) == L)


def generate(model, vocab: Vocab, seqs: list[str], *, constrained: bool = True, sampling: Sampling | None = None,
             batch_size: int | None = None, max_batch_tokens: int = 65536, show_progress: bool = False) -> list[Generation]:
    """Structure tokens for each amino-acid sequence (same order as `seqs`), batched with a KV cache.

    `batch_size`: proteins per batch (default `default_batch_size` of the model's device);
    `max_batch_tokens` bounds rows x longest protein per batch (GPU memory).
    """
    if not seqs:
        return []
    if any(len(s) == 0 for s in seqs):
        raise ValueError("empty sequence")
    sampling = sampling or Sampling()
    if vocab.interleaved and not Recipe.of(model.config).is_default:
        raise ValueError("this checkpoint's prefix-LM / aligned-positions recipe needs the plain layout")
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    pick = _Picker(sampling, device)
    per_token = 2 if vocab.interleaved else 1
    batches = budget_batches([len(s) * per_token for s in seqs], max_batch_tokens, max_rows=batch_size)
    run = _interleaved_batch if vocab.interleaved else _plain_batch
    results: list[Generation | None] = [None] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        for b in (progress(batches, desc="generate", unit="batch") if show_progress else batches):
            for i, g in zip(b, run(model, vocab, [seqs[i] for i in b], constrained, pick, device)):
                results[i] = g
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
