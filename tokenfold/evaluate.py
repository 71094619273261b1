"""Stage 06: given only the sequence, how close is the predicted structure?

For every example of the held-out split (test by default) of the token shards a checkpoint was
trained on:

1. generate its structure tokens from the amino acids (constrained, greedy unless sampling is asked
   for; `tokenfold.generate`), and once more unconstrained to measure validity / length match;
2. score the true tokens teacher-forced (`tokenfold.teacher_forcing`): perplexity (exp of the mean
   NLL over the training targets, structure tokens + <eos>) and teacher-forced accuracy;
3. for decodable kinds (``geo``, ``kanzi``) decode the predicted tokens, the true tokens (the
   tokenizer's ceiling) and two baseline token sequences to C-alpha traces and compare each with the
   true C-alpha of the DB (`tokenfold.metrics`). Cropped examples (stage 04 ``crop_start``) are
   compared with the same residues of the true chain;
4. compare token accuracy with the baselines fitted on the train split (`tokenfold.baselines`).

Work is split into units = (DB shard, chunk of ``--chunk-size`` examples): a SLURM array task takes
the DB shards `sharding.my_units` gives it and writes one work part per chunk (atomically), so a
killed run resumes at the first missing part. A task reads each of its DB shards once, for all of
that shard's chunks (`Evaluation.unit_rows`), and the proteins' ids and DB positions from the token
index one shard at a time. `tokenfold.eval_report.finalize` merges the parts into the report,
streaming them. Files: see data/README.md, section stage 06.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import atomic_path, read_json, write_json_atomic
from .baselines import Baselines, train_examples
from .cli import die, option, progress
from .inference import DECODABLE, Decoding, load_decoder, load_model
from .metrics import TRACE_METRICS, trace_metrics
from .sharding import my_units
from .vocab import Vocab

log = logging.getLogger("tokenfold.evaluate")

TRACES = ("pred", "ceiling", "base_most_frequent", "base_per_aa")  # decoded traces compared with the truth
RAGGED = ("true_codes", "pred_codes", "tf_codes", "true_ca", "pred_ca")   # per-protein arrays of a part (offsets)
PART_VERSION = 1


# ----------------------------------------------------------------------------- configuration
@dataclass
class EvalConfig:
    """What stage 06 evaluates and how; one flag of 06_evaluate.py per field (decoding: `Decoding`'s)."""

    checkpoint: str = option(help="checkpoint dir or run dir of stage 05 (default data/runs/<run>/final)")
    out: str = option(help="output dir (default data/eval/<run>)")
    tokens: str | None = option(None, "token shards dir (default data/tokens/<kind>[_interleaved])")
    db: str | None = option(None, "protein DB with the true C-alpha (default: the DB the token manifest names, "
                                  f"else {layout.DB})")
    split: str = option("test", "split to evaluate", choices=("test", "val", "train"))
    max_proteins: int | None = option(None, "only the first N examples of the split (quick looks)")
    chunk_size: int = option(512, "proteins per work part (resume granularity)")
    unconstrained: bool = option(True, "the unconstrained generation pass (validity and length-match rates); "
                                       "--no-unconstrained skips it")
    baseline_max_residues: int = option(200_000, "train residues used to fit the baselines (seeded sample of "
                                                 "whole proteins)")
    window_baseline: str = option("auto", "fit the windowed logistic-regression baseline (auto: for 3Di only)",
                                  choices=("auto", "yes", "no"))
    n_pdb: int = option(100, "write pred-vs-true PDB files for this many proteins")
    n_pictures: int = option(3, "proteins drawn in ca_traces_3d.png (best, median, worst TM-score)", cli=False)
    decoding: Decoding = field(default_factory=Decoding)

    def fingerprint(self, ckpt: Path) -> dict:
        """What the results depend on (not where or how fast they are computed)."""
        from .device import pick_device, pick_dtype

        d = self.decoding
        weights = sorted(p for p in ckpt.glob("*.safetensors")) or sorted(ckpt.glob("*.bin"))
        return {"checkpoint": str(ckpt.resolve()),
                "weights": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weights],
                "tokens": str(Path(self.tokens).resolve()) if self.tokens else None, "split": self.split,
                "sampling": asdict(d.sampling()), "unconstrained": self.unconstrained,
                "max_proteins": self.max_proteins, "chunk_size": self.chunk_size,
                "baseline_max_residues": self.baseline_max_residues, "seed": d.seed,
                "kanzi_checkpoint": d.kanzi_checkpoint,
                "dtype": str(pick_dtype(d.dtype, pick_device(d.device))),  # auto: bf16 on GPU, fp32 on CPU
                "db": str(Path(self.db).resolve()) if self.db else None}


