"""Learning curves: one command trains a grid of (token set x model size x train-set fraction) cells
through stages 05 and 06, then fits the scaling law and draws it (the DPLM / Cheng et al. 2024 study).

    python -m tokenfold.sweep run     --config slurm/config/sweep_shared.env   # locally, no SLURM
    python -m tokenfold.sweep submit  --config slurm/config/afdb50.env         # SLURM: prepare -> array -> collect
    python -m tokenfold.sweep plan    --config ...                              # the cells and their status

Phases (`submit` chains them as SLURM jobs with afterok; `run` runs them in order here):

``prepare``  the seeded, nested train subsets of each token set (`tokenfold.sweep_cell.make_subset`);
``cell``     train (stage 05) and evaluate (stage 06) the cells of this array task (round-robin over
             cells, `tokenfold.sharding`); each cell resumes where it stopped and writes
             ``cells/<cell>.json`` last (`tokenfold.sweep_cell.run_cell`);
``collect``  the fit, plots, tables (`tokenfold.sweep_report.collect`).

Everything comes from the pipeline config file (`tokenfold.config`; the environment overrides it):

==================  ==================================================================================
S05_ARGS            the stage-05 recipe every cell trains with (plus MODEL_PRESET); the sweep adds
                    --tokens, --out and the size's --set overrides, and SWEEP_EPOCHS
SWEEP_TOKENS        token directories of stage 04 (several: the token kinds side by side); default TOKENS_DIR
SWEEP_SIZES         model sizes LAYERSxWIDTH (default "2x64 3x128 4x256"): 64-wide heads, half as many
                    KV heads, FFN 2.75 x width, over MODEL_PRESET's other fields
SWEEP_FRACTIONS     train-set fractions (default "0.125 0.25 0.5 1"): nested seeded subsets of train chains
SWEEP_EPOCHS        epochs of every cell over its subset, replacing S05_ARGS's --max-steps/--epochs, so the
                    tokens seen (D) follow the fraction; empty: S05_ARGS's length as it is
SWEEP_SEED          seed of the subsets (default 0; training uses S05_ARGS's --seed)
SWEEP_EVAL_ARGS     stage-06 flags of every cell (default "--split val")
SWEEP_NAME/_DIR     where it writes (default ${TOKENFOLD_DATA}/sweeps/${SWEEP_NAME}, name "sweep")
SWEEP_CPUS/MEM/TIME resources of the prepare and collect jobs
SWEEP_CELL_<FIELD>  a cell job's resources: stage 05's S05_<FIELD> (CPUS, MEM, TIME, GPUS, NODES,
                    NTASKS_PER_NODE, PARTITION, SBATCH_EXTRA, SIGNAL_SECS), each replaced when set
==================  ==================================================================================

Files: data/README.md, section ``sweeps/<name>/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .artifacts import read_json, write_json_atomic
from .cli import die, setup_logging
from .config import CONFIG_ENV, DEFAULT_CONFIG, ROOT, ConfigError, PipelineConfig, load_config
from .sharding import add_shard_args, my_units, resolve_shard

log = logging.getLogger("tokenfold.sweep")

DEFAULT_SIZES = "2x64 3x128 4x256"
DEFAULT_FRACTIONS = "0.125 0.25 0.5 1"
HEAD_DIM = 64
CELL_FIELDS = ("CPUS", "MEM", "TIME", "GPUS", "NODES", "NTASKS_PER_NODE", "PARTITION", "SBATCH_EXTRA", "SIGNAL_SECS")


@dataclass(frozen=True)
class Size:
    """A model size LAYERSxWIDTH, as LlamaConfig overrides over the preset."""

    layers: int
    width: int

    @classmethod
    def parse(cls, text: str) -> "Size":
        try:
            layers, width = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ConfigError(f"SWEEP_SIZES: {text!r} is not LAYERSxWIDTH (e.g. 3x128)") from None
        if layers < 1 or width < 16 or width % 16:
            raise ConfigError(f"SWEEP_SIZES: {text!r}: need >= 1 layer and a width that is a multiple of 16")
        return cls(layers, width)

    @property
    def name(self) -> str:
        return f"{self.layers}x{self.width}"

    def overrides(self) -> dict:
        heads = max(1, self.width // HEAD_DIM)
        return {"num_hidden_layers": self.layers, "hidden_size": self.width, "num_attention_heads": heads,
                "num_key_value_heads": max(1, heads // 2), "intermediate_size": 16 * round(2.75 * self.width / 16)}


@dataclass(frozen=True)
class Cell:
    index: int
    tokens: Path        # the full stage-04 token directory
    size: Size
    fraction: float

    @property
    def set_name(self) -> str:
        return self.tokens.name

    @property
    def name(self) -> str:
        return f"{self.set_name}_{self.size.name}_f{self.fraction:g}"


def _abs(p: str) -> Path:
    """Config paths are relative to the repository root (where the stage scripts run)."""
    return Path(p) if Path(p).is_absolute() else ROOT / p


def _floats(cfg: PipelineConfig, key: str, default: str) -> list[float]:
    try:
        vals = [float(v) for v in cfg.lookup(key, default).split()]
    except ValueError:
        raise ConfigError(f"{key}: not a list of numbers: {cfg.lookup(key)!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise ConfigError(f"{key}: fractions must lie in (0, 1], got {vals}")
    return sorted(set(vals))


class Sweep:
    """The grid and the settings of one sweep, read from a pipeline config (module docstring)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        name = cfg.lookup("SWEEP_NAME", "sweep")
        self.dir = _abs(cfg.lookup("SWEEP_DIR") or f"{cfg.lookup('TOKENFOLD_DATA', 'data')}/sweeps/{name}")
        tokens = cfg.lookup("SWEEP_TOKENS") or cfg.lookup("TOKENS_DIR")
        if not tokens:
            raise ConfigError("SWEEP_TOKENS (or TOKENS_DIR) names no token directory")
        self.tokens = [_abs(t) for t in shlex.split(tokens)]
        if len({t.name for t in self.tokens}) != len(self.tokens):
            raise ConfigError(f"SWEEP_TOKENS: two token directories share a name: {[t.name for t in self.tokens]}")
        self.sizes = [Size.parse(s) for s in cfg.lookup("SWEEP_SIZES", DEFAULT_SIZES).split()]
        self.fractions = _floats(cfg, "SWEEP_FRACTIONS", DEFAULT_FRACTIONS)
        epochs = cfg.lookup("SWEEP_EPOCHS")
        self.epochs = float(epochs) if epochs else None
        self.seed = int(cfg.lookup("SWEEP_SEED", "0"))
        self.preset = cfg.lookup("MODEL_PRESET", "tiny")
        self.train_args = shlex.split(cfg.lookup("S05_ARGS"))
        self.eval_args = shlex.split(cfg.lookup("SWEEP_EVAL_ARGS", "--split val"))
        self.cells = [Cell(i, t, s, f) for i, (t, s, f) in
                      enumerate((t, s, f) for t in self.tokens for s in self.sizes for f in self.fractions)]

    # ---- where things go
    def subset_dir(self, tokens: Path, fraction: float) -> Path:
        """The train subset of `tokens` (the full directory itself at fraction 1)."""
        return tokens if fraction >= 1 else self.dir / "tokens" / f"{tokens.name}_f{fraction:g}"

    def run_dir(self, cell: Cell) -> Path:
        return self.dir / "runs" / cell.name

    def eval_dir(self, cell: Cell) -> Path:
        return self.dir / "eval" / cell.name

    def result_path(self, cell: Cell) -> Path:
        return self.dir / "cells" / f"{cell.name}.json"

    def describe(self) -> dict:
        return {"dir": str(self.dir), "config": str(self.cfg.path), "tokens": [str(t) for t in self.tokens],
                "sizes": {s.name: s.overrides() for s in self.sizes}, "fractions": self.fractions,
                "epochs": self.epochs, "seed": self.seed, "preset": self.preset, "S05_ARGS": self.train_args,
                "SWEEP_EVAL_ARGS": self.eval_args, "cells": [c.name for c in self.cells]}

    def cell_fingerprint(self, cell: Cell) -> dict:
        """What a cell's numbers depend on (a stored result with another fingerprint is redone)."""
        return {"cell": cell.name, "tokens": str(cell.tokens), "size": cell.size.overrides(), "fraction": cell.fraction,
                "subset_seed": self.seed, "preset": self.preset, "S05_ARGS": self.train_args, "epochs": self.epochs,
                "SWEEP_EVAL_ARGS": self.eval_args}

    def done(self, cell: Cell) -> bool:
        p = self.result_path(cell)
        return p.exists() and read_json(p).get("fingerprint") == self.cell_fingerprint(cell)


