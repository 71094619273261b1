"""A real-format Foldseek database of N entries for bench/bench_scale.py, written with vectorised numpy.

Entries are mutated windows of the real chains of ../shared/data/foldseek_db: each entry takes a
random window of 30-60 residues (short, to save disk) of a random shared chain, its amino acids
(each replaced by a random one with probability `mutate`), its 3Di letters (replaced with
probability `mutate`/3) and its C-alpha (Foldseek's own truncated milli-Angstrom values plus
uniform noise of up to 0.1 A). Ids look like AlphaFold DB's (``AF-X000000042-F1-model_v4``).

The four databases (``PREFIX``, ``_ss``, ``_ca``, ``_h``, each with ``.index`` and ``.dbtype``)
follow ../shared/data/README.md ("Facts about the format"): entries ``SEQ\\n\\0``; ``_ca`` in
Foldseek's default storage mode 2 (per axis an int32 start and L-1 int16 deltas, then a padding
byte and the NUL: 6L+8 bytes); headers ``ID\\n\\0``; index lines ``key<TAB>offset<TAB>length``.
`tokenfold.foldseek` reads it back (tests/test_bench_scale.py checks the round trip).
Blocks of entries are generated and appended, so memory stays at one block (~1M entries).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

AA20 = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
ID_PREFIX, ID_SUFFIX, ID_DIGITS = b"AF-X", b"-F1-model_v4", 9
DBTYPES = {"": 0, "_ss": 0, "_ca": 101, "_h": 12}
MAX_STEP = 32000   # milli-Angstrom; a larger jump on one axis would not fit Foldseek's int16 deltas


class Parents:
    """The shared chains, flat: amino acids, 3Di, C-alpha as int32 milli-Angstrom."""

    def __init__(self, shared_db: str | os.PathLike, min_parent: int):
        from tokenfold.foldseek import FoldseekDB

        db = FoldseekDB(shared_db)
        b = db.read_range(0, len(db))
        ok = b.has_ss & b.has_ca & (b.lengths >= min_parent)
        starts = np.concatenate([[0], np.cumsum(b.lengths)[:-1]])
        self.start, self.length = starts[ok], b.lengths[ok]
        self.aa, self.ss = b.aa, b.ss
        self.ca = np.trunc(b.ca.astype(np.float64) * 1000).astype(np.int32)
        step = np.zeros(len(b.aa), dtype=bool)              # step[i]: residue i-1 -> i does not fit int16
        step[1:] = (np.abs(np.diff(self.ca, axis=0)) > MAX_STEP).any(1)
        self.bad = np.concatenate([[0], np.cumsum(step)])   # bad steps before position i
        if not len(self.start):
            raise ValueError(f"{shared_db}: no chains of >= {min_parent} residues with 3Di and C-alpha")


def _digits(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ASCII decimal digits of non-negative ints, right-aligned: (uint8 [n, W], bool mask [n, W])."""
    a = np.asarray(a, dtype=np.int64)
    width = max(1, len(str(int(a.max())))) if len(a) else 1
    pw = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    d = (a[:, None] // pw[None, :]) % 10 + 48
    nd = np.ones(len(a), dtype=np.int64)
    for k in range(1, width):
        nd += a >= 10 ** k
    return d.astype(np.uint8), np.arange(width)[None, :] >= (width - nd)[:, None]


def index_bytes(keys: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> bytes:
    """MMseqs2 `.index` lines ``key<TAB>offset<TAB>length\\n``, formatted without a per-line loop."""
    mats, masks = [], []
    for col, sep in ((keys, 9), (offsets, 9), (lengths, 10)):
        d, m = _digits(col)
        mats += [d, np.full((len(col), 1), sep, np.uint8)]
        masks += [m, np.ones((len(col), 1), bool)]
    return np.hstack(mats)[np.hstack(masks)].tobytes()


def _block(par: Parents, rng: np.random.Generator, first_key: int, n: int, min_len: int, max_len: int,
           mutate: float) -> dict:
    """Data bytes and entry sizes of entries first_key .. first_key+n-1 of the four databases."""
    L = rng.integers(min_len, max_len + 1, n)
    p = rng.integers(0, len(par.start), n)
    todo = np.arange(n)
    src = np.zeros(n, dtype=np.int64)
    while len(todo):   # windows whose C-alpha steps all fit Foldseek's int16 deltas
        s = par.start[p[todo]] + (rng.random(len(todo)) * (par.length[p[todo]] - L[todo] + 1)).astype(np.int64)
        ok = par.bad[s + L[todo]] - par.bad[s + 1] == 0
        src[todo[ok]] = s[ok]
        todo = todo[~ok]
        p[todo] = rng.integers(0, len(par.start), len(todo))
    R = int(L.sum())
    first = np.concatenate([[0], np.cumsum(L)[:-1]])       # entry start, in residues
    posin = np.arange(R, dtype=np.int64) - np.repeat(first, L)   # residue position within its entry
    idx = np.repeat(src, L) + posin
    out = {}
    # sequence entries: SEQ \n \0
    seq0 = first + 2 * np.arange(n)
    seq_pos = np.repeat(seq0, L) + posin
    for name, table, rate in (("", par.aa, mutate), ("_ss", par.ss, mutate / 3)):
        letters = table[idx]
        hit = rng.random(R, dtype=np.float32) < rate
        letters[hit] = AA20[rng.integers(0, 20, int(hit.sum()), dtype=np.uint8)]
        buf = np.zeros(R + 2 * n, dtype=np.uint8)
        buf[seq_pos] = letters
        buf[seq0 + L] = 10
        out[name] = (buf, L + 2)
    del seq_pos
    # C-alpha, storage mode 2: per axis int32 start (low, high int16), L-1 int16 deltas; pad byte + NUL
    words = 3 * (L + 1) + 1
    w0 = np.concatenate([[0], np.cumsum(words)[:-1]])
    buf = np.zeros(int(words.sum()), dtype=np.int16)
    dest = np.repeat(w0 + 1, L) + posin        # axis 0: residue i>0 -> word 1+i of the entry (i=0: overwritten)
    step = np.repeat(L + 1, L)
    for axis in range(3):
        v = par.ca[idx, axis] + rng.integers(-100, 101, R, dtype=np.int16)
        d = np.empty(R, dtype=np.int32)
        d[0] = 0
        np.subtract(v[1:], v[:-1], out=d[1:])
        if axis:
            dest += step
        buf[dest] = d
        blk = w0 + axis * (L + 1)
        start = v[first].astype(np.int64)
        buf[blk] = (start & 0xFFFF).astype(np.uint16).view(np.int16)
        buf[blk + 1] = (start >> 16).astype(np.int16)
    out["_ca"] = (buf.view(np.uint8), 2 * words)
    # headers: ID \n \0 (fixed width)
    keys = np.arange(first_key, first_key + n, dtype=np.int64)
    d, _ = _digits(np.concatenate([keys, [10 ** ID_DIGITS - 1]]))
    h = np.hstack([np.tile(np.frombuffer(ID_PREFIX, np.uint8), (n, 1)), d[:n, -ID_DIGITS:],
                   np.tile(np.frombuffer(ID_SUFFIX + b"\n\0", np.uint8), (n, 1))])
    out["_h"] = (h.ravel(), np.full(n, h.shape[1], dtype=np.int64))
    return out


def entry_id(key: int) -> str:
    return f"{ID_PREFIX.decode()}{key:0{ID_DIGITS}d}{ID_SUFFIX.decode()}"


def build(prefix: str | os.PathLike, n: int, shared_db: str | os.PathLike, seed: int = 0, min_len: int = 30,
          max_len: int = 60, mutate: float = 0.3, block: int = 1_000_000) -> dict:
    """Write the Foldseek DB `prefix` of `n` entries; returns its size, residues and build time."""
    t0 = time.time()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    par = Parents(shared_db, max_len)
    rng = np.random.default_rng(seed)
    files = {s: (open(f"{prefix}{s}", "wb"), open(f"{prefix}{s}.index", "wb")) for s in DBTYPES}
    pos = {s: 0 for s in DBTYPES}
    residues = 0
    try:
        for k0 in range(0, n, block):
            m = min(block, n - k0)
            parts = _block(par, rng, k0, m, min_len, max_len, mutate)
            residues += int(parts[""][1].sum()) - 2 * m
            keys = np.arange(k0, k0 + m, dtype=np.int64)
            for s, (buf, sizes) in parts.items():
                data, index = files[s]
                data.write(buf.tobytes())
                offs = pos[s] + np.concatenate([[0], np.cumsum(sizes)[:-1]])
                index.write(index_bytes(keys, offs, sizes))
                pos[s] += int(sizes.sum())
    finally:
        for data, index in files.values():
            data.close()
            index.close()
    for s, t in DBTYPES.items():
        Path(f"{prefix}{s}.dbtype").write_bytes(np.array([t], "<i4").tobytes())
    size = sum(Path(f"{prefix}{s}{e}").stat().st_size for s in DBTYPES for e in ("", ".index"))
    return {"entries": n, "residues": residues, "bytes": size, "seconds": time.time() - t0}
