"""bench/gpu_check.sh, the one-script GPU check of stages 05/02/06, in its CPU smoke mode (tiny shapes):
one JSON with every number the GPU run reports. Its GPU numbers are measured only where a GPU is lent."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_cpu_smoke_prints_one_json_with_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path / "g.json"),
                        "--logs", str(tmp_path / "logs")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)                                   # stdout is the one JSON, nothing else
    assert out == json.loads((tmp_path / "g.json").read_text())
    assert out["mode"] == "cpu-smoke" and out["device"] == "cpu" and out["errors"] == {}
    assert out["chains"]["n"] >= 20 and "SDPA" in out["flash_attn"]
    t = out["stage05_train"]
    assert (t["shape"], t["precision"], t["attention"], t["batch_layout"]) == ("tiny", "fp32", "sdpa", "padded")
    assert t["tokens_per_s"] > 0 and t["reference_tokens_per_s"] > 0 and t["model_tflops_per_s"] > 0
    assert t["mfu"] is None and t["peak_mem_gib"] is None and t["meets_target"] is None   # GPU-only numbers
    assert t["speedup"] == t["tokens_per_s"] / t["reference_tokens_per_s"]
    e = out["stage02_esm"]
    assert "esm2_t6" in e["shape"] and "RANDOM" in e["shape"] and e["residues"] > 0
    assert e["residues_per_s"] > 0 and e["reference_residues_per_s"] > 0
    g = out["stage06_generate"]
    assert "RANDOMLY INITIALISED" in g["model"] and g["proteins"] == 4 and g["proteins_per_s"] > 0
    assert g["identical_outputs"] == 1.0 and g["meets_target"] is None                  # greedy: same tokens
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert {"stage05_train.log", "stage02_esm.log", "stage06_generate.log"} <= logs
