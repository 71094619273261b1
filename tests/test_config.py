"""Pipeline config files (tokenfold/config.py): the format's rules, errors, and how the shell side
(slurm/lib.sh) gets the same values by evaluating `python -m tokenfold.config --export`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline import CONFIGS, DEMO, ROOT, clean_env
from tokenfold import layout
from tokenfold.config import ConfigError, load_config, parse_config


def bash_config(path: Path, env: dict) -> dict:
    """The environment that slurm/lib.sh's tf_load_config leaves after reading a config file."""
    p = subprocess.run(["bash", "-c", 'source slurm/lib.sh; tf_load_config "$1"; env -0', "bash", str(path)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return dict(item.split("=", 1) for item in p.stdout.split("\0") if "=" in item)


TRICKY = r"""# every rule of the format
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
M='a "quoted" \back\slash; `tick` $(not run)'
N="it's"
"""


def test_config_rules(tmp_path):
    py = parse_config(TRICKY, env=clean_env(FROM_ENV="from-env"))
    assert py["B"] == "two words plain" and py["C"] == "literal ${A} $A" and py["D"] == "plain/x#not-a-comment"
    assert py["E"] == "z" and py["H"] == py["H2"] == "" and py["I"] == "x # not a comment" and py["G"] == "a$ b $"
    assert py["J"] == "plaintwo words plain" and py["K"] == "again"
    assert py["FROM_ENV"] == "from-env" and py["L"] == "from-env/y"      # the environment wins
    assert py["M"] == 'a "quoted" \\back\\slash; `tick` $(not run)' and py["N"] == "it's"


def test_the_shell_gets_the_values_python_reads(tmp_path):
    """tf_load_config evaluates `--export`: every value arrives intact (quotes, $, backslashes are not
    re-interpreted, nothing runs), in file order, and the environment still wins."""
    tricky = tmp_path / "tricky.env"
    tricky.write_text(TRICKY)
    env = clean_env(FROM_ENV="from-env", USER="alice")
    for path in [tricky, *CONFIGS]:
        py = parse_config(path.read_text(), env=env, source=str(path))
        bash = bash_config(path, env)
        assert {k: bash.get(k) for k in py} == py, path
    out = subprocess.run([sys.executable, "-m", "tokenfold.config", "--config", str(tricky), "--export"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert [line.split("=", 1)[0] for line in out.splitlines()] == \
        ["export " + k for k in ("A", "B", "C", "D", "E", "G", "H", "H2", "I", "J", "K", "L", "FROM_ENV", "M", "N")]


@pytest.mark.parametrize("bad", ["A=two words", "A='open", "not a line", 'A="x" y', "A= value"])
def test_config_errors_name_the_line(tmp_path, bad):
    p = tmp_path / "bad.env"
    p.write_text(f"# ok\nX=1\n{bad}\n")
    with pytest.raises(ConfigError, match=r"bad.env:3"):
        parse_config(p.read_text(), env={}, source=str(p))
    r = subprocess.run(["bash", "-c", 'source slurm/lib.sh; tf_load_config "$1"', "bash", str(p)],
                       cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "bad.env:3" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr                 # one line


def test_relative_config_path_is_read_from_the_current_directory_in_bash_and_python(tmp_path):
    (tmp_path / "my.env").write_text(f"TOKENFOLD_DATA={tmp_path}/data\n")
    r = subprocess.run(["bash", "-c", f'source "{ROOT}/slurm/lib.sh"; tf_init; echo "$TF_CONFIG|$TOKENFOLD_DATA"'],
                       cwd=tmp_path, env=clean_env(TOKENFOLD_CONFIG="my.env"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == f"{tmp_path / 'my.env'}|{tmp_path}/data"
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert load_config("my.env", env=clean_env())["TOKENFOLD_DATA"] == f"{tmp_path}/data"
    finally:
        os.chdir(cwd)


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


def test_lookup_reads_keys_the_file_does_not_set_from_the_environment():
    cfg = load_config(DEMO, env=clean_env(S04_FIT_CPUS="7", S04_CPUS="9"))
    assert "S04_FIT_CPUS" not in cfg and cfg.lookup("S04_FIT_CPUS") == "7"
    assert cfg.lookup("S04_CPUS") == "9"                                   # the environment wins
    assert cfg.lookup("S04_FIT_MEM", "1G") == "1G" and cfg.lookup("ACCOUNT", "x") == "x"   # empty: the default
    assert cfg.expand("${TOKENS_DIR}/manifest.json") == cfg["TOKENS_DIR"] + "/manifest.json"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_paths_follow_the_data_layout(config):
    """Each config names its artifact directories the way tokenfold/layout.py does."""
    cfg = load_config(config, env=clean_env(TOKENFOLD_DATA="/D", USER="alice"))
    rel = lambda p: Path(p).relative_to(layout.DATA)  # noqa: E731
    data = Path("/D")
    assert Path(cfg["DB_DIR"]) == data / rel(layout.DB)
    assert Path(cfg["CODEBOOK_DIR"]) == data / rel(layout.codebook_path(int(cfg["CODEBOOK_K"])).parent)
    interleaved = "--interleaved" in cfg.words("S04_ARGS")
    assert Path(cfg["TOKENS_DIR"]) == data / rel(layout.tokens_dir(cfg["TOKEN_KIND"], interleaved))
    assert Path(cfg["RUN_DIR"]).parent == data / rel(layout.RUNS)
    assert Path(cfg["EVAL_DIR"]).parent == data / rel(layout.EVAL)
    assert Path(cfg["EMB_DIR"]) == data / rel(layout.embeddings_dir(cfg["ESM_NAME"], int(cfg["ESM_LAYER"])))
