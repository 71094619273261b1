"""GPU memory per rank of a stage-05 run, printed before training; a plan that cannot fit is refused
with the one change that would make it fit.

    python -m tokenfold.memory_plan --init-from /models/Llama-3.1-8B --world-size 8 --fsdp --lora-rank 64 \\
        --grad-checkpointing --max-tokens 16384 --gpu-memory-gb 80
    (every flag of 05_train_lm.py, plus --world-size; --init-from needs only the LLM's config.json, and its
    tokenizer files when present)

Parameter counts are exact: the model is built on PyTorch's meta device from its config (no memory,
no weights), LoRA applied, tensors counted. Bytes per GPU are estimated (`estimate`), with

    N parameters, T trainable (all; or LoRA adapters + new-token rows), F = N - T frozen; W ranks;
    s = W with --fsdp, else 1; p = bytes of the compute dtype (2 bf16, 4 fp32); L layers, d hidden size,
    k key/value width, f FFN width, V vocabulary rows, B = --max-tokens (per micro-batch and rank)

    weights      full training 4N/s (fp32 master weights); LoRA p*F/s (frozen, in the compute dtype) + 4T/s
                 FSDP: + p*(N_root + 2*N_layer), the unsharded root (embeddings, head) and two layers
                 DDP/one GPU, bf16, full training: + 2N, autocast's bf16 copies of the fp32 weights
    gradients    4T/s, + 4T for DDP's all-reduce buckets
    optimizer    8T/s (AdamW: two fp32 moments)
    activations  B*L*a; with --grad-checkpointing B*(L*r*d + a) (layer inputs kept, one layer recomputed)
                 a = p*(6d + 2k + 4f) + 16d per token and layer: norm outputs, q, k, v, attention output,
                 gate/up/activation/down inputs, RMSNorm's fp32 internals (Korthikanti et al. 2022, written
                 out for Llama's layer with SDPA/FlashAttention, no [T, T] scores kept); LoRA adds
                 r_lora*p per adapted layer, and with dropout (p + 1) per input feature of each
                 r = 4 when the residual stream is fp32 (fp32 weights under autocast), else p
    logits       min(B, chunk)*V*(8 + p): one chunk of LM-head logits, its fp32 copy and gradient (loss.py)
    overhead     2 GiB: CUDA context, NCCL buffers, allocator fragmentation

It is an estimate for choosing a strategy, not a measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys

import torch

log = logging.getLogger("tokenfold.memory_plan")

GiB = float(1 << 30)
OVERHEAD = 2 * (1 << 30)


@dataclasses.dataclass
class Shape:
    """What the estimate needs to know about a model."""

    n_params: int
    n_trainable: int
    n_layer: int          # parameters of the largest decoder layer
    n_root: int           # parameters outside the decoder layers (embeddings, head, final norm)
    layers: int
    hidden: int
    kv: int
    ffn: int
    vocab_rows: int
    lora_inputs: int = 0  # summed input features of the adapted linear layers of one decoder layer
    lora_modules: int = 0  # adapted linear layers per decoder layer


def model_shape(model_cfg, cfg, vocab) -> Shape:
    """Exact parameter counts of the model `cfg` trains (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    from . import lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_cfg)
        base_layers = list(model.get_decoder().layers)
        if cfg.lora_rank:
            model = lora.apply(model, vocab, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in base_layers]
    targets = {t.strip() for t in cfg.lora_targets.split(",")} if cfg.lora_rank else set()
    adapted = [m for name, m in base_layers[0].named_modules() if name.rsplit(".", 1)[-1] in targets
               and hasattr(m, "in_features")]
    c = model_cfg
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Shape(n_params=n, n_trainable=trainable, n_layer=max(per_layer), n_root=n - sum(per_layer),
                 layers=len(base_layers), hidden=c.hidden_size, kv=c.num_key_value_heads * head_dim,
                 ffn=c.intermediate_size, vocab_rows=c.vocab_size,
                 lora_inputs=sum(m.in_features for m in adapted), lora_modules=len(adapted))


