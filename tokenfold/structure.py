"""PDB/mmCIF parsing with gemmi and residue selection the way Foldseek does it (3Di: `threedi.py`).

Foldseek's rules (src/strucclustutils/GemmiWrapper.cpp `updateStructure`, structcreatedb.cpp),
checked against ../shared/data/foldseek_db:

* every gemmi chain of the structure is one entry; its residues are `chain.first_conformer()`;
* only residues whose entity type is Polymer or Unknown, from ATOM/HETATM records, that have a CA;
* within a residue the *last* atom of a name wins (Foldseek overwrites in a loop over all atoms);
* amino acids through Foldseek's `threeToOneAA` table (modified residues -> parent, else X);
* PDB files: Foldseek's bundled gemmi marks the residues of a chain that come after its first TER
  record as non-polymer, so they are dropped. gemmi >= 0.7 (what pip installs) no longer does this
  for ATOM records that continue a chain after a TER, so we replay Foldseek's TER rule ourselves
  (`_foldseek_ter_exclusions`);
* entry name: file name without its extension (two when it ends in `.gz`), then `_<chain>` when the
  structure has more than one gemmi chain (all models counted, water/ligand-only chains included),
  as Foldseek's default `--chain-name-mode 0` does. Foldseek would add `_MODEL_<n>` for multi-model
  files; we keep the first model only (NMR ensembles would give near-duplicate entries), so we omit it.

What we do differently, on purpose:

* residues whose CA coordinates are not finite are dropped (Foldseek would store 0.0); a gap is
  recorded where they were;
* chains with N and C missing on most residues (C-alpha traces) get no 3Di: Foldseek rebuilds their
  backbone with PULCHRA, which we do not have, so the entry is kept with `ss=None` (flagged);
* residues that lack N or C keep their CA (as in Foldseek); mini3di gives them 'D', as Foldseek does
  for residues without a valid 3Di state.
"""
from __future__ import annotations

import gzip
import re
from collections import Counter
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

# Foldseek's threeToOneAA table (GemmiWrapper.cpp). Foldseek maps ASX->B, GLX->Z, PYL->O; our
# alphabet is the 20 standard amino acids + X, so those three become X here.
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
#: consecutive C-alpha atoms further apart than this (Angstrom) are not bonded: a chain break.
#: A trans peptide gives 3.80 A, cis ~2.9 A; 4.2 A leaves room for poorly refined geometry.
BREAK_DISTANCE = 4.2
_TEXT_BYTES = bytes(range(9, 14)) + bytes(range(32, 256))  # deleting these leaves control bytes
_RECORDS = re.compile(r"^(?:ATOM|HETATM|TER|MODEL|ENDMDL|END)[^\n]*", re.M)
_AF_NAME = re.compile(r"(^AF-[A-Z0-9]+-F\d+)|alphafold", re.IGNORECASE)


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
    dropped_nonfinite: int = 0                 # residues dropped because their CA was not finite
    gap_before: np.ndarray | None = None       # bool [L]: True where residue i is cut from i-1

    def __len__(self):
        return len(self.aa)

    @property
    def is_ca_trace(self) -> bool:
        """True when most residues lack N or C (a C-alpha-only model): no meaningful 3Di."""
        if len(self) == 0:
            return True
        has_bb = np.isfinite(self.n[:, 0]) & np.isfinite(self.c[:, 0])
        return bool(has_bb.mean() < 0.5)


@dataclass
class ParsedFile:
    """What one structure file gave: its chains and the facts that name and flag them."""

    chains: list[Chain]
    n_models: int
    n_gemmi_chains: int      # over all models, as Foldseek counts them for the `_<chain>` suffix
    is_alphafold: bool       # an AlphaFold model (B-factor column holds pLDDT)
    notes: list[str] = field(default_factory=list)


def entry_name(path: str | Path) -> str:
    """Foldseek's entry name of a file: basename minus one extension, or two when it ends in .gz."""
    name = Path(path).name
    strip = 2 if name.endswith(".gz") else 1
    for _ in range(strip):
        if "." in name:
            name = name[: name.rfind(".")]
    return name


