"""Stage 04 end to end on the real small DB: every kind round-trips through the shards, resume,
sharding, length policies, bad input, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenfold.artifacts import write_json_atomic
from tokenfold.db import ProteinDB, ProteinRecord, write_shard
from tokenfold.geotokens import GeoCodebook, segment_starts
from tokenfold.metrics import segment_rmsd
from tokenfold.shards import TokenDataset
from tokenfold.tokenize import TokenizeConfig, crop_window, ensure_geo_codebook, finalize, run
from tokenfold.vocab import BOS, EOS, Vocab

ROOT = Path(__file__).resolve().parents[1]


def _cfg(db, out, **kw):
    kw.setdefault("geo_k", 64)
    kw.setdefault("geo_refine_iters", 1)
    kw.setdefault("geo_codebook", str(Path(out).parent / f"geo_K{kw['geo_k']}.npz"))
    return TokenizeConfig(db=str(db), out=str(out), **kw)


def _examples(out):
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


def _shard_arrays(out):
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


@pytest.mark.parametrize("interleaved", [False, True])
def test_3di_roundtrip(small_db, tmp_path, interleaved):
    out = tmp_path / "tok"
    run(_cfg(small_db, out, kind="3di", interleaved=interleaved))
    db = ProteinDB(small_db)
    vocab, ex = _examples(out)
    assert vocab.kind == "3di" and vocab.interleaved == interleaved
    n = 0
    for split, rows in ex.items():
        for pid, g, crop, nres, aa, codes, ids in rows:
            rec = db.get_global(g)
            assert rec.id == pid and rec.split == split and crop == 0 and nres == rec.length
            assert aa == rec.aa and vocab.symbols(codes) == rec.ss
            if interleaved:   # <bos> <3di> a1 s1 a2 s2 ... <eos>: strictly alternating
                assert ids[0] == BOS and ids[1] == vocab.kind_id and ids[-1] == EOS
                assert vocab.is_struct(ids[3:-1:2]).all() and not vocab.is_struct(ids[2:-1:2]).any()
            n += 1
    assert n == len(db)
    mf = json.loads((out / "manifest.json").read_text())
    assert sum(v["n_examples"] for v in mf["splits"].values()) == len(db)
    rep = json.loads((out / "report.json").read_text())
    assert rep["token_frequency"]["train"]["codes_used"] > 10
    for f in rep["files"]:
        assert (out / f).stat().st_size > 1000


def test_geo_roundtrip_and_decoding(small_db, tmp_path):
    out = tmp_path / "geo"
    cfg = _cfg(small_db, out, kind="geo", geo_k=128)
    run(cfg)
    db = ProteinDB(small_db)
    vocab, ex = _examples(out)
    cb = GeoCodebook.from_vocab(vocab, out)          # what stage 06 does
    assert vocab.n_struct == cb.n_tokens == 130 and vocab.meta["geo_codebook"]["sha256"]
    # fit on train chains only
    assert set(cb.fit_index.tolist()) <= set(db.indices("train").tolist()) and len(cb.fit_index) > 10
    assert cb.meta["fit_split"] == "train"
    rmsd = []
    for split, rows in ex.items():
        for pid, g, crop, nres, aa, codes, ids in rows:
            rec = db.get_global(g)
            ca, gap = rec.ca[crop:crop + nres], rec.gap_before[crop:crop + nres]
            np.testing.assert_array_equal(codes, cb.encode(ca, gap))
            rmsd.append(segment_rmsd(cb.decode(codes), ca, segment_starts(ca, gap)))
            assert (codes == cb.BREAK).sum() == segment_starts(ca, gap).sum() - 1
    rep = json.loads((out / "report.json").read_text())
    assert np.median(rmsd) < 0.5
    assert rep["geo"]["rmsd_heldout"]["n"] == len(ex["val"]) + len(ex["test"])
    assert abs(rep["geo"]["rmsd_heldout"]["median"] - np.median(rmsd[len(ex["train"]):])) < 1e-6
    assert {"geo_rmsd_hist.png", "geo_rmsd_vs_length.png"} <= set(rep["files"])
    # a second stage run (e.g. the interleaved layout) reuses the codebook; other fit settings refit it
    before = Path(cfg.geo_path).stat().st_mtime_ns
    il = _cfg(small_db, tmp_path / "geo_il", kind="geo", geo_k=128, interleaved=True)
    assert ensure_geo_codebook(il).meta == cb.meta and Path(cfg.geo_path).stat().st_mtime_ns == before
    il.geo_refine_iters = 0
    assert ensure_geo_codebook(il).meta["refine_iters"] == 0


def test_resume_and_array_tasks_equal_one_uninterrupted_run(small_db, tmp_path):
    ref = tmp_path / "ref"
    run(_cfg(small_db, ref, kind="geo", max_length=120))
    # task 0 of 2 is killed after its first DB shard; task 1 dies mid-shard (partial files, no marker)
    out = tmp_path / "out"
    cfg = _cfg(small_db, out, kind="geo", max_length=120)
    run(cfg, num_tasks=2, task_index=0, max_units=1)
    (out / "train").mkdir(exist_ok=True)
    (out / "train" / "shard_00001.bin").write_bytes(b"garbage")
    (out / "train" / ".shard_00001.bin.x.tmp").write_bytes(b"left by a killed process")
    with pytest.raises(SystemExit):
        finalize(cfg)                                   # refuses: shard 1 is not done
    run(cfg, num_tasks=2, task_index=1)                 # the re-run task redoes shard 1 ...
    assert run(cfg, num_tasks=2, task_index=0) == []   # ... task 0 has nothing left to do
    finalize(cfg)
    a, b = _shard_arrays(ref), _shard_arrays(out)
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
    run(_cfg(small_db, tmp_path / "crop", kind="3di", max_length=100))
    _, ex = _examples(tmp_path / "crop")
    rows = [r for rs in ex.values() for r in rs]
    assert len(rows) == len(db)
    for pid, g, crop, nres, aa, codes, ids in rows:
        rec = db.get_global(g)
        assert nres == min(rec.length, 100) and crop == crop_window(0, g, rec.length, 100)
        assert aa == rec.aa[crop:crop + nres]
    assert len({r[2] for r in rows if r[1] in long}) > 1          # windows are spread, not all at 0
    run(_cfg(small_db, tmp_path / "drop", kind="3di", max_length=100, long_policy="drop"))
    _, ex = _examples(tmp_path / "drop")
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
        run(_cfg(root, out, kind=kind, geo_k=16, geo_fit_max_residues=10**6))
        assert (out / "rejects.tsv").read_text() == f"seq_only\t{reason}\n"
        _, ex = _examples(out)
        assert sum(len(v) for v in ex.values()) == 6
        assert json.loads((out / "report.json").read_text())["rejected"] == {reason: 1}
    # nothing usable: exit with one line
    np.save(root / "split.npy", np.array([3] * 6 + [0], np.uint8))
    with pytest.raises(SystemExit):
        run(_cfg(root, tmp_path / "none", kind="3di"))


def test_cli(small_db, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TOKENFOLD_DATA": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    h = subprocess.run([sys.executable, "04_tokenize.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert h.returncode == 0
    for flag in ("--tokens", "--interleaved", "--db", "--out", "--max-length", "--long-policy", "--finalize",
                 "--geo-k", "--geo-codebook", "--codebook", "--embeddings", "--kanzi-checkpoint", "--num-shards"):
        assert flag in h.stdout
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


def test_esm_roundtrip_stored_and_on_the_fly(small_db, tmp_path):
    """esm kind with a tiny RANDOM ESM-2: vectors from a full stage-02 store, and computed on the fly."""
    from tokenfold.codebook import Codebook
    from tokenfold.codebook_fit import fit_codebook
    from tokenfold.embedding_store import EmbeddingStore
    from tokenfold.esm_checkpoint import load_esm, write_random_checkpoint
    from tokenfold.esm_embed import embed
    from tokenfold.extract import ExtractConfig, run_extract
    from tokenfold.extract import finalize as esm_finalize

    ck = write_random_checkpoint(tmp_path / "esm2_t2_RANDOM_test.pt", num_layers=2, embed_dim=32, heads=4)
    emb = tmp_path / "emb"
    ecfg = ExtractConfig(db=Path(small_db), out=emb, model=str(ck), layer=2, random_weights_for_testing=True)
    run_extract(ecfg)
    esm_finalize(ecfg)
    store = EmbeddingStore(emb)
    db = ProteinDB(small_db)
    km = fit_codebook(store.residues(db, "train")["emb"], k=16, seed=0, n_init=1)
    cb = Codebook(km.centroids, {"esm_model": store.meta["model"], "esm_model_path": str(ck), "layer": 2,
                                 "random_weights": True, "embeddings_dir": str(emb), "normalize": False})
    cbp = cb.save(tmp_path / "codebook_K16.pkl")
    with pytest.raises(ValueError, match="RANDOM"):
        run(_cfg(small_db, tmp_path / "refused", kind="esm", codebook=str(cbp)))
    stored, fly = tmp_path / "esm_store", tmp_path / "esm_fly"
    run(_cfg(small_db, stored, kind="esm", codebook=str(cbp), random_weights_for_testing=True, max_length=150))
    run(_cfg(small_db, fly, kind="esm", codebook=str(cbp), embeddings=str(tmp_path / "no_store"),
             random_weights_for_testing=True, interleaved=True, max_length=150))
    model, alphabet, _ = load_esm(ck, allow_random=True)
    (vs, ex_s), (vf, ex_f) = _examples(stored), _examples(fly)
    assert vs.meta["esm_codebook"]["random_weights"] and "RANDOM" in json.loads((stored / "report.json").read_text())["WARNING"]
    assert vs.meta["esm_codebook"]["vectors"] == str(emb) and "on the fly" in vf.meta["esm_codebook"]["vectors"]
    recs = [db[i] for i in (0, len(db) // 2, len(db) - 1)]      # exact check of on-the-fly codes on a few
    vectors = dict(zip([r.index for r in recs], embed(model, alphabet, [r.aa for r in recs], layer=2)))
    agree = []
    for split in ("train", "val", "test"):
        assert [r[:5] for r in ex_s[split]] == [r[:5] for r in ex_f[split]]
        for (pid, g, crop, n, aa, cs, _), (*_, cf, _) in zip(ex_s[split], ex_f[split]):
            k, j = db.locate(g)
            np.testing.assert_array_equal(cs, cb.assign(store.shard(k).get(j))[crop:crop + n])
            if g in vectors:
                np.testing.assert_array_equal(cf, cb.assign(vectors[g])[crop:crop + n])
            agree.append((cs == cf).mean())
    assert np.mean(agree) > 0.95          # stored float16 vs on-the-fly float32 vectors: same codes almost always
