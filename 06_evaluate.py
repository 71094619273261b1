#!/usr/bin/env python
"""Stage 06: evaluate a trained translator on the held-out split: generate, decode, score, compare.

The checkpoint's vocab.json says the direction: seq2struct (structure tokens from the sequence) or
struct2seq (inverse folding: sequences designed from structure tokens, scored by native sequence
recovery; --consistency-checkpoint folds them back with a seq2struct model).

Reads   a checkpoint of stage 05 (--checkpoint: a checkpoint dir or a run dir, default
        data/runs/<run>/final), its token shards (--tokens, default data/tokens/<kind>[_interleaved][_struct2seq]),
        the protein DB for the true C-alpha (--db, default data/db); struct2seq: optionally a
        seq2struct checkpoint of the same token kind (--consistency-checkpoint).
Writes  data/eval/<run>/ (--out): metrics.json (written last), per_protein.tsv, predictions.fasta,
        skipped.tsv (examples that could not be evaluated, with the reason), baselines.npz,
        accuracy_vs_length.png, confusion_3di.png (3Di), substitution_matrix.png (struct2seq),
        rmsd_tm_vs_length.png, rmsd_tm_hist.png, ca_traces_3d.png and pdb/<id>_pred_vs_true.pdb
        (decodable kinds), work/ (resume state: one part per chunk of proteins). Layout: data/README.md,
        section stage 06.

SLURM arrays: each task evaluates the DB shards `--num-shards/--shard-index` give it; then run once
with --finalize. Without an array (one task) the finalize step runs at the end by itself.
Prediction for your own sequences, or designs for your own structures: python -m tokenfold.predict --help
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenfold import layout
from tokenfold.cli import add_options, die, options_from_args, seed_everything, setup_logging
from tokenfold.eval_report import finalize, summary_line
from tokenfold.eval_config import EvalConfig
from tokenfold.evaluate import Evaluation
from tokenfold.inference import Decoding
from tokenfold.kanzi import KanziUnavailable
from tokenfold.sharding import add_shard_args, resolve_shard


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run name: checkpoint data/runs/<run>/final, output data/eval/<run>")
    add_options(p, EvalConfig)
    p.add_argument("--finalize", action="store_true", help="only merge the array tasks' parts into the report")
    p.add_argument("--overwrite", action="store_true", help="redo this task's work (and the report)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_options(p, Decoding)
    add_shard_args(p, "DB shards")
    a = p.parse_args(argv)
    setup_logging(a.verbose)

    if a.checkpoint is None and a.run is None:
        die("give --run NAME or --checkpoint DIR")
    ckpt = Path(a.checkpoint) if a.checkpoint else layout.RUNS / a.run
    out = a.out or str(layout.EVAL / (a.run or _run_name(ckpt)))
    num_tasks, task = resolve_shard(a.num_shards, a.shard_index)
    seed_everything(a.seed)

    try:
        cfg = options_from_args(EvalConfig, a, checkpoint=str(ckpt), out=out, decoding=options_from_args(Decoding, a))
        ev = Evaluation(cfg)
        status = ev.status()
        if status == "done" and not a.overwrite:
            print(f"{out}/metrics.json exists: evaluation complete (use --overwrite to redo)", file=sys.stderr)
            return 0
        if status == "other" and not a.overwrite:
            die(f"{out} holds the evaluation of a different configuration; use --overwrite or another --out")
        if not a.finalize:
            ev.decoder()  # fail early when a decodable kind's decoder is missing
            ev.run_units(num_tasks, task, overwrite=a.overwrite)
            if num_tasks > 1:
                print(f"task {task}/{num_tasks} done; run once more with --finalize after all tasks", file=sys.stderr)
                return 0
        m = finalize(ev)
    except (FileNotFoundError, ValueError, KanziUnavailable) as e:
        die(str(e))
    print(f"evaluation: {summary_line(m)}\nreport: {Path(out) / 'metrics.json'} (+ PNGs, per_protein.tsv)")
    return 0


def _run_name(ckpt: Path) -> str:
    """data/runs/<run>/final -> <run>; data/runs/<run>/checkpoints/step_N -> <run>_step_N; a run dir -> its name."""
    ckpt = Path(ckpt)
    if ckpt.name == "final":
        return ckpt.parent.name
    if ckpt.parent.name == "checkpoints":
        return f"{ckpt.parent.parent.name}_{ckpt.name}"
    return ckpt.name


if __name__ == "__main__":
    sys.exit(main())
