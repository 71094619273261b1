"""The learning-curve sweep: a real 2 x 2 grid of tiny models through stages 05 and 06, its subsets,
its array split and SLURM commands, and the collect step's fit and plots on synthetic cells."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_tokenize import tok_cfg

from tokenfold import sweep
from tokenfold.config import load_config
from tokenfold.scaling_fit import law
from tokenfold.shards import TokenDataset
from tokenfold.sweep_cell import make_subset
from tokenfold.sweep_report import save_projection_plot, save_scaling_plot, scaling_section
from tokenfold.tokenize import run as tokenize


@pytest.fixture(scope="module")
def tokens_3di(small_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep_tokens") / "3di"
    tokenize(tok_cfg(small_db, out, kind="3di"))
    return out


def write_config(tmp_path, tokens, **extra) -> Path:
    values = {"TOKENFOLD_DATA": str(tmp_path / "data"), "TOKENS_DIR": str(tokens), "MODEL_PRESET": "tiny",
              "S05_ARGS": "--max-tokens 4096 --lr 3e-3 --eval-every 0 --save-every 0 --threads 1 --seed 0",
              "S05_SIGNAL_SECS": "90", "S05_CPUS": "2", "S05_TIME": "01:00:00",
              "SWEEP_SIZES": "1x16 1x32", "SWEEP_FRACTIONS": "0.5 1", "SWEEP_EPOCHS": "1",
              "SWEEP_EVAL_ARGS": "--split val --max-proteins 4 --no-unconstrained --baseline-max-residues 3000",
              **extra}
    p = tmp_path / "sweep.env"
    p.write_text("".join(f'{k}="{v}"\n' for k, v in values.items()))
    return p


def test_grid_sizes_and_sbatch_chain(tmp_path, tokens_3di, capsys):
    sw = sweep.Sweep(load_config(write_config(tmp_path, tokens_3di, SWEEP_SIZES="2x64 3x128 4x256",
                                              SWEEP_FRACTIONS="1 0.25 0.125 0.5")))
    assert [c.name for c in sw.cells][:4] == ["3di_2x64_f0.125", "3di_2x64_f0.25", "3di_2x64_f0.5", "3di_2x64_f1"]
    assert len(sw.cells) == 12 and sw.dir == tmp_path / "data" / "sweeps" / "sweep"
    # 4x256 is the tiny preset's shape
    assert sweep.Size.parse("4x256").overrides() == {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                                                     "num_key_value_heads": 2, "intermediate_size": 704}
    assert sw.subset_dir(tokens_3di, 1.0) == tokens_3di
    prep, cells, coll = sweep.sbatch_commands(sw)
    assert "--array=0-11" in cells and "--signal=B:USR1@90" in cells and "--cpus-per-task=2" in cells
    assert "--time=01:00:00" in cells and "--dependency=afterok:{prev}" in cells and cells[-1] == "cell"
    assert not any(o.startswith("--dependency") for o in prep) and coll[-1] == "collect"
    assert sweep.main(["submit", "--config", str(write_config(tmp_path, tokens_3di)), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "--dependency=afterok:<tf-sweep-cell>" in lines[2] and "slurm/sweep.sbatch" in lines[1]
    for bad in ("3x100", "3by64"):
        with pytest.raises(ValueError, match="SWEEP_SIZES"):
            sweep.Size.parse(bad)


def test_subsets_are_nested_seeded_and_reused(tokens_3di, tmp_path):
    full = TokenDataset(tokens_3di, "train")
    half = make_subset(tokens_3di, tmp_path / "h", 0.5, seed=0)
    quarter = make_subset(tokens_3di, tmp_path / "q", 0.25, seed=0)
    ids = {p: set(TokenDataset(p, "train").ids.tolist()) for p in (half, quarter)}
    assert ids[quarter] < ids[half] < set(full.ids.tolist())
    assert len(ids[half]) == round(0.5 * len(full))
    h = TokenDataset(half, "train")
    j = list(full.ids).index(h.ids[0])
    np.testing.assert_array_equal(h[0], full[j])
    assert h.db_index[0] == full.db_index[j]
    assert list(TokenDataset(half, "val").ids) == list(TokenDataset(tokens_3di, "val").ids)
    mf = json.loads((half / "manifest.json").read_text())
    assert mf["subset"]["fraction"] == 0.5 and mf["splits"]["train"]["n_examples"] == len(h)
    stamp = (half / "manifest.json").stat().st_mtime_ns
    make_subset(tokens_3di, half, 0.5, seed=0)
    assert (half / "manifest.json").stat().st_mtime_ns == stamp
    other = make_subset(tokens_3di, tmp_path / "o", 0.5, seed=1)
    assert set(TokenDataset(other, "train").ids.tolist()) != ids[half]


def test_two_by_two_grid_of_tiny_models(tmp_path, tokens_3di, capsys):
    """`run`: subsets, 4 cells trained by stage 05 and evaluated by stage 06, then collect. 4 cells
    cannot fit 5 parameters: the report says so. An array task runs only its cells; a rerun redoes nothing."""
    cfg = write_config(tmp_path, tokens_3di)
    sw = sweep.Sweep(load_config(cfg))
    sweep.prepare(sw)
    assert sweep.main(["cell", "--config", str(cfg), "--num-shards", "2", "--shard-index", "1"]) == 0
    assert [c.index for c in sw.cells if sw.done(c)] == [1, 3]
    assert sweep.main(["run", "--config", str(cfg), "--n-boot", "5"]) == 0
    rep = json.loads((sw.dir / "report.json").read_text())
    recs = {r["cell"]: r for r in rep["cells"]}
    assert set(recs) == {"3di_1x16_f0.5", "3di_1x16_f1", "3di_1x32_f0.5", "3di_1x32_f1"}
    assert recs["3di_1x16_f1"]["N"] < recs["3di_1x32_f1"]["N"]
    assert recs["3di_1x16_f0.5"]["D"] < recs["3di_1x16_f1"]["D"] == recs["3di_1x32_f1"]["D"]
    full = TokenDataset(tokens_3di, "train")
    assert recs["3di_1x16_f1"]["train_examples"] == len(full) and recs["3di_1x16_f1"]["epochs_seen"] == pytest.approx(1.0)
    for r in recs.values():
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0 and r["n_eval_proteins"] == 4 and r["eval_split"] == "val"
        assert set(r["baselines"]) == {"most_frequent", "per_aa", "window"}
        run_cfg = json.loads((Path(r["run_dir"]) / "run_config.json").read_text())
        assert run_cfg["config"]["lr"] == 3e-3 and run_cfg["model"]["num_hidden_layers"] == 1
    assert rep["sets"]["3di"]["fit"]["status"].startswith("not fitted: 4 points")
    assert len((sw.dir / "cells.tsv").read_text().splitlines()) == 5
    stamps = [sw.result_path(c).stat().st_mtime_ns for c in sw.cells]
    assert sweep.main(["run", "--config", str(cfg), "--n-boot", "5"]) == 0
    assert [sw.result_path(c).stat().st_mtime_ns for c in sw.cells] == stamps
    capsys.readouterr()
    assert sweep.main(["plan", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.count("\tdone\t") == 4


def synthetic_cells(acc_slope: float = -0.3) -> list[dict]:
    """12 cells whose losses follow a known law (0.2% noise) and whose accuracy falls with loss."""
    rng = np.random.default_rng(0)
    cells = []
    for size, n in (("2x64", 1.0e5), ("3x128", 5.5e5), ("4x256", 3.0e6)):
        for f in (0.125, 0.25, 0.5, 1.0):
            d = f * 1.6e6
            loss = float(law(n, d, 2.0, 60.0, 0.35, 300.0, 0.4) * np.exp(rng.normal(0, 0.002)))
            cells.append({"cell": f"s_{size}_f{f:g}", "size": size, "fraction": f, "N": n, "D": d, "loss": loss,
                          "accuracy": 0.9 + acc_slope * loss, "train_examples": int(f * 880),
                          "baselines": {"most_frequent": 0.18, "per_aa": 0.19, "window": 0.246}})
    return cells


def test_collect_fits_projects_and_draws_synthetic_cells(tmp_path):
    cells = synthetic_cells()
    sec = scaling_section(cells, n_boot=30)
    fit = sec.pop("fit_object")
    assert sec["fit"]["status"] == "ok" and abs(sec["fit"]["params"]["alpha"] - 0.35) < 0.1
    proj = sec["projection"]
    assert sec["target_baseline"] == "window" and proj["status"] == "ok"
    assert proj["target_loss"] == pytest.approx((0.246 - 0.9) / -0.3, rel=1e-6)
    inf_row = proj["per_N"][-1]
    assert inf_row["N"] == float("inf") and np.isfinite(inf_row["D_star"])
    assert inf_row["train_chains_at_sweep_epochs"] == pytest.approx(inf_row["D_star"] / (1.6e6 / 880))
    for f in (save_scaling_plot(tmp_path / "s.png", cells, fit, sec), save_projection_plot(tmp_path / "p.png", cells, fit, sec)):
        assert f.stat().st_size > 20_000
    flat = scaling_section(synthetic_cells(acc_slope=0.0), n_boot=5)
    assert flat["projection"]["status"].startswith("no projection")


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_runs_the_grid_as_slurm_jobs(tmp_path, tokens_3di):
    """`submit` on a real SLURM cluster: prepare, a 2-task cell array, collect, chained with afterok."""
    from conftest import IN_CI
    from test_pipeline import clean_env
    from test_slurm import cluster_problem, wait_for

    problem = cluster_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"TOKENFOLD_CI=1 but no SLURM cluster: {problem}")
        pytest.skip(f"no SLURM cluster: {problem}")
    cfg = write_config(tmp_path, tokens_3di, SWEEP_SIZES="1x16", S05_CPUS="1", S05_SIGNAL_SECS="30",
                       LOG_DIR=str(tmp_path / "logs"))
    env = clean_env(TOKENFOLD_CONFIG=str(cfg))
    p = subprocess.run([sys.executable, "-m", "tokenfold.sweep", "submit", "--config", str(cfg)], cwd=sweep.ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ids = [line.split("job ")[1] for line in p.stdout.splitlines() if ": job " in line]
    assert len(ids) == 3
    rows = wait_for(ids)
    logs = sorted((tmp_path / "logs").glob("tf-sweep-*.out"))
    assert all(r["state"] == "COMPLETED" for r in rows), (rows, [f.read_text()[-1500:] for f in logs])
    assert sorted(r["id"] for r in rows if r["id"].startswith(ids[1] + "_")) == [f"{ids[1]}_0", f"{ids[1]}_1"]
    rep = json.loads((tmp_path / "data" / "sweeps" / "sweep" / "report.json").read_text())
    assert [r["cell"] for r in rep["cells"]] == ["3di_1x16_f0.5", "3di_1x16_f1"]
    assert len([f for f in logs if "tf-sweep-cell" in f.name]) == 2
