"""Stage 04: turn the protein DB into token shards for the translator LM (one example per chain).

The token kinds live in `tokenfold.token_kinds`, the geo codebook fit in `tokenfold.geo_fit`, the
report in `tokenfold.tokenize_report`; ``interleaved`` switches the example layout (`tokenfold.vocab`)
for every kind, and ``direction`` which side is the prompt: ``seq2struct`` (amino acids -> structure
tokens, the default) or ``struct2seq`` (structure tokens -> amino acids, inverse folding). Both are
recorded in vocab.json, which stages 05, 06 and predict follow. This module is the stage run: per DB shard, finalize, manifest. Files: see
data/README.md, section stage 04 (formats: `tokenfold.shards`, `tokenfold.vocab`).

Length policy (``max_length`` residues, default 1024): ``crop`` (default) keeps one window of
``max_length`` residues whose start is drawn from a generator seeded by (seed, DB index), so every
array task and every re-run picks the same window, and records it (``crop_start`` in the index);
``drop`` leaves the chain out. Both are counted in the report. The kind computes the window's codes
(`tokenfold.token_kinds`). ``max_length`` residues fix the longest example, in tokens
(`Vocab.example_length`: 2L+4 plain, 2L+3 interleaved; 2,052 at the default): the manifest records it
as ``max_example_tokens``, and stage 05's ``--max-len`` and model positions follow from it.

Work is split over DB shards (SLURM arrays: `sharding.my_units`); a killed task resumes at the first
DB shard without its marker, and the result equals an uninterrupted run (tested). A geo array task
needs the codebook fitted first (`tokenfold.geo_fit`); a single task fits it itself.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import atomic_path, read_json, sha256_file, write_json_atomic, write_text_atomic
from .cli import die, option, progress
from .db import SPLIT_CODES, SPLITS, ProteinDB
from .geo_fit import codebook_for_task
from .kanzi import MAX_RESIDUES as KANZI_MAX_RESIDUES
from .report import write_report
from .sharding import my_units
from .shards import TokenShardWriter, shard_stem
from .token_kinds import KINDS, TokenKind, make_kind
from .tokenize_report import build_report
from .vocab import DIRECTIONS, SEQ2STRUCT, Vocab

log = logging.getLogger("tokenfold.tokenize")

LONG_POLICIES = ("crop", "drop")
FORMAT = "tokenfold-tokens"
VERSION = 1
_GEO, _ESM, _KANZI = "geo kind", "esm kind", "kanzi kind"


@dataclass
class TokenizeConfig:
    """Stage 04's settings; each field is also its command-line flag (`tokenfold.cli.add_options`)."""

    db: str = option(str(layout.DB), "protein DB from stage 01")
    kind: str = option("3di", "structure token kind: 3di = Foldseek's letters from the DB, esm = "
                             "stage-03 codes, geo = our decodable C-alpha tokens, kanzi = Kanzi's, 6d = the hand-crafted "
                             "C-alpha baseline codebook (angles, secondary structure, density)",
                             flag="--tokens", choices=KINDS)
    interleaved: bool = option(False, "interleave amino acid and structure token (<bos> <kind> a1 s1 a2 s2 .. <eos>; "
                                      "struct2seq: <bos> <aa> s1 a1 s2 a2 .. <eos>)")
    direction: str = option(SEQ2STRUCT, "seq2struct: amino acids -> structure tokens (<bos> a1..aL <sep> <kind> "
                                        "s1..sL <eos>); struct2seq: structure tokens -> amino acids, inverse folding "
                                        "(<bos> s1..sL <sep> <aa> a1..aL <eos>); recorded in vocab.json",
                            choices=DIRECTIONS)
    out: str | None = option(None, f"output directory (default {layout.TOKENS}/<kind>[_interleaved][_struct2seq])")
    max_length: int = option(1024, "max residues per example; examples then hold at most 2L+4 tokens (2L+3 "
                                   "interleaved), and stage 05's --max-len and model positions follow")
    long_policy: str = option("crop", "longer chains: crop = keep one seeded window of --max-length residues; "
                                      "drop = leave them out. Both are counted in report.json", choices=LONG_POLICIES)
    seed: int = option(0, "seed of crop windows and of the geo codebook fit")
    overwrite: bool = option(False, "redo even if the output is complete")
    geo_k: int = option(32, "placement codes K; tokens are code pairs: K*K + START and BREAK", group=_GEO)
    geo_codebook: str | None = option(None, f"geo codebook file (default {layout.GEO}/geo_codebook_K<K>.npz), fit "
                                            "on train chains by --fit-geo-codebook or by a single-task run", group=_GEO)
    geo_fit_max_residues: int = option(1_000_000, "train residues sampled to fit the geo codebook", group=_GEO)
    geo_refine_iters: int = option(3, "closed-loop refinement steps of the fit", group=_GEO)
    geo_robustness_chains: int = option(30, "held-out chains on which the report measures how the geo tokens "
                                             "survive substituted tokens (0: skip)", group=_GEO)
    geo_beam: int = option(4, "beam width of the closed-loop encoder (1 = greedy: ~30%% higher RMSD at K=32, "
                              "~2.5x faster)", group=_GEO)
    codebook: str | None = option(None, f"stage-03 codebook (default {layout.codebook_path(512)})", group=_ESM)
    embeddings: str | None = option(None, f"stage-02 embeddings dir (default {layout.EMBEDDINGS}/<codebook model>_L"
                                          "<layer>); when it holds only a sample, embeddings are computed on the fly",
                                    group=_ESM)
    esm_model: str | None = option(None, "ESM-2 name or .pt path for on-the-fly embeddings (default: the codebook's)",
                                   group=_ESM)
    random_weights_for_testing: bool = option(False, "accept a codebook/model made from a RANDOM-weights ESM-2, or a "
                                                     "RANDOM Kanzi checkpoint (kanzi: without --kanzi-checkpoint, or "
                                                     "with a shape name tiny|small|base, writes data/models/kanzi_<shape>"
                                                     "_RANDOM_seed<seed>.pt); tests and the offline demo only")
    device: str | None = option(None, "torch device for esm/kanzi (default: cuda if available, else cpu)", group=_ESM)
    kanzi_checkpoint: str | None = option(None, "Kanzi checkpoint (.pt, e.g. the released cleaned_model.pt); needs "
                                                "the kanzi package. Chains longer than 255 residues are cropped or "
                                                "dropped (--max-length is capped at 255: Kanzi's range)", group=_KANZI)
    kanzi_decode_steps: int = option(100, "SDE steps when decoding Kanzi tokens", group=_KANZI)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown token kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown --direction {self.direction!r}; expected one of {', '.join(DIRECTIONS)}")
        if self.long_policy not in LONG_POLICIES:
            raise ValueError(f"unknown --long-policy {self.long_policy!r}; expected crop or drop")
        if self.max_length < 1:
            raise ValueError("--max-length must be >= 1")
        if self.kind == "kanzi" and self.max_length > KANZI_MAX_RESIDUES:
            log.warning("kanzi tokens: --max-length %d lowered to %d (Kanzi was trained on chains < 256 and its encoder "
                        "takes at most 256); longer chains are %s", self.max_length, KANZI_MAX_RESIDUES,
                        "cropped to a seeded window" if self.long_policy == "crop" else "dropped")
            self.max_length = KANZI_MAX_RESIDUES

    @property
    def name(self) -> str:
        return layout.tokens_name(self.kind, self.interleaved, self.direction)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else layout.tokens_dir(self.name)

    @property
    def geo_path(self) -> Path:
        return Path(self.geo_codebook) if self.geo_codebook else layout.geo_codebook_path(self.geo_k)


