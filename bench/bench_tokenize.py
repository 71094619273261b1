#!/usr/bin/env python
"""Stage 04 benchmark: structure tokens per second per CPU core for each token kind, and what the geo
tokens reconstruct on chains their codebook never saw.

Everything runs on ONE core (BLAS/torch threads pinned to 1 before numpy/torch load). Speeds are
printed as ratios against a reference measured in the same run on the same chains:

    reference = mini3di computing 3Di states from N/CA/C/CB coordinates (Foldseek's 3Di, the work
                stage 01 does per residue; a fair "structure tokenizer" yardstick)

Measured, on real chains of ../shared/data/structures (train folders: db55_unbound + DIPS,
held-out folders: GTalign queries, HOMSTRAD, MDAnalysis, SCOPe examples; sequences seen in training
are removed from the held-out set):

1. stage 04 (`tokenfold.tokenize.run`, DB -> token shards, one task, finalize excluded) for
   3di, geo (greedy and beam 4) and esm (a tiny RANDOM ESM-2 computed on the fly + a stage-03
   codebook; skipped with a message while `tokenfold.codebook` is absent). kanzi: see
   bench/bench_kanzi.py (runs in the Kanzi venv, `make test-kanzi` builds it).
2. geo encode / decode alone (`GeoCodebook.encode_many` / `decode_many`).
3. geo reconstruction RMSD on held-out chains: closed loop (greedy, beam 4) vs open loop, by length,
   and for K in --k-sweep.

    .venv/bin/python bench/bench_tokenize.py [--train-chains 300] [--k 512] [--k-sweep 64,128,256,512,1024]
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenfold.artifacts import write_json_atomic  # noqa: E402
from tokenfold.db import ProteinRecord, write_shard  # noqa: E402
from tokenfold.geotokens import GeoCodebook, open_loop_codes, reconstruction_rmsd, segment_starts  # noqa: E402
from tokenfold.metrics import segment_rmsd  # noqa: E402
from tokenfold.structure import parse_structure_file  # noqa: E402
from tokenfold.threedi import encode_3di  # noqa: E402

SHARED = Path(os.environ.get("TOKENFOLD_SHARED", ROOT.parent / "shared")) / "data" / "structures"
TRAIN_FOLDERS = ("db55_unbound", "dips_test_complexes")
HELD_FOLDERS = ("gtalign_afsp", "foldseek_regression_homstrad", "mdanalysistests_dssp", "foldseek_example")
BINS = (0, 100, 200, 400, 10**9)


def load(folders, limit=None):
    chains = []
    for folder in folders:
        for f in sorted((SHARED / folder).iterdir()):
            try:
                pf = parse_structure_file(f)
            except Exception:  # noqa: BLE001 - a bench skips unreadable files
                continue
            chains += [(f"{f.name}_{c.name}", c) for c in pf.chains if len(c) >= 20]
            if limit and len(chains) >= limit:
                return chains[:limit]
    return chains


def rate(n, seconds):
    return n / max(seconds, 1e-9)


def dist(r):
    r = np.asarray(r)
    return {"n": int(len(r)), "median": float(np.median(r)), "mean": float(r.mean()),
            "p90": float(np.percentile(r, 90)), "max": float(r.max())}


def by_length(L, r):
    out = {}
    for a, b in zip(BINS[:-1], BINS[1:]):
        m = (L >= a) & (L < b)
        if m.any():
            out[f"{a}-{b - 1 if b < 10**9 else 'inf'}"] = {"n": int(m.sum()), "median": float(np.median(r[m]))}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-chains", type=int, default=300, help="train chains for the geo codebook fit")
    p.add_argument("--k", type=int, default=512, help="geo K for the stage runs")
    p.add_argument("--k-sweep", default="64,128,256,512,1024", help="geo K values for the RMSD sweep ('' = none)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args()
    if not SHARED.exists():
        sys.exit(f"bench needs ../shared/data/structures ({SHARED} not found)")
    import torch

    torch.set_num_threads(1)
    res = {"cores": 1}

    t = time.perf_counter()
    train = load(TRAIN_FOLDERS, a.train_chains)
    seen = {c.aa for _, c in train}
    held = [(n, c) for n, c in load(HELD_FOLDERS) if c.aa not in seen]
    print(f"chains: {len(train)} train ({sum(len(c) for _, c in train)} residues), {len(held)} held out "
          f"({sum(len(c) for _, c in held)} residues); parsed in {time.perf_counter() - t:.1f}s")

    # ---- reference: mini3di on the held-out chains
    n_res = sum(len(c) for _, c in held)
    t = time.perf_counter()
    ss = [encode_3di(c) for _, c in held]
    ref = rate(n_res, time.perf_counter() - t)
    res["reference_mini3di_residues_per_s"] = ref
    print(f"\nreference: mini3di 3Di from atoms      {ref:10.0f} residues/s/core  (1.00x)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recs = [ProteinRecord(id=n, aa=c.aa, ss=s or None, ca=c.ca, gap_before=c.gap_before, source="structure")
                for (n, c), s in zip(train + held, [encode_3di(c) for _, c in train] + ss)]
        db = tmp / "db"
        write_shard(db / "shards" / "shard_00000.h5", recs[:len(train)])
        write_shard(db / "shards" / "shard_00001.h5", recs[len(train):])
        write_json_atomic(db / "manifest.json", {"format": "tokenfold-db", "shards": [
            {"file": "shards/shard_00000.h5", "n_entries": len(train)},
            {"file": "shards/shard_00001.h5", "n_entries": len(held)}]})
        split = np.zeros(len(recs), np.uint8)
        split[len(train):] = np.where(np.arange(len(held)) % 2 == 0, 1, 2)   # held-out chains: val/test
        np.save(db / "split.npy", split)
        from tokenfold.geo_fit import ensure_geo_codebook
        from tokenfold.tokenize import TokenizeConfig, run

        def stage(kind, **kw):
            cfg = TokenizeConfig(db=str(db), out=str(tmp / f"tok_{kind}_{len(list(tmp.iterdir()))}"), kind=kind,
                                 max_length=100000, geo_k=a.k, geo_codebook=str(tmp / f"geo_K{a.k}.npz"), **kw)
            t = time.perf_counter()
            done = run(cfg, max_units=10**6)          # all shards, no finalize (timed separately below)
            dt = time.perf_counter() - t
            nres = sum(v["n_residues"] for s in done for v in s["per_split"].values())
            ntok = sum(v["n_tokens"] for s in done for v in s["per_split"].values())
            return nres, ntok, dt

        print("\nstage 04 (DB -> token shards), one task:")
        rows = []
        nres, ntok, dt = stage("3di")
        rows.append(("3di", nres, ntok, dt))
        t = time.perf_counter()
        cfg = TokenizeConfig(db=str(db), kind="geo", geo_k=a.k, geo_codebook=str(tmp / f"geo_K{a.k}.npz"))
        cb = ensure_geo_codebook(cfg)
        fit_s = time.perf_counter() - t
        res["geo_fit"] = {"K": a.k, "seconds": fit_s, "chains": cb.meta["fit_chains"],
                          "residues": cb.meta["fit_residues"], "rms_step_error": cb.meta["fit_rms_step_error"]}
        rows.append(("geo", *stage("geo")))
        rows.append(("geo beam4", *stage("geo", geo_beam=4)))
        esm_note = None
        try:
            rows.append(("esm (tiny RANDOM ESM-2, on the fly)", *esm_stage(tmp, db, recs, stage)))
        except Exception as e:  # noqa: BLE001 - report why the esm kind could not be measured
            esm_note = f"skipped: {type(e).__name__}: {str(e).splitlines()[0]}"
        for name, nres, ntok, dt in rows:
            r = rate(nres, dt)
            res.setdefault("stage04", {})[name] = {"structure_tokens_per_s": r, "all_tokens_per_s": rate(ntok, dt),
                                                   "ratio_vs_reference": r / ref}
            print(f"  {name:38s} {r:10.0f} structure tokens/s/core ({rate(ntok, dt):8.0f} tokens/s incl. amino "
                  f"acids and markers)  {r / ref:5.2f}x reference")
        if esm_note:
            print(f"  esm: {esm_note}")
            res["stage04"]["esm"] = esm_note
        print("  kanzi: not run here; bench/bench_kanzi.py measures it (in the Kanzi venv)")
        res["stage04"]["kanzi"] = "not run here: bench/bench_kanzi.py"
        print(f"  geo codebook fit (K={a.k}, {cb.meta['fit_residues']} train residues, once before the array): "
              f"{fit_s:.1f}s")

    # ---- geo encode/decode alone, and reconstruction on held-out chains
    cas = [c.ca for _, c in held]
    gaps = [c.gap_before for _, c in held]
    L = np.array([len(x) for x in cas])
    t = time.perf_counter()
    codes = cb.encode_many(cas, gaps)
    enc = rate(L.sum(), time.perf_counter() - t)
    t = time.perf_counter()
    cb.decode_many(codes)
    dec = rate(L.sum(), time.perf_counter() - t)
    res["geo_encode_residues_per_s"], res["geo_decode_residues_per_s"] = enc, dec
    print(f"\ngeo K={a.k} alone: encode {enc:.0f} residues/s/core ({enc / ref:.2f}x reference), decode {dec:.0f}/s")

    print(f"\ngeo reconstruction C-alpha RMSD on {len(held)} held-out chains (A; each segment between chain "
          "breaks superposed on its own):")
    r1 = reconstruction_rmsd(cb, cas, gaps)
    r4 = reconstruction_rmsd(cb, cas, gaps, beam=4)
    ro = np.array([segment_rmsd(cb.decode(open_loop_codes(cb, x, g)), x, segment_starts(x, g)) for x, g in zip(cas, gaps)])
    for name, r in (("closed loop, greedy (default)", r1), ("closed loop, beam 4", r4), ("open loop (no feedback)", ro)):
        d = dist(r)
        res.setdefault("geo_rmsd", {})[name] = {**d, "by_length": by_length(L, r)}
        bl = "  ".join(f"{k}: {v['median']:.3f} (n={v['n']})" for k, v in by_length(L, r).items())
        print(f"  K={a.k} {name:30s} median {d['median']:.3f} mean {d['mean']:.3f} p90 {d['p90']:.3f} "
              f"max {d['max']:.3f} | median by length: {bl}")
    if a.k_sweep:
        print("\n  K sweep (fit on the same train chains; greedy closed loop; token perplexity on held-out chains):")
        for K in map(int, a.k_sweep.split(",")):
            t = time.perf_counter()
            c2 = GeoCodebook.fit([(c.ca, c.gap_before) for _, c in train], K=K, seed=0)
            fs = time.perf_counter() - t
            r = reconstruction_rmsd(c2, cas, gaps)
            cnt = np.bincount(np.concatenate(c2.encode_many(cas, gaps)), minlength=c2.n_tokens)
            pr = cnt[cnt > 0] / cnt.sum()
            ppl = float(np.exp(-(pr * np.log(pr)).sum()))
            d = dist(r)
            res.setdefault("geo_k_sweep", {})[K] = {**d, "fit_s": fs, "token_perplexity": ppl}
            print(f"  K={K:5d}: median {d['median']:.3f} mean {d['mean']:.3f} p90 {d['p90']:.3f} max {d['max']:.3f}"
                  f"  perplexity {ppl:6.1f}  (fit {fs:.1f}s)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=float))


def esm_stage(tmp, db, recs, stage):
    """Stage 04 esm kind with a tiny RANDOM ESM-2 (made here) and a stage-03 codebook fit on its vectors."""
    from tokenfold.codebook import Codebook  # noqa: F401 - ImportError -> the caller reports a skip
    from tokenfold.esm_checkpoint import load_esm, write_random_checkpoint
    from tokenfold.esm_embed import embed

    ck = write_random_checkpoint(tmp / "esm2_t2_RANDOM_bench.pt", num_layers=2, embed_dim=64, heads=4)
    model, alphabet, _ = load_esm(ck, allow_random=True)
    x = np.concatenate(embed(model, alphabet, [r.aa for r in recs[:50]], layer=2))
    cbp = make_esm_codebook(tmp, x, ck)
    return stage("esm", codebook=str(cbp), embeddings=str(tmp / "no_store"), random_weights_for_testing=True,
                 esm_model=str(ck))


def make_esm_codebook(tmp, x, ck):
    from tokenfold.codebook import Codebook
    from tokenfold.codebook_fit import fit_codebook

    km = fit_codebook(x, k=64, seed=0, n_init=1)
    cb = Codebook(km.centroids, {"esm_model": ck.stem, "esm_model_path": str(ck), "layer": 2, "random_weights": True,
                                 "normalize": False})
    return cb.save(tmp / "codebook_K64.pkl")


if __name__ == "__main__":
    main()
