"""The training batch stream of one rank (`TrainStream`): the seeded epoch plans of `tokenfold.data`,
cut into global steps, read and collated here or ahead of time in DataLoader worker processes
(`StepReader`), with the seeded structure-input noise, and the data position checkpoints save.
The batch layouts, the planning and the noise are described in tokenfold/data.py."""
from __future__ import annotations

import atexit
import logging
import signal
import weakref
from typing import NamedTuple

import numpy as np
import torch

from .data import (
    Batch,
    EpochPlan,
    collate,
    corrupt_structure_inputs,
    padding_fraction,
    plan_epoch,
)
from .recipe import Recipe
from .shards import TokenDataset
from .vocab import Vocab

log = logging.getLogger("tokenfold.train_stream")


class StepJob(NamedTuple):
    """One global step as far as this rank is concerned: what `StepReader` turns into batches."""

    epoch: int
    pos_after: int                  # the data position (micro-batch index in the epoch) after this step
    first: int                      # global index of this rank's first micro-batch (noise seed)
    batches: list                   # example indices (into the stream's usable examples) per micro-batch


class StepReader:
    """Reads and collates the micro-batches of a `StepJob` (in the training process, or in DataLoader
    worker processes): tokens from the shards, the batch layout, the seeded input noise."""

    def __init__(self, ds: TokenDataset, vocab: Vocab, layout: str, max_len: int, index: np.ndarray | None,
                 seed: int, input_noise: float, recipe: Recipe | None = None):
        self.ds, self.vocab, self.layout, self.max_len = ds, vocab, layout, max_len
        self.index, self.seed, self.input_noise, self.recipe = index, seed, input_noise, recipe

    def example(self, i: int) -> np.ndarray:
        return self.ds[int(i) if self.index is None else int(self.index[i])][: self.max_len]

    def __getitem__(self, job: StepJob) -> tuple[int, int, list[Batch]]:
        batches = [collate([self.example(i) for i in b], self.vocab, self.layout, self.recipe) for b in job.batches]
        if self.input_noise > 0:
            for j, batch in enumerate(batches):
                rng = np.random.default_rng([self.seed, job.epoch, job.first + j, 0x6E6F6973])  # "nois"
                corrupt_structure_inputs(batch, self.vocab, self.input_noise, rng)
        return job.epoch, job.pos_after, batches


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers leave stop signals to the training process: SLURM may signal every process
    of the job (SIGUSR1's default action would kill a worker), and the trainer saves and exits itself."""
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _unchanged(x):
    return x


_OPEN_STREAMS: "weakref.WeakSet[TrainStream]" = weakref.WeakSet()


@atexit.register
def _close_streams() -> None:
    """Shut loader workers down before multiprocessing's exit handler joins them (they ignore SIGTERM)."""
    for stream in list(_OPEN_STREAMS):
        stream.close()


class TrainStream:
    """The endless, seeded sequence of global steps over the train split, for one rank.

    `next_step()` returns this rank's `grad_accum` micro-batches of the next global step. Epochs
    roll over by themselves; the few (< world_size * grad_accum) micro-batches left at the end
    of an epoch are skipped. `state()` / `load_state()` give the data position for checkpoints.

    ``workers`` > 0 reads and collates the steps ahead of time in that many DataLoader worker
    processes, and ``pin_memory`` puts them in page-locked memory (for the non-blocking copies to a
    GPU). The batches are the same either way: the steps are planned here, in order, and a worker
    only reads and collates one step (`StepReader`), with the noise seeded by the step's position.
    Memory per rank: the dataset's offsets (8 bytes per example), the lengths and the epoch plan
    (4 + 4 bytes per example); the per-example ids are never loaded.
    """

    def __init__(self, ds: TokenDataset, vocab: Vocab, *, max_tokens: int, max_len: int, layout: str,
                 seed: int, grad_accum: int = 1, world_size: int = 1, rank: int = 0, window: int = 4096,
                 input_noise: float = 0.0, workers: int = 0, pin_memory: bool = False, recipe: Recipe | None = None):
        if not 0.0 <= input_noise <= 1.0:
            raise ValueError(f"structure-input noise must be in [0, 1], got {input_noise}")
        self.input_noise = float(input_noise)
        if len(ds) == 0:
            raise ValueError(f"no training examples in {ds.root}/{ds.split}")
        self.ds, self.vocab, self.layout = ds, vocab, layout
        self.max_tokens, self.max_len, self.seed, self.window = max_tokens, max_len, seed, window
        self.accum, self.world, self.rank = grad_accum, world_size, rank
        self.per_step = grad_accum * world_size
        self.workers, self.pin_memory = int(workers), bool(pin_memory)
        raw = ds.lengths
        usable = raw >= 2                              # an example needs 2 tokens to have a target
        self.index = None if usable.all() else np.flatnonzero(usable)   # None: every example
        if self.index is not None:
            log.warning("%d training examples have fewer than 2 tokens: skipped", len(ds) - len(self.index))
            raw = raw[self.index]
        del usable
        self.n_truncated = int((raw > max_len).sum())
        if self.n_truncated:
            log.warning("%d of %d training examples are longer than --max-len %d tokens: truncated",
                        self.n_truncated, len(ds), max_len)
        # per usable example, in the order of self.index
        self.lengths = np.minimum(raw, max_len).astype(np.int32 if max_len < 2**31 else np.int64)
        del raw
        self.reader = StepReader(ds, vocab, layout, max_len, self.index, seed, self.input_noise, recipe)
        self.epoch, self.pos = 0, 0
        self._plan_epoch, self._plan = -1, None
        self._n_batches: dict[int, int] = {}
        self._steps = None
        plan0 = self.plan(0)   # epoch 0 sets the schedule length and the reported padding
        self._steps0 = len(plan0) // self.per_step
        self._padding0 = padding_fraction(plan0, self.lengths, self.layout)
        if self._steps0 == 0:
            raise ValueError(f"one epoch makes {len(plan0)} micro-batches, fewer than one step needs "
                             f"({self.per_step} = grad_accum x ranks): lower --max-tokens or --grad-accum")

    def plan(self, epoch: int) -> EpochPlan:
        if epoch != self._plan_epoch:
            self._plan = None   # free the old plan before making the next one
            self._plan = plan_epoch(self.lengths, self.max_tokens, self.layout, self.seed, epoch, self.window)
            self._plan_epoch = epoch
            self._n_batches[epoch] = len(self._plan)
        return self._plan

    def steps_per_epoch(self) -> int:
        """Optimizer steps of epoch 0 (later epochs cut their shuffled order into about as many)."""
        return self._steps0

    def padding_fraction(self) -> float:
        """Fraction of padding positions in epoch 0's micro-batches."""
        return self._padding0

    def epochs_seen(self) -> float:
        """The data position as a fraction of epochs."""
        n = self._n_batches.get(self.epoch) or len(self.plan(self.epoch))
        return self.epoch + self.pos / max(n, 1)

    def example(self, i: int) -> np.ndarray:
        """Tokens of usable example i (an index into `lengths`, as in the plan)."""
        return self.reader.example(i)

    def jobs(self):
        """The steps from the current data position on, planned in order (an endless generator)."""
        epoch, pos = self.epoch, self.pos
        while True:
            plan = self.plan(epoch)
            if pos + self.per_step > len(plan):
                epoch, pos = epoch + 1, 0
                plan = self.plan(epoch)
            first = pos + self.rank * self.accum
            pos += self.per_step
            yield StepJob(epoch, pos, first, plan[first: first + self.accum])

    def _start(self):
        if self.workers <= 0 and not self.pin_memory:
            return map(self.reader.__getitem__, self.jobs())
        from torch.utils.data import DataLoader

        _OPEN_STREAMS.add(self)
        return iter(DataLoader(self.reader, batch_size=None, sampler=self.jobs(), num_workers=self.workers,
                               collate_fn=_unchanged, pin_memory=self.pin_memory, worker_init_fn=_worker_init,
                               # its own generator: workers' seeds must not draw from the global torch RNG
                               generator=torch.Generator().manual_seed(self.seed)))

    def next_step(self) -> list[Batch]:
        if self._steps is None:
            self._steps = self._start()
        self.epoch, self.pos, batches = next(self._steps)
        return batches

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "microbatch": int(self.pos)}

    def load_state(self, state: dict) -> None:
        self.close()
        self.epoch, self.pos = int(state["epoch"]), int(state["microbatch"])

    def close(self) -> None:
        """Stop reading ahead (DataLoader workers exit); `next_step` starts again from `state()`."""
        self._steps = None
