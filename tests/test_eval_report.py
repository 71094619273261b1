"""What stage 06 reports, pinned on a model whose outputs are known (real small DB, real stage 04).

The model gives the same logits whatever it reads: z for one structure code c, 0 for every other
token (tests/stage06.py, `constant_checkpoint`), and c is the train split's most frequent code. So,
computed here from the token shards alone:

- greedy and teacher-forced predictions are c everywhere: accuracy = the fraction of true codes equal
  to c, which is exactly the most-frequent-token baseline's accuracy (not beaten);
- perplexity = exp(mean NLL) with p(c) = e^z / S and p(any other token) = 1 / S, S = e^z + V - 1;
- unconstrained decoding never ends: every output is valid, none has the right length;
- the per-amino-acid baseline is the train split's most frequent code of each amino acid.
"""
import json

import numpy as np
import pytest

from stage06 import MAX_LEN, constant_checkpoint, evaluate_cli, tokenize, tsv
from tokenfold.baselines import aa_index
from tokenfold.eval_report import summary_line
from tokenfold.shards import TokenDataset
from tokenfold.vocab import AA_LETTERS, Vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")

Z = 2.0  # the constant model's logit of its code


def examples(tok, split) -> dict[str, tuple[str, np.ndarray]]:
    """id -> (amino acids, structure codes) of the token examples of `split`."""
    v, ds = Vocab.load(tok), TokenDataset(tok, split)
    return {str(ds.ids[i]): v.decode(ds[i]) for i in range(len(ds))}


@pytest.fixture(scope="module")
def known(small_db, tmp_path_factory):
    root = tmp_path_factory.mktemp("report3di")
    tok = tokenize(small_db, root / "tokens", "3di")
    v = Vocab.load(tok)
    train = examples(tok, "train")
    c = int(np.argmax(np.bincount(np.concatenate([x for _, x in train.values()]), minlength=v.n_struct)))
    ckpt = constant_checkpoint(v, root / "ckpt", code=c, logit=Z)
    out = root / "eval"
    assert evaluate_cli("--checkpoint", ckpt, "--tokens", tok, "--db", small_db, "--out", out) == 0
    return tok, ckpt, out, v, c, train, examples(tok, "test")


def test_accuracy_perplexity_and_baselines_of_a_known_model(known, small_db):
    tok, ckpt, out, v, c, train, test = known
    m = json.loads((out / "metrics.json").read_text())
    t = m["tokens_metrics"]
    true = np.concatenate([x for _, x in test.values()])
    assert m["n_proteins"] == len(test) and m["n_skipped"] == 0 and m["kind"] == "3di"
    assert m["n_residues"] == len(true)
    assert set(t["baselines"]) == {"most_frequent", "per_aa", "window"}
    # the model predicts c everywhere, which is also what the most-frequent-token baseline predicts
    assert t["accuracy"] == pytest.approx(np.mean(true == c))
    assert t["teacher_forced_accuracy"] == pytest.approx(np.mean(true == c))
    assert t["baselines"]["most_frequent"]["accuracy"] == pytest.approx(t["accuracy"])
    assert not t["beats_baselines"]["most_frequent"]
    best = max(t["baselines"], key=lambda b: t["baselines"][b]["accuracy"])
    assert not t["beats_all_baselines"] and t["margin_over_best_baseline"]["baseline"] == best
    assert t["margin_over_best_baseline"]["points"] == pytest.approx(
        100 * (t["accuracy"] - t["baselines"][best]["accuracy"]))
    line = summary_line(m)   # free-running first, teacher-forced beside it, the verdict with its margin
    assert line.index("free-running (greedy) accuracy") < line.index("teacher-forced")
    assert f"beats baselines: no ({t['margin_over_best_baseline']['points']:+.1f} points vs {best})" in line
    # per amino acid: its most frequent train code (an amino acid absent from train: c)
    joint = np.zeros((len(AA_LETTERS), v.n_struct), int)
    for aa, x in train.values():
        np.add.at(joint, (aa_index(aa), x), 1)
    table = np.where(joint.sum(1) > 0, joint.argmax(1), c)
    per_aa = np.concatenate([table[aa_index(aa)] for aa, _ in test.values()])
    assert t["baselines"]["per_aa"]["accuracy"] == pytest.approx(np.mean(per_aa == true))
    # perplexity over the structure tokens and <eos> of every test example, full vocabulary
    S = np.exp(Z) + v.size - 1
    n_targets, n_c = len(true) + len(test), int(np.sum(true == c))
    assert t["perplexity"] == pytest.approx(S * np.exp(-Z * n_c / n_targets), rel=1e-4)
    # the confusion matrix counts every evaluated residue, its diagonal is the accuracy
    cm = np.array(m["confusion_matrix"]["counts"])
    assert cm.sum() == m["n_residues"] and np.trace(cm) / cm.sum() == pytest.approx(t["accuracy"])
    assert cm[:, c].sum() == cm.sum()                     # every residue predicted as c
    # per protein: the same numbers protein by protein
    rows = tsv(out / "per_protein.tsv")
    assert len(rows) == len(test) and all(int(r["length"]) <= MAX_LEN for r in rows)
    assert any(int(r["crop_start"]) > 0 for r in rows)
    assert sorted(r["id"] for r in rows) == sorted(test)
    for r in rows:
        x = test[r["id"]][1]
        assert int(r["length"]) == len(x)
        assert float(r["accuracy"]) == pytest.approx(np.mean(x == c), abs=1e-4)
        assert float(r["perplexity"]) == pytest.approx(S * np.exp(-Z * np.sum(x == c) / (len(x) + 1)), abs=1e-3)
        assert int(r["unc_n_struct"]) == len(x) + max(8, len(x) // 8)   # ran to its budget, never <eos>
    # predictions.fasta holds exactly one 3Di letter per residue: c's
    pred = (out / "predictions.fasta").read_text().split("\n")
    assert pred[1::2][:len(rows)] == [v.struct_symbols[c] * int(r["length"]) for r in rows]
    for png in ("accuracy_vs_length.png", "confusion_3di.png"):
        assert (out / png).stat().st_size > 10_000
    # unconstrained: only structure tokens, never the end: all valid, no length match
    assert m["unconstrained"]["validity_rate"] == 1.0 and m["unconstrained"]["length_match_rate"] == 0.0
    # the unconstrained rates are the means of the per-protein columns
    assert m["unconstrained"]["validity_rate"] == pytest.approx(np.mean([int(r["unc_valid"]) for r in rows]))
    assert m["unconstrained"]["length_match_rate"] == pytest.approx(np.mean([int(r["unc_length_match"]) for r in rows]))
    # finished: a re-run does nothing
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert evaluate_cli("--checkpoint", ckpt, "--tokens", tok, "--db", small_db, "--out", out) == 0
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


def test_window_baseline_flag(known, small_db, tmp_path):
    tok, ckpt, out, *_ = known
    assert evaluate_cli("--checkpoint", ckpt, "--tokens", tok, "--db", small_db, "--out", tmp_path / "e",
                        "--window-baseline", "no", "--no-unconstrained") == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert set(m["tokens_metrics"]["baselines"]) == {"most_frequent", "per_aa"} and "unconstrained" not in m
    first = json.loads((out / "metrics.json").read_text())["tokens_metrics"]["baselines"]
    assert m["tokens_metrics"]["baselines"] == {b: first[b] for b in ("most_frequent", "per_aa")}
