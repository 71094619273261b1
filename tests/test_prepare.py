"""Stage 01 end to end (tokenfold/prepare.py, 01_prepare_db.py): resume after a kill, SLURM array tasks,
workers, mixed inputs, the command line."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, need_shared, read_fasta
from tokenfold import layout
from tokenfold import prepare as P  # P.run, and P.build_shard as run calls it
from tokenfold.db import EXCLUDED, DBShard, ProteinDB
from tokenfold.db_plan import Inputs, PlanMismatch, PrepareOptions
from tokenfold.split import SplitOptions

FAST_SPLIT = SplitOptions(seed=0, mmseqs_mode="linclust")


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


# ----------------------------------------------------------------------------- resume, arrays
def _some_files(n=20):
    d = need_shared("structures")
    return [str(p) for p in sorted((d / "foldseek_example").iterdir())[:n // 2]] + \
           [str(p) for p in sorted((d / "gtalign_afsp").iterdir())[:n - n // 2]]


@pytest.fixture(scope="module")
def reference_db(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "db"
    P.run(Inputs(structures=_some_files()), out, PrepareOptions(items_per_shard=4), FAST_SPLIT)
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
        P.run(Inputs(structures=_some_files()), out, PrepareOptions(items_per_shard=4), FAST_SPLIT)
    assert not (out / "manifest.json").exists() and len(list((out / "shards").glob("*.h5"))) == 2
    (out / "shards" / ".shard_00002.h5.abc.tmp.h5").write_bytes(b"half-written")  # a killed atomic write
    monkeypatch.setattr(P, "build_shard", real)
    st = P.run(Inputs(structures=_some_files()), out, PrepareOptions(items_per_shard=4), FAST_SPLIT)
    assert st["shards_built"] == 3
    assert _db_state(out) == _db_state(reference_db)
    # a finished DB is left alone; other inputs are refused; --overwrite rebuilds
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert P.run(Inputs(structures=_some_files()), out, PrepareOptions(items_per_shard=4), FAST_SPLIT)["status"] == "complete"
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(PlanMismatch, match="overwrite"):
        P.run(Inputs(structures=_some_files()[:5]), out, PrepareOptions(items_per_shard=4), FAST_SPLIT)
    P.run(Inputs(structures=_some_files()[:5]), out, PrepareOptions(items_per_shard=4), FAST_SPLIT, overwrite=True)
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
    P.run(Inputs(structures=_some_files()), out, PrepareOptions(items_per_shard=4), FAST_SPLIT, workers=2)
    assert _db_state(out) == _db_state(reference_db)


def test_slurm_array_tasks_then_finalize_equal_unsharded(reference_db, tmp_path):
    out = tmp_path / "db"
    args = (Inputs(structures=_some_files()), out, PrepareOptions(items_per_shard=4), FAST_SPLIT)
    assert P.run(*args, num_tasks=2, task_index=1)["status"] == "shards"
    with pytest.raises(PlanMismatch, match="missing"):
        P.run(*args, finalize_only=True)
    assert sorted(p.name for p in (out / "shards").glob("*.h5")) == ["shard_00001.h5", "shard_00003.h5"]
    P.run(*args, num_tasks=2, task_index=0)
    assert not (out / "manifest.json").exists()
    P.run(*args, finalize_only=True)
    assert _db_state(out) == _db_state(reference_db)


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
    P.run(Inputs(structures=[str(p) for p in homstrad], foldseek_dbs=[str(fdb / "homstrad_float")], fasta=[str(fasta)]),
          out, PrepareOptions(items_per_shard=16, max_unknown=0.2), FAST_SPLIT)
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


# ----------------------------------------------------------------------------- the CLI
def test_cli_flags_parse_to_the_options_they_name():
    """Every flag of existing command lines (and slurm/config/*.env) reaches the setting it names."""
    cli = _cli()
    args = cli.build_parser().parse_args([
        "--structures", "a.pdb", "dir/", "--structures", "b.cif", "--foldseek-db", "fdb1", "--foldseek-db", "fdb2",
        "--fasta", "x.fa", "--out", "elsewhere", "--min-length", "5", "--max-length", "600", "--max-unknown", "0.5",
        "--min-plddt", "50", "--plddt-from-bfactor", "yes", "--chain-breaks", "split", "--break-distance", "6.5",
        "--items-per-shard", "7", "--split-fractions", "0.6", "0.3", "0.1", "--min-seq-id", "0.5", "--coverage", "0.7",
        "--mmseqs", "/opt/mmseqs", "--mmseqs-mode", "linclust", "--mmseqs-threads", "3", "--no-mmseqs", "--seed", "9",
        "--workers", "4", "--finalize", "--overwrite", "-v", "--num-shards", "5", "--shard-index", "2"])
    inputs, opts, split_opts = cli.settings(args)
    assert inputs == Inputs(structures=["a.pdb", "dir/", "b.cif"], foldseek_dbs=["fdb1", "fdb2"], fasta=["x.fa"])
    assert opts == PrepareOptions(min_length=5, max_length=600, max_unknown=0.5, min_plddt=50.0,
                                  plddt_from_bfactor="yes", chain_breaks="split", break_distance=6.5, items_per_shard=7)
    assert split_opts == SplitOptions(fractions=(0.6, 0.3, 0.1), min_seq_id=0.5, coverage=0.7, seed=9, threads=3,
                                      mmseqs="/opt/mmseqs", use_mmseqs=False, mmseqs_mode="linclust")
    assert (args.out, args.workers, args.finalize, args.overwrite, args.verbose, args.num_shards, args.shard_index) == \
        ("elsewhere", 4, True, True, True, 5, 2)
    # no flag: the options' own defaults, MMseqs2 with as many threads as this process may use
    args = cli.build_parser().parse_args([])
    inputs, opts, split_opts = cli.settings(args)
    assert inputs.empty() and opts == PrepareOptions() and args.out == str(layout.DB)
    assert split_opts == SplitOptions(threads=len(os.sched_getaffinity(0)))
    with pytest.raises(ValueError, match="max_unknown"):
        cli.settings(cli.build_parser().parse_args(["--max-unknown", "2"]))


def test_cli_default_run_on_embedded_dataset(tmp_path):
    """The demo: no input flag = the embedded MDAnalysisTests structures, real MMseqs2 easy-cluster."""
    out = tmp_path / "db"
    assert _cli().main(["--out", str(out), "--workers", "2"]) == 0
    db = ProteinDB(out)
    assert len(db) >= 50 and all(len(db.indices(s)) for s in ("train", "val", "test"))
    rep = json.loads((out / "report.json").read_text())
    assert rep["split"]["method"] == "mmseqs" and "easy-cluster" in rep["split"]["detail"]
    tool = json.loads((out / "manifest.json").read_text())["split"]["mmseqs"]   # which binary clustered
    assert tool == rep["split"]["mmseqs"] and Path(tool["path"]).name == "mmseqs" and tool["version"]
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


def test_later_duplicates_names_each_repeat_and_its_first():
    from tokenfold.db_finalize import later_duplicates

    rng = np.random.default_rng(3)
    ids = np.array([f"P{x}" for x in rng.integers(0, 400, 1000)], dtype="S")   # many ids 2-6 times
    want, seen = {}, {}
    for i, x in enumerate(ids.tolist()):
        if x in seen:
            want[i] = seen[x]
        seen.setdefault(x, i)
    assert later_duplicates(ids) == want and len(want) > 500
    assert later_duplicates(np.array([b"a", b"b"])) == {} and later_duplicates(ids[:1]) == {}


def test_finalize_reads_shard_ids_whole(tmp_path):
    import h5py

    from tokenfold.db_finalize import _shard_ids

    ids = ["a", "P12345_B", "é" * 3, "x" * 300]
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("id", data=ids, dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("offsets", data=np.array([0, 5, 9, 9, 20], dtype=np.int64))
    got, lengths = _shard_ids(tmp_path / "s.h5")
    assert [x.decode() for x in got.tolist()] == ids and got.dtype.itemsize == 300
    assert lengths.tolist() == [5, 4, 0, 11]
