"""What a training run records as it goes (files: see data/README.md, section stage 05): the lines of
metrics.jsonl (`TrainLog`; a train line sums the steps since the previous one, `Interval`), their
optional Weights & Biases mirror, and curves.png drawn from them.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .artifacts import write_text_atomic

log = logging.getLogger("tokenfold.train_log")


class TrainLog:
    """metrics.jsonl (+ wandb) of the run in `run_dir`; only the main rank writes, the others no-op."""

    def __init__(self, run_dir: Path, main: bool):
        self.path, self.png, self.main = run_dir / "metrics.jsonl", run_dir / "curves.png", main
        self.wandb_run = None

    def start(self, resumed_step: int | None) -> None:
        """An empty metrics.jsonl, or the lines up to the resumed step (a killed run's tail is dropped)."""
        if not self.main:
            return
        kept = []
        if resumed_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def start_wandb(self, project: str, name: str, config: dict) -> None:
        if not self.main:
            return
        try:
            import wandb  # lazily: only when asked for
        except ImportError as e:
            raise ImportError("--wandb needs the wandb package (pip install wandb)") from e
        self.wandb_run = wandb.init(project=project, name=name, id=name.replace("/", "_"), resume="allow",
                                    config=config)

    def write(self, rec: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{rec['split']}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))},
                               step=rec["step"])

    def records(self, split: str) -> list[dict]:
        return [r for r in map(json.loads, filter(str.strip, self.path.read_text().splitlines()))
                if r.get("split") == split]

    def plot(self) -> Path | None:
        """curves.png: loss and structure-token accuracy (train and val) and throughput vs step."""
        if not self.main:
            return None
        from .report import save_figure, subplots

        tr, va = self.records("train"), self.records("val")
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
        return save_figure(fig, self.png)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


class Interval:
    """Sums over the steps since the last train line (global sums, as `Trainer.train_step` returns them)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0, self.excluded = time.time(), 0.0   # excluded: eval / checkpoint time, not throughput
        self.loss_sum = self.correct = 0.0
        self.n_loss = self.n_struct = self.n_tokens = self.n_positions = 0
        self.grad_norm = 0.0

    def add(self, s: dict):
        self.loss_sum += s["loss_sum"]; self.correct += s["correct"]
        self.n_loss += s["n_loss"]; self.n_struct += s["n_struct"]
        self.n_tokens += s["n_tokens"]; self.n_positions += s["n_positions"]
        self.grad_norm = s["grad_norm"]

    def record(self, step: int, total_steps: int, epoch: int, lr: float, tokens_seen: int,
               device: torch.device) -> dict:
        """The train metrics line of the interval (also logged), then start a new interval."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = max(time.time() - self.t0 - self.excluded, 1e-9)
        rec = {"split": "train", "step": step, "epoch": epoch, "loss": self.loss_sum / max(self.n_loss, 1),
               "acc": self.correct / max(self.n_struct, 1), "lr": lr, "grad_norm": self.grad_norm,
               "tokens_per_s": self.n_tokens / dt, "positions_per_s": self.n_positions / dt,
               "pad_frac": 1.0 - self.n_tokens / max(self.n_positions, 1), "tokens_seen": tokens_seen}
        log.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  |g| %.2f  %.0f tok/s (useful; %.1f%% padding)  epoch %d",
                 step, total_steps, rec["loss"], rec["acc"], rec["lr"], rec["grad_norm"],
                 rec["tokens_per_s"], 100 * rec["pad_frac"], epoch)
        self.reset()
        return rec
