"""Stage 02, the run: embed the protein DB (or a seeded residue sample of it) with ESM-2, resumably, over SLURM arrays.

Files: see data/README.md, section stage 02; their format: `tokenfold.embedding_store`.

SLURM array tasks take DB shards round-robin (`tokenfold.sharding.my_units`); each DB shard is embedded
(`tokenfold.esm_embed.embed`) in blocks of about ``block_residues`` residues saved as atomic part files
under ``work/``, so a killed task resumes at the last finished block and the result equals an
uninterrupted run; the shard file is assembled atomically from its parts; the finalize step writes the
report and, last, the manifest.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import atomic_path, read_json, write_json_atomic
from .batching import budget_batches
from .cli import die, option, progress
from .device import PRECISION_CHOICES, pick_device
from .embedding_store import (FORMAT, SAMPLE_SPLITS, STORE_DTYPE, VERSION, EmbeddingShard, sample_residues, shard_file,
                              write_sample, write_shard)
from .esm_checkpoint import DEFAULT_MODEL, DEFAULT_RANDOM_SHAPE, ESM2_MODELS, load_esm, model_num_layers
from .esm_embed import OVERLAP, WINDOW, embed, resolve_layer, windows
from .extract_report import write_extract_report
from .sharding import my_units

log = logging.getLogger("tokenfold.extract")


@dataclass
class ExtractConfig:
    """Settings of stage 02; each field is a flag of 02_extract_esm_embeddings.py (`tokenfold.cli.add_options`)."""
    db: str = option(str(layout.DB), "protein DB directory of stage 01")
    model: str | None = option(None, f"fair-esm model name ({', '.join(ESM2_MODELS)}) or path of a local .pt "
                               f"checkpoint (default {DEFAULT_MODEL}; with --random-weights-for-testing: "
                               f"{DEFAULT_RANDOM_SHAPE})")
    layer: int = option(-1, "representation layer, 0..num_layers; negative counts from the end, -1 is the last")
    out: str | None = option(None, f"output directory (default {layout.EMBEDDINGS}/<model>_L<layer>)")
    random_weights_for_testing: bool = option(
        False, "TEST/DEMO ONLY: use a randomly initialised ESM-2 with the shape of --model (a fair-esm name; written "
        f"to {layout.MODELS}/<name>_RANDOM_seed<seed>.pt if absent) or a given RANDOM .pt; every output is "
        "labelled random_weights: true")
    device: str | None = option(None, "cuda, cuda:1, cpu (default: cuda when available)")
    precision: str = option("auto", "auto: bf16 (or fp16) autocast on GPU, fp32 on CPU", choices=PRECISION_CHOICES)
    toks_per_batch: int | None = option(None, "padded tokens per batch (default: 16384 on GPU, on CPU 1024 per "
                                        "thread up to 4096)")
    window: int = option(WINDOW, "longest piece run at once")
    overlap: int = option(OVERLAP, "minimum overlap of the windows of longer sequences")
    truncate: bool = option(False, "embed only the first --window residues of longer sequences (their other rows "
                            "are NaN); default: overlapping windows, every residue embedded")
    max_residues: int | None = option(None, "instead of everything, embed a seeded uniform sample of this many "
                                      "train residues (plus val residues for stage 03's evaluation) into sample.h5")
    max_val_residues: int | None = option(None, "val residues in the sample (default min(--max-residues, 100000))")
    seed: int = option(0, "sample seed, and the seed of a random test checkpoint")
    block_residues: int = option(1 << 18, "residues per resumable block inside a DB shard")
    overwrite: bool = option(False, "redo this task's shards even if they exist")

    @property
    def out_dir(self) -> Path:
        """--out, else ``data/embeddings/<model>_L<layer>`` (`default_out_dir`)."""
        return Path(self.out) if self.out else default_out_dir(self.model, self.layer)

    @property
    def mode(self) -> str:
        return "sample" if self.max_residues is not None else "full"


def default_out_dir(spec: str, layer: int | None) -> Path:
    """``data/embeddings/<model>_L<layer>`` for a model name or checkpoint path."""
    name = Path(spec).stem if spec.endswith(".pt") else spec
    if layer is None or layer < 0:
        n = model_num_layers(spec)
        if n is None:
            raise ValueError(f"cannot tell the number of layers of {spec!r} from its name; pass --layer or --out")
        layer = resolve_layer(n, layer)
    return layout.embeddings_dir(name, layer)


def _work(out: Path) -> Path:
    return out / "work"


def _done_file(out: Path, mode: str, k: int) -> Path:
    """What a finished DB shard leaves: its shard file (full mode) or its sample part (sample mode)."""
    return out / shard_file(k) if mode == "full" else _work(out) / f"sample_{k:05d}.npz"


def _parts_dir(out: Path, k: int) -> Path:
    """The finished blocks of a DB shard not yet assembled into its shard file (full mode)."""
    return _work(out) / f"shard_{k:05d}"


def _shard_report(out: Path, k: int) -> Path:
    return _work(out) / f"shard_{k:05d}.json"


class _Meter:
    """Progress bar in residues (tqdm shows residues/s) plus a log line every `every` seconds."""

    def __init__(self, total: int, desc: str, every: float = 30.0):
        self.bar = progress(total=total, desc=desc, unit="res", unit_scale=True)
        self.total, self.done, self.desc, self.every = total, 0, desc, every
        self.t0 = self.last = time.time()

    def __call__(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            log.info("%s: %d/%d residues (%.0f residues/s)", self.desc, self.done, self.total, rate)

    def close(self) -> float:
        self.bar.close()
        return time.time() - self.t0


def _stamp(cfg: ExtractConfig, info: dict, layer: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "model": info["name"], "model_path": info["path"],
            "layer": layer, "num_layers": info["num_layers"], "dim": info["embed_dim"], "dtype": "float16",
            "random_weights": bool(info["random_weights"]), "window": cfg.window, "overlap": cfg.overlap,
            "truncate": cfg.truncate}


def _embed_db_shard(cfg: ExtractConfig, k: int, shard, model, alphabet, info: dict, layer: int, device) -> dict:
    """Full mode, one DB shard -> ``shard_0000k.h5`` via resumable block parts. Returns its work report."""
    path = _done_file(cfg.out_dir, "full", k)
    parts_dir = _parts_dir(cfg.out_dir, k)
    a = shard.arrays
    offsets, ids = a["offsets"], a["id"]
    aa = a["aa"].tobytes().decode("ascii")
    lengths = np.diff(offsets)
    seqs = [aa[offsets[j]:offsets[j + 1]] for j in range(len(ids))]
    blocks = [(int(b[0]), int(b[-1]) + 1) for b in
              budget_batches(lengths, cfg.block_residues, padded=False, order=np.arange(len(lengths)))] or [(0, 0)]
    todo = [b for b in range(len(blocks)) if not (parts_dir / f"part_{b:05d}.npy").exists()]
    if len(todo) < len(blocks):
        log.info("DB shard %d: resuming, %d of %d blocks already done", k, len(blocks) - len(todo), len(blocks))
    meter = _Meter(int(sum(lengths[blocks[b][0]:blocks[b][1]].sum() for b in todo)), f"shard {k}")
    D = info["embed_dim"]
    for b in todo:
        j0, j1 = blocks[b]
        vecs = embed(model, alphabet, seqs[j0:j1], toks_per_batch=cfg.toks_per_batch, layer=layer, device=device,
                     window=cfg.window, truncate=cfg.truncate, overlap=cfg.overlap, precision=cfg.precision,
                     on_batch=meter)
        block = np.full((int(lengths[j0:j1].sum()), D), np.nan, dtype=STORE_DTYPE)
        r = 0
        for j, v in zip(range(j0, j1), vecs):
            block[r:r + len(v)] = v      # truncated entries keep NaN rows past the window
            r += int(lengths[j])
        with atomic_path(parts_dir / f"part_{b:05d}.npy", suffix=".npy") as tmp:
            np.save(tmp, block)
    seconds = meter.close()
    n_windows = np.array([0 if L == 0 else (1 if cfg.truncate else len(windows(int(L), cfg.window, cfg.overlap)))
                          for L in lengths], dtype=np.uint16)
    R = int(offsets[-1])
    attrs = _stamp(cfg, info, layer) | {"db_shard": str(shard.path.name), "n_entries": len(ids), "n_residues": R}
    write_shard(path, attrs, offsets, ids, n_windows, D,
                ((offsets[j0], offsets[j1], np.load(parts_dir / f"part_{b:05d}.npy", mmap_mode="r"))
                 for b, (j0, j1) in enumerate(blocks) if j1 > j0 and offsets[j1] > offsets[j0]))
    shutil.rmtree(parts_dir, ignore_errors=True)
    done = int(sum(lengths[blocks[b][0]:blocks[b][1]].sum() for b in todo))
    rep = {"db_shard": k, "file": path.name, "n_entries": len(ids), "n_residues": R,
           "n_long": int((n_windows > 1).sum()), "n_truncated": int((lengths > cfg.window).sum()) if cfg.truncate else 0,
           "seconds": seconds, "residues_embedded_now": done, "residues_per_s": done / max(seconds, 1e-9)}
    write_json_atomic(_shard_report(cfg.out_dir, k), rep)
    return rep


def _sample_db_shard(cfg: ExtractConfig, k: int, shard, picks: dict, model, alphabet, info, layer, device) -> dict:
    """Sample mode, one DB shard -> ``work/sample_0000k.npz`` (the sampled residues of its entries)."""
    part = _done_file(cfg.out_dir, "sample", k)
    a = shard.arrays
    offsets = a["offsets"]
    cols = {n: [] for n in ("split", "entry", "pos", "emb", "aa", "ss")}
    uniq_all = [np.unique(g) - shard.first_index for g, _ in picks.values()]
    total = sum(len(u) for u in uniq_all)
    meter = _Meter(int(sum(np.diff(offsets)[u].sum() for u in uniq_all)), f"sample shard {k}")
    for split_code, (g, pos) in picks.items():
        uniq, inv = np.unique(g, return_inverse=True)
        local = uniq - shard.first_index
        seqs = [a["aa"][offsets[j]:offsets[j + 1]].tobytes().decode("ascii") for j in local]
        vecs = embed(model, alphabet, seqs, toks_per_batch=cfg.toks_per_batch, layer=layer, device=device,
                     window=cfg.window, truncate=False, overlap=cfg.overlap, precision=cfg.precision, on_batch=meter)
        cols["emb"].append(np.stack([vecs[i][p] for i, p in zip(inv, pos)]).astype(STORE_DTYPE) if len(g)
                           else np.zeros((0, info["embed_dim"]), STORE_DTYPE))
        rows = offsets[g - shard.first_index] + pos
        cols["aa"].append(a["aa"][rows])
        cols["ss"].append(a["ss"][rows])
        cols["split"].append(np.full(len(g), split_code, np.uint8))
        cols["entry"].append(g)
        cols["pos"].append(pos)
    seconds = meter.close()
    arrays = {n: (np.concatenate(v) if v else np.zeros(0)) for n, v in cols.items()}
    with atomic_path(part, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    rep = {"db_shard": k, "file": part.name, "n_entries_embedded": total, "n_residues": meter.done,
           "n_sampled": int(len(arrays["entry"])), "seconds": seconds,
           "residues_per_s": meter.done / max(seconds, 1e-9)}
    write_json_atomic(_shard_report(cfg.out_dir, k), rep)
    return rep


def _check_existing(cfg: ExtractConfig, mode: str) -> bool:
    """True when the output is complete (nothing to do). Refuses to mix modes or models in one directory."""
    mpath = cfg.out_dir / "manifest.json"
    if mpath.exists():
        m = read_json(mpath)
        if m.get("mode") != mode:
            die(f"{mpath.parent} already holds mode={m.get('mode')} embeddings; pass --overwrite or another --out")
        return True
    return False


def run_extract(cfg: ExtractConfig, num_tasks: int = 1, task_index: int = 0) -> list[dict]:
    """One array task of stage 02: embeds its DB shards (full mode) or its part of the sample."""
    from .db import SPLIT_CODES, ProteinDB

    db = ProteinDB(cfg.db)
    out, mode = cfg.out_dir, cfg.mode
    if cfg.overwrite:
        _clear_outputs(cfg, db, num_tasks, task_index)
    elif _check_existing(cfg, mode):
        log.info("%s is complete (manifest.json exists); nothing to do (use --overwrite to redo)", out)
        return []
    units = my_units(len(db.shards), num_tasks, task_index)
    pending = [k for k in units if not _done_file(out, mode, k).exists()]
    if not pending:
        log.info("task %d/%d: all %d of its DB shards are done", task_index, num_tasks, len(units))
        return []
    device = pick_device(cfg.device)
    model, alphabet, info = load_esm(cfg.model, allow_random=cfg.random_weights_for_testing, device=device)
    layer = resolve_layer(info["num_layers"], cfg.layer)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(cfg, info, layer)
    stamp_path = _work(out) / "stamp.json"
    if stamp_path.exists() and read_json(stamp_path) != stamp:
        die(f"{out} holds unfinished work made with other settings ({stamp_path}); pass --overwrite")
    write_json_atomic(stamp_path, stamp)
    log.info("task %d/%d: %s mode, %d DB shards to do (%s), %s layer %d, device %s%s", task_index, num_tasks, mode,
             len(pending), pending[:8], info["name"], layer, device,
             " -- RANDOM WEIGHTS (test/demo only)" if info["random_weights"] else "")
    reports = []
    if mode == "full":
        for k in pending:
            reports.append(_embed_db_shard(cfg, k, db.shards[k], model, alphabet, info, layer, device))
            db.shards[k].release()
            log.info("DB shard %d: %d residues in %.1f s (%.0f residues/s)", k, reports[-1]["n_residues"],
                     reports[-1]["seconds"], reports[-1]["residues_per_s"])
    else:
        train = sample_residues(db, "train", cfg.max_residues, cfg.seed)
        val_n = cfg.max_val_residues if cfg.max_val_residues is not None else min(cfg.max_residues, 100_000)
        val = sample_residues(db, "val", val_n, cfg.seed)
        for k in pending:
            picks = {}
            if k in train:
                picks[SPLIT_CODES["train"]] = train[k]
            if k in val:
                picks[SPLIT_CODES["val"]] = val[k]
            reports.append(_sample_db_shard(cfg, k, db.shards[k], picks, model, alphabet, info, layer, device))
            db.shards[k].release()
    return reports


def _clear_outputs(cfg: ExtractConfig, db, num_tasks: int, task_index: int) -> None:
    """--overwrite: remove this task's shard outputs, their work files, and the manifest/report."""
    out = cfg.out_dir
    for k in my_units(len(db.shards), num_tasks, task_index):
        for p in (_done_file(out, "full", k), _done_file(out, "sample", k), _shard_report(out, k)):
            p.unlink(missing_ok=True)
        shutil.rmtree(_parts_dir(out, k), ignore_errors=True)
    for name in ("manifest.json", "sample.h5", "report.json", "report.png"):
        (out / name).unlink(missing_ok=True)
    (_work(out) / "stamp.json").unlink(missing_ok=True)


