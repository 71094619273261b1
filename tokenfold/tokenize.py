"""Stage 04: turn the protein DB into token shards for the translator LM (one example per chain).

Token kinds (``kind``):

* ``3di``   Foldseek's 20 3Di states, read from the DB.
* ``esm``   the stage-03 codebook code of each residue's ESM-2 vector: from the stage-02 store when it
            holds full per-shard embeddings, else computed on the fly with the codebook's model.
* ``geo``   our decodable C-alpha tokens (`tokenfold.geotokens`); the codebook is fit once on TRAIN
            chains (``data/geo/geo_codebook_K<K>.npz``) before any shard is tokenized.
* ``kanzi`` Kanzi's FSQ tokens (`tokenfold.kanzi`, needs the package and ``--kanzi-checkpoint``).

``interleaved`` switches the example layout (`tokenfold.vocab`), for every kind.

Output (``data/tokens/<name>``, ``<name>`` = kind [+ ``_interleaved``]; formats in
`tokenfold.shards`/`tokenfold.vocab`)::

    vocab.json                      written first; geo: meta.geo_codebook = {path, relpath, sha256, ...}
    <split>/shard_<k>.bin/.idx.npz  one token shard per split and DB shard k (empty ones too)
    work/shard_<k>.json             per-DB-shard counts: the "shard k is done" marker, written last
    work/shard_<k>.npz, .rejects.tsv   per-example statistics (lengths, geo RMSD), skipped entries
    rejects.tsv, report.json, *.png written by finalize
    manifest.json                   written last by finalize: the stage is complete

Length policy (``max_length`` residues, default 1024): ``crop`` (default) keeps one window of
``max_length`` residues whose start is drawn from a generator seeded by (seed, DB index), so every
array task and every re-run picks the same window, and records it (``crop_start`` in the index);
``drop`` leaves the chain out. Both are counted in the report. geo and kanzi encode the window on its
own (a cropped example decodes by itself); 3di and esm tokens are computed on the whole chain and cut.

Work is split over DB shards (SLURM arrays: `sharding.my_units`); a killed task resumes at the first
DB shard without its marker, and the result equals an uninterrupted run (tested).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import atomic_path, read_json, sha256_file, write_json_atomic, write_text_atomic
from .cli import die, progress
from .db import SPLIT_CODES, SPLITS, ProteinDB
from .sharding import my_units
from .shards import TokenShardWriter, shard_stem
from .vocab import Vocab

log = logging.getLogger("tokenfold.tokenize")

KINDS = ("3di", "esm", "geo", "kanzi")
LONG_POLICIES = ("crop", "drop")
FORMAT = "tokenfold-tokens"
VERSION = 1


@dataclass
class TokenizeConfig:
    db: str = str(layout.DB)
    kind: str = "3di"
    interleaved: bool = False
    out: str | None = None                 # default layout.tokens_dir(name)
    max_length: int = 1024                 # residues per example
    long_policy: str = "crop"
    seed: int = 0
    overwrite: bool = False
    # geo
    geo_k: int = 512
    geo_codebook: str | None = None        # default layout.geo_codebook_path(geo_k)
    geo_fit_max_residues: int = 1_000_000
    geo_refine_iters: int = 3
    geo_beam: int = 1
    geo_wait_s: float = 7200.0
    # esm
    codebook: str | None = None            # stage-03 codebook file (default layout.codebook_path(512))
    embeddings: str | None = None          # stage-02 store (default from the codebook's model and layer)
    esm_model: str | None = None           # model for on-the-fly embeddings (default: the codebook's)
    random_weights_for_testing: bool = False
    device: str | None = None
    # kanzi
    kanzi_checkpoint: str | None = None
    kanzi_decode_steps: int = 100

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown token kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.long_policy not in LONG_POLICIES:
            raise ValueError(f"unknown --long-policy {self.long_policy!r}; expected crop or drop")
        if self.max_length < 1:
            raise ValueError("--max-length must be >= 1")

    @property
    def name(self) -> str:
        return layout.tokens_name(self.kind, self.interleaved)

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


# ============================================================================= token kinds
class _Kind:
    """What differs between kinds: the vocabulary and the codes of a batch of (cropped) chains."""

    needs = "nothing"      # which DB data an entry must have: ss | ca | nothing
    chunk = 512            # chains handed to `codes` at a time (bounds memory)

    def __init__(self, cfg: TokenizeConfig):
        self.cfg = cfg

    def vocab(self) -> Vocab:
        raise NotImplementedError

    def codes(self, items: list[tuple], k: int, first_index: int) -> list:
        """items: (record, a, b) with the kept window [a, b) of entries of DB shard k (whose first global
        index is first_index); returns codes [b-a] or a one-line reason string for each."""
        raise NotImplementedError

    def extra(self, items, results) -> dict:
        """Per-example extra statistics (geo: reconstruction RMSD)."""
        return {}


class _ThreeDi(_Kind):
    needs = "ss"

    def vocab(self) -> Vocab:
        self._v = Vocab.for_kind("3di", interleaved=self.cfg.interleaved)
        return self._v

    def codes(self, items, k, first_index):
        out = []
        for rec, a, b in items:
            try:
                out.append(self._v.threedi_codes(rec.ss)[a:b])
            except ValueError as e:
                out.append(str(e)[:120])
        return out


class _Geo(_Kind):
    needs = "ca"

    def __init__(self, cfg, codebook):
        super().__init__(cfg)
        self.cb = codebook

    def vocab(self) -> Vocab:
        out = self.cfg.out_dir
        path = Path(self.cb.path).resolve()
        ref = {"path": str(path), "relpath": os.path.relpath(path, out.resolve()), "sha256": sha256_file(path),
               "K": self.cb.K, "n_tokens": self.cb.n_tokens, "start_code": self.cb.START,
               "break_code": self.cb.BREAK, "encode_beam": self.cfg.geo_beam}
        return Vocab.for_kind("geo", n_struct=self.cb.n_tokens, interleaved=self.cfg.interleaved, geo_codebook=ref)

    def codes(self, items, k, first_index):
        out: list = [None] * len(items)
        ok = []
        for i, (rec, a, b) in enumerate(items):
            if not np.isfinite(rec.ca[a:b]).all():
                out[i] = "C-alpha coordinates contain NaN"
            else:
                ok.append(i)
        cas = [items[i][0].ca[items[i][1]:items[i][2]] for i in ok]
        gaps = [items[i][0].gap_before[items[i][1]:items[i][2]] for i in ok]
        for i, c in zip(ok, self.cb.encode_many(cas, gaps, beam=self.cfg.geo_beam)):
            out[i] = c
        return out

    def extra(self, items, results) -> dict:
        from .geotokens import segment_starts
        from .metrics import segment_rmsd

        rmsd = np.full(len(items), np.nan)
        nseg = np.zeros(len(items), np.int32)
        ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
        dec = self.cb.decode_many([results[i] for i in ok])
        for i, x in zip(ok, dec):
            rec, a, b = items[i]
            starts = segment_starts(rec.ca[a:b], rec.gap_before[a:b])
            rmsd[i] = segment_rmsd(x, rec.ca[a:b], starts)
            nseg[i] = int(starts.sum())
        return {"rmsd": rmsd, "n_segments": nseg}


class _Esm(_Kind):
    """Codes of the stage-03 codebook. Vectors come from the stage-02 store when it holds full per-shard
    embeddings of this DB; otherwise (a sampled store, or none) they are computed here with the
    codebook's own model and layer (`tokenfold.esm_embed.embed`, same windowing rule as stage 02)."""

    needs = "nothing"      # a sequence is enough
    chunk = 64             # on-the-fly vectors of a 650M ESM-2: 64 chains x 300 x 1280 floats ~ 100 MB

    def __init__(self, cfg):
        super().__init__(cfg)
        from .codebook import Codebook

        self.path = Path(cfg.codebook) if cfg.codebook else layout.codebook_path(512)
        if not self.path.exists():
            raise FileNotFoundError(f"stage-03 codebook not found: {self.path} (run 03_train_codebook.py or pass --codebook)")
        self.cb = Codebook.load(self.path)             # checksum-verified
        m = self.cb.meta
        self.random_weights = bool(m.get("random_weights"))
        if self.random_weights and not cfg.random_weights_for_testing:
            raise ValueError(f"{self.path} was made from a RANDOM-weights ESM-2 (test/demo only); pass "
                             "--random-weights-for-testing to tokenize with it on purpose")
        if cfg.embeddings:
            emb_dir = Path(cfg.embeddings)
        elif m.get("embeddings_dir"):
            emb_dir = Path(m["embeddings_dir"])
        else:
            from .extract import default_out_dir

            emb_dir = default_out_dir(str(m["esm_model"]), int(m["layer"]))
        self.emb_dir, self.store, self.model = emb_dir, None, None
        if (emb_dir / "manifest.json").exists():
            from .embedding_store import EmbeddingStore

            store = EmbeddingStore(emb_dir)
            if str(store.meta.get("model")) != str(m.get("esm_model")) or int(store.meta.get("layer", -1)) != int(m["layer"]):
                raise ValueError(f"{emb_dir}: embeddings of {store.meta.get('model')} layer {store.meta.get('layer')}, "
                                 f"but the codebook was trained on {m.get('esm_model')} layer {m['layer']}")
            if store.mode == "full":
                self.store = store
        spec = cfg.esm_model or (m.get("esm_model_path") if m.get("esm_model_path") and Path(m["esm_model_path"]).exists()
                                 else m["esm_model"])
        self.model_spec = str(spec)
        log.info("esm tokens: codebook %s (K=%d, %s layer %s%s); vectors %s", self.path, self.cb.K, m.get("esm_model"),
                 m["layer"], ", RANDOM WEIGHTS" if self.random_weights else "",
                 f"from {emb_dir}" if self.store is not None else f"computed on the fly with {self.model_spec}")

    def vocab(self) -> Vocab:
        m = self.cb.meta
        ref = {"path": str(self.path.resolve()), "sha256": sha256_file(self.path), "esm_model": m.get("esm_model"),
               "layer": m.get("layer"), "normalize": m.get("normalize"), "K": self.cb.K,
               "random_weights": self.random_weights,
               "vectors": str(self.emb_dir) if self.store is not None else f"computed on the fly ({self.model_spec})"}
        return Vocab.for_kind("esm", n_struct=self.cb.K, interleaved=self.cfg.interleaved, esm_codebook=ref)

    def _embed(self, seqs: list[str]) -> list[np.ndarray]:
        from .esm_checkpoint import load_esm
        from .esm_embed import embed

        if self.model is None:
            self.model, self.alphabet, info = load_esm(self.model_spec, allow_random=self.cfg.random_weights_for_testing,
                                                       device=self.cfg.device)
            if bool(info.get("random_weights")) != self.random_weights:
                raise ValueError(f"{self.model_spec}: random_weights={info.get('random_weights')} but the codebook "
                                 f"says {self.random_weights}: not the model the codebook was trained on")
            if int(info["embed_dim"]) != self.cb.dim:
                raise ValueError(f"{self.model_spec}: dimension {info['embed_dim']}, the codebook's is {self.cb.dim}")
        return embed(self.model, self.alphabet, seqs, layer=int(self.cb.meta["layer"]), device=self.cfg.device)

    def codes(self, items, k, first_index):
        if self.store is not None:
            sh = self.store.shard(k)
            js = [rec.index - first_index for rec, _, _ in items]
            for (rec, _, _), j in zip(items, js):
                if j >= len(sh) or sh.ids[j] != rec.id:
                    raise ValueError(f"{sh.path}: entry {j} is not {rec.id!r} (embeddings made from another DB?)")
            embs = sh.get_many(js)
        else:
            embs = self._embed([rec.aa for rec, _, _ in items])
        out = []
        for (rec, a, b), e in zip(items, embs):
            if len(e) != rec.length:
                out.append(f"{len(e)} embedding rows for {rec.length} residues")
                continue
            c = np.asarray(self.cb.assign(np.asarray(e[a:b], dtype=np.float32)), dtype=np.int64)
            out.append(c if (c >= 0).all() else "non-finite embedding vector")
        return out


