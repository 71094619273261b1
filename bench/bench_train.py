#!/usr/bin/env python
"""Training throughput of stage 05 against the reference recipe, same model, data and device, one run.

    ours       tokenfold: token shards -> TrainStream (length-bucketed rows under a token budget for
               SDPA, one packed varlen row for flash-attn) -> masked loss over structure tokens + <eos>
    reference  the original TokenFold recipe: HF LlamaForCausalLM, every example padded to 1024 tokens,
               a fixed number of examples per batch, loss from `labels`

Both train the same randomly initialised model (same preset, same seed) with AdamW + gradient
clipping on the same device, on the same examples: each round, ours trains on the next `--steps`
micro-batches of its plan over the whole data set, and the reference trains on exactly the
examples those micro-batches hold. The figure of merit is *useful* tokens per second: real
(non-padding) tokens divided by the wall time (forward, backward, optimizer step, and each
recipe's batch assembly). The recipes alternate round by round so that a slow spell of a shared
machine hits both; CPU (process) time is reported too, as a check that is blind to other
processes on the machine. Target: >= 3x.

On a GPU it also reports peak memory (torch.cuda.max_memory_allocated) and model FLOPs utilisation
of our recipe: FLOPs per token of the shape (tokenfold.model.flops_per_token: 6N + attention, PaLM
convention) x useful tokens/s / the device's peak dense bf16 FLOP/s (table below or --peak-tflops).
E.g. ``python bench/bench_train.py --device cuda --preset tinyllama-1.1b --examples 2048``.

Data: a seeded subset of --examples examples of --tokens DIR (a stage 04 token directory, train
split), else of the ~1,100 real chains of ../shared/data/foldseek_db (Foldseek's amino-acid and 3Di
dumps), written to a temporary token directory in the stage 04 format that our recipe reads as in
training. Examples longer than 1024 tokens are truncated in both recipes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenfold.data import collate, pick_layout  # noqa: E402
from tokenfold.device import autocast, dtype_name, pick_device  # noqa: E402
from tokenfold.fasta import read_fasta  # noqa: E402
from tokenfold.loss import token_stats  # noqa: E402
from tokenfold.model import build_config, build_model, flops_per_token, pick_attention  # noqa: E402
from tokenfold.optim import make_optimizer, train_dtype  # noqa: E402
from tokenfold.shards import TokenDataset, TokenShardWriter  # noqa: E402
from tokenfold.train_config import TrainConfig  # noqa: E402
from tokenfold.train_stream import TrainStream  # noqa: E402
from tokenfold.vocab import IGNORE_INDEX, PAD, Vocab  # noqa: E402

REF_LEN = 1024
# dense bf16 peak FLOP/s (no sparsity), from the vendors' data sheets
PEAK_BF16 = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
             "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def source_examples(tokens: str | None) -> tuple[Vocab, list[tuple[str, np.ndarray]]]:
    """(vocab, [(id, token ids)]) from a stage 04 token directory, else from ../shared's Foldseek dumps."""
    if tokens:
        ds = TokenDataset(tokens, "train")
        return Vocab.load(Path(tokens) / "vocab.json"), [(str(ds.ids[i]), ds[i]) for i in range(len(ds))]
    db = ROOT.parent / "shared" / "data" / "foldseek_db"
    if not db.exists():
        raise SystemExit(f"error: no --tokens given and {db} is absent")

    aa, ss = dict(read_fasta(db / "shared_aa.fasta")), dict(read_fasta(db / "shared_3di.fasta"))
    vocab = Vocab.for_kind("3di")
    names = sorted(k for k in aa if k in ss and len(aa[k]) == len(ss[k]))
    return vocab, [(k, vocab.encode(aa[k], vocab.threedi_codes(ss[k]))) for k in names]


