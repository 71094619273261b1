"""Stage 01: build the protein DB from structure files, Foldseek databases and FASTA files.

How a run goes (01_prepare_db.py is the CLI):

1. **Plan.** The inputs become one item list, in a fixed order: structure files (sorted by path),
   then each Foldseek DB's entries (index order), then each FASTA file's records. DB shard k holds
   items ``[k*items_per_shard, (k+1)*items_per_shard)``. The plan (and a fingerprint of inputs and
   options) goes to ``work/plan.json``; a later run with other inputs refuses to mix them.
2. **Shards.** Each DB shard is built independently: its per-shard report and rejects go to
   ``work/``, then ``shards/shard_XXXXX.h5`` is written atomically, last. A shard whose file exists
   is skipped, so a killed run resumes where it stopped. SLURM array tasks take shards round-robin
   (`sharding.my_units`); ``--workers`` parallelises structure parsing within a task.
3. **Finalize** (automatic when unsharded, else ``--finalize`` once all tasks are done): merge the
   per-shard rejects/reports, mark later duplicate ids as excluded, cluster the sequences with
   MMseqs2 and deal whole clusters to train/val/test, then write split.npy, cluster.npy,
   rejects.tsv, notes.tsv, report.json/png and, last, manifest.json.

Entry ids: structure files as Foldseek names them (`structure.entry_name` + `_<chain>` for
multi-chain files); when two input files have the same name, the second (in sorted path order)
becomes ``name~2``, the third ``name~3``. Foldseek DB entries take the first word of their `_h`
header; FASTA records the first word of their header. Ids that still collide (e.g. the same protein
given twice) keep the first and exclude the later ones at finalize (split code 3, rejects line).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import structure as S
from .artifacts import atomic_path, read_json, write_json_atomic, write_text_atomic
from .cli import progress
from .db import EXCLUDED, FORMAT, SPLITS, VERSION, Chunk, ProteinRecord, write_shard_arrays
from .fasta import read_records, record_offsets
from .sharding import my_units
from .threedi import encode_3di_arrays
from .vocab import AA_LETTERS, AA_LUT

log = logging.getLogger("tokenfold.prepare")

# the mmCIF entries MDAnalysisTests ships as real, valid files (the others are deliberately broken,
# truncated or customised copies); 1YJP ships twice (.cif and .cif.gz): the plain one is used
_EMBEDDED_MMCIF = ("1BD2.cif.gz", "3KPR.cif.gz", "3PWP.cif.gz", "5PTI.cif.gz", "7ETN.cif.gz", "1YJP.cif")


# ----------------------------------------------------------------------------- options
@dataclass
class PrepareOptions:
    """Everything that changes what goes into the shards (part of the plan fingerprint)."""

    min_length: int = 20
    max_length: int = 5000
    max_unknown: float = 0.1          # max fraction of X residues
    min_plddt: float = 70.0           # mean pLDDT; only applies to entries that have pLDDT
    plddt_from_bfactor: str = "auto"  # auto (AlphaFold models only) | yes | no
    chain_breaks: str = "record"      # record (gap_before) | split (one entry per segment)
    break_distance: float = S.BREAK_DISTANCE
    items_per_shard: int = 5000

    def __post_init__(self):
        if self.plddt_from_bfactor not in ("auto", "yes", "no"):
            raise ValueError(f"plddt_from_bfactor must be auto|yes|no, got {self.plddt_from_bfactor!r}")
        if self.chain_breaks not in ("record", "split"):
            raise ValueError(f"chain_breaks must be record|split, got {self.chain_breaks!r}")
        if self.items_per_shard < 1:
            raise ValueError("items_per_shard must be >= 1")
        if not 0 <= self.max_unknown <= 1:
            raise ValueError("max_unknown is a fraction in [0, 1]")


@dataclass
class SplitOptions:
    """What the finalize step does with the entries (does not touch the shards)."""

    fractions: tuple = (0.8, 0.1, 0.1)
    min_seq_id: float = 0.3
    coverage: float = 0.8
    seed: int = 0
    threads: int = 1
    mmseqs: str | None = None         # path of the binary; None: $TOKENFOLD_MMSEQS or PATH
    use_mmseqs: bool = True
    mmseqs_mode: str = "cluster"      # cluster (easy-cluster) | linclust (easy-linclust)


@dataclass
class Inputs:
    structures: list = field(default_factory=list)   # dirs, files or globs
    foldseek_dbs: list = field(default_factory=list)  # DB prefixes
    fasta: list = field(default_factory=list)         # FASTA files

    def empty(self) -> bool:
        return not (self.structures or self.foldseek_dbs or self.fasta)


def embedded_default_inputs() -> list[Path]:
    """The embedded default dataset: real PDB/mmCIF files that the PyPI package MDAnalysisTests ships.

    MDAnalysisTests/data/dssp/*.pdb.gz (49 files of one chain each; ``1mr1D_failing`` is a doctored
    copy of 1mr1D and is left out) plus the valid mmCIF entries of MDAnalysisTests/data/mmcif (each entry
    once: 1BD2, 3KPR, 3PWP as .cif.gz rather than their .pdb.gz twins; 5PTI; 7ETN; 1YJP).
    """
    try:
        import MDAnalysisTests
    except ImportError as e:  # pragma: no cover - a hard requirement
        raise RuntimeError("the embedded default dataset needs the MDAnalysisTests package "
                           "(pip install MDAnalysisTests==2.11.0)") from e
    data = Path(MDAnalysisTests.__file__).parent / "data"
    pdbs = sorted(p for p in (data / "dssp").glob("*.pdb.gz") if "_failing" not in p.name)
    cifs = [data / "mmcif" / name for name in _EMBEDDED_MMCIF if (data / "mmcif" / name).exists()]
    if not pdbs:
        raise RuntimeError(f"no embedded structures found under {data}")
    return pdbs + cifs


# ----------------------------------------------------------------------------- planning
def expand_structure_args(args: Sequence[str | os.PathLike]) -> list[Path]:
    """Files from directories (recursive; hidden files skipped), plain paths and globs; sorted, unique."""
    files: set[Path] = set()
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = [f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file():
            found = [p]
        else:
            found = [Path(f) for f in glob.glob(str(a), recursive=True) if Path(f).is_file()]
        if not found:
            raise FileNotFoundError(f"--structures {a}: no such file, directory or matching glob")
        files.update(f.resolve() for f in found)
    return sorted(files, key=str)


def disambiguated_bases(files: Sequence[Path]) -> list[str]:
    """Foldseek entry names of the files; repeated names get ~2, ~3, ... in file order."""
    seen: Counter = Counter()
    out = []
    for f in files:
        base = S.entry_name(f)
        seen[base] += 1
        out.append(base if seen[base] == 1 else f"{base}~{seen[base]}")
    return out


@dataclass
class Plan:
    structure_files: list[str]
    structure_bases: list[str]
    foldseek: list[dict]     # {"prefix", "n"}
    fasta: list[dict]        # {"path", "n"}
    options: dict
    n_items: int
    n_shards: int
    fingerprint: str
    # record offsets of each FASTA file, found while planning and reused by every shard (not saved)
    fasta_offsets: dict = field(default_factory=dict, repr=False, compare=False)

    def segments(self) -> list[tuple[str, int, int, int]]:
        """(kind, source number, first global item, item count) in item order."""
        segs, start = [], 0
        if self.structure_files:
            segs.append(("structure", 0, start, len(self.structure_files)))
            start += len(self.structure_files)
        for i, d in enumerate(self.foldseek):
            segs.append(("foldseek", i, start, d["n"]))
            start += d["n"]
        for i, d in enumerate(self.fasta):
            segs.append(("fasta", i, start, d["n"]))
            start += d["n"]
        return segs

    def shard_range(self, k: int) -> tuple[int, int]:
        ips = self.options["items_per_shard"]
        return k * ips, min((k + 1) * ips, self.n_items)


def make_plan(inputs: Inputs, opts: PrepareOptions) -> Plan:
    from .foldseek import open_db

    files = expand_structure_args(inputs.structures) if inputs.structures else []
    fdbs = []
    for prefix in inputs.foldseek_dbs:
        db = open_db(prefix)
        fdbs.append({"prefix": str(Path(prefix).resolve()), "n": len(db)})
    fas, fasta_offsets = [], {}
    for fa in inputs.fasta:
        fa = Path(fa)
        if not fa.is_file():
            raise FileNotFoundError(f"--fasta {fa}: no such file")
        path = str(fa.resolve())
        fasta_offsets[path] = record_offsets(fa)
        fas.append({"path": path, "n": int(len(fasta_offsets[path]) - 1)})
    n_items = len(files) + sum(d["n"] for d in fdbs) + sum(d["n"] for d in fas)
    ips = opts.items_per_shard
    n_shards = (n_items + ips - 1) // ips
    h = hashlib.sha256()
    h.update(json.dumps(asdict(opts), sort_keys=True).encode())
    for f in files:
        h.update(f"{f}\t{f.stat().st_size}\n".encode())
    for d in fdbs:
        h.update(f"foldseek\t{d['prefix']}\t{d['n']}\n".encode())
    for d in fas:
        h.update(f"fasta\t{d['path']}\t{d['n']}\t{Path(d['path']).stat().st_size}\n".encode())
    return Plan(structure_files=[str(f) for f in files], structure_bases=disambiguated_bases(files),
                foldseek=fdbs, fasta=fas, options=asdict(opts), n_items=n_items, n_shards=n_shards,
                fingerprint=h.hexdigest()[:16], fasta_offsets=fasta_offsets)


# ----------------------------------------------------------------------------- per-item ingestion
@dataclass
class ItemResult:
    """What one input item (or block of items) gave: kept records or a ready chunk of entries,
    rejects (input, chain, reason) and notes (input, chain, note)."""

    records: list = field(default_factory=list)
    rejects: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    chunk: Chunk | None = None

    @property
    def n_kept(self) -> int:
        return len(self.records) + (len(self.chunk) if self.chunk is not None else 0)


def _filter_reason(aa: str, opts: PrepareOptions, plddt: np.ndarray | None = None) -> str | None:
    """The one-line reason to reject a chain, or None to keep it."""
    L = len(aa)
    if L == 0:
        return "empty sequence"
    if aa.count("X") == L:
        return f"no protein chain: all {L} residues are unknown (X), e.g. a ligand"
    if L < opts.min_length:
        return f"shorter than min length: {L} residues < {opts.min_length}"
    if L > opts.max_length:
        return f"longer than max length: {L} residues > {opts.max_length}"
    unk = aa.count("X") / L
    if unk > opts.max_unknown:
        return f"too many unknown residues: {unk:.0%} X > {opts.max_unknown:.0%}"
    if plddt is not None and opts.min_plddt > 0:
        m = float(np.mean(plddt))
        if m < opts.min_plddt:
            return f"low pLDDT: mean {m:.1f} < {opts.min_plddt:g}"
    return None


def ingest_structure_file(path: str, base: str, opts: PrepareOptions) -> ItemResult:
    """One PDB/mmCIF file -> records (one per kept chain or segment). Never raises."""
    res = ItemResult()
    try:
        pf = S.parse_structure_file(path, opts.break_distance)
    except S.StructureError as e:
        res.rejects.append((path, "", str(e)))
        return res
    except Exception as e:  # a parser bug must not stop the run; the reason says what happened
        res.rejects.append((path, "", f"internal error while parsing: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
        log.debug("parse failure %s\n%s", path, traceback.format_exc())
        return res
    for note in pf.notes:
        res.notes.append((path, "", note))
    if pf.n_models > 1:
        res.notes.append((path, "", f"models: {pf.n_models} in the file, kept the first"))
    use_plddt = opts.plddt_from_bfactor == "yes" or (opts.plddt_from_bfactor == "auto" and pf.is_alphafold)
    chains = [c for c in pf.chains if len(c)]
    if not chains:
        res.rejects.append((path, "", "no protein chain (no polymer residue with a C-alpha atom)"))
        return res
    for ch in chains:
        try:
            _ingest_chain(res, path, base, pf, ch, use_plddt, opts)
        except Exception as e:
            res.rejects.append((path, ch.name, f"internal error: {type(e).__name__}: {str(e)[:160]}"))
    return res


def _ingest_chain(res: ItemResult, path: str, base: str, pf: S.ParsedFile, ch: S.Chain, use_plddt: bool,
                  opts: PrepareOptions) -> None:
    cid = S.chain_entry_id(base, ch.name, pf.n_gemmi_chains)
    gap = ch.gap_before  # C-alpha steps > opts.break_distance and dropped non-finite residues
    ca_trace = ch.is_ca_trace
    if ca_trace:
        res.notes.append((path, ch.name, "no 3Di: C-alpha trace (N and C missing on most residues); kept without 3Di"))
    pieces = S.segments(gap) if opts.chain_breaks == "split" else [(0, len(ch))]
    n_breaks = int(gap[1:].sum()) if len(gap) > 1 else 0
    if n_breaks and opts.chain_breaks == "record":
        res.notes.append((path, ch.name, f"chain breaks: {n_breaks} (CA-CA > {opts.break_distance:g} A) recorded in gap_before"))
    for j, (a, b) in enumerate(pieces):
        eid = cid if len(pieces) == 1 else f"{cid}_seg{j + 1}"
        aa = ch.aa[a:b]
        plddt = ch.bfactor[a:b].astype(np.float32) if use_plddt else None
        reason = _filter_reason(aa, opts, plddt)
        label = ch.name if len(pieces) == 1 else f"{ch.name}:seg{j + 1}"
        if reason:
            res.rejects.append((path, label, reason))
            continue
        ss = None
        if not ca_trace:
            ss = encode_3di_arrays(ch.ca[a:b], ch.n[a:b], ch.c[a:b], ch.cb[a:b])
        g = gap[a:b].copy()
        g[0] = False
        res.records.append(ProteinRecord(id=eid, aa=aa, ss=ss, ca=np.ascontiguousarray(ch.ca[a:b], dtype=np.float32),
                                         plddt=plddt, gap_before=g, source="structure", origin=path))


def _aa_letters(seq: str) -> str:
    """A trailing stop removed; anything but the 20 standard letters (either case) -> X."""
    s = seq.rstrip("*")
    return _AA_LUT[np.frombuffer(s.encode("latin-1", "replace"), dtype=np.uint8)].tobytes().decode("ascii")


def ingest_fasta_range(path: str, offsets: np.ndarray, a: int, b: int, opts: PrepareOptions) -> ItemResult:
    """Records a..b-1 of a FASTA file (offsets from `fasta.record_offsets`)."""
    res = ItemResult()
    for pid, seq in read_records(path, offsets, a, b):
        if not pid:
            res.rejects.append((path, "", "FASTA record without an id"))
            continue
        aa = _aa_letters(seq)
        reason = _filter_reason(aa, opts)
        if reason:
            res.rejects.append((path, pid, reason))
            continue
        res.records.append(ProteinRecord(id=pid, aa=aa, source="fasta", origin=path))
    return res


# byte -> the letter byte of our amino-acid alphabet (20 standard letters, either case; else X)
_AA_LUT = np.frombuffer(AA_LETTERS.encode("ascii"), dtype=np.uint8)[AA_LUT]


def ingest_foldseek_range(prefix: str, a: int, b: int, opts: PrepareOptions) -> ItemResult:
    """Entries a..b-1 of a Foldseek DB, decoded and filtered in bulk (no per-residue Python).

    Entries without 3Di / C-alpha (no `_ss` / `_ca` file, or missing from it) are kept, flagged
    (has_ss / has_ca False). Foldseek entries keep their chains whole; breaks go to gap_before.
    """
    from .foldseek import open_db

    res = ItemResult()
    db = open_db(prefix)
    if a == 0 and db.missing:
        what = {"_ss": "3Di", "_ca": "C-alpha", "_h": "header ids (ids from .lookup or keys)"}
        res.notes.append((prefix, "", "missing files: database has no " + ", ".join(db.missing) +
                          "; entries kept without " + ", ".join(what[m] for m in db.missing)))
    bt = db.read_range(a, b)
    L = bt.lengths
    n, R = len(L), int(L.sum())
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(L, out=starts[1:])
    aa = _AA_LUT[bt.aa]
    # per-entry filters, vectorised: length, all-X, fraction of X
    n_x = np.add.reduceat((aa == ord("X")).astype(np.int64), starts[:-1]) if R else np.zeros(n, np.int64)
    n_x[L == 0] = 0
    frac_x = n_x / np.maximum(L, 1)
    keep = (L >= max(1, opts.min_length)) & (L <= opts.max_length) & (n_x < L) & (frac_x <= opts.max_unknown)
    for j in np.flatnonzero(~keep):
        seq = aa[starts[j]:starts[j + 1]].tobytes().decode("ascii")
        res.rejects.append((f"{prefix}#{int(bt.keys[j])}", bt.ids[j], _filter_reason(seq, opts) or "filtered"))
    gap = np.zeros(R, dtype=bool)
    ca = bt.ca if bt.ca is not None else np.full((R, 3), np.nan, dtype=np.float32)
    if bt.ca is not None and R > 1:
        step = np.diff(ca, axis=0)
        gap[1:] = ~(np.einsum("ij,ij->i", step, step) <= opts.break_distance ** 2)
        gap[starts[:-1][L > 0]] = False
        if not bt.has_ca.all():
            gap &= np.repeat(bt.has_ca, L)
    ss = bt.ss if bt.ss is not None else np.zeros(R, dtype=np.uint8)
    if bt.ss is not None and not bt.has_ss.all():
        ss = np.where(np.repeat(bt.has_ss, L), ss, 0).astype(np.uint8)
    kept = np.flatnonzero(keep)
    if len(kept) == n:  # the usual case: no copies
        sel = slice(None)
    else:
        sel = np.repeat(keep, L)
    res.chunk = Chunk(ids=[bt.ids[j] for j in kept] if len(kept) < n else list(bt.ids),
                      source=["foldseek"] * len(kept),
                      origin=[f"{prefix}#{k}" for k in bt.keys[kept].tolist()], lengths=L[kept].astype(np.int64),
                      aa=aa[sel], ss=ss[sel], ca=ca[sel], plddt=np.full(int(L[kept].sum()), np.nan, dtype=np.float32),
                      gap_before=gap[sel], has_ss=bt.has_ss[kept], has_ca=bt.has_ca[kept],
                      has_plddt=np.zeros(len(kept), dtype=bool))
    return res


# worker-process entry point (top level so that multiprocessing can pickle it)
def _structure_job(job):
    path, base, opts = job
    return ingest_structure_file(path, base, opts)


# ----------------------------------------------------------------------------- one DB shard
def shard_paths(out: Path, k: int) -> dict[str, Path]:
    return {"h5": out / "shards" / f"shard_{k:05d}.h5", "report": out / "work" / f"shard_{k:05d}.report.json",
            "rejects": out / "work" / f"shard_{k:05d}.rejects.tsv", "notes": out / "work" / f"shard_{k:05d}.notes.tsv"}


def _tsv_line(*cols) -> str:
    return "\t".join(str(c).replace("\t", " ").replace("\n", " ") for c in cols) + "\n"


def _one_blas_thread() -> None:
    """Structure parsing and 3Di make many tiny numpy matrix products, on which OpenBLAS's threads only
    spin: the shared structures took 10.7 CPU-s with numpy's default threads and 5.3 CPU-s with one
    (5.4 s wall either way on 2 cores), so 2 worker processes could not run faster than 1. One BLAS
    thread per process (the main one and every pool worker) makes workers scale."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def make_pool(workers: int):
    """Worker processes for structure files (fork where available), each with one BLAS thread."""
    return mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers, initializer=_one_blas_thread)


def build_shard(out: Path, plan: Plan, k: int, pool=None) -> dict:
    """Ingest the items of DB shard k and write its files (h5 last). Returns the shard report."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):   # see _one_blas_thread
        return _build_shard(out, plan, k, pool)


def _build_shard(out: Path, plan: Plan, k: int, pool) -> dict:
    opts = PrepareOptions(**plan.options)
    lo, hi = plan.shard_range(k)
    t0 = time.time()
    chunks: list[Chunk] = []
    rejects: list[tuple] = []
    notes: list[tuple] = []
    items, kept, rejected_items = Counter(), Counter(), Counter()

    def collect(r: ItemResult, kind: str, pending: list):
        pending.extend(r.records)
        if r.chunk is not None:
            chunks.append(r.chunk)
        rejects.extend(r.rejects)
        notes.extend(r.notes)
        kept[kind] += r.n_kept
        rejected_items[kind] += len(r.rejects)

    bar = progress(total=hi - lo, desc=f"shard {k}", unit="item")
    for kind, src, start, n in plan.segments():
        a, b = max(lo, start), min(hi, start + n)
        if a >= b:
            continue
        la, lb = a - start, b - start
        items[kind] += b - a
        pending: list[ProteinRecord] = []
        if kind == "structure":
            jobs = [(plan.structure_files[i], plan.structure_bases[i], opts) for i in range(la, lb)]
            results = pool.imap(_structure_job, jobs, chunksize=4) if pool is not None else map(_structure_job, jobs)
            last_log = time.time()
            for i, r in enumerate(results, 1):
                collect(r, kind, pending)
                bar.update(1)
                if time.time() - last_log > 60:
                    last_log = time.time()
                    log.info("shard %d: %d/%d structure files, %.0f files/s", k, i, lb - la, i / (last_log - t0))
        elif kind == "foldseek":
            collect(ingest_foldseek_range(plan.foldseek[src]["prefix"], la, lb, opts), kind, pending)
            bar.update(b - a)
        else:
            path = plan.fasta[src]["path"]
            offs = plan.fasta_offsets.get(path)
            if offs is None:
                offs = plan.fasta_offsets[path] = record_offsets(path)
            collect(ingest_fasta_range(path, offs, la, lb, opts), kind, pending)
            bar.update(b - a)
        if pending:
            chunks.append(Chunk.from_records(pending))
    bar.close()
    chunk = Chunk.concat(chunks)
    rep = _shard_report(k, lo, hi, chunk, rejects, notes, items, kept, rejected_items, time.time() - t0)
    p = shard_paths(out, k)
    write_text_atomic(p["rejects"], "".join(_tsv_line(*r) for r in rejects))
    write_text_atomic(p["notes"], "".join(_tsv_line(*r) for r in notes))
    write_json_atomic(p["report"], rep)
    write_shard_arrays(p["h5"], chunk.arrays(), {"shard": k, "first_item": lo, "end_item": hi, "plan": plan.fingerprint})
    log.info("shard %d: items %d-%d, %d entries kept, %d rejected, %.1fs", k, lo, hi - 1, len(chunk), len(rejects), rep["seconds"])
    return rep


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0].strip()


def _letter_counts(arr: np.ndarray) -> dict:
    counts = np.bincount(arr, minlength=256)
    return {chr(i): int(counts[i]) for i in np.flatnonzero(counts) if i}


def _shard_report(k, lo, hi, chunk: Chunk, rejects, notes, items, kept, rejected_items, seconds) -> dict:
    starts = np.concatenate([[0], np.cumsum(chunk.lengths)[:-1]]).astype(np.int64)
    gap = chunk.gap_before.astype(np.int64)
    n_breaks = np.add.reduceat(gap, starts) - gap[starts] if len(chunk) and len(gap) else np.zeros(0)
    return {
        "shard": k, "items": [lo, hi], "seconds": round(seconds, 3),
        "items_by_source": dict(items), "kept_by_source": dict(kept), "rejected_by_source": dict(rejected_items),
        "rejected_by_reason": dict(Counter(_reason_kind(r[2]) for r in rejects)),
        "notes_by_kind": dict(Counter(_reason_kind(n[2]) for n in notes)),
        "n_entries": len(chunk), "n_residues": int(chunk.lengths.sum()),
        "n_no_ss": int((~chunk.has_ss).sum()), "n_no_ca": int((~chunk.has_ca).sum()),
        "n_plddt": int(chunk.has_plddt.sum()), "n_with_breaks": int((n_breaks > 0).sum()),
        "ss_counts": _letter_counts(chunk.ss), "aa_counts": _letter_counts(chunk.aa),
    }


# ----------------------------------------------------------------------------- the whole run
FINAL_FILES = ("manifest.json", "split.npy", "cluster.npy", "rejects.tsv", "notes.tsv", "report.json", "report.png")


class PlanMismatch(Exception):
    pass


def _remove_outputs(out: Path, shards: Iterable[int] | None) -> None:
    """--overwrite: drop the final artifacts and the given shards (all shard files when None)."""
    for name in FINAL_FILES:
        (out / name).unlink(missing_ok=True)
    if shards is None:
        shutil.rmtree(out / "shards", ignore_errors=True)
        shutil.rmtree(out / "work", ignore_errors=True)
    else:
        for k in shards:
            for p in shard_paths(out, k).values():
                p.unlink(missing_ok=True)


def run(inputs: Inputs, out: str | os.PathLike, opts: PrepareOptions | None = None,
        split_opts: SplitOptions | None = None, num_tasks: int = 1, task_index: int = 0, workers: int = 1,
        finalize_only: bool = False, overwrite: bool = False) -> dict:
    """Stage 01 end to end (or this SLURM array task's share of it). Returns a small status dict."""
    opts = opts or PrepareOptions()
    split_opts = split_opts or SplitOptions()
    out = Path(out)
    plan = make_plan(inputs, opts)
    if plan.n_items == 0:
        raise PlanMismatch("no input items: the given inputs hold no files or entries")
    manifest = out / "manifest.json"
    mine = list(range(plan.n_shards)) if finalize_only else my_units(plan.n_shards, num_tasks, task_index)
    if overwrite and not finalize_only:
        _remove_outputs(out, None if num_tasks == 1 else mine)
    if manifest.exists():
        m = read_json(manifest)
        if m.get("plan") != plan.fingerprint:
            raise PlanMismatch(f"{out} holds a finished DB built from other inputs/options "
                               f"(plan {m.get('plan')} vs {plan.fingerprint}); use --overwrite or another --out")
        log.info("%s is complete (%d entries); nothing to do (use --overwrite to rebuild)", out, m["n_entries"])
        return {"status": "complete", "n_entries": m["n_entries"], "shards_built": 0}
    plan_path = out / "work" / "plan.json"
    if plan_path.exists():
        old = read_json(plan_path)
        if old.get("fingerprint") != plan.fingerprint:
            raise PlanMismatch(f"{out} holds a partial DB from other inputs/options (plan {old.get('fingerprint')} "
                               f"vs {plan.fingerprint}); use --overwrite or another --out")
    else:
        write_json_atomic(plan_path, {"fingerprint": plan.fingerprint, "n_items": plan.n_items,
                                      "n_shards": plan.n_shards, "options": plan.options,
                                      "structure_files": len(plan.structure_files),
                                      "foldseek": plan.foldseek, "fasta": plan.fasta})
    built = 0
    if not finalize_only:
        todo = [k for k in mine if not shard_paths(out, k)["h5"].exists()]
        log.info("plan %s: %d items in %d DB shards; task %d/%d owns %d, %d to build",
                 plan.fingerprint, plan.n_items, plan.n_shards, task_index, num_tasks, len(mine), len(todo))
        pool = None
        try:
            if workers > 1 and todo and plan.structure_files:
                pool = make_pool(workers)
            for k in todo:
                build_shard(out, plan, k, pool)
                built += 1
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    if num_tasks == 1 or finalize_only:
        missing = [k for k in range(plan.n_shards) if not shard_paths(out, k)["h5"].exists()]
        if missing:
            raise PlanMismatch(f"cannot finalize: {len(missing)} of {plan.n_shards} DB shards are missing "
                               f"(e.g. shard {missing[0]}); run the array tasks first")
        man = finalize(out, plan, split_opts)
        return {"status": "finalized", "n_entries": man["n_entries"], "shards_built": built}
    log.info("task %d/%d done; run with --finalize once every array task has finished", task_index, num_tasks)
    return {"status": "shards", "shards_built": built}


# ----------------------------------------------------------------------------- finalize
def _shard_ids(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids as fixed-width bytes, lengths) of one shard, without loading its residue arrays."""
    import h5py

    with h5py.File(path, "r") as f:
        ids = f["id"][()]  # bytes objects (vlen UTF-8 read raw)
        lengths = np.diff(f["offsets"][()])
    return np.array(ids, dtype="S") if len(ids) else np.zeros(0, dtype="S1"), lengths


def _write_sequences(out: Path, plan: Plan, include: np.ndarray, fasta: Path, starts: np.ndarray) -> np.ndarray:
    """Stream the included entries' sequences, shard by shard, into a FASTA named by position
    among the included (what MMseqs2 clusters); returns a 16-byte hash per included sequence
    (the exact-sequence fallback). Nothing but one shard's amino acids is held in memory."""
    import h5py

    from . import split as SP

    hashes = np.zeros((int(include.sum()), 16), dtype=np.uint8)
    pos = 0
    with atomic_path(fasta) as tmp, open(tmp, "w") as fh:
        for k in range(plan.n_shards):
            with h5py.File(shard_paths(out, k)["h5"], "r") as f:
                offs = f["offsets"][()]
                aa = f["aa"][()].tobytes().decode("ascii")
            inc = include[starts[k]:starts[k + 1]]
            lines = []
            for j in np.flatnonzero(inc).tolist():
                seq = aa[offs[j]:offs[j + 1]]
                hashes[pos] = SP.sequence_hash(seq)
                lines.append(f">{pos}\n{seq}\n")
                pos += 1
            fh.write("".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
    return hashes


def _concat_texts(paths: Sequence[Path], dest: Path, extra: Sequence[tuple] = ()) -> None:
    with atomic_path(dest) as tmp, open(tmp, "w") as out:
        for p in paths:
            with open(p) as f:
                shutil.copyfileobj(f, out)
        out.write("".join(_tsv_line(*r) for r in extra))


def finalize(out: Path, plan: Plan, split_opts: SplitOptions) -> dict:
    """Merge the shards' reports and rejects, exclude later duplicate ids, split by clusters, write
    split.npy, cluster.npy, rejects.tsv, notes.tsv, report.json/png and, last, manifest.json.

    Memory: the ids (fixed-width bytes), lengths and a 16-byte hash per entry, plus one shard at a
    time; sequences go to MMseqs2 through a FASTA file streamed shard by shard.
    """
    from . import split as SP

    t0 = time.time()
    shard_infos, reports, id_parts, len_parts = [], [], [], []
    for k in range(plan.n_shards):
        p = shard_paths(out, k)
        ids, lengths = _shard_ids(p["h5"])
        shard_infos.append({"file": f"shards/{p['h5'].name}", "n_entries": int(len(ids)), "n_residues": int(lengths.sum())})
        id_parts.append(ids)
        len_parts.append(lengths)
        reports.append(read_json(p["report"]))
    starts = np.concatenate([[0], np.cumsum([len(x) for x in id_parts])]).astype(np.int64)
    n = int(starts[-1])
    if n == 0:
        reasons = Counter()
        for r in reports:
            reasons.update(r["rejected_by_reason"])
        top = ", ".join(f"{k} x{v}" for k, v in reasons.most_common(3)) or "no items"
        raise PlanMismatch(f"nothing could be ingested ({top}); see {out / 'work'}/*.rejects.tsv")
    lengths = np.concatenate(len_parts)
    width = max(x.dtype.itemsize for x in id_parts)
    ids = np.concatenate([x.astype(f"S{width}") for x in id_parts])
    del id_parts

    # later duplicates of an id are excluded (kept in the shard files, hidden by ProteinDB)
    _, first_idx, inverse = np.unique(ids, return_index=True, return_inverse=True)
    first_of = first_idx[inverse.ravel()]
    codes = np.zeros(n, dtype=np.uint8)
    dups = np.flatnonzero(first_of != np.arange(n))
    codes[dups] = EXCLUDED
    dup_rejects = []
    if len(dups):
        origins = {}
        for g in np.concatenate([dups, first_of[dups]]).tolist():
            origins.setdefault(g, None)
        for k in range(plan.n_shards):  # origins only of the entries involved
            want = [g for g in origins if starts[k] <= g < starts[k + 1]]
            if want:
                import h5py

                with h5py.File(shard_paths(out, k)["h5"], "r") as f:
                    o = f["origin"]
                    for g in want:
                        origins[g] = o[g - starts[k]].decode()
        for g in dups.tolist():
            j = int(first_of[g])
            dup_rejects.append((origins[g], ids[g].decode(), f"duplicate id: same id as entry #{j} from {origins[j]}; excluded (split code 3)"))
    include = codes != EXCLUDED
    included = np.flatnonzero(include)
    fasta = out / "work" / "included.fasta"
    hashes = _write_sequences(out, plan, include, fasta, starts)
    try:
        clus = SP.cluster_fasta(fasta, hashes, out / "work", split_opts.min_seq_id, split_opts.coverage,
                                split_opts.threads, split_opts.mmseqs, split_opts.use_mmseqs, split_opts.mmseqs_mode)
    finally:
        fasta.unlink(missing_ok=True)
    inc_codes = SP.assign_splits(clus.rep, ids[included], split_opts.fractions, split_opts.seed)
    codes[included] = inc_codes
    cluster = np.full(n, -1, dtype=np.int64)
    cluster[included] = included[clus.rep]

    with atomic_path(out / "split.npy", suffix=".npy") as tmp:
        np.save(tmp, codes)
    with atomic_path(out / "cluster.npy", suffix=".npy") as tmp:
        np.save(tmp, cluster)
    _concat_texts([shard_paths(out, k)["rejects"] for k in range(plan.n_shards)], out / "rejects.tsv", dup_rejects)
    _concat_texts([shard_paths(out, k)["notes"] for k in range(plan.n_shards)], out / "notes.tsv")

    report = _final_report(plan, reports, lengths, codes, cluster, clus, split_opts, len(dup_rejects))
    report["seconds_finalize"] = round(time.time() - t0, 2)
    from .report import write_report

    write_report(out / "report.json", report)
    _report_png(out / "report.png", report, lengths[codes != EXCLUDED])
    manifest = {
        "format": FORMAT, "version": VERSION, "stage": "01_prepare_db", "plan": plan.fingerprint,
        "n_entries": n, "n_included": int(len(included)), "n_residues": int(lengths.sum()),
        "shards": shard_infos,
        "split_sizes": report["split"]["entries"],
        "inputs": {"structure_files": len(plan.structure_files),
                   "structure_dirs": sorted({str(Path(f).parent) for f in plan.structure_files})[:50],
                   "foldseek": plan.foldseek, "fasta": plan.fasta},
        "options": plan.options,
        "split": {"method": clus.method, "detail": clus.detail, "fractions": list(split_opts.fractions),
                  "min_seq_id": split_opts.min_seq_id, "coverage": split_opts.coverage, "seed": split_opts.seed},
        "files": {"split": "split.npy", "cluster": "cluster.npy", "rejects": "rejects.tsv", "notes": "notes.tsv",
                  "report": "report.json"},
    }
    write_json_atomic(out / "manifest.json", manifest)
    log.info("finalized %s: %d entries (%d excluded duplicates), split %s by %s", out, n, len(dup_rejects),
             report["split"]["entries"], clus.method)
    return manifest


def _final_report(plan, reports, lengths, codes, cluster, clus, split_opts, n_dups) -> dict:
    tot = Counter()
    by = {k: Counter() for k in ("items_by_source", "kept_by_source", "rejected_by_source", "rejected_by_reason",
                                 "notes_by_kind", "ss_counts", "aa_counts")}
    for r in reports:
        for k in by:
            by[k].update(r[k])
        for k in ("n_entries", "n_residues", "n_no_ss", "n_no_ca", "n_plddt", "n_with_breaks"):
            tot[k] += r[k]
    if n_dups:
        by["rejected_by_reason"]["duplicate id"] += n_dups
    inc = codes != EXCLUDED
    L = lengths[inc]
    ss_total = sum(by["ss_counts"].values()) or 1
    split_entries = {name: int((codes == c).sum()) for c, name in enumerate(SPLITS)}
    split_clusters = {name: int(len(np.unique(cluster[codes == c]))) for c, name in enumerate(SPLITS)}
    return {
        "stage": "01_prepare_db", "plan": plan.fingerprint,
        "counts": {"items": plan.n_items, "entries": int(tot["n_entries"]), "included": int(inc.sum()),
                   "excluded_duplicates": n_dups, "residues": int(tot["n_residues"]),
                   "without_3di": int(tot["n_no_ss"]), "without_ca": int(tot["n_no_ca"]),
                   "with_plddt": int(tot["n_plddt"]), "with_chain_breaks": int(tot["n_with_breaks"])},
        "by_source": {k: {"items": by["items_by_source"].get(k, 0), "kept": by["kept_by_source"].get(k, 0),
                          "rejected": by["rejected_by_source"].get(k, 0)} for k in by["items_by_source"]},
        "rejected_by_reason": dict(by["rejected_by_reason"].most_common()),
        "notes_by_kind": dict(by["notes_by_kind"].most_common()),
        "length": {"min": int(L.min()) if len(L) else 0, "p05": float(np.percentile(L, 5)) if len(L) else 0,
                   "median": float(np.median(L)) if len(L) else 0, "mean": float(L.mean()) if len(L) else 0,
                   "p95": float(np.percentile(L, 95)) if len(L) else 0, "max": int(L.max()) if len(L) else 0},
        "split": {"method": clus.method, "detail": clus.detail,
                  "fallback": clus.method != "mmseqs",
                  "note": ("FALLBACK: MMseqs2 was not available, entries were split by exact-sequence hash; "
                           "homologous chains may straddle splits") if clus.method != "mmseqs" else "",
                  "entries": split_entries, "clusters": split_clusters,
                  "fractions": list(split_opts.fractions), "seed": split_opts.seed,
                  "min_seq_id": split_opts.min_seq_id, "coverage": split_opts.coverage},
        "composition_3di": {c: round(by["ss_counts"].get(c, 0) / ss_total, 5) for c in sorted(by["ss_counts"])},
        "composition_aa": {c: round(v / max(1, sum(by["aa_counts"].values())), 5) for c, v in sorted(by["aa_counts"].items())},
        "options": plan.options,
        "seconds_shards": round(sum(r["seconds"] for r in reports), 2),
    }


def _report_png(path: Path, report: dict, lengths: np.ndarray) -> None:
    from .report import save_figure, subplots

    fig, ax = subplots(4, ncols=2, size=4.5)
    ax[0].hist(lengths, bins=min(50, max(5, len(lengths) // 3)), color="#4477aa")
    ax[0].set(title=f"chain length (n={len(lengths)})", xlabel="residues", ylabel="entries")
    comp = report["composition_3di"]
    ax[1].bar(list(comp), list(comp.values()), color="#228833")
    ax[1].set(title="3Di letter frequency", ylabel="fraction")
    sp = report["split"]
    names = list(sp["entries"])
    ax[2].bar(names, [sp["entries"][k] for k in names], color="#ccbb44", label="entries")
    ax[2].bar(names, [sp["clusters"][k] for k in names], color="#ee6677", width=0.4, label="clusters")
    ax[2].legend()
    ax[2].set(title=f"split ({sp['method']}{', FALLBACK' if sp['fallback'] else ''})")
    rej = report["rejected_by_reason"]
    if rej:
        keys = list(rej)[:10]
        ax[3].barh(keys, [rej[k] for k in keys], color="#aa3377", height=0.6)
        ax[3].invert_yaxis()
    ax[3].set(title=f"rejected items by reason (total {sum(rej.values())})")
    fig.tight_layout()
    save_figure(fig, path)
