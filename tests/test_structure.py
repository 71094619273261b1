"""PDB/mmCIF parsing and Foldseek's residue rules (tokenfold/structure.py)."""
import gzip

import numpy as np
import pytest

from conftest import need_shared, read_fasta
from tokenfold import structure as S

# a minimal real-looking backbone: residues 1-8 of chain A (first lines of bad_inputs' chain D,
# renamed), used to build small PDB texts for rule tests
_RES = [("GLU", (-1.224, -4.458, 16.769), (-1.044, -4.800, 15.329), (0.443, -4.875, 14.994)),
        ("ASP", (1.100, -5.800, 14.300), (2.217, -6.097, 13.850), (3.100, -5.000, 13.300)),
        ("TYR", (3.100, -3.900, 12.300), (3.560, -3.602, 11.323), (5.000, -3.700, 11.000)),
        ("ALA", (5.600, -4.800, 10.800), (6.930, -5.327, 10.965), (7.800, -4.300, 10.300)),
        ("GLY", (7.700, -3.900, 9.100), (8.600, -3.000, 8.400), (10.000, -3.500, 8.300)),
        ("LEU", (10.600, -3.900, 9.400), (12.000, -4.300, 9.400), (12.600, -3.300, 8.400)),
        ("LYS", (13.700, -3.600, 7.700), (14.400, -2.700, 6.800), (15.800, -3.200, 6.500)),
        ("SER", (16.400, -2.600, 5.500), (17.700, -3.000, 4.900), (18.700, -1.900, 5.200))]


def _atom(serial, name, resname, chain, resnum, xyz, altloc=" ", rec="ATOM  ", b=50.0):
    return (f"{rec}{serial:5d} {name:<4}{altloc}{resname:>3} {chain}{resnum:4d}    "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00{b:6.2f}           {name[0]}\n")


def _pdb(residues, chain="A", ter_after=None, start=1):
    lines, serial = [], 1
    for i, (rn, n, ca, c) in enumerate(residues):
        for name, xyz in (("N", n), ("CA", ca), ("C", c)):
            lines.append(_atom(serial, name, rn, chain, start + i, xyz))
            serial += 1
        if ter_after is not None and i == ter_after:
            lines.append(f"TER   {serial:5d}      {rn} {chain}{start + i:4d}\n")
            serial += 1
    return "".join(lines)


def test_entry_names_follow_foldseek():
    assert S.entry_name("x/1A2K_l_u.pdb.gz") == "1A2K_l_u"
    assert S.entry_name("d1asha_.gz") == "d1asha_"          # gzipped, no inner extension
    assert S.entry_name("1YJP.cif") == "1YJP"
    assert S.entry_name("a.b.pdb") == "a.b"
    assert S.entry_name("noext") == "noext"
    assert S.chain_entry_id("1tim", "A", 2) == "1tim_A" and S.chain_entry_id("d1asha_", "A", 1) == "d1asha_"


def test_residues_after_ter_are_dropped_like_foldseek(tmp_path):
    # Foldseek's gemmi marks a chain's residues after its TER record non-polymer (3SGQ_r_u in DB5
    # keeps 4 of 185 residues); gemmi >= 0.7 would keep them
    text = _pdb(_RES, ter_after=4)
    (tmp_path / "ter.pdb").write_text(text)
    (tmp_path / "noter.pdb").write_text(_pdb(_RES))
    assert S.parse_structure_file(tmp_path / "ter.pdb").chains[0].aa == "EDYAG"
    assert S.parse_structure_file(tmp_path / "noter.pdb").chains[0].aa == "EDYAGLKS"


def test_ter_rule_on_real_file_3sgq():
    f = need_shared("structures", "db55_unbound", "3SGQ_r_u.pdb.gz")
    ref = read_fasta(need_shared("foldseek_db", "shared_aa.fasta"))
    assert S.parse_structure_file(f).chains[0].aa == ref["3SGQ_r_u"] == "ISGG"


def test_altloc_last_atom_wins_and_fast_path_equal(tmp_path):
    lines = _pdb(_RES).splitlines(keepends=True)
    # give residue 3's CA two conformers: Foldseek keeps the last one it reads
    ca_line = [i for i, l in enumerate(lines) if l[12:16].strip() == "CA" and l[22:26] == "   3"][0]
    a = lines[ca_line][:16] + "A" + lines[ca_line][17:]
    b = lines[ca_line][:16] + "B" + lines[ca_line][17:30] + f"{4.560:8.3f}" + lines[ca_line][38:]
    lines[ca_line:ca_line + 1] = [a, b]
    (tmp_path / "alt.pdb").write_text("".join(lines))
    ch = S.parse_structure_file(tmp_path / "alt.pdb").chains[0]
    assert ch.ca[2, 0] == pytest.approx(4.56)
    # files without altlocs take the C++ lookup path; it must select exactly the same atoms
    f = need_shared("structures", "db55_unbound", "1A2K_r_u.pdb.gz")
    st, fmt, text, _, altlocs = S.read_structure(f)
    assert not altlocs
    excl = S._foldseek_ter_exclusions(text)
    slow = S.extract_chains(st, excl, use_entity_types=False, altlocs=True)
    fast = S.extract_chains(st, excl, use_entity_types=False, altlocs=False)
    for x, y in zip(slow, fast):
        assert x.aa == y.aa
        for k in ("ca", "n", "c", "cb"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))


