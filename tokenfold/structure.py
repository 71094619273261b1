"""PDB/mmCIF parsing with gemmi, residue selection the way Foldseek does it, and 3Di with mini3di.

Foldseek's rules (src/strucclustutils/GemmiWrapper.cpp, checked against ../shared/data/foldseek_db):
first conformer (first altloc) of every residue; only residues of polymer or unknown entity type,
from ATOM/HETATM records; only residues that have a CA atom; one entry per chain. We keep the first
model only (Foldseek keeps all; NMR ensembles would otherwise give near-duplicate entries).
"""
from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

# Foldseek's three-letter -> one-letter table for the residues it reads (modified residues mapped to
# their parent; anything else X). We map B/Z/O/U-like ambiguity codes to X as well (vocabulary is
# the 20 standard amino acids + X).
_THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G",
    "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S",
    "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V", "MSE": "M", "SEC": "C", "UNK": "X",
    "ABA": "A", "CSH": "S", "ORN": "A", "TRY": "W", "SEP": "S", "TPO": "T", "PCA": "E", "CSO": "C",
    "PTR": "Y", "KCX": "K", "CSD": "C", "LLP": "K", "CME": "C", "MLY": "K", "DAL": "A", "TYS": "Y",
    "OCS": "C", "M3L": "K", "FME": "M", "ALY": "K", "HYP": "P", "CAS": "C", "CRO": "T", "CSX": "C",
    "DPR": "P", "DGL": "E", "DVA": "V", "CSS": "C", "DPN": "F", "DSN": "S", "DLE": "L", "HIC": "H",
    "NLE": "L", "MVA": "V", "MLZ": "K", "CR2": "G", "SAR": "G", "DAR": "R", "DLY": "K", "YCM": "C",
    "NRQ": "M", "CGU": "E", "0TD": "D", "MLE": "L", "DAS": "D", "DTR": "W", "CXM": "M", "TPQ": "Y",
    "DCY": "C", "DSG": "N", "DTY": "Y", "DHI": "H", "MEN": "N", "DTH": "T", "SAC": "S", "DGN": "Q",
    "AIB": "A", "SMC": "C", "IAS": "D", "CIR": "R", "BMT": "T", "DIL": "I", "FGA": "E", "PHI": "F",
    "CRQ": "Q", "SME": "M", "GHP": "G", "MHO": "M", "NEP": "H", "TRQ": "W", "TOX": "W", "ALC": "A",
    "SCH": "C", "MDO": "A", "MAA": "A", "GYS": "S", "MK8": "L", "CR8": "H", "KPI": "K", "SCY": "C",
    "DHA": "S", "OMY": "Y", "CAF": "C", "0AF": "W", "SNN": "N", "MHS": "H", "SNC": "C", "PHD": "D",
    "B3E": "E", "MEA": "F", "MED": "M", "OAS": "S", "GL3": "G", "FVA": "V", "PHL": "F", "CRF": "T",
    "BFD": "D", "MEQ": "Q", "DAB": "A", "AGM": "R", "4BF": "Y", "B3A": "A", "B3D": "D", "B3K": "K",
    "B3Y": "Y", "BAL": "A", "DBZ": "A", "GPL": "K", "HSK": "H", "HY3": "P", "HZP": "P", "KYN": "W",
    "MGN": "Q",
}

GZIP_MAGIC = b"\x1f\x8b"


class StructureError(Exception):
    """A file that cannot be ingested; the message is the one-line reason recorded in rejects.tsv."""


@dataclass
class Chain:
    """Backbone of one chain as Foldseek selects it. Coordinates in Angstrom, NaN for missing atoms."""

    name: str
    aa: str
    ca: np.ndarray  # float32 [L,3]
    n: np.ndarray
    c: np.ndarray
    cb: np.ndarray
    bfactor: np.ndarray  # float32 [L], B-factor of CA (pLDDT in AlphaFold models)

    def __len__(self):
        return len(self.aa)