class _Kanzi(_Kind):
    needs = "ca"

    def __init__(self, cfg, tokenizer=None):
        super().__init__(cfg)
        from .kanzi import KanziTokenizer

        self.tok = tokenizer or KanziTokenizer.from_checkpoint(cfg.kanzi_checkpoint, device=cfg.device,
                                                               n_decode_steps=cfg.kanzi_decode_steps, seed=cfg.seed)

    def vocab(self) -> Vocab:
        return Vocab.for_kind("kanzi", n_struct=self.tok.n_tokens, interleaved=self.cfg.interleaved, kanzi=self.tok.meta)

    def codes(self, items, k, first_index):
        out = []
        for rec, a, b in items:
            try:
                out.append(self.tok.encode(rec.ca[a:b]))
            except ValueError as e:
                out.append(str(e)[:120])
        return out


# ============================================================================= geo codebook (before the array)
def _db_fingerprint(db_path: Path) -> str:
    return sha256_file(Path(db_path) / "manifest.json")


def geo_fit_key(cfg: TokenizeConfig) -> dict:
    """Everything the fitted codebook depends on; a stored codebook with another key is refit."""
    from .geotokens import VERSION as GEO_VERSION

    return {"db_manifest_sha256": _db_fingerprint(Path(cfg.db)), "K": cfg.geo_k, "seed": cfg.seed,
            "max_residues": cfg.geo_fit_max_residues, "refine_iters": cfg.geo_refine_iters, "version": GEO_VERSION}