def check_same_vocab(a: Vocab, b: Vocab, where: str) -> None:
    if (a.kind, a.interleaved, a.struct_symbols) != (b.kind, b.interleaved, b.struct_symbols):
        raise ValueError(f"{where}: vocabulary ({b.kind}, interleaved={b.interleaved}, {b.n_struct} tokens) differs "
                         f"from the checkpoint's ({a.kind}, interleaved={a.interleaved}, {a.n_struct} tokens)")


def check_lengths(lengths: np.ndarray, n_positions: int | None, what: str, vocab: Vocab) -> None:
    """The length rule of stages 05 and 06: every example evaluated fits the model's positions. A model
    that cannot hold some is refused (one line): leaving them out would favour short chains."""
    long = int((lengths > n_positions).sum()) if n_positions and len(lengths) else 0
    if long:
        raise ValueError(f"{long} of {len(lengths)} {what} are longer than the model's {n_positions} positions "
                         f"(up to {int(lengths.max())} tokens), and leaving them out would favour short chains: "
                         f"evaluate tokens made with 04_tokenize.py --max-length {vocab.max_residues(n_positions)}, "
                         "or a model trained with stage 05's default --max-len")


# ----------------------------------------------------------------------------- units of work
def split_units(ds, db, chunk_size: int, max_proteins: int | None) -> dict[int, list[np.ndarray]]:
    """DB shard -> list of chunks (example indices into the token dataset), in dataset order."""
    n = len(ds) if max_proteins is None else min(len(ds), max_proteins)
    shard_of = np.searchsorted(db.shard_starts, ds.db_index[:n], side="right") - 1
    units: dict[int, list[np.ndarray]] = {}
    for k in range(len(db.shards)):
        idx = np.flatnonzero(shard_of == k)
        units[k] = [idx[i:i + chunk_size] for i in range(0, len(idx), chunk_size)] or [idx]
    return units


def part_path(work: Path, shard: int, chunk: int) -> Path:
    return work / f"part_{shard:05d}_{chunk:04d}.npz"


def _ragged(arrays, dtype, width=None) -> tuple[np.ndarray, np.ndarray]:
    shape = (0,) if width is None else (0, width)
    data = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(shape, dtype)
    off = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)
    return data, off


def _unragged(data, off) -> list[np.ndarray]:
    return [data[off[i]:off[i + 1]] for i in range(len(off) - 1)]


# ----------------------------------------------------------------------------- one chunk
def protein_rows(ds, sh, idx: np.ndarray, vocab: Vocab) -> tuple[list[dict], list[tuple]]:
    """What the evaluation needs of the token examples `idx` (all in DB shard `sh`): tokens, true
    C-alpha and chain segments, checked against the DB entry; and (id, reason) of those skipped.
    Reads the shard's arrays (`sh.arrays`, loaded once and kept until the caller releases the shard)."""
    rows, skipped = [], []
    for i in idx:
        ids = np.asarray(ds[int(i)], dtype=np.int64)
        aa, codes = vocab.decode(ids)
        pid, g, crop, n = ds.meta(int(i))
        if len(aa) != n or len(codes) != n:
            skipped.append((pid, f"token example has {len(aa)} residues / {len(codes)} tokens, index says {n}"))
            continue
        rec = sh.record(g - sh.first_index)
        if rec.id != pid:
            skipped.append((pid, f"DB entry {g} is {rec.id!r}, token shard says {pid!r}"))
            continue
        true_aa = rec.aa[crop:crop + n]
        if len(true_aa) != n or not np.array_equal(vocab.aa_ids(true_aa), vocab.aa_ids(aa)):
            skipped.append((pid, f"amino acids of residues {crop}..{crop + n} of the DB entry differ from the tokens"))
            continue
        ca = rec.ca[crop:crop + n].astype(np.float32) if rec.ca is not None else np.full((n, 3), np.nan, np.float32)
        starts = (rec.gap_before[crop:crop + n].copy() if rec.gap_before is not None else np.zeros(n, bool))
        starts[0] = True  # segments of the true chain (chain breaks) within the example
        rows.append(dict(id=pid, db_index=g, crop_start=crop, aa=aa, ids=ids, true=codes, ca=ca, starts=starts))
    return rows, skipped


