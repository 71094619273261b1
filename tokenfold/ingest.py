"""Ingestion: one input item (a structure file, a range of Foldseek DB entries, a range of FASTA
records) becomes the entries it keeps, plus a one-line reason for each rejected file/chain/entry and a
note for each kept one with a caveat. Nothing here raises on bad input.

The filters (`filter_reason`) are the same for every source: length, all-unknown, fraction of
unknown residues and, for entries with pLDDT, the mean pLDDT.
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field

import numpy as np

from . import structure as S
from .db import Chunk, ProteinRecord
from .db_plan import PrepareOptions
from .fasta import read_records
from .foldseek import open_db
from .threedi import encode_3di_arrays
from .vocab import AA_LETTERS, AA_LUT

log = logging.getLogger("tokenfold.ingest")


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


def filter_reason(aa: str, opts: PrepareOptions, plddt: np.ndarray | None = None) -> str | None:
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
        reason = filter_reason(aa, opts, plddt)
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


# byte -> the letter byte of our amino-acid alphabet (20 standard letters, either case; else X)
_AA_LUT = np.frombuffer(AA_LETTERS.encode("ascii"), dtype=np.uint8)[AA_LUT]


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
        reason = filter_reason(aa, opts)
        if reason:
            res.rejects.append((path, pid, reason))
            continue
        res.records.append(ProteinRecord(id=pid, aa=aa, source="fasta", origin=path))
    return res


def ingest_foldseek_range(prefix: str, a: int, b: int, opts: PrepareOptions) -> ItemResult:
    """Entries a..b-1 of a Foldseek DB, decoded and filtered in bulk (no per-residue Python).

    Entries without 3Di / C-alpha (no `_ss` / `_ca` file, or missing from it) are kept, flagged
    (has_ss / has_ca False). Foldseek entries keep their chains whole; breaks go to gap_before.
    """
    res = ItemResult()
    db = open_db(prefix)
    if a == 0 and db.missing:
        what = {"_ss": "3Di", "_ca": "C-alpha", "_h": "header ids (ids from .lookup or keys)"}
        res.notes.append((prefix, "", "missing files: database has no " + ", ".join(db.missing) +
                          "; entries kept without " + ", ".join(what[m] for m in db.missing)))
    bt = db.read_range(a, b)
    db.release()   # bt holds copies; the mapped pages would otherwise pile up over a task's ranges
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
        res.rejects.append((f"{prefix}#{int(bt.keys[j])}", bt.ids[j], filter_reason(seq, opts) or "filtered"))
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

