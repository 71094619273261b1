"""Read Foldseek/MMseqs2 databases in place: mmap'd `.index` + data files, decoded in bulk.

A Foldseek structure DB `PREFIX` is four MMseqs2 databases (format facts: ../shared/data/README.md):

    PREFIX      amino acids, entries "SEQ\\n\\0"          PREFIX_ss  3Di letters, same layout
    PREFIX_ca   C-alpha coordinates (two storage modes)  PREFIX_h   headers "name title\\n\\0"

each with `.index` (lines "key<TAB>offset<TAB>length", length including the trailing NUL) and
`.dbtype` (int32; bit 31 = zstd-compressed entries). The data may also be split over
`PREFIX.0, PREFIX.1, ...` (MMseqs2 writers with several threads), with index offsets counting
through their concatenation. Nothing is loaded whole: the index is scanned
in chunks once to find line offsets (every `CHECKPOINT` lines), a range of entries is parsed from
its slice of the index, and the data are gathered from the mmap'd files with vectorised numpy
(no per-residue Python; per-entry Python only for the header ids).

`_ca` decoding: mode 2 (default) stores per axis an int32 start `trunc(v*1000)` and L-1 int16
deltas, blocks X, Y, Z of L+1 int16 each, then a padding byte and the NUL (length 6L+8). An entry
falls back to float32 X[L], Y[L], Z[L] (length 12L+1) when a delta overflows int16, and every
entry is float32 with `--coord-store-mode 1`. L comes from the amino-acid entry.
"""
from __future__ import annotations

import io
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DBTYPE_CA_ALPHA = 101
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


@dataclass
class FoldseekBatch:
    """Entries a..b-1 of a Foldseek DB, flat (ragged by `lengths`)."""

    keys: np.ndarray              # int64 [n]
    ids: list[str]                # [n]
    lengths: np.ndarray           # int64 [n]
    aa: np.ndarray                # uint8 [R] ASCII
    ss: np.ndarray | None         # uint8 [R] ASCII uppercase, None without _ss
    ca: np.ndarray | None         # float32 [R, 3], None without _ca
    has_ss: np.ndarray            # bool [n] (False where the entry is missing from _ss)
    has_ca: np.ndarray            # bool [n]


