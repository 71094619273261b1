"""FASTA files: the one FASTA parser of the pipeline.

A record starts at a ``>`` that begins a line (text before the first record is ignored). Its id is
the first word of the header line (``""`` when the header has none), its sequence the lines up to
the next record with all whitespace removed; the text is read as UTF-8, undecodable bytes replaced.

`record_offsets` finds where the records start (a vectorised byte scan, so that a large file can be
dealt out to DB shards without parsing it), `read_records` parses a range of records, and
`read_fasta` a whole file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def record_offsets(path: str | os.PathLike) -> np.ndarray:
    """Byte offsets of the '>' of each record (plus the file size at the end); chunked scan."""
    path = Path(path)
    size = path.stat().st_size
    starts = []
    prev = b"\n"
    pos = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            arr = np.frombuffer(chunk, dtype=np.uint8)
            gt = np.flatnonzero(arr == ord(">"))
            if len(gt):
                before = np.where(gt > 0, arr[np.maximum(gt - 1, 0)], ord(prev))
                starts.append(pos + gt[before == ord("\n")])
            prev = chunk[-1:]
            pos += len(chunk)
    offs = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    return np.concatenate([offs.astype(np.int64), [size]])


def read_records(path: str | os.PathLike, offsets: np.ndarray, a: int, b: int) -> list[tuple[str, str]]:
    """(id, sequence) of records a..b-1 of a FASTA file, `offsets` from `record_offsets`."""
    if a >= b:
        return []
    with open(path, "rb") as f:
        f.seek(int(offsets[a]))
        blob = f.read(int(offsets[b] - offsets[a])).decode("utf-8", errors="replace")
    records = []
    for rec in blob.split("\n>"):
        header, _, body = rec.lstrip(">").partition("\n")
        words = header.split()
        records.append((words[0] if words else "", "".join(body.split())))
    return records


def read_fasta(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(id, sequence) pairs of every record; a header without a word gets the id ``record_<n>``
    (n: the record's 1-based position)."""
    offsets = record_offsets(path)
    records = read_records(path, offsets, 0, len(offsets) - 1)
    return [(pid or f"record_{i}", seq) for i, (pid, seq) in enumerate(records, 1)]
