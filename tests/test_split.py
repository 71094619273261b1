"""Train/val/test split by sequence clusters (tokenfold/split.py), as stage 01's finalize applies it."""
import json
import shutil

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
