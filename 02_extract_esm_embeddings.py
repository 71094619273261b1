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

from tokenfold import layout
from tokenfold.cli import die, setup_logging
from tokenfold.esm import (
    DEFAULT_MODEL,
    DEFAULT_RANDOM_SHAPE,
    ESM2_MODELS,
    OVERLAP,
    RANDOM_BANNER,
    WINDOW,
    EsmLoadError,
    ExtractConfig,
    default_out_dir,
    ensure_random_checkpoint,
    finalize,
    run_extract,
)
from tokenfold.sharding import add_shard_args, resolve_shard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", type=Path, default=layout.DB, help=f"protein DB directory of stage 01 (default {layout.DB})")
    p.add_argument("--model", default=None,
                   help=f"fair-esm model name ({', '.join(ESM2_MODELS)}) or path of a local .pt checkpoint "
                        f"(default {DEFAULT_MODEL}; with --random-weights-for-testing: {DEFAULT_RANDOM_SHAPE})")
    p.add_argument("--layer", type=int, default=-1,
                   help="representation layer, 0..num_layers; negative counts from the end (default -1: last)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default {layout.EMBEDDINGS}/<model>_L<layer>)")
    p.add_argument("--random-weights-for-testing", action="store_true",
                   help="TEST/DEMO ONLY: use a randomly initialised ESM-2 with the shape of --model (a fair-esm name; "
                        f"written to {layout.MODELS}/<name>_RANDOM_seed<seed>.pt if absent) or a given RANDOM .pt; "
                        "every output is labelled random_weights: true")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 (or fp16) autocast on GPU, fp32 on CPU")
    p.add_argument("--toks-per-batch", type=int, default=None,
                   help="padded tokens per batch (default: 16384 on GPU, on CPU 1024 per thread up to 4096)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's, all cores; on an oversubscribed node 1 can be "
                        "several times faster)")
    p.add_argument("--window", type=int, default=WINDOW, help=f"longest piece run at once (default {WINDOW})")
    p.add_argument("--overlap", type=int, default=OVERLAP,
                   help=f"minimum overlap of the windows of longer sequences (default {OVERLAP})")
    p.add_argument("--truncate", action="store_true",
                   help="embed only the first --window residues of longer sequences (their other rows are NaN); "
                        "default: overlapping windows, every residue embedded")
    p.add_argument("--max-residues", type=int, default=None,
                   help="instead of everything, embed a seeded uniform sample of this many train residues "
                        "(plus val residues for stage 03's evaluation) into sample.h5")
    p.add_argument("--max-val-residues", type=int, default=None,
                   help="val residues in the sample (default min(--max-residues, 100000))")
    p.add_argument("--seed", type=int, default=0, help="sample seed, and the seed of a random test checkpoint")
    p.add_argument("--block-residues", type=int, default=1 << 18,
                   help="residues per resumable block inside a DB shard (default 262144)")
    p.add_argument("--finalize", action="store_true",
                   help="only merge: check all shards are done, write report and manifest "
                        "(runs automatically when there is a single task)")
    p.add_argument("--overwrite", action="store_true", help="redo this task's shards even if they exist")
    p.add_argument("-v", "--verbose", action="store_true")
    add_shard_args(p, "DB shards")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = setup_logging(args.verbose)
    model = args.model
    if args.random_weights_for_testing:
        log.warning("!!! --random-weights-for-testing: %s", RANDOM_BANNER)
        model = model or DEFAULT_RANDOM_SHAPE
        if model in ESM2_MODELS:
            if args.finalize:
                from tokenfold.esm import random_checkpoint_path
                model = str(random_checkpoint_path(model, args.seed))
            else:
                try:
                    model = str(ensure_random_checkpoint(model, args.seed))
                except EsmLoadError as e:
                    die(str(e))
    model = model or DEFAULT_MODEL  # a missing .pt fails in load_esm with one line; --finalize never loads it
    try:
        out = args.out or default_out_dir(model, args.layer)
    except ValueError as e:
        die(str(e))
    if args.max_residues is not None and args.max_residues < 1:
        die("--max-residues must be positive")
    cfg = ExtractConfig(db=args.db, out=out, model=model, layer=args.layer,
                        random_weights_for_testing=args.random_weights_for_testing,
                        toks_per_batch=args.toks_per_batch, device=args.device, precision=args.precision,
                        window=args.window, overlap=args.overlap, truncate=args.truncate,
                        max_residues=args.max_residues, max_val_residues=args.max_val_residues, seed=args.seed,
                        block_residues=args.block_residues, overwrite=args.overwrite)
    if not (args.db / "manifest.json").exists():
        die(f"{args.db}: no protein DB (manifest.json missing); run 01_prepare_db.py first")
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
