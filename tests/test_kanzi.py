"""The Kanzi adapter against Kanzi's own code (../shared/third_party/kanzi), with RANDOM weights.

The package is not on PyPI. `make test-kanzi` installs it into its own venv and runs this file there
(CI does; see the Makefile for why it is not .venv). Elsewhere the tests that need it skip with a
message; with TOKENFOLD_REQUIRE_KANZI=1 (what `make test-kanzi` sets) they fail instead.

Checkpoints are Kanzi's own `DAE` with random weights, saved in upstream's format
(`tokenfold.kanzi.write_random_checkpoint`); chains are real ones (Kanzi's example PDB, the small DB).
"""
import importlib.util
import json
import os
import sys
import types

import gemmi
import numpy as np
import pytest
import torch

from conftest import ROOT, SMALL_MODEL
from stage06 import evaluate_cli, tsv
from tokenfold import kanzi
from tokenfold.kanzi import (MAX_RESIDUES, RANDOM_BANNER, KanziTokenizer, KanziUnavailable, kanzi_classes,
                             load_decoder, load_kanzi_model, resolve_checkpoint, write_random_checkpoint)
from tokenfold.shards import TokenDataset
from tokenfold.vocab import Vocab

KANZI_SRC = ROOT.parent / "shared" / "third_party" / "kanzi"
STEPS = 3   # SDE steps when decoding: enough to exercise the sampler, cheap on a CPU

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def need_kanzi():
    """Kanzi's classes, or skip (fail under TOKENFOLD_REQUIRE_KANZI=1) with the reason."""
    try:
        return kanzi_classes()
    except KanziUnavailable as e:
        msg = f"Kanzi is not importable in this Python ({e}); `make test-kanzi` runs these tests with it"
        if os.environ.get("TOKENFOLD_REQUIRE_KANZI") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    need_kanzi()
    return write_random_checkpoint(tmp_path_factory.mktemp("kanzi") / "kanzi_tiny_RANDOM_seed0.pt", "tiny", seed=0)


@pytest.fixture(scope="module")
def tok(ckpt):
    return KanziTokenizer.from_checkpoint(ckpt, device="cpu", allow_random=True, n_decode_steps=STEPS, seed=0)


@pytest.fixture(scope="module")
def ca():
    """Kanzi's own example domain (6nrzA01, 155 residues), C-alpha in Angstrom as the PDB file has it."""
    st = gemmi.read_structure(str(KANZI_SRC / "pdbs" / "6nrzA01.pdb"))
    return np.array([r["CA"][0].pos.tolist() for r in st[0][0]], np.float64)


def one_line(e) -> str:
    s = str(e.value)
    assert "\n" not in s and len(s) < 600, s
    return s


# ----------------------------------------------------------------------------- adapter contracts
def test_units_centring_shapes_and_dtypes(tok, ca):
    seen = []
    encode = tok.model.encode

    def spy(x, preprocess=False):
        seen.append((x.clone(), preprocess))
        return encode(x, preprocess=preprocess)

    tok.model.encode = spy
    try:
        codes = tok.encode(ca)
        shifted = tok.encode(ca + np.array([80.0, -120.0, 35.0]))
    finally:
        del tok.model.encode
    x, preprocess = seen[0]
    assert x.dtype == torch.float32 and x.shape == (1, len(ca), 3) and preprocess is False
    np.testing.assert_allclose(x[0].numpy(), (ca - ca.mean(0)) / 10.0, atol=1e-5)   # nm, centred
    assert codes.dtype == np.int64 and codes.shape == (len(ca),) and 0 <= codes.min() and codes.max() < 1000
    np.testing.assert_array_equal(codes, shifted)                                     # centring: pose-free
    with torch.no_grad():                                                             # units are not a no-op
        *_, in_angstrom = tok.model.encode(torch.from_numpy((ca - ca.mean(0)).astype(np.float32))[None])
    assert not np.array_equal(codes, in_angstrom[0].long().numpy())
    out = tok.decode(codes)
    assert out.dtype == np.float32 and out.shape == (len(ca), 3) and np.isfinite(out).all()
    assert np.abs(out.mean(0)).max() < 1e-3                                           # centred
    torch.manual_seed(tok.seed)
    with torch.no_grad():
        nm = tok.model.decode(torch.from_numpy(codes)[None], n_steps=STEPS)[0].numpy()
    np.testing.assert_allclose(out, nm * 10.0, rtol=1e-6, atol=1e-5)                 # Angstrom out