def test_content_sniffing_and_clear_reasons(tmp_path):
    text = _pdb(_RES)
    (tmp_path / "plain_named.gz").write_text(text)
    (tmp_path / "gz_no_ext").write_bytes(gzip.compress(text.encode()))
    assert S.parse_structure_file(tmp_path / "plain_named.gz").chains[0].aa == "EDYAGLKS"
    assert S.parse_structure_file(tmp_path / "gz_no_ext").chains[0].aa == "EDYAGLKS"
    (tmp_path / "empty.pdb").write_text("")
    (tmp_path / "bin.pdb").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(text.encode())[:60])
    (tmp_path / "readme.pdb").write_text("just words\nno atoms here\n")
    for name, reason in (("empty.pdb", "empty"), ("bin.pdb", "not a structure"), ("trunc.gz", "corrupt gzip"),
                         ("readme.pdb", "no atoms")):
        with pytest.raises(S.StructureError, match=reason):
            S.parse_structure_file(tmp_path / name)


def test_truncated_last_line_keeps_atoms_before_cut(tmp_path):
    text = _pdb(_RES)
    (tmp_path / "cut.pdb").write_text(text[: text.rfind("\n", 0, len(text) - 1) + 30])  # last line cut at 29 chars
    pf = S.parse_structure_file(tmp_path / "cut.pdb")
    assert pf.chains[0].aa == "EDYAGLKS" and any("truncated" in n for n in pf.notes)


def test_mse_is_met_and_ca_trace_has_no_3di():
    mse = S.parse_structure_file(need_shared("bad_inputs", "selenomethionine_mse.pdb")).chains[0]
    ref = S.parse_structure_file(need_shared("bad_inputs", "missing_backbone_some_residues.pdb")).chains[0]
    assert "M" in mse.aa and len(mse) == len(ref)
    ca_only = S.parse_structure_file(need_shared("bad_inputs", "ca_only.pdb")).chains[0]
    assert ca_only.is_ca_trace and not mse.is_ca_trace




def test_nan_coordinates_never_survive_and_leave_a_gap():
    pf = S.parse_structure_file(need_shared("bad_inputs", "nan_coordinates.pdb"))
    ch = pf.chains[0]
    assert np.isfinite(ch.ca).all() and ch.dropped_nonfinite > 0
    assert ch.gap_before.sum() >= 1 and not ch.gap_before[0]


def test_chain_break_detection_threshold():
    ch = S.parse_structure_file(need_shared("bad_inputs", "chain_break_10_missing.pdb")).chains[0]
    gap = S.chain_breaks(ch.ca)
    assert gap.sum() == 1
    i = int(np.flatnonzero(gap)[0])
    assert np.linalg.norm(ch.ca[i] - ch.ca[i - 1]) > S.BREAK_DISTANCE
    d = np.linalg.norm(np.diff(ch.ca, axis=0), axis=1)
    assert (d[~gap[1:]] <= S.BREAK_DISTANCE).all()
    assert S.segments(gap) == [(0, i), (i, len(ch))]


def test_break_distance_is_the_callers_both_ways(tmp_path):
    # residues 5-8 shifted by 1.5 A along the 4->5 step: a 5.3 A C-alpha step
    d = np.subtract(_RES[4][2], _RES[3][2])
    shift = 1.5 * d / np.linalg.norm(d)
    moved = _RES[:4] + [(rn, tuple(np.add(n, shift)), tuple(np.add(ca, shift)), tuple(np.add(c, shift)))
                        for rn, n, ca, c in _RES[4:]]
    (tmp_path / "stretch.pdb").write_text(_pdb(moved))
    step = np.linalg.norm(np.subtract(moved[4][2], moved[3][2]))
    assert 5.0 < step < 5.6
    default = S.parse_structure_file(tmp_path / "stretch.pdb").chains[0].gap_before
    assert np.flatnonzero(default).tolist() == [4]                       # 4.2 A default: a break
    loose = S.parse_structure_file(tmp_path / "stretch.pdb", break_distance=6.0).chains[0].gap_before
    assert not loose.any()                                                # 6 A: no break


def test_alphafold_detection(tmp_path):
    assert S.detect_alphafold("", "AF-P69905-F1-model_v4")
    assert S.detect_alphafold("TITLE     ALPHAFOLD MONOMER V2.0 PREDICTION FOR X\n", "model")
    assert not S.detect_alphafold(_pdb(_RES), "1abc")
