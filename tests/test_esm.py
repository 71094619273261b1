"""Stage 02: ESM-2 loading (local path, by name, the weights_only trap), embedding, windows, the stage.

All with a tiny RANDOMLY INITIALISED ESM-2 written in fair-esm's own checkpoint format
(`write_random_checkpoint`): the real fair-esm loader code and forward pass run, real weights cannot
be downloaded here.
"""
import pickle
import urllib.error
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import pytest
import torch

from tokenfold import esm as E
from tokenfold.artifacts import read_json
from tokenfold.db import ProteinDB

AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "esm2_t2_tiny_RANDOM_seed0.pt"
    return E.write_random_checkpoint(path, num_layers=2, embed_dim=64, heads=4, seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    model, alphabet, info = E.load_esm(tiny_ckpt, allow_random=True)
    return model, alphabet, info


def _seqs(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(AA), int(L))) for L in rng.integers(lo, hi, n)]


# ----------------------------------------------------------------------------- loading
def test_plain_fair_esm_loader_hits_weights_only_trap_and_ours_loads(tiny_ckpt):
    import esm

    assert E.regression_path(tiny_ckpt).exists()
    # fair-esm 2.0.0's own local loader: torch >= 2.6 refuses the pickled argparse.Namespace config,
    # exactly as it refuses real ESM-2 checkpoints
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        esm.pretrained.load_model_and_alphabet_local(str(tiny_ckpt))
    model, alphabet, info = E.load_esm(tiny_ckpt, allow_random=True)
    assert isinstance(model, esm.ESM2) and not model.training
    assert (info["num_layers"], info["embed_dim"], info["attention_heads"]) == (2, 64, 4)
    assert info["random_weights"] is True and info["source"] == "local"
    # every weight came from the file (prefixes stripped as fair-esm does), contact head included
    raw = E._safe_torch_load(tiny_ckpt)["model"] | E._safe_torch_load(E.regression_path(tiny_ckpt))["model"]
    sd = model.state_dict()
    for k, v in raw.items():
        key = k.removeprefix("encoder.sentence_encoder.").removeprefix("encoder.")
        assert torch.equal(sd[key], v), key
    assert set(sd) == {k.removeprefix("encoder.sentence_encoder.").removeprefix("encoder.") for k in raw}
    # the config is pickled like the real ones: an argparse.Namespace under cfg["model"]
    assert type(E._safe_torch_load(tiny_ckpt)["cfg"]["model"]).__name__ == "Namespace"


def test_random_checkpoint_refused_unless_asked(tiny_ckpt, tmp_path):
    with pytest.raises(E.EsmLoadError, match="RANDOM"):
        E.load_esm(tiny_ckpt)
    # recognised by the marker inside the file too, whatever the file is called
    renamed = tmp_path / "esm2_t2_tiny.pt"
    renamed.write_bytes(tiny_ckpt.read_bytes())
    with pytest.raises(E.EsmLoadError, match="RANDOM"):
        E.load_esm(renamed)
    assert E.load_esm(renamed, allow_random=True)[2]["random_weights"]
    with pytest.raises(ValueError, match="RANDOM"):
        E.write_random_checkpoint(tmp_path / "esm2_t2_plain.pt")


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path):
    bad = tmp_path / "esm2_bad.pt"
    torch.save({"cfg": {"model": PurePosixPath("x")}, "model": {}}, bad)
    with pytest.raises(E.EsmLoadError, match="refusing to unpickle.*PurePosixPath"):
        E.load_esm(bad)


def test_load_by_name_uses_hub_cache_and_fails_in_one_line_without_network(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))   # torch.hub.set_dir, undone after
    calls = []

    def offline(url, dst, *a, **k):   # what this sandbox does; keeps the test hermetic where there is network
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(E.EsmLoadError) as ei:
        E.load_esm("esm2_t6_8M_UR50D")
    msg = str(ei.value)
    assert "\n" not in msg and "cannot download" in msg and "--model" in msg
    assert calls == ["https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt"]
    with pytest.raises(E.EsmLoadError, match="unknown model"):
        E.load_esm("esm3_nonsense")
    # a file already in torch hub's cache (where fair-esm downloads to) is used without network
    cached = tmp_path / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(tiny_ckpt.read_bytes())
    model, _, info = E.load_esm("esm2_t6_8M_UR50D", allow_random=True)
    assert info["source"] == "hub" and info["random_weights"] and len(calls) == 1


