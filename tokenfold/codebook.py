"""Stage 03: a k-means codebook over per-residue ESM-2 vectors; the cluster index is a "structure token".

`Codebook` is the one object stage 04 uses too: ``Codebook.load(path).assign(vectors)``.

File format (``data/codebook/codebook_K512.pkl``): a pickle of a plain dict
``{"format": "tokenfold-codebook", "version": 1, "centroids": float32 [K, D], "meta": {...}}`` with
``codebook_K512.pkl.sha256`` beside it (``sha256sum`` format). `Codebook.load` reads the bytes once,
checks them against the checksum, and only then unpickles them, with an unpickler that accepts nothing
but numpy arrays and plain Python containers: it is our own artifact, and a changed or truncated file
is refused instead of executed.

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

import io
import json
import logging
import os
import pickle
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import atomic_path, json_default, read_json

log = logging.getLogger("tokenfold.codebook")

FORMAT = "tokenfold-codebook"
VERSION = 1


class CodebookError(RuntimeError):
    """A codebook file that must not be used; str() is the one-line reason."""


# numpy's array/scalar reconstructors under numpy 1.x and 2.x module names; nothing else is unpickled
_ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
_ALLOWED |= {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
_ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "numpy" and name.endswith("DType")) \
                or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a codebook file")


def sha256_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".sha256")


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


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, eps)


@dataclass
class Codebook:
    centroids: np.ndarray                  # float32 [K, D], in the (possibly normalised) k-means space
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        # plain JSON types only (numpy scalars, Paths, str subclasses become plain values): the meta is
        # unpickled by the numpy-only unpickler of `load` and written into the summary JSON
        self.meta = json.loads(json.dumps(dict(self.meta), default=json_default))
        self.meta.setdefault("normalize", False)
        self.meta.setdefault("K", int(self.centroids.shape[0]))
        self._c_sq = (self.centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)

    @property
    def K(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def normalize(self) -> bool:
        return bool(self.meta["normalize"])

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """float32 vectors in the space of the centroids (L2-normalised when the codebook was)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape [N, {self.dim}], got {x.shape}")
        return l2_normalize(x) if self.normalize else x

    def assign(self, x: np.ndarray, chunk: int = 65536, return_sqdist: bool = False):
        """Nearest-centroid code of each row of `x` ([N, D], any float dtype): int64 [N].

        Applies the normalisation recorded in `meta`. Rows containing NaN/inf get code -1.
        With `return_sqdist`, also the squared distance to the chosen centroid (float32 [N]).
        """
        x = self.prepare(x)
        codes = np.empty(len(x), dtype=np.int64)
        sq = np.empty(len(x), dtype=np.float32)
        cT = self.centroids.T
        for a in range(0, len(x), chunk):
            xb = x[a:a + chunk]
            d = self._c_sq[None, :] - 2.0 * (xb @ cT)          # ||x-c||^2 - ||x||^2
            c = np.argmin(d, axis=1)
            codes[a:a + chunk] = c
            sq[a:a + chunk] = np.maximum(d[np.arange(len(xb)), c] + (xb * xb).sum(1), 0.0)
        bad = ~np.isfinite(x).all(1)
        codes[bad] = -1
        sq[bad] = np.nan
        return (codes, sq) if return_sqdist else codes

    # ------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Pickle + ``.sha256`` beside it, both atomic (the checksum is written second)."""
        path = Path(path)
        blob = pickle.dumps({"format": FORMAT, "version": VERSION, "centroids": self.centroids,
                             "meta": self.meta}, protocol=4)
        with atomic_path(path, suffix=".pkl") as tmp:
            tmp.write_bytes(blob)
        import hashlib

        digest = hashlib.sha256(blob).hexdigest()
        with atomic_path(sha256_path(path)) as tmp:
            tmp.write_text(f"{digest}  {path.name}\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Codebook":
        """Verify the SHA-256 file beside `path`, then unpickle (numpy arrays and plain types only)."""
        import hashlib

        path = Path(path)
        if not path.exists():
            raise CodebookError(f"{path}: no such codebook (run 03_train_codebook.py)")
        spath = sha256_path(path)
        if not spath.exists():
            raise CodebookError(f"{path}: no checksum file {spath.name} beside it; refusing to unpickle")
        expected = (spath.read_text().split() or [""])[0].lower()
        blob = path.read_bytes()
        actual = hashlib.sha256(blob).hexdigest()
        if actual != expected:
            raise CodebookError(f"{path}: SHA-256 {actual[:16]}... does not match {spath.name} "
                                f"({expected[:16]}...); the file changed or is corrupt, refusing to unpickle")
        try:
            obj = _NumpyOnlyUnpickler(io.BytesIO(blob)).load()
        except Exception as e:
            raise CodebookError(f"{path}: unreadable codebook ({e})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise CodebookError(f"{path}: not a {FORMAT} file")
        if obj.get("version") != VERSION:
            raise CodebookError(f"{path}: codebook format version {obj.get('version')}, this code reads {VERSION}")
        return cls(obj["centroids"], dict(obj["meta"]))


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


# ============================================================================= quality numbers
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


# ============================================================================= the stage
@dataclass
class CodebookConfig:
    embeddings: Path
    db: Path = layout.DB
    out: Path = layout.CODEBOOK
    k: int = 512
    seed: int = 0
    normalize: bool = False
    max_train_residues: int | None = 1_000_000
    max_val_residues: int | None = 200_000
    batch_size: int = 4096
    max_iter: int = 100
    n_init: int = 3
    overwrite: bool = False


def find_embeddings(root: str | os.PathLike = layout.EMBEDDINGS) -> Path:
    """The only finished stage-02 output under `root`; an error naming the candidates otherwise."""
    root = Path(root)
    found = sorted(p.parent for p in root.glob("*/manifest.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no finished stage-02 output under {root} (run 02_extract_esm_embeddings.py)")
    raise FileNotFoundError(f"several embedding sets under {root}: {', '.join(p.name for p in found)}; "
                            "choose one with --embeddings")


def outputs(out: Path, k: int) -> dict[str, Path]:
    return {"codebook": out / f"codebook_K{k}.pkl", "summary": out / f"summary_K{k}.json",
            "pca": out / "clustering_visualization.png", "sizes": out / f"cluster_sizes_K{k}.png"}


def run_train_codebook(cfg: CodebookConfig) -> dict:
    from .db import ProteinDB
    from .embedding_store import EmbeddingStore
    from .esm_checkpoint import RANDOM_BANNER

    paths = outputs(cfg.out, cfg.k)
    if paths["summary"].exists() and not cfg.overwrite:
        Codebook.load(paths["codebook"])   # refuses a damaged file rather than reporting "done"
        log.info("%s exists; nothing to do (use --overwrite to retrain)", paths["summary"])
        return read_json(paths["summary"])
    if cfg.overwrite:              # a fresh start: no stale artifacts beside the new ones
        for p in [*paths.values(), sha256_path(paths["codebook"])]:
            p.unlink(missing_ok=True)
    store = EmbeddingStore(cfg.embeddings)
    db = ProteinDB(cfg.db)
    random_weights = store.random_weights
    if random_weights:
        log.warning("!!! %s: made from a %s", cfg.embeddings, RANDOM_BANNER)
    t0 = time.time()
    train = store.residues(db, "train", cfg.max_train_residues, cfg.seed)
    val = store.residues(db, "val", cfg.max_val_residues, cfg.seed)
    log.info("read %d train and %d val residue vectors (dim %d) from %s in %.1f s", len(train["emb"]),
             len(val["emb"]), store.dim, cfg.embeddings, time.time() - t0)
    if len(val["emb"]) == 0:
        log.warning("no val residues: utilisation and NMI are reported on train residues instead")
    meta = {"esm_model": store.meta["model"], "esm_model_path": store.meta.get("model_path"),
            "layer": int(store.meta["layer"]), "dim": store.dim, "random_weights": random_weights,
            "embeddings_dir": str(cfg.embeddings), "embeddings_mode": store.mode,
            # stage 04 embeds unseen chains on the fly: it must use the same long-sequence rule
            "esm_window": store.meta.get("window"), "esm_overlap": store.meta.get("overlap"),
            "esm_truncate": store.meta.get("truncate"),
            "db": str(cfg.db), "n_val_residues": int(len(val["emb"]))}
    log.info("fitting MiniBatchKMeans K=%d on %d residues (normalize=%s, seed=%d)", cfg.k, len(train["emb"]),
             cfg.normalize, cfg.seed)
    try:
        cb = fit_codebook(train["emb"], cfg.k, cfg.seed, cfg.normalize, cfg.batch_size, cfg.max_iter, cfg.n_init,
                          meta)
    except ValueError as e:
        from .cli import die
        die(str(e))
    log.info("k-means done in %.1f s (%d mini-batch steps)", cb.meta["fit_seconds"], cb.meta["n_steps"])
    held_out = val if len(val["emb"]) else train   # no val residues: report on train (warned above)
    quality, codes_tr, codes_va = evaluate(cb, train, held_out, cfg.seed)
    cb.save(paths["codebook"])
    summary = {"stage": "03_train_codebook", "codebook": paths["codebook"].name,
               "sha256": sha256_path(paths["codebook"]).read_text().split()[0],  # written by save()
               "meta": cb.meta, "quality": quality}
    if random_weights:
        summary["warning"] = (RANDOM_BANNER + ". The NMI / accuracy numbers below are meaningless: they show "
                              "only that the pipeline runs, not whether ESM-2 codes carry structure.")
    _plots(cb, held_out, codes_va, codes_tr,
           quality, paths, random_weights, cfg.seed)
    from .report import write_report
    write_report(paths["summary"], summary)      # last: its presence means "stage complete"
    s = quality["structure"]
    log.info("val utilisation %.3f, perplexity %.1f, dead codes %d; NMI(code;3Di) %.3f vs NMI(aa;3Di) %.3f%s",
             quality["val"]["utilisation"], quality["val"]["perplexity"], quality["val"]["dead_codes"],
             s["nmi_code_3di"], s["nmi_aa_3di"], "  [RANDOM WEIGHTS: meaningless]" if random_weights else "")
    return summary


def _plots(cb: Codebook, ev: dict, codes_ev: np.ndarray, codes_tr: np.ndarray, quality: dict, paths: dict,
           random_weights: bool, seed: int) -> None:
    import matplotlib.pyplot as plt

    from .report import save_figure

    tag = "\nRANDOM-WEIGHT ESM-2 (test/demo): clusters are meaningless" if random_weights else ""
    color = "red" if random_weights else "black"
    # 2-D PCA of a residue sample coloured by code, centroids on top
    rng = np.random.default_rng(seed)
    n = len(ev["emb"])
    idx = np.sort(rng.choice(n, min(n, 5000), replace=False)) if n else np.zeros(0, int)
    x = cb.prepare(ev["emb"][idx])
    ok = np.isfinite(x).all(1)
    x, codes = x[ok], codes_ev[idx][ok]
    fig, ax = plt.subplots(figsize=(7, 6))
    if len(x) >= 2:
        mu = x.mean(0)
        _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
        pc = vt[:2].T
        xy = (x - mu) @ pc
        cxy = (cb.centroids - mu) @ pc
        hue = (codes * 0.618034) % 1.0          # neighbouring code numbers get distant colours
        ax.scatter(xy[:, 0], xy[:, 1], c=hue, cmap="hsv", s=6, alpha=0.7, linewidths=0)
        ax.scatter(cxy[:, 0], cxy[:, 1], c="k", marker="x", s=6, linewidths=0.4, alpha=0.4,
                   label=f"{cb.K} centroids")
        ax.legend(loc="upper right")
    ax.set(title=f"PCA of {len(x)} residues coloured by code (K={cb.K}){tag}", xlabel="PC1", ylabel="PC2")
    ax.title.set_color(color)
    save_figure(fig, paths["pca"])
    # cluster sizes: rank plot + histogram, train and evaluation residues
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, codes_, col in (("train", codes_tr, "tab:blue"), ("val", codes_ev, "tab:orange")):
        cnt = np.bincount(codes_[codes_ >= 0], minlength=cb.K)
        axes[0].plot(np.sort(cnt)[::-1], color=col, label=f"{name}: {int((cnt == 0).sum())} dead codes")
        axes[1].hist(cnt, bins=40, color=col, alpha=0.6, label=name)
    axes[0].set(yscale="symlog", xlabel="code rank", ylabel="residues", title="cluster sizes, largest first")
    axes[0].legend()
    axes[1].set(xlabel="residues per code", ylabel="codes", title="histogram of cluster sizes")
    axes[1].legend()
    q = quality["val"]
    fig.suptitle(f"K={cb.K}: val utilisation {q['utilisation']:.1%}, perplexity {q['perplexity']:.0f}, "
                 f"NMI(code;3Di) {quality['structure']['nmi_code_3di']:.3f} vs NMI(aa;3Di) "
                 f"{quality['structure']['nmi_aa_3di']:.3f}{tag}", color=color, y=1.0 + 0.07 * bool(tag) + 0.04)
    save_figure(fig, paths["sizes"])
