"""Foldseek/MMseqs2 database reading (tokenfold/foldseek.py, foldseek_files.py) against Foldseek's own dumps and PDBs."""
import os
import shutil

import numpy as np
import pytest

from conftest import need_shared, read_fasta
from tokenfold import foldseek as F
from tokenfold import foldseek_files


def _entries(prefix):
    db = F.FoldseekDB(prefix)
    b = db.read_range(0, len(db))
    st = np.concatenate([[0], np.cumsum(b.lengths)])
    return db, b, st


@pytest.mark.parametrize("name", ["shared", "homstrad_float"])
def test_decode_equals_foldseek_fasta_dumps(name):
    fdb = need_shared("foldseek_db")
    db, b, st = _entries(fdb / name)
    assert len(db) == len(b.ids) and b.has_ss.all() and b.has_ca.all()
    aa, ss = read_fasta(fdb / "shared_aa.fasta"), read_fasta(fdb / "shared_3di.fasta")
    for j, pid in enumerate(b.ids):  # the dumps are of `shared`; homstrad_float holds some of its chains
        assert b.aa[st[j]:st[j + 1]].tobytes().decode() == aa[pid]
        assert b.ss[st[j]:st[j + 1]].tobytes().decode() == ss[pid]
    assert not np.isnan(b.ca).any()
    if name == "shared":
        assert list(b.ids) == list(aa)  # ids from _h headers, in key order


def test_both_ca_storage_modes_present_and_decoded():
    fdb = need_shared("foldseek_db")
    for name, want in (("shared", "diff"), ("homstrad_float", "float")):
        db = F.FoldseekDB(fdb / name)
        rows, L = db.ca.rows(0, len(db)), db.aa.rows(0, len(db))[:, 2] - 2
        modes = np.where(rows[:, 2] >= 12 * L, "float", "diff")
        assert (modes == want).mean() > 0.9
    # the compressed DB also holds a few float fall-backs (a jump > 32.767 A on one axis)
    db = F.FoldseekDB(fdb / "shared")
    rows, L = db.ca.rows(0, len(db)), db.aa.rows(0, len(db))[:, 2] - 2
    assert (rows[:, 2] >= 12 * L).any()


def test_ca_matches_pdb_within_a_milliangstrom(shared_structures_db):
    """Foldseek DB C-alpha (both modes) vs the same chains parsed from the PDB/mmCIF files."""
    from tokenfold.db import ProteinDB

    fdb = need_shared("foldseek_db")
    ours = {r.id: r.ca for r in ProteinDB(shared_structures_db)}
    worst, n = 0.0, 0
    for name in ("shared", "homstrad_float"):
        db, b, st = _entries(fdb / name)
        for j, pid in enumerate(b.ids):
            ref = ours.get(pid)
            if ref is None or len(ref) != b.lengths[j]:
                continue
            worst = max(worst, float(np.abs(b.ca[st[j]:st[j + 1]] - ref).max()))
            n += 1
    assert n > 1100 and worst <= 0.001 + 1e-5


def test_checkpointed_line_access_equals_full_read(monkeypatch):
    fdb = need_shared("foldseek_db")
    full = F.FoldseekDB(fdb / "shared").read_range(0, 10**9)
    monkeypatch.setattr(foldseek_files, "CHECKPOINT", 7)
    monkeypatch.setattr(foldseek_files, "_SCAN", 1000)  # many scan chunks: lines straddle chunk borders
    db = F.FoldseekDB(fdb / "shared")
    parts = [db.read_range(a, a + 97) for a in range(0, len(db), 97)]
    assert sum(len(p.ids) for p in parts) == len(db) == len(full.ids)
    np.testing.assert_array_equal(np.concatenate([p.aa for p in parts]), full.aa)
    np.testing.assert_array_equal(np.concatenate([p.ca for p in parts]), full.ca)
    assert sum((p.ids for p in parts), []) == full.ids


