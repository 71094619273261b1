"""Fitting a codebook (seeded, normalisation recorded and applied) and its quality numbers, worked by hand.

Vectors are real stage-02 outputs on the `small_db` chains, from a tiny RANDOMLY INITIALISED ESM-2
(`esm_fixtures.train_val`; weights cannot be downloaded here).
"""
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from tokenfold.codebook import Codebook
from tokenfold.codebook_fit import evaluate, fit_codebook

pytest_plugins = ["esm_fixtures"]   # train_val


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
