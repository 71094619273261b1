"""Stage 04's run on the real small DB: resume, array tasks, length policies, bad input, the CLI.
(The token kinds: test_token_kinds.py; the geo codebook fit: test_geo_fit.py.)"""
import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from tokenfold.artifacts import write_json_atomic
from tokenfold.cli import options_from_args
from tokenfold.db import ProteinDB, ProteinRecord, write_shard
from tokenfold.shards import TokenDataset
from tokenfold.tokenize import TokenizeConfig, crop_window, finalize, run
from tokenfold.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]


def tok_cfg(db, out, **kw):
    """A TokenizeConfig for tests: small geo codebooks, stored next to `out`."""
    kw.setdefault("geo_k", 64)
    kw.setdefault("geo_refine_iters", 1)
    kw.setdefault("geo_robustness_chains", 4)     # the report's robustness table: test_token_kinds pins it
    kw.setdefault("geo_codebook", str(Path(out).parent / f"geo_K{kw['geo_k']}.npz"))
    return TokenizeConfig(db=str(db), out=str(out), **kw)


def tokenize_cli_module():
    spec = importlib.util.spec_from_file_location("tokenize_cli", ROOT / "04_tokenize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tokenize_cli(*args) -> int:
    """04_tokenize.py's main() in this process (the CLI itself: argparse, defaults, exit codes)."""
    return tokenize_cli_module().main([str(a) for a in args])


def read_examples(out):
    """{split: [(id, db_index, crop_start, n_res, aa, codes)]} read back through TokenDataset + Vocab."""
    vocab = Vocab.load(out)
    res = {}
    for split in ("train", "val", "test"):
        ds = TokenDataset(out, split)
        rows = []
        for i in range(len(ds)):
            ids = ds[i].astype(np.int64)
            aa, codes = vocab.decode(ids)
            rows.append((str(ds.ids[i]), int(ds.db_index[i]), int(ds.crop_start[i]), int(ds.n_res[i]), aa, codes, ids))
        res[split] = rows
    return vocab, res


def shard_arrays(out):
    """Everything the token directory holds that a reader sees (for equality between runs)."""
    got = {}
    for p in sorted(Path(out).rglob("*")):
        rel = str(p.relative_to(out))
        if p.suffix == ".bin":
            got[rel] = p.read_bytes()
        elif rel.endswith(".idx.npz") or (rel.startswith("work/") and p.suffix == ".npz"):
            with np.load(p, allow_pickle=False) as z:
                got[rel] = {k: z[k].tolist() for k in z.files}
        elif p.name in ("manifest.json", "vocab.json", "rejects.tsv") or rel.startswith("work/"):
            got[rel] = p.read_text()
    return got


def test_resume_and_array_tasks_equal_one_uninterrupted_run(small_db, tmp_path):
    ref = tmp_path / "ref"
    run(tok_cfg(small_db, ref, kind="geo", max_length=120))
    # task 0 of 2 is killed after its first DB shard; task 1 dies mid-shard (partial files, no marker)
    out = tmp_path / "out"
    cfg = tok_cfg(small_db, out, kind="geo", max_length=120)
    run(cfg, num_tasks=2, task_index=0, max_units=1)
    (out / "train").mkdir(exist_ok=True)
    (out / "train" / "shard_00001.bin").write_bytes(b"garbage")
    (out / "train" / ".shard_00001.bin.x.tmp").write_bytes(b"left by a killed process")
    with pytest.raises(SystemExit):
        finalize(cfg)                                   # refuses: shard 1 is not done
    run(cfg, num_tasks=2, task_index=1)                 # the re-run task redoes shard 1 ...
    assert run(cfg, num_tasks=2, task_index=0) == []   # ... task 0 has nothing left to do
    finalize(cfg)
    a, b = shard_arrays(ref), shard_arrays(out)
    assert a.keys() == b.keys() and a == b
    # a finished stage is not redone ...
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert run(cfg) == [] and (out / "manifest.json").stat().st_mtime_ns == mtime
    # ... unless asked to
    cfg.overwrite = True
    assert len(run(cfg)) == len(ProteinDB(small_db).shards)


def test_length_policies(small_db, tmp_path):
    db = ProteinDB(small_db)
    lengths = {r.index: r.length for r in db}
    long = {g for g, L in lengths.items() if L > 100}
    assert long
    run(tok_cfg(small_db, tmp_path / "crop", kind="3di", max_length=100))
    _, ex = read_examples(tmp_path / "crop")
    rows = [r for rs in ex.values() for r in rs]
    assert len(rows) == len(db)
    for pid, g, crop, nres, aa, codes, ids in rows:
        rec = db.get_global(g)
        assert nres == min(rec.length, 100) and crop == crop_window(0, g, rec.length, 100)
        assert aa == rec.aa[crop:crop + nres]
    assert len({r[2] for r in rows if r[1] in long}) > 1          # windows are spread, not all at 0
    run(tok_cfg(small_db, tmp_path / "drop", kind="3di", max_length=100, long_policy="drop"))
    _, ex = read_examples(tmp_path / "drop")
    assert {r[1] for rs in ex.values() for r in rs} == set(lengths) - long
    rep = json.loads((tmp_path / "drop" / "report.json").read_text())
    assert rep["n_dropped_too_long"] == len(long)
    assert len((tmp_path / "drop" / "rejects.tsv").read_text().splitlines()) == len(long)


def test_entries_without_structure_are_skipped_and_recorded(small_db, tmp_path):
    """A DB mixing real chains with a sequence-only entry and an empty-coordinate chain."""
    db = ProteinDB(small_db)
    real = [db[i] for i in range(6)]
    recs = real + [ProteinRecord(id="seq_only", aa="MKTAYIAKQR", source="fasta", origin="x.fa")]
    root = tmp_path / "db"
    write_shard(root / "shards" / "shard_00000.h5", recs)
    write_json_atomic(root / "manifest.json", {"format": "tokenfold-db", "shards": [
        {"file": "shards/shard_00000.h5", "n_entries": len(recs)}]})
    np.save(root / "split.npy", np.array([0] * 5 + [1, 2], np.uint8))
    for kind, reason in (("3di", "no 3Di states"), ("geo", "no C-alpha coordinates")):
        out = tmp_path / kind
        run(tok_cfg(root, out, kind=kind, geo_k=16, geo_fit_max_residues=10**6))
        assert (out / "rejects.tsv").read_text() == f"seq_only\t{reason}\n"
        _, ex = read_examples(out)
        assert sum(len(v) for v in ex.values()) == 6
        assert json.loads((out / "report.json").read_text())["rejected"] == {reason: 1}
    # nothing usable: exit with one line
    np.save(root / "split.npy", np.array([3] * 6 + [0], np.uint8))
    with pytest.raises(SystemExit):
        run(tok_cfg(root, tmp_path / "none", kind="3di"))


def test_direction_round_trips_through_the_shards(small_db, tmp_path):
    """--direction struct2seq: vocab.json and the manifest say so, every example is <bos> s1..sL <sep> <aa>
    a1..aL <eos> of its DB chain, and stage 05's batches take the loss on the amino acids and <eos> only."""
    from tokenfold.data import collate
    from tokenfold.vocab import EOS, IGNORE_INDEX

    assert TokenizeConfig(kind="3di", direction="struct2seq").name == "3di_struct2seq"
    out = tmp_path / "tok"
    assert tokenize_cli("--tokens", "3di", "--direction", "struct2seq", "--db", small_db, "--out", out,
                        "--max-length", 80) == 0
    vocab, ex = read_examples(out)
    assert vocab.direction == "struct2seq" and json.loads((out / "manifest.json").read_text())["direction"] == "struct2seq"
    assert json.loads((out / "report.json").read_text())["direction"] == "struct2seq"
    db = ProteinDB(small_db)
    rows = [r for split in ex.values() for r in split]
    assert len(rows) == len(db) and any(r[3] == 80 for r in rows)    # cropped chains among them
    for pid, g, crop, n, aa, codes, ids in rows:
        rec = db[g]
        assert rec.id == pid and aa == rec.aa[crop:crop + n] and vocab.symbols(codes) == rec.ss[crop:crop + n]
        assert ids.tolist() == [1, *vocab.struct_ids(codes), 2, vocab.aa_marker_id, *vocab.aa_ids(aa), EOS]
    exs = [r[-1] for r in ex["train"][:5]]
    b = collate(exs, vocab, "padded")
    lab = b.labels.numpy()
    assert b.n_struct == sum(r[3] for r in ex["train"][:5]) == int(vocab.is_target(lab).sum())
    assert (lab[lab != IGNORE_INDEX] < vocab.struct_offset).all()          # never a structure token
    with pytest.raises(SystemExit):
        tokenize_cli("--tokens", "3di", "--db", small_db, "--out", tmp_path / "x", "--direction", "sideways")


def test_cli(small_db, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TOKENFOLD_DATA": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    h = subprocess.run([sys.executable, "04_tokenize.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert h.returncode == 0, h.stderr
    out = tmp_path / "tok"
    r = subprocess.run([sys.executable, "04_tokenize.py", "--tokens", "3di", "--db", str(small_db), "--out", str(out),
                        "--num-shards", "1"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists()
    bad = subprocess.run([sys.executable, "04_tokenize.py", "--tokens", "kanzi", "--db", str(small_db), "--out",
                          str(tmp_path / "k")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "checkpoint" in bad.stderr
    assert not (tmp_path / "k" / "manifest.json").exists()


def test_every_flag_reaches_its_setting():
    """Every flag 04_tokenize.py had before its flags were derived from TokenizeConfig (all but the
    removed --geo-wait-s) still parses, into the same setting."""
    p = tokenize_cli_module().parser()
    a = p.parse_args(["--tokens", "geo", "--interleaved", "--direction", "struct2seq", "--db", "D", "--out", "O", "--max-length", "7",
                      "--long-policy", "drop", "--seed", "3", "--overwrite", "--geo-k", "9", "--geo-codebook", "G",
                      "--geo-fit-max-residues", "11", "--geo-refine-iters", "2", "--geo-beam", "3", "--codebook", "C",
                      "--geo-robustness-chains", "6",
                      "--embeddings", "E", "--esm-model", "M", "--random-weights-for-testing", "--device", "cpu",
                      "--kanzi-checkpoint", "K", "--kanzi-decode-steps", "5", "--finalize", "--fit-geo-codebook",
                      "--refit-geo", "--num-shards", "2", "--shard-index", "1", "-v"])
    assert asdict(options_from_args(TokenizeConfig, a)) == {
        "db": "D", "kind": "geo", "interleaved": True, "direction": "struct2seq", "out": "O", "max_length": 7, "long_policy": "drop", "seed": 3,
        "overwrite": True, "geo_k": 9, "geo_codebook": "G", "geo_fit_max_residues": 11, "geo_refine_iters": 2,
        "geo_robustness_chains": 6, "geo_beam": 3, "codebook": "C", "embeddings": "E", "esm_model": "M", "random_weights_for_testing": True,
        "device": "cpu", "kanzi_checkpoint": "K", "kanzi_decode_steps": 5}
    assert (a.finalize, a.fit_geo_codebook, a.refit_geo, a.num_shards, a.shard_index, a.verbose) == \
        (True, True, True, 2, 1, True)
    assert p.parse_args(["--tokens", "esm"]).kind == "esm" and p.parse_args([]).kind == "3di"
    with pytest.raises(SystemExit):
        p.parse_args(["--geo-wait-s", "10"])
