"""Stage 04's token kinds on the real small DB: every kind round-trips through the token shards
(3di, geo decoding back to C-alpha, esm from stored and on-the-fly vectors; kanzi: test_kanzi.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
from test_tokenize import read_examples, tok_cfg

from tokenfold.db import ProteinDB
from tokenfold.geotokens import GeoCodebook, segment_starts
from tokenfold.metrics import segment_rmsd
from tokenfold.tokenize import run
from tokenfold.vocab import BOS, EOS


@pytest.mark.parametrize("interleaved", [False, True])
def test_3di_roundtrip(small_db, tmp_path, interleaved):
    out = tmp_path / "tok"
    run(tok_cfg(small_db, out, kind="3di", interleaved=interleaved))
    db = ProteinDB(small_db)
    vocab, ex = read_examples(out)
    assert vocab.kind == "3di" and vocab.interleaved == interleaved
    n = 0
    for split, rows in ex.items():
        for pid, g, crop, nres, aa, codes, ids in rows:
            rec = db.get_global(g)
            assert rec.id == pid and rec.split == split and crop == 0 and nres == rec.length
            assert aa == rec.aa and vocab.symbols(codes) == rec.ss
            if interleaved:   # <bos> <3di> a1 s1 a2 s2 ... <eos>: strictly alternating
                assert ids[0] == BOS and ids[1] == vocab.kind_id and ids[-1] == EOS
                assert vocab.is_struct(ids[3:-1:2]).all() and not vocab.is_struct(ids[2:-1:2]).any()
            n += 1
    assert n == len(db)
    mf = json.loads((out / "manifest.json").read_text())
    assert sum(v["n_examples"] for v in mf["splits"].values()) == len(db)
    rep = json.loads((out / "report.json").read_text())
    assert rep["token_frequency"]["train"]["codes_used"] > 10
    for f in rep["files"]:
        assert (out / f).stat().st_size > 1000


def test_geo_roundtrip_and_decoding(small_db, tmp_path):
    out = tmp_path / "geo"
    run(tok_cfg(small_db, out, kind="geo", geo_k=32, geo_robustness_chains=8))
    db = ProteinDB(small_db)
    vocab, ex = read_examples(out)
    cb = GeoCodebook.from_vocab(vocab, out)          # what stage 06 does
    assert vocab.n_struct == cb.n_tokens == 32 * 32 + 2 and vocab.meta["geo_codebook"]["sha256"]
    rmsd = []
    for split, rows in ex.items():
        for pid, g, crop, nres, aa, codes, ids in rows:
            rec = db.get_global(g)
            ca, gap = rec.ca[crop:crop + nres], rec.gap_before[crop:crop + nres]
            np.testing.assert_array_equal(codes, cb.encode(ca, gap))
            rmsd.append(segment_rmsd(cb.decode(codes), ca, segment_starts(ca, gap)))
            assert (codes == cb.BREAK).sum() == segment_starts(ca, gap).sum() - 1
    rep = json.loads((out / "report.json").read_text())
    assert np.median(rmsd) < 1.0
    assert rep["geo"]["rmsd_heldout"]["n"] == len(ex["val"]) + len(ex["test"])
    assert abs(rep["geo"]["rmsd_heldout"]["median"] - np.median(rmsd[len(ex["train"]):])) < 1e-6
    assert {"geo_rmsd_hist.png", "geo_rmsd_vs_length.png"} <= set(rep["files"])
    rob = rep["geo"]["robustness"]          # the substitution table on 8 held-out chains
    assert rob["n_chains"] == 8 and [(r["mode"], r["p"]) for r in rob["rows"]] == \
        [("clean", 0.0)] + [(m, p) for m in ("random", "near") for p in (0.02, 0.05, 0.1, 0.2)]
    clean, rand20 = rob["rows"][0], rob["rows"][4]
    assert clean["rmsd"] < 1.0 and clean["tm"] > 0.9 and rand20["tm"] < clean["tm"]


def test_esm_roundtrip_stored_and_on_the_fly(small_db, tmp_path):
    """esm kind with a tiny RANDOM ESM-2: vectors from a full stage-02 store, and computed on the fly."""
    from tokenfold.codebook import Codebook
    from tokenfold.codebook_fit import fit_codebook
    from tokenfold.embedding_store import EmbeddingStore
    from tokenfold.esm_checkpoint import load_esm, write_random_checkpoint
    from tokenfold.esm_embed import embed
    from tokenfold.extract import ExtractConfig, run_extract
    from tokenfold.extract import finalize as esm_finalize

    ck = write_random_checkpoint(tmp_path / "esm2_t2_RANDOM_test.pt", num_layers=2, embed_dim=32, heads=4)
    emb = tmp_path / "emb"
    ecfg = ExtractConfig(db=Path(small_db), out=emb, model=str(ck), layer=2, random_weights_for_testing=True)
    run_extract(ecfg)
    esm_finalize(ecfg)
    store = EmbeddingStore(emb)
    db = ProteinDB(small_db)
    km = fit_codebook(store.residues(db, "train")["emb"], k=16, seed=0, n_init=1)
    cb = Codebook(km.centroids, {"esm_model": store.meta["model"], "esm_model_path": str(ck), "layer": 2,
                                 "random_weights": True, "embeddings_dir": str(emb), "normalize": False})
    cbp = cb.save(tmp_path / "codebook_K16.pkl")
    with pytest.raises(ValueError, match="RANDOM"):
        run(tok_cfg(small_db, tmp_path / "refused", kind="esm", codebook=str(cbp)))
    stored, fly = tmp_path / "esm_store", tmp_path / "esm_fly"
    run(tok_cfg(small_db, stored, kind="esm", codebook=str(cbp), random_weights_for_testing=True, max_length=150))
    run(tok_cfg(small_db, fly, kind="esm", codebook=str(cbp), embeddings=str(tmp_path / "no_store"),
             random_weights_for_testing=True, interleaved=True, max_length=150))
    model, alphabet, _ = load_esm(ck, allow_random=True)
    (vs, ex_s), (vf, ex_f) = read_examples(stored), read_examples(fly)
    assert vs.meta["esm_codebook"]["random_weights"] and "RANDOM" in json.loads((stored / "report.json").read_text())["WARNING"]
    assert vs.meta["random_weights"] and "RANDOM" in vs.meta["WARNING"]   # what stage 06 and the sweep read
    assert vs.meta["esm_codebook"]["vectors"] == str(emb) and "on the fly" in vf.meta["esm_codebook"]["vectors"]
    recs = [db[i] for i in (0, len(db) // 2, len(db) - 1)]      # exact check of on-the-fly codes on a few
    vectors = dict(zip([r.index for r in recs], embed(model, alphabet, [r.aa for r in recs], layer=2)))
    agree = []
    for split in ("train", "val", "test"):
        assert [r[:5] for r in ex_s[split]] == [r[:5] for r in ex_f[split]]
        for (pid, g, crop, n, aa, cs, _), (*_, cf, _) in zip(ex_s[split], ex_f[split]):
            k, j = db.locate(g)
            np.testing.assert_array_equal(cs, cb.assign(store.shard(k).get(j))[crop:crop + n])
            if g in vectors:
                np.testing.assert_array_equal(cf, cb.assign(vectors[g])[crop:crop + n])
            agree.append((cs == cf).mean())
    assert np.mean(agree) > 0.95          # stored float16 vs on-the-fly float32 vectors: same codes almost always
