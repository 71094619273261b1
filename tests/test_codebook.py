"""Stage 03: the k-means codebook (assignment, checksum-verified pickle, quality numbers, the stage).

Vectors are real stage-02 outputs on the `small_db` chains, from a tiny RANDOMLY INITIALISED ESM-2
(weights cannot be downloaded here), so the structure numbers themselves mean nothing; the tests pin
the mechanics and the arithmetic.
"""
import hashlib
import os
import pickle

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans
from sklearn.metrics import normalized_mutual_info_score

from tokenfold.artifacts import read_json
from tokenfold.codebook import (
    Codebook,
    CodebookConfig,
    CodebookError,
    evaluate,
    find_embeddings,
    fit_codebook,
    outputs,
    run_train_codebook,
)
from tokenfold.db import ProteinDB
from tokenfold.embedding_store import EmbeddingStore
from tokenfold.esm_checkpoint import write_random_checkpoint
from tokenfold.extract import ExtractConfig, finalize, run_extract


@pytest.fixture(scope="module")
def emb_dir(small_db, tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    ckpt = write_random_checkpoint(root / "esm2_t2_tiny_RANDOM_seed1.pt", num_layers=2, embed_dim=32, heads=4, seed=1)
    out = root / "embeddings" / "esm2_t2_tiny_RANDOM_seed1_L2"
    cfg = ExtractConfig(db=small_db, out=out, model=str(ckpt), random_weights_for_testing=True)
    run_extract(cfg)
    finalize(cfg)
    return out


@pytest.fixture(scope="module")
def train_val(emb_dir, small_db):
    store, db = EmbeddingStore(emb_dir), ProteinDB(small_db)
    return store.residues(db, "train", None, 0), store.residues(db, "val", None, 0)


def test_assign_is_nearest_centroid_and_matches_sklearn(train_val):
    x = train_val[0]["emb"]
    km = MiniBatchKMeans(16, random_state=0, n_init=1, batch_size=1024).fit(x)
    cb = Codebook(km.cluster_centers_, {"normalize": False})
    codes = cb.assign(x, chunk=1000)
    assert codes.dtype == np.int64 and codes.shape == (len(x),)
    np.testing.assert_array_equal(codes, km.predict(x))
    d = ((x[:500, None, :] - cb.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes[:500], d.argmin(1))
    _, sq = cb.assign(x[:500], return_sqdist=True)
    np.testing.assert_allclose(sq, d.min(1), rtol=1e-3, atol=1e-3)
    bad = x[:3].copy()
    bad[1, 0] = np.nan
    assert cb.assign(bad).tolist() == [codes[0], -1, codes[2]]
    assert cb.assign(x[:5].astype(np.float16)).shape == (5,)       # stored float16 vectors work as is
    with pytest.raises(ValueError):
        cb.assign(x[:, :5])


def test_fit_is_seeded_and_normalisation_recorded_and_applied(train_val):
    x = train_val[0]["emb"]
    a = fit_codebook(x, k=16, seed=3, normalize=True, batch_size=1024, n_init=1, meta={"esm_model": "m"})
    b = fit_codebook(x, k=16, seed=3, normalize=True, batch_size=1024, n_init=1)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.meta["normalize"] is True and a.meta["n_train_residues"] == len(x) and a.meta["esm_model"] == "m"
    assert {"numpy", "scikit-learn", "torch", "fair-esm"} <= set(a.meta["versions"])
    assert (np.linalg.norm(a.centroids, axis=1) <= 1 + 1e-5).all()   # means of unit vectors
    np.testing.assert_array_equal(a.assign(x * 3.7), a.assign(x))     # scale-free after normalisation
    with pytest.raises(ValueError, match="at least K"):
        fit_codebook(x[:10], k=16)


def test_pickle_roundtrip_and_checksum_refusal(train_val, tmp_path):
    x = train_val[0]["emb"]
    cb = fit_codebook(x, k=8, seed=0, batch_size=1024, n_init=1, meta={"layer": 2, "random_weights": True})
    path = cb.save(tmp_path / "codebook_K8.pkl")
    sha = (tmp_path / "codebook_K8.pkl.sha256").read_text().split()
    assert sha == [hashlib.sha256(path.read_bytes()).hexdigest(), "codebook_K8.pkl"]
    back = Codebook.load(path)
    np.testing.assert_array_equal(back.centroids, cb.centroids)
    assert back.meta == cb.meta and back.K == 8 and back.dim == x.shape[1]
    np.testing.assert_array_equal(back.assign(x), cb.assign(x))
    # one flipped byte: refused before unpickling
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(CodebookError, match="does not match"):
        Codebook.load(path)
    # no checksum file: refused
    cb.save(path)
    os.remove(str(path) + ".sha256")
    with pytest.raises(CodebookError, match="no checksum"):
        Codebook.load(path)

    # a pickle that would run code, even with a matching checksum: refused by the unpickler
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "codebook_K1.pkl"
    evil.write_bytes(pickle.dumps({"format": "tokenfold-codebook", "version": 1, "centroids": Evil(), "meta": {}}))
    (tmp_path / "codebook_K1.pkl.sha256").write_text(hashlib.sha256(evil.read_bytes()).hexdigest() + "  x\n")
    with pytest.raises(CodebookError, match="not allowed"):
        Codebook.load(evil)


def test_quality_numbers_by_hand():
    cb = Codebook(np.eye(4, dtype=np.float32) * 10, {"normalize": False})
    near = lambda i, n: np.eye(4, dtype=np.float32)[[i] * n] * 10 + 0.5   # noqa: E731
    aa = lambda s: np.frombuffer(s.encode(), np.uint8)                      # noqa: E731
    train = {"emb": np.concatenate([near(0, 2), near(1, 2), near(2, 2)]), "aa": aa("AAAAKK"), "ss": aa("DDLLVV")}
    val = {"emb": np.concatenate([near(0, 2), near(1, 1), near(2, 1)]), "aa": aa("AAAK"), "ss": aa("DDLV")}
    q, codes_tr, codes_va = evaluate(cb, train, val)
    assert codes_va.tolist() == [0, 0, 1, 2] and codes_tr.tolist() == [0, 0, 1, 1, 2, 2]
    assert q["val"]["utilisation"] == 0.75 and q["val"]["dead_codes"] == 1 and q["train"]["dead_codes"] == 1
    p = np.array([2 / 4, 1 / 4, 1 / 4])
    assert q["val"]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert q["val"]["inertia_mean"] == pytest.approx(4 * 0.25)      # (0.5^2) x 4 dims
    s = q["structure"]
    assert s["nmi_code_3di"] == pytest.approx(1.0)
    assert s["nmi_aa_3di"] == pytest.approx(normalized_mutual_info_score(list(b"AAAK"), list(b"DDLV")))
    assert s["acc_3di_from_code"] == 1.0                  # code 0 -> D, 1 -> L, 2 -> V on train
    assert s["acc_3di_from_aa"] == pytest.approx(3 / 4)   # A is D or L on train (tie -> D), K -> V
    assert s["code_beats_aa"] is True
    assert q["meets_utilisation_target_0.95"] is False


def test_stage03_end_to_end(emb_dir, small_db, tmp_path):
    out = tmp_path / "codebook"
    cfg = CodebookConfig(embeddings=emb_dir, db=small_db, out=out, k=16, batch_size=1024, n_init=1)
    summary = run_train_codebook(cfg)
    paths = outputs(out, 16)
    for p in paths.values():
        assert p.exists(), p
    assert (out / "codebook_K16.pkl.sha256").exists()
    on_disk = read_json(paths["summary"])
    assert on_disk["quality"] == summary["quality"]
    m = on_disk["meta"]
    assert m["random_weights"] is True and "meaningless" in on_disk["warning"]
    assert (m["K"], m["layer"], m["dim"], m["normalize"]) == (16, 2, 32, False)
    assert m["esm_model"] == "esm2_t2_tiny_RANDOM_seed1" and m["n_train_residues"] > 1000
    q = on_disk["quality"]
    assert 0 < q["val"]["utilisation"] <= 1 and q["val"]["n_residues"] > 0
    assert {"nmi_code_3di", "nmi_aa_3di", "nmi_code_3di_shuffled"} <= set(q["structure"])
    cb = Codebook.load(paths["codebook"])
    assert cb.meta == m
    # a finished stage is left alone; --overwrite redoes it with the same (seeded) result
    mtime = paths["codebook"].stat().st_mtime_ns
    run_train_codebook(cfg)
    assert paths["codebook"].stat().st_mtime_ns == mtime
    cfg.overwrite = True
    again = run_train_codebook(cfg)
    np.testing.assert_array_equal(Codebook.load(paths["codebook"]).centroids, cb.centroids)
    assert again["quality"] == summary["quality"]
    assert find_embeddings(emb_dir.parent) == emb_dir


def test_stage03_cli(emb_dir, small_db, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "03_train_codebook.py", "--embeddings", str(emb_dir), "--db", str(small_db),
                        "--out", str(tmp_path), "--k", "100000"], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "at least K" in err[0], r.stderr
    assert not list(tmp_path.glob("*.pkl"))
