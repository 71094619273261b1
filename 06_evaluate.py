#!/usr/bin/env python
"""Stage 06: evaluate a trained translator on the held-out split: generate, decode, score, compare.

Reads   a checkpoint of stage 05 (--checkpoint: a checkpoint dir or a run dir, default
        data/runs/<run>/final), its token shards (--tokens, default data/tokens/<kind>[_interleaved]),
        the protein DB for the true C-alpha (--db, default data/db).
Writes  data/eval/<run>/ (--out): metrics.json (written last), per_protein.tsv, predictions.fasta,
        skipped.tsv (examples that could not be evaluated, with the reason), baselines.npz, accuracy_vs_length.png, confusion_3di.png (3Di), rmsd_tm_vs_length.png,
        rmsd_tm_hist.png, ca_traces_3d.png and pdb/<id>_pred_vs_true.pdb (decodable kinds),
        work/ (resume state: one part per chunk of proteins).

SLURM arrays: each task evaluates the DB shards `--num-shards/--shard-index` give it; then run once
with --finalize. Without an array (one task) the finalize step runs at the end by itself.
Prediction for your own sequences: python -m tokenfold.predict --help
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenfold import layout
from tokenfold.cli import die, seed_everything, setup_logging
from tokenfold.predict import add_decoding_args, sampling_from_args
from tokenfold.sharding import add_shard_args, resolve_shard


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run name: checkpoint data/runs/<run>/final, output data/eval/<run>")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir or run dir (default data/runs/<run>/final)")
    p.add_argument("--tokens", default=None, help="token shards dir (default data/tokens/<kind>[_interleaved])")
    p.add_argument("--db", default=None,
                   help=f"protein DB with the true C-alpha (default: the DB the token manifest names, else {layout.DB})")
    p.add_argument("--out", default=None, help="output dir (default data/eval/<run>)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to evaluate (default test)")
    p.add_argument("--max-proteins", type=int, default=None, help="only the first N examples of the split")
    p.add_argument("--chunk-size", type=int, default=512, help="proteins per work part (resume granularity)")
    p.add_argument("--no-unconstrained", action="store_true",
                   help="skip the unconstrained generation pass (validity and length-match rates)")
    p.add_argument("--baseline-max-residues", type=int, default=200_000,
                   help="train residues used to fit the baselines (seeded sample of whole proteins)")
    p.add_argument("--window-baseline", choices=["auto", "yes", "no"], default="auto",
                   help="fit the windowed logistic-regression baseline (auto: for 3Di only)")
    p.add_argument("--n-pdb", type=int, default=100, help="write pred-vs-true PDB files for this many proteins")
    p.add_argument("--finalize", action="store_true", help="only merge the array tasks' parts into the report")
    p.add_argument("--overwrite", action="store_true", help="redo this task's work (and the report)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_decoding_args(p)
    add_shard_args(p, "DB shards")
    a = p.parse_args(argv)
    setup_logging(a.verbose)

    if a.checkpoint is None and a.run is None:
        die("give --run NAME or --checkpoint DIR")
    ckpt = Path(a.checkpoint) if a.checkpoint else layout.RUNS / a.run
    if a.out is None:
        run = a.run or _run_name(ckpt)
        a.out = str(layout.EVAL / run)
    num_tasks, task = resolve_shard(a.num_shards, a.shard_index)
    seed_everything(a.seed)

    from tokenfold.evaluate import EvalConfig, Evaluation, summary_line

    cfg = EvalConfig(checkpoint=str(ckpt), out=a.out, db=a.db, tokens=a.tokens, split=a.split,
                     sampling=sampling_from_args(a), unconstrained=not a.no_unconstrained,
                     max_proteins=a.max_proteins, chunk_size=a.chunk_size, batch_size=a.batch_size,
                     max_batch_tokens=a.max_batch_tokens, baseline_max_residues=a.baseline_max_residues,
                     window_baseline={"auto": None, "yes": True, "no": False}[a.window_baseline],
                     n_pdb=a.n_pdb, kanzi_checkpoint=a.kanzi_checkpoint, device=a.device, dtype=a.dtype,
                     threads=a.threads, seed=a.seed)
    from tokenfold.kanzi import KanziUnavailable

    try:
        ev = Evaluation(cfg)
        status = ev.status()
        if status == "done" and not a.overwrite:
            print(f"{a.out}/metrics.json exists: evaluation complete (use --overwrite to redo)", file=sys.stderr)
            return 0
        if status == "other" and not a.overwrite:
            die(f"{a.out} holds the evaluation of a different configuration; use --overwrite or another --out")
        if not a.finalize:
            ev.decoder()  # fail early when a decodable kind's decoder is missing
            ev.run_units(num_tasks, task, overwrite=a.overwrite)
            if num_tasks > 1:
                print(f"task {task}/{num_tasks} done; run once more with --finalize after all tasks", file=sys.stderr)
                return 0
        m = ev.finalize()
    except (FileNotFoundError, ValueError, KanziUnavailable) as e:
        die(str(e))
    print(f"evaluation: {summary_line(m)}\nreport: {Path(a.out) / 'metrics.json'} (+ PNGs, per_protein.tsv)")
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
