"""Training batches: length-bucketed or packed, never padded to a fixed length.

The reference recipe pads every example to 1024 tokens; our examples average ~420 tokens (plain
3Di layout on ../shared), so more than half of its compute is padding. Here a micro-batch is a
set of examples under a **token budget** (`max_tokens`, padding included), and its layout follows
the attention implementation:

``padded`` (SDPA / eager; CPU and GPUs without flash-attn)
    one example per row, right-padded to the longest example *of the micro-batch*. Examples are
    length-bucketed (below), so rows have nearly equal lengths and padding is a few percent. No
    example can see another: they are in different rows. No attention mask is passed, on purpose:
    with *right* padding and causal attention a real token only ever attends to earlier, real
    tokens, so the mask changes nothing but the (ignored) outputs at padding positions, and
    without it SDPA runs its causal kernels (block skipping on CPU, FlashAttention inside PyTorch
    on GPU) instead of a dense masked product. (tests/test_model.py checks the logits equal those
    of each example alone.)
``packed`` (flash_attention_2)
    all examples of the micro-batch concatenated into one row ``[1, N]``, no padding at all;
    ``position_ids`` restart at 0 at each example. transformers turns the restarts into
    variable-length FlashAttention (``cu_seqlens``), so each example attends only to itself, and
    RoPE sees the same positions as for the example alone. (transformers also builds the
    equivalent block-diagonal mask for SDPA; tests/test_model.py checks that both layouts give
    every example exactly the logits it gets alone.)

Labels are `Vocab.labels`: loss only where the target is a structure token or <eos> (struct2seq
vocabularies: an amino acid or <eos>). In a packed
row the token after an example is the next example's <bos>, never a target, so no loss term
crosses an example boundary.

Planning (`plan_epoch`) is seeded by (seed, epoch): shuffle all examples, cut the order into windows
of `window` examples, sort each window by length (longest first), cut it greedily into micro-batches
under the budget, shuffle the micro-batches. Every rank computes the same plan; a global step takes
the next ``world_size * grad_accum`` micro-batches and rank r works on its own contiguous
``grad_accum`` of them (`TrainStream`). The data position saved in checkpoints is
(epoch, micro-batch index), independent of the number of ranks. At scale (tens of millions of
examples on every rank) the plan is made without a Python loop per example or per window, and kept
flat (`EpochPlan`: 4 bytes per example). `tokenfold.train_stream.TrainStream` turns the plans into
steps and can read and collate them ahead in DataLoader worker processes into pinned memory, with
the same batches as without them.

Structure-input noise (`input_noise` = p, off by default): in each training micro-batch, every
structure token *fed to the model* is replaced, with probability p, by a uniformly random structure
token; the labels keep the true tokens. 3Di letters are strongly autocorrelated, so a small model
trained with clean inputs learns mostly "repeat the previous letter", which scores well with
teacher forcing and collapses in free-running generation (every residue 'D' on ../shared). Noise
makes the previous tokens unreliable and pushes the model onto the amino acids; p=1 (the CPU recipe,
README "What the models learn") leaves them no information at all, so free-running decoding cannot
drift from teacher forcing. It trades teacher-forced for free-running accuracy (measured on
../shared: README). In a struct2seq (inverse folding) example the noise falls on the amino acids the
model reads back, never on the structure prompt. The replacement is seeded by (seed, epoch, global micro-batch index), so it is
the same for any number of ranks and after a resume. Validation batches are never corrupted.

A checkpoint's `tokenfold.recipe.Recipe` (prefix-LM mask, aligned positions) adds its position ids
and 4-D attention mask to every padded batch (`collate(recipe=)`), training and validation alike.

Examples longer than `max_len` tokens are truncated to their first `max_len` tokens (counted and
logged; stage 04 normally crops long chains already).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .batching import budget_batches, budget_cuts
from .recipe import Recipe, recipe_inputs
from .shards import TokenDataset
from .vocab import IGNORE_INDEX, Vocab

log = logging.getLogger("tokenfold.data")

LAYOUTS = ("padded", "packed")


def pick_layout(attn_implementation: str, requested: str = "auto") -> str:
    """`auto`: the batch layout that suits an attention implementation (see the module docstring).
    Anything else as given (transformers masks packed rows for SDPA as well as for flash-attn)."""
    flash = attn_implementation.startswith("flash_attention")
    if requested == "auto":
        return "packed" if flash else "padded"
    return requested


# ----------------------------------------------------------------------------- planning
PLAN_BLOCK = 1 << 20   # examples sorted and cut together (whole windows): bounds the planner's scratch memory


class EpochPlan(Sequence):
    """The micro-batches of one epoch, stored flat: `order` (example indices, int32 when they fit: 4
    bytes per example), `cuts` (batch k of the cut order is ``order[cuts[k]:cuts[k+1]]``) and `perm`
    (the shuffled batch order). ``plan[j]`` is the j-th micro-batch (an int64 array); slicing gives a
    list of them."""

    def __init__(self, order: np.ndarray, cuts: np.ndarray, perm: np.ndarray):
        self.order, self.cuts, self.perm = order, cuts, perm

    def __len__(self) -> int:
        return len(self.perm)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        k = int(self.perm[j])
        return self.order[self.cuts[k]: self.cuts[k + 1]].astype(np.int64)


def plan_epoch(lengths: np.ndarray, max_tokens: int, layout: str, seed: int, epoch: int,
               window: int = 4096) -> EpochPlan:
    """Micro-batches (arrays of example indices) of one epoch; deterministic in (seed, epoch).

    Vectorised (no Python loop per example or per window): windows are sorted by one stable argsort
    of (window, -length) and cut by one `budget_cuts` call, a block of whole windows at a time."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; expected one of {LAYOUTS}")
    lengths = np.asarray(lengths)
    n = len(lengths)
    if n and lengths.max() > max_tokens:
        raise ValueError(f"an example of {lengths.max()} tokens exceeds the micro-batch budget of "
                         f"{max_tokens} tokens: raise --max-tokens or lower --max-len")
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    order = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    cuts = [np.zeros(0, np.int64)]
    block = window * max(1, PLAN_BLOCK // window)
    for b0 in range(0, n, block):
        chunk = perm[b0: b0 + block]
        L = lengths[chunk].astype(np.int64)
        top = int(L.max()) + 1
        # within each window (consecutive `window` examples of the shuffled order): longest first, ties
        # in shuffled order, exactly as a stable argsort of -length per window
        s = np.argsort((np.arange(len(chunk), dtype=np.int64) // window) * top + (top - 1 - L), kind="stable")
        order[b0: b0 + len(chunk)] = chunk[s]
        windows = np.append(np.arange(0, len(chunk), window), len(chunk))
        cuts.append(budget_cuts(L[s], max_tokens, padded=layout == "padded", segments=windows)[:-1] + b0)
    del perm
    cuts = np.concatenate(cuts + [np.array([n], np.int64)])
    return EpochPlan(order, cuts, rng.permutation(len(cuts) - 1))


def padding_fraction(batches, lengths: np.ndarray, layout: str) -> float:
    """Fraction of the positions the model computes on that are padding."""
    if layout == "packed" or not len(batches):
        return 0.0
    if isinstance(batches, EpochPlan):
        sizes = np.asarray(lengths)[batches.order]
        real = int(sizes.sum(dtype=np.int64))
        longest = np.maximum.reduceat(sizes, batches.cuts[:-1]).astype(np.int64)
        positions = int((np.diff(batches.cuts) * longest).sum())
        return 1.0 - real / positions
    real = sum(int(lengths[b].sum()) for b in batches)
    positions = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / positions


# ----------------------------------------------------------------------------- collation
@dataclass
class Batch:
    input_ids: torch.Tensor                 # [B, T] int64
    labels: torch.Tensor                    # [B, T] int64, IGNORE_INDEX where no loss (HF convention, unshifted)
    position_ids: torch.Tensor | None       # [1, N] (packed layout), [B, T] (a non-default recipe) or None
    n_examples: int
    n_tokens: int                           # real tokens
    n_positions: int                        # positions computed (real + padding)
    n_loss: int                             # loss targets (structure tokens + <eos>)
    n_struct: int                           # target tokens but <eos> (what accuracy counts): structure tokens,
                                            # or amino acids of a struct2seq vocabulary
    attention_mask: torch.Tensor | None = None  # [B, 1, T, T] bool (a non-default recipe) or None

    def model_inputs(self, device) -> dict:
        kw = {"input_ids": self.input_ids.to(device, non_blocking=True)}
        for key in ("position_ids", "attention_mask"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key).to(device, non_blocking=True)
        return kw

    def pin_memory(self) -> "Batch":
        """The same batch in page-locked memory (what DataLoader(pin_memory=True) calls), so that the
        copies of `model_inputs` and the loss's labels overlap with GPU work."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def collate(examples: list[np.ndarray], vocab: Vocab, layout: str, recipe: Recipe | None = None) -> Batch:
    """Token arrays -> one micro-batch in the given layout (see the module docstring); a non-default
    `recipe` adds its position ids and attention mask (`recipe_inputs`; padded layout only)."""
    examples = [np.asarray(e, dtype=np.int64) for e in examples]
    lens = [len(e) for e in examples]
    if layout == "packed":
        ids = np.concatenate(examples)[None]
        labels = vocab.labels(ids)
        pos = np.concatenate([np.arange(n) for n in lens])[None]
        position_ids = torch.from_numpy(pos)
    elif layout == "padded":
        T = max(lens)
        ids = np.full((len(examples), T), vocab.pad, dtype=np.int64)
        for r, e in enumerate(examples):
            ids[r, : len(e)] = e
        labels = vocab.labels(ids)   # <pad> is never a target
        position_ids = None   # right padding + causal attention: no attention mask needed (docstring)
    else:
        raise ValueError(f"unknown batch layout {layout!r}")
    n_loss = int((labels != IGNORE_INDEX).sum())
    n_struct = int(vocab.is_target(labels).sum())
    attention_mask = None
    if recipe is not None and not recipe.is_default:
        if layout != "padded":
            raise ValueError("the prefix-LM / aligned-positions recipe needs the padded batch layout (SDPA or eager)")
        x = torch.from_numpy(ids)
        extra = recipe_inputs(x, torch.arange(x.shape[1])[None] < torch.tensor(lens)[:, None], vocab, recipe)
        position_ids, attention_mask = extra["position_ids"], extra["attention_mask"]
    return Batch(torch.from_numpy(ids), torch.from_numpy(labels), position_ids, len(examples),
                 int(sum(lens)), int(ids.size), n_loss, n_struct, attention_mask)


def corrupt_structure_inputs(batch: Batch, vocab: Vocab, p: float, rng: np.random.Generator) -> Batch:
    """Replace each target token the model reads as input (its own earlier outputs at generation time:
    structure tokens, or the amino acids of a struct2seq example) with a random one of the tokens it
    chooses among, with probability `p` (in place; the labels and the prompt are untouched). See
    "Structure-input noise" above."""
    if p <= 0:
        return batch
    ids = batch.input_ids.numpy()
    hit = vocab.is_target(ids) & (rng.random(ids.shape) < p)
    ids[hit] = rng.integers(*vocab.choice_range, size=int(hit.sum()))
    return batch


# ----------------------------------------------------------------------------- validation
def eval_batches(ds: TokenDataset, vocab: Vocab, *, max_tokens: int, max_len: int, layout: str,
                 max_examples: int | None = None, seed: int = 0, world_size: int = 1, rank: int = 0,
                 recipe: Recipe | None = None) -> list[Batch]:
    """This rank's share of the validation micro-batches: a fixed seeded subset, length-sorted."""
    lengths = np.minimum(ds.lengths, max_len)
    idx = np.flatnonzero(lengths >= 2)
    if max_examples is not None and len(idx) > max_examples:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_examples, replace=False))
    order = idx[np.argsort(-lengths[idx], kind="stable")]
    batches = budget_batches(lengths, max_tokens, padded=layout == "padded", order=order)
    return [collate([ds[int(i)][:max_len] for i in b], vocab, layout, recipe) for b in batches[rank::world_size]]


def check_vocab(vocab: Vocab, ds: TokenDataset, n_check: int = 64) -> None:
    """Refuse shards whose tokens do not fit the vocabulary (a wrong vocab.json next to them)."""
    for i in range(min(n_check, len(ds))):
        x = ds[i]
        if len(x) and int(x.max()) >= vocab.size:
            raise ValueError(f"{ds.root}: token {int(x.max())} in example {ds.meta(i)[0]} is outside the "
                             f"vocabulary ({vocab.size} tokens)")
        if len(x) and int(x[-1]) != vocab.eos and len(x) > 1:
            log.debug("example %d of %s does not end with <eos> (cropped?)", i, ds.split)