class FoldseekDB:
    """`FoldseekDB(prefix)`: len(db) entries; `read_range(a, b)` decodes a block of them."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        if not Path(f"{self.prefix}.index").exists():
            raise FileNotFoundError(f"--foldseek-db {prefix}: {self.prefix}.index not found (give the DB prefix, e.g. path/to/afdb50)")
        self.aa = IndexedFile(self.prefix)
        self.ss = self._optional("_ss")
        self.ca = self._optional("_ca")
        self.h = self._optional("_h")
        if self.ca is not None and self.ca.dbtype not in (None, DBTYPE_CA_ALPHA):
            raise FoldseekFormatError(f"{self.ca.path}: dbtype {self.ca.dbtype} is not C-alpha ({DBTYPE_CA_ALPHA})")
        self._lookup: dict | None = None

    def _optional(self, suffix: str) -> IndexedFile | None:
        p = Path(f"{self.prefix}{suffix}")
        return IndexedFile(p) if Path(f"{p}.index").exists() and data_files(p) else None

    def __len__(self) -> int:
        return len(self.aa)

    def release(self) -> None:
        """`IndexedFile.release` of each file (after a range is decoded: nothing returned points into them)."""
        for f in (self.aa, self.ss, self.ca, self.h):
            if f is not None:
                f.release()

    @property
    def missing(self) -> list[str]:
        return [s for s, f in (("_ss", self.ss), ("_ca", self.ca), ("_h", self.h)) if f is None]

    def read_range(self, a: int, b: int) -> FoldseekBatch:
        b = min(b, len(self))
        rows = self.aa.rows(a, b)
        keys, offs, lens = rows[:, 0], rows[:, 1], rows[:, 2]
        L = np.maximum(lens - 2, 0)  # "SEQ\n\0"
        aa = self.aa.gather(offs, L, lens)
        n = len(keys)
        ss = None
        has_ss = np.zeros(n, dtype=bool)
        if self.ss is not None:
            r = self.ss.aligned_rows(a, b, keys)
            has_ss = (r[:, 0] >= 0) & (r[:, 2] - 2 == L)
            ss = np.zeros(int(L.sum()), dtype=np.uint8)
            got = (self.ss.gather(r[:, 1], L, r[:, 2]) if has_ss.all()
                   else self.ss.gather(np.where(has_ss, r[:, 1], 0), np.where(has_ss, L, 0)))
            mask = np.repeat(has_ss, L)
            ss[mask] = got
            ss[mask] &= 0xDF  # lowercase (B-factor-masked) letters -> uppercase
        ca = None
        has_ca = np.zeros(n, dtype=bool)
        if self.ca is not None:
            r = self.ca.aligned_rows(a, b, keys)
            ca, has_ca = decode_ca(self.ca, r, L)
        ids = self._ids(a, b, keys)
        return FoldseekBatch(keys=keys, ids=ids, lengths=L.astype(np.int64), aa=aa, ss=ss, ca=ca,
                             has_ss=has_ss, has_ca=has_ca)

    def _ids(self, a: int, b: int, keys: np.ndarray) -> list[str]:
        if self.h is not None:
            r = self.h.aligned_rows(a, b, keys)
            ok = r[:, 0] >= 0
            if ok.all():
                blob = self.h.gather(r[:, 1], np.maximum(r[:, 2] - 1, 0), r[:, 2]).tobytes()
            else:
                blob = self.h.gather(np.where(ok, r[:, 1], 0), np.where(ok, np.maximum(r[:, 2] - 1, 0), 0)).tobytes()
            out, pos = [], 0
            for j, ln in enumerate(np.where(ok, np.maximum(r[:, 2] - 1, 0), 0).tolist()):
                words = blob[pos:pos + ln].split(None, 1)
                pos += ln
                out.append(words[0].decode("utf-8", "replace") if words else self._fallback_id(int(keys[j])))
            return out
        return [self._fallback_id(int(k)) for k in keys]

    def _fallback_id(self, key: int) -> str:
        if self._lookup is None:
            self._lookup = {}
            lk = Path(f"{self.prefix}.lookup")
            if lk.exists():
                with open(lk, "rb") as f:
                    for line in f:
                        parts = line.rstrip(b"\n").split(b"\t")
                        if len(parts) >= 2:
                            self._lookup[int(parts[0])] = parts[1].decode("utf-8", "replace")
        return self._lookup.get(key, f"{self.prefix.name}_{key}")


def _decode_ca_part(data: np.ndarray, path, rows: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`decode_ca` for entries whose offsets point into one data array.

    Entries missing from `_ca` (row -1) or with a length that fits neither mode get NaN and
    has_ca False. Compressed entries are read through int16 views of the mmap (one per byte
    parity, since float entries of odd length shift the alignment of those after them).
    """
    R = int(L.sum())
    out = np.full((R, 3), np.nan, dtype=np.float32)
    present = rows[:, 0] >= 0
    off, ln = rows[:, 1], rows[:, 2]
    is_float = present & (ln >= 12 * L) & (L > 0)
    is_diff = present & ~is_float & (ln == 6 * L + 8) & (L > 0)
    first = np.concatenate([[0], np.cumsum(L)[:-1]]).astype(np.int64)
    end = off + np.where(is_float, 12 * L, 6 * L + 6)
    if (present & (is_float | is_diff)).any() and int(end[is_float | is_diff].max()) > len(data):
        raise FoldseekFormatError(f"{path}: index points past the end of the data file")
    if is_float.any():
        for parity in (0, 1, 2, 3):
            e = np.flatnonzero(is_float & (off % 4 == parity))
            if not len(e):
                continue
            view = data[parity: parity + (len(data) - parity) // 4 * 4].view("<f4")
            base = (off[e] - parity) // 4
            dest = _ragged_arange(first[e], L[e])
            for axis in range(3):
                out[dest, axis] = view[_ragged_arange(base + axis * L[e], L[e])]
    if is_diff.any():
        for parity in (0, 1):
            e = np.flatnonzero(is_diff & (off % 2 == parity))
            if not len(e):
                continue
            view = data[parity: parity + (len(data) - parity) // 2 * 2].view("<i2")
            Le = L[e]
            whole = len(e) == len(L)  # every entry: destination rows are simply 0..R-1
            dest = slice(None) if whole else _ragged_arange(first[e], Le)
            loc_first = np.concatenate([[0], np.cumsum(Le)[:-1]]).astype(np.int64)
            blk0 = (off[e] - parity) // 2
            # int16 index of residue i's value in axis 0: the start (i = 0; its low half) or delta i-1
            idx = _ragged_arange(blk0 + 1, Le)
            idx[loc_first] = blk0
            shift = np.repeat(Le + 1, Le)
            for axis in range(3):
                if axis:
                    idx += shift
                blk = blk0 + axis * (Le + 1)
                start = view[blk + 1].astype(np.int64) * 65536 + view[blk].astype(np.uint16)
                vals = view[idx].astype(np.int64)
                vals[loc_first] = start
                cs = np.cumsum(vals)
                if len(e) > 1:  # restart the running sum at every entry
                    cs -= np.repeat(cs[loc_first] - start, Le)
                out[dest, axis] = cs / 1000.0
    return out, is_float | is_diff


def decode_ca(f: IndexedFile, rows: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [sum(L), 3] C-alpha of the entries `rows` (both storage modes) and a has_ca mask.

    Entries missing from `_ca` (row -1) or with a length that fits neither mode get NaN and
    has_ca False. Compressed entries are read through int16 views of the mmap (one per byte
    parity, since float entries of odd length shift the alignment of those after them).
    """
    present = rows[:, 0] >= 0
    groups = f.by_part(np.where(present, rows[:, 1], 0))
    if len(groups) == 1:
        e, local, data = groups[0]
        r = rows.copy()
        r[:, 1] = local
        return _decode_ca_part(data, f.path, r, L)
    out = np.full((int(L.sum()), 3), np.nan, dtype=np.float32)
    has = np.zeros(len(L), dtype=bool)
    first = np.concatenate([[0], np.cumsum(L)[:-1]]).astype(np.int64)
    for e, local, data in groups:
        r = rows[e].copy()
        r[:, 1] = local
        o, h = _decode_ca_part(data, f.path, r, L[e])
        out[_ragged_arange(first[e], L[e])] = o
        has[e] = h
    return out, has


_DB_CACHE: dict = {}


def open_db(prefix: str | os.PathLike) -> "FoldseekDB":
    """A FoldseekDB kept open per process, so that index scans happen once per process."""
    key = str(Path(prefix).resolve())
    db = _DB_CACHE.get(key)
    if db is None:
        db = _DB_CACHE[key] = FoldseekDB(prefix)
    return db
