"""The stage-02 embedding format: per-residue ESM-2 vectors aligned with the protein DB, its writers and readers.

Files: see data/README.md, section stage 02. What they hold:

``manifest.json`` (written last, by the stage's finalize step): ``format`` "tokenfold-embeddings",
``version`` 1, the model fields ``model``, ``model_path``, ``layer``, ``num_layers``, ``dim``, ``dtype``
"float16", ``random_weights``, the long-sequence rule ``window``, ``overlap``, ``truncate``
(`tokenfold.esm_embed`), then ``mode`` ("full" or "sample"), ``db``, ``db_n_entries``, ``n_residues``,
``report`` and, per mode, ``shards`` (full: one {file, db_file, n_entries, n_residues} per DB shard) or
``sample`` (sample: {file, seed, max_residues, max_val_residues, n_train, n_val}).

Full mode: one HDF5 file per DB shard (`shard_file`), attributes = the model fields plus ``db_shard``,
``n_entries``, ``n_residues``; datasets ``offsets`` int64 [n+1] identical to the DB shard's, ``id`` [n],
``emb`` float16 [R, D] (entry j is rows offsets[j]:offsets[j+1]; with ``truncate``, rows past the window
are NaN), ``n_windows`` uint16 [n] (the windows each entry was embedded in).

Sample mode (``--max-residues``): one ``sample.h5``, attributes = the model fields; groups ``train`` and
``val``, each with ``emb`` float16 [N, D], ``entry`` int64 global DB index, ``pos`` int32 residue position,
``aa``/``ss`` uint8 letters, rows in global residue order (entry, then position). The residues are a
seeded uniform sample without replacement (`sample_residues`), the same in every array task.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from .artifacts import atomic_path, read_manifest

FORMAT = "tokenfold-embeddings"
VERSION = 1
STORE_DTYPE = np.float16
SAMPLE_SPLITS = ("train", "val")
SAMPLE_COLUMNS = (("emb", STORE_DTYPE), ("entry", np.int64), ("pos", np.int32), ("aa", np.uint8), ("ss", np.uint8))


def shard_file(k: int) -> str:
    return f"shard_{k:05d}.h5"


def write_shard(path: str | os.PathLike, attrs: dict, offsets: np.ndarray, ids, n_windows: np.ndarray, dim: int,
                blocks: Iterable[tuple[int, int, np.ndarray]]) -> None:
    """Write one full-mode shard file atomically; `blocks` yields (first row, end row, float16 rows) of ``emb``."""
    R = int(offsets[-1])
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("n_windows", data=n_windows)
        ds = f.create_dataset("emb", shape=(R, dim), dtype=STORE_DTYPE,
                              chunks=(max(1, min(R, 512)), dim) if R else None)
        for a, b, rows in blocks:
            ds[a:b] = rows


def write_sample(path: str | os.PathLike, attrs: dict, counts: dict[str, int],
                 parts: Iterable[dict[str, dict[str, np.ndarray]]]) -> None:
    """Write ``sample.h5`` atomically: `counts` rows per split; `parts` yields {split: {column: rows}},
    consecutive pieces of each split in global residue order (one piece in memory at a time)."""
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        ds = {split: {c: f.create_dataset(f"{split}/{c}", dtype=dt,
                                          shape=(n_rows, attrs["dim"]) if c == "emb" else (n_rows,))
                      for c, dt in SAMPLE_COLUMNS} for split, n_rows in counts.items()}
        filled = dict.fromkeys(counts, 0)
        for part in parts:
            for split, cols in part.items():
                a = filled[split]
                n = len(cols["entry"])
                for c, dt in SAMPLE_COLUMNS:
                    ds[split][c][a:a + n] = cols[c].astype(dt)
                filled[split] = a + n


class EmbeddingShard:
    """The embeddings of one DB shard: ``offsets``/``ids`` in memory, ``emb`` read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{self.path}: not a {FORMAT} file")
            self.attrs = dict(f.attrs)
            self.offsets = f["offsets"][()]
            self.ids = f["id"].asstr()[()]
            self.n_windows = f["n_windows"][()]
            self.shape = f["emb"].shape

    def __len__(self):
        return len(self.ids)

    def get(self, j: int) -> np.ndarray:
        """float16 [L_j, D] of entry j (position in the DB shard)."""
        return self.get_many([j])[0]

    def get_many(self, js) -> list[np.ndarray]:
        """float16 [L_j, D] of each entry j, the file opened once."""
        with h5py.File(self.path, "r") as f:
            ds = f["emb"]
            return [ds[self.offsets[j]:self.offsets[j + 1]] for j in js]

    def take(self, rows: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        """float16 [len(rows), D]: the given rows (sorted), read block by block, so that memory stays
        at one block of `block` rows instead of the whole shard (a 1% residue sample of a 650M
        model's shard touches nearly every block but keeps only its rows)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.shape[1]), np.float16)
        with h5py.File(self.path, "r") as f:
            ds = f["emb"]
            bounds = np.searchsorted(rows, np.arange(0, self.shape[0] + block, block))
            for i in range(len(bounds) - 1):
                a, b = bounds[i], bounds[i + 1]
                if a < b:
                    lo = rows[a]
                    out[a:b] = ds[lo:rows[b - 1] + 1][rows[a:b] - lo]
        return out

    def load(self) -> np.ndarray:
        """The whole shard, float16 [R, D] (entry j = rows offsets[j]:offsets[j+1])."""
        with h5py.File(self.path, "r") as f:
            return f["emb"][()]


class EmbeddingStore:
    """Reader of a stage-02 output directory (``data/embeddings/<model>_L<layer>/``).

    >>> store = EmbeddingStore("data/embeddings/esm2_t33_650M_UR50D_L33")
    >>> store.meta["model"], store.meta["dim"], store.random_weights
    >>> store.shard(0).get(5)        # full mode: float16 [L, D] of entry 5 of DB shard 0
    >>> store.sample("train")        # sample mode (--max-residues): dict of arrays
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = read_manifest(self.path, FORMAT, "stage 02")
        self.mode = self.meta["mode"]
        self.dim = int(self.meta["dim"])
        self.random_weights = bool(self.meta["random_weights"])
        self._shards: dict[int, EmbeddingShard] = {}

    @property
    def n_shards(self) -> int:
        return len(self.meta.get("shards", []))

    def shard(self, k: int) -> EmbeddingShard:
        if self.mode != "full":
            raise ValueError(f"{self.path}: holds a residue sample (--max-residues), not per-shard embeddings")
        if k not in self._shards:
            self._shards[k] = EmbeddingShard(self.path / self.meta["shards"][k]["file"])
        return self._shards[k]

    def sample(self, split: str = "train") -> dict[str, np.ndarray]:
        """Sample mode: emb float16 [N, D], entry int64, pos int32, aa uint8, ss uint8 of `split`."""
        if self.mode != "sample":
            raise ValueError(f"{self.path}: holds full per-shard embeddings, not a sample")
        with h5py.File(self.path / self.meta["sample"]["file"], "r") as f:
            if split not in f:
                raise KeyError(f"{self.path}: no {split} residues in the sample")
            return {c: f[split][c][()] for c, _ in SAMPLE_COLUMNS}

    def residues(self, db, split: str, max_residues: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Up to `max_residues` residues of `split` drawn uniformly (seeded), in either mode:
        dict(emb float32 [N, D], entry, pos, aa, ss). `db` is the ProteinDB the store was made from."""
        if self.mode == "sample":
            d = self.sample(split)
            if max_residues is not None and len(d["entry"]) > max_residues:
                keep = np.sort(np.random.default_rng(seed).choice(len(d["entry"]), max_residues, replace=False))
                d = {k: v[keep] for k, v in d.items()}
            d["emb"] = d["emb"].astype(np.float32)
            return d
        sel = sample_residues(db, split, max_residues, seed)
        parts = {c: [] for c, _ in SAMPLE_COLUMNS}
        for k, (entries, pos) in sel.items():
            sh = self.shard(k)
            dbs = db.shards[k]
            local = entries - dbs.first_index
            rows = sh.offsets[local] + pos
            if not np.array_equal(sh.ids, dbs.ids):
                raise ValueError(f"{sh.path}: ids differ from DB shard {dbs.path} (embeddings made from another DB?)")
            parts["emb"].append(sh.take(rows).astype(np.float32))
            parts["entry"].append(entries)
            parts["pos"].append(pos)
            rows_db = dbs.arrays["offsets"][local] + pos
            parts["aa"].append(dbs.arrays["aa"][rows_db])
            parts["ss"].append(dbs.arrays["ss"][rows_db])
            dbs.release()
        if not parts["emb"]:
            return {"emb": np.zeros((0, self.dim), np.float32), "entry": np.zeros(0, np.int64),
                    "pos": np.zeros(0, np.int32), "aa": np.zeros(0, np.uint8), "ss": np.zeros(0, np.uint8)}
        return {k: np.concatenate(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------- residue sampling
def _db_shard_offsets(shard) -> np.ndarray:
    """Offsets of a DB shard without loading its other arrays."""
    with h5py.File(shard.path, "r") as f:
        return f["offsets"][()]


def sample_residues(db, split: str, max_residues: int | None, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A seeded uniform sample (without replacement) of the residues of `split`, all of them when
    `max_residues` is None or larger. Returns {db shard: (global entry index [n], residue position [n])},
    sorted in global residue order. Every array task computes the same sample."""
    from .db import SPLIT_CODES

    code = SPLIT_CODES[split]
    entries, lengths = [], []
    for k, shard in enumerate(db.shards):
        codes = np.asarray(db.split_codes[db.shard_starts[k]:db.shard_starts[k + 1]])
        js = np.flatnonzero(codes == code)
        entries.append(js + shard.first_index)
        lengths.append(np.diff(_db_shard_offsets(shard))[js])
    entries = np.concatenate(entries).astype(np.int64) if entries else np.zeros(0, np.int64)
    lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    if max_residues is None or max_residues >= total:
        picks = np.arange(total, dtype=np.int64)
    else:
        rng = np.random.default_rng([seed, code])   # one stream per split
        picks = np.sort(rng.choice(total, size=max_residues, replace=False))
    which = np.searchsorted(starts, picks, side="right") - 1
    g = entries[which]
    pos = (picks - starts[which]).astype(np.int32)
    out = {}
    shard_of = np.searchsorted(db.shard_starts, g, side="right") - 1
    for k in np.unique(shard_of):
        m = shard_of == k
        out[int(k)] = (g[m], pos[m])
    return out

