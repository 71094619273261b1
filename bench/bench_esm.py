#!/usr/bin/env python
"""Stage 02 throughput (residues/s) against fair-esm's own extraction recipe, same FASTA, same model file.

Reference: the loop of fair-esm's ``scripts/extract.py`` (not shipped on PyPI), rebuilt from fair-esm's
public API: ``FastaBatchedDataset.from_file``, ``get_batch_indices(toks_per_batch=4096,
extra_toks_per_seq=1)``, a DataLoader with ``alphabet.get_batch_converter(1022)`` and 2 workers,
``model(toks, repr_layers=[layer])`` under ``torch.no_grad()``, one ``torch.save`` file per sequence
with the per-token representation (``--include per_tok``), fp32 (extract.py has no autocast).
Ours: ``tokenfold.extract.run_extract`` (stage 02 without its finalize/report step) on a protein DB holding
the same sequences, default settings for the device, writing the sharded float16 HDF5.

Weights: real ESM-2 weights cannot be downloaded here, so both sides load the SAME randomly initialised
checkpoint with a real ESM-2 shape (t6 = esm2_t6_8M_UR50D: 6 layers, 320 dims; t12 = esm2_t12_35M_UR50D:
12 layers, 480 dims), written in fair-esm's file format. Speed does not depend on the weight values.
fair-esm's own loader cannot open any ESM-2 file under torch >= 2.6 (weights_only), so the reference
gets its model from our weights_only-safe loader; the loop itself is fair-esm's.

Sequences: the real chains of ../shared/data/foldseek_db/shared_aa.fasta (else the embedded default
dataset), up to --max-residues residues, each at most 1022 long so both sides do identical work
(extract.py would truncate longer ones). One run of each, in the same process, on this machine;
wall time and CPU seconds are printed (a busy shared machine inflates wall time).

    python bench/bench_esm.py                         # t6 and t12 shapes, 20000 residues, CPU
    python bench/bench_esm.py --shapes t6 --max-residues 5000
    python bench/bench_esm.py --device cuda --max-residues 500000        (GPU numbers)
    python bench/bench_esm.py --shapes t33 --fasta seqs.fasta --json esm.json   (bench/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tokenfold.artifacts import write_json_atomic  # noqa: E402
from tokenfold.db import ProteinRecord, write_shard  # noqa: E402
from tokenfold.device import pick_device  # noqa: E402
from tokenfold.esm_checkpoint import ESM2_MODELS, ensure_random_checkpoint, load_esm  # noqa: E402
from tokenfold.esm_embed import WINDOW  # noqa: E402
from tokenfold.extract import ExtractConfig, run_extract  # noqa: E402
from tokenfold.fasta import read_fasta  # noqa: E402

SHAPES = {"t6": "esm2_t6_8M_UR50D", "t12": "esm2_t12_35M_UR50D", "t30": "esm2_t30_150M_UR50D",
          "t33": "esm2_t33_650M_UR50D"}
SHARED_FASTA = ROOT.parent / "shared" / "data" / "foldseek_db" / "shared_aa.fasta"


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def load_sequences(max_residues: int, fasta: str | None = None) -> tuple[list[tuple[str, str]], str]:
    """(id, sequence) of real chains, <= 1022 residues each, up to max_residues in total, from `fasta`, else
    ../shared's Foldseek dump, else the embedded default dataset."""
    pairs, source = [], ""
    if fasta or SHARED_FASTA.exists():
        source = str(fasta or SHARED_FASTA)
        pairs = read_fasta(source)
    else:
        from tokenfold.db_plan import embedded_default_inputs
        from tokenfold.structure import parse_structure_file

        source = "embedded default dataset (MDAnalysisTests)"
        for f in embedded_default_inputs():
            try:
                for ch in parse_structure_file(f).chains:
                    pairs.append((f"{Path(f).name}_{ch.name}", ch.aa))
            except Exception:
                continue
    out, seen, total = [], set(), 0
    for name, seq in pairs:
        if not 0 < len(seq) <= WINDOW or seq in seen:
            continue
        seen.add(seq)
        out.append((f"s{len(out):05d}_{name}".replace("/", "_"), seq))
        total += len(seq)
        if total >= max_residues:
            break
    return out, source


