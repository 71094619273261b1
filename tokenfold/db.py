"""The protein DB: sharded HDF5 files of ragged per-residue arrays, plus a manifest and a split.
Files: see data/README.md, section stage 01.

One shard file holds n entries and R residues in total, Foldseek-style: flat data plus offsets::

    offsets     int64   [n+1]   entry j's residues are offsets[j]:offsets[j+1]
    id, source, origin  str [n] entry id, input kind (structure/foldseek/fasta), file or DB key
    aa          uint8   [R]     amino acids, ASCII one-letter codes (X for unknown)
    ss          uint8   [R]     3Di letters, ASCII; 0 where the entry has none
    ca          float32 [R,3]   C-alpha coordinates in Angstrom; NaN where the entry has none
    plddt       float32 [R]     per-residue pLDDT (AlphaFold B-factor column); NaN where none
    gap_before  bool    [R]     True where residue i is NOT bonded to residue i-1 (chain break)
    has_ss, has_ca, has_plddt  bool [n]

Entries are numbered globally in shard order; `ProteinDB` reads them by that number, by split, or
shard by shard in bulk (what the later stages do).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np

from .artifacts import atomic_path, read_manifest

FORMAT = "tokenfold-db"
VERSION = 1
SPLITS = ("train", "val", "test")
EXCLUDED = 3
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "excluded": EXCLUDED}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}


@dataclass
class ProteinRecord:
    """One protein chain. `ss`, `ca`, `plddt` are None when the entry has no such data."""

    id: str
    aa: str
    ss: str | None = None
    ca: np.ndarray | None = None          # float32 [L, 3], Angstrom
    plddt: np.ndarray | None = None       # float32 [L]
    gap_before: np.ndarray | None = None  # bool [L]; None means "no breaks"
    source: str = ""
    origin: str = ""
    split: str | None = None
    index: int = -1                       # global index in the DB

    def __post_init__(self):
        L = len(self.aa)
        for name in ("ss", "ca", "plddt", "gap_before"):
            v = getattr(self, name)
            if v is not None and len(v) != L:
                raise ValueError(f"{self.id}: len({name})={len(v)} != len(aa)={L}")

    @property
    def length(self) -> int:
        return len(self.aa)

    @property
    def n_breaks(self) -> int:
        return 0 if self.gap_before is None else int(self.gap_before[1:].sum())


# ----------------------------------------------------------------------------- writing
@dataclass
class Chunk:
    """Entries in the shard layout (flat arrays + offsets), the unit shards are assembled from."""

    ids: list
    source: list
    origin: list
    lengths: np.ndarray        # int64 [n]
    aa: np.ndarray             # uint8 [R]
    ss: np.ndarray             # uint8 [R], 0 where none
    ca: np.ndarray             # float32 [R, 3], NaN where none
    plddt: np.ndarray          # float32 [R], NaN where none
    gap_before: np.ndarray     # bool [R]
    has_ss: np.ndarray         # bool [n]
    has_ca: np.ndarray
    has_plddt: np.ndarray

    def __len__(self):
        return len(self.ids)

    @classmethod
    def from_records(cls, records: Sequence[ProteinRecord]) -> "Chunk":
        n = len(records)
        lengths = np.array([r.length for r in records], dtype=np.int64)
        R = int(lengths.sum())
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        aa = np.frombuffer("".join(r.aa for r in records).encode("ascii"), dtype=np.uint8).copy()
        ss = np.zeros(R, dtype=np.uint8)
        ca = np.full((R, 3), np.nan, dtype=np.float32)
        plddt = np.full(R, np.nan, dtype=np.float32)
        gap = np.zeros(R, dtype=bool)
        has = np.zeros((3, n), dtype=bool)
        for j, r in enumerate(records):
            a, b = starts[j], starts[j + 1]
            if r.ss is not None:
                ss[a:b] = np.frombuffer(r.ss.encode("ascii"), dtype=np.uint8)
                has[0, j] = True
            if r.ca is not None:
                ca[a:b] = r.ca
                has[1, j] = True
            if r.plddt is not None:
                plddt[a:b] = r.plddt
                has[2, j] = True
            if r.gap_before is not None:
                gap[a:b] = r.gap_before
        return cls([r.id for r in records], [r.source for r in records], [r.origin for r in records],
                   lengths, aa, ss, ca, plddt, gap, has[0], has[1], has[2])

    @classmethod
    def concat(cls, chunks: Sequence["Chunk"]) -> "Chunk":
        chunks = [c for c in chunks if len(c)] or [cls.from_records([])]
        if len(chunks) == 1:
            return chunks[0]
        cat = lambda name: np.concatenate([getattr(c, name) for c in chunks])  # noqa: E731
        return cls(sum((c.ids for c in chunks), []), sum((c.source for c in chunks), []),
                   sum((c.origin for c in chunks), []), cat("lengths"), cat("aa"), cat("ss"),
                   np.concatenate([c.ca.reshape(-1, 3) for c in chunks]), cat("plddt"), cat("gap_before"),
                   cat("has_ss"), cat("has_ca"), cat("has_plddt"))

    def arrays(self) -> dict:
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return {"offsets": offsets, "aa": self.aa, "ss": self.ss, "ca": self.ca, "plddt": self.plddt,
                "gap_before": self.gap_before, "has_ss": self.has_ss, "has_ca": self.has_ca,
                "has_plddt": self.has_plddt, "id": self.ids, "source": self.source, "origin": self.origin}


def write_shard(path: str | os.PathLike, records: Sequence[ProteinRecord], attrs: dict | None = None) -> None:
    write_shard_arrays(path, Chunk.from_records(records).arrays(), attrs)


def write_shard_arrays(path: str | os.PathLike, arrays: dict, attrs: dict | None = None) -> None:
    """Write one shard from flat arrays already in the layout above (`DBShard.ARRAYS` plus the
    id/source/origin string lists). Bulk writers (e.g. Foldseek DB ingestion) use it directly."""
    n = len(arrays["offsets"]) - 1
    R = int(arrays["offsets"][-1]) if n >= 0 and len(arrays["offsets"]) else 0
    str_dt = h5py.string_dtype("utf-8")
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format": FORMAT, "version": VERSION, "n_entries": n, "n_residues": R})
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
            f.create_dataset("offsets", data=np.asarray(arrays["offsets"], dtype=np.int64))
            for name in ("id", "source", "origin"):
                f.create_dataset(name, data=np.array(list(arrays[name]), dtype=object), dtype=str_dt)
            # lzf: fast, and it squeezes the NaN/zero filler of sequence-only entries to almost nothing
            big = dict(compression="lzf", chunks=True) if R else {}
            f.create_dataset("aa", data=np.asarray(arrays["aa"], dtype=np.uint8), **big)
            f.create_dataset("ss", data=np.asarray(arrays["ss"], dtype=np.uint8), **big)
            # coordinates barely compress (lzf: -3 % at 20x the write time), so only shards holding
            # sequence-only entries (NaN filler) compress them
            has_ca = np.asarray(arrays["has_ca"], dtype=bool)
            f.create_dataset("ca", data=np.asarray(arrays["ca"], dtype=np.float32).reshape(-1, 3),
                             **(big if not has_ca.all() else {}))
            f.create_dataset("plddt", data=np.asarray(arrays["plddt"], dtype=np.float32), **big)
            f.create_dataset("gap_before", data=np.asarray(arrays["gap_before"], dtype=bool), **big)
            f.create_dataset("has_ss", data=np.asarray(arrays["has_ss"], dtype=bool))
            f.create_dataset("has_ca", data=np.asarray(arrays["has_ca"], dtype=bool))
            f.create_dataset("has_plddt", data=np.asarray(arrays["has_plddt"], dtype=bool))


# ----------------------------------------------------------------------------- reading one shard
class DBShard:
    """All arrays of one shard file, loaded on first use (one shard fits in memory by design)."""

    ARRAYS = ("offsets", "aa", "ss", "ca", "plddt", "gap_before", "has_ss", "has_ca", "has_plddt")

    def __init__(self, path: str | os.PathLike, first_index: int = 0, split: np.ndarray | None = None):
        self.path = Path(path)
        self.first_index = first_index
        self._split = split
        self._a: dict | None = None
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{self.path}: not a {FORMAT} shard")
            self.n_entries = int(f.attrs["n_entries"])
            self.n_residues = int(f.attrs["n_residues"])
            self.attrs = dict(f.attrs)

    def __len__(self):
        return self.n_entries

    @property
    def arrays(self) -> dict:
        if self._a is None:
            with h5py.File(self.path, "r") as f:
                a = {k: f[k][()] for k in self.ARRAYS}
                for k in ("id", "source", "origin"):
                    a[k] = f[k].asstr()[()]
            self._a = a
        return self._a

    def release(self) -> None:
        self._a = None

    @property
    def ids(self) -> np.ndarray:
        return self.arrays["id"]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.arrays["offsets"])

    def record(self, j: int) -> ProteinRecord:
        a = self.arrays
        s, e = int(a["offsets"][j]), int(a["offsets"][j + 1])
        split = None if self._split is None else SPLIT_NAMES[int(self._split[j])]
        return ProteinRecord(
            id=str(a["id"][j]),
            aa=a["aa"][s:e].tobytes().decode("ascii"),
            ss=a["ss"][s:e].tobytes().decode("ascii") if a["has_ss"][j] else None,
            ca=a["ca"][s:e] if a["has_ca"][j] else None,
            plddt=a["plddt"][s:e] if a["has_plddt"][j] else None,
            gap_before=a["gap_before"][s:e],
            source=str(a["source"][j]),
            origin=str(a["origin"][j]),
            split=split,
            index=self.first_index + j,
        )

    def __iter__(self) -> Iterator[ProteinRecord]:
        for j in range(self.n_entries):
            yield self.record(j)


# ----------------------------------------------------------------------------- the whole DB
class ProteinDB:
    """Read API shared by every later stage and by outside users.

    >>> db = ProteinDB("data/db")
    >>> len(db), db[0].id, db[0].aa, db[0].ss, db[0].ca.shape, db[0].split
    >>> for rec in db.iter(split="val"): ...
    >>> for k, shard in enumerate(db.shards): ...   # bulk, one shard at a time (SLURM array stages)

    Indexing and `len` cover the entries that are in a split (duplicates excluded at finalize are
    hidden); `db.global_index(i)` gives the position in the shard files.
    """

    def __init__(self, path: str | os.PathLike = "data/db"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, FORMAT, "stage 01")
        counts = [s["n_entries"] for s in self.manifest["shards"]]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_total = int(self.shard_starts[-1])
        split_path = self.path / "split.npy"
        self.split_codes = np.load(split_path, mmap_mode="r") if split_path.exists() else np.zeros(self.n_total, np.uint8)
        if len(self.split_codes) != self.n_total:
            raise ValueError(f"{split_path}: {len(self.split_codes)} codes for {self.n_total} entries")
        included = np.asarray(self.split_codes) != EXCLUDED
        self._visible = None if included.all() else np.flatnonzero(included)
        self.shards = [
            DBShard(self.path / s["file"], first_index=int(self.shard_starts[k]),
                    split=self.split_codes[self.shard_starts[k]:self.shard_starts[k + 1]])
            for k, s in enumerate(self.manifest["shards"])
        ]

    def __len__(self) -> int:
        return self.n_total if self._visible is None else len(self._visible)

    def global_index(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self._visible is None else int(self._visible[i])

    def locate(self, g: int) -> tuple[int, int]:
        """Global index -> (shard number, position in shard)."""
        k = int(np.searchsorted(self.shard_starts, g, side="right") - 1)
        return k, g - int(self.shard_starts[k])

    def __getitem__(self, i: int) -> ProteinRecord:
        k, j = self.locate(self.global_index(i))
        return self.shards[k].record(j)

    def get_global(self, g: int) -> ProteinRecord:
        k, j = self.locate(g)
        return self.shards[k].record(j)

    def indices(self, split: str | None = None) -> np.ndarray:
        """Global indices of the entries in `split` (all included entries when None)."""
        codes = np.asarray(self.split_codes)
        if split is None:
            return np.flatnonzero(codes != EXCLUDED)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return np.flatnonzero(codes == SPLIT_CODES[split])

    def iter(self, split: str | None = None, shards: Iterable[int] | None = None) -> Iterator[ProteinRecord]:
        """Records in global order, shard by shard (each shard read once, then released)."""
        want = None if split is None else SPLIT_CODES[split]
        for k in (range(len(self.shards)) if shards is None else shards):
            shard = self.shards[k]
            codes = np.asarray(self.split_codes[self.shard_starts[k]:self.shard_starts[k + 1]])
            for j in range(len(shard)):
                c = codes[j]
                if c == EXCLUDED or (want is not None and c != want):
                    continue
                yield shard.record(j)
            shard.release()

    def __iter__(self) -> Iterator[ProteinRecord]:
        return self.iter()

    def split_of(self, g: int) -> str:
        return SPLIT_NAMES[int(self.split_codes[g])]

    def find(self, protein_id: str) -> ProteinRecord:
        """Look an entry up by id (linear scan over the id arrays; fine for evaluation-sized use)."""
        for k, shard in enumerate(self.shards):
            hits = np.flatnonzero(shard.ids == protein_id)
            if len(hits):
                return shard.record(int(hits[0]))
        raise KeyError(protein_id)
