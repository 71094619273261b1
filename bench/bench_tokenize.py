#!/usr/bin/env python
"""Stage 04 benchmark: structure tokens per second per CPU core for each token kind, and what the geo
tokens reconstruct, and how they survive token errors, on chains their codebook never saw.

Everything runs on ONE core (BLAS/torch threads pinned to 1 before numpy/torch load). Speeds are
printed as ratios against a reference measured in the same run on the same chains:

    reference = mini3di computing 3Di states from N/CA/C/CB coordinates (Foldseek's 3Di, the work
                stage 01 does per residue; a fair "structure tokenizer" yardstick)

Measured, on real chains of ../shared/data/structures (train folders: db55_unbound + DIPS,
held-out folders: GTalign queries, HOMSTRAD, MDAnalysis, SCOPe examples; sequences seen in training
are removed from the held-out set):

1. stage 04 (`tokenfold.tokenize.run`, DB -> token shards, one task, finalize excluded) for
   3di, geo (default beam 4 and greedy) and esm (a tiny RANDOM ESM-2 computed on the fly + a stage-03
   codebook; skipped with a message while `tokenfold.codebook` is absent). kanzi: see
   bench/bench_kanzi.py (runs in the Kanzi venv, `make test-kanzi` builds it).
2. geo (v2: pair tokens + Viterbi decoder, `tokenfold.geotokens`) against geo v1 (one placement code
   per residue, K=512, greedy closed loop: `tokenfold.geoframes.PlacementCodebook` used directly as
   the token, which is exactly the previous token kind), fit on the same train chains: encode and
   decode speed, reconstruction RMSD (by length), and the robustness table of `tokenfold.georobust`
   (random and near-miss substitutions of 0/2/5/10/20% of the tokens, median RMSD/TM/lDDT).
3. the K trade-off (--k-sweep): tokens, reconstruction and robustness at 10% substitutions per K.
4. decoding per-position probabilities (`GeoCodebook.decode_probs`) vs their argmax, on simulated
   model outputs (`georobust.simulated_probs`).

    .venv/bin/python bench/bench_tokenize.py [--train-chains 300] [--k 32] [--k-sweep 16,24,32,45,64]
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
from tokenfold.geoframes import PlacementCodebook  # noqa: E402
from tokenfold.georobust import (format_table, geo_robustness, near_miss_tokens, robustness_table,  # noqa: E402
                                 score_trace, simulated_probs)
from tokenfold.geotokens import GeoCodebook, reconstruction_rmsd, segment_starts  # noqa: E402
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
    p.add_argument("--k", type=int, default=32, help="geo K (placement codes) for the stage runs and the v1 comparison")
    p.add_argument("--v1-k", type=int, default=512, help="K of the geo v1 reference (its stage-04 default)")
    p.add_argument("--k-sweep", default="16,24,32,45,64", help="geo K values for the trade-off table ('' = none)")
    p.add_argument("--robust-chains", type=int, default=0, help="held-out chains for the robustness tables (0 = all)")
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
        rows.append(("geo (beam 4, default)", *stage("geo")))
        rows.append(("geo greedy (beam 1)", *stage("geo", geo_beam=1)))
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

    # ---- geo v2 against geo v1, same train chains, same held-out chains
    cas = [c.ca for _, c in held]
    gaps = [c.gap_before for _, c in held]
    L = np.array([len(x) for x in cas])
    train_pairs = [(c.ca, c.gap_before) for _, c in train]
    t = time.perf_counter()
    v1, _, _ = PlacementCodebook.fit(train_pairs, K=a.v1_k, seed=0, beam=1)
    res["geo_v1_fit_s"] = time.perf_counter() - t
    print(f"\ngeo v1 reference: K={a.v1_k} placement codes, one per residue, greedy (fit {res['geo_v1_fit_s']:.1f}s)")
    speeds = {}
    for name, enc, dec in (("v2", lambda: cb.encode_many(cas, gaps), cb.decode_many),
                           ("v2 greedy", lambda: cb.encode_many(cas, gaps, beam=1), cb.decode_many),
                           ("v1", lambda: v1.encode_many(cas, gaps), v1.decode_many)):
        t = time.perf_counter()
        codes = enc()
        e = rate(L.sum(), time.perf_counter() - t)
        t = time.perf_counter()
        dec(codes)
        speeds[name] = (e, rate(L.sum(), time.perf_counter() - t))
    res["geo_speed_residues_per_s"] = {k: {"encode": e, "decode": d} for k, (e, d) in speeds.items()}
    print(f"geo encode / decode alone on {len(held)} held-out chains ({L.sum()} residues), residues/s/core:")
    for k, (e, d) in speeds.items():
        print(f"  {k:10s} encode {e:8.0f} ({e / speeds['v1'][0]:5.2f}x v1)   decode {d:8.0f} ({d / speeds['v1'][1]:5.3f}x v1)")

    print(f"\ngeo reconstruction C-alpha RMSD on {len(held)} held-out chains (A; each segment between chain "
          "breaks superposed on its own):")
    recon = {f"v2 K={a.k} beam 4 (default)": reconstruction_rmsd(cb, cas, gaps),
             f"v2 K={a.k} greedy": reconstruction_rmsd(cb, cas, gaps, beam=1),
             f"v1 K={a.v1_k} greedy": np.array([segment_rmsd(x, ca, segment_starts(ca, g)) for x, ca, g in
                                                zip(v1.decode_many(v1.encode_many(cas, gaps)), cas, gaps)])}
    for name, r in recon.items():
        d = dist(r)
        res.setdefault("geo_rmsd", {})[name] = {**d, "by_length": by_length(L, r)}
        bl = "  ".join(f"{k}: {v['median']:.3f} (n={v['n']})" for k, v in by_length(L, r).items())
        print(f"  {name:26s} median {d['median']:.3f} mean {d['mean']:.3f} p90 {d['p90']:.3f} "
              f"max {d['max']:.3f} | median by length: {bl}")

    rob = held[:a.robust_chains] if a.robust_chains else held
    rc, rg = [c.ca for _, c in rob], [c.gap_before for _, c in rob]
    t = time.perf_counter()
    tables = {f"geo v2 (K={a.k}, {cb.n_tokens} tok)": geo_robustness(cb, rc, rg),
              f"geo v1 (K={a.v1_k}, {a.v1_k + 2} tok)": robustness_table(
                  v1.encode_many(rc, rg), v1.decode_many, v1.K, near_miss_tokens(v1.centroids, pair=False), rc, rg)}
    res["geo_robustness"] = tables
    print(f"\ngeo robustness: a fraction of the tokens of {len(rob)} held-out chains substituted (random: any other "
          "geometric token; near: the 2nd-nearest code), decoded, scored against the truth; medians over chains "
          f"({time.perf_counter() - t:.0f}s):")
    print(format_table(tables))

    if a.k_sweep:
        print("\ngeo K trade-off (fit on the same train chains, default beam; robustness on the same held-out chains):")
        print(f"  {'K':>4s} {'tokens':>6s} {'RMSD median':>11s} {'p90':>6s} | {'random 10%: TM  lDDT':>20s} | "
              f"{'near 10%: TM  lDDT':>18s} | {'encode res/s':>12s} {'fit s':>6s}")
        for K in map(int, a.k_sweep.split(",")):
            t = time.perf_counter()
            c2 = cb if K == a.k else GeoCodebook.fit(train_pairs, K=K, seed=0)
            fs = time.perf_counter() - t
            t = time.perf_counter()
            toks = c2.encode_many(cas, gaps)
            enc = rate(L.sum(), time.perf_counter() - t)
            r = np.array([segment_rmsd(x, ca, segment_starts(ca, g)) for x, ca, g in zip(c2.decode_many(toks), cas, gaps)])
            rows_k = geo_robustness(c2, rc, rg, rates=(0.10,))
            rr = next(x for x in rows_k if x["mode"] == "random")
            nr = next(x for x in rows_k if x["mode"] == "near")
            res.setdefault("geo_k_sweep", {})[K] = {**dist(r), "n_tokens": c2.n_tokens, "robustness_10pct": rows_k,
                                                    "encode_residues_per_s": enc, "fit_s": fs}
            print(f"  {K:4d} {c2.n_tokens:6d} {np.median(r):11.3f} {np.percentile(r, 90):6.3f} | "
                  f"{rr['tm']:12.3f} {rr['lddt']:6.3f} | {nr['tm']:10.3f} {nr['lddt']:6.3f} | {enc:12.0f} "
                  f"{fs if K != a.k else res['geo_fit']['seconds']:6.1f}")

    prob_chains = [(n, c) for n, c in rob if len(c) <= 400][:40]
    print(f"\ngeo decode_probs vs decoding the argmax, {len(prob_chains)} held-out chains (<= 400 residues), "
          "simulated per-position probabilities (tokenfold.georobust.simulated_probs):")
    pt = cb.encode_many([c.ca for _, c in prob_chains], [c.gap_before for _, c in prob_chains])
    for kind, strength in (("random", 4.5), ("random", 4.0), ("geometric", 0.3), ("geometric", 1.0)):
        rng = np.random.default_rng(0)
        probs = [simulated_probs(cb, t_, rng, kind, strength) for t_ in pt]
        err = float(np.mean(np.concatenate([p.argmax(1) != t_ for p, t_ in zip(probs, pt)])))
        sa = np.array([score_trace(x, c.ca, c.gap_before) for x, (_, c) in
                       zip(cb.decode_many([p.argmax(1) for p in probs]), prob_chains)])
        sp = np.array([score_trace(x, c.ca, c.gap_before) for x, (_, c) in zip(cb.decode_probs(probs), prob_chains)])
        ma, mp = np.nanmedian(sa, 0), np.nanmedian(sp, 0)
        res.setdefault("geo_decode_probs", []).append({"kind": kind, "strength": strength, "argmax_token_error": err,
                                                       "argmax": ma.tolist(), "probs": mp.tolist()})
        print(f"  {kind:9s} (strength {strength}): argmax wrong on {err * 100:4.1f}% of tokens | argmax decode RMSD "
              f"{ma[0]:5.2f} TM {ma[1]:.3f} lDDT {ma[2]:.3f} | decode_probs RMSD {mp[0]:5.2f} TM {mp[1]:.3f} "
              f"lDDT {mp[2]:.3f}")
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
