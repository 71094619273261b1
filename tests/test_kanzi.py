"""Kanzi adapter glue, against a stand-in with Kanzi's API shape (the real package and weights cannot be
downloaded here; see tokenfold/kanzi.py)."""
import json
import sys

import numpy as np
import pytest
import torch

from tokenfold.kanzi import KanziTokenizer, KanziUnavailable, load_decoder, load_kanzi_model
from tokenfold.shards import TokenDataset
from tokenfold.tokenize import TokenizeConfig, run
from tokenfold.vocab import Vocab


class StandInDAE:
    """Kanzi's DAE API shape: encode(x [B,L,3] nm, preprocess=False) -> (s, c, idx [B,L]);
    decode(idx [B,L], n_steps, ...) -> x [B,L,3] nm, sampled with torch's global RNG; codebook_size.

    Its 'tokens' are a 10x10x10 grid over the centred nm coordinates, so decoding them gives back
    the coordinates to within one grid cell: enough to check units, centring and seeding."""

    codebook_size = 1000
    cell = 0.4   # nm

    def __init__(self):
        self.seen = []

    def encode(self, x_BLD, preprocess=False):
        assert isinstance(x_BLD, torch.Tensor) and x_BLD.dtype == torch.float32 and x_BLD.ndim == 3
        assert x_BLD.shape[0] == 1 and not preprocess
        self.seen.append(x_BLD.clone())
        g = torch.clamp(torch.floor(x_BLD / self.cell) + 5, 0, 9).long()
        idx = g[..., 0] * 100 + g[..., 1] * 10 + g[..., 2]
        return x_BLD, x_BLD, idx

    def decode(self, idx_BL, n_steps=100, noise_weight=0.45, score_weight=1.0, cfg_weight=1.0):
        assert idx_BL.ndim == 2 and idx_BL.dtype == torch.int64
        g = torch.stack([idx_BL // 100, idx_BL // 10 % 10, idx_BL % 10], -1).float()
        x = (g - 5 + 0.5) * self.cell
        return x + 0.01 * torch.randn(x.shape)      # stochastic, like Kanzi's SDE sampler


def _chain(n=24, offset=(120.0, -35.0, 60.0)):
    t = np.linspace(0, 4 * np.pi, n)
    helix = np.stack([2.3 * np.cos(t * 2.5), 2.3 * np.sin(t * 2.5), 1.5 * np.arange(n)], 1)
    return helix - helix.mean(0) + np.array(offset)      # Angstrom, far from the origin


def test_units_and_centring():
    fake = StandInDAE()
    tok = KanziTokenizer(fake, n_decode_steps=7)
    ca = _chain()
    codes = tok.encode(ca)
    x = fake.seen[-1][0].numpy().astype(np.float64)
    np.testing.assert_allclose(x, (ca - ca.mean(0)) / 10.0, atol=1e-5)   # nm, centred
    assert abs(x.mean(0)).max() < 1e-6 and 0.1 < np.abs(x).max() < 2.5
    assert codes.dtype == np.int64 and codes.shape == (24,) and codes.max() < 1000
    out = tok.decode(codes)                                              # back in Angstrom
    assert out.shape == (24, 3) and out.dtype == np.float32
    assert np.abs(out - (ca - ca.mean(0))).max() < 10 * fake.cell * np.sqrt(3) / 2 + 0.2
    np.testing.assert_array_equal(out, tok.decode(codes))               # seeded: same codes, same trace
    assert not np.array_equal(out, KanziTokenizer(fake, seed=1).decode(codes))
    # decoding does not disturb the caller's random stream
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    tok.decode(codes)
    assert torch.equal(a, torch.rand(3))


def test_bad_inputs_and_outputs():
    tok = KanziTokenizer(StandInDAE())
    with pytest.raises(ValueError):
        tok.encode(np.full((5, 3), np.nan))
    with pytest.raises(ValueError):
        tok.encode(np.zeros((5, 2)))
    with pytest.raises(ValueError):
        tok.decode([0, 1000])

    class Broken(StandInDAE):
        def encode(self, x_BLD, preprocess=False):
            return None, None, torch.full(x_BLD.shape[:2], 1000)

    with pytest.raises(RuntimeError, match="outside"):
        KanziTokenizer(Broken()).encode(_chain())


def test_missing_package_or_checkpoint_fails_clearly(tmp_path, monkeypatch):
    with pytest.raises(KanziUnavailable, match="--kanzi-checkpoint"):
        load_kanzi_model(None)
    with pytest.raises(KanziUnavailable, match="not found"):
        load_kanzi_model(tmp_path / "nope.pt")
    ckpt = tmp_path / "cleaned_model.pt"
    torch.save({"model_cfg": {}, "model": {}}, ckpt)
    monkeypatch.setitem(sys.modules, "kanzi", None)        # the package is absent (as it is here)
    monkeypatch.setitem(sys.modules, "kanzi.models", None)
    with pytest.raises(KanziUnavailable, match="pip install"):
        load_kanzi_model(ckpt)


def test_kanzi_kind_roundtrips_through_shards(small_db, tmp_path):
    from tokenfold.db import ProteinDB

    fake = StandInDAE()
    out = tmp_path / "kanzi"
    cfg = TokenizeConfig(db=str(small_db), out=str(out), kind="kanzi", interleaved=True, max_length=200)
    run(cfg, kanzi_tokenizer=KanziTokenizer(fake, checkpoint="stand-in"))
    vocab = Vocab.load(out)
    assert vocab.kind == "kanzi" and vocab.n_struct == 1000 and vocab.interleaved
    assert vocab.meta["kanzi"]["checkpoint"] == "stand-in"
    db = ProteinDB(small_db)
    n = 0
    for split in ("train", "val", "test"):
        ds = TokenDataset(out, split)
        for i in range(len(ds)):
            aa, codes = vocab.decode(ds[i].astype(np.int64))
            rec = db.get_global(int(ds.db_index[i]))
            a, L = int(ds.crop_start[i]), int(ds.n_res[i])
            assert aa == rec.aa[a:a + L] and L <= 200
            np.testing.assert_array_equal(codes, KanziTokenizer(StandInDAE()).encode(rec.ca[a:a + L]))
            n += 1
    assert n == len(db)
    assert json.loads((out / "report.json").read_text())["kanzi"]["n_tokens"] == 1000
    # stage 06's entry point: a decoder built from the vocabulary (the real one needs the package)
    with pytest.raises(KanziUnavailable):
        load_decoder(vocab)
