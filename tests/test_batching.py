"""The one token-budget batcher (tokenfold.batching), as stages 02, 05 and 06 use it."""
import numpy as np
import pytest

from tokenfold.batching import budget_batches, budget_cuts


def _flat(batches):
    return sorted(np.concatenate(batches).tolist()) if batches else []


def test_padded_longest_first_within_budget_and_rows():
    lengths = [5, 100, 7, 60, 61, 300, 8]
    batches = budget_batches(lengths, 200, max_rows=3)
    assert _flat(batches) == list(range(len(lengths)))
    assert [b.tolist() for b in batches] == [[5], [1, 4], [3, 6, 2], [0]]   # 300 alone: over the budget
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 200)
    # extra tokens per row (ESM-2's <cls> and <eos>) count against the budget
    assert [b.tolist() for b in budget_batches([98, 98, 98], 300, extra=2)] == [[0, 1, 2]]
    assert [b.tolist() for b in budget_batches([99, 99, 99], 300, extra=2)] == [[0, 1], [2]]


def test_packed_sums_lengths_in_the_given_order():
    lengths = np.array([50, 10, 40, 30, 200, 5])
    batches = budget_batches(lengths, 100, padded=False, order=np.arange(6))
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3], [4], [5]]
    assert all(len(b) == 1 or lengths[b].sum() <= 100 for b in batches)


def test_padded_refuses_an_unsorted_order_and_handles_edge_cases():
    with pytest.raises(ValueError, match="longest-first"):
        budget_batches([5, 10], 100, order=[0, 1])
    assert budget_batches([], 100) == []
    assert [b.tolist() for b in budget_batches([0, 0, 0], 10, max_rows=2)] == [[0, 1], [2]]


@pytest.mark.parametrize("padded", [True, False])
def test_segments_are_cut_independently_like_separate_calls(padded):
    """budget_cuts over many segments at once (stage 05's windows) = one budget_batches call per segment."""
    rng = np.random.default_rng(0)
    sizes, segs = [], [0]
    for _ in range(40):
        s = rng.integers(0, 300, int(rng.integers(0, 30)))
        sizes.append(np.sort(s)[::-1] if padded else s)
        segs.append(segs[-1] + len(s))
    cuts = budget_cuts(np.concatenate(sizes), 700, padded=padded, segments=segs)
    want = [0]
    for s, start in zip(sizes, segs):
        for b in budget_batches(s, 700, padded=padded, order=np.arange(len(s))):
            want.append(start + int(b[-1]) + 1)
    assert cuts.tolist() == want
    with pytest.raises(ValueError, match="segments"):
        budget_cuts([3, 2], 10, segments=[0, 1])
