"""One MMseqs2/Foldseek database file, read in place: the flat data file(s) plus the `.index` of offsets.

Format (../shared/data/README.md): `.index` lines "key<TAB>offset<TAB>length" (length including the
entry's trailing NUL), `.dbtype` (int32; bit 31 = zstd-compressed entries), and the data, possibly
split over `NAME.0, NAME.1, ...` with index offsets counting through their concatenation.
`IndexedFile` scans the index once in chunks (a checkpoint every `CHECKPOINT` lines), parses a range
of entries from its slice of the index, and gathers entry bytes from the mmap'd data with vectorised
numpy. `tokenfold.foldseek` builds a whole structure DB from four of these.
"""
from __future__ import annotations

import io
import mmap
import os
from pathlib import Path

import numpy as np

COMPRESSED_BIT = 1 << 31
CHECKPOINT = 1 << 10
_SCAN = 1 << 26


class FoldseekFormatError(Exception):
    """A database that cannot be read; the message says why in one line."""


def read_dbtype(path: str | os.PathLike) -> int:
    raw = Path(path).read_bytes()
    if len(raw) < 4:
        raise FoldseekFormatError(f"{path}: dbtype file shorter than 4 bytes")
    return int(np.frombuffer(raw[:4], dtype="<u4")[0])


