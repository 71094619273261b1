#!/usr/bin/env python3
"""Stage 02: per-residue ESM-2 embeddings of the protein DB, sharded HDF5 aligned with the DB shards.

  python 02_extract_esm_embeddings.py                                   # esm2_t33_650M_UR50D, last layer
  python 02_extract_esm_embeddings.py --model /models/esm2_t33_650M_UR50D.pt --layer 20
  python 02_extract_esm_embeddings.py --max-residues 2000000             # a train sample for stage 03 only
  python 02_extract_esm_embeddings.py --random-weights-for-testing       # offline demo/tests: RANDOM weights
  sbatch --array=0-63 ... 02_extract_esm_embeddings.py ...; then ... --finalize   (SLURM array + finalize)

Reads:  --db (protein DB of stage 01), the model (fair-esm name from torch hub's cache / download, or a
        local .pt with its -contact-regression.pt beside it).
Writes: --out (default data/embeddings/<model>_L<layer>/): shard_NNNNN.h5 per DB shard (or sample.h5
        with --max-residues), report.json + report.png, and manifest.json last. work/ holds resume state.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenfold.cli import add_options, die, options_from_args, setup_logging
from tokenfold.esm_checkpoint import RANDOM_BANNER, EsmLoadError, resolve_checkpoint
from tokenfold.extract import ExtractConfig, finalize, run_extract
from tokenfold.sharding import add_shard_args, resolve_shard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, ExtractConfig)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, all cores; on an oversubscribed node 1 can be "
                        "several times faster)")
    p.add_argument("--finalize", action="store_true",
                   help="only merge: check all shards are done, write report and manifest "
                        "(runs automatically when there is a single task)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_shard_args(p, "DB shards")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = setup_logging(args.verbose)
    cfg = options_from_args(ExtractConfig, args)
    if cfg.random_weights_for_testing:
        log.warning("!!! --random-weights-for-testing: %s", RANDOM_BANNER)
    try:   # --finalize never loads the model: it only names the random checkpoint
        cfg.model = resolve_checkpoint(cfg.model, cfg.random_weights_for_testing, cfg.seed, write=not args.finalize)
        cfg.out = str(cfg.out_dir)   # the default needs the layer count, from the model's name
    except (EsmLoadError, ValueError) as e:
        die(str(e))
    if cfg.max_residues is not None and cfg.max_residues < 1:
        die("--max-residues must be positive")
    if not (Path(cfg.db) / "manifest.json").exists():
        die(f"{cfg.db}: no protein DB (manifest.json missing); run 01_prepare_db.py first")
    num_tasks, task_index = resolve_shard(args.num_shards, args.shard_index)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        if not args.finalize:
            run_extract(cfg, num_tasks, task_index)
        if args.finalize or num_tasks == 1:
            cfg.overwrite = False if not args.finalize else args.overwrite
            finalize(cfg)
    except (EsmLoadError, ValueError) as e:
        die(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
