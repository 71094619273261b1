"""One cell of a sweep (`tokenfold.sweep`): its train subset, its training and evaluation, its numbers.

Train subsets (`make_subset`): a seeded permutation of the train examples of a stage-04 token
directory; fraction f keeps its first round(f * n) examples, so the subsets are nested (the 1/8 set
lies inside the 1/4 set). The subset is a token directory of its own: the kept train examples
rewritten as shards (`tokenfold.shards`, the same ids, DB indices and crops), ``val/`` and ``test/``
linked to the source's, ``vocab.json`` copied, and a manifest (written last) that names the source,
the fraction and the seed. Stages 05 and 06 read it like any token directory.

A cell (`run_cell`) trains through stage 05's own command line (`05_train_lm.py`'s parser and
`tokenfold.train.train`, with S05_ARGS, the size's ``--set`` overrides, and SWEEP_EPOCHS), then
evaluates ``final/`` with stage 06's (`06_evaluate.py`'s main, SWEEP_EVAL_ARGS, one task). Both
resume by themselves, so a killed cell rerun continues; training stopped by SIGUSR1/SIGTERM returns
124 (the SLURM script requeues the job). Last it writes ``cells/<cell>.json``: the numbers the
collect step fits (N, D, loss, accuracies, baselines) and where they came from.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .artifacts import read_json, sha256_file, write_json_atomic
from .config import ROOT
from .shards import TokenDataset, TokenShardWriter, shard_stem

if TYPE_CHECKING:
    from .sweep import Cell, Sweep

log = logging.getLogger("tokenfold.sweep")

SUBSET_FORMAT = "tokenfold-token-subset"
SHARD_EXAMPLES = 100_000      # examples per shard of a subset


def _subset_key(src: Path, fraction: float, seed: int) -> dict:
    return {"source": str(src.resolve()), "source_manifest_sha256": sha256_file(src / "manifest.json"),
            "fraction": fraction, "seed": seed}


def make_subset(src: Path, dst: Path, fraction: float, seed: int) -> Path:
    """The nested seeded train subset of token directory `src` in `dst` (module docstring)."""
    key = _subset_key(src, fraction, seed)
    mpath = dst / "manifest.json"
    if mpath.exists() and read_json(mpath).get("subset") == key:
        return dst
    if dst.exists():                       # unfinished, or made from other inputs: start over
        shutil.rmtree(dst)
    ds = TokenDataset(src, "train")
    n = len(ds)
    keep = np.sort(np.random.default_rng(seed).permutation(n)[:max(1, int(round(fraction * n)))])
    stems = []
    for k, start in enumerate(range(0, len(keep), SHARD_EXAMPLES)):
        w = TokenShardWriter(dst, "train", k)
        for i in keep[start:start + SHARD_EXAMPLES]:
            w.add(ds[int(i)], str(ds.ids[i]), int(ds.db_index[i]), int(ds.n_res[i]), int(ds.crop_start[i]))
        w.close()
        stems.append(shard_stem("train", k))
    for split in ("val", "test"):
        if (src / split).is_dir():
            os.symlink((src / split).resolve(), dst / split, target_is_directory=True)
    shutil.copyfile(src / "vocab.json", dst / "vocab.json")
    mf = read_json(src / "manifest.json")
    lengths = ds.lengths[keep]
    mf["splits"]["train"] = {"shards": stems, "n_examples": int(len(keep)),
                             "n_residues": int(ds.n_res[keep].sum()), "n_tokens": int(lengths.sum())}
    mf["subset"] = key
    mf["format_note"] = f"{SUBSET_FORMAT}: train = a seeded subset of {src}; val/test are links to its splits"
    write_json_atomic(mpath, mf)
    log.info("subset %s: %d of %d train examples (fraction %g, seed %d)", dst, len(keep), n, fraction, seed)
    return dst


def _stage_cli(script: str):
    """A numbered stage script loaded as a module (its parser and main, without running it)."""
    spec = importlib.util.spec_from_file_location(f"tokenfold_stage_{script[:2]}", ROOT / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_config(sw: Sweep, cell: Cell, overwrite: bool = False):
    """The cell's TrainConfig, parsed by 05_train_lm.py's own parser from S05_ARGS + the cell's flags."""
    cli = _stage_cli("05_train_lm.py")
    sets = [w for k, v in cell.size.overrides().items() for w in ("--set", f"{k}={v}")]
    # MODEL_PRESET first, so that S05_ARGS may name another (as slurm/05_train_lm.sbatch does); the
    # cell's own inputs, outputs and size last, so that they win
    argv = ["--preset", sw.preset, *sw.train_args, "--tokens", str(sw.subset_dir(cell.tokens, cell.fraction)),
            "--out", str(sw.run_dir(cell)), *sets, *(["--overwrite"] if overwrite else [])]
    cfg = cli.config_from_args(cli.build_parser().parse_args(argv))
    if sw.epochs is not None:
        cfg.max_steps, cfg.epochs = None, sw.epochs
    return cfg


