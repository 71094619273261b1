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
from .artifacts import read_json, write_json_atomic, write_text_atomic
from .cli import progress, seed_everything
from .data import TrainStream, check_vocab, eval_batches, layout_for
from .device import autocast, dtype_name, pick_dtype
from .model import build_config, build_model, count_params, flops_per_token, pick_attention
from .shards import TokenDataset
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
    struct_input_noise: float = 0.0     # fraction of input structure tokens replaced at random (data.py)
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
    """The settings a resumed run must share with the checkpointed one."""
    d = {k: v for k, v in asdict(cfg).items() if k not in RESUME_MUTABLE | {"max_steps", "epochs"}}
    d.update(total_steps=total_steps, batch_layout=layout_name, microbatches_per_step=cfg.grad_accum * world)
    return d


def _changed_settings(run_dir: Path, new: dict) -> list[str]:
    """Settings in `new` that differ from the fingerprint in run_dir/run_config.json (none if there is
    no such file). A setting the old run does not record (an option added since) counts as its default."""
    path = run_dir / "run_config.json"
    if not path.exists():
        return []
    old, default = read_json(path)["fingerprint"], asdict(TrainConfig())
    return sorted(k for k in set(old) | set(new) if old.get(k, default.get(k)) != new.get(k, default.get(k)))


