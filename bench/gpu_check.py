#!/usr/bin/env python
"""One GPU check of stages 05, 02 and 06: measure, print one JSON, exit. Run it through bench/gpu_check.sh.

It runs the existing benches, each in its own process under a time limit, and merges their JSONs:

  stage 05  bench/bench_train.py, the tinyllama-1.1b shape in bf16: useful tokens/s, MFU (model FLOPs/s,
            `tokenfold.model.flops_per_token`, over the GPU's dense bf16 peak: 989 TFLOP/s for an H100
            SXM/H200, or --peak-tflops) and peak memory of our recipe, next to HF Llama padded to 1024.
            Packed varlen rows with FlashAttention-2 when `flash_attn` imports, else SDPA with
            length-bucketed padded rows: the JSON says which (target: MFU >= 40 % on an H100/H200).
  stage 02  bench/bench_esm.py: residues/s of stage 02 against fair-esm's extract.py loop, both with the
            same RANDOMLY INITIALISED esm2_t33_650M-shaped checkpoint (speed does not depend on weights).
  stage 06  bench/bench_generate.py: proteins/s of batched constrained generation against one-by-one HF
            generate(), a RANDOMLY INITIALISED model of the tinyllama-1.1b shape, greedy, outputs compared
            (target: >= 10x).

Without a GPU, or with --cpu-smoke, the same benches run with tiny shapes (the tiny preset, ESM-2 t6) in
well under a minute: that checks the machinery (tests/test_gpu_check.py), not the speed of anything.

Chains: real ones. --data DIR holds Foldseek's dumps shared_aa.fasta + shared_3di.fasta (default
../shared/data/foldseek_db); without them the CPU smoke run parses the embedded default dataset (3Di by
mini3di), and a GPU run stops with one line (copy the two files and pass --data: bench/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DB = ROOT.parent / "shared" / "data" / "foldseek_db"

# (bench script, its arguments, seconds it may take at most) per mode; the GPU sizes fit the 8-minute budget
# (estimates, not measured: no GPU was lent when this was written)
PLANS = {
    "gpu": {
        # 2 rounds x 9 micro-batches of 16,384 tokens per recipe: 27 of the ~30 an epoch of ../shared's chains makes
        "stage05_train": ("bench_train.py", ["--preset", "tinyllama-1.1b", "--max-tokens", "16384", "--steps", "9",
                                             "--rounds", "2"], 170),
        "stage02_esm": ("bench_esm.py", ["--shapes", "t33", "--max-residues", "100000"], 140),
        "stage06_generate": ("bench_generate.py", ["--preset", "tinyllama-1.1b", "--n", "24", "--min-length", "50",
                                                   "--max-length", "300"], 130),
    },
    "cpu-smoke": {
        "stage05_train": ("bench_train.py", ["--preset", "tiny", "--set", "num_hidden_layers=2", "--examples", "24",
                                             "--max-tokens", "1024", "--steps", "1", "--rounds", "1", "--threads", "1"],
                          120),
        "stage02_esm": ("bench_esm.py", ["--shapes", "t6", "--max-residues", "800", "--threads", "1"], 120),
        "stage06_generate": ("bench_generate.py", ["--preset", "tiny", "--n", "4", "--min-length", "30",
                                                   "--max-length", "60", "--threads", "1"], 120),
    },
}
TARGETS = {"stage05_mfu": 0.40, "stage06_speedup": 10.0}


def load_chains(data: Path | None, allow_embedded: bool) -> tuple[list[tuple[str, str, str]], str]:
    """[(id, amino acids, 3Di)] of real chains: Foldseek's FASTA dumps in `data`, else the embedded default."""
    from tokenfold.fasta import read_fasta

    data = data or SHARED_DB
    aa_f, ss_f = data / "shared_aa.fasta", data / "shared_3di.fasta"
    if aa_f.exists() and ss_f.exists():
        aa, ss = dict(read_fasta(aa_f)), dict(read_fasta(ss_f))
        return [(k, aa[k], ss[k]) for k in sorted(aa) if k in ss and len(aa[k]) == len(ss[k])], str(data)
    if not allow_embedded:
        raise SystemExit(f"error: {aa_f} and {ss_f} are needed (Foldseek's dumps of real chains); pass --data DIR")
    from tokenfold.db_plan import embedded_default_inputs
    from tokenfold.structure import parse_structure_file
    from tokenfold.threedi import encode_3di

    chains = []
    for f in embedded_default_inputs():
        for ch in parse_structure_file(f).chains:
            chains.append((f"{Path(f).name.split('.')[0]}_{ch.name}", ch.aa, encode_3di(ch)))
    return chains, "embedded default dataset (MDAnalysisTests, 3Di by mini3di)"


def write_inputs(chains, work: Path) -> tuple[Path, Path]:
    """The benches' inputs: a stage-04 token directory (train split) and a FASTA of the same chains."""
    from tokenfold.shards import TokenShardWriter
    from tokenfold.vocab import Vocab

    vocab = Vocab.for_kind("3di")
    tok = work / "tokens"
    vocab.save(tok / "vocab.json")
    w = TokenShardWriter(tok, "train", 0)
    for i, (name, aa, ss) in enumerate(chains):
        w.add(vocab.encode(aa, vocab.threedi_codes(ss)), name, i, len(aa))
    w.close()
    fasta = work / "chains.fasta"
    fasta.write_text("".join(f">{name}\n{aa}\n" for name, aa, _ in chains))
    return tok, fasta


