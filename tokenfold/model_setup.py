"""The model a stage-05 run trains, in each of its variants, and the module its training step calls.

    --preset NAME             a LlamaForCausalLM from random weights, our vocabulary (tokenfold/model.py)
    --init-from PATH          a pretrained LLM with our tokens added to it (tokenfold/hf_vocab.py)
    --lora-rank R             + peft LoRA adapters and trainable new-token rows, the rest frozen (lora.py)

`starting_model` builds it as a run starts it; a resumed run and an export rebuild the same model and
load a checkpoint's state into it. `wrap` puts it inside `tokenfold.loss.LossModel` (its forward is
the loss), then into FSDP2 (``--fsdp``, tokenfold/fsdp.py) or DDP (several ranks), then torch.compile.
`checkpoint_kind` says how the run's checkpoints hold the weights (tokenfold/checkpoint.py).
"""
from __future__ import annotations

import logging

import torch

from . import hf_vocab, lora
from .model import build_config, build_model
from .recipe import Recipe
from .vocab import Vocab

log = logging.getLogger("tokenfold.model_setup")


def check_settings(cfg) -> None:
    """Combinations of the big-model options that cannot work, refused in one line."""
    if cfg.lora_rank and not cfg.init_from:
        raise ValueError("--lora-rank adapts a pretrained model: give --init-from PATH too")
    if cfg.lora_rank < 0:
        raise ValueError("--lora-rank must be >= 0")
    if cfg.init_from and cfg.model_overrides:
        raise ValueError("--set changes a --preset architecture; with --init-from the architecture is the LLM's own")


def checkpoint_kind(cfg) -> str:
    """hf (full weights, save_pretrained), adapter (LoRA, peft files) or sharded (FSDP, DCP)."""
    return "sharded" if cfg.fsdp else "adapter" if cfg.lora_rank else "hf"


def weights_dtype(cfg, train_dtype: torch.dtype) -> torch.dtype:
    """fp32 master weights, except the frozen weights of a LoRA run (`lora.base_dtype`)."""
    return lora.base_dtype(train_dtype) if cfg.lora_rank else torch.float32


def model_config(cfg, vocab: Vocab, max_len: int):
    """The transformers config of the model trained: the preset's, or the LLM's with room for our tokens;
    with the run's `Recipe` (tokenfold/recipe.py) stored in it."""
    recipe = Recipe(prefix_lm=cfg.prefix_lm, aligned_positions=cfg.aligned_positions, aa_window=cfg.aa_window)
    if not cfg.init_from:
        mc = build_config(cfg.preset, vocab, cfg.model_overrides, min_positions=max_len)
        recipe.store(mc)
        return mc
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(cfg.init_from)
    mc.vocab_size = max(int(mc.vocab_size), vocab.size)
    positions = getattr(mc, "max_position_embeddings", None)
    if positions is not None and positions < max_len:
        raise ValueError(f"{cfg.init_from} has {positions} positions, fewer than the longest example ({max_len} "
                         f"tokens): re-tokenize with 04_tokenize.py --max-length {vocab.max_residues(positions)}")
    recipe.store(mc)
    return mc


def starting_model(cfg, model_cfg, vocab: Vocab, attn: str, train_dtype: torch.dtype):
    """The model as training starts it (on the CPU): random preset weights, or the LLM with our tokens
    (embeddings resized, new rows at the mean), then LoRA when asked for."""
    from .checkpoint import from_pretrained

    if not cfg.init_from:
        return build_model(model_cfg, attn, seed=cfg.seed)
    model = from_pretrained(cfg.init_from, dtype=weights_dtype(cfg, train_dtype), attn_implementation=attn)
    if hf_vocab.is_random_test_model(model.config):
        log.warning("%s is a RANDOMLY INITIALISED test model (tokenfold/random_llm.py): for tests only",
                    cfg.init_from)
    Recipe.of(model_cfg).store(model.config)
    hf_vocab.fit_embeddings(model, vocab)
    if cfg.lora_rank:
        model = lora.apply(model, vocab, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        log.info("%s", lora.describe(model))
    return model


def wrap(model, cfg, dist, train_dtype: torch.dtype):
    """(LossModel on the device, what the step calls: FSDP2- or DDP-wrapped, maybe compiled)."""
    from .loss import LossModel

    loss_model = LossModel(model, cfg.loss_chunk)
    if cfg.grad_checkpointing:
        loss_model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = loss_model
    if cfg.fsdp:
        from . import fsdp

        fsdp.shard(loss_model, dist.device, dist.world_size, train_dtype)
    else:
        loss_model.to(dist.device)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(loss_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        module = torch.compile(module, dynamic=True)
    return loss_model, module
