"""Token shards: flat uint16 token files plus an offset index per shard, memmapped (nanoGPT-style).

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
    """All examples of one split, across shards, memmapped. `ds[i]` -> uint16 token array."""

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
        self._bins, offs, dbi, crop, nres, ids = [], [], [], [], [], []
        base = 0
        for stem in self.stems:
            with np.load(self.root / f"{stem}.idx.npz", allow_pickle=False) as z:
                o = z["offsets"]
                offs.append(o[:-1] + base)
                dbi.append(z["db_index"]); crop.append(z["crop_start"]); nres.append(z["n_res"]); ids.append(z["ids"])
            n_tok = int(o[-1])
            self._bins.append(np.memmap(self.root / f"{stem}.bin", dtype=TOKEN_DTYPE, mode="r", shape=(n_tok,))
                              if n_tok else np.zeros(0, TOKEN_DTYPE))
            base += n_tok
        self.starts = np.concatenate(offs + [[base]]).astype(np.int64) if offs else np.zeros(1, np.int64)
        self.db_index = np.concatenate(dbi) if dbi else np.zeros(0, np.int64)
        self.crop_start = np.concatenate(crop) if crop else np.zeros(0, np.int32)
        self.n_res = np.concatenate(nres) if nres else np.zeros(0, np.int32)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, dtype="<U1")
        # which shard an example lives in, and where that shard starts in the global token count
        self._shard_of = np.concatenate([np.full(len(o), k) for k, o in enumerate(offs)]) if offs else np.zeros(0, int)
        self._bin_base = np.concatenate([[0], np.cumsum([len(b) for b in self._bins])]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example."""
        return np.diff(self.starts)

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        k = self._shard_of[i]
        a = self.starts[i] - self._bin_base[k]
        b = self.starts[i + 1] - self._bin_base[k]
        return np.asarray(self._bins[k][a:b])
