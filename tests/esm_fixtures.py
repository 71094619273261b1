"""Fixtures of the stage 02/03 tests, loaded by the test files that name this module in ``pytest_plugins``.

Tiny RANDOMLY INITIALISED ESM-2 checkpoints written in fair-esm's own format (the real fair-esm loader
code and forward pass run; real weights cannot be downloaded here), and stage-02 outputs made with them
on `small_db`, plus the numbered scripts 02/03 as modules. Session-scoped and shared between test files:
read them, do not modify them.
"""
import importlib.util
from pathlib import Path

import pytest

from conftest import ROOT
from tokenfold.db import ProteinDB
from tokenfold.embedding_store import EmbeddingStore
from tokenfold.esm_checkpoint import load_esm, write_random_checkpoint
from tokenfold.extract import ExtractConfig, finalize, run_extract


def _stage02_config(db, out, ckpt, **kw) -> ExtractConfig:
    """Stage-02 settings that use the RANDOM test checkpoint `ckpt` on purpose."""
    return ExtractConfig(db=db, out=out, model=str(ckpt), random_weights_for_testing=True, **kw)


@pytest.fixture(scope="session")
def stage02_config():
    """``stage02_config(db, out, ckpt, **settings)``: an ExtractConfig that uses the RANDOM `ckpt` on purpose."""
    return _stage02_config


@pytest.fixture(scope="session")
def load_script():
    """``load_script("02_extract_esm_embeddings.py")``: a numbered script as a module (its parser, its main)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(Path(name).stem.lstrip("0123456789_"), ROOT / name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide RANDOM ESM-2 checkpoint (seed 0)."""
    path = tmp_path_factory.mktemp("models") / "esm2_t2_tiny_RANDOM_seed0.pt"
    return write_random_checkpoint(path, num_layers=2, embed_dim=64, heads=4, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_ckpt):
    """(model, alphabet, info) of `tiny_ckpt`."""
    return load_esm(tiny_ckpt, allow_random=True)


@pytest.fixture(scope="session")
def full_run(small_db, tiny_ckpt, tmp_path_factory) -> Path:
    """Stage 02 in full mode with `tiny_ckpt`, in blocks of 1500 residues, finalized."""
    out = tmp_path_factory.mktemp("emb") / "full"
    cfg = _stage02_config(small_db, out, tiny_ckpt, block_residues=1500)
    run_extract(cfg)
    finalize(cfg)
    return out


@pytest.fixture(scope="session")
def emb_dir(small_db, tmp_path_factory) -> Path:
    """Stage 02 in full mode with a 32-wide RANDOM ESM-2 (seed 1), where stage 03 looks for it:
    ``<root>/embeddings/esm2_t2_tiny_RANDOM_seed1_L2``."""
    root = tmp_path_factory.mktemp("cb")
    ckpt = write_random_checkpoint(root / "esm2_t2_tiny_RANDOM_seed1.pt", num_layers=2, embed_dim=32, heads=4, seed=1)
    out = root / "embeddings" / "esm2_t2_tiny_RANDOM_seed1_L2"
    cfg = _stage02_config(small_db, out, ckpt)
    run_extract(cfg)
    finalize(cfg)
    return out


@pytest.fixture(scope="session")
def train_val(emb_dir, small_db):
    """Every train and every val residue of `emb_dir` (`EmbeddingStore.residues` dicts)."""
    store, db = EmbeddingStore(emb_dir), ProteinDB(small_db)
    return store.residues(db, "train", None, 0), store.residues(db, "val", None, 0)
