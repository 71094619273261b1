"""Stage 06: given only the sequence, how close is the predicted structure?

For every example of the held-out split (test by default) of the token shards a checkpoint was
trained on:

1. generate its structure tokens from the amino acids (constrained, greedy unless sampling is asked
   for; `tokenfold.generate`), and once more unconstrained to measure validity / length match;
2. score the true tokens teacher-forced: perplexity (exp of the mean NLL over the training targets,
   structure tokens + <eos>) and teacher-forced accuracy;
3. for decodable kinds (``geo``, ``kanzi``) decode the predicted tokens, the true tokens (the
   tokenizer's ceiling) and two baseline token sequences to C-alpha traces and compare each with the
   true C-alpha of the DB (`tokenfold.metrics`). Cropped examples (stage 04 ``crop_start``) are
   compared with the same residues of the true chain;
4. compare token accuracy with the baselines fitted on the train split (`tokenfold.baselines`).

Work is split into units = (DB shard, chunk of ``--chunk-size`` examples): a SLURM array task takes
the DB shards `sharding.my_units` gives it and writes one ``work/part_<shard>_<chunk>.npz`` per chunk
(atomically), so a killed run resumes at the first missing part. `finalize` merges the parts into
``metrics.json`` (written last), ``per_protein.tsv``, ``predictions.fasta``, ``skipped.tsv``, PNGs and
``pdb/<id>_pred_vs_true.pdb`` (chain A truth, chain B prediction superposed on it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import atomic_path, read_json, write_json_atomic, write_text_atomic
from .baselines import Baselines, train_examples
from .cli import die, progress
from .device import pick_device, pick_dtype
from .generate import Sampling, generate, set_cpu_threads, teacher_forced
from .metrics import (
    DEFAULT_LENGTH_BINS,
    TRACE_METRICS,
    binned,
    confusion_matrix,
    kabsch,
    summarize,
    superpose,
    trace_metrics,
)
from .sharding import my_units
from .vocab import Vocab

log = logging.getLogger("tokenfold.evaluate")

DECODABLE = ("geo", "kanzi")
TRACES = ("pred", "ceiling", "base_most_frequent", "base_per_aa")  # decoded traces compared with the truth
PART_VERSION = 1
PER_PROTEIN_OTHERS = ("rmsd", "tm", "lddt", "rmsd_seg")  # per-protein columns of the non-model traces


# ----------------------------------------------------------------------------- configuration
@dataclass
class EvalConfig:
    checkpoint: str                      # checkpoint dir or run dir (-> final/)
    out: str                             # data/eval/<run>
    db: str | None = None                # protein DB; default: the one the token manifest names, else layout.DB
    tokens: str | None = None            # token dir; default from the vocabulary (layout.tokens_dir)
    split: str = "test"
    sampling: Sampling = field(default_factory=Sampling)
    unconstrained: bool = True
    max_proteins: int | None = None      # only the first N examples of the split (quick looks)
    chunk_size: int = 512                # examples per work part (resume granularity)
    batch_size: int | None = None        # proteins per batch (None: 64 on GPU, 16 on CPU)
    max_batch_tokens: int = 65536
    baseline_max_residues: int = 200_000
    window_baseline: bool | None = None  # None: for 3Di only
    n_pdb: int = 100                     # write pred-vs-true PDB files for this many proteins
    n_pictures: int = 3
    kanzi_checkpoint: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None           # torch CPU threads (None: `generate.set_cpu_threads` decides)
    seed: int = 0

    def fingerprint(self, ckpt: Path) -> dict:
        """What the results depend on (not where or how fast they are computed)."""
        weights = sorted(p for p in ckpt.glob("*.safetensors")) or sorted(ckpt.glob("*.bin"))
        return {"checkpoint": str(ckpt.resolve()),
                "weights": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weights],
                "tokens": str(Path(self.tokens).resolve()) if self.tokens else None, "split": self.split,
                "sampling": asdict(self.sampling), "unconstrained": self.unconstrained,
                "max_proteins": self.max_proteins, "chunk_size": self.chunk_size,
                "baseline_max_residues": self.baseline_max_residues, "seed": self.seed,
                "kanzi_checkpoint": self.kanzi_checkpoint,
                "dtype": str(pick_dtype(self.dtype, pick_device(self.device))),  # auto: bf16 on GPU, fp32 on CPU
                "db": str(Path(self.db).resolve()) if self.db else None}


def load_model(checkpoint: str, device: str = "auto", dtype: str = "auto"):
    """(model, vocab, checkpoint dir) via stage 05's `load_for_inference`."""
    from .checkpoint import load_for_inference, resolve

    ckpt = resolve(checkpoint)
    model, vocab = load_for_inference(ckpt, device=device, dtype=dtype)
    return model, vocab, ckpt


