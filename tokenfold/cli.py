"""What every command-line entry point shares: logging, one-line errors, progress bars, seeds, and
command-line flags derived from a stage's settings dataclass.

Options are written once, as dataclass fields::

    @dataclass
    class TrainConfig:
        lr: float = option(3e-4, "peak learning rate", group="optimisation")
        compile: bool = option(False, "torch.compile the model")

    add_options(parser, TrainConfig)            # --lr FLOAT, --compile, in an "optimisation" group
    cfg = options_from_args(TrainConfig, args)  # TrainConfig(lr=..., compile=...)

The flag is ``--`` + the field name with ``-`` for ``_`` (or ``flag=``), its type comes from the
annotation (``int | None`` takes an int or stays None), a ``bool`` field is a switch
(``--x``/``--no-x`` when it defaults to True), and ``help`` gets the default appended. Fields
with ``cli=False`` (or a type no flag can express, such as dicts) are not flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import sys
import typing

import numpy as np

log = logging.getLogger("tokenfold")


# ----------------------------------------------------------------------------- logging, errors, progress, seeds
def setup_logging(verbose: bool = False) -> logging.Logger:
    """One log format for every stage: time, level, message, on stderr (SLURM puts it in the .err/.out)."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(level)
    return log


def die(msg: str, code: int = 1):
    """Exit a CLI with one clear line on stderr."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def progress(iterable=None, **kw):
    """tqdm progress bar that stays quiet when stderr is not a terminal unless TOKENFOLD_PROGRESS=1.

    SLURM log files fill up with carriage-return bars otherwise; stages also log summary lines.
    """
    from tqdm.auto import tqdm

    force = os.environ.get("TOKENFOLD_PROGRESS")
    disable = (not sys.stderr.isatty()) if force is None else force == "0"
    kw.setdefault("mininterval", 2.0)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable, **kw)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- flags from dataclasses
def option(default=dataclasses.MISSING, help: str = "", *, flag: str | None = None, group: str | None = None,
           choices=None, metavar: str | None = None, cli: bool = True, default_factory=dataclasses.MISSING):
    """A dataclass field that is also a command-line flag (module docstring)."""
    meta = {"help": help, "flag": flag, "group": group, "choices": choices, "metavar": metavar, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_SCALARS = (int, float, str, bool)


def _flag_type(hint):
    """(scalar type, may be None) of an annotation, or (None, False) when no flag can express it."""
    args = typing.get_args(hint)
    if hint in _SCALARS:
        return hint, False
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SCALARS:
            return rest[0], True
    return None, False


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls, *, skip=(), defaults: dict | None = None) -> dict:
    """Add one flag per field of dataclass `cls` to `parser` (module docstring). `skip`: field names
    the caller handles itself; `defaults`: flag defaults that differ from the field defaults.
    Returns the argument groups by title (groups the parser already had are reused), so a script can
    add its few hand-written flags where they belong."""
    hints = typing.get_type_hints(cls)
    groups = {g.title: g for g in parser._action_groups if g.title}
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        typ, optional = _flag_type(hints[f.name])
        if typ is None:
            continue
        target = parser
        if f.metadata.get("group"):
            g = f.metadata["group"]
            if g not in groups:
                groups[g] = parser.add_argument_group(g)
            target = groups[g]
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "")
        kw = dict(dest=f.name, default=default)
        if typ is bool:
            if default:
                kw["action"] = argparse.BooleanOptionalAction
                help_ += " (default: on)"
            else:
                kw["action"] = "store_true"
        else:
            kw.update(type=typ, choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"))
            if default is not None:
                help_ += " (default: %(default)s)"
        target.add_argument(flag_name(f), help=help_.strip() or None, **kw)
    return groups


def options_from_args(cls, args: argparse.Namespace, **extra):
    """An instance of dataclass `cls` from parsed flags; fields without a flag keep their defaults
    unless given in `extra`."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(extra)
    return cls(**kw)