def sample_train_chains(db: ProteinDB, max_residues: int, seed: int) -> tuple[list, np.ndarray]:
    """TRAIN chains with C-alpha, in a seeded random order of shards and entries, until `max_residues`.

    Reads only as many DB shards as needed. Returns ([(ca, gap_before)], global indices).
    """
    rng = np.random.default_rng([seed, 4])
    chains, index, total = [], [], 0
    for k in rng.permutation(len(db.shards)):
        shard = db.shards[int(k)]
        codes = np.asarray(db.split_codes[db.shard_starts[k]:db.shard_starts[k + 1]])
        has_ca = shard.arrays["has_ca"]
        for j in rng.permutation(np.flatnonzero((codes == SPLIT_CODES["train"]) & has_ca)):
            rec = shard.record(int(j))
            if not np.isfinite(rec.ca).all():
                continue
            chains.append((rec.ca, rec.gap_before))
            index.append(rec.index)
            total += rec.length
            if total >= max_residues:
                break
        shard.release()
        if total >= max_residues:
            break
    return chains, np.array(index, dtype=np.int64)


def ensure_geo_codebook(cfg: TokenizeConfig, num_tasks: int = 1, task_index: int = 0, refit: bool = False):
    """Load the geo codebook fit for this DB and these settings, fitting it first when needed.

    In a SLURM array only task 0 fits; the others wait (up to `cfg.geo_wait_s`) for its file. Fitting is
    deterministic (seeded) and the file bytes are too, so two tasks fitting at once is only wasted time.
    """
    from .geotokens import GeoCodebook

    path, key = cfg.geo_path, geo_fit_key(cfg)

    def current():
        if path.exists():
            cb = GeoCodebook.load(path)
            if cb.meta.get("fit_key") == key:
                return cb
            log.info("%s was fit with other settings or another DB; refitting", path)
        return None

    cb = None if refit else current()
    if cb is not None:
        return cb
    if num_tasks > 1 and task_index != 0 and not refit:
        log.info("waiting for array task 0 to fit the geo codebook %s", path)
        t0 = time.time()
        while time.time() - t0 < cfg.geo_wait_s:
            time.sleep(10)
            cb = current()
            if cb is not None:
                return cb
        die(f"geo codebook {path} did not appear within {cfg.geo_wait_s:.0f}s (run 04_tokenize.py --fit-geo-only first)")
    db = ProteinDB(cfg.db)
    t = time.time()
    chains, index = sample_train_chains(db, cfg.geo_fit_max_residues, cfg.seed)
    if not chains:
        die(f"{cfg.db}: no train chains with C-alpha coordinates to fit the geo codebook on")
    log.info("fitting geo codebook K=%d on %d train chains (%d residues)", cfg.geo_k, len(chains),
             sum(len(c) for c, _ in chains))
    cb = GeoCodebook.fit(chains, K=cfg.geo_k, seed=cfg.seed, max_residues=cfg.geo_fit_max_residues,
                         refine_iters=cfg.geo_refine_iters,
                         meta={"fit_key": key, "fit_split": "train", "db": str(Path(cfg.db).resolve())})
    cb.fit_index = index
    cb.save(path)
    log.info("geo codebook saved to %s (%.1fs)", path, time.time() - t)
    return GeoCodebook.load(path)


