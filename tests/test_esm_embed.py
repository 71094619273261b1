"""ESM-2 embedding: tokenisation and the fast forward against fair-esm's own, batching, layers, and the
long-sequence windows and their stitching.

All with a tiny RANDOMLY INITIALISED ESM-2 (`esm_fixtures.tiny`): the real fair-esm forward pass runs,
real weights cannot be downloaded here.
"""
import numpy as np
import pytest
import torch

from tokenfold import esm_embed as E

pytest_plugins = ["esm_fixtures"]   # tiny

AA = "ACDEFGHIKLMNPQRSTVWY"


def _seqs(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(AA), int(L))) for L in rng.integers(lo, hi, n)]



# ----------------------------------------------------------------------------- forward and batching
def test_fast_forward_equals_fair_esm_forward(tiny):
    model, alphabet, _ = tiny
    toks = E.tokenize(alphabet, _seqs(5, 5, 40, seed=1))      # padded batch
    assert (toks == alphabet.padding_idx).any()
    with torch.inference_mode():
        for layer in (0, 1, 2):
            ref = model(toks, repr_layers=[layer])["representations"][layer]
            got = E.forward_repr(model, toks, layer)
            keep = toks != alphabet.padding_idx
            torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-4)
    # tokenisation identical to fair-esm's BatchConverter
    seqs = ["MKXAC", "LLB", "ACDEFGHIKLMNPQRSTVWYXUZO"]
    _, _, ref_toks = alphabet.get_batch_converter()(list(zip("abc", seqs)))
    assert torch.equal(E.tokenize(alphabet, seqs), ref_toks)


def test_batching_does_not_change_results(tiny):
    model, alphabet, _ = tiny
    seqs = _seqs(12, 3, 90, seed=2) + [""]
    one = E.embed(model, alphabet, seqs, toks_per_batch=1)           # every sequence alone
    many = E.embed(model, alphabet, seqs, toks_per_batch=4096)       # padded batches
    ref = E.embed(model, alphabet, seqs, toks_per_batch=300, fast=False)   # fair-esm's forward
    assert [len(v) for v in one] == [len(s) for s in seqs] and one[-1].shape == (0, 64)
    for a, b, c in zip(one, many, ref):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4)


def test_layers_and_bad_layer(tiny):
    model, alphabet, _ = tiny
    s = _seqs(1, 20, 21, seed=3)
    last = E.embed(model, alphabet, s)[0]
    np.testing.assert_array_equal(last, E.embed(model, alphabet, s, layer=-1)[0])
    assert not np.allclose(last, E.embed(model, alphabet, s, layer=1)[0])
    with pytest.raises(ValueError):
        E.embed(model, alphabet, s, layer=3)


# ----------------------------------------------------------------------------- long sequences
@pytest.mark.parametrize("window,overlap", [(1022, 256), (16, 6), (10, 0), (9, 8)])
def test_windows_tile_every_residue_once(window, overlap):
    for L in list(range(1, 80)) + [1022, 1023, 2047, 5000]:
        ws = E.windows(L, window, overlap)
        assert ws[0][0] == 0 and ws[-1][1] == L
        cover = np.zeros(L, int)
        for s, e, a, b in ws:
            assert e - s == min(L, window) and s <= a <= b <= e
            cover[a:b] += 1
            if len(ws) > 1:       # at least overlap//2 residues of context on each side, except at the ends
                assert a == 0 or a - s >= overlap // 2
                assert b == L or e - b >= overlap // 2
        assert (cover == 1).all(), (L, ws)


def test_long_sequence_stitching(tiny):
    model, alphabet, _ = tiny
    window, overlap = 16, 6
    seq = _seqs(1, 50, 51, seed=4)[0]
    short = _seqs(1, 16, 17, seed=5)[0]
    got, got_short = E.embed(model, alphabet, [seq, short], window=window, overlap=overlap)
    assert got.shape == (50, 64)
    # a sequence within the window is embedded whole, exactly as without windows
    np.testing.assert_allclose(got_short, E.embed(model, alphabet, [short])[0], atol=1e-5)
    # every residue's vector is the one its owning window gives when embedded on its own
    for s, e, a, b in E.windows(50, window, overlap):
        alone = E.embed(model, alphabet, [seq[s:e]])[0]
        np.testing.assert_allclose(got[a:b], alone[a - s:b - s], atol=1e-5, rtol=1e-4)
    # truncation only when asked: the first `window` residues, as the model sees them alone
    trunc = E.embed(model, alphabet, [seq], window=window, truncate=True)[0]
    np.testing.assert_allclose(trunc, E.embed(model, alphabet, [seq[:window]])[0], atol=1e-5)
