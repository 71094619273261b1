"""Shared test fixtures. Real data only: ../shared (skipped when absent) or the embedded default."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tokenfold.fasta import read_fasta as _read_fasta

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOKENFOLD_SHARED", ROOT.parent / "shared")) / "data"
IN_CI = os.environ.get("TOKENFOLD_CI") == "1"
# a 2-layer, 64-wide `tiny`: stage 05's mechanics tests (resume, DDP) need no capacity
SMALL_MODEL = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2}


def metric_records(run_dir: Path, split: str = "train") -> list[dict]:
    """The `split` lines of a stage-05 run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def need_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a message when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p}")
    return p


# ----------------------------------------------------------------------------- stage 05 fixtures
def foldseek_chains(min_len: int = 1, max_len: int = 10**9) -> list[tuple[str, str, str]]:
    """(id, amino acids, 3Di) of the real chains in ../shared/data/foldseek_db (Foldseek's own FASTA
    dumps), in file order, unique sequences, min_len <= length <= max_len. Skips when absent."""
    db = need_shared("foldseek_db")
    aa, ss = read_fasta(db / "shared_aa.fasta"), read_fasta(db / "shared_3di.fasta")
    seen, chains = set(), []
    for name, seq in aa.items():
        if name in ss and len(ss[name]) == len(seq) and min_len <= len(seq) <= max_len and seq not in seen:
            seen.add(seq)
            chains.append((name, seq, ss[name]))
    return chains


def write_threedi_tokens(root, splits: dict, shard_size: int = 64, **layout):
    """A stage-04-format token directory (vocab.json + <split>/shard_*.bin/.idx.npz) of 3Di examples.

    splits: {"train": [(id, aa, 3di), ...], "val": [...]}; `layout`: Vocab.for_kind's interleaved=,
    direction=; returns root as a Path."""
    from tokenfold.shards import TokenShardWriter
    from tokenfold.vocab import Vocab

    root = Path(root)
    vocab = Vocab.for_kind("3di", **layout)
    vocab.save(root / "vocab.json")
    k = 0
    for split, chains in splits.items():
        for s in range(0, max(len(chains), 1), shard_size):
            w = TokenShardWriter(root, split, s // shard_size)
            for name, aa, ss in chains[s: s + shard_size]:
                w.add(vocab.encode(aa, vocab.threedi_codes(ss)), name, k, len(aa))
                k += 1
            w.close()
    return root


# ----------------------------------------------------------------------------- stage 01 fixtures
def small_db_inputs() -> list[Path]:
    """Real structure files for `small_db`: the 50 HOMSTRAD chains of ../shared (25 families x 2,
    so the MMseqs2 split has real homolog pairs to keep together), else the embedded default."""
    homstrad = SHARED / "structures" / "foldseek_regression_homstrad"
    if homstrad.is_dir():
        return sorted(homstrad.iterdir())
    from tokenfold.db_plan import embedded_default_inputs

    return embedded_default_inputs()


@pytest.fixture(scope="session")
def small_db(tmp_path_factory) -> Path:
    """A finished stage-01 DB (manifest.json, split.npy, ...) of ~50 real chains with 3Di and
    C-alpha, train/val/test all non-empty, built through the real `tokenfold.prepare.run`.
    Read it with `tokenfold.db.ProteinDB(small_db)`; do not modify it (session-scoped, shared)."""
    from tokenfold.db_plan import Inputs, PrepareOptions
    from tokenfold.prepare import run
    from tokenfold.split import SplitOptions

    out = tmp_path_factory.mktemp("small_db") / "db"
    run(Inputs(structures=[str(p) for p in small_db_inputs()]), out,
        PrepareOptions(min_length=20, items_per_shard=32),
        # easy-linclust: the same MMseqs2 split in 0.5 s instead of ~10 s of prefilter set-up
        SplitOptions(seed=0, mmseqs_mode="linclust"))
    return out


def read_fasta(path) -> dict[str, str]:
    """{first word of header: sequence} of a FASTA file."""
    return dict(_read_fasta(path))


@pytest.fixture(scope="session")
def shared_structures_db(tmp_path_factory) -> Path:
    """Stage 01 run over every file of ../shared/data/structures with Foldseek's own chain filter
    (length > 3, not all-X), to compare against Foldseek's DB of the same files. Skips when absent."""
    from tokenfold.db_plan import Inputs, PrepareOptions
    from tokenfold.prepare import run
    from tokenfold.split import SplitOptions

    structures = need_shared("structures")
    out = tmp_path_factory.mktemp("shared_db") / "db"
    run(Inputs(structures=[str(structures)]), out,
        PrepareOptions(min_length=4, max_unknown=1.0, min_plddt=0, items_per_shard=400),
        SplitOptions(seed=0, mmseqs_mode="linclust", threads=2), workers=2)
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny models are all small ops: one torch thread avoids OpenMP spin contention on a busy 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- stage 05 --init-from
@pytest.fixture(scope="session")
def random_llm(tmp_path_factory):
    """random_llm("llama" | "qwen2") -> directory of a tiny RANDOMLY INITIALISED LLM + BPE tokenizer in the
    files a Hugging Face download has (tokenfold/random_llm.py); built once per session and arch."""
    from tokenfold.random_llm import write_random_llm

    made = {}

    def get(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = write_random_llm(tmp_path_factory.mktemp("llm") / f"{arch}_RANDOM_seed0", arch)
        return made[arch]
    return get
