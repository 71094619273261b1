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

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .foldseek_files import (
    COMPRESSED_BIT,
    FoldseekFormatError,
    IndexedFile,
    _ragged_arange,
    data_files,
    read_dbtype,
)

__all__ = [
    "COMPRESSED_BIT",
    "FoldseekBatch",
    "FoldseekDB",
    "FoldseekFormatError",
    "IndexedFile",
    "data_files",
    "decode_ca",
    "open_db",
    "read_dbtype",
]

DBTYPE_CA_ALPHA = 101


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


def open_db(prefix: str | os.PathLike) -> FoldseekDB:
    """A FoldseekDB kept open per process, so that index scans happen once per process."""
    key = str(Path(prefix).resolve())
    db = _DB_CACHE.get(key)
    if db is None:
        db = _DB_CACHE[key] = FoldseekDB(prefix)
    return db
