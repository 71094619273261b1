#!/usr/bin/env python
"""Kanzi encode/decode speed on CPU, in residues per second per core, against our geo tokens on the same
chains in the same run.

    reference = geo tokens (`tokenfold.geotokens`, K=--geo-k, fit on train chains here): stage 04's
                `encode_many` and stage 06's `decode_many`, the decodable kind we ship.

Kanzi (`tokenfold.kanzi.KanziTokenizer`, the adapter stages 04 and 06 use) with RANDOM weights of each
shape in --shapes (`kanzi.RANDOM_SHAPES`: tiny 39k, small 1.7M, base 30.7M parameters; "base" has the
released checkpoint's ~30M parameters, its architecture is our guess). Random weights cost the same
time as trained ones. Encoding is one chain at a time, as upstream supports; decoding integrates the
SDE for n_steps, two decoder passes per step (conditional and unconditional), one chain at a time. A
decode is n_steps identical loop iterations, so its cost is linear in n_steps: the bench measures
--decode-steps (default 10) on every shape and, on the smallest shape, also 100 (stage 04's default,
`--kanzi-decode-steps`) to show the scaling; the 100-step rate of the other shapes is the 10-step
one / 10, printed as "extrapolated".

Chains: held-out folders of ../shared/data/structures (or the embedded default data when ../shared is
absent), 40..255 residues (Kanzi's range). One core: BLAS/torch threads are pinned to 1.

    .venv-kanzi/bin/python bench/bench_kanzi.py [--chains 24] [--decode-chains 4] [--shapes tiny,small,base]
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

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_tokenize import HELD_FOLDERS, SHARED, TRAIN_FOLDERS, load  # noqa: E402
from tokenfold.geotokens import GeoCodebook  # noqa: E402
from tokenfold.kanzi import MAX_RESIDUES, RANDOM_SHAPES, KanziTokenizer, write_random_checkpoint  # noqa: E402


def in_range(chains):
    """Whole chains Kanzi can take: 40..255 residues, finite, no chain break."""
    return [c for _, c in chains if 40 <= len(c) <= MAX_RESIDUES and np.isfinite(c.ca).all() and not c.gap_before.any()]


def spread(chains, n):
    """n chains evenly spread over the length range (shortest to longest), in that order."""
    chains = sorted(chains, key=len)
    return [chains[int(i)] for i in np.unique(np.linspace(0, len(chains) - 1, min(n, len(chains))).round())]


def load_chains(n_held, n_train):
    if SHARED.exists():
        train = [c for _, c in load(TRAIN_FOLDERS, n_train)]
        seen = {c.aa for c in train}
        return train, spread([c for c in in_range(load(HELD_FOLDERS)) if c.aa not in seen], n_held), str(SHARED)
    from tokenfold.db_plan import embedded_default_inputs
    from tokenfold.structure import parse_structure_file

    allc = [(f.name, c) for f in embedded_default_inputs() for c in parse_structure_file(f).chains if len(c) >= 20]
    return [c for _, c in allc[1::2]], spread(in_range(allc[::2]), n_held), "embedded default data"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chains", type=int, default=24, help="held-out chains to encode")
    p.add_argument("--decode-chains", type=int, default=4, help="of those, how many to decode with Kanzi")
    p.add_argument("--decode-steps", type=int, default=10, help="SDE steps of the Kanzi decodes timed on every shape")
    p.add_argument("--shapes", default="tiny,small,base", help=f"random Kanzi shapes, of {','.join(RANDOM_SHAPES)}")
    p.add_argument("--geo-k", type=int, default=32, help="geo placement codes K (stage 04's default; tokens are code pairs)")
    p.add_argument("--train-chains", type=int, default=150, help="train chains the geo codebook is fit on")
    p.add_argument("--device", default="cpu", help="torch device for Kanzi (cuda: see the GPU note in the README)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    train, held, source = load_chains(a.chains, a.train_chains)
    n_res = sum(len(c) for c in held)
    dec_idx = [int(i) for i in np.unique(np.linspace(0, len(held) - 1, min(a.decode_chains, len(held))).round())]
    dec = [held[i] for i in dec_idx]   # held is sorted by length: these spread over it too
    n_dec = sum(len(c) for c in dec)
    print(f"chains ({source}): {len(held)} held out, {n_res} residues, lengths {min(map(len, held))}.."
          f"{max(map(len, held))}; {len(dec)} of them decoded by Kanzi ({n_dec} residues); torch {torch.__version__}, "
          f"1 thread, device {a.device}")
    res = {"source": source, "n_chains": len(held), "n_residues": n_res, "decode_chains": len(dec),
           "decode_residues": n_dec, "device": a.device, "torch": torch.__version__}

    # ---- reference: geo tokens
    cb, t_fit = timed(lambda: GeoCodebook.fit([(c.ca, c.gap_before) for c in train], K=a.geo_k, seed=0,
                                              refine_iters=1))
    cas = [c.ca for c in held]
    codes, t_enc = timed(lambda: cb.encode_many(cas, [c.gap_before for c in held]))
    _, t_dec = timed(lambda: cb.decode_many(codes))
    geo = {"K": a.geo_k, "fit_s": t_fit, "encode_residues_per_s": n_res / t_enc, "decode_residues_per_s": n_res / t_dec}
    res["reference_geo"] = geo
    print(f"\nreference: geo K={a.geo_k} (fit on {len(train)} train chains in {t_fit:.0f}s)\n"
          f"  encode {geo['encode_residues_per_s']:10.0f} residues/s/core   decode {geo['decode_residues_per_s']:10.0f}"
          " residues/s/core   (1.00x)")

    res["kanzi"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes.split(","):
            ckpt = write_random_checkpoint(Path(tmp) / f"kanzi_{shape}_RANDOM_seed0.pt", shape, seed=0)
            tok = KanziTokenizer.from_checkpoint(ckpt, device=a.device, allow_random=True,
                                                 n_decode_steps=a.decode_steps)
            tok.decode(tok.encode(held[0].ca)[:20])                    # warm-up (first-call allocations)
            kcodes, t_enc = timed(lambda: [tok.encode(ca) for ca in cas])
            dcodes = [kcodes[i] for i in dec_idx]
            _, t_dec = timed(lambda: tok.decode_many(dcodes))
            r = {"n_params": tok.info["n_params"], "encode_residues_per_s": n_res / t_enc,
                 f"decode_{a.decode_steps}_steps_residues_per_s": n_dec / t_dec,
                 "decode_s_per_step_per_chain": t_dec / a.decode_steps / len(dec)}
            per100 = n_dec / t_dec * a.decode_steps / 100
            r["decode_100_steps_residues_per_s"] = per100
            r["decode_100_steps"] = "extrapolated (linear in steps)"
            if shape == a.shapes.split(",")[0] and a.decode_steps != 100:
                tok.n_decode_steps = 100
                _, t100 = timed(lambda: tok.decode_many(dcodes))
                r["decode_100_steps_residues_per_s"], r["decode_100_steps"] = n_dec / t100, "measured"
                r["steps_scaling_100_vs_%d" % a.decode_steps] = t100 / t_dec
            res["kanzi"][shape] = r
            print(f"\nkanzi {shape} ({r['n_params'] / 1e6:.2f}M parameters, RANDOM weights)\n"
                  f"  encode {r['encode_residues_per_s']:10.0f} residues/s/core   "
                  f"({r['encode_residues_per_s'] / geo['encode_residues_per_s']:.3f}x geo)\n"
                  f"  decode {r[f'decode_{a.decode_steps}_steps_residues_per_s']:10.1f} residues/s/core at "
                  f"{a.decode_steps} steps ({r['decode_s_per_step_per_chain'] * 1e3:.0f} ms per step per chain)\n"
                  f"  decode {per100 if r['decode_100_steps'] != 'measured' else r['decode_100_steps_residues_per_s']:10.2f}"
                  f" residues/s/core at 100 steps, {r['decode_100_steps']} "
                  f"({r['decode_100_steps_residues_per_s'] / geo['decode_residues_per_s']:.2e}x geo)"
                  + (f"; 100 steps took {r['steps_scaling_100_vs_%d' % a.decode_steps]:.1f}x the "
                     f"{a.decode_steps}-step time" if r["decode_100_steps"] == "measured" else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