# ============================================================================= one DB shard
def _make_kind(cfg: TokenizeConfig, num_tasks: int, task_index: int, kanzi_tokenizer=None) -> _Kind:
    if cfg.kind == "3di":
        return _ThreeDi(cfg)
    if cfg.kind == "geo":
        return _Geo(cfg, ensure_geo_codebook(cfg, num_tasks, task_index))
    if cfg.kind == "esm":
        return _Esm(cfg)
    return _Kanzi(cfg, kanzi_tokenizer)


def _marker(out: Path, k: int) -> Path:
    return out / "work" / f"shard_{k:05d}.json"


def tokenize_db_shard(cfg: TokenizeConfig, db: ProteinDB, k: int, kind: _Kind, vocab: Vocab) -> dict:
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
    with atomic_path(out / "work" / f"shard_{k:05d}.npz", suffix=".npz") as tmp:
        np.savez(tmp, **stats)
    write_text_atomic(out / "work" / f"shard_{k:05d}.rejects.tsv", "".join(f"{p}\t{r}\n" for p, r in rejects))
    per_split = {}
    for s in SPLITS:
        m = stats["split"] == SPLIT_CODES[s]
        per_split[s] = {"n_examples": int(m.sum()), "n_residues": int(stats["n_res"][m].sum()),
                        "n_tokens": int(stats["n_tokens"][m].sum())}
    summary = {"db_shard": k, "n_entries": len(shard), "n_examples": len(ex_split), "n_rejected": len(rejects),
               "n_dropped_too_long": n_dropped, "n_cropped": n_cropped, "per_split": per_split}
    write_json_atomic(_marker(out, k), summary)
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