def check_same_vocab(a: Vocab, b: Vocab, where: str) -> None:
    if (a.kind, a.interleaved, a.struct_symbols) != (b.kind, b.interleaved, b.struct_symbols):
        raise ValueError(f"{where}: vocabulary ({b.kind}, interleaved={b.interleaved}, {b.n_struct} tokens) differs "
                         f"from the checkpoint's ({a.kind}, interleaved={a.interleaved}, {a.n_struct} tokens)")


# ----------------------------------------------------------------------------- decoders
def load_decoder(vocab: Vocab, search_dirs=(), kanzi_checkpoint: str | None = None):
    """An object with ``decode_many(list of codes) -> list of C-alpha [L,3]`` for decodable kinds, else None."""
    if vocab.kind == "geo":
        from .geotokens import GeoCodebook

        errors = []
        for d in list(search_dirs) + [None]:
            try:
                return GeoCodebook.from_vocab(vocab, d)
            except FileNotFoundError as e:
                errors.append(str(e))
        raise FileNotFoundError(f"geo codebook of this vocabulary not found: {errors[-1]}")
    if vocab.kind == "kanzi":
        from .kanzi import load_decoder as kanzi_decoder

        return kanzi_decoder(vocab, kanzi_checkpoint)
    return None


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
def evaluate_chunk(model, vocab: Vocab, ds, db, shard: int, idx: np.ndarray, cfg: EvalConfig, decoder,
                   base: Baselines | None, chunk_seed: int) -> dict:
    """Everything per protein for the token examples `idx` (all in DB shard `shard`)."""
    sh = db.shards[shard]
    n_pos = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    rows, skipped = [], []
    for i in idx:
        ids = np.asarray(ds[int(i)], dtype=np.int64)
        aa, codes = vocab.decode(ids)
        g, crop, n = int(ds.db_index[i]), int(ds.crop_start[i]), int(ds.n_res[i])
        pid = str(ds.ids[i])
        if len(ids) > n_pos:
            skipped.append((pid, f"{len(ids)} tokens, longer than the model's {n_pos} positions"))
            continue
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
    sh.release()
    seqs = [r["aa"] for r in rows]
    samp = Sampling(**{**asdict(cfg.sampling), "seed": chunk_seed})
    gen = generate(model, vocab, seqs, sampling=samp, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens)
    tf = teacher_forced(model, vocab, [r["ids"] for r in rows], cfg.batch_size, cfg.max_batch_tokens)
    unc = (generate(model, vocab, seqs, constrained=False, batch_size=cfg.batch_size,
                    max_batch_tokens=cfg.max_batch_tokens) if cfg.unconstrained else None)
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
    """One evaluation directory: `run_units` (an array task's share, resumable) and `finalize`."""

    def __init__(self, cfg: EvalConfig):
        from .db import ProteinDB
        from .shards import TokenDataset

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.work = self.out / "work"
        self.device = pick_device(cfg.device)
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
        check_same_vocab(self.vocab, Vocab.load(self.tokens / "vocab.json"), str(self.tokens))
        if cfg.db is None:
            mf = self.tokens / "manifest.json"
            named = read_json(mf).get("db") if mf.exists() else None
            cfg.db = named if named and Path(named).exists() else str(layout.DB)
        self.db = ProteinDB(cfg.db)
        self.ds = TokenDataset(self.tokens, cfg.split)
        if len(self.ds) == 0:
            raise ValueError(f"{self.tokens}: the {cfg.split!r} split has no examples")
        self.units = split_units(self.ds, self.db, cfg.chunk_size, cfg.max_proteins)
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
            self._model, _, _ = load_model(str(self.ckpt), self.device, self.cfg.dtype)
            set_cpu_threads(self._model, self.cfg.threads)
        return self._model

    def decoder(self):
        if self.vocab.kind not in DECODABLE:
            return None
        if self._decoder is None:
            self._decoder = load_decoder(self.vocab, [self.tokens, self.ckpt], self.cfg.kanzi_checkpoint)
        return self._decoder

    def _check_work_config(self, overwrite: bool) -> None:
        cpath = self.work / "config.json"
        if cpath.exists():
            old = read_json(cpath)
            if old.get("hash") != self.fp_hash:
                if not overwrite:
                    die(f"{self.work} holds results of a different configuration "
                                     f"({cpath}); rerun with --overwrite to start again")
                shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        if not cpath.exists():
            write_json_atomic(cpath, {"hash": self.fp_hash, **self.fp})

    def fit_baselines(self, windowed: bool) -> Baselines | None:
        """Baselines fitted on the train split of the token dir (None, with a warning, when it has none)."""
        v = self.vocab
        try:
            return Baselines.fit(train_examples(self.tokens, v, seed=self.cfg.seed), v.n_struct, windowed=windowed,
                                 max_residues=self.cfg.baseline_max_residues, seed=self.cfg.seed)
        except ValueError as e:
            log.warning("no baselines: %s (%s has no train examples)", e, self.tokens)
            return None

    def run_units(self, num_tasks: int = 1, task_index: int = 0, overwrite: bool = False) -> int:
        """Compute this task's missing parts. Returns how many parts it wrote."""
        self._check_work_config(overwrite)
        mine = my_units(len(self.db.shards), num_tasks, task_index)
        todo = []
        for k in mine:
            for c, idx in enumerate(self.units[k]):
                p = part_path(self.work, k, c)
                if overwrite and p.exists():
                    p.unlink()
                if not p.exists():
                    todo.append((k, c, idx))
        n_all = sum(len(self.units[k]) for k in mine)
        log.info("evaluate: %d of %d parts to do (DB shards %s), %s split, checkpoint %s",
                 len(todo), n_all, mine if len(mine) < 10 else f"{len(mine)} shards", self.cfg.split, self.ckpt)
        if not todo:
            return 0
        decoder = self.decoder()
        # the token-frequency baselines (cheap, no classifier) give the baseline traces of decodable kinds
        base = self.fit_baselines(windowed=False) if decoder is not None else None
        t0, n_prot = time.time(), 0
        for k, c, idx in progress(todo, desc="evaluate", unit="part"):
            res = evaluate_chunk(self.model, self.vocab, self.ds, self.db, k, idx, self.cfg, decoder, base,
                                 chunk_seed=self.cfg.seed * 1_000_003 + k * 1009 + c)
            res["fingerprint"] = np.array(self.fp_hash)
            with atomic_path(part_path(self.work, k, c), suffix=".npz") as tmp:
                np.savez(tmp, **res)
            n_prot += len(idx)
            log.info("evaluate: part %d/%d of shard %d done (%d proteins, %.1f proteins/s overall)",
                     c + 1, len(self.units[k]), k, len(idx), n_prot / max(time.time() - t0, 1e-9))
        return len(todo)

    # ------------------------------------------------------------------------- finalize
    def load_parts(self) -> dict:
        missing = [part_path(self.work, k, c) for k in self.units for c in range(len(self.units[k]))
                   if not part_path(self.work, k, c).exists()]
        if missing:
            die(f"{len(missing)} work parts are missing (first: {missing[0]}); "
                             "run the array tasks first")
        parts = []
        for k in sorted(self.units):
            for c in range(len(self.units[k])):
                with np.load(part_path(self.work, k, c), allow_pickle=False) as z:
                    d = {key: z[key] for key in z.files}
                if str(d["fingerprint"]) != self.fp_hash:
                    die(f"{part_path(self.work, k, c)} was made with a different configuration; "
                                     "rerun with --overwrite")
                parts.append(d)
        P = {}
        for key in ("ids", "db_index", "crop_start", "n_breaks", "aa", "nll", "n_targets", "unc_valid", "unc_length_match", "unc_n"):
            P[key] = np.concatenate([p[key] for p in parts])
        P["trace_metrics"] = np.concatenate([p["trace_metrics"] for p in parts], axis=1)
        for key in ("true_codes", "pred_codes", "tf_codes", "true_ca", "pred_ca"):
            P[key] = [a for p in parts for a in _unragged(p[key], p["offsets"])]
        P["skipped"] = [tuple(s) for p in parts for s in json.loads(str(p["skipped"]))]
        return P

    def finalize(self) -> dict:
        P = self.load_parts()
        v = self.vocab
        n = len(P["ids"])
        if n == 0:
            die(f"no protein of the {self.cfg.split} split could be evaluated "
                             f"({len(P['skipped'])} skipped; first reason: {P['skipped'][0][1] if P['skipped'] else 'none'})")
        windowed = self.cfg.window_baseline if self.cfg.window_baseline is not None else v.kind == "3di"
        log.info("finalize: %d proteins; fitting baselines on the train split (<= %d residues)",
                 n, self.cfg.baseline_max_residues)
        base = self.fit_baselines(windowed=windowed)
        names = base.names if base is not None else []
        if base is not None:
            base.save(self.out / "baselines.npz")
        lengths = np.array([len(a) for a in P["aa"]])
        acc = np.array([np.mean(p == t) for p, t in zip(P["pred_codes"], P["true_codes"])])
        tf_acc = np.array([np.mean(p == t) for p, t in zip(P["tf_codes"], P["true_codes"])])
        ppl = np.exp(P["nll"] / P["n_targets"])
        base_pred = {b: [base.predict(b, a) for a in P["aa"]] for b in names}
        base_acc = {b: np.array([np.mean(p == t) for p, t in zip(base_pred[b], P["true_codes"])]) for b in names}
        all_true = np.concatenate(P["true_codes"])
        all_pred = np.concatenate(P["pred_codes"])
        micro = lambda pr: float(np.mean(np.concatenate(pr) == all_true))  # noqa: E731
        tokens = {
            "accuracy": float(np.mean(all_pred == all_true)),
            "accuracy_mean_per_protein": float(acc.mean()),
            "teacher_forced_accuracy": micro(P["tf_codes"]),
            "perplexity": float(np.exp(P["nll"].sum() / P["n_targets"].sum())),
            "perplexity_note": "exp(mean NLL of the true structure tokens and <eos>, teacher-forced, full vocabulary)",
            "baselines": {b: {"accuracy": micro(base_pred[b]),
                              "accuracy_mean_per_protein": float(base_acc[b].mean())} for b in names},
            "baseline_fit": ({**base.meta, "most_frequent_token": v.struct_symbols[base.most_frequent]}
                             if base is not None else "no train split: no baselines"),
            "accuracy_by_length": binned(lengths, acc),
        }
        tokens["beats_baselines"] = {b: tokens["accuracy"] > tokens["baselines"][b]["accuracy"] for b in names}
        metrics = {
            "stage": "06_evaluate", "config_hash": self.fp_hash, "checkpoint": str(self.ckpt), "tokens": str(self.tokens), "db": str(self.cfg.db),
            "split": self.cfg.split, "kind": v.kind, "interleaved": v.interleaved, "n_struct": v.n_struct,
            "n_proteins": n, "n_residues": int(lengths.sum()), "n_skipped": len(P["skipped"]),
            "skipped": [{"id": a, "reason": b} for a, b in P["skipped"][:100]],
            "decoding": {"constrained": True, **asdict(self.cfg.sampling)},
            "random_weights_upstream": bool(v.meta.get("random_weights", False)),
            "vocab_meta": v.meta,
            "tokens_metrics": tokens,
            "length_bins": list(DEFAULT_LENGTH_BINS),
        }
        if self.cfg.unconstrained:
            metrics["unconstrained"] = {
                "validity_rate": float(P["unc_valid"].mean()),
                "length_match_rate": float(P["unc_length_match"].mean()),
                "note": "greedy free decoding over the whole vocabulary (amino acids still fed in the interleaved layout); "
                        "valid = only structure tokens before the end; length match = valid, exactly L, then <eos>",
            }
        if v.kind == "3di":
            cm = confusion_matrix(all_pred, all_true, v.n_struct)
            metrics["confusion_matrix"] = {"letters": v.struct_symbols, "rows": "true", "columns": "predicted",
                                           "counts": cm.tolist()}
        decodable = v.kind in DECODABLE
        if decodable:
            tm = P["trace_metrics"]
            metrics["structure"] = {
                name: {m: summarize(tm[t, :, j]) for j, m in enumerate(TRACE_METRICS)} for t, name in enumerate(TRACES)
            }
            metrics["structure"]["by_length"] = {
                m: binned(lengths, tm[0, :, j]) for j, m in enumerate(TRACE_METRICS) if m in ("rmsd", "tm", "lddt")}
            nb = P["n_breaks"]
            metrics["structure"]["proteins_with_chain_breaks"] = int((nb > 0).sum())
            metrics["structure"]["note"] = (
                "pred: decoded predicted tokens; ceiling: decoded TRUE tokens (the tokenizer's limit); base_*: "
                "decoded baseline tokens (train split's most frequent token, per-amino-acid most frequent token). "
                "Fixed residue correspondence; RMSD after Kabsch superposition; TM-score by tmtools normalised by "
                "the true length; lDDT on C-alpha (15 A, 0.5/1/2/4 A); GDT-TS; fractions within 2/4 A after the "
                "RMSD superposition; rmsd_seg: each segment between chain breaks of the true chain superposed "
                "on its own (tokens cannot place segments relative to each other across a gap).")
        # ---- per-protein table, predictions, PDB files, pictures
        cols = ["id", "db_index", "crop_start", "length", "n_breaks", "accuracy", "tf_accuracy", "perplexity"]
        cols += [f"acc_{b}" for b in names]
        cols += ["unc_valid", "unc_length_match", "unc_n_struct"] if self.cfg.unconstrained else []
        if decodable:
            cols += [f"{m}" for m in TRACE_METRICS] + [f"{t}_{m}" for t in TRACES[1:] for m in PER_PROTEIN_OTHERS]
        lines = ["\t".join(cols)]
        for i in range(n):
            row = [P["ids"][i], int(P["db_index"][i]), int(P["crop_start"][i]), int(lengths[i]), int(P["n_breaks"][i]),
                   acc[i], tf_acc[i], ppl[i]]
            row += [base_acc[b][i] for b in names]
            if self.cfg.unconstrained:
                row += [int(P["unc_valid"][i]), int(P["unc_length_match"][i]), int(P["unc_n"][i])]
            if decodable:
                row += list(P["trace_metrics"][0, i])
                row += [P["trace_metrics"][t, i, TRACE_METRICS.index(m)] for t in range(1, len(TRACES))
                        for m in PER_PROTEIN_OTHERS]
            lines.append("\t".join(_fmt(x) for x in row))
        write_text_atomic(self.out / "per_protein.tsv", "\n".join(lines) + "\n")
        write_text_atomic(self.out / "skipped.tsv",
                          "id\treason\n" + "".join(f"{a}\t{b}\n" for a, b in P["skipped"]))
        write_text_atomic(self.out / "predictions.fasta",
                          "".join(f">{P['ids'][i]}\n{v.symbols(P['pred_codes'][i])}\n" for i in range(n)))
        pngs = token_plots(self.out, lengths, acc, base_acc, tokens)
        if v.kind == "3di":
            pngs.append(confusion_plot(self.out / "confusion_3di.png", cm, v.struct_symbols))
        if decodable:
            pdbs = write_pdbs(self.out / "pdb", P, self.cfg.n_pdb)
            metrics["pdb_files"] = len(pdbs)
            pngs += structure_plots(self.out, lengths, P["trace_metrics"], P, self.cfg.n_pictures)
        metrics["pngs"] = [p.name for p in pngs]
        from .report import write_report

        write_report(self.out / "metrics.json", metrics)
        log.info("finalize: %s", summary_line(metrics))
        return metrics


