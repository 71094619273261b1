"""Stage 01 end to end (tokenfold/prepare.py, tokenfold/split.py, 01_prepare_db.py)."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED, need_shared, read_fasta
from tokenfold import prepare as P
from tokenfold import split as SP
from tokenfold.db import EXCLUDED, DBShard, ProteinDB

FAST_SPLIT = P.SplitOptions(seed=0, mmseqs_mode="linclust")


def _cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", ROOT / "01_prepare_db.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path):
    return [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]


def _db_state(out: Path) -> dict:
    """Everything a later stage reads, for equality checks (report.json holds timings: left out)."""
    out = Path(out)
    state = {"manifest": json.loads((out / "manifest.json").read_text()),
             "split": np.load(out / "split.npy").tolist(), "cluster": np.load(out / "cluster.npy").tolist(),
             "rejects": (out / "rejects.tsv").read_text(), "notes": (out / "notes.tsv").read_text()}
    for s in state["manifest"]["shards"]:
        a = DBShard(out / s["file"]).arrays
        state[s["file"]] = {k: (np.nan_to_num(v, nan=-1e9) if v.dtype.kind == "f" else v).tolist() for k, v in a.items()}
    return state


# ----------------------------------------------------------------------------- bad inputs
def _expected():
    f = SHARED / "bad_inputs" / "EXPECTED.tsv"
    if not f.exists():
        return [("(../shared absent)", "")]
    return [tuple(r[:2]) for r in _rows(f)[1:]]


@pytest.fixture(scope="module")
def bad_db(tmp_path_factory):
    src = need_shared("bad_inputs")
    out = tmp_path_factory.mktemp("bad") / "db"
    P.run(P.Inputs(structures=[str(src)]), out, P.PrepareOptions(), FAST_SPLIT)
    db = ProteinDB(out)
    recs = [db.get_global(i) for i in range(db.n_total)]
    rejects = _rows(out / "rejects.tsv")
    notes = _rows(out / "notes.tsv")
    return src, out, recs, rejects, notes


_REJECT_WORDS = {"empty": "empty", "not a structure": "not a structure", "corrupt gzip": "corrupt gzip",
                 "no protein chain": "no protein chain", "shorter than min length": "shorter than min length",
                 "no atoms": "no atoms"}


@pytest.mark.parametrize("name,expected", _expected())
def test_bad_input_outcome(bad_db, name, expected):
    src, out, recs, rejects, notes = bad_db
    path = str((src / name).resolve())
    kept = [r for r in recs if r.origin == path]
    rej = [r for r in rejects if r[0] == path]
    for r in kept:  # whatever is kept is consistent and finite
        assert len(r.aa) == len(r.ca) and (r.ss is None or len(r.ss) == len(r.aa))
        assert np.isfinite(r.ca).all()
    if expected.startswith("reject:"):
        word = _REJECT_WORDS[expected.split(":", 1)[1].strip()]
        assert not kept and rej and all(word in r[2] for r in rej), (rej, kept)
        assert all(len(r) == 3 and "\n" not in r[2] for r in rej)
    elif name == "truncated_midline.pdb":
        assert kept and any("truncated" in n[2] for n in notes if n[0] == path)
    elif name == "ca_only.pdb":
        assert len(kept) == 1 and kept[0].ss is None
        assert any(n[0] == path and "no 3Di" in n[2] for n in notes)
    elif name == "nmr_three_models.pdb":
        assert len(kept) == 1
        first_model = []
        for line in open(src / name):
            if line.startswith("ENDMDL"):
                break
            if line.startswith("ATOM") and line[12:16].strip() == "CA":
                first_model.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        np.testing.assert_allclose(kept[0].ca, np.array(first_model, np.float32), atol=1e-3)
    elif name == "nan_coordinates.pdb":
        assert kept and kept[0].n_breaks >= 1  # dropped residues leave a recorded gap
    elif name == "chain_break_10_missing.pdb":
        r = kept[0]
        i = np.flatnonzero(r.gap_before)
        assert len(i) == 1 and np.linalg.norm(r.ca[i[0]] - r.ca[i[0] - 1]) > 4.2
    elif name.startswith("dup"):
        ids = {r.id for r in recs if r.origin.endswith("same_name.pdb")}
        assert ids == {"same_name", "same_name~2"}
    elif name == "selenomethionine_mse.pdb":
        mse = [line[22:26] for line in open(src / name) if line.startswith(("ATOM", "HETATM"))
               and line[17:20] == "MSE" and line[12:16].strip() == "CA"]
        assert mse and kept[0].aa.count("M") >= len(mse)
    else:  # keep
        assert kept, (name, rej)


def test_every_bad_input_file_is_accounted_for(bad_db):
    src, out, recs, rejects, notes = bad_db
    files = {str(p.resolve()) for p in src.rglob("*") if p.is_file()}
    seen = {r.origin for r in recs} | {r[0] for r in rejects}
    assert files <= seen
    rep = json.loads((out / "report.json").read_text())
    assert rep["by_source"]["structure"]["items"] == len(files)


# ----------------------------------------------------------------------------- resume, arrays
def _some_files(n=20):
    d = need_shared("structures")
    return [str(p) for p in sorted((d / "foldseek_example").iterdir())[:n // 2]] + \
           [str(p) for p in sorted((d / "gtalign_afsp").iterdir())[:n - n // 2]]


@pytest.fixture(scope="module")
def reference_db(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "db"
    P.run(P.Inputs(structures=_some_files()), out, P.PrepareOptions(items_per_shard=4), FAST_SPLIT)
    return out


def test_crash_and_resume_equals_uninterrupted(reference_db, tmp_path, monkeypatch):
    out = tmp_path / "db"
    real = P.build_shard
    calls = []

    def dying(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(P, "build_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        P.run(P.Inputs(structures=_some_files()), out, P.PrepareOptions(items_per_shard=4), FAST_SPLIT)
    assert not (out / "manifest.json").exists() and len(list((out / "shards").glob("*.h5"))) == 2
    (out / "shards" / ".shard_00002.h5.abc.tmp.h5").write_bytes(b"half-written")  # a killed atomic write
    monkeypatch.setattr(P, "build_shard", real)
    st = P.run(P.Inputs(structures=_some_files()), out, P.PrepareOptions(items_per_shard=4), FAST_SPLIT)
    assert st["shards_built"] == 3
    assert _db_state(out) == _db_state(reference_db)
    # a finished DB is left alone; other inputs are refused; --overwrite rebuilds
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert P.run(P.Inputs(structures=_some_files()), out, P.PrepareOptions(items_per_shard=4), FAST_SPLIT)["status"] == "complete"
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(P.PlanMismatch, match="overwrite"):
        P.run(P.Inputs(structures=_some_files()[:5]), out, P.PrepareOptions(items_per_shard=4), FAST_SPLIT)
    P.run(P.Inputs(structures=_some_files()[:5]), out, P.PrepareOptions(items_per_shard=4), FAST_SPLIT, overwrite=True)
    assert len(ProteinDB(out).manifest["shards"]) == 2


def test_sigkill_then_rerun_equals_uninterrupted(reference_db, tmp_path):
    out = tmp_path / "db"
    cmd = [sys.executable, str(ROOT / "01_prepare_db.py"), "--out", str(out), "--items-per-shard", "4",
           "--mmseqs-mode", "linclust", "--mmseqs-threads", "1", "--structures", *_some_files()]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((out / "shards").glob("shard_00001.h5")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()  # killed mid-run
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    assert _db_state(out) == _db_state(reference_db)


def test_workers_give_the_same_db(reference_db, tmp_path):
    out = tmp_path / "db"
    P.run(P.Inputs(structures=_some_files()), out, P.PrepareOptions(items_per_shard=4), FAST_SPLIT, workers=2)
    assert _db_state(out) == _db_state(reference_db)


def test_slurm_array_tasks_then_finalize_equal_unsharded(reference_db, tmp_path):
    out = tmp_path / "db"
    args = (P.Inputs(structures=_some_files()), out, P.PrepareOptions(items_per_shard=4), FAST_SPLIT)
    assert P.run(*args, num_tasks=2, task_index=1)["status"] == "shards"
    with pytest.raises(P.PlanMismatch, match="missing"):
        P.run(*args, finalize_only=True)
    assert sorted(p.name for p in (out / "shards").glob("*.h5")) == ["shard_00001.h5", "shard_00003.h5"]
    P.run(*args, num_tasks=2, task_index=0)
    assert not (out / "manifest.json").exists()
    P.run(*args, finalize_only=True)
    assert _db_state(out) == _db_state(reference_db)


# ----------------------------------------------------------------------------- split
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
    a = SP.assign_splits(rep, ids, (0.8, 0.1, 0.1), seed=0)
    assert a.tolist() == split[inc].tolist()
    assert SP.assign_splits(rep, ids, (0.8, 0.1, 0.1), seed=1).tolist() != a.tolist()


def test_assign_splits_does_not_depend_on_input_order():
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 30)) for _ in range(40)]
    rep = np.array([i - i % 3 for i in range(40)])  # clusters of three
    a = SP.assign_splits(rep, seqs, (0.8, 0.1, 0.1), seed=3)
    perm = rng.permutation(40)
    inv = np.argsort(perm)
    b = SP.assign_splits(inv[rep[perm]], [seqs[i] for i in perm], (0.8, 0.1, 0.1), seed=3)
    assert b[inv].tolist() == a.tolist() and set(a.tolist()) == {0, 1, 2}


def test_exact_hash_fallback_is_loud(tmp_path):
    out = tmp_path / "db"
    files = _some_files(8)
    shutil.copy(files[0], tmp_path / "copy_of_first.gz")  # an identical sequence under another id
    P.run(P.Inputs(structures=files + [str(tmp_path / "copy_of_first.gz")]), out, P.PrepareOptions(),
          P.SplitOptions(mmseqs=str(tmp_path / "no-such-mmseqs")))
    rep = json.loads((out / "report.json").read_text())["split"]
    assert rep["fallback"] and rep["method"] == "exact-sequence-hash" and "FALLBACK" in rep["note"]
    db = ProteinDB(out)
    by_seq = {}
    for i in db.indices():
        by_seq.setdefault(db.get_global(int(i)).aa, set()).add(db.split_of(int(i)))
    assert all(len(v) == 1 for v in by_seq.values())


# ----------------------------------------------------------------------------- inputs and options
def test_mixed_inputs_duplicates_and_fasta(tmp_path):
    fdb = need_shared("foldseek_db")
    homstrad = sorted(need_shared("structures", "foldseek_regression_homstrad").iterdir())[:6]
    fasta = tmp_path / "seqs.fa"
    aa = read_fasta(fdb / "shared_aa.fasta")
    some = list(aa.items())[:5]
    fasta.write_text("".join(f">{k} a protein\n{v[:40]}\n{v[40:]}\n" for k, v in some)
                     + ">weird lower case and B/Z/*\nmkvbzACDEFGHIKLMNPQRSTVWYACDEFGHIK*\n>empty_one\n\n")
    out = tmp_path / "db"
    P.run(P.Inputs(structures=[str(p) for p in homstrad], foldseek_dbs=[str(fdb / "homstrad_float")], fasta=[str(fasta)]),
          out, P.PrepareOptions(items_per_shard=16, max_unknown=0.2), FAST_SPLIT)
    db = ProteinDB(out)
    n_total = db.n_total
    assert n_total == 6 + 50 + 6 and len(db.manifest["shards"]) == 4
    split = np.asarray(db.split_codes)
    recs = [db.get_global(i) for i in range(n_total)]
    # the 6 HOMSTRAD chains come first from the files, then again from the Foldseek DB: excluded
    dup = [i for i, r in enumerate(recs) if r.source == "foldseek" and r.id in {x.id for x in recs[:6]}]
    assert len(dup) == 6 and all(split[i] == EXCLUDED for i in dup)
    assert sum("duplicate id" in r[2] for r in _rows(out / "rejects.tsv")) == 6
    assert len(db) == n_total - 6 and all(r.id not in ("empty_one",) for r in recs)
    fs = [r for r in recs if r.source == "foldseek"]
    assert all(r.ss is not None and r.ca is not None and r.plddt is None for r in fs)
    fa = {r.id: r for r in recs if r.source == "fasta"}
    assert set(fa) == {k for k, _ in some} | {"weird"}
    assert fa["weird"].aa.startswith("MKVXXACDEF") and fa["weird"].ss is None and fa["weird"].ca is None
    assert all(fa[k].aa == v for k, v in some)
    assert any(r[1] == "empty_one" and "empty" in r[2] for r in _rows(out / "rejects.tsv"))
    rep = json.loads((out / "report.json").read_text())
    assert rep["by_source"]["fasta"] == {"items": 7, "kept": 6, "rejected": 1}
    assert rep["counts"]["without_3di"] == 6 and rep["counts"]["excluded_duplicates"] == 6


def test_foldseek_db_without_ss_and_ca_ingests_flagged(tmp_path):
    fdb = need_shared("foldseek_db")
    for ext in ("", ".index", ".dbtype", ".lookup"):
        shutil.copy(f"{fdb / 'homstrad_float'}{ext}", f"{tmp_path / 'seqonly'}{ext}")
    out = tmp_path / "db"
    P.run(P.Inputs(foldseek_dbs=[str(tmp_path / "seqonly")]), out, P.PrepareOptions(), FAST_SPLIT)
    recs = list(ProteinDB(out))
    assert len(recs) == 50 and all(r.ss is None and r.ca is None for r in recs)
    assert any("missing files" in n[2] for n in _rows(out / "notes.tsv"))


def test_chain_break_split_mode(tmp_path):
    f = need_shared("bad_inputs", "chain_break_10_missing.pdb")
    out = tmp_path / "db"
    P.run(P.Inputs(structures=[str(f)]), out, P.PrepareOptions(chain_breaks="split"), P.SplitOptions(use_mmseqs=False))
    recs = list(ProteinDB(out))
    assert [r.id for r in recs] == ["chain_break_10_missing_seg1", "chain_break_10_missing_seg2"]
    assert sum(r.length for r in recs) == 236 and all(r.n_breaks == 0 for r in recs)


def test_alphafold_plddt_kept_and_filtered(tmp_path):
    src = need_shared("bad_inputs", "missing_backbone_some_residues.pdb")
    af = tmp_path / "in" / "AF-P00001-F1-model_v4.pdb"
    af.parent.mkdir()
    shutil.copy(src, af)
    bfac = np.array([float(line[60:66]) for line in open(src) if line.startswith("ATOM") and line[12:16].strip() == "CA"])
    out = tmp_path / "db"
    P.run(P.Inputs(structures=[str(af.parent)]), out, P.PrepareOptions(min_plddt=0), P.SplitOptions(use_mmseqs=False))
    rec = ProteinDB(out)[0]
    np.testing.assert_allclose(rec.plddt, bfac.astype(np.float32))
    P.run(P.Inputs(structures=[str(af.parent)]), out, P.PrepareOptions(plddt_from_bfactor="no"),
          P.SplitOptions(use_mmseqs=False), overwrite=True)
    assert ProteinDB(out)[0].plddt is None
    with pytest.raises(P.PlanMismatch, match="low pLDDT"):
        P.run(P.Inputs(structures=[str(af.parent)]), out, P.PrepareOptions(min_plddt=bfac.mean() + 1),
              P.SplitOptions(use_mmseqs=False), overwrite=True)
    assert "low pLDDT" in (out / "work" / "shard_00000.rejects.tsv").read_text()


def test_embedded_default_inputs():
    files = P.embedded_default_inputs()
    names = [f.name for f in files]
    assert len(files) >= 50 and all(f.exists() for f in files)
    assert not any(s in n for n in names for s in ("_invalid", "_short", "custom", "multimodel", "_failing"))
    stems = [n.split(".")[0] for n in names]
    assert len(stems) == len(set(stems))  # no entry twice (e.g. as .pdb and .cif)


# ----------------------------------------------------------------------------- the CLI
def test_cli_help_names_inputs_and_outputs(capsys):
    with pytest.raises(SystemExit) as e:
        _cli().main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--structures", "--foldseek-db", "--fasta", "--out", "embedded", "manifest.json", "split.npy",
                 "rejects.tsv", "report.json", "--finalize", "--workers", "--num-shards", "--overwrite"):
        assert word in text


def test_cli_default_run_on_embedded_dataset(tmp_path):
    """The demo: no input flag = the embedded MDAnalysisTests structures, real MMseqs2 easy-cluster."""
    out = tmp_path / "db"
    assert _cli().main(["--out", str(out), "--workers", "2"]) == 0
    db = ProteinDB(out)
    assert len(db) >= 50 and all(len(db.indices(s)) for s in ("train", "val", "test"))
    rep = json.loads((out / "report.json").read_text())
    assert rep["split"]["method"] == "mmseqs" and "easy-cluster" in rep["split"]["detail"]
    assert (out / "report.png").stat().st_size > 10_000
    r = db[0]
    assert len(r.ss) == len(r.aa) == len(r.ca) and r.split in ("train", "val", "test")


def test_cli_exits_nonzero_only_when_nothing_ingested(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.pdb").write_text("")
    (bad / "junk.cif").write_bytes(bytes(range(256)))
    with pytest.raises(SystemExit) as e:
        _cli().main(["--structures", str(bad), "--out", str(tmp_path / "db")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: nothing could be ingested")
