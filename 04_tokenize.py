#!/usr/bin/env python
"""Stage 04: protein DB -> token shards (amino acids paired with structure tokens) for the translator LM.

Inputs : --db (stage-01 protein DB); esm kind: --codebook (stage 03) and --embeddings (stage 02);
         geo kind: the geo codebook --geo-codebook (fit here on TRAIN chains when missing);
         kanzi kind: --kanzi-checkpoint (Kanzi weights, plus the kanzi package).
Outputs: --out (default data/tokens/<kind>[_interleaved]/): vocab.json, <split>/shard_*.bin + .idx.npz,
         report.json, token_frequency.png, lengths.png (geo: geo_rmsd_hist.png, geo_rmsd_vs_length.png),
         rejects.tsv, and manifest.json last. geo: data/geo/geo_codebook_K<K>.npz.

SLURM: run as an array (each task takes DB shards round-robin), then once with --finalize. For the
geo kind, array task 0 fits the codebook while the others wait; or run --fit-geo-only before the array.
"""
from __future__ import annotations

import argparse
import sys

from tokenfold import layout
from tokenfold.cli import die, setup_logging
from tokenfold.sharding import add_shard_args, resolve_shard
from tokenfold.tokenize import KINDS, LONG_POLICIES, TokenizeConfig, ensure_geo_codebook, finalize, run


def main(argv=None) -> int:
    d = TokenizeConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", choices=KINDS, default="3di", help="structure token kind (default 3di)")
    p.add_argument("--interleaved", action="store_true",
                   help="interleave amino acid and structure token (<bos> <kind> a1 s1 a2 s2 .. <eos>)")
    p.add_argument("--db", default=str(layout.DB), help=f"protein DB from stage 01 (default {layout.DB})")
    p.add_argument("--out", default=None, help=f"output directory (default {layout.TOKENS}/<kind>[_interleaved])")
    p.add_argument("--max-length", type=int, default=d.max_length, help="max residues per example (default %(default)s)")
    p.add_argument("--long-policy", choices=LONG_POLICIES, default=d.long_policy,
                   help="longer chains: crop = keep one seeded window of --max-length residues (default); "
                        "drop = leave them out. Both are counted in report.json")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of crop windows and of the geo codebook fit")
    p.add_argument("--overwrite", action="store_true", help="redo even if the output is complete")
    p.add_argument("--finalize", action="store_true",
                   help="only the finalize step: check all DB shards are done, write report + manifest")
    p.add_argument("-v", "--verbose", action="store_true")
    g = p.add_argument_group("geo kind")
    g.add_argument("--geo-k", type=int, default=d.geo_k, help="geometric codes K (default %(default)s; + START and BREAK)")
    g.add_argument("--geo-codebook", default=None,
                   help=f"geo codebook file (default {layout.GEO}/geo_codebook_K<K>.npz; fit on train chains if missing)")
    g.add_argument("--geo-fit-max-residues", type=int, default=d.geo_fit_max_residues,
                   help="train residues sampled to fit the geo codebook (default %(default)s)")
    g.add_argument("--geo-refine-iters", type=int, default=d.geo_refine_iters,
                   help="closed-loop refinement steps of the fit (default %(default)s)")
    g.add_argument("--geo-beam", type=int, default=d.geo_beam,
                   help="beam width of the closed-loop encoder (default 1 = greedy; 4 gives ~10%% lower RMSD, ~3x slower)")
    g.add_argument("--fit-geo-only", action="store_true", help="fit (or check) the geo codebook, then exit")
    g.add_argument("--refit-geo", action="store_true", help="refit the geo codebook even if it exists")
    e = p.add_argument_group("esm kind")
    e.add_argument("--codebook", default=None, help=f"stage-03 codebook (default {layout.codebook_path(512)})")
    e.add_argument("--embeddings", default=None,
                   help=f"stage-02 embeddings dir (default {layout.EMBEDDINGS}/<codebook model>_L<layer>); when it "
                        "holds only a sample, embeddings are computed on the fly")
    e.add_argument("--esm-model", default=None, help="ESM-2 name or .pt path for on-the-fly embeddings (default: the codebook's)")
    e.add_argument("--random-weights-for-testing", action="store_true",
                   help="accept a codebook/model made from a RANDOM-weights ESM-2 (tests and the offline demo only)")
    e.add_argument("--device", default=None, help="torch device for esm/kanzi (default: cuda if available, else cpu)")
    k = p.add_argument_group("kanzi kind")
    k.add_argument("--kanzi-checkpoint", default=None, help="Kanzi checkpoint (.pt); needs the kanzi package")
    k.add_argument("--kanzi-decode-steps", type=int, default=d.kanzi_decode_steps,
                   help="SDE steps when decoding Kanzi tokens (default %(default)s)")
    add_shard_args(p, "DB shards")
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    try:
        cfg = TokenizeConfig(db=a.db, kind=a.tokens, interleaved=a.interleaved, out=a.out, max_length=a.max_length,
                             long_policy=a.long_policy, seed=a.seed, overwrite=a.overwrite, geo_k=a.geo_k,
                             geo_codebook=a.geo_codebook, geo_fit_max_residues=a.geo_fit_max_residues,
                             geo_refine_iters=a.geo_refine_iters, geo_beam=a.geo_beam, codebook=a.codebook,
                             embeddings=a.embeddings, esm_model=a.esm_model,
                             random_weights_for_testing=a.random_weights_for_testing, device=a.device,
                             kanzi_checkpoint=a.kanzi_checkpoint, kanzi_decode_steps=a.kanzi_decode_steps)
        num, idx = resolve_shard(a.num_shards, a.shard_index)
        if a.fit_geo_only or a.refit_geo:
            if cfg.kind != "geo":
                die("--fit-geo-only/--refit-geo need --tokens geo")
            ensure_geo_codebook(cfg, refit=a.refit_geo)
            if a.fit_geo_only:
                return 0
        if a.finalize:
            finalize(cfg)
        else:
            run(cfg, num, idx)
    except (FileNotFoundError, ValueError) as err:
        die(str(err).splitlines()[0])
    except Exception as err:  # noqa: BLE001 - one clear line for known optional-dependency failures
        if type(err).__name__ in ("KanziUnavailable", "EsmLoadError", "CodebookError"):
            die(str(err).splitlines()[0])
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
