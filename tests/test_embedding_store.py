"""The stage-02 embedding store: a seeded residue sample, the same residues whichever mode stores them.

With a tiny RANDOMLY INITIALISED ESM-2 (`esm_fixtures`); real weights cannot be downloaded here.
"""
import numpy as np

from tokenfold.db import ProteinDB
from tokenfold.embedding_store import EmbeddingStore, sample_residues
from tokenfold.extract import finalize, run_extract

pytest_plugins = ["esm_fixtures"]   # tiny_ckpt, full_run, stage02_config


def test_stage02_residue_sample(stage02_config, full_run, small_db, tiny_ckpt, tmp_path):
    db = ProteinDB(small_db)
    cfg = stage02_config(small_db, tmp_path / "sample", tiny_ckpt, max_residues=700, max_val_residues=300, seed=3)
    run_extract(cfg)
    finalize(cfg)
    store = EmbeddingStore(tmp_path / "sample")
    assert store.mode == "sample" and store.random_weights
    tr, va = store.sample("train"), store.sample("val")
    n_val = sum(len(db.get_global(int(g)).aa) for g in db.indices("val"))
    assert len(tr["entry"]) == 700 and len(va["entry"]) == min(300, n_val)
    assert {db.split_of(int(g)) for g in tr["entry"]} == {"train"}
    assert {db.split_of(int(g)) for g in va["entry"]} == {"val"}
    pairs = set(zip(tr["entry"].tolist(), tr["pos"].tolist()))
    assert len(pairs) == 700                              # without replacement
    full = EmbeddingStore(full_run)
    for i in range(0, 700, 97):
        g, p = int(tr["entry"][i]), int(tr["pos"][i])
        rec = db.get_global(g)
        assert chr(tr["aa"][i]) == rec.aa[p] and chr(tr["ss"][i]) == rec.ss[p]
        k, j = db.locate(g)
        np.testing.assert_allclose(tr["emb"][i].astype(np.float32), full.shard(k).get(j)[p].astype(np.float32),
                                   atol=2e-2, rtol=1e-2)
    # the same seed draws the same residues, whichever mode reads them
    again = sample_residues(db, "train", 700, 3)
    np.testing.assert_array_equal(np.concatenate([v[0] for v in again.values()]), tr["entry"])
    res = full.residues(db, "train", 700, 3)
    np.testing.assert_array_equal(res["entry"], tr["entry"])
    np.testing.assert_array_equal(res["pos"], tr["pos"])