def _fmt(x) -> str:
    if isinstance(x, (float, np.floating)):
        return "nan" if not np.isfinite(x) else f"{float(x):.4f}"
    return str(x)


def summary_line(m: dict) -> str:
    t = m["tokens_metrics"]
    s = (f"{m['n_proteins']} proteins, accuracy {t['accuracy']:.3f} (teacher-forced {t['teacher_forced_accuracy']:.3f}, "
         f"perplexity {t['perplexity']:.2f}); baselines "
         + ", ".join(f"{b} {d['accuracy']:.3f}" for b, d in t["baselines"].items()))
    if "structure" in m:
        p, c = m["structure"]["pred"], m["structure"]["ceiling"]
        if p["rmsd"].get("n"):
            s += (f"; RMSD median {p['rmsd']['median']:.2f} A, TM mean {p['tm']['mean']:.3f} "
                  f"(ceiling RMSD {c['rmsd']['median']:.2f} A, TM {c['tm']['mean']:.3f})")
    if "unconstrained" in m:
        u = m["unconstrained"]
        s += f"; unconstrained valid {u['validity_rate']:.2f}, length match {u['length_match_rate']:.2f}"
    return s


# ----------------------------------------------------------------------------- PDB output
ONE_TO_THREE = dict(zip("ACDEFGHIKLMNPQRSTVWY", (
    "ALA CYS ASP GLU PHE GLY HIS ILE LYS LEU MET ASN PRO GLN ARG SER THR VAL TRP TYR").split()))