def crop_window(seed: int, db_index: int, length: int, max_length: int) -> int:
    """Start of the kept window of a chain longer than max_length (same in every task and re-run)."""
    if length <= max_length:
        return 0
    return int(np.random.default_rng([seed, db_index]).integers(0, length - max_length + 1))


# ============================================================================= one DB shard
def _work_file(out: Path, k: int, ext: str) -> Path:
    """A per-DB-shard work file: ``.json`` (the "shard k is done" marker, written last), ``.npz``
    (per-example statistics), ``.rejects.tsv``."""
    return out / "work" / f"shard_{k:05d}{ext}"


def tokenize_db_shard(cfg: TokenizeConfig, db: ProteinDB, k: int, kind: TokenKind, vocab: Vocab) -> dict:
    """Write the token shards of DB shard k (one per split), its statistics, and last its marker."""
    out = cfg.out_dir
    shard = db.shards[k]
    codes_split = np.asarray(db.split_codes[db.shard_starts[k]:db.shard_starts[k + 1]])
    a = shard.arrays
    has = {"ss": a["has_ss"], "ca": a["has_ca"], "nothing": np.ones(len(shard), bool)}[kind.needs]
    items, rejects = [], []
    n_dropped = n_cropped = 0
    for j in range(len(shard)):
        c = int(codes_split[j])
        if c not in (0, 1, 2):
            continue
        L = int(a["offsets"][j + 1] - a["offsets"][j])
        pid = str(a["id"][j])
        if not has[j]:
            rejects.append((pid, {"ss": "no 3Di states", "ca": "no C-alpha coordinates"}[kind.needs]))
            continue
        if L == 0:
            rejects.append((pid, "empty chain"))
            continue
        if L > cfg.max_length:
            if cfg.long_policy == "drop":
                rejects.append((pid, f"longer than --max-length {cfg.max_length} (dropped)"))
                n_dropped += 1
                continue
            n_cropped += 1
        start = crop_window(cfg.seed, shard.first_index + j, L, cfg.max_length)
        items.append((shard.record(j), start, start + min(L, cfg.max_length)))
    results: list = []
    bar = progress(total=len(items), desc=f"shard {k} {cfg.name}", unit="chain")
    for b0 in range(0, len(items), kind.chunk):
        part = items[b0:b0 + kind.chunk]
        results.extend(kind.codes(part, k, shard.first_index))
        bar.update(len(part))
    bar.close()
    extra = kind.extra(items, results)
    writers = {s: TokenShardWriter(out, s, k) for s in SPLITS}
    code_counts = np.zeros((len(SPLITS), vocab.n_struct), np.int64)
    ex_split, ex_nres, ex_ntok, ex_keep = [], [], [], []
    for i, ((rec, s, e), res) in enumerate(zip(items, results)):
        if isinstance(res, str):
            rejects.append((rec.id, res))
            continue
        toks = vocab.encode(rec.aa[s:e], res)
        sp = SPLIT_CODES[rec.split]
        writers[rec.split].add(toks, rec.id, rec.index, e - s, crop_start=s)
        code_counts[sp] += np.bincount(res, minlength=vocab.n_struct)
        ex_split.append(sp); ex_nres.append(e - s); ex_ntok.append(len(toks)); ex_keep.append(i)
    for w in writers.values():
        w.close()
    shard.release()
    stats = {"split": np.array(ex_split, np.uint8), "n_res": np.array(ex_nres, np.int32),
             "n_tokens": np.array(ex_ntok, np.int32), "code_counts": code_counts}
    for name, arr in extra.items():
        stats[name] = np.asarray(arr)[ex_keep]
    with atomic_path(_work_file(out, k, ".npz"), suffix=".npz") as tmp:
        np.savez(tmp, **stats)
    write_text_atomic(_work_file(out, k, ".rejects.tsv"), "".join(f"{p}\t{r}\n" for p, r in rejects))
    per_split = {}
    for s in SPLITS:
        m = stats["split"] == SPLIT_CODES[s]
        per_split[s] = {"n_examples": int(m.sum()), "n_residues": int(stats["n_res"][m].sum()),
                        "n_tokens": int(stats["n_tokens"][m].sum())}
    summary = {"db_shard": k, "n_entries": len(shard), "n_examples": len(ex_split), "n_rejected": len(rejects),
               "n_dropped_too_long": n_dropped, "n_cropped": n_cropped, "per_split": per_split}
    write_json_atomic(_work_file(out, k, ".json"), summary)
    return summary