def run(cfg: TokenizeConfig, num_tasks: int = 1, task_index: int = 0, kanzi_tokenizer=None,
        max_units: int | None = None) -> list[dict]:
    """This array task's share of stage 04 (and finalize when it is the only task).

    `kanzi_tokenizer`: an already loaded Kanzi tokenizer (tests pass a stand-in). `max_units`: stop after
    that many DB shards (tests use it to simulate a killed task).
    """
    out = cfg.out_dir
    manifest = out / "manifest.json"
    if manifest.exists():
        if not cfg.overwrite:
            log.info("%s exists: stage 04 (%s) is complete; nothing to do (--overwrite to redo)", manifest, cfg.name)
            return []
        manifest.unlink(missing_ok=True)
    db = ProteinDB(cfg.db)
    kind = _make_kind(cfg, num_tasks, task_index, kanzi_tokenizer)
    vocab = kind.vocab()
    _write_vocab(cfg, vocab)
    units = my_units(len(db.shards), num_tasks, task_index)
    log.info("stage 04 %s: %d DB shard(s) for task %d/%d -> %s", cfg.name, len(units), task_index, num_tasks, out)
    done = []
    for n, k in enumerate(units):
        if max_units is not None and n >= max_units:
            break
        if _marker(out, k).exists() and not cfg.overwrite:
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
    missing = [k for k in range(len(db.shards)) if not _marker(out, k).exists()]
    if missing:
        die(f"{len(missing)} DB shard(s) not tokenized yet (e.g. {missing[:5]}); run the array tasks first")
    vocab = Vocab.load(out / "vocab.json")
    summaries = [read_json(_marker(out, k)) for k in range(len(db.shards))]
    splits = {}
    for s in SPLITS:
        splits[s] = {"shards": [shard_stem(s, k) for k in range(len(db.shards))],
                     **{f: int(sum(m["per_split"][s][f] for m in summaries)) for f in ("n_examples", "n_residues", "n_tokens")}}
    rejects = "".join((out / "work" / f"shard_{k:05d}.rejects.tsv").read_text() for k in range(len(db.shards)))
    write_text_atomic(out / "rejects.tsv", rejects)
    stats = _merge_stats(out, len(db.shards))
    report = build_report(cfg, vocab, summaries, splits, stats, rejects)
    from .report import write_report

    write_report(out / "report.json", report)
    if sum(v["n_examples"] for v in splits.values()) == 0:
        die(f"no examples: every DB entry was rejected (see {out / 'rejects.tsv'})")
    mf = {"format": FORMAT, "version": VERSION, "name": cfg.name, "kind": cfg.kind, "interleaved": cfg.interleaved,
          "vocab": "vocab.json", "vocab_sha256": sha256_file(out / "vocab.json"), "vocab_size": vocab.size,
          "n_struct": vocab.n_struct, "db": str(Path(cfg.db).resolve()), "db_manifest_sha256": _db_fingerprint(Path(cfg.db)),
          "max_length": cfg.max_length, "long_policy": cfg.long_policy, "seed": cfg.seed,
          "splits": splits, "token_dtype": "uint16"}
    write_json_atomic(out / "manifest.json", mf)
    log.info("stage 04 %s complete: %s", cfg.name,
             ", ".join(f"{s} {v['n_examples']} examples / {v['n_tokens']} tokens" for s, v in splits.items()))
    return mf


