"""Stage 06 end to end on the real small DB, through the real stages 04 (tokens) and 05 (training).

- a tiny-preset checkpoint trained here on real proteins beats both 3Di baselines on proteins it saw;
- geo tokens: decoding, trace metrics next to the tokenizer ceiling, cropped examples compared with
  the right residues, PDB files superposed on the truth, pictures, bad examples skipped and recorded;
- resume: a run cut short and finished later equals an uninterrupted run; SLURM-style array tasks;
- `python -m tokenfold.predict`: FASTA in, tokens (and C-alpha PDB files) out, bad records rejected.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gemmi
import numpy as np
import pytest

from tokenfold.db import ProteinDB
from tokenfold.shards import TokenDataset, TokenShardWriter
from tokenfold.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 64  # stage-04 crop: most small-DB chains are longer, so cropped examples are the rule here


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def evaluate_cli(*args) -> int:
    """06_evaluate.py's main() in this process (the CLI itself: argparse, defaults, exit codes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "06_evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in args])


def tokenize(db, out, kind, **kw):
    from tokenfold.tokenize import TokenizeConfig, run

    run(TokenizeConfig(db=str(db), kind=kind, out=str(out), max_length=MAX_LEN, **kw))
    return Path(out)


def subset_tokens(src: Path, dst: Path, n: int, splits=("train", "val")) -> Path:
    """A token dir whose `splits` are all the first n train examples of `src` (same vocabulary,
    same db_index / crop_start): a handful of proteins a tiny model can learn in seconds."""
    ds = TokenDataset(src, "train")
    dst.mkdir(parents=True)
    shutil.copy(src / "vocab.json", dst / "vocab.json")
    for split in splits:
        w = TokenShardWriter(dst, split, 0)
        for i in range(n):
            w.add(ds[i], str(ds.ids[i]), int(ds.db_index[i]), int(ds.n_res[i]), int(ds.crop_start[i]))
        w.close()
    return dst


def random_checkpoint(vocab_dir: Path, out: Path) -> Path:
    """A RANDOMLY INITIALISED tiny checkpoint (stage 05 format): exercises the machinery, not learning."""
    from tokenfold.model import build_config, build_model

    v = Vocab.load(vocab_dir)
    m = build_model(build_config("tiny", v, {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}),
                    seed=0)
    m.save_pretrained(out)
    v.save(out / "vocab.json")
    return out


def tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]


def without_provenance(path: Path) -> dict:
    m = json.loads(path.read_text())
    m.pop("provenance")
    return m


# ----------------------------------------------------------------------------- a trained 3Di model
@pytest.fixture(scope="module")
def trained_3di(small_db, tmp_path_factory):
    from tokenfold.train import train
    from tokenfold.train_config import TrainConfig

    root = tmp_path_factory.mktemp("eval3di")
    tok = subset_tokens(tokenize(small_db, root / "tokens_all", "3di"), root / "tokens", n=6)
    res = train(TrainConfig(tokens=str(tok), out=str(root / "run"), preset="tiny", max_steps=50, lr=3e-3,
                            warmup_steps=5, weight_decay=0.0, max_tokens=4096, eval_every=0, log_every=20,
                            save_every=0, threads=1))
    assert res.exit_code == 0 and res.final_dir is not None
    return root, tok, res.final_dir


def test_trained_model_beats_both_3di_baselines_on_proteins_it_saw(trained_3di, small_db):
    root, tok, ckpt = trained_3di
    out = root / "eval"
    assert evaluate_cli("--checkpoint", ckpt, "--tokens", tok, "--db", small_db, "--out", out, "--split", "train") == 0
    m = json.loads((out / "metrics.json").read_text())
    t = m["tokens_metrics"]
    assert m["n_proteins"] == 6 and m["n_skipped"] == 0 and m["kind"] == "3di"
    assert set(t["baselines"]) == {"most_frequent", "per_aa", "window"}
    assert t["accuracy"] > t["baselines"]["most_frequent"]["accuracy"]
    assert t["accuracy"] > t["baselines"]["per_aa"]["accuracy"]
    assert t["beats_baselines"]["most_frequent"] and t["beats_baselines"]["per_aa"]
    assert t["perplexity"] < 20  # below the uniform 20-letter guess; a learned model
    # the confusion matrix counts every evaluated residue, its diagonal is the accuracy
    cm = np.array(m["confusion_matrix"]["counts"])
    assert cm.sum() == m["n_residues"] and np.trace(cm) / cm.sum() == pytest.approx(t["accuracy"])
    rows = tsv(out / "per_protein.tsv")
    assert len(rows) == 6 and all(int(r["length"]) <= MAX_LEN for r in rows)
    assert any(int(r["crop_start"]) > 0 for r in rows)
    # predictions.fasta holds exactly one 3Di letter per residue
    pred = (out / "predictions.fasta").read_text().split("\n")
    assert [len(s) for s in pred[1::2] if s] == [int(r["length"]) for r in rows]
    for png in ("accuracy_vs_length.png", "confusion_3di.png"):
        assert (out / png).stat().st_size > 10_000
    # the unconstrained rates are the means of the per-protein columns
    assert m["unconstrained"]["validity_rate"] == pytest.approx(np.mean([int(r["unc_valid"]) for r in rows]))
    assert m["unconstrained"]["length_match_rate"] == pytest.approx(np.mean([int(r["unc_length_match"]) for r in rows]))
    # finished: a re-run does nothing
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert evaluate_cli("--checkpoint", ckpt, "--tokens", tok, "--db", small_db, "--out", out, "--split", "train") == 0
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