def reference_extract(ckpt: Path, fasta: Path, out_dir: Path, layer: int, device: str) -> dict:
    """fair-esm scripts/extract.py's loop (--toks_per_batch 4096 --include per_tok --repr_layers layer)."""
    from esm import FastaBatchedDataset

    t0, c0 = time.perf_counter(), _cpu()
    model, alphabet, _ = load_esm(ckpt, allow_random=True)   # fair-esm's loader fails under torch >= 2.6
    model.eval()
    if device == "cuda":
        model = model.cuda()
    dataset = FastaBatchedDataset.from_file(fasta)
    batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(1022),
                                         batch_sampler=batches, num_workers=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_res = 0
    with torch.no_grad():
        for labels, strs, toks in loader:
            if device == "cuda":
                toks = toks.to(device="cuda", non_blocking=True)
            out = model(toks, repr_layers=[layer], return_contacts=False)
            reps = {k: v.to(device="cpu") for k, v in out["representations"].items()}
            for i, label in enumerate(labels):
                n = min(1022, len(strs[i]))
                torch.save({"label": label, "representations": {k: v[i, 1:n + 1].clone() for k, v in reps.items()}},
                           out_dir / f"{label}.pt")
                n_res += n
    return {"residues": n_res, "wall": time.perf_counter() - t0, "cpu": _cpu() - c0}


def ours_extract(ckpt: Path, seqs: list[tuple[str, str]], work: Path, device: str, toks_per_batch: int | None) -> dict:
    """Stage 02 (run_extract: load, embed, write the HDF5 shard) on a one-shard DB of the same sequences."""
    db = work / "db"
    write_shard(db / "shards" / "shard_00000.h5", [ProteinRecord(id=n, aa=s, source="fasta") for n, s in seqs])
    write_json_atomic(db / "manifest.json", {"format": "tokenfold-db",
                                            "shards": [{"file": "shards/shard_00000.h5", "n_entries": len(seqs)}]})
    np.save(db / "split.npy", np.zeros(len(seqs), np.uint8))
    cfg = ExtractConfig(db=db, out=work / "emb", model=str(ckpt), random_weights_for_testing=True, device=device,
                        toks_per_batch=toks_per_batch)
    t0, c0 = time.perf_counter(), _cpu()
    run_extract(cfg)
    return {"residues": sum(len(s) for _, s in seqs), "wall": time.perf_counter() - t0, "cpu": _cpu() - c0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["t6", "t12"], choices=list(SHAPES))
    ap.add_argument("--max-residues", type=int, default=20000)
    ap.add_argument("--fasta", default=None, help="sequences (default: ../shared's Foldseek dump, else the embedded "
                                                  "default dataset)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--device", default="auto", help="auto (a GPU when visible, else the CPU), cpu, cuda")
    ap.add_argument("--toks-per-batch", type=int, default=None, help="ours (default: stage 02's default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    args.device = pick_device(args.device).type    # the reference loop knows "cuda" or "cpu"
    seqs, source = load_sequences(args.max_residues, args.fasta)
    n_res = sum(len(s) for _, s in seqs)
    lens = np.array([len(s) for _, s in seqs])
    print(f"sequences: {len(seqs)} real chains, {n_res} residues (length median {int(np.median(lens))}, "
          f"max {lens.max()}) from {source}")
    print(f"device: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="bench_esm_"))
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res = {"device": dev, "n_sequences": len(seqs), "n_residues": n_res, "source": source, "shapes": {}}
    try:
        fasta = work / "seqs.fasta"
        fasta.write_text("".join(f">{n}\n{s}\n" for n, s in seqs))
        for shape in args.shapes:
            name = SHAPES[shape]
            ckpt = ensure_random_checkpoint(name, seed=0, models_dir=work / "models")
            layer = ESM2_MODELS[name][0]
            ref = reference_extract(ckpt, fasta, work / f"ref_{shape}", layer, args.device)
            ours = ours_extract(ckpt, seqs, work / f"ours_{shape}", args.device, args.toks_per_batch)
            assert ref["residues"] == ours["residues"] == n_res
            r_ref, r_ours = n_res / ref["wall"], n_res / ours["wall"]
            print(f"{name} (RANDOM weights, real shape), layer {layer}:")
            print(f"  reference fair-esm extract.py loop : {r_ref:9.0f} residues/s  (wall {ref['wall']:.1f} s, "
                  f"CPU {ref['cpu']:.1f} s)")
            print(f"  ours (stage 02 run_extract)        : {r_ours:9.0f} residues/s  (wall {ours['wall']:.1f} s, "
                  f"CPU {ours['cpu']:.1f} s)")
            print(f"  ratio ours/reference: {r_ours / r_ref:.2f}x wall, "
                  f"{(n_res / ours['cpu']) / (n_res / ref['cpu']):.2f}x per CPU second  (target >= 2x)")
            res["shapes"][shape] = {"model": f"{name} (RANDOM weights, real shape)", "layer": layer,
                                    "reference_extract_py": {"residues_per_s": r_ref, **ref},
                                    "ours": {"residues_per_s": r_ours, **ours}, "speedup": r_ours / r_ref}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
