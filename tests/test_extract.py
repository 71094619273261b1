"""Stage 02, the run: output aligned with the DB, kill and resume, SLURM array tasks, the command line.

With a tiny RANDOMLY INITIALISED ESM-2 (`esm_fixtures`); real weights cannot be downloaded here.
"""
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT
from tokenfold import extract as X
from tokenfold.artifacts import read_json
from tokenfold.cli import options_from_args
from tokenfold.db import ProteinDB
from tokenfold.embedding_store import EmbeddingStore
from tokenfold.esm_embed import embed

pytest_plugins = ["esm_fixtures"]   # tiny_ckpt, tiny, full_run, stage02_config, load_script


def test_stage02_output_aligned_with_db(full_run, small_db, tiny):
    model, alphabet, _ = tiny
    db = ProteinDB(small_db)
    store = EmbeddingStore(full_run)
    m = store.meta
    assert (m["mode"], m["layer"], m["dim"], m["dtype"], m["random_weights"]) == ("full", 2, 64, "float16", True)
    assert store.n_shards == len(db.shards)
    rep = read_json(full_run / "report.json")
    assert rep["summary"]["random_weights"] and "RANDOM" in rep["warning"] and (full_run / "report.png").exists()
    for k, dbs in enumerate(db.shards):
        sh = store.shard(k)
        assert sh.attrs["random_weights"] and sh.shape == (dbs.n_residues, 64)
        np.testing.assert_array_equal(sh.ids, dbs.ids)
        np.testing.assert_array_equal(sh.offsets, dbs.arrays["offsets"])
    rec = db.shards[1].record(3)
    direct = embed(model, alphabet, [rec.aa])[0]
    stored = store.shard(1).get(3)
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), direct, atol=2e-2, rtol=1e-2)  # float16 storage


def test_stage02_kill_and_resume_equals_uninterrupted(stage02_config, full_run, small_db, tiny_ckpt, tmp_path,
                                                       monkeypatch):
    out = tmp_path / "resumed"
    cfg = stage02_config(small_db, out, tiny_ckpt, block_residues=1500)
    real, calls = X.embed, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(X, "embed", dying)
    with pytest.raises(KeyboardInterrupt):
        X.run_extract(cfg)
    monkeypatch.setattr(X, "embed", real)
    assert not (out / "manifest.json").exists()
    done_parts = sorted((out / "work").glob("shard_*/part_*.npy")) + sorted(out.glob("shard_*.h5"))
    assert done_parts, "the first blocks should have survived the kill"
    assert not list(out.rglob("*.tmp*")), "no temporary files left behind"
    X.run_extract(cfg)
    X.finalize(cfg)
    for f in sorted(full_run.glob("shard_*.h5")):
        with h5py.File(f) as a, h5py.File(out / f.name) as b:
            for name in ("offsets", "emb", "n_windows"):
                np.testing.assert_array_equal(a[name][()], b[name][()])
    assert not (out / "work" / "shard_00000").exists()
    # a finished stage does nothing on re-run (the model is not even loaded)
    monkeypatch.setattr(X, "load_esm", lambda *a, **k: pytest.fail("reloaded a finished stage"))
    assert X.run_extract(cfg) == []


def test_stage02_array_tasks_then_finalize(stage02_config, full_run, small_db, tiny_ckpt, tmp_path):
    out = tmp_path / "array"
    cfg = stage02_config(small_db, out, tiny_ckpt, block_residues=1500)
    X.run_extract(cfg, num_tasks=2, task_index=1)
    with pytest.raises(SystemExit):           # shard 0 missing: finalize refuses, naming it
        X.finalize(cfg)
    X.run_extract(cfg, num_tasks=2, task_index=0)
    X.finalize(cfg)
    with h5py.File(full_run / "shard_00001.h5") as a, h5py.File(out / "shard_00001.h5") as b:
        np.testing.assert_array_equal(a["emb"][()], b["emb"][()])



def test_cli_flags_set_their_settings(load_script):
    """The flags of existing command lines (slurm/config/*.env, S02_ARGS) reach the stage's settings."""
    args = load_script("02_extract_esm_embeddings.py").build_parser().parse_args(
        ["--db", "d", "--model", "m.pt", "--layer", "3", "--out", "o", "--random-weights-for-testing",
         "--device", "cpu", "--precision", "fp16", "--toks-per-batch", "512", "--window", "100", "--overlap", "10",
         "--truncate", "--max-residues", "5", "--max-val-residues", "6", "--seed", "7", "--block-residues", "99",
         "--overwrite", "--threads", "2", "--finalize", "--num-shards", "4", "--shard-index", "1"])
    assert options_from_args(X.ExtractConfig, args) == X.ExtractConfig(
        db="d", model="m.pt", layer=3, out="o", random_weights_for_testing=True, device="cpu", precision="fp16",
        toks_per_batch=512, window=100, overlap=10, truncate=True, max_residues=5, max_val_residues=6, seed=7,
        block_residues=99, overwrite=True)
    assert (args.threads, args.finalize, args.num_shards, args.shard_index) == (2, True, 4, 1)


def test_cli_one_line_errors(tmp_path, small_db, tiny_ckpt):
    # a RANDOM checkpoint without the explicit flag: refused, one line, non-zero exit
    r = subprocess.run([sys.executable, "02_extract_esm_embeddings.py", "--db", str(small_db), "--model",
                        str(tiny_ckpt), "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "RANDOM" in err[0], r.stderr
    assert not (tmp_path / "x" / "manifest.json").exists()
