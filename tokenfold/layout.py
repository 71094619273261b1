"""Default locations of every artifact. `data/README.md` documents what each one holds.

Every stage takes these as flag defaults; nothing else in the code hard-codes a `data/` path.
`TOKENFOLD_DATA` moves the whole tree (e.g. to a cluster scratch file system).
"""
from __future__ import annotations

import os
from pathlib import Path

DATA = Path(os.environ.get("TOKENFOLD_DATA", "data"))

DB = DATA / "db"                       # stage 01: protein DB (sharded HDF5)
EMBEDDINGS = DATA / "embeddings"       # stage 02: <model>_L<layer>/ per-residue ESM-2 vectors
CODEBOOK = DATA / "codebook"           # stage 03: codebook_K<K>.pkl (+ .sha256), summary, plots
TOKENS = DATA / "tokens"               # stage 04: <kind>/ token shards + vocab.json + report
RUNS = DATA / "runs"                   # stage 05: <run>/ checkpoints, metrics.jsonl, curves
EVAL = DATA / "eval"                   # stage 06: <run>/ metrics.json, per_protein.tsv, PNGs, PDBs
MODELS = DATA / "models"               # test-only random ESM-2 checkpoints and other local weights
GEO = DATA / "geo"                     # stage 04 (geo kind): geo_codebook_K<K>.npz, fit on train chains


def embeddings_dir(model_name: str, layer: int) -> Path:
    return EMBEDDINGS / f"{model_name}_L{layer}"


def codebook_path(k: int) -> Path:
    return CODEBOOK / f"codebook_K{k}.pkl"


def tokens_name(kind: str, interleaved: bool = False, direction: str = "seq2struct") -> str:
    """Name of a token set: `<kind>[_interleaved][_struct2seq]` (stage 04 writes it, stage 06 finds it)."""
    return kind + ("_interleaved" if interleaved else "") + ("" if direction == "seq2struct" else f"_{direction}")


def tokens_dir(kind: str, interleaved: bool = False, direction: str = "seq2struct") -> Path:
    return TOKENS / tokens_name(kind, interleaved, direction)


def geo_codebook_path(k: int) -> Path:
    return GEO / f"geo_codebook_K{k}.npz"