def test_decode_is_seeded_and_leaves_the_callers_rng_alone(ckpt, tok, ca):
    codes = tok.encode(ca)
    a = tok.decode(codes)
    np.testing.assert_array_equal(a, tok.decode(codes))
    other = KanziTokenizer.from_checkpoint(ckpt, device="cpu", allow_random=True, n_decode_steps=STEPS, seed=1)
    assert not np.allclose(a, other.decode(codes))
    torch.manual_seed(5)
    r = torch.rand(3)
    torch.manual_seed(5)
    tok.decode(codes)
    assert torch.equal(r, torch.rand(3))
    assert [x.shape for x in tok.decode_many([codes[:10], codes])] == [(10, 3), (len(ca), 3)]


def test_bad_inputs(tok, ca):
    for bad in (np.full((5, 3), np.nan), np.zeros((5, 2)), np.zeros((0, 3))):
        with pytest.raises(ValueError):
            tok.encode(bad)
    with pytest.raises(ValueError, match="at most 255"):
        tok.encode(np.concatenate([ca, ca + 40.0]))                                   # 310 residues
    assert len(tok.encode(np.concatenate([ca, ca + 40.0])[:MAX_RESIDUES])) == MAX_RESIDUES
    with pytest.raises(RuntimeError):      # why: upstream's encoder mask is 256 wide (MAX_LEN in kanzi.attention)
        tok.model.encode(torch.zeros(1, 257, 3))
    for codes in ([0, 1000], [-1, 3], []):
        with pytest.raises(ValueError):
            tok.decode(codes)


# ----------------------------------------------------------------------------- loading and its errors
def test_missing_package_or_checkpoint_fails_in_one_line(tmp_path, monkeypatch):
    assert "--kanzi-checkpoint" in one_line(pytest.raises(KanziUnavailable, load_kanzi_model, None))
    assert "not found" in one_line(pytest.raises(KanziUnavailable, load_kanzi_model, tmp_path / "nope.pt"))
    ckpt = tmp_path / "cleaned_model.pt"
    torch.save({"model_cfg": {}, "model": {}}, ckpt)
    monkeypatch.setitem(sys.modules, "kanzi", None)                    # not installed
    monkeypatch.setitem(sys.modules, "kanzi.models", None)
    assert "pip install ../shared/third_party/kanzi" in one_line(pytest.raises(KanziUnavailable, load_kanzi_model, ckpt))
    broken = types.ModuleType("kanzi.models")                          # installed beside a mismatched torchvision

    def fail(name):
        raise RuntimeError("operator torchvision::nms does not exist")

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "kanzi.models", broken)
    msg = one_line(pytest.raises(KanziUnavailable, load_kanzi_model, ckpt))
    assert "torchvision::nms" in msg and "torchvision build" in msg


def test_non_kanzi_files_are_refused_in_one_line(ckpt, tmp_path):
    import argparse

    cases = {"text.pt": "not a torch file", "esm.pt": {"cfg": {}, "model": {}}, "list.pt": [1, 2],
             "pickled.pt": {"model_cfg": {}, "model": {}, "args": argparse.Namespace(a=1)},
             "cfg.pt": {"model_cfg": {"no_such_field": 1}, "model": {}}}
    for name, content in cases.items():
        p = tmp_path / name
        if isinstance(content, str):
            p.write_text(content)
        else:
            torch.save(content, p)
        msg = one_line(pytest.raises(KanziUnavailable, load_kanzi_model, p))
        assert str(p) in msg and ("not a Kanzi checkpoint" in msg or "does not build" in msg), msg
    data = torch.load(ckpt, weights_only=True)
    data["model"] = {k: v for k, v in data["model"].items() if not k.startswith("up.")}
    torch.save(data, tmp_path / "partial_RANDOM.pt")
    msg = one_line(pytest.raises(KanziUnavailable, load_kanzi_model, tmp_path / "partial_RANDOM.pt", allow_random=True))
    assert "do not fit" in msg and "up.0.weight" in msg
    msg = one_line(pytest.raises(KanziUnavailable, load_kanzi_model, ckpt))            # random: only on purpose
    assert "RANDOM" in msg and "--random-weights-for-testing" in msg


