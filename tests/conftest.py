"""Shared test fixtures. Real data only: ../shared (skipped when absent) or the embedded default."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOKENFOLD_SHARED", ROOT.parent / "shared")) / "data"
IN_CI = os.environ.get("TOKENFOLD_CI") == "1"


def need_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a message when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p}")
    return p