def write_ca_pdb(path: str | os.PathLike, chains: dict[str, tuple[str, np.ndarray]]) -> Path:
    """A C-alpha-only PDB file (gemmi): one chain per entry ``name -> (amino acids, coordinates [L,3])``;
    residues numbered 1..L, non-finite coordinates left out."""
    import gemmi

    st = gemmi.Structure()
    st.name = Path(path).stem
    model = gemmi.Model("1")
    for name, (aa, xyz) in chains.items():
        ch = gemmi.Chain(name)
        for i, (a, p) in enumerate(zip(aa, np.asarray(xyz, np.float64))):
            if not np.isfinite(p).all():
                continue
            res = gemmi.Residue()
            res.name = ONE_TO_THREE.get(a, "UNK")
            res.seqid = gemmi.SeqId(i + 1, " ")
            res.entity_type = gemmi.EntityType.Polymer
            atom = gemmi.Atom()
            atom.name = "CA"
            atom.element = gemmi.Element("C")
            atom.pos = gemmi.Position(*p)
            atom.occ = 1.0
            res.add_atom(atom)
            ch.add_residue(res)
        model.add_chain(ch)
    st.add_model(model)
    path = Path(path)
    with atomic_path(path, suffix=".pdb") as tmp:
        st.write_pdb(str(tmp))
    return path