def _copy_db(src_prefix, dst_prefix, suffixes):
    for suf in suffixes:
        for ext in ("", ".index", ".dbtype"):
            s = f"{src_prefix}{suf}{ext}"
            if os.path.exists(s):
                shutil.copy(s, f"{dst_prefix}{suf}{ext}")


def test_reordered_companion_index_and_missing_files(tmp_path):
    fdb = need_shared("foldseek_db")
    ref = F.FoldseekDB(fdb / "homstrad_float").read_range(0, 50)
    _copy_db(fdb / "homstrad_float", tmp_path / "db", ["", "_ss", "_ca", "_h"])
    idx = (tmp_path / "db_ss.index").read_text().splitlines()
    (tmp_path / "db_ss.index").write_text("\n".join(idx[::-1]) + "\n")  # other line order
    b = F.FoldseekDB(tmp_path / "db").read_range(0, 50)
    np.testing.assert_array_equal(b.ss, ref.ss)
    # without _ss and _ca: sequences only, flagged; without _h: ids from .lookup
    _copy_db(fdb / "homstrad_float", tmp_path / "seq", [""])
    shutil.copy(f"{fdb / 'homstrad_float'}.lookup", tmp_path / "seq.lookup")
    db = F.FoldseekDB(tmp_path / "seq")
    assert set(db.missing) == {"_ss", "_ca", "_h"}
    b = db.read_range(0, 50)
    assert b.ss is None and b.ca is None and not b.has_ss.any() and not b.has_ca.any()
    assert b.ids == ref.ids
    np.testing.assert_array_equal(b.aa, ref.aa)


def test_compressed_or_broken_db_gives_one_line_error(tmp_path):
    fdb = need_shared("foldseek_db")
    _copy_db(fdb / "homstrad_float", tmp_path / "db", [""])
    (tmp_path / "db.dbtype").write_bytes((0 | F.COMPRESSED_BIT).to_bytes(4, "little"))
    with pytest.raises(F.FoldseekFormatError, match="mmseqs decompress"):
        F.FoldseekDB(tmp_path / "db")
    with pytest.raises(FileNotFoundError, match="not found"):
        F.FoldseekDB(tmp_path / "nothing")
    _copy_db(fdb / "homstrad_float", tmp_path / "cut", [""])
    data = (tmp_path / "cut").read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(F.FoldseekFormatError, match="past the end"):
        F.FoldseekDB(tmp_path / "cut").read_range(0, 50)


def test_data_split_over_numbered_files(tmp_path):
    """MMseqs2 may keep a DB's data as PREFIX.0, PREFIX.1, ... with offsets through their concatenation."""
    fdb = need_shared("foldseek_db")
    ref = F.FoldseekDB(fdb / "shared").read_range(0, 10**9)
    for suf in ("", "_ss", "_ca", "_h"):
        src = f"{fdb / 'shared'}{suf}"
        rows = [line.split("\t") for line in open(f"{src}.index")]
        cut = int(rows[len(rows) // 2][1])  # an entry boundary in the middle
        data = open(src, "rb").read()
        open(f"{tmp_path / 'db'}{suf}.0", "wb").write(data[:cut])
        open(f"{tmp_path / 'db'}{suf}.1", "wb").write(data[cut:])
        shutil.copy(f"{src}.index", f"{tmp_path / 'db'}{suf}.index")
        shutil.copy(f"{src}.dbtype", f"{tmp_path / 'db'}{suf}.dbtype")
    db = F.FoldseekDB(tmp_path / "db")
    assert len(db.aa.parts) == 2 and not db.missing
    got = db.read_range(0, 10**9)
    assert got.ids == ref.ids
    np.testing.assert_array_equal(got.aa, ref.aa)
    np.testing.assert_array_equal(got.ss, ref.ss)
    np.testing.assert_array_equal(got.ca, ref.ca)
