"""Stage 05: train the amino acid -> structure token translator (a Llama causal LM) from scratch.

`train(TrainConfig)` runs one training run in ``data/runs/<run>/`` (layout: data/README.md)::

    run_config.json         every setting, the model config, parameter counts, world size
    metrics.jsonl           one JSON object per line: {"split": "train"|"val", "step": ..., ...}
    curves.png              loss and structure-token accuracy, train and val, vs step
    report.json             final numbers: val loss/accuracy, tokens, throughput, padding fraction
    checkpoints/step_N/     tokenfold.checkpoint format (save_pretrained + vocab.json + trainer_state.pt)
    final/                  the last checkpoint (what stage 06 loads)

Recipe: AdamW (no decay on norms and biases), linear warmup then cosine decay to
``min_lr_ratio * lr``, gradient clipping, gradient accumulation, bf16 autocast on GPU (fp32 on CPU),
optional gradient checkpointing and torch.compile. Batches: tokenfold/data.py (length-bucketed for
SDPA, packed for FlashAttention-2, never padded to a fixed length). The loss is the mean
cross-entropy over the structure tokens and <eos> of the *global* batch (all ranks, all
accumulation steps), so one process and N processes with the same global batch compute the same
update (tests/test_distributed.py).

Validation every ``eval_every`` steps: loss (same targets) and teacher-forced accuracy on the
structure tokens (argmax of the next-token distribution given the true prefix).

Resuming: re-running the same command continues from the newest checkpoint (model, optimizer,
scheduler, RNG states, data position), and the losses equal those of an uninterrupted run
(tests/test_train.py). ``--overwrite`` starts over. A finished run (``final/`` exists) does nothing.

Exit status (the contract with the SLURM scripts)::

    0    finished (final/ written), or was already finished
    124  EXIT_REQUEUE: stopped early because SIGTERM or SIGUSR1 arrived (SLURM sends them before a
         time limit or preemption; ask for one in time with ``#SBATCH --signal=USR1@300``), or
         because --stop-after-steps was reached, AFTER writing a checkpoint. Requeue the job /
         rerun the same command and it resumes exactly.
    1    error (one line on stderr)

Under DDP every rank catches the signal; the ranks agree at each step boundary (an all-reduce of
the stop flag), so it is enough that one rank receives it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed, layout
from .data import TrainStream, check_vocab, eval_batches, layout_for
from .model import build_config, build_model, count_params, flops_per_token, pick_attention
from .shards import TokenDataset
from .utils import progress, read_json, seed_everything, write_json_atomic, write_text_atomic
from .vocab import IGNORE_INDEX, Vocab

log = logging.getLogger("tokenfold.train")

EXIT_OK = 0
EXIT_REQUEUE = 124
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# settings that may change when resuming (everything else must match the checkpointed run)
RESUME_MUTABLE = {"out", "tokens", "resume", "overwrite", "eval_every", "eval_max_examples", "save_every",
                  "keep_last", "log_every", "wandb", "wandb_project", "compile", "grad_checkpointing",
                  "threads", "device", "stop_after_steps", "attn", "grad_accum"}


@dataclass
class TrainConfig:
    tokens: str = str(layout.tokens_dir("3di"))   # token directory of stage 04 (vocab.json, train/, val/)
    out: str = str(layout.RUNS / "3di_tiny")      # run directory
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    attn: str = "auto"                  # auto | sdpa | flash_attention_2 | eager
    batch_layout: str = "auto"          # auto (from attn) | padded | packed
    max_tokens: int = 16384             # tokens per micro-batch per rank, padding included
    max_len: int = 2048                 # longer examples are truncated
    bucket_window: int = 4096           # examples sorted together when bucketing
    grad_accum: int = 1
    max_steps: int | None = None        # total optimizer steps (default: `epochs` epochs)
    epochs: float | None = None
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None     # default: 5% of the steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    eval_every: int = 500
    eval_max_examples: int | None = 1000
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    resume: str = "auto"                # auto (newest checkpoint if any) | latest (must exist) | a checkpoint dir
    overwrite: bool = False
    wandb: bool = False
    wandb_project: str = "tokenfold"
    threads: int | None = None
    device: str = "auto"
    stop_after_steps: int | None = None  # behave as if SIGUSR1 arrived after this many steps (tests, time slicing)


@dataclass
class TrainResult:
    exit_code: int
    step: int
    run_dir: Path
    final_dir: Path | None = None
    val: dict | None = None


# ----------------------------------------------------------------------------- pieces
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
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kw)


def token_stats(logits: torch.Tensor, labels: torch.Tensor, struct_offset: int):
    """(summed cross-entropy over the loss targets, number of correctly predicted structure tokens).

    `labels` are unshifted (HF convention): position t's logits predict labels[t + 1].
    """
    logits = logits[:, :-1, :].float()
    tgt = labels[:, 1:].to(logits.device)
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == tgt) & (tgt >= struct_offset)).sum()
    return loss_sum, correct


@torch.no_grad()
def evaluate(model, batches, vocab: Vocab, dist: distributed.Dist, autocast) -> dict:
    """Validation loss (per loss target) and teacher-forced structure-token accuracy, over all ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)  # loss, n_loss, correct, n_struct
    for b in batches:
        with autocast():
            logits = model(**b.model_inputs(dist.device), use_cache=False).logits
        loss_sum, correct = token_stats(logits, b.labels, vocab.struct_offset)
        sums += torch.tensor([loss_sum.item(), b.n_loss, correct.item(), b.n_struct], dtype=torch.float64,
                             device=dist.device)
    dist.all_reduce_sum(sums)
    model.train(was_training)
    loss, n_loss, correct, n_struct = sums.tolist()
    return {"loss": loss / max(n_loss, 1), "acc": correct / max(n_struct, 1), "n_struct": int(n_struct)}


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it at step boundaries."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def install(self):
        for s in STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners): no handler
                pass
        return self

    def _handler(self, signum, frame):
        self.signum = signum
        log.warning("received %s: will save a checkpoint and exit with status %d at the end of this step",
                    signal.Signals(signum).name, EXIT_REQUEUE)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def plot_curves(metrics_path: Path, png: Path) -> Path | None:
    """curves.png: loss and structure-token accuracy (train and val) and throughput vs step."""
    from .report import save_figure, subplots

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tr = [r for r in recs if r.get("split") == "train"]
    va = [r for r in recs if r.get("split") == "val"]
    if not tr and not va:
        return None
    fig, (a1, a2, a3) = subplots(3, ncols=3, size=4.2)
    for rs, name, st in ((tr, "train", "-"), (va, "val", "o-")):
        if rs:
            a1.plot([r["step"] for r in rs], [r["loss"] for r in rs], st, label=name, ms=3)
            a2.plot([r["step"] for r in rs], [r["acc"] for r in rs], st, label=name, ms=3)
    a1.set(xlabel="step", ylabel="cross-entropy (nats / target)", title="loss (structure tokens + <eos>)")
    a2.set(xlabel="step", ylabel="accuracy", title="teacher-forced structure-token accuracy", ylim=(0, 1))
    if tr:
        a3.plot([r["step"] for r in tr], [r["tokens_per_s"] for r in tr], "-")
    a3.set(xlabel="step", ylabel="useful tokens / s", title="throughput (all ranks)")
    for a in (a1, a2):
        a.legend()
    return save_figure(fig, png)


