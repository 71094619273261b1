"""What a model must beat: structure tokens guessed from the amino acids alone, fit on the train split.

- ``most_frequent``: the train split's most frequent structure token, for every residue.
- ``per_aa``: for each amino acid, its most frequent structure token (unseen amino acid: the overall one).
- ``window`` (3Di, or any kind when asked): multinomial logistic regression (scikit-learn) on the
  one-hot amino acids of residues i-7..i+7 (21 letters + "outside the chain" per position).

On experimental chains the published 3Di numbers are: 'V' alone ~17%, per amino acid ~18%, the
windowed classifier ~24% (on AFDB models 'D' alone is ~24%). A model that does not beat these has
learned nothing about structure.

The fitted baselines are a small ``.npz`` (no pickle): counts, per-amino-acid table and the
classifier's coefficients; prediction is a sparse matrix product, no scikit-learn object needed.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .artifacts import atomic_path
from .vocab import AA_LETTERS, AA_LUT, Vocab

log = logging.getLogger("tokenfold.baselines")

N_AA = len(AA_LETTERS)       # 21 (20 + X)
OUTSIDE = N_AA               # one-hot slot for "position outside the chain"
NAMES = ("most_frequent", "per_aa", "window")


def aa_index(aa: str) -> np.ndarray:
    """Amino-acid letters -> 0..20 (AA_LETTERS order; anything unknown is X = 20)."""
    return AA_LUT[np.frombuffer(aa.encode("ascii"), dtype=np.uint8)]


def window_features(aa: str, window: int = 7):
    """scipy CSR [L, (2w+1)*22]: one-hot amino acid (or 'outside') at each offset -w..w."""
    from scipy.sparse import csr_matrix

    a = aa_index(aa)
    L = len(a)
    width = 2 * window + 1
    padded = np.concatenate([np.full(window, OUTSIDE), a, np.full(window, OUTSIDE)])
    # column of (residue i, offset o) = o * 22 + letter at i + o - w
    idx = np.arange(L)[:, None] + np.arange(width)[None, :]
    cols = (np.arange(width)[None, :] * (N_AA + 1) + padded[idx]).ravel()
    rows = np.repeat(np.arange(L), width)
    return csr_matrix((np.ones(L * width, dtype=np.float32), (rows, cols)), shape=(L, width * (N_AA + 1)))


@dataclass
class Baselines:
    n_struct: int
    counts: np.ndarray              # int64 [n_struct]: token frequencies in the fitting sample
    per_aa: np.ndarray              # int64 [21]: most frequent token per amino acid
    window: int = 7
    coef: np.ndarray | None = None  # float32 [C, F] logistic regression (None: not fitted)
    intercept: np.ndarray | None = None
    classes: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def most_frequent(self) -> int:
        return int(np.argmax(self.counts))

    @property
    def names(self) -> list[str]:
        return [n for n in NAMES if n != "window" or self.coef is not None]

    # ---- fitting
    @classmethod
    def fit(cls, examples: Iterable[tuple[str, np.ndarray]], n_struct: int, windowed: bool = True, window: int = 7,
            max_residues: int = 200_000, C: float = 1.0, max_iter: int = 300, seed: int = 0) -> "Baselines":
        """Fit on (amino acids, structure codes) pairs, taking whole examples until `max_residues`."""
        seqs, codes = [], []
        n = 0
        for aa, c in examples:
            if n >= max_residues:
                break
            seqs.append(aa)
            codes.append(np.asarray(c, dtype=np.int64))
            n += len(aa)
        if not seqs:
            raise ValueError("no training examples for the baselines")
        allc = np.concatenate(codes)
        alla = np.concatenate([aa_index(s) for s in seqs])
        counts = np.bincount(allc, minlength=n_struct).astype(np.int64)
        joint = np.zeros((N_AA, n_struct), dtype=np.int64)
        np.add.at(joint, (alla, allc), 1)
        per_aa = np.where(joint.sum(1) > 0, joint.argmax(1), int(np.argmax(counts))).astype(np.int64)
        b = cls(n_struct=n_struct, counts=counts, per_aa=per_aa, window=window,
                meta={"n_proteins": len(seqs), "n_residues": int(len(allc)), "max_residues": max_residues,
                      "C": C, "seed": seed})
        if windowed:
            from scipy.sparse import vstack
            from sklearn.linear_model import LogisticRegression

            X = vstack([window_features(s, window) for s in seqs]).tocsr()
            if len(np.unique(allc)) < 2:
                log.warning("baselines: only one structure token in the training sample; no windowed classifier")
            else:
                clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
                clf.fit(X, allc)
                b.coef = clf.coef_.astype(np.float32)
                b.intercept = clf.intercept_.astype(np.float32)
                b.classes = clf.classes_.astype(np.int64)
                b.meta["window_train_accuracy"] = float(np.mean(b._window_predict_X(X) == allc))
        return b

    # ---- prediction
    def _window_predict_X(self, X) -> np.ndarray:
        scores = X @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # binary problem: sklearn keeps one row of coefficients
            return self.classes[(np.asarray(scores)[:, 0] > 0).astype(int)]
        return self.classes[np.asarray(scores).argmax(1)]

    def predict(self, name: str, aa: str) -> np.ndarray:
        """Structure codes [L] that baseline `name` guesses for the amino-acid sequence `aa`."""
        if name == "most_frequent":
            return np.full(len(aa), self.most_frequent, dtype=np.int64)
        if name == "per_aa":
            return self.per_aa[aa_index(aa)]
        if name == "window":
            if self.coef is None:
                raise ValueError("the windowed baseline was not fitted")
            return self._window_predict_X(window_features(aa, self.window))
        raise ValueError(f"unknown baseline {name!r}; expected one of {NAMES}")

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        arrays = {"counts": self.counts, "per_aa": self.per_aa,
                  "meta_json": np.array(json.dumps({"n_struct": self.n_struct, "window": self.window, **self.meta}))}
        if self.coef is not None:
            arrays.update(coef=self.coef, intercept=self.intercept, classes=self.classes)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Baselines":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta_json"]))
            has = "coef" in z.files
            return cls(n_struct=int(meta.pop("n_struct")), counts=z["counts"], per_aa=z["per_aa"],
                       window=int(meta.pop("window")), coef=z["coef"] if has else None,
                       intercept=z["intercept"] if has else None, classes=z["classes"] if has else None, meta=meta)


def train_examples(token_dir: str | os.PathLike, vocab: Vocab, seed: int = 0, split: str = "train"):
    """(amino acids, structure codes) of the `split` token examples in a seeded random order
    (the order decides which examples a residue cap keeps)."""
    from .shards import TokenDataset

    ds = TokenDataset(token_dir, split)
    order = np.random.default_rng(seed).permutation(len(ds))
    for i in order:
        yield vocab.decode(ds[int(i)])
