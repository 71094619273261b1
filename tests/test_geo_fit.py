"""The geo codebook fit of stage 04 on the real small DB: its own step before a SLURM array (fits on
TRAIN chains, tokenizes nothing, idempotent), reused while it matches, refit when the settings change;
an array task never fits nor waits; a single task fits by itself."""
import subprocess
import sys

from test_tokenize import ROOT, shard_arrays, tok_cfg, tokenize_cli

from tokenfold.db import ProteinDB
from tokenfold.geo_fit import ensure_geo_codebook, geo_fit_key
from tokenfold.geotokens import GeoCodebook

FAST = ["--geo-k", "16", "--geo-refine-iters", "0"]


def _geo(db, out, codebook, *more):
    return ["--tokens", "geo", *FAST, "--db", db, "--out", out, "--geo-codebook", codebook, *more]


def test_fit_step_writes_the_codebook_tokenizes_nothing_and_is_idempotent(small_db, tmp_path):
    cbp, out = tmp_path / "geo_K16.npz", tmp_path / "tok"
    assert tokenize_cli(*_geo(small_db, out, cbp, "--fit-geo-codebook")) == 0
    assert not out.exists()                                        # nothing tokenized
    cb = GeoCodebook.load(cbp)
    cfg = tok_cfg(small_db, out, kind="geo", geo_k=16, geo_refine_iters=0, geo_codebook=str(cbp))
    assert cb.K == 16 and cb.meta["fit_key"] == geo_fit_key(cfg)
    # fit on train chains only
    db = ProteinDB(small_db)
    assert set(cb.fit_index.tolist()) <= set(db.indices("train").tolist()) and len(cb.fit_index) > 10
    assert cb.meta["fit_split"] == "train"
    # a second fit step and a run of another layout find it and leave it alone
    data, mtime = cbp.read_bytes(), cbp.stat().st_mtime_ns
    assert tokenize_cli(*_geo(small_db, out, cbp, "--fit-geo-codebook")) == 0
    il = tok_cfg(small_db, tmp_path / "tok_il", kind="geo", geo_k=16, geo_refine_iters=0, geo_codebook=str(cbp),
                 interleaved=True)
    assert ensure_geo_codebook(il).meta == cb.meta
    assert cbp.read_bytes() == data and cbp.stat().st_mtime_ns == mtime and not out.exists()
    # --refit-geo fits again, to the same bytes (the fit is seeded)
    assert tokenize_cli(*_geo(small_db, out, cbp, "--fit-geo-codebook", "--refit-geo")) == 0
    assert cbp.stat().st_mtime_ns != mtime and cbp.read_bytes() == data
    # other fit settings refit it
    il.geo_refine_iters = 1
    assert ensure_geo_codebook(il).meta["refine_iters"] == 1


def test_array_task_without_a_fitted_codebook_stops_in_one_line(small_db, tmp_path):
    cbp = tmp_path / "geo_K16.npz"
    env = {"PATH": "/usr/bin:/bin", "TOKENFOLD_DATA": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}

    def array_task(*more):
        cmd = [sys.executable, "04_tokenize.py", *map(str, _geo(small_db, tmp_path / "tok", cbp, *more)),
               "--num-shards", "2", "--shard-index", "1"]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)

    line = (f"error: geo codebook {cbp} is not fitted for this DB and settings: "
            "run 04_tokenize.py --tokens geo --fit-geo-codebook first\n")
    missing = array_task()
    assert (missing.returncode, missing.stderr) == (1, line) and not cbp.exists()
    assert tokenize_cli(*_geo(small_db, tmp_path / "tok", cbp, "--fit-geo-codebook")) == 0
    other_settings = array_task("--geo-refine-iters", "1")           # fitted with 0 refinement steps
    assert (other_settings.returncode, other_settings.stderr) == (1, line)
    assert not (tmp_path / "tok").exists()


def test_single_task_fits_by_itself_and_array_tasks_use_the_fit_step(small_db, tmp_path):
    cbp, single = tmp_path / "geo_K16.npz", tmp_path / "single"
    assert tokenize_cli(*_geo(small_db, single, cbp, "--num-shards", "1")) == 0
    assert (single / "manifest.json").exists() and GeoCodebook.load(cbp).meta["fit_split"] == "train"
    # the fit step writes the same file as a single task's own fit
    assert tokenize_cli(*_geo(small_db, tmp_path / "x", tmp_path / "step.npz", "--fit-geo-codebook")) == 0
    assert (tmp_path / "step.npz").read_bytes() == cbp.read_bytes()
    # with a fitted codebook, array tasks + finalize give what the single task gave
    arr = tmp_path / "array"
    for i in (0, 1):
        assert tokenize_cli(*_geo(small_db, arr, cbp, "--num-shards", 2, "--shard-index", i)) == 0
    assert not (arr / "manifest.json").exists()
    assert tokenize_cli(*_geo(small_db, arr, cbp, "--finalize")) == 0
    a, b = shard_arrays(single), shard_arrays(arr)
    assert a.keys() == b.keys() and a == b
