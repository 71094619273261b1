"""The optimisation recipe of stage 05: AdamW without weight decay on norms and biases, a linear warmup
then cosine decay of the learning rate to ``min_lr_ratio * lr``, and the autocast precision the
update runs in (bf16 on GPUs that have it, else fp32; never fp16, which would need a gradient
scaler). Gradient clipping and accumulation are done by the training loop (tokenfold/train.py).
"""
from __future__ import annotations

import logging
import math

import torch

from .device import pick_dtype
from .train_config import TrainConfig

log = logging.getLogger("tokenfold.optim")


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Multiplier of the peak LR at a step: linear warmup, then cosine to `min_ratio`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused kernels on GPUs; FSDP2's sharded (DTensor) parameters take the foreach implementation
    kw = {"fused": True} if device.type == "cuda" and not cfg.fsdp else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kw)


def make_scheduler(optimizer, total_steps: int, warmup: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, min_ratio))


def train_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`tokenfold.device.pick_dtype` for training: ``auto`` on a GPU without bfloat16 (where pick_dtype
    gives float16) trains in float32, because fp16 autocast without a gradient scaler under- and
    overflows; an explicit fp16 is refused."""
    dtype = pick_dtype(precision, device)
    if dtype != torch.float16:
        return dtype
    if precision == "auto":
        log.warning("%s has no bfloat16: training in fp32 (fp16 would need a gradient scaler)", device)
        return torch.float32
    raise ValueError(f"precision {precision!r}: fp16 training is not supported (no gradient scaler); use bf16 or fp32")
