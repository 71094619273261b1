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
    RoPE sees the same positions as for the example alone. (transformers >= 5 also builds the
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
(epoch, micro-batch index), independent of the number of ranks.

Structure-input noise (`input_noise` = p, off by default): in each training micro-batch, every
structure token *fed to the model* is replaced, with probability p, by a uniformly random structure
token; the labels keep the true tokens. 3Di letters are strongly autocorrelated, so a small model
trained with clean inputs learns mostly "repeat the previous letter", which scores well with
teacher forcing and collapses in free-running generation (every residue 'D' on ../shared). Noise
makes the previous tokens unreliable and pushes the model onto the amino acids. It is a trade, not a
free win. Measured on ../shared (tiny preset, interleaved 3Di, 879 train chains, 6 epochs, 109 test
chains; stage 06 greedy / teacher-forced accuracy): p=0 gives 0.147 / 0.345, p=0.5 gives 0.151 /
0.290, p=0.9 gives 0.206 / 0.221 (baselines: most frequent letter 0.178, per amino acid 0.195,
windowed logistic regression 0.246). The replacement is
seeded by (seed, epoch, global micro-batch index), so it is the same for any number of ranks and
after a resume. Validation batches are never corrupted.

Examples longer than `max_len` tokens are truncated to their first `max_len` tokens (counted and
logged; stage 04 normally crops long chains already).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .batching import budget_batches
from .shards import TokenDataset
from .vocab import EOS, IGNORE_INDEX, PAD, Vocab

log = logging.getLogger("tokenfold.data")

LAYOUTS = ("padded", "packed")


def pick_layout(attn_implementation: str, requested: str = "auto") -> str:
    """`auto`: the batch layout that suits an attention implementation (see the module docstring).
    Anything else as given, once checked: packed rows need flash-attn, or transformers >= 5 for SDPA."""
    flash = attn_implementation.startswith("flash_attention")
    if requested == "auto":
        return "packed" if flash else "padded"
    if requested == "packed" and not flash and not _packed_sdpa_supported():
        raise ValueError("the packed layout needs flash_attention_2, or transformers >= 5 for SDPA; "
                         "use --batch-layout padded")
    return requested


def _packed_sdpa_supported() -> bool:
    """transformers >= 5 derives a block-diagonal mask from restarting position_ids for SDPA."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- planning
def plan_epoch(lengths: np.ndarray, max_tokens: int, layout: str, seed: int, epoch: int,
               window: int = 4096) -> list[np.ndarray]:
    """Micro-batches (arrays of example indices) of one epoch; deterministic in (seed, epoch)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; expected one of {LAYOUTS}")
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > max_tokens:
        raise ValueError(f"an example of {lengths.max()} tokens exceeds the micro-batch budget of "
                         f"{max_tokens} tokens: raise --max-tokens or lower --max-len")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    for w in range(0, len(order), window):
        chunk = order[w: w + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(budget_batches(lengths, max_tokens, padded=layout == "padded", order=chunk))
    return [batches[k] for k in rng.permutation(len(batches))]


def padding_fraction(batches: list[np.ndarray], lengths: np.ndarray, layout: str) -> float:
    """Fraction of the positions the model computes on that are padding."""
    if layout == "packed" or not batches:
        return 0.0
    real = sum(int(lengths[b].sum()) for b in batches)
    positions = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / positions


# ----------------------------------------------------------------------------- collation
@dataclass
class Batch:
    input_ids: torch.Tensor                 # [B, T] int64
    labels: torch.Tensor                    # [B, T] int64, IGNORE_INDEX where no loss (HF convention, unshifted)
    position_ids: torch.Tensor | None       # [1, N] (packed layout) or None
    n_examples: int
    n_tokens: int                           # real tokens
    n_positions: int                        # positions computed (real + padding)
    n_loss: int                             # loss targets (structure tokens + <eos>)
    n_struct: int                           # target tokens but <eos> (what accuracy counts): structure tokens,
                                            # or amino acids of a struct2seq vocabulary

    def model_inputs(self, device) -> dict:
        kw = {"input_ids": self.input_ids.to(device, non_blocking=True)}
        if self.position_ids is not None:
            kw["position_ids"] = self.position_ids.to(device, non_blocking=True)
        return kw


def collate(examples: list[np.ndarray], vocab: Vocab, layout: str) -> Batch:
    """Token arrays -> one micro-batch in the given layout (see the module docstring)."""
    examples = [np.asarray(e, dtype=np.int64) for e in examples]
    lens = [len(e) for e in examples]
    if layout == "packed":
        ids = np.concatenate(examples)[None]
        labels = vocab.labels(ids)
        pos = np.concatenate([np.arange(n) for n in lens])[None]
        position_ids = torch.from_numpy(pos)
    elif layout == "padded":
        T = max(lens)
        ids = np.full((len(examples), T), PAD, dtype=np.int64)
        for r, e in enumerate(examples):
            ids[r, : len(e)] = e
        labels = vocab.labels(ids)   # <pad> is never a target
        position_ids = None   # right padding + causal attention: no attention mask needed (docstring)
    else:
        raise ValueError(f"unknown batch layout {layout!r}")
    n_loss = int((labels != IGNORE_INDEX).sum())
    n_struct = int(vocab.is_target(labels).sum())
    return Batch(torch.from_numpy(ids), torch.from_numpy(labels), position_ids, len(examples),
                 int(sum(lens)), int(ids.size), n_loss, n_struct)


def corrupt_structure_inputs(batch: Batch, vocab: Vocab, p: float, rng: np.random.Generator) -> Batch:
    """Replace each structure token of `batch.input_ids` with a random structure token with
    probability `p` (in place; the labels are untouched). See "Structure-input noise" above. In a
    struct2seq example the structure tokens are the prompt, so there it perturbs the input structure."""
    if p <= 0:
        return batch
    ids = batch.input_ids.numpy()
    struct = vocab.is_struct(ids)
    hit = struct & (rng.random(ids.shape) < p)
    ids[hit] = rng.integers(vocab.struct_offset, vocab.struct_end, size=int(hit.sum()))
    return batch


# ----------------------------------------------------------------------------- streams
class TrainStream:
    """The endless, seeded sequence of global steps over the train split, for one rank.

    `next_step()` returns this rank's `grad_accum` micro-batches of the next global step. Epochs
    roll over by themselves; the few (< world_size * grad_accum) micro-batches left at the end
    of an epoch are skipped. `state()` / `load_state()` give the data position for checkpoints.
    """

    def __init__(self, ds: TokenDataset, vocab: Vocab, *, max_tokens: int, max_len: int, layout: str,
                 seed: int, grad_accum: int = 1, world_size: int = 1, rank: int = 0, window: int = 4096,
                 input_noise: float = 0.0):
        if not 0.0 <= input_noise < 1.0:
            raise ValueError(f"structure-input noise must be in [0, 1), got {input_noise}")
        self.input_noise = float(input_noise)
        if len(ds) == 0:
            raise ValueError(f"no training examples in {ds.root}/{ds.split}")
        self.ds, self.vocab, self.layout = ds, vocab, layout
        self.max_tokens, self.max_len, self.seed, self.window = max_tokens, max_len, seed, window
        self.accum, self.world, self.rank = grad_accum, world_size, rank
        self.per_step = grad_accum * world_size
        raw = ds.lengths
        self.index = np.flatnonzero(raw >= 2)          # an example needs 2 tokens to have a target
        if len(self.index) < len(ds):
            log.warning("%d training examples have fewer than 2 tokens: skipped", len(ds) - len(self.index))
        raw = raw[self.index]
        self.n_truncated = int((raw > max_len).sum())
        if self.n_truncated:
            log.warning("%d of %d training examples are longer than --max-len %d tokens: truncated",
                        self.n_truncated, len(ds), max_len)
        self.lengths = np.minimum(raw, max_len)        # per usable example, in the order of self.index
        self.epoch, self.pos = 0, 0
        self._plan_epoch, self._plan = -1, []
        plan0 = self.plan(0)   # epoch 0 sets the schedule length and the reported padding
        self._steps0 = len(plan0) // self.per_step
        self._padding0 = padding_fraction(plan0, self.lengths, self.layout)
        if self._steps0 == 0:
            raise ValueError(f"one epoch makes {len(plan0)} micro-batches, fewer than one step needs "
                             f"({self.per_step} = grad_accum x ranks): lower --max-tokens or --grad-accum")

    def plan(self, epoch: int) -> list[np.ndarray]:
        if epoch != self._plan_epoch:
            self._plan = plan_epoch(self.lengths, self.max_tokens, self.layout, self.seed, epoch, self.window)
            self._plan_epoch = epoch
        return self._plan

    def steps_per_epoch(self) -> int:
        """Optimizer steps of epoch 0 (later epochs cut their shuffled order into about as many)."""
        return self._steps0

    def padding_fraction(self) -> float:
        """Fraction of padding positions in epoch 0's micro-batches."""
        return self._padding0

    def example(self, i: int) -> np.ndarray:
        """Tokens of usable example i (an index into `lengths`, as in the plan)."""
        return self.ds[int(self.index[i])][: self.max_len]

    def next_step(self) -> list[Batch]:
        plan = self.plan(self.epoch)
        if self.pos + self.per_step > len(plan):
            self.epoch, self.pos = self.epoch + 1, 0
            plan = self.plan(self.epoch)
        start = self.pos + self.rank * self.accum
        mine = plan[start: start + self.accum]
        self.pos += self.per_step
        batches = [collate([self.example(i) for i in b], self.vocab, self.layout) for b in mine]
        if self.input_noise > 0:
            for j, batch in enumerate(batches):
                rng = np.random.default_rng([self.seed, self.epoch, start + j, 0x6E6F6973])  # "nois"
                corrupt_structure_inputs(batch, self.vocab, self.input_noise, rng)
        return batches

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "microbatch": int(self.pos)}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["microbatch"])