def _merge_stats(out: Path, n_shards: int) -> dict:
    parts = []
    for k in range(n_shards):
        with np.load(out / "work" / f"shard_{k:05d}.npz", allow_pickle=False) as z:
            parts.append({n: z[n] for n in z.files})
    merged = {"code_counts": sum(p["code_counts"] for p in parts)}
    for n in parts[0]:
        if n != "code_counts":
            merged[n] = np.concatenate([p[n] for p in parts])
    return merged


# ============================================================================= report
def build_report(cfg: TokenizeConfig, vocab: Vocab, summaries, splits, stats, rejects: str) -> dict:
    from .metrics import binned, summarize

    out = cfg.out_dir
    reasons: dict[str, int] = {}
    for line in rejects.splitlines():
        r = line.split("\t", 1)[1] if "\t" in line else line
        reasons[r] = reasons.get(r, 0) + 1
    cc = stats["code_counts"]
    freq = {}
    for s, row in zip(SPLITS, cc):
        tot = int(row.sum())
        p = row[row > 0] / max(tot, 1)
        freq[s] = {"n_tokens": tot, "codes_used": int((row > 0).sum()), "of": int(vocab.n_struct),
                   "perplexity": float(np.exp(-(p * np.log(p)).sum())) if tot else None}
    rep = {"stage": "04_tokenize", "name": cfg.name, "kind": cfg.kind, "interleaved": cfg.interleaved,
           "vocab_size": vocab.size, "n_struct": vocab.n_struct, "max_length": cfg.max_length,
           "long_policy": cfg.long_policy, "seed": cfg.seed, "db": str(cfg.db),
           "splits": splits, "n_db_entries": int(sum(m["n_entries"] for m in summaries)),
           "n_dropped_too_long": int(sum(m["n_dropped_too_long"] for m in summaries)),
           "n_cropped": int(sum(m["n_cropped"] for m in summaries)),
           "rejected": reasons, "token_frequency": freq,
           "residues_per_example": {s: summarize(stats["n_res"][stats["split"] == SPLIT_CODES[s]]) for s in SPLITS},
           "tokens_per_example_max": int(stats["n_tokens"].max()) if len(stats["n_tokens"]) else 0,
           "config": {k: v for k, v in asdict(cfg).items() if k != "overwrite"}}
    if cfg.kind == "esm":
        rep["random_weights"] = bool(vocab.meta.get("esm_codebook", {}).get("random_weights"))
        if rep["random_weights"]:
            rep["WARNING"] = "RANDOM-weights ESM-2: these tokens carry no learned information (test/demo only)"
    if cfg.kind == "kanzi":
        rep["kanzi"] = vocab.meta.get("kanzi")
    files = [_plot_frequency(out, vocab, cc), _plot_lengths(out, stats)]
    if cfg.kind == "geo":
        rm, L, sp = stats["rmsd"], stats["n_res"], stats["split"]
        held = sp != SPLIT_CODES["train"]
        ref = vocab.meta["geo_codebook"]
        rep["geo"] = {
            "codebook": ref, "K": ref["K"], "beam": cfg.geo_beam,
            "rmsd_definition": "C-alpha RMSD of decode(encode(chain)) vs the chain, each segment between chain "
                               "breaks superposed on its own (residue-weighted), Angstrom",
            "rmsd": {s: summarize(rm[sp == SPLIT_CODES[s]]) for s in SPLITS},
            "rmsd_heldout": {**summarize(rm[held]), "p90": float(np.percentile(rm[held], 90)) if held.any() else None,
                             "fraction_le_0.5A": float((rm[held] <= 0.5).mean()) if held.any() else None},
            "rmsd_heldout_vs_length": binned(L[held], rm[held]),
            "rmsd_all_vs_length": binned(L, rm),
            "n_examples_with_breaks": int((stats["n_segments"] > 1).sum()),
            "note": "val/test chains were never seen by the codebook (fit on train chains only)"}
        files += _plot_geo(out, stats)
    rep["files"] = [f.name for f in files]
    return rep


