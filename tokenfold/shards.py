"""Token shards: flat uint16 token files plus an offset index per shard (nanoGPT-style).

Where the files sit: see data/README.md, section stage 04. One shard::

    <split>/shard_00000.bin          uint16 token ids of all examples of the shard, concatenated
    <split>/shard_00000.idx.npz      offsets int64 [n+1]  example j = tokens[offsets[j]:offsets[j+1]]
                                     db_index int64 [n]   global index in the protein DB
                                     crop_start int32 [n] first residue kept (0 unless cropped)
                                     n_res int32 [n]      residues in the example
                                     ids <U [n]           protein ids (no pickle needed to read)

The ``.bin`` is written first and the ``.idx.npz`` last, both atomically, so an index file that
exists always describes a complete shard. `TokenDataset` reads the shards a split's entry of the
finalize manifest lists, or before finalize the complete shards it finds (by their index files).
It reads an example's tokens with one ``pread`` rather than through a memory map: pages of a mapped
file count in the resident memory of every rank that touched them, and over an epoch of a 66.7M-entry
set that would be the whole token set per rank (what SLURM's memory accounting sees); read, they stay
in the shared page cache only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifacts import atomic_path, read_json

TOKEN_DTYPE = np.uint16


def shard_stem(split: str, shard: int) -> str:
    return f"{split}/shard_{shard:05d}"


class TokenShardWriter:
    def __init__(self, root: str | os.PathLike, split: str, shard: int):
        self.root = Path(root)
        self.stem = shard_stem(split, shard)
        self.chunks: list[np.ndarray] = []
        self.ids: list[str] = []
        self.db_index: list[int] = []
        self.crop_start: list[int] = []
        self.n_res: list[int] = []

    def add(self, tokens: np.ndarray, protein_id: str, db_index: int, n_res: int, crop_start: int = 0) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and tokens.max() > np.iinfo(TOKEN_DTYPE).max:
            raise ValueError("token id does not fit in uint16")
        self.chunks.append(tokens.astype(TOKEN_DTYPE))
        self.ids.append(protein_id)
        self.db_index.append(int(db_index))
        self.crop_start.append(int(crop_start))
        self.n_res.append(int(n_res))

    def __len__(self):
        return len(self.ids)

    def close(self) -> Path:
        lengths = np.array([len(c) for c in self.chunks], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        data = np.concatenate(self.chunks) if self.chunks else np.zeros(0, TOKEN_DTYPE)
        bin_path = self.root / f"{self.stem}.bin"
        with atomic_path(bin_path) as tmp:
            data.tofile(tmp)
        idx_path = self.root / f"{self.stem}.idx.npz"
        with atomic_path(idx_path, suffix=".npz") as tmp:
            np.savez(tmp, offsets=offsets, db_index=np.array(self.db_index, np.int64),
                     crop_start=np.array(self.crop_start, np.int32), n_res=np.array(self.n_res, np.int32),
                     ids=np.array(self.ids, dtype=str))
        return idx_path


class TokenDataset:
    """All examples of one split, across shards. `ds[i]` -> uint16 token array (read-only).

    Memory (what every training rank holds): the global token offsets, 8 bytes per example, plus a few
    numbers per shard. The per-example index columns are read only where they are needed: `meta(i)`
    and `shard_columns(k)` read one shard's (the last one read is kept), the properties `ids`,
    `db_index`, `crop_start`, `n_res` every shard's (on first use, then kept). A shard's ``.bin`` is
    opened on first access and read with ``os.pread`` (module docstring). Pickling (DataLoader workers
    started with spawn) drops the open files and the cached columns; they are reopened / reread on
    demand. Forked workers share the open files: ``pread`` has no file position to disturb.
    """

    COLUMNS = ("ids", "db_index", "crop_start", "n_res")

    def __init__(self, root: str | os.PathLike, split: str, files: Sequence[str] | None = None):
        self.root = Path(root)
        self.split = split
        if files is None:
            manifest = self.root / "manifest.json"
            if manifest.exists():
                files = read_json(manifest)["splits"].get(split, {}).get("shards", [])
            else:  # before finalize: whatever complete shards exist
                files = sorted(str(p.relative_to(self.root))[: -len(".idx.npz")]
                               for p in (self.root / split).glob("shard_*.idx.npz"))
        self.stems = list(files)
        # two passes over the index files (array headers, then the offsets into their place), so the
        # offsets are never held twice
        counts = np.array([_npz_shape(self._idx_path(k), "offsets")[0] - 1 for k in range(len(self.stems))],
                          dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first example of each shard
        self.starts = np.zeros(int(self.shard_starts[-1]) + 1, dtype=np.int64)
        tok_base = np.zeros(len(self.stems) + 1, dtype=np.int64)                     # first token of each shard
        for k in range(len(self.stems)):
            with np.load(self._idx_path(k), allow_pickle=False) as z:
                o = z["offsets"]
            a, b = self.shard_starts[k], self.shard_starts[k + 1]
            self.starts[a:b] = o[:-1] + tok_base[k]
            tok_base[k + 1] = tok_base[k] + int(o[-1])
        self.starts[-1] = tok_base[-1]
        self._tok_base = tok_base
        self._fds: list = [None] * len(self.stems)
        self._columns: dict[str, np.ndarray] = {}
        self._shard_cache: tuple[int, dict] | None = None

    def _idx_path(self, k: int) -> Path:
        return self.root / f"{self.stems[k]}.idx.npz"

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_fds=[None] * len(self.stems), _columns={}, _shard_cache=None)
        return state

    def close(self) -> None:
        """Close the shard files opened so far (reading again reopens them)."""
        for k, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[k] = None

    def __del__(self):
        try:
            self.close()
        except (OSError, AttributeError, TypeError):
            pass

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example."""
        return np.diff(self.starts)

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, i: int) -> int:
        """The shard (position in `stems`) example i lives in."""
        return int(np.searchsorted(self.shard_starts, i, side="right")) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        k = self.shard_of(i)
        n = int(self.starts[i + 1] - self.starts[i])
        if n == 0:
            return np.zeros(0, TOKEN_DTYPE)
        if self._fds[k] is None:
            self._fds[k] = os.open(self.root / f"{self.stems[k]}.bin", os.O_RDONLY)
        size = np.dtype(TOKEN_DTYPE).itemsize
        data = os.pread(self._fds[k], n * size, int(self.starts[i] - self._tok_base[k]) * size)
        if len(data) != n * size:
            raise ValueError(f"{self.root / self.stems[k]}.bin: shorter than its index says (truncated file?)")
        return np.frombuffer(data, dtype=TOKEN_DTYPE)

    # ---- the index columns (ids, db_index, crop_start, n_res), read on demand
    def shard_columns(self, k: int) -> dict[str, np.ndarray]:
        """The index columns of shard k's examples (examples shard_starts[k] .. shard_starts[k+1]-1)."""
        if self._shard_cache is None or self._shard_cache[0] != k:
            with np.load(self._idx_path(k), allow_pickle=False) as z:
                cols = {name: z[name] for name in self.COLUMNS}
            self._shard_cache = (k, cols)
        return self._shard_cache[1]

    def meta(self, i: int) -> tuple[str, int, int, int]:
        """(id, db_index, crop_start, n_res) of example i, reading only its shard's index."""
        k = self.shard_of(i)
        c = self.shard_columns(k)
        j = int(i) - int(self.shard_starts[k])
        return str(c["ids"][j]), int(c["db_index"][j]), int(c["crop_start"][j]), int(c["n_res"][j])

    def column(self, name: str) -> np.ndarray:
        """One index column for every example of the split (read from every shard on first use)."""
        if name not in self.COLUMNS:
            raise KeyError(name)
        if name not in self._columns:
            parts = []
            for k in range(len(self.stems)):
                with np.load(self._idx_path(k), allow_pickle=False) as z:
                    parts.append(z[name])
            empty = {"ids": np.zeros(0, "<U1"), "db_index": np.zeros(0, np.int64),
                     "crop_start": np.zeros(0, np.int32), "n_res": np.zeros(0, np.int32)}[name]
            self._columns[name] = np.concatenate(parts) if parts else empty
        return self._columns[name]

    ids = property(lambda self: self.column("ids"), doc="protein ids of all examples (read on first use)")
    db_index = property(lambda self: self.column("db_index"), doc="global DB index of all examples")
    crop_start = property(lambda self: self.column("crop_start"), doc="first residue kept, all examples")
    n_res = property(lambda self: self.column("n_res"), doc="residues per example, all examples")


def _npz_shape(path: Path, name: str) -> tuple:
    """Shape of array `name` in an .npz, from its header (the data are not read)."""
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                       else np.lib.format.read_array_header_2_0(f))
    return shape
