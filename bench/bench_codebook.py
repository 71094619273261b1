#!/usr/bin/env python
"""Stage 03 k-means fit time versus the number of training residues, against scikit-learn's defaults.

Reference: ``sklearn.cluster.MiniBatchKMeans(n_clusters=K, random_state=0)`` with its default settings
(batch_size 1024, n_init "auto" = one k-means++ start, threads as found). Ours: `tokenfold.codebook_fit.fit_codebook` as stage 03 calls
it (batch_size 4096, n_init 3, max_iter 100, BLAS single-threaded during the fit because the k-means++
initialisation makes thousands of tiny BLAS calls that spin-wait for cores on a busy node).
Both fit the same vectors in the same run; printed: seconds, the ratio, and the mean squared distance
to the nearest centroid on held-out vectors (lower is better) so speed is not bought with quality.

Vectors: with --embeddings, real stage-02 vectors (a full or sampled store; --db for full stores),
otherwise a synthetic mixture of 2*K Gaussian clusters in D dimensions (stated in the output): real
ESM-2 vectors at these sizes cannot be made here without the weights.

    python bench/bench_codebook.py                                  # K=512, D=320, N = 5k..50k
    python bench/bench_codebook.py --sizes 20000 100000 --dim 1280
    python bench/bench_codebook.py --embeddings data/embeddings/<model>_L<layer> --db data/db
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tokenfold.codebook import Codebook  # noqa: E402
from tokenfold.codebook_fit import fit_codebook  # noqa: E402


def synthetic(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(2 * k, dim)).astype(np.float32)
    which = rng.integers(0, 2 * k, n)
    return centers[which] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--dim", type=int, default=320, help="synthetic vectors only (esm2_t6: 320, t33: 1280)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    ap.add_argument("--embeddings", type=Path, default=None)
    ap.add_argument("--db", type=Path, default=None)
    ap.add_argument("--no-reference", action="store_true", help="time ours only")
    args = ap.parse_args()
    from sklearn.cluster import MiniBatchKMeans

    n_max = max(args.sizes)
    if args.embeddings:
        from tokenfold.db import ProteinDB
        from tokenfold.embedding_store import EmbeddingStore

        store = EmbeddingStore(args.embeddings)
        db = ProteinDB(args.db) if store.mode == "full" else None
        pool = store.residues(db, "train", None, 0)["emb"]
        held = store.residues(db, "val", None, 0)["emb"]
        src = f"real stage-02 vectors {args.embeddings} (random_weights={store.random_weights})"
        if len(held) == 0:
            held = pool[-len(pool) // 10:]
            pool = pool[:-len(pool) // 10]
    else:
        pool = synthetic(n_max + 10000, args.dim, args.k)
        held, pool = pool[-10000:], pool[:-10000]
        src = f"SYNTHETIC mixture of {2 * args.k} Gaussians in {args.dim} dims"
    print(f"vectors: {src}; K={args.k}, D={pool.shape[1]}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'N':>8} {'ours s':>8} {'sklearn-default s':>18} {'ratio':>6} {'ours MSE':>9} {'ref MSE':>9}")
    for n in args.sizes:
        if n > len(pool):
            print(f"{n:>8} skipped: only {len(pool)} vectors")
            continue
        x = pool[:n]
        t = time.perf_counter()
        cb = fit_codebook(x, k=args.k, seed=0)
        t_ours = time.perf_counter() - t
        mse_ours = float(np.nanmean(cb.assign(held, return_sqdist=True)[1]))
        if args.no_reference:
            print(f"{n:>8} {t_ours:8.1f} {'-':>18} {'-':>6} {mse_ours:9.3f} {'-':>9}")
            continue
        t = time.perf_counter()
        km = MiniBatchKMeans(n_clusters=args.k, random_state=0).fit(x)
        t_ref = time.perf_counter() - t
        mse_ref = float(np.nanmean(Codebook(km.cluster_centers_).assign(held, return_sqdist=True)[1]))
        print(f"{n:>8} {t_ours:8.1f} {t_ref:18.1f} {t_ref / t_ours:5.1f}x {mse_ours:9.3f} {mse_ref:9.3f}",
              flush=True)
    print("ratio = reference seconds / ours (higher is better for ours)")


if __name__ == "__main__":
    main()