def write_subset(tmp: Path, vocab: Vocab, examples, n: int, seed: int) -> Path:
    """A seeded subset of n examples as a token directory in the stage 04 format (what training reads)."""
    if n < len(examples):
        keep = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
        examples = [examples[i] for i in keep]
    vocab.save(tmp / "vocab.json")
    w = TokenShardWriter(tmp, "train", 0)
    for i, (name, ids) in enumerate(examples):
        w.add(ids, name, i, 0)
    w.close()
    return tmp


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_BF16[key]
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", help="stage 04 token directory (its train split); default: ../shared chains")
    p.add_argument("--examples", type=int, default=None, help="a seeded subset of the examples (default: all)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--attn", default="auto")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="our micro-batch budget (default: 4096 on CPU, 16384 on GPU)")
    p.add_argument("--ref-batch", type=int, default=None,
                   help="reference examples per batch (default: max-tokens / 1024, the same positions per batch)")
    p.add_argument("--steps", type=int, default=None, help="our micro-batches per round (default: 12 CPU, 40 GPU)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each recipe (default: %(default)s)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from the table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)

    from tokenfold.model import parse_overrides

    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    gpu = device.type == "cuda"
    max_tokens = a.max_tokens or (16384 if gpu else 4096)
    n_steps = a.steps or (40 if gpu else 12)
    attn = pick_attention(device, a.attn)
    layout = pick_layout(attn)
    amp = train_dtype("auto", device)

    def clock():
        sync(device)
        return time.time(), time.process_time()

    with tempfile.TemporaryDirectory() as tmp:
        vocab, examples = source_examples(a.tokens)
        tok = write_subset(Path(tmp), vocab, examples, a.examples or len(examples), a.seed)
        ds = TokenDataset(tok, "train")
        cfg = build_config(a.preset, vocab, parse_overrides(a.overrides))
        tcfg = TrainConfig(lr=3e-4)
        stream = TrainStream(ds, vocab, max_tokens=max_tokens, max_len=REF_LEN, layout=layout, seed=a.seed)
        plan = stream.plan(0)
        if len(plan) < (a.rounds + 1) * n_steps:
            raise SystemExit(f"error: {len(plan)} micro-batches in an epoch, fewer than (rounds+1) x steps")
        ref_b = a.ref_batch or max(1, max_tokens // REF_LEN)

        def fresh():
            m = build_model(cfg, attn, seed=a.seed).to(device).train()
            if a.grad_checkpointing:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return m, make_optimizer(m, tcfg, device)

        def ours(model, opt, batches):
            """Our recipe over micro-batches of our plan (collation included in the time)."""
            real = pos = 0
            t0, c0 = clock()
            for bi in batches:
                b = collate([stream.example(i) for i in bi], vocab, layout)
                with autocast(device, amp):
                    logits = model(**b.model_inputs(device), use_cache=False).logits
                loss_sum, _ = token_stats(logits, b.labels, vocab.eos)
                (loss_sum / max(b.n_loss, 1)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step(); opt.zero_grad(set_to_none=True)
                real += b.n_tokens; pos += b.n_positions
            t1, c1 = clock()
            return {"seconds": t1 - t0, "cpu_seconds": c1 - c0, "useful_tokens": real, "positions": pos}

        def reference(model, opt, batches):
            """The reference recipe over exactly the same examples: shuffled, padded to 1024, HF loss."""
            order = np.random.default_rng(a.seed).permutation(np.concatenate(batches))
            real = pos = 0
            t0, c0 = clock()
            for k in range(0, len(order), ref_b):
                bi = order[k: k + ref_b]
                ids = np.full((len(bi), REF_LEN), PAD, dtype=np.int64)
                lab = np.full((len(bi), REF_LEN), IGNORE_INDEX, dtype=np.int64)
                mask = np.zeros((len(bi), REF_LEN), dtype=np.int64)
                for r, i in enumerate(bi):
                    e = stream.example(i).astype(np.int64)          # truncated at 1024, as ours
                    ids[r, : len(e)], lab[r, : len(e)], mask[r, : len(e)] = e, vocab.labels(e), 1
                with autocast(device, amp):
                    out = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                                labels=torch.from_numpy(lab).to(device), use_cache=False)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step(); opt.zero_grad(set_to_none=True)
                real += int(mask.sum()); pos += ids.size
            t1, c1 = clock()
            return {"seconds": t1 - t0, "cpu_seconds": c1 - c0, "useful_tokens": real, "positions": pos}

        recipes = {"ours": ours, "reference": reference}
        state = {}
        for name, fn in recipes.items():                   # warm-up: allocator, kernels, first calls
            model, opt = fresh()
            fn(model, opt, plan[:1])
            state[name] = {"model": model, "opt": opt, "runs": [], "peak_mem": None}
        for r in range(a.rounds):
            batches = plan[(r + 1) * n_steps: (r + 2) * n_steps]   # the same examples for both recipes
            for name, fn in recipes.items():
                st = state[name]
                if gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                run = fn(st["model"], st["opt"], batches)
                st["runs"].append(run)
                if gpu:
                    st["peak_mem"] = max(st["peak_mem"] or 0, torch.cuda.max_memory_allocated(device))
                print(f"round {r + 1} {name:9s} {run['useful_tokens'] / run['seconds']:10.0f} useful tok/s "
                      f"({run['seconds']:.1f} s wall, {run['cpu_seconds']:.1f} s CPU, padding "
                      f"{1 - run['useful_tokens'] / run['positions']:.1%})", flush=True)

    used = np.concatenate(plan[n_steps: (a.rounds + 1) * n_steps])
    lens = stream.lengths[used].astype(np.float64)
    attn_len = float((lens ** 2).sum() / lens.sum())
    out = {"device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)",
           "preset": a.preset, "overrides": a.overrides, "attn": attn, "layout": layout,
           "precision": dtype_name(amp), "examples_in_dataset": int(len(ds)),
           "examples_measured": int(len(used)), "max_tokens": max_tokens, "ref_batch": ref_b,
           "steps_per_round": n_steps, "rounds": a.rounds}
    for name, st in state.items():
        secs = sum(r["seconds"] for r in st["runs"])
        cpu = sum(r["cpu_seconds"] for r in st["runs"])
        toks = sum(r["useful_tokens"] for r in st["runs"])
        pos = sum(r["positions"] for r in st["runs"])
        out[name] = {"useful_tokens_per_s": toks / secs, "useful_tokens_per_cpu_s": toks / cpu,
                     "positions_per_s": pos / secs, "padding": 1 - toks / pos, "seconds": secs,
                     "peak_mem_gib": st["peak_mem"] / 2**30 if st["peak_mem"] else None}
    out["speedup"] = out["ours"]["useful_tokens_per_s"] / out["reference"]["useful_tokens_per_s"]
    out["speedup_cpu_time"] = out["ours"]["useful_tokens_per_cpu_s"] / out["reference"]["useful_tokens_per_cpu_s"]
    fpt = flops_per_token(cfg, attn_len)
    out["model_flops_per_token"] = fpt
    peak = peak_flops(device, a.peak_tflops)
    out["peak_flops"] = peak
    for name in ("ours", "reference"):
        out[name]["model_tflops_per_s"] = fpt * out[name]["useful_tokens_per_s"] / 1e12
        out[name]["mfu"] = fpt * out[name]["useful_tokens_per_s"] / peak if peak else None
    print(f"\n{out['device']}, preset {a.preset}, {attn}/{layout}, {out['precision']}, "
          f"{len(used)} real chains measured per recipe ({len(ds)} in the plan)")
    for name in ("ours", "reference"):
        o = out[name]
        extra = f", MFU {o['mfu']:.1%}" if o["mfu"] is not None else ""
        extra += f", peak memory {o['peak_mem_gib']:.1f} GiB" if o["peak_mem_gib"] else ""
        print(f"  {name:9s} {o['useful_tokens_per_s']:10.0f} useful tok/s ({o['useful_tokens_per_cpu_s']:.0f} per CPU-s), "
              f"padding {o['padding']:.1%}, {o['model_tflops_per_s']:.3f} model TFLOP/s{extra}")
    print(f"  speedup, useful tokens/s, ours / reference: {out['speedup']:.2f}x wall clock, "
          f"{out['speedup_cpu_time']:.2f}x CPU time  (target >= 3x)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