# ============================================================================= the stage
def _write_vocab(cfg: TokenizeConfig, vocab: Vocab) -> None:
    path = cfg.out_dir / "vocab.json"
    if path.exists() and not cfg.overwrite:
        old = read_json(path)
        if old != json.loads(json.dumps(vocab.to_dict())):
            die(f"{path} holds another vocabulary (made with other settings); use --overwrite or another --out")
        return
    vocab.save(path)


def run(cfg: TokenizeConfig, num_tasks: int = 1, task_index: int = 0, max_units: int | None = None) -> list[dict]:
    """This array task's share of stage 04 (and finalize when it is the only task).

    `max_units`: stop after that many DB shards (tests use it to simulate a killed task).
    """
    out = cfg.out_dir
    manifest = out / "manifest.json"
    if manifest.exists():
        if not cfg.overwrite:
            log.info("%s exists: stage 04 (%s) is complete; nothing to do (--overwrite to redo)", manifest, cfg.name)
            return []
        manifest.unlink(missing_ok=True)
    db = ProteinDB(cfg.db)
    kind = make_kind(cfg, codebook_for_task(cfg, num_tasks) if cfg.kind == "geo" else None)
    vocab = kind.vocab()
    _write_vocab(cfg, vocab)
    units = my_units(len(db.shards), num_tasks, task_index)
    log.info("stage 04 %s: %d DB shard(s) for task %d/%d -> %s", cfg.name, len(units), task_index, num_tasks, out)
    done = []
    for n, k in enumerate(units):
        if max_units is not None and n >= max_units:
            break
        if _work_file(out, k, ".json").exists() and not cfg.overwrite:
            log.info("DB shard %d: already tokenized, skipped", k)
            continue
        t = time.time()
        s = tokenize_db_shard(cfg, db, k, kind, vocab)
        dt = time.time() - t
        ntok = sum(v["n_tokens"] for v in s["per_split"].values())
        nres = sum(v["n_residues"] for v in s["per_split"].values())
        log.info("DB shard %d: %d examples, %d residues, %d tokens, %d rejected, %.1fs (%.0f residues/s)",
                 k, s["n_examples"], nres, ntok, s["n_rejected"], dt, nres / max(dt, 1e-9))
        done.append(s)
    if num_tasks == 1 and max_units is None:
        finalize(cfg)
    return done


