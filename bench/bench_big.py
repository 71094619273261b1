#!/usr/bin/env python
"""The big-model paths of stage 05 on one GPU: tokens/s and peak memory of FSDP2 and LoRA against plain
full fine-tuning (what DDP runs on each rank), same model, data and device, one run.

    plain       --init-from, every weight trained: fp32 master weights, bf16 autocast (the reference)
    fsdp        + --fsdp (FSDP2 on one rank: its bf16 mixed-precision policy and hooks, no sharding gain)
    lora        + --lora-rank 64 (q/k/v/o/gate/up/down + the new tokens' rows; frozen weights in bf16)
    lora_fsdp   + --lora-rank 64 --fsdp (the 8B recipe's path)

Every variant starts from the same RANDOMLY INITIALISED LLM of a preset's shape (default llama3.2-1b
with Llama 3's 128,256 embedding rows: 1.24B parameters), written once as a local Hugging Face
directory (tokenfold/random_llm.py; speed and memory do not depend on the weights), and runs stage
05's own Trainer: memory plan, model build, wrappers, --steps training steps (no checkpoints). Per
variant: useful tokens/s (median over the steps after --warmup), peak GPU memory
(torch.cuda.max_memory_allocated) next to the memory plan's total, and both as ratios to `plain`.

    python bench/bench_big.py --preset llama3.2-1b --steps 12 --json big.json
    python bench/bench_big.py --cpu-smoke        # tiny shapes on CPU: the machinery, not the speed

Data: the ~1,100 real chains of ../shared/data/foldseek_db (or --tokens DIR), as in bench/bench_train.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_train import source_examples, write_subset  # noqa: E402
from tokenfold import distributed, memory_plan  # noqa: E402
from tokenfold.random_llm import write_random_llm  # noqa: E402
from tokenfold.stop import StopFlag  # noqa: E402
from tokenfold.train import Trainer  # noqa: E402
from tokenfold.train_config import TrainConfig  # noqa: E402

VARIANTS = {"plain": {}, "fsdp": {"fsdp": True}, "lora": {"lora_rank": 64},
            "lora_fsdp": {"lora_rank": 64, "fsdp": True}}


def run_variant(tokens: Path, llm: Path, out: Path, kw: dict, steps: int, warmup: int, max_tokens: int,
                grad_ckpt: bool, device: str) -> dict:
    cfg = TrainConfig(tokens=str(tokens), out=str(out), init_from=str(llm), max_steps=steps + warmup + 1,
                      max_tokens=max_tokens, eval_every=0, save_every=0, log_every=1, grad_checkpointing=grad_ckpt,
                      device=device, eval_max_examples=1, **kw)
    dist = distributed.init(cfg.device, group_of_one=cfg.fsdp)
    cuda = dist.device.type == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dist.device)
        t = Trainer(cfg, dist, StopFlag())
        t.plan = memory_plan.check(cfg, t.model_cfg, t.vocab, 1, t.dtype, memory_plan.gpu_capacity(cfg, t.device),
                                   cfg.max_len)
        t.build(None)
        rates = []
        for i in range(steps + warmup):
            if cuda:
                torch.cuda.synchronize(dist.device)
            t0 = time.perf_counter()
            r = t.train_step()
            if cuda:
                torch.cuda.synchronize(dist.device)
            if i >= warmup:
                rates.append(r["n_tokens"] / (time.perf_counter() - t0))
        peak = torch.cuda.max_memory_allocated(dist.device) / memory_plan.GiB if cuda else None
        res = {"tokens_per_s": statistics.median(rates), "peak_gib": peak,
               "plan_gib": t.plan.total / memory_plan.GiB, "plan_terms_gib": {k: v / memory_plan.GiB for k, v in
                                                                             t.plan.terms.items()},
               "trainable": t.plan.shape.n_trainable, "params": t.plan.shape.n_params, "precision": t.precision,
               "attn": t.attn, "layout": t.layout}
        del t
        return res
    finally:
        dist.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3.2-1b", help="llama preset of the random LLM (default: %(default)s)")
    p.add_argument("--rows", type=int, default=128256, help="its embedding rows (default: Llama 3's %(default)s)")
    p.add_argument("--tokens", help="stage 04 token directory (default: ../shared chains)")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the machinery only")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    device = "cpu" if a.cpu_smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu":
        a.preset, a.rows, a.max_tokens, a.steps, a.warmup, a.examples = None, None, 2048, 3, 1, 64
        torch.set_num_threads(1)
    vocab, examples = source_examples(a.tokens)
    with tempfile.TemporaryDirectory(prefix="bench_big_") as tmp:
        tmp = Path(tmp)
        tokens = write_subset(tmp / "tokens", vocab, [e for e in examples if len(e[1]) <= a.max_tokens],
                              a.examples, 0)
        llm = write_random_llm(tmp / "llm_RANDOM", "llama", 0, a.preset, a.rows)
        out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "preset": a.preset or "tiny",
               "rows": a.rows, "max_tokens": a.max_tokens, "grad_checkpointing": a.grad_checkpointing,
               "reference": "plain", "variants": {}}
        for name in a.variants.split(","):
            res = run_variant(tokens, llm, tmp / name, VARIANTS[name], a.steps, a.warmup, a.max_tokens,
                              a.grad_checkpointing, device)
            out["variants"][name] = res
            print(name, json.dumps(res), flush=True)
        ref = out["variants"].get("plain")
        if ref:
            for res in out["variants"].values():
                res["speed_vs_plain"] = res["tokens_per_s"] / ref["tokens_per_s"]
                if ref["peak_gib"]:
                    res["peak_memory_vs_plain"] = res["peak_gib"] / ref["peak_gib"]
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
