#!/usr/bin/env python
"""Stage 05: train the Llama translator (amino acids -> structure tokens) from scratch.

Reads   <tokens>/vocab.json, <tokens>/{train,val}/shard_*.bin + .idx.npz      (stage 04)
Writes  <out>/run_config.json, metrics.jsonl, curves.png, report.json,
        <out>/checkpoints/step_NNNNNN/ (keep-last-N), <out>/final/             (stage 06 reads final/)

Examples:
  # laptop CPU, ~50 chains: about a minute
  python 05_train_lm.py --tokens data/tokens/3di --preset tiny --max-tokens 2048 --epochs 8 --lr 2e-3
  torchrun --nproc-per-node 8 05_train_lm.py --preset tinyllama-1.1b --max-steps 20000
  srun --ntasks-per-node 4 --gpus-per-task 1 python 05_train_lm.py --preset small ...
  python 05_train_lm.py --preset tiny --set num_hidden_layers=6 --set hidden_size=320

Re-running the same command resumes from the newest checkpoint; a finished run does nothing.
Exit status: 0 finished; 124 stopped by SIGTERM/SIGUSR1 (or --stop-after-steps) after saving a
checkpoint, requeue and rerun to resume; 1 error. Details: tokenfold/stop.py.
"""
from __future__ import annotations

import argparse
import sys

from tokenfold import layout
from tokenfold.cli import die, setup_logging
from tokenfold.model import PRESETS, parse_overrides
from tokenfold.stop import EXIT_REQUEUE
from tokenfold.train import train
from tokenfold.train_config import TrainConfig, default_out


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--tokens", default=str(layout.tokens_dir("3di")),
                    help="token directory of stage 04: vocab.json, train/ and val/ shards (default: %(default)s)")
    io.add_argument("--out", default=None,
                    help=f"run directory (default: {layout.RUNS}/<tokens name>_<preset>, e.g. {layout.RUNS}/3di_tiny)")
    io.add_argument("--overwrite", action="store_true", help="delete the run directory and start over")
    io.add_argument("--resume", nargs="?", const="latest", default="auto", metavar="CKPT",
                    help="default: continue from the newest checkpoint of --out when there is one "
                         "(--overwrite starts over). --resume alone: there must be one. --resume DIR: "
                         "continue from that checkpoint directory")

    m = p.add_argument_group("model")
    m.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="architecture (default: %(default)s)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any LlamaConfig field, value as JSON (repeatable): --set hidden_size=320")
    m.add_argument("--attn", default=d.attn, help="auto (flash_attention_2 on GPU when installed, else sdpa) | "
                   "sdpa | flash_attention_2 | eager (default: %(default)s)")

    b = p.add_argument_group("batches")
    b.add_argument("--batch-layout", default=d.batch_layout, choices=["auto", "padded", "packed"],
                   help="padded = length-bucketed rows (SDPA), packed = one varlen row (flash-attn); "
                        "auto follows --attn (default: %(default)s)")
    b.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="tokens per micro-batch per rank, padding included (default: %(default)s)")
    b.add_argument("--max-len", type=int, default=d.max_len, help="truncate longer examples (default: %(default)s)")
    b.add_argument("--bucket-window", type=int, default=d.bucket_window,
                   help="examples length-sorted together (default: %(default)s)")
    b.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per rank per step")
    b.add_argument("--struct-input-noise", type=float, default=d.struct_input_noise, metavar="P",
                   help="replace each structure token fed to the model by a random one with probability P "
                        "(labels stay true; trades teacher-forced for free-running accuracy, see tokenfold/data.py; "
                        "default: %(default)s)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs epochs)")
    o.add_argument("--epochs", type=float, default=None, help="epochs when --max-steps is not given (default 1)")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR / peak LR (default: %(default)s)")
    o.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 5%% of the steps)")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--beta1", type=float, default=d.beta1)
    o.add_argument("--beta2", type=float, default=d.beta2)
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (default: %(default)s)")
    o.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on GPU, fp32 on CPU")
    o.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    o.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes)")
    o.add_argument("--seed", type=int, default=d.seed)

    r = p.add_argument_group("evaluation, checkpoints, logs")
    r.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps (0: only at the end)")
    r.add_argument("--eval-max-examples", type=int, default=d.eval_max_examples,
                   help="fixed seeded subset of val examples (default: %(default)s)")
    r.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only at the end)")
    r.add_argument("--keep-last", type=int, default=d.keep_last, help="step checkpoints kept (default: %(default)s)")
    r.add_argument("--log-every", type=int, default=d.log_every, help="metrics line every N steps")
    r.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")
    r.add_argument("--wandb-project", default=d.wandb_project)
    r.add_argument("--stop-after-steps", type=int, default=None,
                   help=f"save and exit with status {EXIT_REQUEUE} after N steps of this session (time slicing, tests)")

    s = p.add_argument_group("machine")
    s.add_argument("--device", default=d.device, help="auto (cuda:LOCAL_RANK if a GPU is visible, else cpu) | cpu | cuda")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    s.add_argument("-v", "--verbose", action="store_true")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        tokens=a.tokens, out=a.out or str(default_out(a.tokens, a.preset)), preset=a.preset,
        model_overrides=parse_overrides(a.overrides), attn=a.attn, batch_layout=a.batch_layout,
        max_tokens=a.max_tokens, max_len=a.max_len, bucket_window=a.bucket_window, grad_accum=a.grad_accum,
        struct_input_noise=a.struct_input_noise,
        max_steps=a.max_steps, epochs=a.epochs, lr=a.lr, min_lr_ratio=a.min_lr_ratio,
        warmup_steps=a.warmup_steps, weight_decay=a.weight_decay, beta1=a.beta1, beta2=a.beta2,
        grad_clip=a.grad_clip, precision=a.precision, grad_checkpointing=a.grad_checkpointing,
        compile=a.compile, seed=a.seed, eval_every=a.eval_every, eval_max_examples=a.eval_max_examples,
        save_every=a.save_every, keep_last=a.keep_last, log_every=a.log_every, resume=a.resume,
        overwrite=a.overwrite, wandb=a.wandb, wandb_project=a.wandb_project, threads=a.threads,
        device=a.device, stop_after_steps=a.stop_after_steps)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = config_from_args(args)
        return train(cfg).exit_code
    except (ValueError, FileNotFoundError, ImportError) as e:
        die(str(e))


if __name__ == "__main__":
    sys.exit(main())
