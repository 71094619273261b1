"""Ingestion of each input kind (tokenfold/ingest.py), through stage 01's run: every bad input
file's outcome, Foldseek DBs without 3Di/C-alpha, chain-break segments, AlphaFold pLDDT."""
import json
import shutil

import numpy as np
import pytest

from conftest import SHARED, need_shared
from tokenfold.db import ProteinDB
from tokenfold.db_plan import Inputs, PlanMismatch, PrepareOptions
from tokenfold.prepare import run
from tokenfold.split import SplitOptions

FAST_SPLIT = SplitOptions(seed=0, mmseqs_mode="linclust")


def _rows(path):
    return [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]


# ----------------------------------------------------------------------------- bad inputs
def _expected():
    f = SHARED / "bad_inputs" / "EXPECTED.tsv"
    if not f.exists():
        return [("(../shared absent)", "")]
    return [tuple(r[:2]) for r in _rows(f)[1:]]


@pytest.fixture(scope="module")
def bad_db(tmp_path_factory):
    src = need_shared("bad_inputs")
    out = tmp_path_factory.mktemp("bad") / "db"
    run(Inputs(structures=[str(src)]), out, PrepareOptions(), FAST_SPLIT)
    db = ProteinDB(out)
    recs = [db.get_global(i) for i in range(db.n_total)]
    rejects = _rows(out / "rejects.tsv")
    notes = _rows(out / "notes.tsv")
    return src, out, recs, rejects, notes


_REJECT_WORDS = {"empty": "empty", "not a structure": "not a structure", "corrupt gzip": "corrupt gzip",
                 "no protein chain": "no protein chain", "shorter than min length": "shorter than min length",
                 "no atoms": "no atoms"}


@pytest.mark.parametrize("name,expected", _expected())
def test_bad_input_outcome(bad_db, name, expected):
    src, out, recs, rejects, notes = bad_db
    path = str((src / name).resolve())
    kept = [r for r in recs if r.origin == path]
    rej = [r for r in rejects if r[0] == path]
    for r in kept:  # whatever is kept is consistent and finite
        assert len(r.aa) == len(r.ca) and (r.ss is None or len(r.ss) == len(r.aa))
        assert np.isfinite(r.ca).all()
    if expected.startswith("reject:"):
        word = _REJECT_WORDS[expected.split(":", 1)[1].strip()]
        assert not kept and rej and all(word in r[2] for r in rej), (rej, kept)
        assert all(len(r) == 3 and "\n" not in r[2] for r in rej)
    elif name == "truncated_midline.pdb":
        assert kept and any("truncated" in n[2] for n in notes if n[0] == path)
    elif name == "ca_only.pdb":
        assert len(kept) == 1 and kept[0].ss is None
        assert any(n[0] == path and "no 3Di" in n[2] for n in notes)
    elif name == "nmr_three_models.pdb":
        assert len(kept) == 1
        first_model = []
        for line in open(src / name):
            if line.startswith("ENDMDL"):
                break
            if line.startswith("ATOM") and line[12:16].strip() == "CA":
                first_model.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        np.testing.assert_allclose(kept[0].ca, np.array(first_model, np.float32), atol=1e-3)
    elif name == "nan_coordinates.pdb":
        assert kept and kept[0].n_breaks >= 1  # dropped residues leave a recorded gap
    elif name == "chain_break_10_missing.pdb":
        r = kept[0]
        i = np.flatnonzero(r.gap_before)
        assert len(i) == 1 and np.linalg.norm(r.ca[i[0]] - r.ca[i[0] - 1]) > 4.2
    elif name.startswith("dup"):
        ids = {r.id for r in recs if r.origin.endswith("same_name.pdb")}
        assert ids == {"same_name", "same_name~2"}
    elif name == "selenomethionine_mse.pdb":
        mse = [line[22:26] for line in open(src / name) if line.startswith(("ATOM", "HETATM"))
               and line[17:20] == "MSE" and line[12:16].strip() == "CA"]
        assert mse and kept[0].aa.count("M") >= len(mse)
    else:  # keep
        assert kept, (name, rej)


def test_every_bad_input_file_is_accounted_for(bad_db):
    src, out, recs, rejects, notes = bad_db
    files = {str(p.resolve()) for p in src.rglob("*") if p.is_file()}
    seen = {r.origin for r in recs} | {r[0] for r in rejects}
    assert files <= seen
    rep = json.loads((out / "report.json").read_text())
    assert rep["by_source"]["structure"]["items"] == len(files)


# ----------------------------------------------------------------------------- other inputs and options
def test_foldseek_db_without_ss_and_ca_ingests_flagged(tmp_path):
    fdb = need_shared("foldseek_db")
    for ext in ("", ".index", ".dbtype", ".lookup"):
        shutil.copy(f"{fdb / 'homstrad_float'}{ext}", f"{tmp_path / 'seqonly'}{ext}")
    out = tmp_path / "db"
    run(Inputs(foldseek_dbs=[str(tmp_path / "seqonly")]), out, PrepareOptions(), FAST_SPLIT)
    recs = list(ProteinDB(out))
    assert len(recs) == 50 and all(r.ss is None and r.ca is None for r in recs)
    assert any("missing files" in n[2] for n in _rows(out / "notes.tsv"))


def test_chain_break_split_mode(tmp_path):
    f = need_shared("bad_inputs", "chain_break_10_missing.pdb")
    out = tmp_path / "db"
    run(Inputs(structures=[str(f)]), out, PrepareOptions(chain_breaks="split"), SplitOptions(use_mmseqs=False))
    recs = list(ProteinDB(out))
    assert [r.id for r in recs] == ["chain_break_10_missing_seg1", "chain_break_10_missing_seg2"]
    assert sum(r.length for r in recs) == 236 and all(r.n_breaks == 0 for r in recs)


def test_alphafold_plddt_kept_and_filtered(tmp_path):
    src = need_shared("bad_inputs", "missing_backbone_some_residues.pdb")
    af = tmp_path / "in" / "AF-P00001-F1-model_v4.pdb"
    af.parent.mkdir()
    shutil.copy(src, af)
    bfac = np.array([float(line[60:66]) for line in open(src) if line.startswith("ATOM") and line[12:16].strip() == "CA"])
    out = tmp_path / "db"
    run(Inputs(structures=[str(af.parent)]), out, PrepareOptions(min_plddt=0), SplitOptions(use_mmseqs=False))
    rec = ProteinDB(out)[0]
    np.testing.assert_allclose(rec.plddt, bfac.astype(np.float32))
    run(Inputs(structures=[str(af.parent)]), out, PrepareOptions(plddt_from_bfactor="no"),
          SplitOptions(use_mmseqs=False), overwrite=True)
    assert ProteinDB(out)[0].plddt is None
    with pytest.raises(PlanMismatch, match="low pLDDT"):
        run(Inputs(structures=[str(af.parent)]), out, PrepareOptions(min_plddt=bfac.mean() + 1),
              SplitOptions(use_mmseqs=False), overwrite=True)
    assert "low pLDDT" in (out / "work" / "shard_00000.rejects.tsv").read_text()
