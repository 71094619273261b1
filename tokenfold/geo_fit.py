"""The geo codebook of stage 04: fit once on TRAIN chains, before any DB shard is tokenized.

A stored codebook is reused when its fit key (`geo_fit_key`: DB manifest checksum, K, seed, sample
size, refinement steps, geotokens version) matches this DB and these settings, and refit otherwise.
Fitting is seeded and the file bytes are deterministic; it is written atomically.

Who fits (`codebook_for_task`): the fit step (``04_tokenize.py --tokens geo --fit-geo-codebook``) and a
single-task run fit when needed; an array task never fits nor waits: without a matching codebook it
stops with one line that names the fit step. Files: see data/README.md, section stage 04.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .artifacts import sha256_file
from .cli import die
from .db import SPLIT_CODES, ProteinDB
from .geotokens import VERSION as GEO_VERSION
from .geotokens import GeoCodebook

if TYPE_CHECKING:
    from .tokenize import TokenizeConfig

log = logging.getLogger("tokenfold.geo_fit")


def geo_fit_key(cfg: TokenizeConfig) -> dict:
    """Everything the fitted codebook depends on; a stored codebook with another key is refit."""
    return {"db_manifest_sha256": sha256_file(Path(cfg.db) / "manifest.json"), "K": cfg.geo_k, "seed": cfg.seed,
            "max_residues": cfg.geo_fit_max_residues, "refine_iters": cfg.geo_refine_iters, "version": GEO_VERSION}


def sample_train_chains(db: ProteinDB, max_residues: int, seed: int) -> tuple[list, np.ndarray]:
    """TRAIN chains with C-alpha, in a seeded random order of shards and entries, until `max_residues`.

    Reads only as many DB shards as needed. Returns ([(ca, gap_before)], global indices).
    """
    rng = np.random.default_rng([seed, 4])
    chains, index, total = [], [], 0
    for k in rng.permutation(len(db.shards)):
        shard = db.shards[int(k)]
        codes = np.asarray(db.split_codes[db.shard_starts[k]:db.shard_starts[k + 1]])
        has_ca = shard.arrays["has_ca"]
        for j in rng.permutation(np.flatnonzero((codes == SPLIT_CODES["train"]) & has_ca)):
            rec = shard.record(int(j))
            if not np.isfinite(rec.ca).all():
                continue
            chains.append((rec.ca, rec.gap_before))
            index.append(rec.index)
            total += rec.length
            if total >= max_residues:
                break
        shard.release()
        if total >= max_residues:
            break
    return chains, np.array(index, dtype=np.int64)


def stored_geo_codebook(cfg: TokenizeConfig) -> GeoCodebook | None:
    """The codebook at ``cfg.geo_path`` when it was fit for this DB and these settings, else None."""
    path = cfg.geo_path
    if not path.exists():
        return None
    cb = GeoCodebook.load(path)
    return cb if cb.meta.get("fit_key") == geo_fit_key(cfg) else None


def ensure_geo_codebook(cfg: TokenizeConfig, refit: bool = False) -> GeoCodebook:
    """The stored codebook fit for this DB and these settings, or (also when `refit`) a new fit on
    TRAIN chains, saved to ``cfg.geo_path``."""
    cb = None if refit else stored_geo_codebook(cfg)
    if cb is not None:
        return cb
    path = cfg.geo_path
    if path.exists() and not refit:
        log.info("%s was fit with other settings or another DB; refitting", path)
    db = ProteinDB(cfg.db)
    t = time.time()
    chains, index = sample_train_chains(db, cfg.geo_fit_max_residues, cfg.seed)
    if not chains:
        die(f"{cfg.db}: no train chains with C-alpha coordinates to fit the geo codebook on")
    log.info("fitting geo codebook K=%d on %d train chains (%d residues)", cfg.geo_k, len(chains),
             sum(len(c) for c, _ in chains))
    cb = GeoCodebook.fit(chains, K=cfg.geo_k, seed=cfg.seed, max_residues=cfg.geo_fit_max_residues,
                         refine_iters=cfg.geo_refine_iters,
                         meta={"fit_key": geo_fit_key(cfg), "fit_split": "train", "db": str(Path(cfg.db).resolve())})
    cb.fit_index = index
    cb.save(path)
    log.info("geo codebook saved to %s (%.1fs)", path, time.time() - t)
    return GeoCodebook.load(path)


def codebook_for_task(cfg: TokenizeConfig, num_tasks: int) -> GeoCodebook:
    """A single task fits the codebook when needed; an array task (`num_tasks` > 1) only loads a
    matching one, or exits with one line naming the fit step."""
    if num_tasks == 1:
        return ensure_geo_codebook(cfg)
    cb = stored_geo_codebook(cfg)
    if cb is None:
        die(f"geo codebook {cfg.geo_path} is not fitted for this DB and settings: "
            "run 04_tokenize.py --tokens geo --fit-geo-codebook first")
    return cb
