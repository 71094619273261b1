"""The token kinds side by side on the real small DB: 3di, geo and 6d token directories of stage 04."""
import numpy as np
import pytest
from test_tokenize import tok_cfg

from tokenfold import token_compare
from tokenfold.db import ProteinDB
from tokenfold.tokenize import run as tokenize


@pytest.fixture(scope="module")
def kinds(small_db, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    for kind in ("3di", "geo", "6d"):
        tokenize(tok_cfg(small_db, root / kind, kind=kind))
    return root


def test_tokenizer_numbers(kinds, small_db):
    t = {k: token_compare.kind_stats(kinds / k, "val") for k in ("3di", "geo", "6d")}
    n_val = sum(r.split == "val" for r in ProteinDB(small_db))
    for k, s in t.items():
        assert s["n_proteins"] == n_val and 0 < s["utilisation"] <= 1 and s["codes_used"] <= s["n_struct"]
        assert 1 <= s["perplexity"] <= s["codes_used"]
        assert 1 <= s["unique_per_protein"]["mean"] <= s["codes_used"]
        assert s["nmi_3di_shuffled"] < s["nmi_3di"] and s["train_unigram_entropy_nats"] > 0
    assert t["3di"]["nmi_3di"] == pytest.approx(1.0)                 # 3Di against itself
    assert t["3di"]["reconstruction"] == {"decodable": False}
    assert t["geo"]["reconstruction"]["rmsd_A"]["median"] < 1.0      # closed loop, the default K
    assert t["6d"]["reconstruction"]["rmsd_A"]["median"] > 3.0       # bin centres, open loop
    assert t["6d"]["nmi_3di"] > t["6d"]["nmi_aa_3di"]                # geometry says more about 3Di than sequence


def test_tables_with_learnability_and_cli(kinds, tmp_path):
    rec = {"tokens_set": "6d", "cell": "6d_1x16_f1", "size": "1x16", "fraction": 1.0, "N": 1000, "D": 5000,
           "flops": 3e7, "loss": 4.0, "perplexity": float(np.exp(4.0)), "accuracy": 0.05,
           "teacher_forced_accuracy": 0.1, "baselines": {"most_frequent": 0.04, "per_aa": 0.06}}
    table = token_compare.compare([kinds / "3di", kinds / "6d"], [rec], "val")
    row = table["kinds"]["6d"]["learnability"][0]
    unigram = table["kinds"]["6d"]["tokenizer"]["train_unigram_entropy_nats"]
    assert row["gain_over_unigram"] == pytest.approx(unigram - 4.0) and row["beats"] == {"most_frequent": True,
                                                                                          "per_aa": False}
    assert table["kinds"]["3di"]["learnability"] == [] and table["equal_compute"] == {"1x16 f1": {"6d": {
        "D": 5000, "flops": 3e7, "N": 1000}}}
    files = token_compare.write_tables(tmp_path, table)
    md = (tmp_path / "token_kinds.md").read_text()
    assert md.count("\n## ") == 2 and "learnability 1x16 f1" in md and "not decodable" in md
    assert all((tmp_path / f).stat().st_size > 500 for f in files)
    out = tmp_path / "cli"
    assert token_compare.main(["--tokens", str(kinds / "3di"), str(kinds / "geo"), "--out", str(out)]) == 0
    assert (out / "token_kinds.md").read_text().count("\n## ") == 2