# ============================================================================= the phases
def prepare(sw: Sweep) -> None:
    from .sweep_cell import make_subset

    for t in sw.tokens:
        if not (t / "manifest.json").exists():
            die(f"{t}: no finished token directory (manifest.json missing): run stage 04 first")
        for f in sw.fractions:
            if f < 1:
                make_subset(t, sw.subset_dir(t, f), f, sw.seed)
    write_json_atomic(sw.dir / "sweep.json", sw.describe())


def run_cells(sw: Sweep, num_tasks: int = 1, task_index: int = 0, only: str | None = None,
              overwrite: bool = False) -> int:
    """This task's cells; returns 0, or 124 when training stopped on a signal (requeue and rerun)."""
    from .sweep_cell import run_cell

    cells = [sw.cells[i] for i in my_units(len(sw.cells), num_tasks, task_index)]
    if only is not None:
        cells = [c for c in sw.cells if only in (c.name, str(c.index))]
        if not cells:
            die(f"no cell {only!r}; cells: {', '.join(c.name for c in sw.cells)}")
    for c in cells:
        if sw.done(c) and not overwrite:
            log.info("cell %s: done (%s)", c.name, sw.result_path(c))
            continue
        status = run_cell(sw, c, overwrite=overwrite)
        if status:
            return status
    return 0


