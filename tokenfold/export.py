"""Any stage-05 checkpoint -> a plain transformers checkpoint for inference (stage 06, predict, HF).

    python -m tokenfold.export --checkpoint data/runs/<run>/checkpoints/step_001000 --out data/models/<name>

What it does depends on how the checkpoint holds its weights (tokenfold/checkpoint.py)::

    hf        already plain: copied (hard links where possible)
    adapter   LoRA: the starting model is rebuilt (the --init-from LLM with our tokens added), the
              adapters and new-token rows are loaded and merged into the weights (peft merge_and_unload)
    sharded   FSDP: the starting model is rebuilt and the shards are read into it in this one process
              (no GPU, no process group); with LoRA then merged as above

The output is what `checkpoint.load_for_inference`, stage 06, predict and
``AutoModelForCausalLM``/``AutoTokenizer`` read: config.json, model.safetensors, tokenizer files,
vocab.json, trainer_state.pt and checkpoint.json ("weights": "hf", "exported_from"). A finished
run's final/ is made by the same function. Rebuilding needs the run's --init-from LLM (the path or
hub name it was trained from; ``--base PATH`` when it has moved). Written atomically; an existing
--out is replaced.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .artifacts import read_json, write_json_atomic
from .vocab import Vocab

log = logging.getLogger("tokenfold.export")


def rebuild(src: Path, base: str | None = None):
    """(the model of checkpoint `src` as training started it, its settings, its vocabulary)."""
    from .model_setup import starting_model
    from .train_config import TrainConfig

    info = read_json(src / ckpt.INFO)
    if "train_config" not in info:
        raise ValueError(f"{src}: checkpoint.json does not record the run's settings (train_config)")
    cfg = TrainConfig(**info["train_config"])
    if base:
        cfg.init_from = base
    vocab = Vocab.load(src / "vocab.json")
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(src)
    dtype = getattr(torch, info.get("weights_dtype", "float32"))
    return starting_model(cfg, model_cfg, vocab, "sdpa", dtype), cfg, vocab


def to_plain(src: str | os.PathLike, out: str | os.PathLike, base: str | None = None) -> Path:
    """Write checkpoint `src` as a plain transformers checkpoint at `out` (module docstring)."""
    from . import fsdp, lora
    from .loss import LossModel

    src, out = ckpt.resolve(src), Path(out)
    kind = ckpt.weights_kind(src)
    if kind == "hf":
        return ckpt.publish(src, out)
    if kind not in ckpt.WEIGHTS_KINDS:
        raise ValueError(f"{src}: unknown weights kind {kind!r}")
    model, cfg, vocab = rebuild(src, base)
    if kind == "adapter":
        lora.load_adapter(model, src)
    else:
        fsdp.load_model_state(src / fsdp.SHARDED, LossModel(model), trainable_only=bool(cfg.lora_rank))
    plain = lora.merge(model)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    if (src / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    vocab.save(tmp / "vocab.json")
    shutil.copy2(src / ckpt.TRAINER_STATE, tmp / ckpt.TRAINER_STATE)
    info = read_json(src / ckpt.INFO)
    write_json_atomic(tmp / ckpt.INFO, {**info, "weights": "hf", "exported_from": {"path": str(src), "weights": kind}})
    ckpt.replace_dir(tmp, out)
    log.info("%s (%s weights) -> plain checkpoint %s", src, kind, out)
    return out


def main(argv=None) -> int:
    from .cli import die, setup_logging

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a stage-05 checkpoint directory (or a run directory: its "
                   "final/, else its newest checkpoint)")
    p.add_argument("--out", required=True, help="directory to write the plain checkpoint to")
    p.add_argument("--base", help="the --init-from LLM, when it is no longer where the run found it")
    a = p.parse_args(argv)
    setup_logging()
    try:
        print(to_plain(a.checkpoint, a.out, a.base))
    except (ValueError, FileNotFoundError) as e:
        die(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