def train(cfg: TrainConfig) -> TrainResult:
    """One training run (all ranks call it). See the module docstring for outputs and exit codes."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stop = StopFlag().install()   # early, so a signal during setup still ends in a checkpoint + 124
    dist = distributed.init(cfg.device)
    try:
        trainer = Trainer(cfg, dist, stop)
        return trainer.run()
    finally:
        stop.restore()
        dist.close()


class Trainer:
    """Holds the state of one run: data stream, model, optimizer, schedule, counters, run files."""

    def __init__(self, cfg: TrainConfig, dist: distributed.Dist, stop: StopFlag):
        self.cfg, self.dist, self.stop = cfg, dist, stop
        self.main = dist.is_main
        if not self.main:
            logging.getLogger("tokenfold").setLevel(logging.WARNING)
        self.run_dir = Path(cfg.out)
        self.final_dir = self.run_dir / "final"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.device = dist.device
        tokens = Path(cfg.tokens)
        if not (tokens / "vocab.json").exists():
            raise FileNotFoundError(f"{tokens}: no vocab.json (run stage 04, 04_tokenize.py, first)")
        self.vocab = Vocab.load(tokens / "vocab.json")
        self.train_ds = TokenDataset(tokens, "train")
        self.val_ds = TokenDataset(tokens, "val") if (tokens / "val").is_dir() else None
        check_vocab(self.vocab, self.train_ds)
        if cfg.overwrite and self.main and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        dist.barrier()

        # model shape, attention, batch layout, precision
        self.model_cfg = build_config(cfg.preset, self.vocab, cfg.model_overrides)
        if cfg.max_len > self.model_cfg.max_position_embeddings:
            raise ValueError(f"--max-len {cfg.max_len} exceeds the model's {self.model_cfg.max_position_embeddings} positions")
        self.attn = pick_attention(self.device, cfg.attn)
        self.layout = layout_for(self.attn) if cfg.batch_layout == "auto" else cfg.batch_layout
        if self.layout == "packed" and not self.attn.startswith("flash_attention") and not _packed_sdpa_supported():
            raise ValueError("the packed layout needs flash_attention_2, or transformers >= 5 for SDPA; "
                             "use --batch-layout padded")
        self.dtype = pick_dtype(cfg.precision, self.device)
        self.precision = dtype_name(self.dtype)

        # data and schedule length
        self.stream = TrainStream(self.train_ds, self.vocab, max_tokens=cfg.max_tokens, max_len=cfg.max_len,
                                  layout=self.layout, seed=cfg.seed, grad_accum=cfg.grad_accum,
                                  world_size=dist.world_size, rank=dist.rank, window=cfg.bucket_window,
                                  input_noise=cfg.struct_input_noise)
        self.steps_per_epoch = self.stream.steps_per_epoch()
        self.total_steps = int(cfg.max_steps) if cfg.max_steps else \
            max(1, int(round((cfg.epochs or 1.0) * self.steps_per_epoch)))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * self.total_steps))
        self.fingerprint = _compat_fingerprint(cfg, self.total_steps, self.layout, dist.world_size)
        self.val_batches = []
        if self.val_ds is not None and len(self.val_ds):
            self.val_batches = eval_batches(self.val_ds, self.vocab, max_tokens=cfg.max_tokens, max_len=cfg.max_len,
                                            layout=self.layout, max_examples=cfg.eval_max_examples, seed=cfg.seed,
                                            world_size=dist.world_size, rank=dist.rank)
        self.step = 0
        self.tokens_seen = 0
        self.last_val: dict | None = None
        self.saved_step = -1
        self.wandb_run = None

    # ---- helpers
    def autocast(self):
        return autocast(self.device, self.dtype)

    def finished_already(self) -> bool:
        if not self.final_dir.exists():
            return False
        diff = _changed_settings(self.run_dir, self.fingerprint)
        if diff:
            raise ValueError(f"{self.run_dir} holds a finished run with other settings ({', '.join(diff)}): "
                             "use --overwrite or another --out")
        return True

    def find_resume(self) -> Path | None:
        cfg = self.cfg
        if cfg.resume == "auto":
            found = ckpt.latest_checkpoint(self.run_dir)
        elif cfg.resume == "latest":
            found = ckpt.latest_checkpoint(self.run_dir)
            if found is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.run_dir}/checkpoints")
        else:
            found = ckpt.resolve(cfg.resume)
        if found is not None:
            diff = _changed_settings(self.run_dir, self.fingerprint)
            if diff:
                raise ValueError(f"cannot resume {self.run_dir}: settings changed ({', '.join(diff)}); "
                                 "use the same settings, or --overwrite / another --out")
        return found

    def build(self, resume_from: Path | None) -> None:
        """Model (fresh or from the checkpoint), optimizer, schedule, and the rest of the saved state."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        if resume_from is not None:
            self.model = ckpt.from_pretrained(resume_from, dtype=torch.float32, attn_implementation=self.attn)
        else:
            self.model = build_model(self.model_cfg, self.attn, seed=cfg.seed)
        self.model.to(self.device).train()
        if cfg.grad_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, self.warmup, cfg.min_lr_ratio))
        if resume_from is not None:
            state = ckpt.load_trainer_state(resume_from)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.stream.load_state(state["data"])
            self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
            rngs = state["rng"]
            ckpt.set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])
            log.info("resumed from %s: step %d, epoch %d, micro-batch %d", resume_from, self.step,
                     self.stream.epoch, self.stream.pos)
        # what the training step calls: DDP wrapper (gradient all-reduce), then optionally compiled
        self.module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.module = torch.compile(self.module, dynamic=True)

    def start_files(self, resumed: bool) -> None:
        """run_config.json; metrics.jsonl cut back to the resumed step (a killed tail is dropped)."""
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        m, s = self.model, self.stream
        write_json_atomic(self.run_dir / "run_config.json", {
            "config": asdict(self.cfg), "fingerprint": self.fingerprint, "model": self.model_cfg.to_dict(),
            "preset": self.cfg.preset, "attn_implementation": self.attn, "batch_layout": self.layout,
            "precision": self.precision, "world_size": self.dist.world_size, "launcher": self.dist.launcher,
            "device": str(self.device), "n_params": count_params(m),
            "n_params_non_embedding": count_params(m, exclude_embeddings=True),
            "total_steps": self.total_steps, "warmup_steps": self.warmup, "steps_per_epoch": self.steps_per_epoch,
            "train_examples": len(self.train_ds), "train_tokens": self.train_ds.n_tokens,
            "val_examples": len(self.val_ds) if self.val_ds is not None else 0,
            "padding_fraction_epoch0": s.padding_fraction(), "truncated_examples": s.n_truncated,
            "vocab": {"kind": self.vocab.kind, "size": self.vocab.size, "interleaved": self.vocab.interleaved},
            "exit_status": {"finished": EXIT_OK, "stopped_requeue": EXIT_REQUEUE}})
        kept = []
        if resumed and self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))
        if self.cfg.wandb:
            try:
                import wandb  # lazily: only when asked for
            except ImportError as e:
                raise ImportError("--wandb needs the wandb package (pip install wandb)") from e
            self.wandb_run = wandb.init(project=self.cfg.wandb_project, name=self.run_dir.name,
                                        id=self.run_dir.name.replace("/", "_"), resume="allow",
                                        config={"train": asdict(self.cfg), "model": self.model_cfg.to_dict()})

    def write_metrics(self, rec: dict) -> None:
        if not self.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{rec['split']}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))},
                               step=rec["step"])

    def validate(self) -> dict | None:
        """Periodic validation (all ranks), logged and written to metrics.jsonl."""
        if self.val_ds is None or len(self.val_ds) == 0:
            return None
        t0 = time.time()
        res = evaluate(self.model, self.val_batches, self.vocab, self.dist, self.autocast)
        self.last_val = {"split": "val", "step": self.step, **res}
        self.write_metrics(self.last_val)
        log.info("step %d val: loss %.4f, structure-token accuracy %.4f (%d tokens, %.1fs)", self.step,
                 res["loss"], res["acc"], res["n_struct"], time.time() - t0)
        if self.main:
            plot_curves(self.metrics_path, self.run_dir / "curves.png")
        return self.last_val

    def save(self, reason: str) -> None:
        """Checkpoint of this step (all ranks take part: RNG states are gathered to rank 0)."""
        rng = self.dist.gather_objects(ckpt.rng_state())
        if self.main:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "data": self.stream.state(), "rng": rng,
                     "world_size": self.dist.world_size, "format": "tokenfold-trainer-state", "version": 1}
            info = {"step": self.step, "tokens_seen": self.tokens_seen, "run": self.run_dir.name,
                    "preset": self.cfg.preset, "reason": reason, "val": self.last_val,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            d = ckpt.save(ckpt.step_dir(self.run_dir, self.step), self.model, self.vocab, state, info)
            ckpt.prune(self.run_dir, self.cfg.keep_last)
            log.info("saved %s (%s)", d, reason)
        self.saved_step = self.step
        self.dist.barrier()

    # ---- one optimizer step
    def train_step(self) -> dict:
        """Forward/backward over this rank's micro-batches, then one update. Returns global sums."""
        dev, dist = self.device, self.dist
        batches = self.stream.next_step()
        counts = torch.tensor([sum(b.n_loss for b in batches), sum(b.n_struct for b in batches),
                               sum(b.n_tokens for b in batches), sum(b.n_positions for b in batches)],
                              dtype=torch.float64, device=dev)
        dist.all_reduce_sum(counts)            # the loss is a mean over the targets of the GLOBAL batch
        n_loss_global = max(counts[0].item(), 1.0)
        loss_local = torch.zeros((), dtype=torch.float64, device=dev)
        correct_local = torch.zeros((), dtype=torch.float64, device=dev)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            # gradients are all-reduced once per step, on the last micro-batch
            with contextlib.nullcontext() if (last or not dist.enabled) else self.module.no_sync():
                with self.autocast():
                    logits = self.module(**b.model_inputs(dev), use_cache=False).logits
                loss_sum, correct = token_stats(logits, b.labels, self.vocab.struct_offset)
                # DDP averages over ranks; times world_size makes it the gradient of the global mean
                (loss_sum * (dist.world_size / n_loss_global)).backward()
            loss_local += loss_sum.detach().double()
            correct_local += correct.double()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        sums = dist.all_reduce_sum(torch.stack([loss_local, correct_local]))
        n_loss, n_struct, n_tok, n_pos = (int(x) for x in counts.tolist())
        self.tokens_seen += n_tok
        return {"loss_sum": sums[0].item(), "correct": sums[1].item(), "n_loss": n_loss, "n_struct": n_struct,
                "n_tokens": n_tok, "n_positions": n_pos, "grad_norm": float(grad_norm)}

    def stop_requested(self, steps_this_run: int) -> bool:
        """Did any rank get SIGTERM/SIGUSR1 (or reach --stop-after-steps)? All ranks agree."""
        want = self.stop.signum is not None or (self.cfg.stop_after_steps is not None
                                                and steps_this_run >= self.cfg.stop_after_steps)
        votes = self.dist.all_reduce_sum(torch.tensor([float(want)], device=self.device))
        return votes.item() > 0

    # ---- the whole run
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.finished_already():
            log.info("%s: already finished (final/ exists); nothing to do (--overwrite to redo)", self.run_dir)
            return TrainResult(EXIT_OK, self.total_steps, self.run_dir, self.final_dir)
        resume_from = self.find_resume()
        self.build(resume_from)
        self.start_files(resumed=resume_from is not None)
        log.info("model %s: %.2fM parameters, attention %s, %s batches of <= %d tokens x %d accum x %d ranks, "
                 "%s; %d steps (%d per epoch), padding %.1f%% of positions", cfg.preset,
                 count_params(self.model) / 1e6, self.attn, self.layout, cfg.max_tokens, cfg.grad_accum,
                 self.dist.world_size, self.precision, self.total_steps, self.steps_per_epoch,
                 100 * self.stream.padding_fraction())
        if resume_from is None:
            self.validate()                     # the starting point of the curves
        bar = progress(total=self.total_steps, initial=self.step, desc="train") if self.main else _NullBar()
        acc = _Interval()
        t_start, tok_start, steps_this_run = time.time(), self.tokens_seen, 0
        try:
            while self.step < self.total_steps:
                acc.add(self.train_step())
                steps_this_run += 1
                bar.update(1)
                stopping = self.stop_requested(steps_this_run)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps or stopping:
                    rec = acc.record(self)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}")
                if self.step == self.total_steps:
                    break
                t_aside = time.time()
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.validate()
                if stopping:
                    self.save("stop signal" if self.stop.signum is not None else f"--stop-after-steps {cfg.stop_after_steps}")
                    log.warning("stopped at step %d/%d; exit status %d: rerun the same command to resume",
                                self.step, self.total_steps, EXIT_REQUEUE)
                    return TrainResult(EXIT_REQUEUE, self.step, self.run_dir, None, self.last_val)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save("periodic")
                acc.excluded += time.time() - t_aside   # eval / checkpoint time is not training throughput
        finally:
            bar.close()
        return self.finish(time.time() - t_start, tok_start)

    def finish(self, wall: float, tok_start: int) -> TrainResult:
        """Final validation, checkpoint, final/, report.json, curves."""
        validated = self.validate() is not None   # validate() also redraws the curves
        if self.saved_step != self.step:
            self.save("final")
        if self.main:
            ckpt.publish(ckpt.step_dir(self.run_dir, self.step), self.final_dir)
            if not validated:
                plot_curves(self.metrics_path, self.run_dir / "curves.png")
            self.write_report(wall, tok_start)
            log.info("done: %d steps, %s tokens; final/ at %s", self.step, f"{self.tokens_seen:,}", self.final_dir)
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.dist.barrier()
        return TrainResult(EXIT_OK, self.step, self.run_dir, self.final_dir, self.last_val)

    def write_report(self, wall: float, tok_start: int) -> None:
        from .report import write_report

        recs = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        tr = [r for r in recs if r["split"] == "train"]
        lens = self.stream.lengths.astype(np.float64)
        fpt = flops_per_token(self.model_cfg, float((lens ** 2).sum() / max(lens.sum(), 1)))
        tps = (self.tokens_seen - tok_start) / max(wall, 1e-9)
        s = self.stream
        write_report(self.run_dir / "report.json", {
            "stage": "05_train_lm", "run": self.run_dir.name, "preset": self.cfg.preset,
            "n_params": count_params(self.model), "steps": self.step, "tokens_seen": self.tokens_seen,
            "epochs_seen": s.epoch + s.pos / max(len(s.plan(s.epoch)), 1),
            "final_train_loss": tr[-1]["loss"] if tr else None, "final_train_acc": tr[-1]["acc"] if tr else None,
            "val": self.last_val,
            "useful_tokens_per_s_wall": tps,          # this session, validation and checkpoints included
            "model_flops_per_token": fpt, "model_tflops_per_s_wall": fpt * tps / 1e12,
            "padding_fraction": s.padding_fraction(), "batch_layout": self.layout,
            "attn_implementation": self.attn, "precision": self.precision, "world_size": self.dist.world_size,
            "device": str(self.device), "wall_s_this_session": wall, "final_dir": str(self.final_dir)})


