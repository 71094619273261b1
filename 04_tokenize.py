#!/usr/bin/env python
"""Stage 04: protein DB -> token shards (amino acids paired with structure tokens) for the translator LM.

--direction seq2struct (default) makes examples that translate amino acids into structure tokens;
--direction struct2seq the reverse (inverse folding: <bos> s1..sL <sep> <aa> a1..aL <eos>, loss on the
amino acids and <eos>). vocab.json records the direction; stages 05, 06 and predict follow it.

Inputs : --db (stage-01 protein DB); esm kind: --codebook (stage 03) and --embeddings (stage 02);
         geo kind: the geo codebook --geo-codebook (fit on TRAIN chains); kanzi kind:
         --kanzi-checkpoint (Kanzi weights, plus the kanzi package; chains of at most 255 residues).
Outputs: --out (default data/tokens/<kind>[_interleaved][_struct2seq]/): vocab.json, <split>/shard_*.bin + .idx.npz,
         work/ (per-DB-shard markers, statistics, rejects), report.json (geo: + the robustness table of
         substituted tokens on --geo-robustness-chains held-out chains), token_frequency.png,
         lengths.png (geo: geo_rmsd_hist.png, geo_rmsd_vs_length.png), rejects.tsv, and manifest.json
         last. geo kind: --geo-codebook (default data/geo/geo_codebook_K<K>.npz). kanzi kind with
         --random-weights-for-testing and no checkpoint: data/models/kanzi_tiny_RANDOM_seed<seed>.pt (tests
         and demos only, labelled RANDOM WEIGHTS in every output). Files: data/README.md.

SLURM: run as an array (each task takes DB shards round-robin), then once with --finalize. For the
geo kind, first fit the codebook in its own step:  04_tokenize.py --tokens geo --fit-geo-codebook
(an array task without it stops with one line; a single-task run fits it itself).
"""
from __future__ import annotations

import argparse
import sys

from tokenfold.cli import add_options, die, options_from_args, setup_logging
from tokenfold.codebook import CodebookError
from tokenfold.esm_checkpoint import EsmLoadError
from tokenfold.geo_fit import ensure_geo_codebook
from tokenfold.kanzi import KanziUnavailable
from tokenfold.sharding import add_shard_args, resolve_shard
from tokenfold.tokenize import TokenizeConfig, finalize, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TokenizeConfig)
    p.add_argument("--finalize", action="store_true",
                   help="only the finalize step: check all DB shards are done, write report + manifest")
    p.add_argument("-v", "--verbose", action="store_true")
    g = p.add_argument_group("geo codebook step")
    g.add_argument("--fit-geo-codebook", action="store_true",
                   help="fit the geo codebook on TRAIN chains (or find a stored one fit for this DB and these "
                        "settings), write it, then exit without tokenizing: run once before a geo array")
    g.add_argument("--refit-geo", action="store_true",
                   help="refit the geo codebook even if a matching one exists (fit step or single task)")
    add_shard_args(p, "DB shards")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    setup_logging(a.verbose)
    try:
        cfg = options_from_args(TokenizeConfig, a)
        num, idx = resolve_shard(a.num_shards, a.shard_index)
        if a.fit_geo_codebook or a.refit_geo:
            if cfg.kind != "geo":
                die("--fit-geo-codebook/--refit-geo need --tokens geo")
            if a.refit_geo and not a.fit_geo_codebook and num > 1:
                die("--refit-geo in an array task: refit once with --fit-geo-codebook --refit-geo before the array")
            ensure_geo_codebook(cfg, refit=a.refit_geo)
            if a.fit_geo_codebook:
                return 0
        if a.finalize:
            finalize(cfg)
        else:
            run(cfg, num, idx)
    except (FileNotFoundError, ValueError, KanziUnavailable, EsmLoadError, CodebookError) as err:
        die(str(err).splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