def run_cell(sw: Sweep, cell: Cell, overwrite: bool = False) -> int:
    """Train, evaluate and record one cell (module docstring); 124 when training was stopped."""
    from .train import train

    tokens = sw.subset_dir(cell.tokens, cell.fraction)
    if not (tokens / "manifest.json").exists():
        raise FileNotFoundError(f"{tokens}: the cell's token subset does not exist: run the prepare phase first")
    log.info("cell %d/%d %s: training on %s", cell.index + 1, len(sw.cells), cell.name, tokens)
    t0 = time.time()
    res = train(train_config(sw, cell, overwrite))
    t_train = time.time() - t0
    if res.exit_code != 0:
        log.warning("cell %s: training stopped (status %d); rerun to resume", cell.name, res.exit_code)
        return res.exit_code
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        return 0                                   # DDP: rank 0 evaluates and records
    evaluate = _stage_cli("06_evaluate.py").main
    argv = ["--checkpoint", str(res.final_dir), "--tokens", str(tokens), "--out", str(sw.eval_dir(cell)),
            "--num-shards", "1", "--shard-index", "0", *sw.eval_args, *(["--overwrite"] if overwrite else [])]
    t0 = time.time()
    if evaluate(argv) != 0:
        raise ValueError(f"cell {cell.name}: stage 06 failed")
    record = cell_record(sw, cell, t_train, time.time() - t0)
    write_json_atomic(sw.result_path(cell), record)
    log.info("cell %s: N=%s D=%s loss %.4f, free-running accuracy %.4f", cell.name, f"{record['N']:,}",
             f"{record['D']:,}", record["loss"], record["accuracy"])
    return 0


def cell_record(sw: Sweep, cell: Cell, t_train: float, t_eval: float) -> dict:
    """The cell's numbers, from stage 05's run_config.json / report.json and stage 06's metrics.json."""
    run, ev = sw.run_dir(cell), sw.eval_dir(cell)
    rc, rep, m = read_json(run / "run_config.json"), read_json(run / "report.json"), read_json(ev / "metrics.json")
    t = m["tokens_metrics"]
    rec = {"fingerprint": sw.cell_fingerprint(cell), "cell": cell.name, "index": cell.index, "tokens_set": cell.set_name,
           "tokens": str(cell.tokens), "kind": m["kind"], "size": cell.size.name, "layers": cell.size.layers,
           "width": cell.size.width, "fraction": cell.fraction,
           "N": int(rc["n_params_non_embedding"]), "N_total": int(rc["n_params"]),
           "D": int(rep["tokens_seen"]), "train_examples": int(rc["train_examples"]),
           "train_tokens": int(rc["train_tokens"]), "epochs_seen": float(rep["epochs_seen"]), "steps": int(rep["steps"]),
           "flops": float(rep["model_flops_per_token"]) * int(rep["tokens_seen"]),
           "eval_split": m["split"], "n_eval_proteins": int(m["n_proteins"]),
           "loss": float(np.log(t["perplexity"])), "perplexity": float(t["perplexity"]),
           "val_loss_stage05": (rep.get("val") or {}).get("loss"),
           "accuracy": float(t["accuracy"]), "teacher_forced_accuracy": float(t["teacher_forced_accuracy"]),
           "baselines": {b: float(v["accuracy"]) for b, v in t["baselines"].items()},
           "train_seconds": t_train, "eval_seconds": t_eval, "run_dir": str(run), "eval_dir": str(ev),
           "random_weights_upstream": bool(m.get("random_weights_upstream"))}
    if "structure" in m:
        rec["structure"] = {k: m["structure"][k]["rmsd"].get("median") for k in ("pred", "ceiling")}
    return rec
