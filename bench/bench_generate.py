#!/usr/bin/env python
"""Stage 06 benchmark: proteins/s of batched constrained generation against one-by-one HF generate().

Same model, same proteins, same device, one run:

    reference = `tokenfold.generate_reference.reference_generate`: transformers' own ``model.generate()`` called
                once per protein (greedy, KV cache, the layout enforced by a LogitsProcessor)
    ours      = `tokenfold.generate.generate`: length-grouped batches (left padding + position ids in
                the plain layout, the amino acids fed between generated tokens in the interleaved
                one), one KV cache per batch

Both are greedy, so their outputs must be identical; the script checks and prints the match rate.
Proteins: real sequences (Foldseek's FASTA dump in ../shared/data/foldseek_db, else the embedded
default chains), a seeded sample within --min-length..--max-length.
Model: a checkpoint (--checkpoint), else a RANDOMLY INITIALISED model of --preset (speed does not
depend on the weights; the output says so).

    .venv/bin/python bench/bench_generate.py [--n 64] [--preset tiny] [--device auto] [--interleaved]

Target: >= 10x on a GPU, a clear win on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenfold.device import pick_device, pick_dtype  # noqa: E402
from tokenfold.generate import default_batch_size, generate  # noqa: E402
from tokenfold.generate_reference import reference_generate  # noqa: E402
from tokenfold.inference import set_cpu_threads  # noqa: E402
from tokenfold.vocab import AA_LETTERS, Vocab  # noqa: E402

SHARED_FASTA = ROOT.parent / "shared" / "data" / "foldseek_db" / "shared_aa.fasta"


def load_sequences(n: int, lo: int, hi: int, seed: int, fasta: str | None = None) -> tuple[list[str], str]:
    """A seeded sample of n real sequences of lo..hi residues: from `fasta`, else ../shared's Foldseek
    dump, else the embedded default dataset."""
    seqs, source = [], ""
    if fasta or SHARED_FASTA.exists():
        from tokenfold.fasta import read_fasta

        source = str(fasta or SHARED_FASTA)
        seqs = [s for _, s in read_fasta(source)]
    else:
        from tokenfold.db_plan import embedded_default_inputs
        from tokenfold.structure import parse_structure_file

        for p in embedded_default_inputs():
            seqs += [c.aa for c in parse_structure_file(p).chains]
        source = "embedded default (MDAnalysisTests)"
    ok = sorted({s for s in seqs if lo <= len(s) <= hi and set(s) <= set(AA_LETTERS)})
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ok), size=min(n, len(ok)), replace=False)
    return [ok[i] for i in pick], source


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="stage-05 checkpoint (default: random --preset model)")
    p.add_argument("--preset", default="tiny", help="model preset for the random model (default tiny)")
    p.add_argument("--kind", default="3di", choices=["3di", "geo"], help="vocabulary of the random model")
    p.add_argument("--interleaved", action="store_true", help="interleaved layout (random model only)")
    p.add_argument("--n", type=int, default=64, help="proteins (default 64)")
    p.add_argument("--fasta", default=None, help="sequences (default: ../shared's Foldseek dump, else the embedded "
                                                 "default dataset)")
    p.add_argument("--min-length", type=int, default=50)
    p.add_argument("--max-length", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on GPU, 16 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both sides (default: as stage 06, `inference.set_cpu_threads`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    if a.checkpoint:
        from tokenfold.checkpoint import load_for_inference

        model, vocab = load_for_inference(a.checkpoint, device=device, dtype=dtype)
        what = f"checkpoint {a.checkpoint}"
    else:
        from tokenfold.model import build_config, build_model, pick_attention

        vocab = (Vocab.for_kind("3di", interleaved=a.interleaved) if a.kind == "3di"
                 else Vocab.for_kind("geo", n_struct=514, interleaved=a.interleaved))
        model = build_model(build_config(a.preset, vocab), pick_attention(device), seed=a.seed).to(device, dtype).eval()
        what = f"RANDOMLY INITIALISED '{a.preset}' preset (speed only)"
    set_cpu_threads(model, a.threads)
    seqs, source = load_sequences(a.n, a.min_length, a.max_length, a.seed, a.fasta)
    n_res = sum(len(s) for s in seqs)
    print(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {vocab.kind} "
          f"{'interleaved' if vocab.interleaved else 'plain'}; device {device} ({dtype}); torch threads "
          f"{torch.get_num_threads()}\nproteins: {len(seqs)} from {source}, lengths {min(map(len, seqs))}-"
          f"{max(map(len, seqs))}, {n_res} residues")

    # warm-up (allocator, kernels), not timed
    generate(model, vocab, seqs[:2], batch_size=2)
    reference_generate(model, vocab, seqs[0][:20])

    sync(device)
    t = time.perf_counter()
    a.batch_size = a.batch_size or default_batch_size(device)
    ours = generate(model, vocab, seqs, batch_size=a.batch_size)
    sync(device)
    t_ours = time.perf_counter() - t

    t = time.perf_counter()
    ref = [vocab.decode(reference_generate(model, vocab, s))[1] for s in seqs]
    sync(device)
    t_ref = time.perf_counter() - t

    match = float(np.mean([np.array_equal(o.codes, r) for o, r in zip(ours, ref)]))
    tok_match = float(np.mean(np.concatenate([o.codes == r for o, r in zip(ours, ref)])))
    res = {"device": str(device), "dtype": str(dtype), "model": what, "n_proteins": len(seqs), "n_residues": n_res,
           "batch_size": a.batch_size, "threads": torch.get_num_threads(),
           "reference_hf_generate_one_by_one": {"seconds": t_ref, "proteins_per_s": len(seqs) / t_ref,
                                               "residues_per_s": n_res / t_ref},
           "batched_constrained": {"seconds": t_ours, "proteins_per_s": len(seqs) / t_ours,
                                   "residues_per_s": n_res / t_ours},
           "speedup": t_ref / t_ours, "identical_outputs": match, "identical_tokens": tok_match}
    print(f"reference, HF generate() one by one : {len(seqs) / t_ref:8.2f} proteins/s  ({t_ref:.1f} s)")
    print(f"batched constrained generation     : {len(seqs) / t_ours:8.2f} proteins/s  ({t_ours:.1f} s, "
          f"batches of {a.batch_size})")
    print(f"speedup: {t_ref / t_ours:.1f}x   identical greedy outputs: {match:.0%} of proteins, {tok_match:.2%} of tokens")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