def test_upstream_format_and_the_gpt_prior(ckpt, tok, ca, tmp_path):
    DAE, _ = need_kanzi()
    data = torch.load(ckpt, weights_only=True)
    assert set(data) == {"model_cfg", "model", "tokenfold"} and data["tokenfold"]["random_weights"]
    assert tuple(data["model_cfg"]["levels"]) == (8, 5, 5, 5) and tok.n_tokens == 1000
    upstream = DAE.from_pretrained(str(ckpt)).eval()                   # Kanzi's own loader reads our file
    with torch.no_grad():
        *_, idx = upstream.encode(torch.from_numpy(ca.astype(np.float32))[None], preprocess=True)
    np.testing.assert_array_equal(idx[0].long().numpy(), tok.encode(ca))
    # a checkpoint that carries the GPT prior (gpt.* weights): the prior is dropped, the rest is the same model
    with_gpt = write_random_checkpoint(tmp_path / "kanzi_tiny_RANDOM_gpt.pt", "tiny", seed=0, gpt_prior=True)
    keys = torch.load(with_gpt, weights_only=True)["model"]
    assert any(k.startswith("gpt.") for k in keys)
    model, info = load_kanzi_model(with_gpt, allow_random=True)
    assert info["gpt_prior_dropped"] and not hasattr(model, "gpt") and not tok.info["gpt_prior_dropped"]
    np.testing.assert_array_equal(KanziTokenizer(model).encode(ca), tok.encode(ca))
    bad = dict(keys)
    bad.pop("up.0.bias")
    torch.save({**torch.load(with_gpt, weights_only=True), "model": bad}, tmp_path / "bad_RANDOM.pt")
    with pytest.raises(KanziUnavailable, match="do not fit"):
        load_kanzi_model(tmp_path / "bad_RANDOM.pt", allow_random=True)


def test_random_checkpoints_are_named_deterministic_and_resolved(ckpt, tmp_path, monkeypatch):
    again = write_random_checkpoint(tmp_path / "kanzi_tiny_RANDOM_seed0.pt", "tiny", seed=0)
    assert again.read_bytes() == ckpt.read_bytes()                     # same shape and seed, same bytes
    with pytest.raises(ValueError, match="RANDOM"):
        write_random_checkpoint(tmp_path / "kanzi_tiny.pt")
    monkeypatch.setattr(kanzi.layout, "MODELS", tmp_path / "models")
    assert resolve_checkpoint("real.pt") == "real.pt" and resolve_checkpoint(None) is None
    assert resolve_checkpoint("tiny") == "tiny"                        # a shape name only with random weights
    p = resolve_checkpoint(None, random_weights=True, seed=0)
    assert p == str(tmp_path / "models" / "kanzi_tiny_RANDOM_seed0.pt") and open(p, "rb").read() == ckpt.read_bytes()
    assert resolve_checkpoint("my_RANDOM.pt", random_weights=True) == "my_RANDOM.pt"
    tok = KanziTokenizer.from_checkpoint(p, device="cpu", allow_random=True)
    assert tok.random_weights and tok.meta["WARNING"] == RANDOM_BANNER and tok.meta["sha256"] == tok.info["sha256"]


