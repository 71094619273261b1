#!/usr/bin/env python
"""Stage 01: build the protein DB (sharded HDF5) from PDB/mmCIF files, Foldseek DBs and FASTA files.

With no input flag it ingests the embedded default dataset (the real PDB/mmCIF files shipped by the
PyPI package MDAnalysisTests) into data/db. Details: tokenfold/prepare.py; format: tokenfold/db.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from tokenfold import layout
from tokenfold.cli import add_options, die, options_from_args, setup_logging
from tokenfold.db_plan import Inputs, PlanMismatch, PrepareOptions, embedded_default_inputs
from tokenfold.sharding import add_shard_args, resolve_shard
from tokenfold.split import SplitOptions

EPILOG = """\
outputs (in --out):
  manifest.json          shard list, counts, inputs, options, split method (written last)
  shards/shard_XXXXX.h5  ragged per-residue arrays: aa, 3Di, C-alpha, pLDDT, chain breaks
  split.npy              uint8 per entry: 0 train, 1 val, 2 test, 3 excluded (duplicate id)
  cluster.npy            int64 per entry: global index of its cluster representative (-1: excluded)
  rejects.tsv            input, chain, one-line reason for every rejected file/chain/entry
  notes.tsv              input, chain, note for kept items with a caveat (no 3Di, breaks, models)
  report.json/.png       counts by source and reason, lengths, 3Di composition, split sizes
  work/                  per-shard reports/rejects and plan.json (resume state)

SLURM arrays: every task runs the same command (shards are taken round-robin from
$SLURM_ARRAY_TASK_ID/COUNT), then one more run with --finalize merges and splits.
Re-running a finished DB does nothing unless --overwrite; a killed run resumes.
Read the result with:  from tokenfold.db import ProteinDB; db = ProteinDB("data/db")
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs (any mix; none given = the embedded MDAnalysisTests default dataset)")
    g.add_argument("--structures", nargs="+", action="extend", default=[], metavar="DIR|FILE|GLOB",
                   help="PDB/mmCIF files, plain or gzipped, any extension (content is sniffed); directories are searched recursively")
    g.add_argument("--foldseek-db", action="append", default=[], metavar="PREFIX",
                   help="a Foldseek DB prefix (PREFIX, PREFIX_ss, PREFIX_ca, PREFIX_h + .index/.dbtype); _ss/_ca may be absent")
    g.add_argument("--fasta", action="append", default=[], metavar="FILE",
                   help="FASTA sequences (entries without 3Di or C-alpha, for the ESM-only path)")
    p.add_argument("--out", default=str(layout.DB), help="output DB directory (default: %(default)s)")
    add_options(p, PrepareOptions)  # groups "filters" and "DB shards"

    s = p.add_argument_group("split (finalize step)")
    s.add_argument("--split-fractions", dest="fractions", type=float, nargs=3, default=SplitOptions.fractions,
                   metavar=("TRAIN", "VAL", "TEST"), help="target fractions of entries (default: 0.8 0.1 0.1)")
    add_options(s, SplitOptions, defaults={"threads": None})  # None: the CPUs this process may use
    s.add_argument("--no-mmseqs", dest="use_mmseqs", action="store_false",
                   help="do not use MMseqs2: split by exact-sequence hash (the loud fallback when mmseqs is missing)")

    r = p.add_argument_group("execution")
    r.add_argument("--workers", type=int, default=1, help="processes parsing structure files on this node (default: %(default)s)")
    r.add_argument("--finalize", action="store_true",
                   help="only merge the finished shards, split and write the manifest (after a SLURM array)")
    r.add_argument("--overwrite", action="store_true", help="rebuild even if the DB (or this task's shards) exist")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_shard_args(p, "DB shards")
    return p


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def settings(args: argparse.Namespace) -> tuple[Inputs, PrepareOptions, SplitOptions]:
    """The inputs and options the parsed flags ask for (raises ValueError on an invalid option)."""
    inputs = Inputs(structures=args.structures, foldseek_dbs=args.foldseek_db, fasta=args.fasta)
    opts = options_from_args(PrepareOptions, args)
    split_opts = options_from_args(SplitOptions, args, fractions=tuple(args.fractions),
                                   threads=args.threads or _available_cpus())
    return inputs, opts, split_opts


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log = setup_logging(args.verbose)
    from tokenfold.prepare import run

    try:
        inputs, opts, split_opts = settings(args)
    except ValueError as e:
        die(str(e))
    if inputs.empty():
        files = embedded_default_inputs()
        log.info("no input given: using the embedded default dataset (%d MDAnalysisTests PDB/mmCIF files)", len(files))
        inputs.structures = [str(f) for f in files]
    num_tasks, task_index = resolve_shard(args.num_shards, args.shard_index)
    try:
        status = run(inputs, args.out, opts, split_opts, num_tasks=num_tasks, task_index=task_index,
                     workers=max(1, args.workers), finalize_only=args.finalize, overwrite=args.overwrite)
    except (PlanMismatch, FileNotFoundError) as e:
        die(str(e))
    except Exception as e:  # a format error in an input DB etc.: one line, not a traceback
        if args.verbose:
            raise
        die(f"{type(e).__name__}: {e}")
    log.info("done: %s", status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