def evaluate_chunk(model, vocab: Vocab, rows: list[dict], skipped: list[tuple], cfg: EvalConfig, decoder,
                   base: Baselines | None, chunk_seed: int) -> dict:
    """Everything per protein for the rows of `protein_rows` (one work part)."""
    from .generate import generate  # torch: imported when there is work, not for --help
    from .teacher_forcing import teacher_forced

    seqs = [r["aa"] for r in rows]
    d = cfg.decoding
    gen = generate(model, vocab, seqs, sampling=d.sampling(seed=chunk_seed), batch_size=d.batch_size,
                   max_batch_tokens=d.max_batch_tokens)
    tf = teacher_forced(model, vocab, [r["ids"] for r in rows], d.batch_size, d.max_batch_tokens)
    unc = (generate(model, vocab, seqs, constrained=False, batch_size=d.batch_size,
                    max_batch_tokens=d.max_batch_tokens) if cfg.unconstrained else None)
    n = len(rows)
    tm = np.full((len(TRACES), n, len(TRACE_METRICS)), np.nan)
    pred_ca = [np.full((len(s), 3), np.nan, np.float32) for s in seqs]
    if decoder is not None and n:
        per_trace = {"pred": [x.codes for x in gen], "ceiling": [r["true"] for r in rows]}
        if base is not None:
            per_trace["base_most_frequent"] = [base.predict("most_frequent", s) for s in seqs]
            per_trace["base_per_aa"] = [base.predict("per_aa", s) for s in seqs]
        for t, name in enumerate(TRACES):
            if name not in per_trace:
                continue
            decoded = decoder.decode_many(per_trace[name])
            if name == "pred":
                pred_ca = [np.asarray(d, np.float32) for d in decoded]
            for j, (d, r) in enumerate(zip(decoded, rows)):
                m = trace_metrics(d, r["ca"], r["aa"], r["starts"])
                tm[t, j] = [m[k] for k in TRACE_METRICS]
    true_codes, off = _ragged([r["true"] for r in rows], np.int64)
    return {
        "version": np.array(PART_VERSION),
        "ids": np.array([r["id"] for r in rows], dtype=str) if rows else np.zeros(0, "<U1"),
        "db_index": np.array([r["db_index"] for r in rows], np.int64),
        "crop_start": np.array([r["crop_start"] for r in rows], np.int64),
        "n_breaks": np.array([int(r["starts"][1:].sum()) for r in rows], np.int64),
        "aa": np.array(seqs, dtype=str) if rows else np.zeros(0, "<U1"),
        "offsets": off,
        "true_codes": true_codes,
        "pred_codes": _ragged([x.codes for x in gen], np.int64)[0],
        "tf_codes": _ragged([x.pred_codes for x in tf], np.int64)[0],
        "nll": np.array([x.nll for x in tf], np.float64),
        "n_targets": np.array([x.n_targets for x in tf], np.int64),
        "unc_valid": np.array([x.valid for x in unc], bool) if unc else np.zeros(n, bool),
        "unc_length_match": np.array([x.length_match for x in unc], bool) if unc else np.zeros(n, bool),
        "unc_n": np.array([len(x.codes) for x in unc], np.int64) if unc else np.full(n, -1, np.int64),
        "trace_metrics": tm,
        "true_ca": _ragged([r["ca"] for r in rows], np.float32, 3)[0],
        "pred_ca": _ragged(pred_ca, np.float32, 3)[0],
        "skipped": np.array(json.dumps(skipped)),
    }