# ----------------------------------------------------------------------------- forward and batching
def test_fast_forward_equals_fair_esm_forward(tiny):
    model, alphabet, _ = tiny
    toks = E.tokenize(alphabet, _seqs(5, 5, 40, seed=1))      # padded batch
    assert (toks == alphabet.padding_idx).any()
    with torch.inference_mode():
        for layer in (0, 1, 2):
            ref = model(toks, repr_layers=[layer])["representations"][layer]
            got = E.forward_repr(model, toks, layer)
            keep = toks != alphabet.padding_idx
            torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-4)
    # tokenisation identical to fair-esm's BatchConverter
    seqs = ["MKXAC", "LLB", "ACDEFGHIKLMNPQRSTVWYXUZO"]
    _, _, ref_toks = alphabet.get_batch_converter()(list(zip("abc", seqs)))
    assert torch.equal(E.tokenize(alphabet, seqs), ref_toks)


def test_batching_does_not_change_results(tiny):
    model, alphabet, _ = tiny
    seqs = _seqs(12, 3, 90, seed=2) + [""]
    one = E.embed(model, alphabet, seqs, toks_per_batch=1)           # every sequence alone
    many = E.embed(model, alphabet, seqs, toks_per_batch=4096)       # padded batches
    ref = E.embed(model, alphabet, seqs, toks_per_batch=300, fast=False)   # fair-esm's forward
    assert [len(v) for v in one] == [len(s) for s in seqs] and one[-1].shape == (0, 64)
    for a, b, c in zip(one, many, ref):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4)


def test_layers_and_bad_layer(tiny):
    model, alphabet, _ = tiny
    s = _seqs(1, 20, 21, seed=3)
    last = E.embed(model, alphabet, s)[0]
    np.testing.assert_array_equal(last, E.embed(model, alphabet, s, layer=-1)[0])
    assert not np.allclose(last, E.embed(model, alphabet, s, layer=1)[0])
    with pytest.raises(ValueError):
        E.embed(model, alphabet, s, layer=3)


# ----------------------------------------------------------------------------- long sequences
@pytest.mark.parametrize("window,overlap", [(1022, 256), (16, 6), (10, 0), (9, 8)])
def test_windows_tile_every_residue_once(window, overlap):
    for L in list(range(1, 80)) + [1022, 1023, 2047, 5000]:
        ws = E.windows(L, window, overlap)
        assert ws[0][0] == 0 and ws[-1][1] == L
        cover = np.zeros(L, int)
        for s, e, a, b in ws:
            assert e - s == min(L, window) and s <= a <= b <= e
            cover[a:b] += 1
            if len(ws) > 1:       # at least overlap//2 residues of context on each side, except at the ends
                assert a == 0 or a - s >= overlap // 2
                assert b == L or e - b >= overlap // 2
        assert (cover == 1).all(), (L, ws)


def test_long_sequence_stitching(tiny):
    model, alphabet, _ = tiny
    window, overlap = 16, 6
    seq = _seqs(1, 50, 51, seed=4)[0]
    short = _seqs(1, 16, 17, seed=5)[0]
    got, got_short = E.embed(model, alphabet, [seq, short], window=window, overlap=overlap)
    assert got.shape == (50, 64)
    # a sequence within the window is embedded whole, exactly as without windows
    np.testing.assert_allclose(got_short, E.embed(model, alphabet, [short])[0], atol=1e-5)
    # every residue's vector is the one its owning window gives when embedded on its own
    for s, e, a, b in E.windows(50, window, overlap):
        alone = E.embed(model, alphabet, [seq[s:e]])[0]
        np.testing.assert_allclose(got[a:b], alone[a - s:b - s], atol=1e-5, rtol=1e-4)
    # truncation only when asked: the first `window` residues, as the model sees them alone
    trunc = E.embed(model, alphabet, [seq], window=window, truncate=True)[0]
    np.testing.assert_allclose(trunc, E.embed(model, alphabet, [seq[:window]])[0], atol=1e-5)


# ----------------------------------------------------------------------------- the stage
def _cfg(db, out, ckpt, **kw):
    return E.ExtractConfig(db=db, out=out, model=str(ckpt), random_weights_for_testing=True, **kw)


@pytest.fixture(scope="module")
def full_run(small_db, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "full"
    cfg = _cfg(small_db, out, tiny_ckpt, block_residues=1500)
    E.run_extract(cfg)
    E.finalize(cfg)
    return out


def test_stage02_output_aligned_with_db(full_run, small_db, tiny):
    model, alphabet, _ = tiny
    db = ProteinDB(small_db)
    store = E.EmbeddingStore(full_run)
    m = store.meta
    assert (m["mode"], m["layer"], m["dim"], m["dtype"], m["random_weights"]) == ("full", 2, 64, "float16", True)
    assert store.n_shards == len(db.shards)
    rep = read_json(full_run / "report.json")
    assert rep["summary"]["random_weights"] and "RANDOM" in rep["warning"] and (full_run / "report.png").exists()
    for k, dbs in enumerate(db.shards):
        sh = store.shard(k)
        assert sh.attrs["random_weights"] and sh.shape == (dbs.n_residues, 64)
        np.testing.assert_array_equal(sh.ids, dbs.ids)
        np.testing.assert_array_equal(sh.offsets, dbs.arrays["offsets"])
    rec = db.shards[1].record(3)
    direct = E.embed(model, alphabet, [rec.aa])[0]
    stored = store.shard(1).get(3)
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), direct, atol=2e-2, rtol=1e-2)  # float16 storage


