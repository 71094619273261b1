"""Stage 03, the run: outputs, resume and --overwrite, the command line.

Vectors are real stage-02 outputs on the `small_db` chains, from a tiny RANDOMLY INITIALISED ESM-2
(`esm_fixtures.emb_dir`; weights cannot be downloaded here), so the structure numbers themselves mean
nothing; the tests pin the mechanics.
"""
import subprocess
import sys

import numpy as np

from conftest import ROOT
from tokenfold.artifacts import read_json
from tokenfold.cli import options_from_args
from tokenfold.codebook import Codebook
from tokenfold.train_codebook import CodebookConfig, find_embeddings, outputs, run_train_codebook

pytest_plugins = ["esm_fixtures"]   # emb_dir, load_script


def test_stage03_end_to_end(emb_dir, small_db, tmp_path):
    out = tmp_path / "codebook"
    cfg = CodebookConfig(embeddings=emb_dir, db=small_db, out=out, k=16, batch_size=1024, n_init=1)
    summary = run_train_codebook(cfg)
    paths = outputs(out, 16)
    for p in paths.values():
        assert p.exists(), p
    assert (out / "codebook_K16.pkl.sha256").exists()
    on_disk = read_json(paths["summary"])
    assert on_disk["quality"] == summary["quality"]
    m = on_disk["meta"]
    assert m["random_weights"] is True and "meaningless" in on_disk["warning"]
    assert (m["K"], m["layer"], m["dim"], m["normalize"]) == (16, 2, 32, False)
    assert m["esm_model"] == "esm2_t2_tiny_RANDOM_seed1" and m["n_train_residues"] > 1000
    q = on_disk["quality"]
    assert 0 < q["val"]["utilisation"] <= 1 and q["val"]["n_residues"] > 0
    assert {"nmi_code_3di", "nmi_aa_3di", "nmi_code_3di_shuffled"} <= set(q["structure"])
    cb = Codebook.load(paths["codebook"])
    assert cb.meta == m
    # a finished stage is left alone; --overwrite redoes it with the same (seeded) result
    mtime = paths["codebook"].stat().st_mtime_ns
    run_train_codebook(cfg)
    assert paths["codebook"].stat().st_mtime_ns == mtime
    cfg.overwrite = True
    again = run_train_codebook(cfg)
    np.testing.assert_array_equal(Codebook.load(paths["codebook"]).centroids, cb.centroids)
    assert again["quality"] == summary["quality"]
    assert find_embeddings(emb_dir.parent) == emb_dir


def test_cli_flags_set_their_settings(load_script):
    """The flags of existing command lines (slurm/03_train_codebook.sbatch, S03_ARGS) reach the stage's settings."""
    args = load_script("03_train_codebook.py").build_parser().parse_args(
        ["--embeddings", "e", "--db", "d", "--out", "o", "--k", "64", "--seed", "1", "--normalize",
         "--max-train-residues", "5", "--max-val-residues", "6", "--batch-size", "7", "--max-iter", "8",
         "--n-init", "9", "--overwrite"])
    assert options_from_args(CodebookConfig, args) == CodebookConfig(
        embeddings="e", db="d", out="o", k=64, seed=1, normalize=True, max_train_residues=5, max_val_residues=6,
        batch_size=7, max_iter=8, n_init=9, overwrite=True)


def test_stage03_cli(emb_dir, small_db, tmp_path):
    r = subprocess.run([sys.executable, "03_train_codebook.py", "--embeddings", str(emb_dir), "--db", str(small_db),
                        "--out", str(tmp_path), "--k", "100000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "at least K" in err[0], r.stderr
    assert not list(tmp_path.glob("*.pkl"))
