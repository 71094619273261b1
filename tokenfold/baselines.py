"""What a model must beat: the target guessed from the source alone, residue by residue, fit on the train split.

Direction-generic (`tokenfold.vocab`): the *input* of residue i is its source code (its amino acid
for seq2struct; its structure token for struct2seq) and the *output* its target code (a structure
token; an amino acid for struct2seq).

- ``most_frequent``: the train split's most frequent output, for every residue.
- ``per_aa`` (seq2struct) / ``per_struct_token`` (struct2seq): for each input code, its most frequent
  output (an input unseen in training: the overall one).
- ``window`` (3Di, or any kind when asked): multinomial logistic regression (scikit-learn) on the
  one-hot input codes of residues i-7..i+7 (each input code + "outside the chain" per position).

On experimental chains the published 3Di numbers are: 'V' alone ~17%, per amino acid ~18%, the
windowed classifier ~24% (on AFDB models 'D' alone is ~24%). A model that does not beat these has
learned nothing about structure.

struct2seq outputs are the 20 standard amino acids: X (unknown) residues are left out of the fit
(`fit`'s ``skip_output``), so no baseline ever guesses X.

The fitted baselines are a small ``.npz`` (no pickle): counts, per-input table and the classifier's
coefficients; prediction is a sparse matrix product, no scikit-learn object needed.
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


def aa_index(aa: str) -> np.ndarray:
    """Amino-acid letters -> 0..20 (AA_LETTERS order; anything unknown is X = 20)."""
    return AA_LUT[np.frombuffer(aa.encode("ascii"), dtype=np.uint8)]


def window_features(x: np.ndarray, n_in: int, window: int = 7):
    """scipy CSR [L, (2w+1)*(n_in+1)]: one-hot input code (or 'outside', slot n_in) at each offset -w..w."""
    from scipy.sparse import csr_matrix

    a = np.asarray(x, dtype=np.int64)
    L = len(a)
    width = 2 * window + 1
    padded = np.concatenate([np.full(window, n_in), a, np.full(window, n_in)])
    # column of (residue i, offset o) = o * (n_in + 1) + code at i + o - w
    idx = np.arange(L)[:, None] + np.arange(width)[None, :]
    cols = (np.arange(width)[None, :] * (n_in + 1) + padded[idx]).ravel()
    rows = np.repeat(np.arange(L), width)
    return csr_matrix((np.ones(L * width, dtype=np.float32), (rows, cols)), shape=(L, width * (n_in + 1)))


@dataclass
class Baselines:
    n_in: int                       # input codes: 21 amino-acid letters (seq2struct) or the structure tokens
    n_out: int                      # output codes: the structure tokens (seq2struct) or 21 amino-acid letters
    counts: np.ndarray              # int64 [n_out]: output frequencies in the fitting sample
    per_input: np.ndarray           # int64 [n_in]: most frequent output per input code
    per_name: str = "per_aa"        # the name of the per-input baseline: per_aa | per_struct_token
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
        return ["most_frequent", self.per_name] + (["window"] if self.coef is not None else [])

    # ---- fitting
    @classmethod
    def for_vocab(cls, vocab: Vocab, examples: Iterable[tuple[np.ndarray, np.ndarray]], **kw) -> "Baselines":
        """`fit` with the input/output sizes and names of `vocab`'s direction (X never an output of struct2seq)."""
        return cls.fit(examples, vocab.n_source, vocab.n_target, per_name="per_struct_token" if vocab.inverse
                       else "per_aa", skip_output=N_AA - 1 if vocab.inverse else None, **kw)

    @classmethod
    def fit(cls, examples: Iterable[tuple[np.ndarray, np.ndarray]], n_in: int, n_out: int, per_name: str = "per_aa",
            windowed: bool = True, window: int = 7, max_residues: int = 200_000, C: float = 1.0, max_iter: int = 300,
            seed: int = 0, skip_output: int | None = None) -> "Baselines":
        """Fit on (input codes, output codes) pairs, taking whole examples until `max_residues`; residues
        whose output is `skip_output` are left out of the fit (never predicted)."""
        xs, ys = [], []
        n = 0
        for x, y in examples:
            if n >= max_residues:
                break
            xs.append(np.asarray(x, dtype=np.int64))
            ys.append(np.asarray(y, dtype=np.int64))
            n += len(x)
        if not xs:
            raise ValueError("no training examples for the baselines")
        allx, ally = np.concatenate(xs), np.concatenate(ys)
        keep = ally != skip_output if skip_output is not None else np.ones(len(ally), bool)
        allx, ally = allx[keep], ally[keep]
        if not len(ally):
            raise ValueError("no training residues for the baselines")
        counts = np.bincount(ally, minlength=n_out).astype(np.int64)
        joint = np.zeros((n_in, n_out), dtype=np.int64)
        np.add.at(joint, (allx, ally), 1)
        per_input = np.where(joint.sum(1) > 0, joint.argmax(1), int(np.argmax(counts))).astype(np.int64)
        b = cls(n_in=n_in, n_out=n_out, counts=counts, per_input=per_input, per_name=per_name, window=window,
                meta={"n_proteins": len(xs), "n_residues": int(len(ally)), "max_residues": max_residues,
                      "C": C, "seed": seed})
        if windowed:
            from scipy.sparse import vstack
            from sklearn.linear_model import LogisticRegression

            X = vstack([window_features(x, n_in, window) for x in xs]).tocsr()[keep]
            if len(np.unique(ally)) < 2:
                log.warning("baselines: only one output code in the training sample; no windowed classifier")
            else:
                clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
                clf.fit(X, ally)
                b.coef = clf.coef_.astype(np.float32)
                b.intercept = clf.intercept_.astype(np.float32)
                b.classes = clf.classes_.astype(np.int64)
                b.meta["window_train_accuracy"] = float(np.mean(b._window_predict_X(X) == ally))
        return b

    # ---- prediction
    def _window_predict_X(self, X) -> np.ndarray:
        scores = X @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # binary problem: sklearn keeps one row of coefficients
            return self.classes[(np.asarray(scores)[:, 0] > 0).astype(int)]
        return self.classes[np.asarray(scores).argmax(1)]

    def predict(self, name: str, x) -> np.ndarray:
        """Output codes [L] that baseline `name` guesses for the input codes `x` [L] (`Vocab.source_codes`)."""
        x = np.asarray(x, dtype=np.int64)
        if name == "most_frequent":
            return np.full(len(x), self.most_frequent, dtype=np.int64)
        if name == self.per_name:
            return self.per_input[x]
        if name == "window":
            if self.coef is None:
                raise ValueError("the windowed baseline was not fitted")
            return self._window_predict_X(window_features(x, self.n_in, self.window))
        raise ValueError(f"unknown baseline {name!r}; expected one of {self.names}")

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        info = {"n_in": self.n_in, "n_out": self.n_out, "per_name": self.per_name, "window": self.window, **self.meta}
        arrays = {"counts": self.counts, "per_input": self.per_input, "meta_json": np.array(json.dumps(info))}
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
            return cls(n_in=int(meta.pop("n_in")), n_out=int(meta.pop("n_out")), counts=z["counts"],
                       per_input=z["per_input"], per_name=meta.pop("per_name"), window=int(meta.pop("window")),
                       coef=z["coef"] if has else None, intercept=z["intercept"] if has else None,
                       classes=z["classes"] if has else None, meta=meta)


def train_examples(token_dir: str | os.PathLike, vocab: Vocab, seed: int = 0, split: str = "train"):
    """(input codes, output codes) (`Vocab.source_codes`, `Vocab.target_codes`) of the `split` token
    examples in a seeded random order (the order decides which examples a residue cap keeps)."""
    from .shards import TokenDataset

    ds = TokenDataset(token_dir, split)
    order = np.random.default_rng(seed).permutation(len(ds))
    for i in order:
        aa, codes = vocab.decode(ds[int(i)])
        yield vocab.source_codes(aa, codes), vocab.target_codes(aa, codes)
