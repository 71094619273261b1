"""Every setting of a stage-05 training run (`TrainConfig`: each field is also the command-line flag of
05_train_lm.py, see `tokenfold.cli.option`), and which of them a resumed run must share with the
checkpointed one.

Resuming compares a fingerprint of the settings (`compat_fingerprint`: everything but the
`RESUME_MUTABLE` ones, with the schedule length and the batch layout as resolved) with the one in
``run_config.json`` (`changed_settings`). A setting the old run does not record (an option added
since) counts as its default, so runs made before an option existed still resume.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import layout
from .artifacts import read_json
from .cli import option
from .model import PRESETS
from .stop import EXIT_REQUEUE

# settings that may change when resuming (everything else must match the checkpointed run)
RESUME_MUTABLE = {"out", "tokens", "resume", "overwrite", "eval_every", "eval_max_examples", "save_every",
                  "keep_last", "log_every", "wandb", "wandb_project", "compile", "grad_checkpointing",
                  "threads", "device", "stop_after_steps", "attn", "grad_accum", "gpu_memory_gb", "loss_chunk",
                  "data_workers"}

IO, MODEL, BATCHES, OPTIM, LOGS, MACHINE = ("inputs and outputs", "model", "batches", "optimisation",
                                            "evaluation, checkpoints, logs", "machine")
BIG = "big models: a pretrained LLM, LoRA, FSDP2 (tokenfold/hf_vocab.py, lora.py, fsdp.py, memory_plan.py)"


@dataclass
class TrainConfig:
    tokens: str = option(str(layout.tokens_dir("3di")),
                         "token directory of stage 04: vocab.json, train/ and val/ shards", group=IO)
    out: str = option(str(layout.RUNS / "3di_tiny"),
                      f"run directory (default: {layout.RUNS}/<tokens name>_<preset>, e.g. {layout.RUNS}/3di_tiny)",
                      group=IO)
    preset: str = option("tiny", "architecture of a model trained from scratch (not used with --init-from)", group=MODEL,
                         choices=sorted(PRESETS))
    model_overrides: dict = option(help="LlamaConfig fields over the preset's", default_factory=dict,
                                   cli=False)   # --set KEY=VALUE in 05_train_lm.py
    attn: str = option("auto", "auto (flash_attention_2 on GPU when installed, else sdpa) | sdpa | "
                       "flash_attention_2 | eager", group=MODEL)
    batch_layout: str = option("auto", "padded = length-bucketed rows (SDPA), packed = one varlen row "
                               "(flash-attn); auto follows --attn", group=BATCHES, choices=["auto", "padded", "packed"])
    max_tokens: int = option(16384, "tokens per micro-batch per rank, padding included", group=BATCHES)
    max_len: int | None = option(
        None, "longest example, in tokens (default: what the token shards may hold, from stage 04's --max-length: "
        "2L+4, or 2L+3 interleaved; 2052 at its default). The model's positions are raised to hold it; a value "
        "shorter than an example of the shards is refused", group=BATCHES)
    bucket_window: int = option(4096, "examples length-sorted together", group=BATCHES)
    struct_input_noise: float = option(
        0.0, "replace each structure token fed to the model (struct2seq: each amino acid it reads back) by a random "
        "one with probability P (labels stay true; trades teacher-forced for free-running accuracy, see "
        "tokenfold/data.py)", group=BATCHES, metavar="P")
    prefix_lm: bool = option(False, "bidirectional attention over <bos> a_1..a_L <sep>, causal from <kind> on over "
                             "the structure tokens (plain layout; stored in the checkpoint, applied by stage 06 and "
                             "predict; tokenfold/recipe.py)", group=MODEL)
    aligned_positions: bool = option(False, "the token that predicts s_i gets a_i's RoPE position (plain layout; "
                                     "stored in the checkpoint; tokenfold/recipe.py)", group=MODEL)
    aa_window: int = option(0, "amino acids attend only to amino acids at most W positions away (a local bias "
                            "for small data; structure tokens still see all; stored in the checkpoint; "
                            "tokenfold/recipe.py). 0: no limit", group=MODEL, metavar="W")
    grad_accum: int = option(1, "micro-batches per rank per step", group=BATCHES)
    max_steps: int | None = option(None, "optimizer steps (default: --epochs epochs)", group=OPTIM)
    epochs: float | None = option(None, "epochs when --max-steps is not given (default 1)", group=OPTIM)
    lr: float = option(3e-4, "peak learning rate", group=OPTIM)
    min_lr_ratio: float = option(0.1, "final LR / peak LR", group=OPTIM)
    warmup_steps: int | None = option(None, "linear warmup steps (default: 5%% of the steps)", group=OPTIM)
    weight_decay: float = option(0.1, "AdamW weight decay (not on norms and biases)", group=OPTIM)
    beta1: float = option(0.9, "AdamW beta1", group=OPTIM)
    beta2: float = option(0.95, "AdamW beta2", group=OPTIM)
    grad_clip: float = option(1.0, "max gradient norm", group=OPTIM)
    precision: str = option("auto", "auto = bf16 autocast on a GPU with bf16 (else fp32), fp32 on CPU",
                            group=OPTIM, choices=["auto", "fp32", "bf16"])
    grad_checkpointing: bool = option(False, "recompute activations in backward", group=OPTIM)
    compile: bool = option(False, "torch.compile the model (dynamic shapes)", group=OPTIM)
    seed: int = option(0, "seed of the initial weights, the batch plan, the input noise and the val subset",
                       group=OPTIM)
    eval_every: int = option(500, "validate every N steps (0: only at the end)", group=LOGS)
    eval_max_examples: int | None = option(1000, "fixed seeded subset of val examples", group=LOGS)
    save_every: int = option(1000, "checkpoint every N steps (0: only at the end)", group=LOGS)
    keep_last: int = option(3, "step checkpoints kept", group=LOGS)
    log_every: int = option(10, "metrics line every N steps", group=LOGS)
    resume: str = option("auto", "auto (newest checkpoint if any) | latest (must exist) | a checkpoint dir",
                         cli=False)   # --resume [CKPT] in 05_train_lm.py
    overwrite: bool = option(False, "delete the run directory and start over", group=IO)
    wandb: bool = option(False, "also log to Weights & Biases (needs `pip install wandb`)", group=LOGS)
    wandb_project: str = option("tokenfold", "Weights & Biases project", group=LOGS)
    init_from: str | None = option(
        None, "start from this pretrained Hugging Face LLM (a local model directory with its tokenizer, or a hub "
        "name the HF cache holds) instead of --preset: our tokens are added to its tokenizer, its embeddings "
        "resized, new rows start at the mean embedding", group=BIG, metavar="PATH")
    lora_rank: int = option(0, "LoRA adapters of this rank (peft; needs --init-from); the new tokens' embedding and "
                            "output rows train too, everything else is frozen. 0: train every weight", group=BIG,
                            metavar="R")
    lora_alpha: float | None = option(None, "LoRA alpha (default: 2 x rank)", group=BIG)
    lora_dropout: float = option(0.05, "LoRA dropout", group=BIG)
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                               "comma-separated names of the linear layers that get adapters", group=BIG)
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state over the ranks (FSDP2, one unit "
                        "per decoder layer, bf16 mixed precision on GPU; sharded DCP checkpoints)", group=BIG)
    gpu_memory_gb: float | None = option(
        None, "GPU memory the memory plan checks against (default: the GPU's own; on CPU the plan is only printed)",
        group=BIG)
    loss_chunk: int | None = option(
        None, "loss targets per chunk of LM-head logits (default: as many as keep a chunk's fp32 logits under "
        "1 GiB: all of them with our own vocabulary, ~2,000 with a 128k-token LLM)", group=BIG)
    threads: int | None = option(None, "torch CPU threads per process", group=MACHINE)
    data_workers: int | None = option(
        None, "DataLoader worker processes per rank that read and collate batches ahead, into pinned memory on a "
        "GPU (default: 2 on a GPU, 0 on CPU); the batches are the same for any number", group=MACHINE)
    device: str = option("auto", "auto (cuda:LOCAL_RANK if a GPU is visible, else cpu) | cpu | cuda", group=MACHINE)
    stop_after_steps: int | None = option(
        None, f"save and exit with status {EXIT_REQUEUE} after N steps of this session (time slicing, tests)",
        group=LOGS)


def shard_max_tokens(tokens: str | os.PathLike, vocab) -> tuple[int, str]:
    """The longest example the token shards may hold, and where that number comes from: stage 04's
    --max-length as its manifest records it (`Vocab.example_length`), else (no manifest: shards made
    outside stage 04's finalize) the longest example they hold."""
    mf = Path(tokens) / "manifest.json"
    m = read_json(mf) if mf.exists() else {}
    if "max_length" in m:   # (manifests written before max_example_tokens existed: the same rule)
        return int(m.get("max_example_tokens", vocab.example_length(m["max_length"]))), \
            f"stage 04's --max-length {m['max_length']}"
    return longest_example(tokens), f"the longest example in {tokens} (no manifest.json)"


def longest_example(tokens: str | os.PathLike) -> int:
    """Tokens of the longest example of any split of a token directory."""
    from .db import SPLITS
    from .shards import TokenDataset

    return max([int(TokenDataset(tokens, s).lengths.max(initial=0)) for s in SPLITS if (Path(tokens) / s).is_dir()],
               default=0)


def resolve_max_len(cfg: TrainConfig, vocab) -> int:
    """--max-len as given, or by default what the token shards may hold (`shard_max_tokens`). A --max-len
    shorter than an example of any split is refused (one line): truncation would cut residues and
    <eos>, and stage 06 could not evaluate such chains."""
    need, source = shard_max_tokens(cfg.tokens, vocab)
    if cfg.max_len is None:
        return need
    longest = longest_example(cfg.tokens)
    if cfg.max_len < longest:
        raise ValueError(f"--max-len {cfg.max_len} is shorter than examples of {cfg.tokens} (up to {longest} tokens): "
                         f"leave it out (default {need}, from {source}) or re-tokenize with 04_tokenize.py "
                         f"--max-length {vocab.max_residues(cfg.max_len)}")
    return cfg.max_len


def default_out(tokens: str | os.PathLike, preset: str, init_from: str | None = None) -> Path:
    """The run directory when --out is not given: data/runs/<tokens name>_<preset>, or
    <tokens name>_<model directory or hub name> with --init-from."""
    model = Path(str(init_from).rstrip("/")).name if init_from else preset
    return layout.RUNS / f"{Path(tokens).name}_{model}"


def compat_fingerprint(cfg: TrainConfig, total_steps: int, layout_name: str, world: int) -> dict:
    """The settings a resumed run must share with the checkpointed one."""
    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_MUTABLE | {"max_steps", "epochs"}}
    d.update(total_steps=total_steps, batch_layout=layout_name, microbatches_per_step=cfg.grad_accum * world)
    return d


def changed_settings(run_dir: Path, new: dict) -> list[str]:
    """Settings in fingerprint `new` that differ from the one in run_dir/run_config.json (none if there
    is no such file). A setting the old run does not record (an option added since) counts as its default."""
    path = run_dir / "run_config.json"
    if not path.exists():
        return []
    old, default = read_json(path)["fingerprint"], asdict(TrainConfig())
    return sorted(k for k in set(old) | set(new) if old.get(k, default.get(k)) != new.get(k, default.get(k)))