# ----------------------------------------------------------------------------- the stage
class Evaluation:
    """One evaluation directory: `run_units` (an array task's share, resumable) and `iter_parts` for
    `tokenfold.eval_report.finalize`."""

    def __init__(self, cfg: EvalConfig):
        from .db import ProteinDB
        from .hf_vocab import token_dataset

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.work = self.out / "work"
        self._model = None
        self._decoder = None
        from .checkpoint import resolve

        self.ckpt = resolve(cfg.checkpoint)
        self.vocab = Vocab.load(self.ckpt / "vocab.json")
        if cfg.tokens is None:
            cfg.tokens = str(layout.tokens_dir(self.vocab.kind, self.vocab.interleaved))
        self.tokens = Path(cfg.tokens)
        if not (self.tokens / "vocab.json").exists():
            raise FileNotFoundError(f"{self.tokens}: no token shards (vocab.json missing); pass --tokens")
        self.token_vocab = Vocab.load(self.tokens / "vocab.json")   # the shards' ids (the model's may be offset)
        check_same_vocab(self.vocab, self.token_vocab, str(self.tokens))
        if cfg.db is None:
            mf = self.tokens / "manifest.json"
            named = read_json(mf).get("db") if mf.exists() else None
            cfg.db = named if named and Path(named).exists() else str(layout.DB)
        self.db = ProteinDB(cfg.db)
        self.ds = token_dataset(self.tokens, cfg.split, self.vocab)   # in the model's ids (tokenfold/hf_vocab.py)
        if len(self.ds) == 0:
            raise ValueError(f"{self.tokens}: the {cfg.split!r} split has no examples")
        self.units = split_units(self.ds, self.db, cfg.chunk_size, cfg.max_proteins)
        n = len(self.ds) if cfg.max_proteins is None else min(len(self.ds), cfg.max_proteins)
        check_lengths(self.ds.lengths[:n], read_json(self.ckpt / "config.json").get("max_position_embeddings"),
                      f"{cfg.split} examples of {self.tokens}", self.vocab)
        self.fp = cfg.fingerprint(self.ckpt)
        self.fp_hash = hashlib.sha256(json.dumps(self.fp, sort_keys=True).encode()).hexdigest()

    def status(self) -> str:
        """'todo', 'done' (metrics.json of this configuration) or 'other' (of a different one)."""
        mpath = self.out / "metrics.json"
        if not mpath.exists():
            return "todo"
        return "done" if read_json(mpath).get("config_hash") == self.fp_hash else "other"

    @property
    def model(self):
        if self._model is None:
            self._model, _, _ = load_model(self.ckpt, self.cfg.decoding)
        return self._model

    def decoder(self):
        if self.vocab.kind not in DECODABLE:
            return None
        if self._decoder is None:
            self._decoder = load_decoder(self.vocab, [self.tokens, self.ckpt], self.cfg.decoding.kanzi_checkpoint)
        return self._decoder

    def _check_work_config(self, overwrite: bool) -> None:
        cpath = self.work / "config.json"
        if cpath.exists():
            old = read_json(cpath)
            if old.get("hash") != self.fp_hash:
                if not overwrite:
                    die(f"{self.work} holds results of a different configuration ({cpath}); "
                        "rerun with --overwrite to start again")
                shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        if not cpath.exists():
            write_json_atomic(cpath, {"hash": self.fp_hash, **self.fp})

    def fit_baselines(self, windowed: bool) -> Baselines | None:
        """Baselines fitted on the train split of the token dir (None, with a warning, when it has none)."""
        v = self.vocab
        try:
            seed = self.cfg.decoding.seed
            train = train_examples(self.tokens, self.token_vocab, seed=seed)   # the shards' own ids
            return Baselines.fit(train, v.n_struct, windowed=windowed,
                                 max_residues=self.cfg.baseline_max_residues, seed=seed)
        except ValueError as e:
            log.warning("no baselines: %s (%s has no train examples)", e, self.tokens)
            return None

    def todo_units(self, num_tasks: int = 1, task_index: int = 0, overwrite: bool = False) -> list[tuple]:
        """(DB shard, chunk, example indices) of this task's parts that are missing, in unit order."""
        todo = []
        for k in my_units(len(self.db.shards), num_tasks, task_index):
            for c, idx in enumerate(self.units[k]):
                p = part_path(self.work, k, c)
                if overwrite and p.exists():
                    p.unlink()
                if not p.exists():
                    todo.append((k, c, idx))
        return todo

    def unit_rows(self, todo: list[tuple]):
        """(shard, chunk, rows, skipped) of each unit of `todo` (`protein_rows`). Each DB shard is read
        once, for all of its chunks, and released after its last one: memory stays at one DB shard."""
        for j, (k, c, idx) in enumerate(todo):
            sh = self.db.shards[k]
            rows, skipped = protein_rows(self.ds, sh, idx, self.vocab)
            if j + 1 == len(todo) or todo[j + 1][0] != k:
                sh.release()
            yield k, c, rows, skipped

    def run_units(self, num_tasks: int = 1, task_index: int = 0, overwrite: bool = False) -> int:
        """Compute this task's missing parts. Returns how many parts it wrote."""
        self._check_work_config(overwrite)
        mine = my_units(len(self.db.shards), num_tasks, task_index)
        todo = self.todo_units(num_tasks, task_index, overwrite)
        n_all = sum(len(self.units[k]) for k in mine)
        log.info("evaluate: %d of %d parts to do (DB shards %s), %s split, checkpoint %s",
                 len(todo), n_all, mine if len(mine) < 10 else f"{len(mine)} shards", self.cfg.split, self.ckpt)
        if not todo:
            return 0
        decoder = self.decoder()
        # the token-frequency baselines (cheap, no classifier) give the baseline traces of decodable kinds
        base = self.fit_baselines(windowed=False) if decoder is not None else None
        t0, n_prot = time.time(), 0
        bar = progress(total=len(todo), desc="evaluate", unit="part")
        for k, c, rows, skipped in self.unit_rows(todo):
            res = evaluate_chunk(self.model, self.vocab, rows, skipped, self.cfg, decoder, base,
                                 chunk_seed=self.cfg.decoding.seed * 1_000_003 + k * 1009 + c)
            res["fingerprint"] = np.array(self.fp_hash)
            with atomic_path(part_path(self.work, k, c), suffix=".npz") as tmp:
                np.savez(tmp, **res)
            n_prot += len(rows) + len(skipped)
            bar.update(1)
            log.info("evaluate: part %d/%d of shard %d done (%d proteins, %.1f proteins/s overall)",
                     c + 1, len(self.units[k]), k, len(rows) + len(skipped), n_prot / max(time.time() - t0, 1e-9))
        bar.close()
        return len(todo)

    # ------------------------------------------------------------------------- the parts, for finalize
    def part_paths(self) -> list[Path]:
        """Every part of this evaluation, in unit order (a one-line error when one is missing)."""
        paths = [part_path(self.work, k, c) for k in sorted(self.units) for c in range(len(self.units[k]))]
        missing = [p for p in paths if not p.exists()]
        if missing:
            die(f"{len(missing)} work parts are missing (first: {missing[0]}); run the array tasks first")
        return paths

    def read_part(self, path: Path, keys=None) -> dict:
        """One part (or only its `keys`), checked to be of this configuration; ragged arrays as lists."""
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != self.fp_hash:
                die(f"{path} was made with a different configuration; rerun with --overwrite")
            keys = list(keys or z.files)
            if any(key in RAGGED for key in keys) and "offsets" not in keys:
                keys.append("offsets")
            d = {key: z[key] for key in keys}
        if "offsets" in d:
            for key in RAGGED:
                if key in d:
                    d[key] = _unragged(d[key], d["offsets"])
        if "skipped" in d:
            d["skipped"] = [tuple(x) for x in json.loads(str(d["skipped"]))]
        return d

    def iter_parts(self, keys=None):
        """The parts one at a time, in unit order (`tokenfold.eval_report.finalize` streams them)."""
        for p in self.part_paths():
            yield self.read_part(p, keys)
