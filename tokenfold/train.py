"""Stage 05: train the amino acid -> structure token translator (a Llama causal LM), from scratch or from
a pretrained LLM (--init-from, optionally with LoRA), with DDP or FSDP2.

`train(TrainConfig)` runs one training run in ``data/runs/<run>/`` (files: see data/README.md,
section stage 05). This module is the loop only; its parts:

    tokenfold/train_config.py   every setting (the flags of 05_train_lm.py), what a resume must share
    tokenfold/data.py, train_stream.py   batches (length-bucketed for SDPA, packed for FlashAttention-2), the
                                stream of steps of one rank; tokenfold/recipe.py: the mask and positions
    tokenfold/loss.py, optim.py the loss (targets + <eos>) and validation; AdamW, warmup + cosine, precision
    tokenfold/stop.py, train_log.py   SIGTERM / SIGUSR1, exit statuses 0 / 124 / 1; metrics.jsonl, curves.png
    tokenfold/checkpoint.py     checkpoints; tokenfold/distributed.py: process groups
    tokenfold/model_setup.py    the model (preset, --init-from, --lora-rank) in LossModel, FSDP2 or DDP
    tokenfold/memory_plan.py    bytes per GPU, printed before training; refuses what cannot fit

A step runs forward/backward over this rank's micro-batches (gradient accumulation; DDP/FSDP reduce
the gradients on the last one), clips the gradient norm, and steps the optimizer and the schedule.
Validation every ``eval_every`` steps, and at the start and the end.

Resuming: re-running the same command continues from the newest checkpoint (model, optimizer,
scheduler, RNG states, data position), and the losses equal those of an uninterrupted run
(tests/test_train.py). ``--overwrite`` starts over. A finished run (``final/`` exists) does nothing.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed, fsdp, hf_vocab, lora, memory_plan
from .artifacts import write_json_atomic
from .cli import progress, seed_everything
from .data import check_vocab, eval_batches, pick_layout
from .device import autocast, dtype_name
from .loss import evaluate
from .model import flops_per_token, pick_attention
from .model_setup import check_settings, checkpoint_kind, model_config, starting_model, weights_dtype, wrap
from .optim import make_optimizer, make_scheduler, train_dtype
from .recipe import Recipe
from .stop import EXIT_OK, EXIT_REQUEUE, StopFlag
from .train_config import TrainConfig, changed_settings, compat_fingerprint, resolve_max_len
from .train_log import Interval, TrainLog
from .train_stream import TrainStream
from .vocab import Vocab

log = logging.getLogger("tokenfold.train")


@dataclass
class TrainResult:
    exit_code: int
    step: int
    run_dir: Path
    final_dir: Path | None = None
    val: dict | None = None


def train(cfg: TrainConfig) -> TrainResult:
    """One training run (all ranks call it); exit codes: tokenfold/stop.py."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    stop = StopFlag().install()   # early, so a signal during setup still ends in a checkpoint + 124
    dist = distributed.init(cfg.device, group_of_one=cfg.fsdp)
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
        self.train_log = TrainLog(self.run_dir, self.main)
        self.device = dist.device
        tokens = Path(cfg.tokens)
        if not (tokens / "vocab.json").exists():
            raise FileNotFoundError(f"{tokens}: no vocab.json (run stage 04, 04_tokenize.py, first)")
        check_settings(cfg)
        self.vocab = Vocab.load(tokens / "vocab.json")
        self.tokenizer = None   # --init-from: the LLM's tokenizer, our tokens added (saved in every checkpoint)
        if cfg.init_from:
            self.tokenizer = hf_vocab.load_tokenizer(cfg.init_from)
            self.vocab = hf_vocab.extend_tokenizer(self.tokenizer, self.vocab, cfg.init_from)
        t_ds = time.time()
        self.train_ds = hf_vocab.token_dataset(tokens, "train", self.vocab)
        t_ds = time.time() - t_ds
        self.val_ds = hf_vocab.token_dataset(tokens, "val", self.vocab) if (tokens / "val").is_dir() else None
        check_vocab(self.vocab, self.train_ds)
        if cfg.overwrite and self.main and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        dist.barrier()

        # model shape, attention, batch layout, precision
        cfg.max_len = resolve_max_len(cfg, self.vocab)   # the length contract with stage 04 (train_config.py)
        self.model_cfg = model_config(cfg, self.vocab, cfg.max_len)
        self.recipe = Recipe.of(self.model_cfg)   # --prefix-lm / --aligned-positions (model_setup.model_config)
        self.ckpt_kind = checkpoint_kind(cfg)
        self.attn = pick_attention(self.device, cfg.attn, self.recipe)   # a recipe: SDPA (so padded batches)
        self.layout = pick_layout(self.attn, cfg.batch_layout)
        self.dtype = train_dtype(cfg.precision, self.device)
        self.precision = dtype_name(self.dtype)

        # data and schedule length
        t_data = time.time()
        cuda = self.device.type == "cuda"
        workers = cfg.data_workers if cfg.data_workers is not None else (2 if cuda else 0)
        self.stream = TrainStream(self.train_ds, self.vocab, max_tokens=cfg.max_tokens, max_len=cfg.max_len,
                                  layout=self.layout, seed=cfg.seed, grad_accum=cfg.grad_accum,
                                  world_size=dist.world_size, rank=dist.rank, window=cfg.bucket_window,
                                  input_noise=cfg.struct_input_noise, workers=workers, pin_memory=cuda,
                                  recipe=self.recipe)
        log.info("data: %d train examples (%s tokens) read in %.1f s; epoch plan of %d micro-batches in %.1f s; "
                 "%d loader workers%s", len(self.train_ds), f"{self.train_ds.n_tokens:,}", t_ds,
                 len(self.stream.plan(0)), time.time() - t_data, workers, ", pinned memory" if cuda else "")
        self.steps_per_epoch = self.stream.steps_per_epoch()
        self.total_steps = int(cfg.max_steps) if cfg.max_steps else \
            max(1, int(round((cfg.epochs or 1.0) * self.steps_per_epoch)))
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * self.total_steps))
        self.fingerprint = compat_fingerprint(cfg, self.total_steps, self.layout, dist.world_size)
        self.val_batches = []
        if self.val_ds is not None and len(self.val_ds):
            self.val_batches = eval_batches(self.val_ds, self.vocab, max_tokens=cfg.max_tokens, max_len=cfg.max_len,
                                            layout=self.layout, max_examples=cfg.eval_max_examples, seed=cfg.seed,
                                            world_size=dist.world_size, rank=dist.rank, recipe=self.recipe)
        self.step = 0
        self.tokens_seen = 0
        self.last_val: dict | None = None
        self.saved_step = -1

    # ---- helpers
    def autocast(self):
        return autocast(self.device, self.dtype)

    def finished_already(self) -> bool:
        if not self.final_dir.exists():
            return False
        diff = changed_settings(self.run_dir, self.fingerprint)
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
            diff = changed_settings(self.run_dir, self.fingerprint)
            if diff:
                raise ValueError(f"cannot resume {self.run_dir}: settings changed ({', '.join(diff)}); "
                                 "use the same settings, or --overwrite / another --out")
        return found

    def build(self, resume_from: Path | None) -> None:
        """Model (fresh or from the checkpoint), wrappers, optimizer, schedule, and the rest of the saved state."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        if resume_from is not None and self.ckpt_kind == "hf":
            self.model = ckpt.from_pretrained(resume_from, dtype=torch.float32, attn_implementation=self.attn)
        else:   # the starting model; a LoRA / sharded checkpoint's state is loaded into it
            self.model = starting_model(cfg, self.model_cfg, self.vocab, self.attn, self.dtype)
            if resume_from is not None and self.ckpt_kind == "adapter":
                lora.load_adapter(self.model, resume_from)
        self.model.train()
        # what the step calls: the loss model (forward = loss), in FSDP2 or DDP, maybe compiled
        self.loss_model, self.module = wrap(self.model, cfg, self.dist, self.dtype)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, self.warmup, cfg.min_lr_ratio)
        if resume_from is not None:
            state = ckpt.load_trainer_state(resume_from)
            if self.ckpt_kind == "sharded":
                fsdp.load(resume_from / fsdp.SHARDED, self.loss_model, self.optimizer, bool(cfg.lora_rank))
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.stream.load_state(state["data"])
            self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
            rngs = state["rng"]
            ckpt.set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])
            log.info("resumed from %s: step %d, epoch %d, micro-batch %d", resume_from, self.step,
                     self.stream.epoch, self.stream.pos)

    def start_files(self, resumed: bool) -> None:
        """run_config.json; metrics.jsonl cut back to the resumed step; wandb when asked for."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            s = self.stream
            write_json_atomic(self.run_dir / "run_config.json", {
                "config": asdict(self.cfg), "fingerprint": self.fingerprint, "model": self.model_cfg.to_dict(),
                "preset": self.cfg.preset, "attn_implementation": self.attn, "batch_layout": self.layout,
                "precision": self.precision, "world_size": self.dist.world_size, "launcher": self.dist.launcher,
                "device": str(self.device), "n_params": self.plan.shape.n_params,
                "n_params_trainable": self.plan.shape.n_trainable,
                # the scaling-law N (tokenfold.sweep): all but the input embedding lookup (a tied one is the head)
                "n_params_non_embedding": self.plan.shape.n_params - (
                    0 if self.model_cfg.tie_word_embeddings else self.model_cfg.vocab_size * self.model_cfg.hidden_size),
                "memory_plan_gib": {k: v / memory_plan.GiB for k, v in self.plan.terms.items()},
                "init_from": self.cfg.init_from, "random_weights": hf_vocab.is_random_test_model(self.model_cfg),
                "checkpoint_weights": self.ckpt_kind,
                "total_steps": self.total_steps, "warmup_steps": self.warmup, "steps_per_epoch": self.steps_per_epoch,
                "train_examples": len(self.train_ds), "train_tokens": self.train_ds.n_tokens,
                "val_examples": len(self.val_ds) if self.val_ds is not None else 0,
                "padding_fraction_epoch0": s.padding_fraction(), "truncated_examples": s.n_truncated,
                "vocab": {"kind": self.vocab.kind, "size": self.vocab.size, "interleaved": self.vocab.interleaved,
                          "direction": self.vocab.direction, "id_offset": self.vocab.id_offset},
                "exit_status": {"finished": EXIT_OK, "stopped_requeue": EXIT_REQUEUE}})
        self.train_log.start(self.step if resumed else None)
        if self.cfg.wandb:
            self.train_log.start_wandb(self.cfg.wandb_project, self.run_dir.name,
                                       {"train": asdict(self.cfg), "model": self.model_cfg.to_dict()})

    def validate(self) -> dict | None:
        """Periodic validation (all ranks), logged and written to metrics.jsonl."""
        if self.val_ds is None or len(self.val_ds) == 0:
            return None
        t0 = time.time()
        res = evaluate(self.loss_model, self.val_batches, self.vocab, self.dist, self.autocast,
                       lockstep=self.cfg.fsdp)   # FSDP forwards are collective: ranks may hold unequal shares
        self.last_val = {"split": "val", "step": self.step, **res}
        self.train_log.write(self.last_val)
        log.info("step %d val: loss %.4f, structure-token accuracy %.4f (%d tokens, %.1fs)", self.step,
                 res["loss"], res["acc"], res["n_struct"], time.time() - t0)
        self.train_log.plot()
        return self.last_val

    def save(self, reason: str) -> None:
        """Checkpoint of this step (all ranks take part: RNG states are gathered to rank 0; FSDP: every
        rank writes its shards)."""
        cfg = self.cfg
        rng = self.dist.gather_objects(ckpt.rng_state())
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                 "data": self.stream.state(), "rng": rng, "world_size": self.dist.world_size,
                 "format": "tokenfold-trainer-state", "version": 1}
        sharded = None
        if self.ckpt_kind == "sharded":   # model and optimizer state: sharded/ (tokenfold/fsdp.py)
            sharded = lambda d: fsdp.save(d, self.loss_model, self.optimizer, bool(cfg.lora_rank))  # noqa: E731
        else:
            state["optimizer"] = self.optimizer.state_dict()
        info = {"step": self.step, "tokens_seen": self.tokens_seen, "run": self.run_dir.name,
                "preset": cfg.preset, "reason": reason, "val": self.last_val,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "weights": self.ckpt_kind,
                "weights_dtype": str(weights_dtype(cfg, self.dtype)).replace("torch.", ""),
                "train_config": asdict(cfg)}
        d = ckpt.save(ckpt.step_dir(self.run_dir, self.step), self.model, self.vocab, state, info,
                      tokenizer=self.tokenizer, sharded=sharded, dist=self.dist)
        if self.main:
            ckpt.prune(self.run_dir, cfg.keep_last)
            log.info("saved %s (%s)", d, reason)
        self.saved_step = self.step

    def grad_sync(self, on: bool):
        """Gradients are reduced over ranks on the last micro-batch of a step only."""
        if self.cfg.fsdp:
            fsdp.set_gradient_sync(self.loss_model, on)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if (on or not self.dist.enabled) else self.module.no_sync()

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
            with self.grad_sync(last):
                with self.autocast():
                    loss_sum, correct = self.module(**b.model_inputs(dev), labels=b.labels, eos=self.vocab.eos)
                # DDP/FSDP average over ranks; times world_size makes it the gradient of the global mean
                (loss_sum * (dist.world_size / n_loss_global)).backward()
            loss_local += loss_sum.detach().double()
            correct_local += correct.double()
        grad_norm = fsdp.full_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
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
        self.plan = memory_plan.check(cfg, self.model_cfg, self.vocab, self.dist.world_size, self.dtype,
                                      memory_plan.gpu_capacity(cfg, self.device), cfg.max_len)
        self.build(resume_from)
        self.start_files(resumed=resume_from is not None)
        log.info("model %s: %.2fM parameters, attention %s, %s batches of <= %d tokens x %d accum x %d ranks, "
                 "%s; %d steps (%d per epoch), padding %.1f%% of positions", cfg.init_from or cfg.preset,
                 self.plan.shape.n_params / 1e6, self.attn, self.layout, cfg.max_tokens, cfg.grad_accum,
                 self.dist.world_size, self.precision, self.total_steps, self.steps_per_epoch,
                 100 * self.stream.padding_fraction())
        if resume_from is None:
            self.validate()                     # the starting point of the curves
        bar = progress(total=self.total_steps, initial=self.step, desc="train") if self.main else _NullBar()
        acc = Interval()
        t_start, tok_start, steps_this_run = time.time(), self.tokens_seen, 0
        try:
            while self.step < self.total_steps:
                acc.add(self.train_step())
                steps_this_run += 1
                bar.update(1)
                stopping = self.stop_requested(steps_this_run)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps or stopping:
                    rec = acc.record(self.step, self.total_steps, self.stream.epoch,
                                     self.scheduler.get_last_lr()[0], self.tokens_seen, self.device)
                    self.train_log.write(rec)
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
            self.stream.close()    # loader workers exit; nothing reads batches after the loop
        return self.finish(time.time() - t_start, tok_start)

    def finish(self, wall: float, tok_start: int) -> TrainResult:
        """Final validation, checkpoint, final/, report.json, curves."""
        validated = self.validate() is not None   # validate() also redraws the curves
        if self.saved_step != self.step:
            self.save("final")
        if self.main:   # plain checkpoints hard-linked; LoRA merged, shards gathered (tokenfold/export.py)
            from .export import to_plain

            to_plain(ckpt.step_dir(self.run_dir, self.step), self.final_dir)
            if not validated:
                self.train_log.plot()
            self.write_report(wall, tok_start)
            log.info("done: %d steps, %s tokens; final/ at %s", self.step, f"{self.tokens_seen:,}", self.final_dir)
        self.train_log.finish()
        self.dist.barrier()
        return TrainResult(EXIT_OK, self.step, self.run_dir, self.final_dir, self.last_val)

    def write_report(self, wall: float, tok_start: int) -> None:
        from .report import write_report

        tr = self.train_log.records("train")
        lens = self.stream.lengths.astype(np.float64)
        fpt = flops_per_token(self.model_cfg, float((lens ** 2).sum() / max(lens.sum(), 1)))
        tps = (self.tokens_seen - tok_start) / max(wall, 1e-9)
        s = self.stream
        write_report(self.run_dir / "report.json", {
            "stage": "05_train_lm", "run": self.run_dir.name, "preset": self.cfg.preset,
            "init_from": self.cfg.init_from, "lora_rank": self.cfg.lora_rank, "fsdp": self.cfg.fsdp,
            "n_params": self.plan.shape.n_params, "n_params_trainable": self.plan.shape.n_trainable,
            "steps": self.step, "tokens_seen": self.tokens_seen, "epochs_seen": s.epochs_seen(),
            "final_train_loss": tr[-1]["loss"] if tr else None, "final_train_acc": tr[-1]["acc"] if tr else None,
            "val": self.last_val,
            "useful_tokens_per_s_wall": tps,          # this session, validation and checkpoints included
            "model_flops_per_token": fpt, "model_tflops_per_s_wall": fpt * tps / 1e12,
            "padding_fraction": s.padding_fraction(), "batch_layout": self.layout,
            "attn_implementation": self.attn, "precision": self.precision, "world_size": self.dist.world_size,
            "device": str(self.device), "wall_s_this_session": wall, "final_dir": str(self.final_dir)})


class _NullBar:
    """Progress bar stand-in for the non-main ranks."""

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass
