"""The plan of a stage-01 run: which inputs, which options, and which input items go to which DB shard.

The inputs become one item list, in a fixed order: structure files (sorted by path), then each
Foldseek DB's entries (index order), then each FASTA file's records. DB shard k holds items
``[k*items_per_shard, (k+1)*items_per_shard)``. A fingerprint of the inputs and options identifies
the plan, so a later run with other inputs refuses to mix its shards with these.
Files: see data/README.md, section stage 01.

Entry ids: structure files as Foldseek names them (`structure.entry_name` + ``_<chain>`` for
multi-chain files); when two input files have the same name, the second (in sorted path order)
becomes ``name~2``, the third ``name~3``. Foldseek DB entries take the first word of their ``_h``
header; FASTA records the first word of their header. Ids that still collide (e.g. the same protein
given twice) keep the first and exclude the later ones at finalize (`db_finalize`).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from . import structure as S
from .cli import option
from .fasta import record_offsets

# the mmCIF entries MDAnalysisTests ships as real, valid files (the others are deliberately broken,
# truncated or customised copies); 1YJP ships twice (.cif and .cif.gz): the plain one is used
_EMBEDDED_MMCIF = ("1BD2.cif.gz", "3KPR.cif.gz", "3PWP.cif.gz", "5PTI.cif.gz", "7ETN.cif.gz", "1YJP.cif")


class PlanMismatch(Exception):
    """Stage 01 cannot go on (other inputs than the DB was built from, missing shards, nothing
    ingested); the message is the one line the command prints."""


@dataclass
class PrepareOptions:
    """Everything that changes what goes into the shards (part of the plan fingerprint)."""

    min_length: int = option(20, "reject chains shorter than this", group="filters")
    max_length: int = option(5000, "reject chains longer than this", group="filters")
    max_unknown: float = option(0.1, "reject chains with a larger fraction of unknown (X) residues", group="filters")
    min_plddt: float = option(70.0, "reject entries with pLDDT whose mean pLDDT is below this; 0 disables",
                              group="filters")
    plddt_from_bfactor: str = option(
        "auto", "store the CA B-factor as pLDDT: auto = only for AlphaFold models (AF-... ids, 'AlphaFold' "
        "in the name or header)", choices=("auto", "yes", "no"), group="filters")
    chain_breaks: str = option(
        "record", "record: keep chains whole, mark breaks in gap_before (3Di equals Foldseek's); split: one "
        "entry per unbroken segment, ids <id>_seg<k> (structure files only)", choices=("record", "split"),
        group="filters")
    break_distance: float = option(S.BREAK_DISTANCE, "CA-CA distance (Angstrom) above which consecutive residues "
                                   "count as a chain break", group="filters")
    items_per_shard: int = option(5000, "input items (files, Foldseek entries, FASTA records) per DB shard",
                                  group="DB shards")

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
