"""Foldseek's 3Di letters (tokenfold/threedi.py): mini3di's rules, the fast partner search, and
agreement with Foldseek's own DB of the shared structures."""
import numpy as np

from conftest import need_shared, read_fasta
from tokenfold.structure import parse_structure_file
from tokenfold.threedi import _partners_plain, encode_3di, encode_3di_arrays


def test_missing_backbone_residues_keep_ca_and_get_D():
    ch = parse_structure_file(need_shared("bad_inputs", "missing_backbone_some_residues.pdb")).chains[0]
    ss = encode_3di(ch)
    assert len(ss) == len(ch.aa) == len(ch.ca)
    lacking = ~(np.isfinite(ch.n).all(1) & np.isfinite(ch.c).all(1))
    assert lacking.any() and all(ss[i] == "D" for i in np.flatnonzero(lacking))


def test_fast_partner_search_equals_mini3di():
    import mini3di

    ref_enc = mini3di.Encoder()
    for name in ("missing_backbone_some_residues.pdb", "chain_break_10_missing.pdb", "nan_coordinates.pdb"):
        ch = parse_structure_file(need_shared("bad_inputs", name)).chains[0]
        vc = ref_enc.feature_encoder.vc_encoder.encode_atoms(ch.ca.astype(float), ch.cb.astype(float),
                                                             ch.n.astype(float), ch.c.astype(float))
        np.testing.assert_array_equal(_partners_plain(vc),
                                      ref_enc.feature_encoder.partner_index_encoder._find_residue_partners(vc))
        assert encode_3di(ch) == encode_3di_arrays(ch.ca, ch.n, ch.c, ch.cb, fast=False)


def test_3di_and_ids_match_foldseek_on_shared_set(shared_structures_db):
    """The pinned number: 3Di agreement with Foldseek's own DB of the same files, counting every
    residue of a chain that is missing or differs in length as a disagreement."""
    from tokenfold.db import ProteinDB

    ref_ss = read_fasta(need_shared("foldseek_db", "shared_3di.fasta"))
    ref_aa = read_fasta(need_shared("foldseek_db", "shared_aa.fasta"))
    db = ProteinDB(shared_structures_db)
    ours = {r.id: r for r in db}
    total = sum(len(s) for s in ref_ss.values())
    agree = aa_agree = 0
    for pid, ss in ref_ss.items():
        r = ours.get(pid)
        if r is None or len(r.ss) != len(ss):
            continue
        agree += sum(a == b for a, b in zip(r.ss, ss))
        aa_agree += sum(a == b or b in "BZO" and a == "X" for a, b in zip(r.aa, ref_aa[pid]))
    print(f"3Di agreement with Foldseek: {agree}/{total} = {agree / total:.4%}")
    assert agree / total >= 0.99
    assert aa_agree / total >= 0.99
    assert set(ref_ss) <= set(ours)  # every Foldseek entry, under Foldseek's id