# ----------------------------------------------------------------------------- stages 04 -> 05 -> 06
def tokenize_cli(*args) -> int:
    spec = importlib.util.spec_from_file_location("tokenize_cli", ROOT / "04_tokenize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in args])


@pytest.fixture(scope="module")
def kanzi_tokens(ckpt, small_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("kanzi_tokens") / "kanzi"
    assert tokenize_cli("--tokens", "kanzi", "--db", small_db, "--out", out, "--kanzi-checkpoint", ckpt,
                        "--random-weights-for-testing", "--kanzi-decode-steps", STEPS, "--device", "cpu") == 0
    return out


def test_stage04_kanzi_tokens(tok, ckpt, kanzi_tokens, small_db, tmp_path, capsys):
    from tokenfold.db import ProteinDB

    out = kanzi_tokens
    vocab = Vocab.load(out / "vocab.json")
    assert vocab.kind == "kanzi" and vocab.n_struct == 1000 and vocab.meta["random_weights"]
    ref = vocab.meta["kanzi"]
    assert ref["checkpoint"] == str(ckpt.resolve()) and ref["sha256"] == tok.info["sha256"]
    assert (ref["n_decode_steps"], ref["seed"], ref["random_weights"]) == (STEPS, 0, True)
    rep = json.loads((out / "report.json").read_text())
    assert rep["random_weights"] and rep["WARNING"] == RANDOM_BANNER and rep["kanzi"]["n_tokens"] == 1000
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["max_length"] == rep["max_length"] == MAX_RESIDUES       # the default 1024 capped at Kanzi's range
    db = ProteinDB(small_db)
    long_chains = sum(r.length > MAX_RESIDUES for r in db.iter())
    assert long_chains > 0 and rep["n_cropped"] == long_chains
    n = 0
    for split in ("train", "val", "test"):
        ds = TokenDataset(out, split)
        for i in range(len(ds)):
            aa, codes = vocab.decode(ds[i].astype(np.int64))
            rec = db.get_global(int(ds.db_index[i]))
            a, L = int(ds.crop_start[i]), int(ds.n_res[i])
            assert aa == rec.aa[a:a + L] and L == min(rec.length, MAX_RESIDUES)
            np.testing.assert_array_equal(codes, tok.encode(rec.ca[a:a + L]))
            n += 1
    assert n == len(db)
    # a RANDOM checkpoint is refused unless asked for; no checkpoint at all: one line naming the flag
    with pytest.raises(SystemExit) as e:
        tokenize_cli("--tokens", "kanzi", "--db", small_db, "--out", tmp_path / "k", "--kanzi-checkpoint", ckpt)
    assert e.value.code != 0
    assert "RANDOM" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "k" / "manifest.json").exists()


def test_end_to_end_on_random_weights(ckpt, kanzi_tokens, small_db, tmp_path, capsys):
    """Stage 05 on the Kanzi tokens, stage 06 decoding predictions AND the true tokens (the tokenizer's
    ceiling) with the same Kanzi checkpoint; every artifact says RANDOM WEIGHTS."""
    from tokenfold.stop import EXIT_OK
    from tokenfold.train import train
    from tokenfold.train_config import TrainConfig

    run = tmp_path / "run"
    res = train(TrainConfig(tokens=str(kanzi_tokens), out=str(run), preset="tiny", model_overrides=SMALL_MODEL,
                            max_steps=2, lr=1e-3, max_tokens=4096, eval_every=2, save_every=0, log_every=1, threads=1,
                            eval_max_examples=4))
    assert res.exit_code == EXIT_OK and Vocab.load(run / "final" / "vocab.json").meta["random_weights"]
    out = tmp_path / "eval"
    assert evaluate_cli("--checkpoint", run / "final", "--tokens", kanzi_tokens, "--db", small_db, "--out", out,
                        "--max-proteins", 3, "--n-pdb", 2, "--no-unconstrained", "--device", "cpu") == 0
    assert "evaluation: [RANDOM WEIGHTS upstream" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "kanzi" and m["n_proteins"] == 3
    assert m["random_weights_upstream"] and m["WARNING"] == RANDOM_BANNER
    for name in ("pred", "ceiling", "base_most_frequent", "base_per_aa"):
        for metric in ("rmsd", "tm", "lddt"):
            assert m["structure"][name][metric]["n"] == 3 and np.isfinite(m["structure"][name][metric]["median"])
    rows = tsv(out / "per_protein.tsv")
    assert len(rows) == 3 and all(float(r["ceiling_rmsd"]) > 0 for r in rows)
    pdbs = sorted((out / "pdb").glob("*_pred_vs_true.pdb"))
    assert len(pdbs) == 2 and "REMARK 999 RANDOM WEIGHTS" in pdbs[0].read_text()
    st = gemmi.read_structure(str(pdbs[0]))
    assert len(st[0]["A"]) == len(st[0]["B"]) > 0
    # the decoder must be the checkpoint the tokens were made with
    other = write_random_checkpoint(tmp_path / "kanzi_tiny_RANDOM_seed1.pt", "tiny", seed=1)
    with pytest.raises(KanziUnavailable, match="not the Kanzi checkpoint"):
        load_decoder(Vocab.load(kanzi_tokens / "vocab.json"), other, device="cpu")
    with pytest.raises(SystemExit) as e:
        evaluate_cli("--checkpoint", run / "final", "--tokens", kanzi_tokens, "--db", small_db, "--out",
                     tmp_path / "e2", "--max-proteins", 1, "--kanzi-checkpoint", other)
    assert e.value.code != 0 and not (tmp_path / "e2" / "metrics.json").exists()