def finalize(cfg: ExtractConfig) -> dict:
    """Check every DB shard is done, write sample.h5 (sample mode), report.json/.png, then manifest.json."""
    from .db import SPLIT_CODES, ProteinDB

    db = ProteinDB(cfg.db)
    out, mode = cfg.out_dir, cfg.mode
    if not cfg.overwrite and _check_existing(cfg, mode):
        log.info("%s already finalized", out)
        return read_json(out / "manifest.json")
    stamp_path = _work(out) / "stamp.json"
    if not stamp_path.exists():
        die(f"{out}: no stage-02 work found; run the extraction tasks first")
    stamp = read_json(stamp_path)
    n = len(db.shards)
    missing = [k for k in range(n) if not _done_file(out, mode, k).exists()]
    if missing:
        die(f"{out}: {len(missing)} of {n} DB shards not embedded yet (e.g. {missing[:10]}); "
            "run (or re-run) their array tasks first")
    reports = [read_json(_shard_report(out, k)) for k in range(n)]
    manifest = dict(stamp)
    manifest.update({"mode": mode, "db": str(Path(cfg.db)), "db_n_entries": int(db.n_total)})
    if mode == "full":
        shards = []
        for k in range(n):
            sh = EmbeddingShard(_done_file(out, "full", k))
            if sh.attrs.get("model") != stamp["model"] or int(sh.attrs.get("layer")) != stamp["layer"]:
                die(f"{sh.path}: made with {sh.attrs.get('model')} layer {sh.attrs.get('layer')}, "
                    f"expected {stamp['model']} layer {stamp['layer']}; pass --overwrite")
            shards.append({"file": shard_file(k), "db_file": db.manifest["shards"][k]["file"],
                           "n_entries": len(sh), "n_residues": int(sh.shape[0])})
        manifest["shards"] = shards
        manifest["n_residues"] = int(sum(s["n_residues"] for s in shards))
    else:
        # one part (DB shard) in memory at a time: count each split, then fill preallocated datasets.
        # Entries are global DB indices, so parts in shard order, each sorted by (entry, pos), are in
        # global residue order.
        parts = [_done_file(out, "sample", k) for k in range(n)]
        counts = dict.fromkeys(SAMPLE_SPLITS, 0)
        for part in parts:
            with np.load(part) as z:
                codes = z["split"]
            for split in counts:
                counts[split] += int((codes == SPLIT_CODES[split]).sum())

        def sorted_parts():   # each part sorted by (split, entry, pos) one column at a time: a run per split
            for part in parts:
                with np.load(part) as z:
                    p = {c: z[c] for c in z.files}
                order = np.lexsort((p["pos"], p["entry"], p["split"]))
                for c in p:
                    p[c] = p[c][order]
                runs = {split: np.searchsorted(p["split"], [SPLIT_CODES[split], SPLIT_CODES[split] + 1])
                        for split in counts}
                yield {split: {c: v[a:b] for c, v in p.items()} for split, (a, b) in runs.items()}

        write_sample(out / "sample.h5", stamp, counts, sorted_parts())
        manifest["sample"] = {"file": "sample.h5", "seed": cfg.seed, "max_residues": cfg.max_residues,
                              "max_val_residues": cfg.max_val_residues, "n_train": counts["train"],
                              "n_val": counts["val"]}
        manifest["n_residues"] = counts["train"] + counts["val"]
    report = write_extract_report(out, manifest, reports, cfg.window)
    manifest["report"] = "report.json"
    write_json_atomic(out / "manifest.json", manifest)
    log.info("stage 02 finalized: %s (%s mode, %d residues%s)", out, mode, manifest["n_residues"],
             ", RANDOM WEIGHTS" if manifest["random_weights"] else "")
    return manifest | {"report_summary": report["summary"]}
