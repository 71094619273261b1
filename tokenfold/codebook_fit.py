"""Fitting a k-means codebook (`fit_codebook`) and measuring how good it is (`evaluate`).

Quality numbers (`evaluate`), on held-out val residues unless said otherwise:

- utilisation: fraction of the K codes used at least once (the original pipeline promised > 95%);
- perplexity: exp(entropy) of the code-usage distribution (K for perfectly even use);
- dead codes: codes used by no residue (on train and on val);
- inertia: mean squared distance of a residue to its centroid (in the space k-means ran in);
- structure content: normalised mutual information NMI(code; 3Di letter) next to NMI(aa; 3Di) and
  NMI(code; aa), plus a shuffled-code chance level, and the accuracy of predicting the 3Di letter from
  the code (majority 3Di of each code on train residues) versus from the amino acid. A code that knows
  only the amino acid is no structure token.
"""
from __future__ import annotations

import platform
import time

import numpy as np

from .codebook import Codebook, l2_normalize


def library_versions() -> dict:
    import sklearn
    import torch

    from . import __version__

    v = {"tokenfold": __version__, "python": platform.python_version(), "numpy": np.__version__,
         "scikit-learn": sklearn.__version__, "torch": str(torch.__version__)}   # TorchVersion -> plain str
    try:
        import esm

        v["fair-esm"] = getattr(esm, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        pass
    return v


def fit_codebook(x: np.ndarray, k: int = 512, seed: int = 0, normalize: bool = False, batch_size: int = 4096,
                 max_iter: int = 100, n_init: int = 3, meta: dict | None = None) -> Codebook:
    """MiniBatchKMeans (scikit-learn) on the rows of `x`; deterministic given `seed`."""
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float32)
    x = x[np.isfinite(x).all(1)]
    if len(x) < k:
        raise ValueError(f"{len(x)} training vectors for K={k} codes: need at least K (more is better)")
    xs = l2_normalize(x) if normalize else x
    t0 = time.time()
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=min(batch_size, len(xs)), max_iter=max_iter,
                         n_init=n_init, compute_labels=False)
    # scikit-learn parallelises the mini-batch steps with OpenMP (and calls BLAS single-threaded inside);
    # the k-means++ initialisation however makes thousands of tiny multi-threaded BLAS calls, which on a
    # busy node spin-wait for cores: measured 8x slower than single-threaded BLAS (bench_codebook.py).
    with threadpool_limits(limits=1, user_api="blas"):
        km.fit(xs)
    m = dict(meta or {})
    m.update({"K": int(k), "normalize": bool(normalize), "n_train_residues": int(len(xs)), "seed": int(seed),
              "batch_size": int(km.batch_size), "max_iter": int(max_iter), "n_init": int(n_init),
              "n_steps": int(km.n_steps_), "fit_seconds": time.time() - t0, "versions": library_versions()})
    return Codebook(km.cluster_centers_.astype(np.float32), m)



def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a, b)) if len(a) else float("nan")


def _majority_accuracy(key_train, y_train, key_test, y_test, n_keys: int) -> float:
    """Accuracy of predicting y from key by the most frequent y of each key on train (global mode if unseen)."""
    if len(y_test) == 0 or len(y_train) == 0:
        return float("nan")
    table = np.zeros((n_keys, 256), dtype=np.int64)
    np.add.at(table, (key_train, y_train), 1)
    fallback = np.bincount(y_train, minlength=256).argmax()
    pred = np.where(table.sum(1) > 0, table.argmax(1), fallback)
    return float((pred[key_test] == y_test).mean())


def evaluate(cb: Codebook, train: dict, val: dict, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Quality numbers of the module docstring, plus the codes of the train and val residues.
    `train`/`val`: dicts with emb [N, D], aa and ss (uint8 letters, ss 0 = none), as stage 02 gives."""
    K = cb.K
    out: dict = {"K": K}
    codes_tr, d_tr = cb.assign(train["emb"], return_sqdist=True)
    codes_va, d_va = cb.assign(val["emb"], return_sqdist=True) if len(val["emb"]) else (np.zeros(0, int), np.zeros(0))
    ok_tr, ok_va = codes_tr >= 0, codes_va >= 0
    for name, codes, ok, d in (("train", codes_tr, ok_tr, d_tr), ("val", codes_va, ok_va, d_va)):
        counts = np.bincount(codes[ok], minlength=K)
        n = int(counts.sum())
        p = counts[counts > 0] / max(n, 1)
        out[name] = {
            "n_residues": n,
            "utilisation": float((counts > 0).mean()),
            "dead_codes": int((counts == 0).sum()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum())) if n else float("nan"),
            "inertia_mean": float(np.nanmean(d[ok])) if n else float("nan"),
            "inertia_sum": float(np.nansum(d[ok])),
            "largest_code_fraction": float(counts.max() / n) if n else float("nan"),
        }
    out["meets_utilisation_target_0.95"] = bool(out["val"]["utilisation"] > 0.95)
    # structure content on val residues that have a 3Di letter
    m_va = ok_va & (val["ss"] > 0)
    m_tr = ok_tr & (train["ss"] > 0)
    c, aa, ss = codes_va[m_va], val["aa"][m_va], val["ss"][m_va]
    rng = np.random.default_rng(seed)
    out["structure"] = {
        "n_val_residues_with_3di": int(m_va.sum()),
        "nmi_code_3di": _nmi(c, ss),
        "nmi_aa_3di": _nmi(aa, ss),
        "nmi_code_aa": _nmi(c, aa),
        "nmi_code_3di_shuffled": _nmi(rng.permutation(c), ss),
        "acc_3di_from_code": _majority_accuracy(codes_tr[m_tr], train["ss"][m_tr], c, ss, K),
        "acc_3di_from_aa": _majority_accuracy(train["aa"][m_tr].astype(np.int64), train["ss"][m_tr],
                                              aa.astype(np.int64), ss, 256),
        "acc_3di_majority_letter": float((ss == np.bincount(train["ss"][m_tr], minlength=256).argmax()).mean())
        if m_tr.any() and len(ss) else float("nan"),
    }
    s = out["structure"]
    s["code_beats_aa"] = bool(s["nmi_code_3di"] > s["nmi_aa_3di"]) if len(ss) else None
    return out, codes_tr, codes_va
