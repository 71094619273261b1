"""Pipeline configuration files (`slurm/config/*.env`): the one reader, for Python and the SLURM scripts.

One file describes one pipeline: where the artifacts go, which model/token kind, and the SLURM
resources of every stage. `load_config` below reads it; the shell side (`slurm/lib.sh`,
`tf_load_config`) evaluates what `python -m tokenfold.config --config FILE --export` prints. The format
is a small subset of shell syntax::

    # a comment line
    KEY=value                  unquoted: no spaces, ends at a " #" comment; ${NAME} and $NAME expanded
    KEY=                       empty (a comment may follow after a space)
    KEY="value with spaces"    double quotes: ${NAME} and $NAME expanded
    KEY='literal ${text}'      single quotes: nothing expanded
    export KEY=value           a leading "export " is allowed (so the file can also be sourced)

Precedence: a KEY that is already set in the environment keeps its environment value; the file's
line is then ignored. So any value is overridable without editing the file::

    S05_ARGS="--max-steps 50" bash slurm/run_pipeline.sh --config slurm/config/demo.env

`${NAME}` expands to NAME's value resolved so far: the environment first, then earlier lines of the
file; empty when neither has it. Later lines see the overridden value (set TOKENFOLD_DATA in the
environment and every path built from it follows).

`python -m tokenfold.config [--config FILE] [--export] [KEY ...]` prints the resolved values as shell
assignments (what the SLURM scripts see), in file order; with --export as `export KEY=...` lines for
the shell to evaluate. An error is one line naming the file and line.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "slurm/config/demo.env"
CONFIG_ENV = "TOKENFOLD_CONFIG"   # config file to use when none is named

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class ConfigError(ValueError):
    """A config file line that the format above does not allow (message names file and line)."""


def _unquote(raw: str, where: str) -> tuple[str, bool]:
    """(value, expand?) of the right-hand side of KEY=..., following the rules in the docstring."""
    if raw[:1].isspace():  # "KEY=   # comment" is an empty value; "KEY= value" is an error (as in sh)
        if raw.strip() and not raw.strip().startswith("#"):
            raise ConfigError(f"{where}: space after '=' (write KEY=value, or quote the value)")
        return "", False
    raw = raw.strip()
    if raw[:1] in ("'", '"'):
        q = raw[0]
        end = raw.find(q, 1)
        if end < 0:
            raise ConfigError(f"{where}: unterminated {q}-quoted value")
        rest = raw[end + 1:].strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(f"{where}: text after the closing quote: {rest!r}")
        return raw[1:end], q == '"'
    # unquoted: a comment starts at whitespace + '#'; whitespace inside is not allowed
    m = re.search(r"\s#", raw)
    if m:
        raw = raw[:m.start()].rstrip()
    if re.search(r"\s", raw):
        raise ConfigError(f"{where}: unquoted value with spaces (quote it): {raw!r}")
    return raw, True


def parse_config(text: str, env: Mapping[str, str] | None = None, source: str = "<config>") -> dict[str, str]:
    """Resolve a config text against `env` (default: os.environ). Returns only the file's keys,
    each with its effective value (the environment's when set there)."""
    env = os.environ if env is None else env
    values: dict[str, str] = {}

    def lookup(name: str) -> str:
        if name in values:
            return values[name]
        return env.get(name, "")

    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = _LINE.match(s)
        if not m:
            raise ConfigError(f"{source}:{n}: expected KEY=value, got: {s!r}")
        key, raw = m.group(1), m.group(2)
        val, expand = _unquote(raw, f"{source}:{n}")
        if expand:
            val = _REF.sub(lambda r: lookup(r.group(1) or r.group(2)), val)
        values[key] = env[key] if key in env else val
    return values


def resolve_config_path(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The config file to read: `path`, else $TOKENFOLD_CONFIG, else slurm/config/demo.env.
    A relative path is taken from the current directory when it exists there, else the repo root."""
    env = os.environ if env is None else env
    p = Path(path or env.get(CONFIG_ENV) or DEFAULT_CONFIG)
    if not p.is_absolute() and not p.exists() and (ROOT / p).exists():
        p = ROOT / p
    if not p.is_file():
        raise FileNotFoundError(f"pipeline config not found: {p}")
    return p


class PipelineConfig(Mapping):
    """The resolved key/value pairs of one config file (read-only mapping of str -> str), and the
    environment they were resolved against (`lookup` reads a key the file does not set from there)."""

    def __init__(self, values: dict[str, str], path: Path | None = None, env: Mapping[str, str] | None = None):
        self._values = dict(values)
        self.path = path
        self._env = dict(os.environ if env is None else env)

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"PipelineConfig({str(self.path)!r}, {len(self)} keys)"

    def lookup(self, key: str, default: str = "") -> str:
        """KEY as the stage scripts see it: the file's value, else the environment's; `default` when
        that is empty or unset (e.g. S04_FIT_CPUS, which no config file needs to mention)."""
        value = self._values[key] if key in self._values else self._env.get(key, "")
        return value or default

    def expand(self, text: str) -> str:
        """`text` with ${NAME} and $NAME replaced by `lookup(NAME)`, the file's expansion rule."""
        return _REF.sub(lambda r: self.lookup(r.group(1) or r.group(2)), text)

    def words(self, key: str) -> list[str]:
        """A *_ARGS value split like the shell does (`S05_ARGS="--max-steps 50"` -> two words)."""
        return shlex.split(self.get(key, ""))

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) plus every config value and TOKENFOLD_CONFIG: the environment a
        stage script needs to see exactly this configuration."""
        env = dict(os.environ if base is None else base)
        env.update(self._values)
        if self.path is not None:
            env[CONFIG_ENV] = str(Path(self.path).resolve())
        return env


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None) -> PipelineConfig:
    """Read a pipeline config. `overrides` act like environment variables (they win over the file)."""
    base = dict(os.environ if env is None else env)
    if overrides:
        base.update({k: str(v) for k, v in overrides.items()})
    p = resolve_config_path(path, base)
    values = parse_config(p.read_text(), base, source=str(p))
    for k, v in (overrides or {}).items():   # an override of a key the file does not have
        values.setdefault(k, str(v))
    return PipelineConfig(values, p, base)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenfold.config", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})")
    ap.add_argument("--export", action="store_true",
                    help="print `export KEY=value` lines (values shell-quoted), for the shell to evaluate")
    ap.add_argument("keys", nargs="*", help="print only these keys (default: all, in file order)")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k in a.keys or list(cfg):
        if k not in cfg:
            print(f"error: {k} is not set in {cfg.path}", file=sys.stderr)
            return 2
        print(f"{'export ' if a.export else ''}{k}={shlex.quote(cfg[k])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
