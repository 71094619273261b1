"""Small helpers every stage shares: atomic writes, JSON, checksums, logging, SLURM sharding."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger("tokenfold")


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A killed process leaves at worst a `*.tmp*` file, never a half-written artifact under the real
    name, so "the final file exists" always means "the final file is complete".
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
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
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


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(id, sequence) pairs; id = the header's first word. Whitespace inside sequences is ignored."""
    recs, name, chunks = [], None, []
    text = Path(path).read_text(errors="replace")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(">"):
            if name is not None:
                recs.append((name, "".join(chunks)))
            name, chunks = (line[1:].split() or [f"record_{len(recs) + 1}"])[0], []
        elif line and name is not None:
            chunks.append("".join(line.split()))
    if name is not None:
        recs.append((name, "".join(chunks)))
    return recs


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- logging / seeds
def setup_logging(verbose: bool = False) -> logging.Logger:
    """One log format for every stage: time, level, message, on stderr (SLURM puts it in the .err/.out)."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(level)
    return log


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard requirement, but utils stays importable
        pass


def progress(iterable=None, **kw):
    """tqdm progress bar that stays quiet when stderr is not a terminal unless TOKENFOLD_PROGRESS=1.

    SLURM log files fill up with carriage-return bars otherwise; stages also log summary lines.
    """
    from tqdm.auto import tqdm

    force = os.environ.get("TOKENFOLD_PROGRESS")
    disable = (not sys.stderr.isatty()) if force is None else force == "0"
    kw.setdefault("mininterval", 2.0)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable, **kw)


# ----------------------------------------------------------------------------- SLURM array sharding
def add_shard_args(parser, what: str = "work units") -> None:
    """`--num-shards/--shard-index`, defaulting from a SLURM array (SLURM_ARRAY_TASK_COUNT/ID)."""
    g = parser.add_argument_group("sharding (SLURM arrays)")
    g.add_argument("--num-shards", type=int, default=None,
                   help=f"split the {what} over this many array tasks (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    g.add_argument("--shard-index", type=int, default=None,
                   help="this task's index, 0-based (default: $SLURM_ARRAY_TASK_ID minus $SLURM_ARRAY_TASK_MIN, else 0)")


def resolve_shard(num_shards: int | None, shard_index: int | None) -> tuple[int, int]:
    """(num_tasks, task_index) from the flags, else from the SLURM array environment, else (1, 0)."""
    env = os.environ
    if num_shards is None:
        num_shards = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if shard_index is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            shard_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        else:
            shard_index = 0
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise SystemExit(f"error: --shard-index {shard_index} is outside 0..{num_shards - 1}")
    return num_shards, shard_index


def my_units(n_units: int, num_tasks: int, task_index: int) -> list[int]:
    """Work units (e.g. DB shards) of one array task: round-robin, so tasks get equal counts +-1."""
    return list(range(task_index, n_units, num_tasks))


def die(msg: str, code: int = 1):
    """Exit a CLI with one clear line on stderr."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)