def three_to_one(name: str) -> str:
    return _THREE_TO_ONE.get(name.upper(), "X")


def read_bytes(path: str | Path) -> bytes:
    """Raw file content, gunzipped when it starts with the gzip magic (whatever its name says)."""
    data = Path(path).read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise StructureError(f"corrupt gzip: {e}") from None
    return data


def sniff_format(text: str) -> str:
    """'cif' or 'pdb' from the content (files may have no or misleading extensions)."""
    for line in text.splitlines()[:2000]:
        s = line.strip()
        if not s:
            continue
        if s.startswith("data_") or s.startswith("_atom_site.") or s.startswith("loop_"):
            return "cif"
        if s[:6].rstrip() in ("ATOM", "HETATM", "HEADER", "REMARK", "CRYST1", "MODEL", "TITLE",
                              "COMPND", "SOURCE", "SEQRES", "EXPDTA", "AUTHOR", "KEYWDS", "HELIX", "SHEET"):
            return "pdb"
    raise StructureError("not a structure (no PDB records or mmCIF data block)")


def read_structure(path: str | Path) -> gemmi.Structure:
    data = read_bytes(path)
    if not data.strip():
        raise StructureError("empty")
    if b"\x00" in data[:4096]:
        raise StructureError("not a structure (binary content)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    fmt = sniff_format(text)
    try:
        if fmt == "cif":
            return gemmi.make_structure_from_block(gemmi.cif.read_string(text).sole_block())
        return gemmi.read_pdb_string(text)
    except Exception as e:  # gemmi raises RuntimeError/ValueError with a useful message
        raise StructureError(f"unparsable {fmt}: {str(e).splitlines()[0][:200]}") from None


def extract_chains(st: gemmi.Structure) -> list[Chain]:
    """Chains of the first model, residues selected as Foldseek does."""
    if len(st) == 0:
        raise StructureError("no atoms")
    model = st[0]
    out = []
    for ch in model:
        aa, ca, n, c, cb, bf = [], [], [], [], [], []
        for res in ch.first_conformer():
            if res.entity_type not in (gemmi.EntityType.Polymer, gemmi.EntityType.Unknown):
                continue
            if res.het_flag not in ("A", "H"):
                continue
            a_ca = a_n = a_c = a_cb = None
            for atom in res:
                nm = atom.name
                if nm == "CA" and a_ca is None:
                    a_ca = atom
                elif nm == "N" and a_n is None:
                    a_n = atom
                elif nm == "C" and a_c is None:
                    a_c = atom
                elif nm == "CB" and a_cb is None:
                    a_cb = atom
            if a_ca is None:
                continue
            aa.append(three_to_one(res.name))
            ca.append(a_ca.pos.tolist())
            bf.append(a_ca.b_iso)
            n.append(a_n.pos.tolist() if a_n is not None else [np.nan] * 3)
            c.append(a_c.pos.tolist() if a_c is not None else [np.nan] * 3)
            cb.append(a_cb.pos.tolist() if a_cb is not None else [np.nan] * 3)
        if aa:
            f32 = lambda v: np.asarray(v, dtype=np.float32).reshape(-1, 3)
            out.append(Chain(ch.name, "".join(aa), f32(ca), f32(n), f32(c), f32(cb),
                             np.asarray(bf, dtype=np.float32)))
    return out


_ENCODER = None


def encode_3di(chain: Chain) -> str:
    """Foldseek 3Di letters for a chain (mini3di). Residues without a valid state get 'D' as in Foldseek."""
    global _ENCODER
    if _ENCODER is None:
        import mini3di

        _ENCODER = mini3di.Encoder()
    states = _ENCODER.encode_atoms(ca=chain.ca.astype(np.float64), cb=chain.cb.astype(np.float64),
                                   n=chain.n.astype(np.float64), c=chain.c.astype(np.float64))
    return _ENCODER.build_sequence(states)
