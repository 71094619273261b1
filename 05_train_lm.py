#!/usr/bin/env python
"""Stage 05: train the Llama translator (amino acids -> structure tokens), from scratch or from a
pretrained LLM (--init-from; LoRA with --lora-rank), with DDP or FSDP2 (--fsdp).

Reads   <tokens>/vocab.json, <tokens>/{train,val}/shard_*.bin + .idx.npz      (stage 04)
        --init-from PATH: a Hugging Face model directory with its tokenizer (or a hub name in the HF cache)
Writes  <out>/run_config.json, metrics.jsonl, curves.png, report.json,
        <out>/checkpoints/step_NNNNNN/ (keep-last-N), <out>/final/             (stage 06 reads final/)
        (what each file holds: data/README.md, section stage 05; LoRA/FSDP checkpoints become plain
        ones with python -m tokenfold.export, final/ always is one)
The memory plan per GPU is printed first; a plan that cannot fit is refused with the change that fits.

Examples:
  # laptop CPU, ~50 chains: about a minute
  python 05_train_lm.py --tokens data/tokens/3di --preset tiny --max-tokens 2048 --epochs 8 --lr 2e-3
  torchrun --nproc-per-node 8 05_train_lm.py --preset tinyllama-1.1b --max-steps 20000
  srun --ntasks-per-node 4 --gpus-per-task 1 python 05_train_lm.py --preset small ...
  python 05_train_lm.py --preset tiny --set num_hidden_layers=6 --set hidden_size=320
  # Llama 3.1 8B + LoRA (r=64, alpha=128) on 8 GPUs, FSDP2 (slurm/config/llama31_8b_lora.env)
  torchrun --nproc-per-node 8 05_train_lm.py --init-from /weights/Llama-3.1-8B --lora-rank 64 --lora-alpha 128 \
      --fsdp --grad-checkpointing --max-tokens 16384 --lr 2e-4

Re-running the same command resumes from the newest checkpoint; a finished run does nothing.
Exit status: 0 finished; 124 stopped by SIGTERM/SIGUSR1 (or --stop-after-steps) after saving a
checkpoint, requeue and rerun to resume; 1 error. Details: tokenfold/stop.py.
"""
from __future__ import annotations

import argparse
import sys

from tokenfold.cli import add_options, die, options_from_args, setup_logging
from tokenfold.model import parse_overrides
from tokenfold.train import train
from tokenfold.train_config import IO, MACHINE, MODEL, TrainConfig, default_out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the few flags that are not a plain field go into the groups add_options made
    groups = add_options(p, TrainConfig, defaults={"out": None})
    groups[IO].add_argument("--resume", nargs="?", const="latest", default="auto", metavar="CKPT",
                            help="default: continue from the newest checkpoint of --out when there is one "
                                 "(--overwrite starts over). --resume alone: there must be one. --resume DIR: "
                                 "continue from that checkpoint directory")
    groups[MODEL].add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                               help="override any LlamaConfig field, value as JSON (repeatable): --set hidden_size=320")
    groups[MACHINE].add_argument("-v", "--verbose", action="store_true", help="debug log lines")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    return options_from_args(TrainConfig, a, out=a.out or str(default_out(a.tokens, a.preset, a.init_from)),
                             model_overrides=parse_overrides(a.overrides))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return train(config_from_args(args)).exit_code
    except (ValueError, FileNotFoundError, ImportError) as e:
        die(str(e))


if __name__ == "__main__":
    sys.exit(main())
