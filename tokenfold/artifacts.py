"""How every stage writes and reads its files: atomic writes, JSON, checksums, manifests.

A killed process leaves at worst a hidden ``.<name>.*.tmp`` file, never a half-written artifact
under the real name, so "the final file exists" always means "the final file is complete".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    `suffix` keeps an extension that a library insists on (e.g. numpy's ``.npy``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + (suffix or ""), dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts get the usual mode
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False, default=json_default) + "\n")


def json_default(o):
    """`json.dumps(default=...)` for numpy scalars and arrays and paths."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)


def read_manifest(directory: str | os.PathLike, fmt: str, stage: str) -> dict:
    """`directory`/manifest.json, checked to be a `fmt` manifest; a missing one means `stage` has not
    finished (its finalize step writes the manifest last)."""
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no manifest.json ({stage} not finished: run its finalize step)")
    manifest = read_json(path)
    if manifest.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} manifest")
    return manifest


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