def estimate(shape: Shape, cfg, world: int, p: int) -> dict[str, float]:
    """Bytes per GPU, by term (module docstring)."""
    N, T, s = shape.n_params, shape.n_trainable, world if cfg.fsdp else 1
    F = N - T
    lora = bool(cfg.lora_rank)
    weights = (p * F + 4 * T) / s if lora else 4 * N / s
    if cfg.fsdp:
        weights += p * (shape.n_root + 2 * shape.n_layer)
    elif p == 2 and not lora:
        weights += 2 * N
    grads = 4 * T / s + (4 * T if world > 1 and not cfg.fsdp else 0)
    optim = 8 * T / s
    d, k, f = shape.hidden, shape.kv, shape.ffn
    a = p * (6 * d + 2 * k + 4 * f) + 16 * d
    if lora:
        a += shape.lora_modules * cfg.lora_rank * p + (shape.lora_inputs * (p + 1) if cfg.lora_dropout > 0 else 0)
    fp32_residual = p == 2 and not lora and not cfg.fsdp
    r = 4 if (p == 4 or fp32_residual) else p
    B = cfg.max_tokens
    acts = B * (shape.layers * r * d + a) if cfg.grad_checkpointing else B * shape.layers * a
    from .loss import default_chunk

    chunk = cfg.loss_chunk or default_chunk(shape.vocab_rows)
    logits = min(B, chunk) * shape.vocab_rows * (8 + p)
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "logits": logits,
            "overhead": OVERHEAD}


@dataclasses.dataclass
class Plan:
    terms: dict[str, float]
    capacity: float | None
    strategy: str
    shape: Shape

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def lines(self) -> list[str]:
        cap = f"{self.capacity / GiB:.1f} GiB" if self.capacity else "unknown (CPU; --gpu-memory-gb to check)"
        return [f"memory plan per GPU: {self.strategy}; {self.shape.n_params:,} parameters, "
                f"{self.shape.n_trainable:,} trainable",
                "  " + " | ".join(f"{k} {v / GiB:.2f}" for k, v in self.terms.items())
                + f" | total {self.total / GiB:.2f} GiB of {cap}"]


def strategy(cfg, world: int, p: int) -> str:
    parts = ["FSDP2" if cfg.fsdp else "DDP" if world > 1 else "one process"]
    if cfg.lora_rank:
        parts.append(f"LoRA r={cfg.lora_rank}")
    parts.append(f"{world} rank(s), {'bf16' if p == 2 else 'fp32'}, --max-tokens {cfg.max_tokens}")
    parts.append("gradient checkpointing" if cfg.grad_checkpointing else "no gradient checkpointing")
    return ", ".join(parts)


def make_plan(cfg, model_cfg, vocab, world: int, dtype: torch.dtype, capacity: float | None,
              shape: Shape | None = None) -> Plan:
    p = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    shape = shape or model_shape(model_cfg, cfg, vocab)
    return Plan(estimate(shape, cfg, world, p), capacity, strategy(cfg, world, p), shape)


