#!/usr/bin/env python3
"""Stage 03: k-means codebook (MiniBatchKMeans) over per-residue ESM-2 vectors -> "structure tokens".

  python 03_train_codebook.py                                  # K=512 on the only embedding set in data/embeddings
  python 03_train_codebook.py --embeddings data/embeddings/esm2_t33_650M_UR50D_L33 --k 1024 --normalize

Reads:  --embeddings (stage 02 output: full per-shard embeddings or a --max-residues sample), --db (stage 01,
        for splits, amino acids and 3Di letters).
Writes: --out (default data/codebook/): codebook_K<K>.pkl + codebook_K<K>.pkl.sha256 (centroids + metadata,
        checksum verified on load), clustering_visualization.png (2-D PCA coloured by code),
        cluster_sizes_K<K>.png, and summary_K<K>.json last (utilisation, perplexity, dead codes, inertia,
        NMI(code;3Di) vs NMI(aa;3Di) on val residues).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenfold.cli import add_options, die, options_from_args, setup_logging
from tokenfold.codebook import CodebookError
from tokenfold.train_codebook import CodebookConfig, run_train_codebook


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, CodebookConfig)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    cfg = options_from_args(CodebookConfig, args)
    try:
        cfg.embeddings = str(cfg.embeddings_dir)
    except FileNotFoundError as e:
        die(str(e))
    if not (Path(cfg.embeddings) / "manifest.json").exists():
        die(f"{cfg.embeddings}: no finished stage-02 output (manifest.json missing)")
    if not (Path(cfg.db) / "manifest.json").exists():
        die(f"{cfg.db}: no protein DB (manifest.json missing); run 01_prepare_db.py first")
    if cfg.k < 2:
        die("--k must be at least 2")
    try:
        run_train_codebook(cfg)
    except CodebookError as e:
        die(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