def safe_name(name) -> str:
    """A protein id as a file name: anything but letters, digits, '-', '_', '.' becomes '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def write_pdbs(pdb_dir: Path, P: dict, limit: int) -> list[Path]:
    """<id>_pred_vs_true.pdb for the first `limit` proteins with a true trace: chain A = truth,
    chain B = decoded prediction superposed on it (Kabsch)."""
    out = []
    for i in range(len(P["ids"])):
        if len(out) >= limit:
            break
        true, pred, aa = P["true_ca"][i], P["pred_ca"][i], P["aa"][i]
        ok = np.isfinite(true).all(1) & np.isfinite(pred).all(1)
        if ok.sum() < 3:
            continue
        r, t = kabsch(pred[ok], true[ok])
        moved = pred.astype(np.float64) @ r.T + t
        out.append(write_ca_pdb(pdb_dir / f"{safe_name(P['ids'][i])}_pred_vs_true.pdb", {"A": (aa, true), "B": (aa, moved)}))
    return out


# ----------------------------------------------------------------------------- pictures
_TRACE_STYLE = {"pred": ("model", "C0"), "ceiling": ("tokenizer ceiling (true tokens)", "C2"),
                "base_most_frequent": ("baseline: most frequent token", "C7"),
                "base_per_aa": ("baseline: per-amino-acid token", "C1")}


def token_plots(out: Path, lengths, acc, base_acc: dict, tokens: dict) -> list[Path]:
    """accuracy_vs_length.png: per-protein accuracy versus length (model and baselines), and the
    overall (per-residue) accuracies side by side."""
    from .report import save_figure, subplots

    fig, (a, b) = subplots(2, ncols=2, size=5.0)
    for k, (name, vals) in enumerate(base_acc.items()):
        a.scatter(lengths, vals, s=10, alpha=0.6, marker="x", color=f"C{k + 1}", label=f"baseline: {name}")
    a.scatter(lengths, acc, s=16, color="C0", label="model (constrained decoding)")
    a.set_xlabel("length (residues)")
    a.set_ylabel("token accuracy")
    a.set_ylim(0, 1)
    a.legend(fontsize=7)
    a.set_title("accuracy per protein")
    names = ["model", "model\nteacher-forced"] + list(tokens["baselines"])
    vals = [tokens["accuracy"], tokens["teacher_forced_accuracy"]] + [d["accuracy"] for d in tokens["baselines"].values()]
    b.bar(range(len(vals)), vals, color=["C0", "C9"] + [f"C{k + 1}" for k in range(len(vals) - 2)])
    b.set_xticks(range(len(vals)), [n.replace("_", "\n") for n in names], fontsize=7)
    for x, y in enumerate(vals):
        b.text(x, y + 0.01, f"{y:.3f}", ha="center", fontsize=7)
    b.set_ylim(0, 1)
    b.set_title("per-residue accuracy (all proteins)")
    return [save_figure(fig, out / "accuracy_vs_length.png")]


def confusion_plot(path: Path, cm: np.ndarray, letters) -> Path:
    """Row-normalised confusion matrix (rows: true letter, columns: predicted letter)."""
    from .report import plt, save_figure

    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(letters)), letters)
    ax.set_yticks(range(len(letters)), [f"{c} ({n})" for c, n in zip(letters, cm.sum(1))], fontsize=7)
    ax.set_xlabel("predicted 3Di")
    ax.set_ylabel("true 3Di (residues)")
    ax.set_title(f"3Di confusion (row-normalised), accuracy {np.trace(cm) / max(cm.sum(), 1):.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def structure_plots(out: Path, lengths, tm: np.ndarray, P: dict, n_pictures: int) -> list[Path]:
    from .report import plt, save_figure, subplots

    ir, it = TRACE_METRICS.index("rmsd"), TRACE_METRICS.index("tm")
    paths = []
    fig, axes = subplots(2, ncols=2, size=5.0)
    for ax, j, label in zip(axes, (ir, it), ("C-alpha RMSD (A)", "TM-score")):
        for t, name in enumerate(TRACES):
            if np.isfinite(tm[t, :, j]).any():
                ax.scatter(lengths, tm[t, :, j], s=12 if name == "pred" else 8, alpha=0.8 if name == "pred" else 0.5,
                           color=_TRACE_STYLE[name][1], label=_TRACE_STYLE[name][0])
        ax.set_xlabel("length (residues)")
        ax.set_ylabel(label)
        if j == it:
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.suptitle("structure versus length")
    paths.append(save_figure(fig, out / "rmsd_tm_vs_length.png"))

    fig, axes = subplots(2, ncols=2, size=5.0)
    for ax, j, label, rng in zip(axes, (ir, it), ("C-alpha RMSD (A)", "TM-score"), (None, (0, 1))):
        finite = tm[:, :, j][np.isfinite(tm[:, :, j])]
        if not len(finite):
            continue
        bins = np.linspace(*(rng or (0, float(finite.max()) + 1e-6)), 26)
        for t, name in enumerate(TRACES):
            v = tm[t, :, j][np.isfinite(tm[t, :, j])]
            if len(v):
                ax.hist(v, bins=bins, histtype="step", linewidth=1.6, color=_TRACE_STYLE[name][1],
                        label=f"{_TRACE_STYLE[name][0]} (median {np.median(v):.2f})")
        ax.set_xlabel(label)
        ax.set_ylabel("proteins")
        ax.legend(fontsize=7)
    fig.suptitle("distributions over the evaluated proteins")
    paths.append(save_figure(fig, out / "rmsd_tm_hist.png"))

    # 3-D pictures: best, median and worst TM-score (predicted superposed on the truth)
    tmv = tm[0, :, it]
    ok = np.flatnonzero(np.isfinite(tmv))
    if len(ok) and n_pictures > 0:
        order = ok[np.argsort(-tmv[ok], kind="stable")]
        pick = sorted({int(order[int(round(q * (len(order) - 1)))]) for q in np.linspace(0, 1, min(n_pictures, len(order)))},
                      key=lambda i: -tmv[i])
        fig = plt.figure(figsize=(4.6 * len(pick), 4.4))
        for k, i in enumerate(pick):
            ax = fig.add_subplot(1, len(pick), k + 1, projection="3d")
            true, pred = P["true_ca"][i].astype(np.float64), P["pred_ca"][i].astype(np.float64)
            moved = superpose(pred, true)
            c = true.mean(0)
            ax.plot(*(true - c).T, color="0.25", linewidth=1.4, label="true C-alpha")
            ax.plot(*(moved - c).T, color="C3", linewidth=1.2, alpha=0.85, label="predicted (superposed)")
            half = float(np.abs(true - c).max()) * 1.05
            ax.set_xlim(-half, half); ax.set_ylim(-half, half); ax.set_zlim(-half, half)  # noqa: E702
            ax.set_box_aspect((1, 1, 1))
            ax.set_title(f"{P['ids'][i]}  L={len(true)}\nTM {tmv[i]:.2f}  RMSD {tm[0, i, ir]:.1f} A", fontsize=8)
            ax.set_xticks([]); ax.set_yticks([]); ax.set_zticks([])  # noqa: E702
            if k == 0:
                ax.legend(fontsize=7, loc="upper left")
        paths.append(save_figure(fig, out / "ca_traces_3d.png"))
    return paths