def eval_batches(ds: TokenDataset, vocab: Vocab, *, max_tokens: int, max_len: int, layout: str,
                 max_examples: int | None = None, seed: int = 0, world_size: int = 1, rank: int = 0) -> list[Batch]:
    """This rank's share of the validation micro-batches: a fixed seeded subset, length-sorted."""
    lengths = np.minimum(ds.lengths, max_len)
    idx = np.flatnonzero(lengths >= 2)
    if max_examples is not None and len(idx) > max_examples:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_examples, replace=False))
    order = idx[np.argsort(-lengths[idx], kind="stable")]
    batches = budget_batches(lengths, max_tokens, padded=layout == "padded", order=order)
    return [collate([ds[int(i)][:max_len] for i in b], vocab, layout) for b in batches[rank::world_size]]


def check_vocab(vocab: Vocab, ds: TokenDataset, n_check: int = 64) -> None:
    """Refuse shards whose tokens do not fit the vocabulary (a wrong vocab.json next to them)."""
    for i in range(min(n_check, len(ds))):
        x = ds[i]
        if len(x) and int(x.max()) >= vocab.size:
            raise ValueError(f"{ds.root}: token {int(x.max())} in example {ds.ids[i]} is outside the "
                             f"vocabulary ({vocab.size} tokens)")
        if len(x) and int(x[-1]) != EOS and len(x) > 1:
            log.debug("example %s does not end with <eos> (cropped?)", ds.ids[i])