def test_stage02_kill_and_resume_equals_uninterrupted(full_run, small_db, tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    cfg = _cfg(small_db, out, tiny_ckpt, block_residues=1500)
    real, calls = E.embed, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(E, "embed", dying)
    with pytest.raises(KeyboardInterrupt):
        E.run_extract(cfg)
    monkeypatch.setattr(E, "embed", real)
    assert not (out / "manifest.json").exists()
    done_parts = sorted((out / "work").glob("shard_*/part_*.npy")) + sorted(out.glob("shard_*.h5"))
    assert done_parts, "the first blocks should have survived the kill"
    assert not list(out.rglob("*.tmp*")), "no temporary files left behind"
    E.run_extract(cfg)
    E.finalize(cfg)
    for f in sorted(full_run.glob("shard_*.h5")):
        with h5py.File(f) as a, h5py.File(out / f.name) as b:
            for name in ("offsets", "emb", "n_windows"):
                np.testing.assert_array_equal(a[name][()], b[name][()])
    assert not (out / "work" / "shard_00000").exists()
    # a finished stage does nothing on re-run (the model is not even loaded)
    monkeypatch.setattr(E, "load_esm", lambda *a, **k: pytest.fail("reloaded a finished stage"))
    assert E.run_extract(cfg) == []


def test_stage02_array_tasks_then_finalize(full_run, small_db, tiny_ckpt, tmp_path):
    out = tmp_path / "array"
    cfg = _cfg(small_db, out, tiny_ckpt, block_residues=1500)
    E.run_extract(cfg, num_tasks=2, task_index=1)
    with pytest.raises(SystemExit):           # shard 0 missing: finalize refuses, naming it
        E.finalize(cfg)
    E.run_extract(cfg, num_tasks=2, task_index=0)
    E.finalize(cfg)
    with h5py.File(full_run / "shard_00001.h5") as a, h5py.File(out / "shard_00001.h5") as b:
        np.testing.assert_array_equal(a["emb"][()], b["emb"][()])


def test_stage02_residue_sample(full_run, small_db, tiny_ckpt, tmp_path):
    db = ProteinDB(small_db)
    cfg = _cfg(small_db, tmp_path / "sample", tiny_ckpt, max_residues=700, max_val_residues=300, seed=3)
    E.run_extract(cfg)
    E.finalize(cfg)
    store = E.EmbeddingStore(tmp_path / "sample")
    assert store.mode == "sample" and store.random_weights
    tr, va = store.sample("train"), store.sample("val")
    n_val = sum(len(db.get_global(int(g)).aa) for g in db.indices("val"))
    assert len(tr["entry"]) == 700 and len(va["entry"]) == min(300, n_val)
    assert {db.split_of(int(g)) for g in tr["entry"]} == {"train"}
    assert {db.split_of(int(g)) for g in va["entry"]} == {"val"}
    pairs = set(zip(tr["entry"].tolist(), tr["pos"].tolist()))
    assert len(pairs) == 700                              # without replacement
    full = E.EmbeddingStore(full_run)
    for i in range(0, 700, 97):
        g, p = int(tr["entry"][i]), int(tr["pos"][i])
        rec = db.get_global(g)
        assert chr(tr["aa"][i]) == rec.aa[p] and chr(tr["ss"][i]) == rec.ss[p]
        k, j = db.locate(g)
        np.testing.assert_allclose(tr["emb"][i].astype(np.float32), full.shard(k).get(j)[p].astype(np.float32),
                                   atol=2e-2, rtol=1e-2)
    # the same seed draws the same residues, whichever mode reads them
    again = E.sample_residues(db, "train", 700, 3)
    np.testing.assert_array_equal(np.concatenate([v[0] for v in again.values()]), tr["entry"])
    res = full.residues(db, "train", 700, 3)
    np.testing.assert_array_equal(res["entry"], tr["entry"])
    np.testing.assert_array_equal(res["pos"], tr["pos"])


def test_cli_help_and_one_line_errors(tmp_path, small_db, tiny_ckpt):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "02_extract_esm_embeddings.py", "--help"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--random-weights-for-testing" in r.stdout and "--max-residues" in r.stdout
    # a RANDOM checkpoint without the explicit flag: refused, one line, non-zero exit
    r = subprocess.run([sys.executable, "02_extract_esm_embeddings.py", "--db", str(small_db), "--model",
                        str(tiny_ckpt), "--out", str(tmp_path / "x")], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "RANDOM" in err[0], r.stderr
    assert not (tmp_path / "x" / "manifest.json").exists()
