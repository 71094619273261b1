"""Stage 06: given only the prompt part, how close is the generated part to the truth?

The checkpoint's vocabulary says the direction (`tokenfold.vocab`): seq2struct (structure tokens
from the sequence) or struct2seq (a sequence designed from the structure tokens: inverse folding).
For every example of the held-out split (test by default) of the token shards a checkpoint was
trained on:

1. generate its target tokens from its source (constrained, greedy unless sampling is asked for;
   `tokenfold.generate`), and once more unconstrained to measure validity / length match;
2. score the true tokens teacher-forced (`tokenfold.teacher_forcing`): perplexity (exp of the mean
   NLL over the training targets, target tokens + <eos>) and teacher-forced accuracy;
3. seq2struct, decodable kinds (``geo``, ``kanzi``): decode the predicted tokens, the true tokens (the
   tokenizer's ceiling) and two baseline token sequences to C-alpha traces and compare each with the
   true C-alpha of the DB (`tokenfold.metrics`). Cropped examples (stage 04 ``crop_start``) are
   compared with the same residues of the true chain;
4. struct2seq with ``consistency_checkpoint`` (a seq2struct model of the same token kind): fold the
   designed sequences, and the native ones for reference, back into structure tokens and keep them
   for their agreement with the input's tokens (self-consistency, a cheap analogue of scTM);
5. compare token accuracy (struct2seq: native sequence recovery) with the baselines fitted on the
   train split (`tokenfold.baselines`).

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
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import atomic_path, read_json, write_json_atomic
from .baselines import Baselines, train_examples
from .cli import die, progress
from .eval_config import (
    EvalConfig,
    check_consistency_vocab,
    check_lengths,
    check_same_vocab,
)
from .inference import DECODABLE, load_decoder, load_model
from .metrics import TRACE_METRICS, trace_metrics
from .sharding import my_units
from .vocab import Vocab

log = logging.getLogger("tokenfold.evaluate")

TRACES = ("pred", "ceiling", "base_most_frequent", "base_per_aa")  # decoded traces compared with the truth
RAGGED = ("true_codes", "src_codes", "pred_codes", "tf_codes", "true_ca", "pred_ca",   # per-protein arrays of a
          "cons_codes", "cons_native_codes")                                          # part (offsets)
PART_VERSION = 2


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
        rows.append(dict(id=pid, db_index=g, crop_start=crop, aa=aa, codes=codes, ids=ids, src=vocab.source(aa, codes),
                         src_codes=vocab.source_codes(aa, codes), true=vocab.target_codes(aa, codes), ca=ca,
                         starts=starts))
    return rows, skipped


def evaluate_chunk(model, vocab: Vocab, rows: list[dict], skipped: list[tuple], cfg: EvalConfig, decoder,
                   base: Baselines | None, chunk_seed: int, folder=None) -> dict:
    """Everything per protein for the rows of `protein_rows` (one work part); `folder`: the (model,
    vocab) of the self-consistency check (struct2seq), or None."""
    from .generate import generate  # torch: imported when there is work, not for --help
    from .teacher_forcing import teacher_forced

    srcs = [r["src"] for r in rows]
    d = cfg.decoding
    gen = generate(model, vocab, srcs, sampling=d.sampling(seed=chunk_seed), batch_size=d.batch_size,
                   max_batch_tokens=d.max_batch_tokens)
    tf = teacher_forced(model, vocab, [r["ids"] for r in rows], d.batch_size, d.max_batch_tokens)
    unc = (generate(model, vocab, srcs, constrained=False, batch_size=d.batch_size,
                    max_batch_tokens=d.max_batch_tokens) if cfg.unconstrained else None)
    n = len(rows)
    tm = np.full((len(TRACES), n, len(TRACE_METRICS)), np.nan)
    pred_ca = [np.full((len(r["aa"]), 3), np.nan, np.float32) for r in rows]
    if decoder is not None and n:
        per_trace = {"pred": [x.codes for x in gen], "ceiling": [r["true"] for r in rows]}
        if base is not None:
            per_trace["base_most_frequent"] = [base.predict("most_frequent", r["src_codes"]) for r in rows]
            per_trace["base_per_aa"] = [base.predict("per_aa", r["src_codes"]) for r in rows]
        for t, name in enumerate(TRACES):
            if name not in per_trace:
                continue
            decoded = decoder.decode_many(per_trace[name])
            if name == "pred":
                pred_ca = [np.asarray(d, np.float32) for d in decoded]
            for j, (d, r) in enumerate(zip(decoded, rows)):
                m = trace_metrics(d, r["ca"], r["aa"], r["starts"])
                tm[t, j] = [m[k] for k in TRACE_METRICS]
    cons = {}
    if folder is not None:
        fmodel, fvocab = folder
        kw = dict(batch_size=d.batch_size, max_batch_tokens=d.max_batch_tokens)
        cons["cons_codes"] = [x.codes for x in generate(fmodel, fvocab, [vocab.target_text(g.codes) for g in gen], **kw)]
        cons["cons_native_codes"] = [x.codes for x in generate(fmodel, fvocab, [r["aa"] for r in rows], **kw)]
    true_codes, off = _ragged([r["true"] for r in rows], np.int64)
    return {
        "version": np.array(PART_VERSION),
        "ids": np.array([r["id"] for r in rows], dtype=str) if rows else np.zeros(0, "<U1"),
        "db_index": np.array([r["db_index"] for r in rows], np.int64),
        "crop_start": np.array([r["crop_start"] for r in rows], np.int64),
        "n_breaks": np.array([int(r["starts"][1:].sum()) for r in rows], np.int64),
        "aa": np.array([r["aa"] for r in rows], dtype=str) if rows else np.zeros(0, "<U1"),
        "offsets": off,
        "true_codes": true_codes,
        "src_codes": _ragged([r["src_codes"] for r in rows], np.int64)[0],
        "pred_codes": _ragged([x.codes for x in gen], np.int64)[0],
        "tf_codes": _ragged([x.pred_codes for x in tf], np.int64)[0],
        **{k: _ragged(v, np.int64)[0] for k, v in cons.items()},
        "loglik": np.array([x.loglik for x in gen], np.float64),
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
            cfg.tokens = str(layout.tokens_dir(self.vocab.kind, self.vocab.interleaved, self.vocab.direction))
        self.tokens = Path(cfg.tokens)
        if not (self.tokens / "vocab.json").exists():
            raise FileNotFoundError(f"{self.tokens}: no token shards (vocab.json missing); pass --tokens")
        self.token_vocab = Vocab.load(self.tokens / "vocab.json")   # the shards' ids (the model's may be offset)
        check_same_vocab(self.vocab, self.token_vocab, str(self.tokens))
        self._folder = None
        if cfg.consistency_checkpoint:
            self.fold_ckpt = resolve(cfg.consistency_checkpoint)
            check_consistency_vocab(self.vocab, Vocab.load(self.fold_ckpt / "vocab.json"), str(self.fold_ckpt))
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

    def folder(self):
        """(model, vocab) of the self-consistency check, or None."""
        if self.cfg.consistency_checkpoint and self._folder is None:
            fmodel, fvocab, _ = load_model(self.fold_ckpt, self.cfg.decoding)
            self._folder = (fmodel, fvocab)
        return self._folder

    def decoder(self):
        if self.vocab.kind not in DECODABLE or self.vocab.inverse:
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
            return Baselines.for_vocab(v, train, windowed=windowed, max_residues=self.cfg.baseline_max_residues,
                                       seed=seed)
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
                                 chunk_seed=self.cfg.decoding.seed * 1_000_003 + k * 1009 + c, folder=self.folder())
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
