"""Token-budget batching: the one batcher of the pipeline (fair-esm's `get_batch_indices` idea).

Every stage that runs a model over proteins of different lengths groups them under a budget of
tokens per batch instead of a fixed number of rows:

* stage 02 (ESM-2 forward): padded rows, longest first, 2 extra tokens per row (<cls>, <eos>);
* stage 02 (blocks of DB entries written together): consecutive entries, summed residues;
* stage 05 (training micro-batches): padded rows of a length-sorted window, or one packed row;
* stage 06 / predict (generation, teacher forcing): padded rows, longest first, at most N rows.

``padded``: a batch costs rows x (longest + extra) positions, so it is cut from a longest-first
order (then the first item of a batch is its longest). ``packed``: a batch costs the sum of
(length + extra), in any order. An item over the budget on its own gets a batch of its own.
"""
from __future__ import annotations

import numpy as np


def budget_batches(lengths, max_tokens: int, *, padded: bool = True, order=None, max_rows: int | None = None,
                   extra: int = 0) -> list[np.ndarray]:
    """Cut `order` (default: indices of `lengths`, longest first, ties in index order) greedily into
    batches of item indices (int64 arrays) whose cost stays within `max_tokens` (module docstring).

    `max_rows`: at most this many items per batch. `extra`: tokens added to every item's length.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable") if order is None else np.asarray(order, dtype=np.int64)
    n = len(order)
    sizes = lengths[order] + extra
    cap = int(max_rows) if max_rows else max(n, 1)
    cuts = [0]
    if padded:
        if n > 1 and bool(np.any(sizes[1:] > sizes[:-1])):
            raise ValueError("padded batches are cut from a longest-first order")
        while cuts[-1] < n:
            s = cuts[-1]
            rows = cap if sizes[s] <= 0 else max(1, min(cap, int(max_tokens // sizes[s])))
            cuts.append(min(n, s + rows))
    else:
        csum = np.concatenate([[0], np.cumsum(sizes)])
        while cuts[-1] < n:
            s = cuts[-1]
            e = int(np.searchsorted(csum, csum[s] + max_tokens, side="right")) - 1
            cuts.append(min(n, s + cap, max(e, s + 1)))
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