def test_predict_cli(trained_3di, tmp_path):
    _, _, ckpt = trained_3di
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">good1 some title\nMKVLAAGIV\nLLK\n>empty\n>bad seq\nMKV1LL\n>good2\nmkvbzx*\n"
                     f">huge\n{'A' * 5000}\n")
    r = subprocess.run([sys.executable, "-m", "tokenfold.predict", "--checkpoint", str(ckpt), "--fasta", str(fasta),
                        "--out", str(tmp_path / "pred")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "pred" / "structure_tokens.fasta").read_text().split("\n")
    assert text[0].startswith(">good1") and len(text[1]) == 12 and set(text[1]) <= set("ACDEFGHIKLMNPQRSTVWY")
    assert text[2].startswith(">good2") and len(text[3]) == 6
    rejects = dict(ln.split("\t") for ln in (tmp_path / "pred" / "rejects.tsv").read_text().splitlines()[1:])
    assert set(rejects) == {"empty", "bad", "huge"} and "context" in rejects["huge"]
    assert not (tmp_path / "pred" / "pdb").exists()   # 3Di is not decodable


# ----------------------------------------------------------------------------- geo: traces, crops, resume
@pytest.fixture(scope="module")
def geo_setup(small_db, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalgeo")
    tok = tokenize(small_db, root / "tokens", "geo", geo_k=64, geo_refine_iters=1,
                   geo_codebook=str(root / "geo_K64.npz"))
    ckpt = random_checkpoint(tok, root / "ckpt_RANDOM")
    return root, tok, ckpt


def test_geo_traces_ceiling_crops_and_pdb(geo_setup, small_db):
    root, tok, ckpt = geo_setup
    out = root / "eval"
    assert evaluate_cli("--checkpoint", ckpt, "--tokens", tok, "--db", small_db, "--out", out, "--n-pdb", "3") == 0
    m = json.loads((out / "metrics.json").read_text())
    n_test = len(TokenDataset(tok, "test"))
    assert m["n_proteins"] == n_test and m["kind"] == "geo"
    s = m["structure"]
    for name in ("pred", "ceiling", "base_most_frequent", "base_per_aa"):
        assert s[name]["rmsd"]["n"] == n_test and s[name]["tm"]["n"] == n_test
    rows = tsv(out / "per_protein.tsv")
    assert any(int(r["crop_start"]) > 0 for r in rows)
    # decoding the TRUE tokens lands on the true C-alpha of the same (cropped) residues of the DB
    # (a wrong crop offset would give RMSDs of many A here); across a chain break only each segment
    # is placed (geo tokens carry no pose across a gap), hence rmsd_seg
    for r in rows:
        assert float(r["ceiling_rmsd_seg"]) < 1.5, r
        if int(r["n_breaks"]) == 0:
            assert float(r["ceiling_rmsd"]) == float(r["ceiling_rmsd_seg"]) < 1.5 and float(r["ceiling_tm"]) > 0.8, r
    assert s["ceiling"]["tm"]["mean"] > s["pred"]["tm"]["mean"]      # a random model is far from the truth
    # PDB files: chain A the truth (DB coordinates of the cropped residues), chain B superposed prediction
    pdbs = sorted((out / "pdb").glob("*_pred_vs_true.pdb"))
    assert len(pdbs) == 3 and m["pdb_files"] == 3
    db = ProteinDB(small_db)
    for p in pdbs:
        st = gemmi.read_structure(str(p))
        a, b = st[0]["A"], st[0]["B"]
        row = next(r for r in rows if p.name.startswith(r["id"]))
        rec = db.get_global(int(row["db_index"]))
        c0 = int(row["crop_start"])
        true = rec.ca[c0:c0 + int(row["length"])]
        got = np.array([res[0].pos.tolist() for res in a])
        assert len(a) == len(b) == len(true) and np.allclose(got, true, atol=1e-3)
        pred = np.array([res[0].pos.tolist() for res in b])
        from tokenfold.metrics import rmsd

        # chain B is already superposed: its plain RMSD to the truth equals the optimal one
        plain = np.sqrt(np.mean(np.sum((pred - got) ** 2, 1)))
        assert plain == pytest.approx(float(row["rmsd"]), abs=2e-3) == pytest.approx(rmsd(pred, got), abs=2e-3)
    for png in ("accuracy_vs_length.png", "rmsd_tm_vs_length.png", "rmsd_tm_hist.png", "ca_traces_3d.png"):
        assert (out / png).stat().st_size > 10_000


def test_bad_examples_are_skipped_and_recorded(geo_setup, small_db, tmp_path):
    root, tok, ckpt = geo_setup
    bad = tmp_path / "tokens"
    shutil.copytree(tok / "train", bad / "train")   # the baselines' train split
    shutil.copy(tok / "vocab.json", bad / "vocab.json")
    ds = TokenDataset(tok, "test")
    w = TokenShardWriter(bad, "test", 0)
    w.add(ds[0], str(ds.ids[0]), int(ds.db_index[0]), int(ds.n_res[0]), int(ds.crop_start[0]))       # good
    w.add(ds[1], str(ds.ids[1]), int(ds.db_index[1]), int(ds.n_res[1]), int(ds.crop_start[1]) + 1)   # wrong crop
    w.add(ds[2], "not_this_protein", int(ds.db_index[2]), int(ds.n_res[2]), int(ds.crop_start[2]))   # wrong id
    w.close()
    assert evaluate_cli("--checkpoint", ckpt, "--tokens", bad, "--db", small_db, "--out", tmp_path / "e",
                        "--split", "test", "--no-unconstrained") == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n_proteins"] == 1 and m["n_skipped"] == 2
    reasons = {s["id"]: s["reason"] for s in m["skipped"]}
    assert "differ" in reasons[str(ds.ids[1])] and "token shard says" in reasons["not_this_protein"]
    assert len((tmp_path / "e" / "skipped.tsv").read_text().splitlines()) == 3


def test_resume_and_array_tasks_equal_one_uninterrupted_run(geo_setup, small_db, tmp_path):
    root, tok, ckpt = geo_setup
    common = ["--checkpoint", ckpt, "--tokens", tok, "--db", small_db, "--chunk-size", "2", "--split", "val",
              "--sample", "--temperature", "1.3", "--top-k", "20", "--seed", "5"]
    ref = tmp_path / "ref"
    assert evaluate_cli(*common, "--out", ref) == 0
    n_db_shards = len(ProteinDB(small_db).shards)
    assert n_db_shards >= 2
    # 1. a run killed after some parts: the parts exist, the report does not; re-running finishes it
    cut = tmp_path / "cut"
    assert evaluate_cli(*common, "--out", cut, "--num-shards", str(n_db_shards), "--shard-index", "0") == 0
    parts = sorted((cut / "work").glob("part_*.npz"))
    assert parts and not (cut / "metrics.json").exists()
    first = parts[0].stat().st_mtime_ns
    assert evaluate_cli(*common, "--out", cut) == 0
    assert parts[0].stat().st_mtime_ns == first                       # finished parts were not redone
    # 2. an array of tasks, then --finalize
    arr = tmp_path / "arr"
    for i in range(2):
        assert evaluate_cli(*common, "--out", arr, "--num-shards", "2", "--shard-index", str(i)) == 0
    assert evaluate_cli(*common, "--out", arr, "--finalize") == 0
    for d in (cut, arr):
        assert (d / "per_protein.tsv").read_text() == (ref / "per_protein.tsv").read_text()
        assert (d / "predictions.fasta").read_text() == (ref / "predictions.fasta").read_text()
        assert without_provenance(d / "metrics.json") == without_provenance(ref / "metrics.json")
    # a different configuration in the same directory is refused; --overwrite starts again
    other = [*common[:-1], "6", "--out", cut]
    with pytest.raises(SystemExit) as e:
        evaluate_cli(*other)
    assert e.value.code != 0
    assert evaluate_cli(*other, "--overwrite") == 0
    assert (cut / "predictions.fasta").read_text() != (ref / "predictions.fasta").read_text()


def test_predict_geo_writes_ca_pdb_files(geo_setup, tmp_path):
    from tokenfold.predict import main

    _, _, ckpt = geo_setup
    fasta = tmp_path / "in.fa"
    fasta.write_text(">p1\nMKVLAAGIVLLK\n>p2/odd:name\nGSHMW\n")
    assert main(["--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(tmp_path / "pred")]) == 0
    text = (tmp_path / "pred" / "structure_tokens.fasta").read_text().split("\n")
    assert text[0].startswith(">p1 kind=geo L=12") and len(text[1].split()) == 12
    st = gemmi.read_structure(str(tmp_path / "pred" / "pdb" / "p2_odd_name.pdb"))
    ca = [res[0] for res in st[0]["A"]]
    assert [a.name for a in ca] == ["CA"] * 5 and gemmi.one_letter_code([r.name for r in st[0]["A"]]).upper() == "GSHMW"