class _Interval:
    """Sums over the steps since the last train log line."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0, self.excluded = time.time(), 0.0
        self.loss_sum = self.correct = 0.0
        self.n_loss = self.n_struct = self.n_tokens = self.n_positions = 0
        self.grad_norm = 0.0

    def add(self, s: dict):
        self.loss_sum += s["loss_sum"]; self.correct += s["correct"]
        self.n_loss += s["n_loss"]; self.n_struct += s["n_struct"]
        self.n_tokens += s["n_tokens"]; self.n_positions += s["n_positions"]
        self.grad_norm = s["grad_norm"]

    def record(self, tr: "Trainer") -> dict:
        """Write the train metrics line (and the progress log line) for the interval, then reset."""
        if tr.device.type == "cuda":
            torch.cuda.synchronize(tr.device)
        dt = max(time.time() - self.t0 - self.excluded, 1e-9)
        rec = {"split": "train", "step": tr.step, "epoch": tr.stream.epoch, "loss": self.loss_sum / max(self.n_loss, 1),
               "acc": self.correct / max(self.n_struct, 1), "lr": tr.scheduler.get_last_lr()[0],
               "grad_norm": self.grad_norm, "tokens_per_s": self.n_tokens / dt, "positions_per_s": self.n_positions / dt,
               "pad_frac": 1.0 - self.n_tokens / max(self.n_positions, 1), "tokens_seen": tr.tokens_seen}
        tr.write_metrics(rec)
        log.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  |g| %.2f  %.0f tok/s (useful; %.1f%% padding)  epoch %d",
                 tr.step, tr.total_steps, rec["loss"], rec["acc"], rec["lr"], rec["grad_norm"],
                 rec["tokens_per_s"], 100 * rec["pad_frac"], tr.stream.epoch)
        self.reset()
        return rec


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
