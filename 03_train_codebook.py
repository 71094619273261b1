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

from tokenfold import layout
from tokenfold.cli import die, setup_logging
from tokenfold.codebook import CodebookConfig, CodebookError, find_embeddings, run_train_codebook


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", type=Path, default=None,
                   help=f"stage-02 output directory (default: the only one under {layout.EMBEDDINGS})")
    p.add_argument("--db", type=Path, default=layout.DB, help=f"protein DB of stage 01 (default {layout.DB})")
    p.add_argument("--out", type=Path, default=layout.CODEBOOK, help=f"output directory (default {layout.CODEBOOK})")
    p.add_argument("--k", type=int, default=512, help="number of codes (default 512)")
    p.add_argument("--seed", type=int, default=0, help="k-means and sampling seed (default 0)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise vectors before k-means (recorded; "
                   "applied again by Codebook.assign)")
    p.add_argument("--max-train-residues", type=int, default=1_000_000,
                   help="train residues drawn (seeded, uniform) for k-means (default 1000000)")
    p.add_argument("--max-val-residues", type=int, default=200_000,
                   help="val residues for the quality numbers (default 200000)")
    p.add_argument("--batch-size", type=int, default=4096, help="MiniBatchKMeans batch size (default 4096)")
    p.add_argument("--max-iter", type=int, default=100, help="MiniBatchKMeans passes over the data (default 100)")
    p.add_argument("--n-init", type=int, default=3, help="MiniBatchKMeans initialisations (default 3)")
    p.add_argument("--overwrite", action="store_true", help="retrain even if the summary exists")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        emb = args.embeddings or find_embeddings(layout.EMBEDDINGS)
    except FileNotFoundError as e:
        die(str(e))
    if not (emb / "manifest.json").exists():
        die(f"{emb}: no finished stage-02 output (manifest.json missing)")
    if not (args.db / "manifest.json").exists():
        die(f"{args.db}: no protein DB (manifest.json missing); run 01_prepare_db.py first")
    if args.k < 2:
        die("--k must be at least 2")
    cfg = CodebookConfig(embeddings=emb, db=args.db, out=args.out, k=args.k, seed=args.seed, normalize=args.normalize,
                         max_train_residues=args.max_train_residues, max_val_residues=args.max_val_residues,
                         batch_size=args.batch_size, max_iter=args.max_iter, n_init=args.n_init,
                         overwrite=args.overwrite)
    try:
        run_train_codebook(cfg)
    except CodebookError as e:
        die(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