def _plot_frequency(out: Path, vocab: Vocab, cc: np.ndarray) -> Path:
    from .report import save_figure, subplots

    fig, (ax1, ax2) = subplots(2, ncols=2, size=5)
    row = cc[0] if cc[0].sum() else cc.sum(0)
    order = np.argsort(row)[::-1]
    frac = row[order] / max(row.sum(), 1)
    ax1.bar(np.arange(len(frac)), frac, width=1.0)
    ax1.set(title=f"{vocab.kind} token frequency (train), {int((row > 0).sum())}/{vocab.n_struct} used",
            xlabel="token rank", ylabel="fraction of tokens", yscale="log" if len(frac) > 30 else "linear")
    if vocab.kind == "3di":
        ax1.set_xticks(np.arange(len(frac)), [vocab.struct_symbols[i] for i in order])
    ax2.plot(np.arange(1, len(frac) + 1), np.cumsum(frac))
    ax2.set(title="cumulative", xlabel="number of most frequent tokens", ylabel="fraction of tokens", ylim=(0, 1.01))
    return save_figure(fig, out / "token_frequency.png")


def _plot_lengths(out: Path, stats: dict) -> Path:
    from .report import save_figure, subplots

    fig, (ax,) = subplots(1, ncols=1, size=5)
    L = stats["n_res"]
    bins = np.linspace(0, max(int(L.max()) if len(L) else 1, 1), 40)
    for s in SPLITS:
        v = L[stats["split"] == SPLIT_CODES[s]]
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{s} (n={len(v)})")
    ax.set(title="residues per example", xlabel="residues", ylabel="examples")
    if len(L):
        ax.legend()
    return save_figure(fig, out / "lengths.png")


def _plot_geo(out: Path, stats: dict) -> list[Path]:
    from .report import save_figure, subplots

    rm, L, sp = stats["rmsd"], stats["n_res"], stats["split"]
    held = sp != SPLIT_CODES["train"]
    fig, (ax,) = subplots(1, ncols=1, size=5)
    bins = np.linspace(0, max(0.6, float(np.nanmax(rm)) if len(rm) else 1), 40)
    for name, m in (("train (codebook saw these)", ~held), ("val+test (held out)", held)):
        if m.any():
            ax.hist(rm[m], bins=bins, alpha=0.6, label=f"{name}: median {np.median(rm[m]):.3f} A, n={int(m.sum())}")
    ax.axvline(0.5, color="k", ls=":", lw=1)
    ax.set(title="geo reconstruction C-alpha RMSD", xlabel="RMSD (A)", ylabel="chains")
    ax.legend(fontsize=8)
    f1 = save_figure(fig, out / "geo_rmsd_hist.png")
    fig, (ax,) = subplots(1, ncols=1, size=5)
    for name, m, c in (("train", ~held, "C0"), ("val+test", held, "C1")):
        if m.any():
            ax.scatter(L[m], rm[m], s=8, alpha=0.6, color=c, label=name)
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set(title="geo reconstruction RMSD vs length", xlabel="residues", ylabel="RMSD (A)", ylim=(0, None))
    ax.legend(fontsize=8)
    f2 = save_figure(fig, out / "geo_rmsd_vs_length.png")
    return [f1, f2]
