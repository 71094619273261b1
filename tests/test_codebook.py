"""The codebook format: nearest-centroid assignment, the checksum-verified pickle.

Vectors are real stage-02 outputs on the `small_db` chains, from a tiny RANDOMLY INITIALISED ESM-2
(`esm_fixtures.train_val`; weights cannot be downloaded here).
"""
import hashlib
import os
import pickle

import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from tokenfold.codebook import Codebook, CodebookError
from tokenfold.codebook_fit import fit_codebook

pytest_plugins = ["esm_fixtures"]   # train_val


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