def _ragged_arange(starts: np.ndarray, counts: np.ndarray, step: int = 1) -> np.ndarray:
    """concatenate(arange(s, s + c*step, step) for s, c in zip(starts, counts)), vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    base = np.repeat(np.asarray(starts, dtype=np.int64) - first * step, counts)
    return base + np.arange(total, dtype=np.int64) * step


class IndexedFile:
    """One MMseqs2 database file (data + .index), memory-mapped."""

    def __init__(self, data_path: str | os.PathLike):
        self.path = Path(data_path)
        self.index_path = Path(f"{self.path}.index")
        if not self.index_path.exists():
            raise FoldseekFormatError(f"{self.index_path}: missing")
        self.data_paths = data_files(self.path)
        if not self.data_paths:
            raise FoldseekFormatError(f"{self.path}: missing data file (neither {self.path.name} nor {self.path.name}.0)")
        dt = Path(f"{self.path}.dbtype")
        self.dbtype = read_dbtype(dt) if dt.exists() else None
        if self.dbtype is not None and self.dbtype & COMPRESSED_BIT:
            raise FoldseekFormatError(
                f"{self.path}: zstd-compressed database (dbtype bit 31); decompress it first: "
                f"mmseqs decompress {self.path} {self.path}_plain")
        self._index_mm = self._mmap(self.index_path)
        # MMseqs2 may keep a DB's data in several files (PREFIX.0, PREFIX.1, ... one per writer
        # thread); index offsets then count through their concatenation
        self._data_mm = [self._mmap(p) for p in self.data_paths]
        self.parts = [np.frombuffer(m, dtype=np.uint8) if m is not None else np.zeros(0, dtype=np.uint8)
                      for m in self._data_mm]
        self.part_starts = np.concatenate([[0], np.cumsum([len(a) for a in self.parts])]).astype(np.int64)
        self.data = self.parts[0] if len(self.parts) == 1 else None
        self._checkpoints: np.ndarray | None = None
        self._n: int | None = None
        self._all: tuple | None = None

    def release(self) -> None:
        """Drop this process's resident pages of the mapped files (they stay in the page cache, and
        are read again on the next access): a task that reads range after range of a large DB keeps
        its resident memory at one range's instead of growing to the DB's size."""
        for m in (self._index_mm, *self._data_mm):
            if m is not None and hasattr(mmap, "MADV_DONTNEED"):
                m.madvise(mmap.MADV_DONTNEED)

    @staticmethod
    def _mmap(path: Path):
        if path.stat().st_size == 0:
            return None
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    # -- index lines
    def _scan(self) -> None:
        """One chunked pass over the index: line count and byte offset of every CHECKPOINT-th line."""
        mm = self._index_mm
        if mm is None:
            self._n, self._checkpoints = 0, np.zeros(1, dtype=np.int64)
            return
        size = len(mm)
        cps = [np.zeros(1, dtype=np.int64)]
        n = 0
        for pos in range(0, size, _SCAN):
            chunk = np.frombuffer(mm, dtype=np.uint8, count=min(_SCAN, size - pos), offset=pos)
            nl = np.flatnonzero(chunk == 10)
            # line numbers n+1.. start right after each newline
            line_no = n + 1 + np.arange(len(nl), dtype=np.int64)
            sel = line_no % CHECKPOINT == 0
            cps.append(pos + nl[sel].astype(np.int64) + 1)
            n += len(nl)
        if size and mm[size - 1:size] != b"\n":
            n += 1  # last line without newline
        self._n = n
        self._checkpoints = np.concatenate(cps)
        if hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)   # the whole index was read once: drop its pages (see `release`)

    def __len__(self) -> int:
        if self._n is None:
            self._scan()
        return self._n

    def _line_offset(self, i: int) -> int:
        if self._checkpoints is None:
            self._scan()
        if i >= self._n:
            return len(self._index_mm) if self._index_mm is not None else 0
        c = i // CHECKPOINT
        pos = int(self._checkpoints[c])
        mm = self._index_mm
        for _ in range(i - c * CHECKPOINT):
            pos = mm.find(b"\n", pos) + 1
        return pos

    def rows(self, a: int, b: int) -> np.ndarray:
        """int64 [b-a, 3]: key, offset, length of index lines a..b-1."""
        if b <= a:
            return np.zeros((0, 3), dtype=np.int64)
        if self._all is not None:
            return self._all[0][a:b]
        s, e = self._line_offset(a), self._line_offset(b)
        arr = np.loadtxt(io.BytesIO(self._index_mm[s:e]), dtype=np.int64, delimiter="\t", ndmin=2)
        if arr.shape != (b - a, 3):
            raise FoldseekFormatError(f"{self.index_path}: lines {a}..{b - 1} are not key<TAB>offset<TAB>length")
        return arr

    def rows_for_keys(self, keys: np.ndarray) -> np.ndarray:
        """Rows of the given keys (for companion files whose index order differs); -1 where absent."""
        if self._all is None:
            allrows = self.rows(0, len(self))
            order = np.argsort(allrows[:, 0], kind="stable")
            self._all = (allrows, allrows[order, 0], order)
        allrows, sorted_keys, order = self._all
        pos = np.searchsorted(sorted_keys, keys)
        pos = np.minimum(pos, max(0, len(sorted_keys) - 1))
        found = (len(sorted_keys) > 0) & (sorted_keys[pos] == keys) if len(sorted_keys) else np.zeros(len(keys), bool)
        out = np.full((len(keys), 3), -1, dtype=np.int64)
        out[found] = allrows[order[pos[found]]]
        return out

    def aligned_rows(self, a: int, b: int, keys: np.ndarray) -> np.ndarray:
        """Rows for `keys`, which are expected on lines a..b-1 (true for DBs createdb wrote)."""
        if len(self) == 0:
            return np.full((len(keys), 3), -1, dtype=np.int64)
        if b <= len(self):
            r = self.rows(a, b)
            if np.array_equal(r[:, 0], keys):
                return r
        return self.rows_for_keys(keys)

    # -- data
    def by_part(self, offsets: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """[(entry positions, their offsets within the part, part bytes)] for each data file used."""
        if len(self.parts) == 1:
            return [(np.arange(len(offsets)), np.asarray(offsets), self.parts[0])]
        part = np.searchsorted(self.part_starts, offsets, side="right") - 1
        out = []
        for p in np.unique(part).tolist():
            e = np.flatnonzero(part == p)
            out.append((e, offsets[e] - self.part_starts[p], self.parts[max(p, 0)]))
        return out

    def gather(self, offsets: np.ndarray, counts: np.ndarray, spans: np.ndarray | None = None) -> np.ndarray:
        """uint8: the first counts[j] bytes of each entry at offsets[j], concatenated.

        `spans` (the entries' full index lengths) enables the fast path for the usual layout, where
        entry j+1 starts right after entry j: one slice, minus the few bytes after each entry.
        """
        counts = np.asarray(counts, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        groups = self.by_part(offsets)
        if len(groups) == 1 and spans is not None and len(offsets) > 1:
            e, local, data = groups[0]
            spans = np.asarray(spans, dtype=np.int64)
            end = int(local[-1] + spans[-1])
            if (np.all(local[1:] == local[:-1] + spans[:-1]) and (spans >= counts).all()
                    and local[0] >= 0 and end <= len(data)):
                rel = local - local[0]
                keep = np.ones(end - int(local[0]), dtype=bool)
                keep[_ragged_arange(rel + counts, spans - counts)] = False
                return data[int(local[0]):end][keep]
        if len(groups) == 1:
            e, local, data = groups[0]
            idx = _ragged_arange(local, counts)
            if len(idx) and (int(idx.max()) >= len(data) or int(idx.min()) < 0):
                raise FoldseekFormatError(f"{self.path}: index points past the end of the data file")
            return data[idx]
        out = np.zeros(int(counts.sum()), dtype=np.uint8)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        for e, local, data in groups:
            idx = _ragged_arange(local, counts[e])
            if len(idx) and (int(idx.max()) >= len(data) or int(idx.min()) < 0):
                raise FoldseekFormatError(f"{self.path}: index points past the end of the data file")
            out[_ragged_arange(first[e], counts[e])] = data[idx]
        return out


def data_files(path: Path) -> list[Path]:
    """The data file(s) of an MMseqs2 DB: PATH, else PATH.0, PATH.1, ... (as MMseqs2 looks them up)."""
    if path.exists():
        return [path]
    out = []
    while Path(f"{path}.{len(out)}").exists():
        out.append(Path(f"{path}.{len(out)}"))
    return out