def chain_entry_id(base: str, chain: str, n_gemmi_chains: int) -> str:
    """`base_<chain>` when the file has several chains, else `base` (Foldseek's chain-name mode 0)."""
    return f"{base}_{chain}" if n_gemmi_chains > 1 else base


# ----------------------------------------------------------------------------- reading
def read_bytes(path: str | Path) -> bytes:
    """Raw file content, gunzipped when it starts with the gzip magic (whatever its name says)."""
    data = Path(path).read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise StructureError(f"corrupt gzip: {str(e).splitlines()[0][:160]}") from None
    return data


def sniff_format(text: str) -> str:
    """'cif' or 'pdb' from the content (files may have no or misleading extensions)."""
    for line in text.split("\n", 5000)[:5000]:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("data_") or s.startswith("_atom_site.") or s.startswith("loop_"):
            return "cif"
        if s[:6].rstrip() in ("ATOM", "HETATM", "MODEL"):
            return "pdb"
    if re.search(r"^(ATOM  |HETATM)", text, re.M):
        return "pdb"
    raise StructureError("no atoms (no ATOM/HETATM records and no mmCIF data block)")


def _decode(data: bytes) -> str:
    if not data.strip():
        raise StructureError("empty file")
    head = data[:8192]
    if b"\x00" in head or len(head.translate(None, _TEXT_BYTES)) > len(head) // 100 + 1:
        raise StructureError("not a structure (binary content)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _foldseek_ter_exclusions(text: str) -> list[tuple[str, set]] | None:
    """Replay the TER rule of the gemmi bundled with Foldseek on the first model of a PDB text.

    Returns one (chain name, excluded residue keys) pair per gemmi chain of the first model, in
    order, or None when the file has no TER record (then nothing is excluded). Residues created after
    their chain's TER record are non-polymer there, so Foldseek drops them; a chain name that
    reappears after a TER-terminated chain of that name starts "after TER" too. Residue key:
    (sequence number, insertion code, segment), as gemmi matches residues.
    """
    if not (text.startswith("TER") or "\nTER" in text):
        return None
    parts: list[tuple[str, set]] = []
    terminated: dict[str, bool] = {}  # chain name -> its first part was closed by a TER
    part_name = None
    part_seen: set = set()
    part_count: Counter = Counter()
    after_ter = False
    prev = None
    models_done = 0
    in_model = False
    for m in _RECORDS.finditer(text):
        line = m.group(0)
        c = line[0]
        if c == "A" or c == "H":  # ATOM / HETATM
            if models_done:
                break
            res_field = line[20:27] + line[72:76]
            if res_field == prev:
                continue  # another atom of the residue of the previous line
            prev = res_field
            in_model = True
            name = line[20:22].strip()
            if part_name is None or name != part_name:
                after_ter = terminated.get(name, False)
                parts.append((name, set()))
                part_count[name] += 1
                part_name, part_seen = name, set()
            key = (line[22:26].strip(), line[26:27].strip(), line[72:76].strip())
            if key not in part_seen:
                part_seen.add(key)
                if after_ter:
                    parts[-1][1].add(key)
        elif line.startswith("TER"):
            if part_name is None or after_ter:
                continue
            if part_count[part_name] == 1:
                terminated[part_name] = True
            after_ter = True
        elif line.startswith("MODEL"):
            part_name = prev = None
        elif line.startswith("ENDMDL"):
            if in_model:
                models_done += 1
            part_name = prev = None
        elif line.rstrip() == "END":
            break
    return parts


def detect_alphafold(text: str, base: str) -> bool:
    """AlphaFold models: AFDB ids (AF-<acc>-F<n>), 'alphafold' in the name or in the file header."""
    if _AF_NAME.search(base):
        return True
    return "alphafold" in text[:20000].lower()


def _parse(text: str, fmt: str) -> tuple[gemmi.Structure, bool]:
    """(structure, whether any atom has an alternate location); an mmCIF text is parsed once for both."""
    if fmt == "cif":
        block = gemmi.cif.read_string(text).sole_block()
        altlocs = any(v not in (".", "?") for v in block.find_values("_atom_site.label_alt_id"))
        return gemmi.make_structure_from_block(block), altlocs
    return gemmi.read_pdb_string(text), _pdb_has_altlocs(text)


def _drop_truncated_last_record(text: str) -> str | None:
    """The text without its last ATOM/HETATM line when that line was cut short (a truncated file)."""
    body = text.rstrip("\n")
    cut = body.rfind("\n") + 1
    last = body[cut:]
    if last.startswith(("ATOM", "HETATM")) and len(last.rstrip()) < 54:
        return body[:cut]
    return None


def _pdb_has_altlocs(text: str) -> bool:
    """Whether any ATOM/HETATM line has an alternate location (column 17), vectorised over line starts."""
    b = np.frombuffer(text.encode("latin-1", "replace"), dtype=np.uint8)
    starts = np.concatenate([[0], np.flatnonzero(b == 10) + 1])
    starts = starts[starts + 17 <= len(b)]
    atom = ((b[starts] == 65) & (b[starts + 1] == 84) & (b[starts + 2] == 79) & (b[starts + 3] == 77)) | \
           ((b[starts] == 72) & (b[starts + 1] == 69) & (b[starts + 2] == 84) & (b[starts + 3] == 65))
    return bool((b[starts[atom] + 16] != 32).any())


def read_structure(path: str | Path) -> tuple[gemmi.Structure, str, str, list[str], bool]:
    """(gemmi structure, format 'pdb'|'cif', decoded text, notes, whether any atom has an altloc).
    Raises StructureError with the reason.

    A PDB file whose last coordinate line is cut mid-record (an interrupted download) keeps the
    residues before the cut, with a note.
    """
    text = _decode(read_bytes(path))
    fmt = sniff_format(text)
    notes: list[str] = []
    try:
        st, altlocs = _parse(text, fmt)
    except Exception as e:  # gemmi raises RuntimeError/ValueError with a useful message
        shorter = _drop_truncated_last_record(text) if fmt == "pdb" else None
        try:
            if shorter is None:
                raise
            st, altlocs = _parse(shorter, fmt)
            text = shorter
            notes.append("truncated: last coordinate line cut mid-record; kept the atoms before it")
        except Exception:
            msg = " ".join(str(e).split())[:200] if str(e) else type(e).__name__
            raise StructureError(f"unparsable {fmt}: {msg}") from None
    return st, fmt, text, notes, altlocs


def extract_chains(st: gemmi.Structure, ter_exclusions: list[tuple[str, set]] | None = None,
                   use_entity_types: bool = True, altlocs: bool = True) -> list[Chain]:
    """Chains of the first model, residues selected as Foldseek does (see the module docstring).

    PDB files: `use_entity_types=False` with the `ter_exclusions` replay (None: no TER, keep all);
    mmCIF: gemmi's entity types. `altlocs=False` (no atom has an altloc) takes a faster path that
    looks the four backbone atoms up in C++ instead of looping over every atom in Python.
    """
    if len(st) == 0:
        raise StructureError("no atoms")
    model = st[0]
    if ter_exclusions is not None and [p[0] for p in ter_exclusions] != [ch.name for ch in model]:
        ter_exclusions, use_entity_types = None, True  # layout differs from our replay: trust gemmi
    keep_types = (gemmi.EntityType.Polymer, gemmi.EntityType.Unknown)
    out = []
    nan3 = (np.nan, np.nan, np.nan)
    for k, ch in enumerate(model):
        excl = ter_exclusions[k][1] if ter_exclusions is not None else None
        aa, ca, n, c, cb, bf = [], [], [], [], [], []
        for res in ch.first_conformer():
            if use_entity_types and res.entity_type not in keep_types:
                continue
            if excl and (str(res.seqid.num), res.seqid.icode.strip(), res.segment.strip()) in excl:
                continue
            if res.het_flag not in ("A", "H"):
                continue
            if altlocs:
                a_ca = a_n = a_c = a_cb = None
                for atom in res:  # last atom of a name wins, as in Foldseek
                    nm = atom.name
                    if nm == "CA":
                        a_ca = atom
                    elif nm == "N":
                        a_n = atom
                    elif nm == "C":
                        a_c = atom
                    elif nm == "CB":
                        a_cb = atom
                if a_ca is None:
                    continue
            else:
                a_ca = res.find_atom("CA", "*")
                if a_ca is None:
                    continue
                a_n, a_c, a_cb = res.find_atom("N", "*"), res.find_atom("C", "*"), res.find_atom("CB", "*")
            aa.append(_THREE_TO_ONE.get(res.name, "X"))
            ca.append(a_ca.pos.tolist())  # .tolist(): one call; .x/.y/.z copy the Position thrice
            bf.append(a_ca.b_iso)
            n.append(a_n.pos.tolist() if a_n is not None else nan3)
            c.append(a_c.pos.tolist() if a_c is not None else nan3)
            cb.append(a_cb.pos.tolist() if a_cb is not None else nan3)
        f32 = lambda v: np.asarray(v, dtype=np.float32).reshape(-1, 3)  # noqa: E731
        out.append(Chain(ch.name, "".join(aa), f32(ca), f32(n), f32(c), f32(cb), np.asarray(bf, dtype=np.float32)))
    return out


def parse_structure_file(path: str | Path, break_distance: float = BREAK_DISTANCE) -> ParsedFile:
    """Read one PDB/mmCIF file (plain or gzipped, any extension) into Foldseek-selected chains.

    Chains come back in file order, including empty ones (no kept residue), so that callers can
    tell "no protein chain" from "chain too short". Non-finite C-alpha residues are dropped here.
    `gap_before` marks the residue after each dropped run and each C-alpha step > `break_distance`.
    """
    st, fmt, text, notes, altlocs = read_structure(path)
    if len(st) == 0 or not any(len(ch) for ch in st[0]):
        raise StructureError("no atoms")
    is_pdb = fmt == "pdb"
    excl = _foldseek_ter_exclusions(text) if is_pdb else None
    chains = extract_chains(st, excl, use_entity_types=not is_pdb, altlocs=altlocs)
    for ch in chains:
        ok = np.isfinite(ch.ca).all(axis=1)
        gap = np.zeros(len(ch), dtype=bool)
        if not ok.all():
            ch.dropped_nonfinite = int((~ok).sum())
            # the residue after a dropped run is not bonded to the one before the run
            after = np.concatenate([[False], ~ok[:-1]])
            gap = after
            keep = np.flatnonzero(ok)
            ch.aa = "".join(ch.aa[i] for i in keep)
            ch.ca, ch.n, ch.c, ch.cb, ch.bfactor = ch.ca[keep], ch.n[keep], ch.c[keep], ch.cb[keep], ch.bfactor[keep]
            gap = gap[keep]
            notes.append(f"dropped residues: chain {ch.name}: {ch.dropped_nonfinite} with non-finite C-alpha coordinates")
        for arr in (ch.n, ch.c, ch.cb):  # a non-finite N/C/CB is a missing atom
            arr[~np.isfinite(arr).all(axis=1)] = np.nan
        ch.gap_before = gap | chain_breaks(ch.ca, break_distance)
        if len(ch):
            ch.gap_before[0] = False
    n_gemmi = sum(len(m) for m in st)
    base = entry_name(path)
    return ParsedFile(chains=chains, n_models=len(st), n_gemmi_chains=n_gemmi,
                      is_alphafold=detect_alphafold(text, base), notes=notes)


# ----------------------------------------------------------------------------- chain geometry
def chain_breaks(ca: np.ndarray, threshold: float = BREAK_DISTANCE) -> np.ndarray:
    """bool [L]: True at residue i when |CA_i - CA_{i-1}| > threshold (never at i = 0)."""
    gap = np.zeros(len(ca), dtype=bool)
    if len(ca) > 1:
        d = np.linalg.norm(np.diff(ca.astype(np.float64), axis=0), axis=1)
        gap[1:] = ~(d <= threshold)
    return gap


def segments(gap_before: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of residues between chain breaks."""
    cuts = np.flatnonzero(gap_before[1:]) + 1 if len(gap_before) > 1 else np.array([], dtype=int)
    bounds = [0, *cuts.tolist(), len(gap_before)]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]
