"""The stage table and the job plan: which jobs run a pipeline config, in which order, with what resources.

The one description of the pipeline's orchestration, read by `tokenfold.launcher` (submitit) and by
`slurm/run_pipeline.sh` (sbatch, or the local chain), which prints and evaluates::

    python -m tokenfold.pipeline plan --config slurm/config/demo.env [--from NN] [--until NN] [--local]

One line per job, in submission order; each job waits for the one before it (afterok). A line is a
list of shell assignments (`stage=04 phase=array ... sbatch=(--cpus-per-task=1 ...)`).

Per stage (`STAGES`): its batch script `slurm/NN_<name>.sbatch`, whether it is sharded (01, 02, 04,
06: with S<NN>_ARRAY > 1 an array of that many tasks, then a finalize job; else one job that
finalizes itself), the file it writes last (its "complete" marker: a stage whose marker exists is
skipped), and the reports a person opens. With TOKEN_KIND=geo, stage 04 first runs one job that
fits the geo codebook (`04_tokenize.py --fit-geo-codebook`), and the tokenizing jobs wait for it.
`--local` plans what one machine runs: every stage as one job (the fit job still first).

Resources come from the config: S<NN>_{CPUS,MEM,TIME,GPUS,NODES,NTASKS_PER_NODE,PARTITION,SBATCH_EXTRA}.
A finalize job reads S<NN>_FIN_<FIELD> first (no GPU unless S<NN>_FIN_GPUS, one task), the geo fit
job S04_FIT_<FIELD> first (one task), both falling back to S<NN>_<FIELD>. The partition is
S<NN>_PARTITION, else GPU_PARTITION for a job with GPUs, else PARTITION (empty: the cluster's
default). ACCOUNT, QOS, GPU_GRES and SBATCH_EXTRA apply to every job; stage 05 gets
--signal=B:USR1@S05_SIGNAL_SECS, its warning to save and requeue itself.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import CONFIG_ENV, DEFAULT_CONFIG, ROOT, ConfigError, PipelineConfig, load_config


@dataclass(frozen=True)
class Stage:
    number: str                       # "01" .. "06"
    name: str                         # slurm/<number>_<name>.sbatch
    sharded: bool                     # --num-shards/--shard-index and --finalize
    marker: str                       # written last: exists = complete (${KEY} from the config)
    reports: tuple[str, ...]
    kind_reports: dict[str, tuple[str, ...]] = field(default_factory=dict)   # TOKEN_KIND -> more reports
    fit: dict[str, tuple[str, ...]] = field(default_factory=dict)   # TOKEN_KIND -> args of a job run first
    requeues: bool = False            # saves and requeues itself on SLURM's warning signal

    @property
    def script(self) -> str:
        return f"slurm/{self.number}_{self.name}.sbatch"


STAGES = (
    Stage("01", "prepare_db", True, "${DB_DIR}/manifest.json", ("${DB_DIR}/report.json", "${DB_DIR}/report.png")),
    Stage("02", "extract_esm_embeddings", True, "${EMB_DIR}/manifest.json",
          ("${EMB_DIR}/report.json", "${EMB_DIR}/report.png")),
    Stage("03", "train_codebook", False, "${CODEBOOK_DIR}/summary_K${CODEBOOK_K}.json",
          ("${CODEBOOK_DIR}/summary_K${CODEBOOK_K}.json", "${CODEBOOK_DIR}/clustering_visualization.png",
           "${CODEBOOK_DIR}/cluster_sizes_K${CODEBOOK_K}.png")),
    Stage("04", "tokenize", True, "${TOKENS_DIR}/manifest.json",
          ("${TOKENS_DIR}/report.json", "${TOKENS_DIR}/token_frequency.png", "${TOKENS_DIR}/lengths.png"),
          kind_reports={"geo": ("${TOKENS_DIR}/geo_rmsd_hist.png", "${TOKENS_DIR}/geo_rmsd_vs_length.png")},
          fit={"geo": ("--fit-geo-codebook",)}),
    Stage("05", "train_lm", False, "${RUN_DIR}/final",
          ("${RUN_DIR}/report.json", "${RUN_DIR}/metrics.jsonl", "${RUN_DIR}/curves.png"), requeues=True),
    Stage("06", "evaluate", True, "${EVAL_DIR}/metrics.json",
          ("${EVAL_DIR}/metrics.json", "${EVAL_DIR}/per_protein.tsv", "${EVAL_DIR}/accuracy_vs_length.png"),
          kind_reports={"3di": ("${EVAL_DIR}/confusion_3di.png",),
                        **dict.fromkeys(("geo", "kanzi"), (
                            "${EVAL_DIR}/rmsd_tm_vs_length.png", "${EVAL_DIR}/rmsd_tm_hist.png",
                            "${EVAL_DIR}/ca_traces_3d.png", "${EVAL_DIR}/pdb/"))}),
)
STAGE_NUMBERS = tuple(s.number for s in STAGES)


@dataclass(frozen=True)
class Resources:
    """What one job asks the scheduler for (empty strings: not asked, the cluster's default)."""

    cpus: int = 1
    mem: str = ""
    time: str = ""
    gpus: int = 0
    gres: str = "gpu"                 # GPUs are asked as --gres=<gres>:<gpus>
    nodes: str = ""
    ntasks_per_node: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    signal: str = ""                  # e.g. B:USR1@300
    extra: tuple[str, ...] = ()       # SBATCH_EXTRA words

    def sbatch_options(self) -> list[str]:
        opts = [f"--cpus-per-task={self.cpus}"]
        named = [("mem", self.mem), ("time", self.time), ("gres", f"{self.gres}:{self.gpus}" if self.gpus else ""),
                 ("nodes", self.nodes), ("ntasks-per-node", self.ntasks_per_node), ("partition", self.partition),
                 ("account", self.account), ("qos", self.qos), ("signal", self.signal)]
        opts += [f"--{k}={v}" for k, v in named if v]
        return opts + list(self.extra)


def _number(cfg: PipelineConfig, key: str, default: str) -> int:
    value = cfg.lookup(key, default)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{cfg.path}: {key} must be a whole number, got {value!r}") from None


def _words(cfg: PipelineConfig, key: str) -> list[str]:
    try:
        return shlex.split(cfg.lookup(key))
    except ValueError as e:
        raise ConfigError(f"{cfg.path}: cannot split {key} ({e}): {cfg.lookup(key)!r}") from None


def resources(cfg: PipelineConfig, stage: Stage, phase: str) -> Resources:
    """The resources of one job of `stage` (rules in the module docstring)."""
    base = f"S{stage.number}_"
    own = {"finalize": base + "FIN_", "fit": base + "FIT_"}.get(phase)

    def key(name: str, inherit: bool = True) -> str:
        """The key a field is read from: the phase's own S<NN>_FIN_/S<NN>_FIT_<name> when it is set (or
        when the field is not inherited), else the stage's S<NN>_<name>."""
        return own + name if own and (cfg.lookup(own + name) or not inherit) else base + name

    gpus = _number(cfg, key("GPUS", inherit=phase != "finalize"), "0")
    partition = cfg.lookup(key("PARTITION")) or (cfg.lookup("GPU_PARTITION") if gpus > 0 else "") \
        or cfg.lookup("PARTITION")
    signal_secs = cfg.lookup(base + "SIGNAL_SECS") if stage.requeues else ""
    return Resources(
        cpus=_number(cfg, key("CPUS"), "1"), mem=cfg.lookup(key("MEM")), time=cfg.lookup(key("TIME")), gpus=gpus,
        gres=cfg.lookup("GPU_GRES", "gpu"),
        nodes="" if own else cfg.lookup(base + "NODES"),          # fit and finalize jobs are one task
        ntasks_per_node="" if own else cfg.lookup(base + "NTASKS_PER_NODE"),
        partition=partition, account=cfg.lookup("ACCOUNT"), qos=cfg.lookup("QOS"),
        signal=f"B:USR1@{signal_secs}" if signal_secs else "",
        extra=tuple(_words(cfg, "SBATCH_EXTRA") + _words(cfg, key("SBATCH_EXTRA"))))


@dataclass
class Job:
    """One job of the plan. Paths are absolute (the stage scripts run in the repository root)."""

    stage: str
    name: str
    phase: str                        # fit | array | finalize | job (a whole stage in one job)
    status: str                       # todo | complete (the stage's marker exists and no --from redoes it)
    tasks: int                        # array tasks (1 for the other phases)
    script: str                       # relative to the repository root
    args: list[str]                   # after the script: --finalize, --fit-geo-codebook, --overwrite
    marker: str
    reports: list[str]
    resources: Resources

    @property
    def label(self) -> str:
        """`<name>`, or `<name>-fit` / `<name>-finalize`: names the job and its log."""
        return self.name + (f"-{self.phase}" if self.phase in ("fit", "finalize") else "")

    @property
    def job_name(self) -> str:
        return f"tf-{self.stage}-{self.label}"

    def shell_line(self) -> str:
        """The job as one line of shell assignments (what run_pipeline.sh evaluates)."""
        scalars = {"stage": self.stage, "name": self.name, "label": self.label, "job_name": self.job_name,
                   "phase": self.phase, "status": self.status, "tasks": self.tasks, "script": self.script,
                   "marker": self.marker}
        arrays = {"args": self.args, "sbatch": self.resources.sbatch_options(), "reports": self.reports}
        return " ".join([f"{k}={shlex.quote(str(v))}" for k, v in scalars.items()]
                        + [f"{k}=({shlex.join(v)})" for k, v in arrays.items()])


def selected_stages(cfg: PipelineConfig) -> list[Stage]:
    """The config's STAGES (e.g. "01 04 05 06": 3Di or geo tokens need no ESM-2), in pipeline order;
    empty: all of them."""
    wanted = cfg.lookup("STAGES").split()
    for w in wanted:
        if w not in STAGE_NUMBERS:
            raise ConfigError(f"STAGES: unknown stage '{w}' (stages: {' '.join(STAGE_NUMBERS)})")
    return [s for s in STAGES if not wanted or s.number in wanted]


def _path(cfg: PipelineConfig, template: str) -> str:
    p = cfg.expand(template)
    return str(ROOT / p) + ("/" if p.endswith("/") else "")


def plan(cfg: PipelineConfig, start: str | int | None = None, until: str | int | None = None,
         local: bool = False) -> list[Job]:
    """The jobs that run the pipeline, in order. start: redo stage `start` and later even when complete
    (their jobs get --overwrite); until: leave out the stages after it; local: one job per stage."""
    kind = cfg.lookup("TOKEN_KIND")
    jobs: list[Job] = []
    for stage in selected_stages(cfg):
        n = int(stage.number)
        if until and n > int(until):
            continue
        redo = bool(start) and n >= int(start)
        marker = _path(cfg, stage.marker)
        status = "todo" if redo or not Path(marker).exists() else "complete"
        reports = [_path(cfg, r) for r in stage.reports + stage.kind_reports.get(kind, ())]
        overwrite = ["--overwrite"] if redo else []
        tasks = _number(cfg, f"S{stage.number}_ARRAY", "1") if stage.sharded and not local else 1
        # no --overwrite for the fit job: it refits by itself when the codebook's inputs changed
        steps = [("fit", 1, list(stage.fit[kind]))] if kind in stage.fit else []
        if tasks > 1:
            steps += [("array", tasks, overwrite), ("finalize", 1, ["--finalize", *overwrite])]
        else:
            steps += [("job", 1, overwrite)]
        jobs += [Job(stage.number, stage.name, phase, status, k, stage.script, args, marker, reports,
                     resources(cfg, stage, phase)) for phase, k, args in steps]
    return jobs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenfold.pipeline", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the job plan, one job per line of shell assignments")
    p.add_argument("--config", help=f"pipeline config (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})")
    p.add_argument("--from", dest="start", type=int, metavar="NN", help="redo stage NN and later even if complete")
    p.add_argument("--until", type=int, metavar="NN", help="leave out the stages after NN")
    p.add_argument("--local", action="store_true", help="the plan of one machine: each stage as one job")
    a = ap.parse_args(argv)
    try:
        jobs = plan(load_config(a.config), a.start, a.until, a.local)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for job in jobs:
        print(job.shell_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