# ----------------------------------------------------------------------------- the run
def _compat_fingerprint(cfg: TrainConfig, total_steps: int, layout_name: str, world: int) -> dict:
    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_MUTABLE}
    d.update(total_steps=total_steps, batch_layout=layout_name, microbatches_per_step=cfg.grad_accum * world)
    d.pop("max_steps", None); d.pop("epochs", None)
    return d


def train(cfg: TrainConfig) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = distributed.init(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: distributed.Dist) -> TrainResult:
    main = dist.is_main
    if not main:
        logging.getLogger("tokenfold").setLevel(logging.WARNING)
    run_dir = Path(cfg.out)
    tokens = Path(cfg.tokens)
    device = dist.device
    if not (tokens / "vocab.json").exists():
        raise FileNotFoundError(f"{tokens}: no vocab.json (run stage 04, 04_tokenize.py, first)")
    vocab = Vocab.load(tokens / "vocab.json")
    train_ds = TokenDataset(tokens, "train")
    val_ds = TokenDataset(tokens, "val") if (tokens / "val").is_dir() else None
    check_vocab(vocab, train_ds)

    # ---- start over / already done / resume
    if cfg.overwrite and main and run_dir.exists():
        shutil.rmtree(run_dir)
    dist.barrier()
    final_dir = run_dir / "final"

    # ---- model, batches
    model_cfg = build_config(cfg.preset, vocab, cfg.model_overrides)
    if cfg.max_len > model_cfg.max_position_embeddings:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the model's {model_cfg.max_position_embeddings} positions")
    attn = pick_attention(device, cfg.attn)
    batch_layout = layout_for(attn) if cfg.batch_layout == "auto" else cfg.batch_layout
    if batch_layout == "packed" and not attn.startswith("flash_attention") and not _packed_sdpa_supported():
        raise ValueError("the packed layout needs flash_attention_2, or transformers >= 5 for SDPA; use --batch-layout padded")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = torch.bfloat16 if precision == "bf16" else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    stream = TrainStream(train_ds, vocab, max_tokens=cfg.max_tokens, max_len=cfg.max_len, layout=batch_layout,
                         seed=cfg.seed, grad_accum=cfg.grad_accum, world_size=dist.world_size, rank=dist.rank,
                         window=cfg.bucket_window)
    spe = stream.steps_per_epoch(0)
    if cfg.max_steps:
        total_steps = int(cfg.max_steps)
    else:
        total_steps = max(1, int(round((cfg.epochs or 1.0) * spe)))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))
    fingerprint = _compat_fingerprint(cfg, total_steps, batch_layout, dist.world_size)

    if final_dir.exists() and not cfg.overwrite:
        done = read_json(run_dir / "run_config.json")["fingerprint"] if (run_dir / "run_config.json").exists() else None
        if done is not None and done != fingerprint:
            raise ValueError(f"{run_dir} holds a finished run with other settings: use --overwrite or another --out")
        log.info("%s: already finished (final/ exists); nothing to do (--overwrite to redo)", run_dir)
        return TrainResult(EXIT_OK, total_steps, run_dir, final_dir)

    resume_from = None
    if cfg.resume == "auto":
        resume_from = ckpt.latest_checkpoint(run_dir)
    elif cfg.resume == "latest":
        resume_from = ckpt.latest_checkpoint(run_dir)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}/checkpoints")
    elif cfg.resume not in ("none", "", None):
        resume_from = ckpt.resolve(cfg.resume)
    if resume_from is not None and (run_dir / "run_config.json").exists():
        old = read_json(run_dir / "run_config.json")["fingerprint"]
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            raise ValueError(f"cannot resume {run_dir}: settings changed ({', '.join(diff)}); "
                             "use the same settings, or --overwrite / another --out")

    seed_everything(cfg.seed)
    if resume_from is not None:
        model = ckpt.from_pretrained(resume_from, dtype=torch.float32, attn_implementation=attn)
    else:
        model = build_model(model_cfg, attn, seed=cfg.seed)
    model.to(device)
    model.train()
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = count_params(model)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.min_lr_ratio))

    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state(state["data"])
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
        log.info("resumed from %s: step %d, epoch %d, micro-batch %d", resume_from, step,
                 stream.epoch, stream.pos)

    module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        module = torch.compile(module, dynamic=True)

    val_batches = []
    if val_ds is not None and len(val_ds):
        val_batches = eval_batches(val_ds, vocab, max_tokens=cfg.max_tokens, max_len=cfg.max_len,
                                   layout=batch_layout, max_examples=cfg.eval_max_examples, seed=cfg.seed,
                                   world_size=dist.world_size, rank=dist.rank)

    # ---- run files (main rank)
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run_config.json", {
            "config": asdict(cfg), "fingerprint": fingerprint, "model": model_cfg.to_dict(), "preset": cfg.preset,
            "attn_implementation": attn, "batch_layout": batch_layout, "precision": precision,
            "world_size": dist.world_size, "launcher": dist.launcher, "device": str(device),
            "n_params": n_params, "n_params_non_embedding": count_params(model, exclude_embeddings=True),
            "total_steps": total_steps, "warmup_steps": warmup, "steps_per_epoch": spe,
            "train_examples": len(train_ds), "train_tokens": train_ds.n_tokens,
            "val_examples": len(val_ds) if val_ds is not None else 0,
            "padding_fraction_epoch0": stream.padding_fraction(0), "truncated_examples": stream.n_truncated,
            "vocab": {"kind": vocab.kind, "size": vocab.size, "interleaved": vocab.interleaved},
            "exit_status": {"finished": EXIT_OK, "stopped_requeue": EXIT_REQUEUE}})
        # keep the metrics of the steps the checkpoint covers, drop those of a killed tail
        kept = []
        if resume_from is not None and metrics_path.exists():
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_atomic(metrics_path, "".join(line + "\n" for line in kept))
    log.info("model %s: %.2fM parameters, attention %s, %s batches of <= %d tokens x %d accum x %d ranks, "
             "%s; %d steps (%d per epoch), padding %.1f%% of positions",
             cfg.preset, n_params / 1e6, attn, batch_layout, cfg.max_tokens, cfg.grad_accum, dist.world_size,
             precision, total_steps, spe, 100 * stream.padding_fraction(0))

    wandb_run = None
    if cfg.wandb and main:
        try:
            import wandb  # lazily: only when asked for
        except ImportError as e:
            raise ImportError("--wandb needs the wandb package (pip install wandb)") from e
        wandb_run = wandb.init(project=cfg.wandb_project, name=run_dir.name, id=run_dir.name.replace("/", "_"),
                               resume="allow", config={"train": asdict(cfg), "model": model_cfg.to_dict()})

    def write_metrics(rec: dict):
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if wandb_run is not None:
                wandb_run.log({f"{rec['split']}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))},
                              step=rec["step"])

    last_val: dict | None = None

    def run_eval():
        nonlocal last_val
        if val_ds is None or len(val_ds) == 0:
            return None
        t0 = time.time()
        last_val = evaluate(model, val_batches, vocab, dist, autocast)
        last_val = {"split": "val", "step": step, **last_val}
        write_metrics(last_val)
        log.info("step %d val: loss %.4f, structure-token accuracy %.4f (%d tokens, %.1fs)", step,
                 last_val["loss"], last_val["acc"], last_val["n_struct"], time.time() - t0)
        return last_val

    saved_step = -1

    def save(tag: str):
        nonlocal saved_step
        rng = [ckpt.to_tensor_tree(r) for r in dist.gather_objects(ckpt.to_numpy_tree(ckpt.rng_state()))]
        if main:
            state = {"step": step, "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "data": stream.state(), "rng": rng,
                     "world_size": dist.world_size, "format": "tokenfold-trainer-state", "version": 1}
            info = {"step": step, "tokens_seen": tokens_seen, "run": run_dir.name, "preset": cfg.preset,
                    "reason": tag, "val": last_val, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            d = ckpt.save(ckpt.step_dir(run_dir, step), model, vocab, state, info)
            ckpt.prune(run_dir, cfg.keep_last)
            log.info("saved %s (%s)", d, tag)
        saved_step = step
        dist.barrier()

    # ---- loop
    stop = StopFlag().install()
    steps_this_run = 0
    if resume_from is None and step == 0:
        run_eval()
    bar = progress(total=total_steps, initial=step, desc="train") if main else _NullBar()
    t_last, excluded, tok_int, pos_int, loss_int, corr_int, nl_int, ns_int = time.time(), 0.0, 0, 0, 0.0, 0.0, 0, 0
    t_start, tok_start = time.time(), tokens_seen
    grad_norm = torch.zeros(())
    try:
        while step < total_steps:
            batches = stream.next_step()
            counts = torch.tensor([sum(b.n_loss for b in batches), sum(b.n_struct for b in batches),
                                   sum(b.n_tokens for b in batches), sum(b.n_positions for b in batches)],
                                  dtype=torch.float64, device=device)
            dist.all_reduce_sum(counts)
            n_loss_global = max(counts[0].item(), 1.0)
            loss_local = torch.zeros((), dtype=torch.float64, device=device)
            corr_local = torch.zeros((), dtype=torch.float64, device=device)
            for i, b in enumerate(batches):
                sync = (i == len(batches) - 1) or not dist.enabled
                ctx = contextlib.nullcontext() if sync else module.no_sync()
                with ctx:
                    with autocast():
                        logits = module(**b.model_inputs(device), use_cache=False).logits
                    loss_sum, correct = token_stats(logits, b.labels, vocab.struct_offset)
                    # DDP averages gradients over ranks: scale so the result is d(global mean loss)
                    (loss_sum * (dist.world_size / n_loss_global)).backward()
                loss_local += loss_sum.detach().double()
                corr_local += correct.double()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_this_run += 1
            want_stop = stop.signum is not None or (cfg.stop_after_steps is not None
                                                     and steps_this_run >= cfg.stop_after_steps)
            red = torch.stack([loss_local, corr_local,
                               torch.tensor(float(want_stop), dtype=torch.float64, device=device)])
            dist.all_reduce_sum(red)
            loss_step, corr_step, stop_votes = red.tolist()
            n_loss_i, n_struct_i, n_tok_i, n_pos_i = (int(x) for x in counts.tolist())
            tokens_seen += n_tok_i
            tok_int += n_tok_i; pos_int += n_pos_i; loss_int += loss_step; corr_int += corr_step
            nl_int += n_loss_i; ns_int += n_struct_i
            bar.update(1)

            if step % cfg.log_every == 0 or step == total_steps or stop_votes > 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = max(time.time() - t_last - excluded, 1e-9)   # eval / checkpoint time excluded
                rec = {"split": "train", "step": step, "epoch": stream.epoch, "loss": loss_int / max(nl_int, 1),
                       "acc": corr_int / max(ns_int, 1), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "tokens_per_s": tok_int / dt, "positions_per_s": pos_int / dt,
                       "pad_frac": 1.0 - tok_int / max(pos_int, 1), "tokens_seen": tokens_seen,
                       "elapsed_s": time.time() - t_start}
                write_metrics(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                log.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  |g| %.2f  %.0f tok/s (useful; %.1f%% padding)"
                         "  epoch %d", step, total_steps, rec["loss"], rec["acc"], rec["lr"], rec["grad_norm"],
                         rec["tokens_per_s"], 100 * rec["pad_frac"], stream.epoch)
                tok_int = pos_int = nl_int = ns_int = 0
                loss_int = corr_int = excluded = 0.0
                t_last = time.time()

            if step < total_steps and stop_votes > 0:
                if cfg.eval_every and step % cfg.eval_every == 0:
                    run_eval()   # as an uninterrupted run would: the resumed run starts after it
                save("stop signal" if stop.signum is not None else f"--stop-after-steps {cfg.stop_after_steps}")
                if main:
                    plot_curves(metrics_path, run_dir / "curves.png")
                log.warning("stopped at step %d/%d; exit status %d: rerun the same command to resume",
                            step, total_steps, EXIT_REQUEUE)
                return TrainResult(EXIT_REQUEUE, step, run_dir, None, last_val)
            t_aside = time.time()
            if step < total_steps and cfg.eval_every and step % cfg.eval_every == 0:
                run_eval()
                if main:
                    plot_curves(metrics_path, run_dir / "curves.png")
            if step < total_steps and cfg.save_every and step % cfg.save_every == 0:
                save("periodic")
            excluded += time.time() - t_aside
    finally:
        bar.close()
        stop.restore()

    # ---- the end: final validation, checkpoint, final/, report
    wall = time.time() - t_start
    run_eval()
    if saved_step != step:
        save("final")
    if main:
        ckpt.publish(ckpt.step_dir(run_dir, step), final_dir)
        plot_curves(metrics_path, run_dir / "curves.png")
        from .report import write_report

        recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        tr = [r for r in recs if r["split"] == "train"]
        attn_len = float(np.sum(stream.lengths.astype(np.float64) ** 2) / max(stream.lengths.sum(), 1))
        tps = (tokens_seen - tok_start) / max(wall, 1e-9)
        write_report(run_dir / "report.json", {
            "stage": "05_train_lm", "run": run_dir.name, "preset": cfg.preset, "n_params": n_params,
            "steps": step, "tokens_seen": tokens_seen, "epochs_seen": stream.epoch + stream.pos / max(len(stream.plan(stream.epoch)), 1),
            "final_train_loss": tr[-1]["loss"] if tr else None, "final_train_acc": tr[-1]["acc"] if tr else None,
            "val": last_val, "useful_tokens_per_s_wall": tps,  # this session, eval and checkpoints included
            "model_flops_per_token": flops_per_token(model_cfg, attn_len),
            "padding_fraction": stream.padding_fraction(0), "batch_layout": batch_layout,
            "attn_implementation": attn, "precision": precision, "world_size": dist.world_size,
            "device": str(device), "wall_s_this_session": wall, "final_dir": str(final_dir)})
        log.info("done: %d steps, %s tokens; final/ at %s", step, f"{tokens_seen:,}", final_dir)
    if wandb_run is not None:
        wandb_run.finish()
    dist.barrier()
    return TrainResult(EXIT_OK, step, run_dir, final_dir, last_val)


class _NullBar:
    """Progress bar stand-in for the non-main ranks."""

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _packed_sdpa_supported() -> bool:
    """transformers >= 5 derives a block-diagonal mask from restarting position_ids for SDPA."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def run_cli(cfg: TrainConfig) -> int:
    """Run and map the outcome to the exit status documented above."""
    return train(cfg).exit_code


def default_out(tokens: str | os.PathLike, preset: str) -> Path:
    return layout.RUNS / f"{Path(tokens).name}_{preset}"
