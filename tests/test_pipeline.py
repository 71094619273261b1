"""The pipeline orchestration without SLURM: config files, the stage plan, the local chain, and the
submitit launcher on local processes. (tests/test_slurm.py runs the same chain on a real cluster.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenfold import layout
from tokenfold.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "slurm" / "run_pipeline.sh"
DEMO = ROOT / "slurm" / "config" / "demo.env"
CONFIGS = sorted((ROOT / "slurm" / "config").glob("*.env"))
STAGES = ["01", "02", "03", "04", "05", "06"]

# The reduced-size demo the end-to-end tests run (here and in test_slurm.py): the demo config with a
# few values overridden from the environment, which is also how users override it.
FAST = {
    "S05_ARGS": "--max-steps 12 --eval-every 0 --save-every 6 --log-every 4",
    "S06_ARGS": "--max-proteins 6 --n-pdb 2",
}


def clean_env(**extra) -> dict:
    """The test process's environment without any pipeline config key (so the file's values count)."""
    cfg_keys = set()
    for c in CONFIGS:
        cfg_keys |= set(parse_config(c.read_text(), env={}))
    env = {k: v for k, v in os.environ.items() if k not in cfg_keys and not k.startswith("SLURM_")
           and k not in ("TOKENFOLD_CONFIG", "TOKENFOLD_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def bash_config(path: Path, env: dict) -> dict:
    """What slurm/lib.sh's tf_load_config makes of a config file: {key: value} in file order."""
    script = ('source slurm/lib.sh; tf_load_config "$1"; '
              'for k in "${TF_CONFIG_KEYS[@]}"; do printf "%s=%s\\0" "$k" "${!k}"; done')
    p = subprocess.run(["bash", "-c", script, "bash", str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return dict(item.split("=", 1) for item in p.stdout.split("\0") if item)


TRICKY = r"""# every rule of the format, read by both parsers
A=plain
B="two words ${A}"      # a trailing comment
C='literal ${A} $A'
  export D=$A/x#not-a-comment
E=${NOT_SET_ANYWHERE}z
G="a$ b $"
H=
H2=     # only a comment
I="x # not a comment"
J=${A}${B}
A=again
K=$A
L=$FROM_ENV/y
FROM_ENV=from-file
"""


def test_bash_and_python_read_configs_identically(tmp_path):
    tricky = tmp_path / "tricky.env"
    tricky.write_text(TRICKY)
    env = clean_env(FROM_ENV="from-env", USER="alice")
    for path in [tricky, *CONFIGS]:
        py = parse_config(path.read_text(), env=env, source=str(path))
        assert bash_config(path, env) == py, path
    py = parse_config(TRICKY, env=env)
    assert py["B"] == "two words plain" and py["C"] == "literal ${A} $A" and py["D"] == "plain/x#not-a-comment"
    assert py["E"] == "z" and py["H"] == py["H2"] == "" and py["I"] == "x # not a comment" and py["G"] == "a$ b $"
    assert py["J"] == "plaintwo words plain" and py["K"] == "again"
    assert py["FROM_ENV"] == "from-env" and py["L"] == "from-env/y"      # the environment wins


@pytest.mark.parametrize("bad", ["A=two words", "A='open", "not a line", 'A="x" y', "A= value"])
def test_config_errors_name_the_line(tmp_path, bad):
    p = tmp_path / "bad.env"
    p.write_text(f"# ok\nX=1\n{bad}\n")
    with pytest.raises(ConfigError, match=r"bad.env:3"):
        parse_config(p.read_text(), env={}, source=str(p))
    r = subprocess.run(["bash", "-c", 'source slurm/lib.sh; tf_load_config "$1"', "bash", str(p)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "bad.env:3" in r.stderr


def test_environment_overrides_every_value():
    env = clean_env(TOKENFOLD_DATA="/scratch/x", TOKEN_KIND="geo", S05_ARGS="--max-steps 5")
    cfg = load_config(DEMO, env=env)
    assert cfg["DB_DIR"] == "/scratch/x/db" and cfg["TOKENS_DIR"] == "/scratch/x/tokens/geo"
    assert cfg.words("S05_ARGS") == ["--max-steps", "5"]
    assert load_config(DEMO, env=clean_env(), overrides={"TOKEN_KIND": "geo"})["TOKENS_DIR"].endswith("tokens/geo")
    assert bash_config(DEMO, env)["EMB_DIR"].startswith("/scratch/x/embeddings/")
    out = subprocess.run([sys.executable, "-m", "tokenfold.config", "--config", str(DEMO), "DB_DIR", "TOKEN_KIND"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["DB_DIR=/scratch/x/db", "TOKEN_KIND=geo"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_paths_follow_the_data_layout(config):
    """Each config names its artifact directories the way tokenfold/layout.py does."""
    cfg = load_config(config, env=clean_env(TOKENFOLD_DATA="/D", USER="alice"))
    rel = lambda p: Path(p).relative_to(layout.DATA)  # noqa: E731
    data = Path("/D")
    assert Path(cfg["DB_DIR"]) == data / rel(layout.DB)
    assert Path(cfg["CODEBOOK_DIR"]) == data / rel(layout.codebook_path(int(cfg["CODEBOOK_K"])).parent)
    assert Path(cfg["TOKENS_DIR"]) == data / rel(layout.tokens_dir(cfg["TOKEN_KIND"]))
    assert Path(cfg["RUN_DIR"]).parent == data / rel(layout.RUNS)
    assert Path(cfg["EVAL_DIR"]).parent == data / rel(layout.EVAL)
    assert Path(cfg["EMB_DIR"]).parent == data / rel(layout.EMBEDDINGS)