def run_bench(script: str, args: list[str], limit: float, log: Path) -> tuple[dict | None, str | None, float]:
    """(its JSON, None) or (None, why it failed); a bench past its limit is killed with its process group."""
    out = log.with_suffix(".json")
    cmd = [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)]
    t0 = time.time()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = p.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None, f"killed after its {limit:.0f} s limit", time.time() - t0
    if rc != 0 or not out.exists():
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        return None, f"exit {rc}: {tail}", time.time() - t0
    return json.loads(out.read_text()), None, time.time() - t0


def summarize(name: str, r: dict, gpu: bool) -> dict:
    """The numbers the issue asks for, from one bench's JSON (the whole JSON stays under `raw`). Targets
    are judged on a GPU only (`meets_target` is None in a CPU smoke run)."""
    if name == "stage05_train":
        o = r["ours"]
        s = {"shape": r["preset"], "precision": r["precision"], "attention": r["attn"], "batch_layout": r["layout"],
             "tokens_per_s": o["useful_tokens_per_s"], "mfu": o["mfu"], "model_tflops_per_s": o["model_tflops_per_s"],
             "peak_mem_gib": o["peak_mem_gib"], "peak_tflops_assumed": r["peak_flops"] and r["peak_flops"] / 1e12,
             "reference": "HF Llama, every example padded to 1024",
             "reference_tokens_per_s": r["reference"]["useful_tokens_per_s"], "speedup": r["speedup"],
             "target_mfu": TARGETS["stage05_mfu"]}
        s["meets_target"] = o["mfu"] >= TARGETS["stage05_mfu"] if gpu and o["mfu"] is not None else None
    elif name == "stage02_esm":
        shape, v = next(iter(r["shapes"].items()))
        s = {"shape": v["model"], "residues": r["n_residues"], "residues_per_s": v["ours"]["residues_per_s"],
             "reference": "fair-esm extract.py loop", "reference_residues_per_s":
             v["reference_extract_py"]["residues_per_s"], "speedup": v["speedup"]}
    else:
        s = {"model": r["model"], "dtype": r["dtype"], "proteins": r["n_proteins"], "batch_size": r["batch_size"],
             "proteins_per_s": r["batched_constrained"]["proteins_per_s"], "reference": "HF generate() one by one",
             "reference_proteins_per_s": r["reference_hf_generate_one_by_one"]["proteins_per_s"],
             "speedup": r["speedup"], "identical_outputs": r["identical_outputs"],
             "target_speedup": TARGETS["stage06_speedup"]}
        s["meets_target"] = r["speedup"] >= TARGETS["stage06_speedup"] if gpu else None
    return {**s, "raw": r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (automatic without a GPU)")
    p.add_argument("--data", type=Path, default=None, help=f"shared_aa.fasta + shared_3di.fasta (default {SHARED_DB})")
    p.add_argument("--budget", type=float, default=450, help="seconds for all benches together (default %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: from its name: H100 SXM/H200 989)")
    p.add_argument("--only", nargs="+", choices=list(PLANS["gpu"]), default=list(PLANS["gpu"]), help="these benches")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--logs", type=Path, default=None, help="keep each bench's log here (default: a temporary dir)")
    p.add_argument("--setup-note", default="", help="what bench/gpu_check.sh installed (reported as `setup`)")
    a = p.parse_args(argv)
    t_start = time.time()
    import torch

    gpu = torch.cuda.is_available() and not a.cpu_smoke
    mode = "gpu" if gpu else "cpu-smoke"
    try:
        import flash_attn  # noqa: F401
        flash = f"installed ({flash_attn.__version__})"
    except Exception as e:  # noqa: BLE001 - any failure to import means SDPA
        flash = f"not usable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); SDPA used"
    res = {"mode": mode, "device": torch.cuda.get_device_name() if gpu else "cpu",
           "torch": torch.__version__, "flash_attn": flash, "setup": a.setup_note}
    res["transformers"] = importlib.metadata.version("transformers")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        logs = a.logs or work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        chains, source = load_chains(a.data, allow_embedded=not gpu)
        tok, fasta = write_inputs(chains, work)
        res["chains"] = {"n": len(chains), "residues": sum(len(c[1]) for c in chains), "source": source}
        extra = {"stage05_train": ["--tokens", str(tok)] + (["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops
                                                            else []),
                 "stage02_esm": ["--fasta", str(fasta)], "stage06_generate": ["--fasta", str(fasta)]}
        device = ["--device", "cuda" if gpu else "cpu"]
        errors = {}
        for name in a.only:
            script, args, limit = PLANS[mode][name]
            left = a.budget - (time.time() - t_start)
            if left < 20:
                errors[name] = f"not run: {left:.0f} s of the {a.budget:.0f} s budget left"
                continue
            r, err, secs = run_bench(script, args + extra[name] + device, min(limit, left), logs / f"{name}.log")
            print(f"[gpu_check] {name}: {'ok' if r else err} ({secs:.0f} s)", file=sys.stderr, flush=True)
            if r is None:
                errors[name] = err
            else:
                res[name] = {**summarize(name, r, gpu), "seconds": round(secs, 1)}
    res["errors"] = errors
    res["wall_s"] = round(time.time() - t_start, 1)
    text = json.dumps(res, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text, flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
