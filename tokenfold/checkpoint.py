"""Checkpoints of the translator: the contract with stage 06 and with `--resume`.

A checkpoint is a directory (where a run keeps them: data/README.md, section stage 05)::

    config.json, generation_config.json, model.safetensors    `save_pretrained` (fp32 weights):
                                        transformers.AutoModelForCausalLM.from_pretrained(dir) loads it
    vocab.json                          the vocabulary (tokenfold.vocab.Vocab.load(dir)); with --init-from
                                        its "id_offset" places our tokens inside the LLM's (hf_vocab.py)
    tokenizer.json, tokenizer_config.json   --init-from only: the LLM's tokenizer with our tokens added
    trainer_state.pt                    optimizer, LR scheduler, RNG states of every rank, data
                                        position, step, tokens seen: tensors and plain Python types
                                        only, read with torch.load(weights_only=True)
    checkpoint.json                     step, tokens, val metrics at save time, run name (readable);
                                        "weights" (below), the run's settings ("train_config")

How the weights are stored ("weights" in checkpoint.json, `weights_kind`):

    hf        model.safetensors as above: every run without --lora-rank / --fsdp, and every final/
    adapter   --lora-rank: peft's adapter_model.safetensors + adapter_config.json (tokenfold/lora.py)
              and config.json of the whole model; no model.safetensors
    sharded   --fsdp: sharded/ (torch.distributed.checkpoint: model + optimizer state, each rank's
              shards; tokenfold/fsdp.py); trainer_state.pt then holds no optimizer

An adapter or sharded checkpoint becomes a plain (hf) one with ``python -m tokenfold.export``; the
final/ of such a run is made that way.

A checkpoint is written to a hidden temp directory and renamed into place, so a ``step_*`` directory
that exists is complete. ``final/`` is replaced the same way. `prune` keeps the newest N.

Stage 06 loads with `load_for_inference(dir, device=...) -> (model, vocab)`.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .artifacts import read_json, write_json_atomic
from .vocab import Vocab

log = logging.getLogger("tokenfold.checkpoint")

STEP_RE = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.pt"
INFO = "checkpoint.json"
WEIGHTS_KINDS = ("hf", "adapter", "sharded")


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished temp directory onto `target` (an existing target is swapped out, then removed)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save(target: str | os.PathLike, model, vocab: Vocab, trainer_state: dict, info: dict, *, tokenizer=None,
         sharded=None, dist=None) -> Path:
    """Write one checkpoint directory atomically; every rank calls it (`dist`: tokenfold.distributed.Dist,
    None for one process). The main rank writes the files: `model` with its save_pretrained (a peft
    model: its adapter, tokenfold/lora.py; with `sharded`: its config only), `tokenizer` if any.
    `sharded(directory)` runs on every rank (FSDP: each writes its shards). info["weights"] names the kind."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    main = dist is None or dist.is_main
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(dist)
    if sharded is not None:
        from .fsdp import SHARDED

        sharded(tmp / SHARDED)
        _barrier(dist)
    if main:
        from .lora import is_peft, save_adapter

        base = model.get_base_model() if is_peft(model) else model
        if sharded is not None:
            base.config.save_pretrained(tmp)
            base.generation_config.save_pretrained(tmp)
        elif is_peft(model):
            save_adapter(model, tmp)
            base.config.save_pretrained(tmp)
            base.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        vocab.save(tmp / "vocab.json")
        torch.save(trainer_state, tmp / TRAINER_STATE)
        write_json_atomic(tmp / INFO, info)
        replace_dir(tmp, target)
    _barrier(dist)
    return target


def _barrier(dist) -> None:
    if dist is not None:
        dist.barrier()


def weights_kind(ckpt: str | os.PathLike) -> str:
    """How a checkpoint holds its weights (module docstring); checkpoints from before the field: hf."""
    info = Path(ckpt) / INFO
    return read_json(info).get("weights", "hf") if info.exists() else "hf"


def publish(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make `target` (e.g. ``final/``) a copy of a checkpoint directory, atomically. Files are hard
    links where the file system allows (a checkpoint's files are never modified in place, and pruning
    the step directory leaves the links intact): no second copy of a 1B model and its optimizer."""
    src, target = Path(src), Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        shutil.copytree(src, tmp, copy_function=os.link)
    except OSError:  # no hard links here (another file system, or not supported): copy
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
    replace_dir(tmp, target)
    return target


def prune(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints (0 or less keeps everything)."""
    if keep_last <= 0:
        return []
    removed = []
    for _, p in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def load_trainer_state(ckpt: str | os.PathLike) -> dict:
    return torch.load(Path(ckpt) / TRAINER_STATE, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """This process's RNG states as tensors / plain types (so weights_only loading accepts them).
    numpy's uint32 key is stored as int64: a uint32 tensor does not survive pickling (which
    all_gather_object uses to collect every rank's state) under torch 2.13."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                    int(np_state[2]), int(np_state[3]), float(np_state[4])),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- loading
def from_pretrained(path: str | os.PathLike, dtype=torch.float32, attn_implementation: str | None = None):
    """`AutoModelForCausalLM.from_pretrained` in `dtype`, with `attn_implementation` when given."""
    from transformers import AutoModelForCausalLM

    kw = {}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (-> its ``final/``, else its newest checkpoint)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / "final" / "config.json").exists():
        return path / "final"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise FileNotFoundError(f"{path}: neither a checkpoint (config.json) nor a run directory with one")


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "auto", dtype="auto",
                       attn_implementation: str | None = None):
    """(model in eval mode on `device`, Vocab) from a checkpoint or run directory (stage 06's entry point).

    device, dtype: `tokenfold.device` (auto: the GPU in bf16, else the CPU in fp32). attn_implementation: default SDPA (flash-attn when
    installed and on a GPU, unless the checkpoint's `Recipe` needs a 4-D attention mask; see `tokenfold.model.pick_attention`).
    """
    from transformers import AutoConfig

    from .device import pick_device, pick_dtype
    from .model import pick_attention
    from .recipe import Recipe

    path = resolve(path)
    kind = weights_kind(path)
    if kind != "hf":
        raise ValueError(f"{path} is a training checkpoint with {kind} weights, not a plain model: make one with "
                         f"python -m tokenfold.export --checkpoint {path} --out DIR (a finished run's final/ is one)")
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    if attn_implementation is None:
        attn_implementation = pick_attention(device, recipe=Recipe.of(AutoConfig.from_pretrained(path)))
    vocab = Vocab.load(path / "vocab.json")
    model = from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation).to(device).eval()
    if model.config.vocab_size < vocab.size:
        raise ValueError(f"{path}: model has {model.config.vocab_size} output tokens, vocabulary {vocab.size}")
    return model, vocab
