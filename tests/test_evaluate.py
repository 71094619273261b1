"""Stage 06 end to end on the real small DB, through the real stage 04 (tokens); prediction.

- geo tokens: decoding, trace metrics next to the tokenizer ceiling, cropped examples compared with
  the right residues, PDB files superposed on the truth, pictures, bad examples skipped and recorded;
- resume: a run cut short and finished later equals an uninterrupted run; SLURM-style array tasks;
- `python -m tokenfold.predict`: FASTA in, tokens (and C-alpha PDB files) out, bad records rejected;
- struct2seq (inverse folding): recovery, substitution matrix, self-consistency; design from
  PDB/mmCIF files or 3Di strings.

What the report computes (accuracy, baselines, perplexity) is pinned on a model with known outputs in
tests/test_eval_report.py.
"""
import json
import shutil
import subprocess
import sys

import gemmi
import numpy as np
import pytest

from stage06 import ROOT, constant_checkpoint, evaluate_cli, random_checkpoint, tokenize, tsv
from tokenfold.db import ProteinDB
from tokenfold.shards import TokenDataset, TokenShardWriter
from tokenfold.vocab import Vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def without_provenance(path) -> dict:
    m = json.loads(path.read_text())
    m.pop("provenance")
    return m


def test_predict_cli(tmp_path):
    v = Vocab.for_kind("3di")
    ckpt = constant_checkpoint(v, tmp_path / "ckpt", code=3, logit=2.0)
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">good1 some title\nMKVLAAGIV\nLLK\n>empty\n>bad seq\nMKV1LL\n>good2\nmkvbzx*\n"
                     f">huge\n{'A' * 5000}\n")
    r = subprocess.run([sys.executable, "-m", "tokenfold.predict", "--checkpoint", str(ckpt), "--fasta", str(fasta),
                        "--out", str(tmp_path / "pred")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "pred" / "structure_tokens.fasta").read_text().split("\n")
    assert text[0].startswith(">good1") and len(text[1]) == 12 and set(text[1]) <= set("ACDEFGHIKLMNPQRSTVWY")
    assert text[2].startswith(">good2") and len(text[3]) == 6
    assert text[1] + text[3] == v.struct_symbols[3] * 18   # what the model always predicts
    rejects = dict(ln.split("\t") for ln in (tmp_path / "pred" / "rejects.tsv").read_text().splitlines()[1:])
    assert set(rejects) == {"empty", "bad", "huge"} and "context" in rejects["huge"]
    assert not (tmp_path / "pred" / "pdb").exists()   # 3Di is not decodable


# ----------------------------------------------------------------------------- geo: traces, crops, resume
@pytest.fixture(scope="module")
def geo_setup(small_db, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalgeo")
    tok = tokenize(small_db, root / "tokens", "geo", geo_k=32, geo_refine_iters=1,
                   geo_codebook=str(root / "geo_K32.npz"), geo_robustness_chains=0)
    ckpt = random_checkpoint(Vocab.load(tok), root / "ckpt_RANDOM")
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
    # predicted vs baseline traces: gains are differences of the means; the summary line says yes/no
    vb = s["vs_baseline_traces"]
    assert set(vb["baselines"]) == {"most_frequent", "per_aa"}
    for b, d in vb["baselines"].items():
        for metric in ("tm", "lddt"):
            assert d[f"{metric}_gain"] == pytest.approx(s["pred"][metric]["mean"] - s[f"base_{b}"][metric]["mean"])
        assert d["beats"] == (d["tm_gain"] > 0 and d["lddt_gain"] > 0)
    assert vb["beats_all"] == all(d["beats"] for d in vb["baselines"].values())
    from tokenfold.eval_report import summary_line

    assert f"beats baseline traces: {'yes' if vb['beats_all'] else 'no'} (most_frequent TM" in summary_line(m)
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


def test_each_db_shard_is_read_once_per_task(geo_setup, small_db, tmp_path, monkeypatch):
    """Many work units per DB shard; the shard's arrays are loaded once for all of them, then released."""
    from tokenfold.db import DBShard
    from tokenfold.eval_config import EvalConfig
    from tokenfold.evaluate import Evaluation

    root, tok, ckpt = geo_setup
    ev = Evaluation(EvalConfig(checkpoint=str(ckpt), out=str(tmp_path / "e"), tokens=str(tok), db=str(small_db),
                               split="train", chunk_size=2))
    todo = ev.todo_units()
    shards = {k for k, _, _ in todo}
    loads, arrays = [], DBShard.arrays.fget
    monkeypatch.setattr(DBShard, "arrays", property(lambda sh: (sh._a is None and loads.append(sh.path), arrays(sh))[1]))
    got = [(k, len(rows), skipped) for k, _, rows, skipped in ev.unit_rows(todo)]
    assert len(todo) > 2 * len(shards) and sorted(loads) == sorted(ev.db.shards[k].path for k in shards)
    assert all(ev.db.shards[k]._a is None for k in shards)                        # released after the last unit
    assert sum(n for _, n, _ in got) == len(ev.ds) and not any(s for _, _, s in got)
    assert ev.ds._columns.keys() <= {"db_index"}                                   # ids read one shard at a time


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


# ----------------------------------------------------------------------------- struct2seq: design
@pytest.fixture(scope="module")
def design_setup(small_db, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldesign")
    tok = tokenize(small_db, root / "tokens", "3di", direction="struct2seq")
    ckpt = random_checkpoint(Vocab.load(tok), root / "ckpt_RANDOM")
    fold = random_checkpoint(Vocab.for_kind("3di"), root / "fold_RANDOM")   # seq2struct, for self-consistency
    return root, tok, ckpt, fold


def test_struct2seq_recovery_substitutions_and_self_consistency(design_setup, small_db):
    """The report of a (random) designer, recomputed here from the token shards and its own files:
    recovery against the native sequences (X not scored), the 20x20 substitution matrix, recovery by
    length, the baselines of struct2seq, and the folding model's agreement with the input 3Di."""
    from tokenfold.checkpoint import load_for_inference
    from tokenfold.generate import generate

    root, tok, ckpt, fold = design_setup
    out = root / "eval"
    assert evaluate_cli("--checkpoint", ckpt, "--db", small_db, "--tokens", tok, "--out", out,
                        "--consistency-checkpoint", fold, "--repetition-penalty", "1.2") == 0
    m = json.loads((out / "metrics.json").read_text())
    t, v = m["tokens_metrics"], Vocab.load(tok)
    assert m["direction"] == "struct2seq" and m["decoding"]["repetition_penalty"] == 1.2
    assert set(t["baselines"]) == {"most_frequent", "per_struct_token", "window"} and "structure" not in m
    ds = TokenDataset(tok, "test")
    native = {str(ds.ids[i]): v.decode(ds[i]) for i in range(len(ds))}
    designs = dict(zip(*[iter((out / "predictions.fasta").read_text().split())] * 2))
    assert set(designs) == {f">{k}" for k in native} and m["n_proteins"] == len(native)
    hits, n_x = [], 0
    for pid, (aa, _) in native.items():
        d = designs[f">{pid}"]
        assert len(d) == len(aa) and set(d) <= set("ACDEFGHIKLMNPQRSTVWY")
        hits += [a == b for a, b in zip(d, aa) if b != "X"]
        n_x += aa.count("X")
    assert t["accuracy"] == pytest.approx(np.mean(hits)) and m["n_residues"] == len(hits) + n_x
    cm = np.array(m["substitution_matrix"]["counts"])
    assert cm.shape == (20, 20) and cm.sum() == len(hits) and np.trace(cm) == sum(hits)
    assert sum(b["residues"] for b in t["accuracy_by_length_per_residue"]) == len(hits)
    assert sum(b["n"] for b in t["accuracy_by_length"]) == len(native)
    # self-consistency: the seq2struct model run on the designs (and on the natives), against the input 3Di
    fmodel, fvocab = load_for_inference(fold, device="cpu")
    ids = list(native)
    for key, seqs in (("agreement_designed", [designs[f">{p}"] for p in ids]),
                      ("agreement_native", [native[p][0] for p in ids])):
        folded = generate(fmodel, fvocab, seqs)
        agree = np.concatenate([g.codes == native[p][1] for g, p in zip(folded, ids)])
        assert m["self_consistency"][key] == pytest.approx(agree.mean()), key
    rows = tsv(out / "per_protein.tsv")
    assert {"cons_agreement", "cons_native_agreement", "loglik", "acc_per_struct_token"} <= set(rows[0])
    assert all(float(r["loglik"]) < 0 for r in rows)
    for png in ("accuracy_vs_length.png", "substitution_matrix.png"):
        assert (out / png).stat().st_size > 10_000
    # the folding model must be a seq2struct model of the same tokens
    with pytest.raises(SystemExit):
        evaluate_cli("--checkpoint", ckpt, "--db", small_db, "--tokens", tok, "--out", root / "bad",
                     "--consistency-checkpoint", ckpt)


def test_predict_designs_from_structure_files_and_3di(design_setup, tmp_path):
    """Design mode: PDB/mmCIF files (3Di through mini3di) or a FASTA of 3Di strings in, a FASTA of N
    designed sequences per structure with their log-likelihoods out; bad inputs rejected."""
    from conftest import small_db_inputs
    from tokenfold.structure import parse_structure_file

    _, _, ckpt, _ = design_setup
    files = small_db_inputs()[:2]
    junk = tmp_path / "junk.pdb"
    junk.write_text("not a structure\n")
    fasta = tmp_path / "s.fa"
    fasta.write_text(">three\nDVLLPQ CDD\n>bad\nDVLB\n>empty\n")
    r = subprocess.run([sys.executable, "-m", "tokenfold.predict", "--checkpoint", str(ckpt), "--structures",
                        *map(str, files), str(junk), "--fasta", str(fasta), "--out", str(tmp_path / "d"),
                        "--num-designs", "3", "--sample", "--temperature", "0.8", "--repetition-penalty", "1.3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "d" / "designs.fasta").read_text().splitlines()
    recs = list(zip(lines[::2], lines[1::2]))
    chains = [(c.aa) for f in files for c in parse_structure_file(f).chains if len(c)]
    assert len(recs) == 3 * (len(chains) + 1)
    for head, seq in recs:
        f = dict(w.split("=") for w in head.split()[1:])
        assert head.startswith(">") and set(seq) <= set("ACDEFGHIKLMNPQRSTVWY") and int(f["L"]) == len(seq)
        assert float(f["loglik"]) < 0 and float(f["mean_loglik"]) == pytest.approx(float(f["loglik"]) / len(seq), abs=1e-3)
    assert [h.split()[1] for h, _ in recs[:3]] == ["design=1", "design=2", "design=3"]
    assert len({s for _, s in recs[:3]}) > 1                                  # sampled: different designs
    three = [s for h, s in recs if h.startswith(">three ")]
    assert len(three) == 3 and all(len(s) == 9 and "recovery=" not in h for h, s in recs if h.startswith(">three "))
    assert sorted(len(s) for h, s in recs if "recovery=" in h) == sorted(len(a) for a in chains for _ in range(3))
    rejects = dict(ln.split("\t") for ln in (tmp_path / "d" / "rejects.tsv").read_text().splitlines()[1:])
    assert set(rejects) == {"junk.pdb", "bad", "empty"}


def test_predict_designs_from_geo_tokens_of_a_structure_file(geo_setup, small_db, tmp_path):
    """A geo struct2seq checkpoint tokenizes a PDB file with its own geo codebook: the reported
    log-likelihood is the model's for the design given exactly those geo tokens."""
    import torch

    from conftest import small_db_inputs
    from tokenfold.checkpoint import load_for_inference
    from tokenfold.geotokens import GeoCodebook
    from tokenfold.predict import main
    from tokenfold.structure import parse_structure_file

    root, _, _ = geo_setup
    tok = tokenize(small_db, tmp_path / "tok", "geo", direction="struct2seq", geo_k=64, geo_refine_iters=1,
                   geo_codebook=str(root / "geo_K64.npz"))   # the geo_setup codebook (same fit: reused)
    v = Vocab.load(tok)
    ckpt = random_checkpoint(v, tmp_path / "ckpt_RANDOM")
    f = small_db_inputs()[0]
    assert main(["--checkpoint", str(ckpt), "--structures", str(f), "--out", str(tmp_path / "d")]) == 0
    head, seq = (tmp_path / "d" / "designs.fasta").read_text().splitlines()[:2]
    chain = next(c for c in parse_structure_file(f).chains if len(c))
    codes = GeoCodebook.from_vocab(v, tok).encode(chain.ca, chain.gap_before)
    model, _ = load_for_inference(ckpt, device="cpu")
    ids = torch.as_tensor(v.encode(seq, codes))
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
    on = torch.as_tensor(v.is_target(ids[1:].numpy()))
    expected = float(lp[torch.arange(len(ids) - 1), ids[1:]][on].sum())
    assert float(dict(w.split("=") for w in head.split()[1:])["loglik"]) == pytest.approx(expected, abs=2e-3)
