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
    cuts = budget_cuts(lengths[order] + extra, max_tokens, padded=padded, max_rows=max_rows)
    return [order[a:b] for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist())]


def budget_cuts(sizes, max_tokens: int, *, padded: bool = True, max_rows: int | None = None,
                segments=None) -> np.ndarray:
    """The greedy cuts of `budget_batches`, on the costs `sizes` of items already in batch order:
    int64 positions ``c`` with batch j = items ``c[j]:c[j+1]`` (``c[0] = 0``, ``c[-1] = len(sizes)``).

    `segments` (sorted positions from 0 to len(sizes); default ``[0, n]``) are cut independently: no
    batch spans two of them (stage 05 cuts every length-sorted window of an epoch in one call).
    Vectorised: where the batch starting at each item would end is computed for all items at once,
    then the chains of batch starts are followed from every segment's first item together, so the
    Python loop runs as many times as the longest segment has batches, never once per item.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    seg = np.array([0, n], dtype=np.int64) if segments is None else np.asarray(segments, dtype=np.int64)
    if len(seg) < 2 or seg[0] != 0 or seg[-1] != n or np.any(np.diff(seg) < 0):
        raise ValueError("segments must rise from 0 to the number of items")
    seg_len = np.diff(seg)
    end = np.repeat(seg[1:], seg_len)             # end of each item's segment
    pos = np.arange(n, dtype=np.int64)
    cap = np.repeat(seg_len, seg_len) if not max_rows else int(max_rows)
    if padded:
        rising = np.flatnonzero(sizes[1:] > sizes[:-1]) + 1
        if len(rising) and not np.isin(rising, seg).all():
            raise ValueError("padded batches are cut from a longest-first order")
        rows = np.where(sizes <= 0, cap, np.maximum(1, np.minimum(cap, max_tokens // np.maximum(sizes, 1))))
        nxt = np.minimum(end, pos + rows)
    else:
        csum = np.concatenate([[0], np.cumsum(sizes)])
        last = np.searchsorted(csum, csum[:-1] + max_tokens, side="right") - 1
        nxt = np.minimum(end, np.minimum(pos + cap, np.maximum(last, pos + 1)))
    firsts = seg[:-1][seg_len > 0]
    cur, stop, found = firsts, seg[1:][seg_len > 0], [firsts]
    while len(cur):
        cur = nxt[cur]
        going = cur < stop
        cur, stop = cur[going], stop[going]
        found.append(cur)
    return np.concatenate([np.sort(np.concatenate(found)), [n]]).astype(np.int64)