def advice(cfg, model_cfg, vocab, world: int, dtype: torch.dtype, capacity: float, min_tokens: int) -> str:
    """The smallest set of changes whose plan fits, tried in this order: --fsdp, --grad-checkpointing,
    --lora-rank 64 (with --init-from), alone, in pairs, all three; then a lower --max-tokens with them
    all; else how many GPUs it would take."""
    shapes: dict[int, Shape] = {}

    def fits(c, w=world) -> bool:
        if c.lora_rank not in shapes:
            shapes[c.lora_rank] = model_shape(model_cfg, c, vocab)
        return make_plan(c, model_cfg, vocab, w, dtype, capacity, shapes[c.lora_rank]).fits

    changes = []
    if not cfg.fsdp and world > 1:
        changes.append(("--fsdp", dict(fsdp=True)))
    if not cfg.grad_checkpointing:
        changes.append(("--grad-checkpointing", dict(grad_checkpointing=True)))
    if not cfg.lora_rank and cfg.init_from:
        changes.append(("--lora-rank 64", dict(lora_rank=64)))
    for n in range(1, len(changes) + 1):
        for combo in itertools.combinations(changes, n):
            if fits(dataclasses.replace(cfg, **{k: v for _, kw in combo for k, v in kw.items()})):
                return " ".join(flag for flag, _ in combo)
    every = dataclasses.replace(cfg, **{k: v for _, kw in changes for k, v in kw.items()})
    lo, hi = 0, max(cfg.max_tokens // 256, 1)     # plans grow with --max-tokens: bisect over multiples of 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(dataclasses.replace(every, max_tokens=256 * mid)) else (lo, mid - 1)
    if 256 * lo >= min_tokens:
        return " ".join([f for f, _ in changes] + [f"--max-tokens {256 * lo}"])
    more = dataclasses.replace(every, fsdp=True)
    for w in (world * 2 ** i for i in range(1, 8)):
        if fits(more, w):
            return " ".join([f"{w} GPUs with --fsdp"] + [f for f, _ in changes if f != "--fsdp"])
    return "GPUs with more memory"


def gpu_capacity(cfg, device: torch.device) -> float | None:
    """Bytes the plan is checked against: --gpu-memory-gb, else the GPU's, else None (CPU)."""
    if cfg.gpu_memory_gb:
        return cfg.gpu_memory_gb * GiB
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return None


def check(cfg, model_cfg, vocab, world: int, dtype: torch.dtype, capacity: float | None, min_tokens: int) -> Plan:
    """Log the plan; refuse one that does not fit, naming the change that would."""
    plan = make_plan(cfg, model_cfg, vocab, world, dtype, capacity)
    for line in plan.lines():
        log.info("%s", line)
    if not plan.fits:
        fix = advice(cfg, model_cfg, vocab, world, dtype, capacity, min_tokens)
        raise ValueError(f"memory plan: {plan.total / GiB:.1f} GiB per GPU needed, {plan.capacity / GiB:.1f} GiB "
                         f"available ({plan.strategy}); use {fix}")
    return plan


def main(argv=None) -> int:
    from .cli import add_options, die, options_from_args, setup_logging
    from .device import pick_device
    from .hf_vocab import extend_tokenizer, load_tokenizer
    from .model_setup import check_settings, model_config
    from .train_config import TrainConfig, resolve_max_len
    from .vocab import Vocab

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainConfig)
    p.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the run")
    a = p.parse_args(argv)
    setup_logging()
    cfg = options_from_args(TrainConfig, a)
    try:
        check_settings(cfg)
        from pathlib import Path

        vocab = Vocab.load(Path(cfg.tokens) / "vocab.json") if (Path(cfg.tokens) / "vocab.json").exists() else None
        if vocab is None:
            vocab = Vocab.for_kind("3di")
            log.info("no %s/vocab.json: planning with the 3Di vocabulary, and --max-len 2052", cfg.tokens)
            cfg.max_len = cfg.max_len or vocab.example_length(1024)
        else:
            cfg.max_len = resolve_max_len(cfg, vocab)
        if cfg.init_from:
            if (Path(cfg.init_from) / "tokenizer_config.json").exists() or not Path(cfg.init_from).exists():
                vocab = extend_tokenizer(load_tokenizer(cfg.init_from), vocab, cfg.init_from)
            else:   # a config.json alone: our tokens go after its vocab_size
                from transformers import AutoConfig

                vocab = dataclasses.replace(vocab, id_offset=AutoConfig.from_pretrained(cfg.init_from).vocab_size)
        device = pick_device(cfg.device)
        dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16   # a plan for GPUs: auto = bf16
        check(cfg, model_config(cfg, vocab, cfg.max_len), vocab, a.world_size, dtype, gpu_capacity(cfg, device),
              cfg.max_len)
    except (ValueError, FileNotFoundError) as e:
        die(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