def sbatch_commands(sw: Sweep) -> list[list[str]]:
    """The three sbatch command lines of `submit` (prepare, the cell array, collect); ``{prev}`` stands
    for the job id of the one before."""
    from .pipeline import STAGES, resources

    stage05 = next(s for s in STAGES if s.number == "05")
    # a cell job asks for stage 05's resources, each replaced by its SWEEP_CELL_<FIELD> when set
    cell_cfg = load_config(sw.cfg.path, env=sw.cfg.environ(), overrides={
        f"S05_{k}": sw.cfg.lookup(f"SWEEP_CELL_{k}") for k in CELL_FIELDS if sw.cfg.lookup(f"SWEEP_CELL_{k}")})
    logs = _abs(sw.cfg.lookup("LOG_DIR") or f"{sw.cfg.lookup('TOKENFOLD_DATA', 'data')}/logs")
    small = [f"--cpus-per-task={sw.cfg.lookup('SWEEP_CPUS', '1')}"] + \
        [f"--{k}={sw.cfg.lookup(f'SWEEP_{k.upper()}')}" for k in ("mem", "time") if sw.cfg.lookup(f"SWEEP_{k.upper()}")]
    small += [f"--{k}={sw.cfg.lookup(k.upper())}" for k in ("partition", "account", "qos") if sw.cfg.lookup(k.upper())]
    small += shlex.split(sw.cfg.lookup("SBATCH_EXTRA"))
    dep = ["--dependency=afterok:{prev}", "--kill-on-invalid-dep=yes"]
    script = str(ROOT / "slurm" / "sweep.sbatch")
    jobs = []
    for phase, opts in (("prepare", small),
                        ("cell", [f"--array=0-{len(sw.cells) - 1}", *resources(cell_cfg, stage05, "job").sbatch_options()]
                         + dep),
                        ("collect", small + dep)):
        out = logs / (f"tf-sweep-{phase}-%A_%a.out" if phase == "cell" else f"tf-sweep-{phase}-%j.out")
        jobs.append(["sbatch", "--parsable", f"--job-name=tf-sweep-{phase}", f"--output={out}", *opts, script, phase])
    return jobs


def submit(sw: Sweep, dry_run: bool = False) -> list[str]:
    """Submit prepare -> cell array -> collect (afterok); returns the job ids (dry run: prints only)."""
    env = sw.cfg.environ()
    prev, ids = "", []
    for cmd in sbatch_commands(sw):
        cmd = [c.replace("{prev}", prev) for c in cmd]
        if dry_run:
            print(shlex.join(cmd))
            prev = f"<{cmd[2].split('=', 1)[1]}>"
            continue
        (Path(cmd[3].split("=", 1)[1]).parent).mkdir(parents=True, exist_ok=True)
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            said = (r.stderr or r.stdout).strip().splitlines()
            die(f"sbatch failed (status {r.returncode}): {said[-1] if said else 'no message'}")
        prev = r.stdout.strip().split(";")[0]
        ids.append(prev)
        print(f"{cmd[2].split('=', 1)[1]}: job {prev}")
    if ids:
        print(f"watch: squeue -j {','.join(ids)}; results: {sw.dir}/report.json")
    return ids


# ============================================================================= the command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenfold.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("plan", "prepare", "cell", "collect", "run", "submit"),
                    help="plan: print the cells; prepare/cell/collect: one phase; run: all three here; submit: SLURM")
    ap.add_argument("--config", help=f"pipeline config (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})")
    ap.add_argument("--cell", help="cell phase: only this cell (name or index)")
    ap.add_argument("--overwrite", action="store_true", help="cell/run: retrain and re-evaluate finished cells")
    ap.add_argument("--n-boot", type=int, default=200, help="collect: bootstrap refits of the scaling law")
    ap.add_argument("--dry-run", action="store_true", help="submit: print the sbatch commands, submit nothing")
    ap.add_argument("-v", "--verbose", action="store_true")
    add_shard_args(ap, "cells")
    a = ap.parse_args(argv)
    setup_logging(a.verbose)
    try:
        sw = Sweep(load_config(a.config))
    except (ConfigError, FileNotFoundError) as e:
        die(str(e))
    if a.phase == "plan":
        for c in sw.cells:
            print(f"{c.index}\t{c.name}\t{'done' if sw.done(c) else 'todo'}\t{sw.subset_dir(c.tokens, c.fraction)}")
        return 0
    if a.phase == "submit":
        submit(sw, a.dry_run)
        return 0
    from .sweep_report import collect

    try:
        if a.phase in ("prepare", "run"):
            prepare(sw)
        if a.phase in ("cell", "run"):
            num, idx = resolve_shard(a.num_shards, a.shard_index) if a.phase == "cell" else (1, 0)
            status = run_cells(sw, num, idx, a.cell, a.overwrite)
            if status:
                return status
        if a.phase in ("collect", "run"):
            rep = collect(sw, n_boot=a.n_boot)
            print(json.dumps(rep["summary"], indent=1))
    except (FileNotFoundError, ValueError) as e:
        die(str(e).splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
