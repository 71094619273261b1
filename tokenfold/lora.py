"""LoRA fine-tuning of a pretrained LLM (stage 05 ``--init-from PATH --lora-rank R``), with peft.

- LoRA adapters of rank R (``--lora-alpha``, default 2R; ``--lora-dropout``) on the linear layers
  named by ``--lora-targets`` (default q/k/v/o and gate/up/down, the "Structure Search" recipe);
- the input-embedding and output-head rows of our added tokens (tokenfold/hf_vocab.py) are trainable:
  peft's ``trainable_token_indices`` keeps a small [new tokens, d] matrix per layer and writes it over
  those rows in forward, so every other row stays bit-identical. A tied head (Qwen) is one matrix;
- everything else is frozen. In bf16 runs the frozen weights are held in bf16 (`base_dtype`), the
  trainable ones in fp32.

A LoRA checkpoint holds the trainable tensors only: peft's ``adapter_model.safetensors`` +
``adapter_config.json`` (or, with ``--fsdp``, the sharded checkpoint of tokenfold/fsdp.py). `merge`
folds them into the weights (peft ``merge_and_unload``): the run's final/ and
``python -m tokenfold.export`` are plain transformers checkpoints.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .vocab import Vocab

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def lora_config(model, vocab: Vocab, rank: int, alpha: float | None, dropout: float, targets: str):
    """peft `LoraConfig` of the settings, with our tokens' rows trainable."""
    from peft import LoraConfig

    names = [t.strip() for t in targets.split(",") if t.strip()]
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(names) - linear)
    if missing:
        raise ValueError(f"--lora-targets {missing} match no linear layer of {type(model).__name__}; it has "
                         f"{sorted(linear)}")
    rows = list(range(vocab.id_offset, vocab.size))
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tokens = {_module_name(model, emb): rows}
    if head is not None and head.weight is not emb.weight:
        tokens[_module_name(model, head)] = rows
    return LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else 2 * rank), lora_dropout=dropout,
                      target_modules=names, trainable_token_indices=tokens, task_type="CAUSAL_LM")


def apply(model, vocab: Vocab, rank: int, alpha: float | None, dropout: float, targets: str):
    """`model` wrapped by peft: adapters + trainable new-token rows, all else frozen."""
    from peft import get_peft_model

    if not vocab.id_offset:
        raise ValueError("--lora-rank adapts a pretrained model: give --init-from too")
    return get_peft_model(model, lora_config(model, vocab, rank, alpha, dropout, targets))


def describe(model) -> str:
    """One line: what the adapters train."""
    c = next(iter(model.peft_config.values()))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    rows = len(next(iter(c.trainable_token_indices.values())))
    return (f"LoRA r={c.r} alpha={c.lora_alpha} dropout={c.lora_dropout} on {','.join(sorted(c.target_modules))} "
            f"+ {rows} new-token rows: {n_train:,} of {n_all:,} parameters trainable")


def base_dtype(train_dtype: torch.dtype) -> torch.dtype:
    """The dtype the frozen weights are held in: the compute dtype of bf16 runs, else fp32."""
    return torch.bfloat16 if train_dtype == torch.bfloat16 else torch.float32


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_adapter(model, directory: str | os.PathLike) -> None:
    """The trainable tensors and the LoRA settings (peft's files). The resized embeddings are not
    saved: their rows of our tokens are in the adapter, the others are the LLM's own."""
    model.save_pretrained(directory, save_embedding_layers=False)


def load_adapter(model, directory: str | os.PathLike) -> None:
    """Load `save_adapter`'s tensors into a peft model built with the same settings (strictly)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS} (not a LoRA checkpoint)")
    result = set_peft_model_state_dict(model, load_file(path))
    if result.unexpected_keys:
        raise ValueError(f"{path}: tensors {result.unexpected_keys[:3]} do not belong to this model's adapter")


def merge(model):
    """A plain transformers model with the adapters and new-token rows folded into its weights."""
    return model.merge_and_unload() if is_peft(model) else model
