"""The codebook format: k-means centroids over per-residue ESM-2 vectors, and the one code assignment.

A residue's code (its "structure token") is the index of its nearest centroid:
``Codebook.load(path).assign(vectors)``, shared by stage 03 (which fits and saves it,
`tokenfold.train_codebook`) and stage 04 (which assigns). Files: see data/README.md, section stage 03.

File format: a pickle of a plain dict
``{"format": "tokenfold-codebook", "version": 1, "centroids": float32 [K, D], "meta": {...}}`` with
``<name>.sha256`` beside it (``sha256sum`` format). `Codebook.load` reads the bytes once,
checks them against the checksum, and only then unpickles them, with an unpickler that accepts nothing
but numpy arrays and plain Python containers: it is our own artifact, and a changed or truncated file
is refused instead of executed.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifacts import atomic_path, json_default

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