def finalize(cfg: TokenizeConfig) -> dict:
    """Check every DB shard is done, merge statistics, write rejects/report/PNGs, then the manifest."""
    out = cfg.out_dir
    db = ProteinDB(cfg.db)
    missing = [k for k in range(len(db.shards)) if not _work_file(out, k, ".json").exists()]
    if missing:
        die(f"{len(missing)} DB shard(s) not tokenized yet (e.g. {missing[:5]}); run the array tasks first")
    vocab = Vocab.load(out / "vocab.json")
    summaries = [read_json(_work_file(out, k, ".json")) for k in range(len(db.shards))]
    splits = {}
    for s in SPLITS:
        splits[s] = {"shards": [shard_stem(s, k) for k in range(len(db.shards))],
                     **{f: int(sum(m["per_split"][s][f] for m in summaries)) for f in ("n_examples", "n_residues", "n_tokens")}}
    rejects = "".join(_work_file(out, k, ".rejects.tsv").read_text() for k in range(len(db.shards)))
    write_text_atomic(out / "rejects.tsv", rejects)
    stats = _merge_stats(out, len(db.shards))
    report = build_report(cfg, vocab, summaries, splits, stats, rejects)
    write_report(out / "report.json", report)
    if sum(v["n_examples"] for v in splits.values()) == 0:
        die(f"no examples: every DB entry was rejected (see {out / 'rejects.tsv'})")
    mf = {"format": FORMAT, "version": VERSION, "name": cfg.name, "kind": cfg.kind, "interleaved": cfg.interleaved,
          "direction": vocab.direction,
          "vocab": "vocab.json", "vocab_sha256": sha256_file(out / "vocab.json"), "vocab_size": vocab.size,
          "n_struct": vocab.n_struct, "db": str(Path(cfg.db).resolve()),
          "db_manifest_sha256": sha256_file(Path(cfg.db) / "manifest.json"),
          "max_length": cfg.max_length, "max_example_tokens": vocab.example_length(cfg.max_length),
          "long_policy": cfg.long_policy, "seed": cfg.seed,
          "splits": splits, "token_dtype": "uint16"}
    write_json_atomic(out / "manifest.json", mf)
    log.info("stage 04 %s complete: %s", cfg.name,
             ", ".join(f"{s} {v['n_examples']} examples / {v['n_tokens']} tokens" for s, v in splits.items()))
    return mf


def _merge_stats(out: Path, n_shards: int) -> dict:
    parts = []
    for k in range(n_shards):
        with np.load(_work_file(out, k, ".npz"), allow_pickle=False) as z:
            parts.append({n: z[n] for n in z.files})
    merged = {"code_counts": sum(p["code_counts"] for p in parts)}
    for n in parts[0]:
        if n != "code_counts":
            merged[n] = np.concatenate([p[n] for p in parts])
    return merged
