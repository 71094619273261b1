"""The hand-crafted "6D" tokens: geometry on ideal and real chains, the codes, and the 6d kind of stage 04."""
import numpy as np
from test_tokenize import read_examples, tok_cfg

from tokenfold import sixd
from tokenfold.db import ProteinDB
from tokenfold.geotokens import segment_starts
from tokenfold.metrics import segment_rmsd
from tokenfold.tokenize import run
from tokenfold.vocab import KIND_MARKER, Vocab


def ideal(theta: float, tau: float, n: int = 30) -> np.ndarray:
    return sixd.nerf(np.full(n, theta), np.full(n, tau), np.full(n, 3.8))


def test_angles_invert_nerf_on_real_chains(small_db):
    """angles() and nerf() are inverses: a real chain rebuilt from its own bond lengths, angles and
    dihedrals superposes on itself to 1e-6 A (checks both sign conventions)."""
    n = 0
    for rec in ProteinDB(small_db):
        ca = rec.ca.astype(np.float64)
        starts = segment_starts(ca, rec.gap_before)
        if starts[1:].any():
            continue
        theta, tau = sixd.angles(ca, starts)
        bond = np.r_[0.0, np.linalg.norm(np.diff(ca, axis=0), axis=1)]
        assert segment_rmsd(sixd.nerf(theta, tau, bond), ca) < 1e-6
        assert np.isnan(theta[[0, -1]]).all() and np.isnan(tau[[0, -2, -1]]).all()
        assert np.isfinite(theta[1:-1]).all() and np.isfinite(tau[1:-2]).all()
        n += 1
    assert n >= 10


def test_secondary_structure_of_ideal_helix_and_strand():
    helix, strand = ideal(91.0, 50.0), ideal(122.0, -170.0)
    st = np.zeros(30, bool)
    st[0] = True
    ss_h, ss_e = sixd.secondary_structure(helix, st), sixd.secondary_structure(strand, st)
    assert (ss_h[:25] == 1).all() and (ss_e[:25] == 2).all()
    t, d = sixd.angles(helix, st)
    assert abs(np.nanmedian(d) - 50) < 1e-6 and abs(np.nanmedian(t) - 91) < 1e-6
    # a C-alpha trace of an ideal helix: exactly 91 deg / 50 deg bins, helix, buried by its own turns
    codes = sixd.encode(helix)
    inner = codes[1:-2] // 9
    assert (inner == 3 * 3 + 0).all()                                # tau bin of 60 deg, theta < 100
    assert ((codes[1:-2] // 3) % 3 == 1).all()
    assert codes[0] // 9 == codes[-1] // 9 == sixd.N_ANGLE - 1       # no theta at the ends
    assert codes[-2] // 9 == 18                                      # theta, no tau


def test_codes_on_real_chains(small_db):
    """Codes within 0..197, deterministic, neighbour counts equal a brute-force count, and nothing is
    measured across a chain break (the residues beside it get the no-tau / no-theta states)."""
    seen = set()
    breaks = 0
    for rec in ProteinDB(small_db):
        ca = rec.ca.astype(np.float64)
        c = sixd.encode(ca, rec.gap_before)
        assert c.dtype == np.int64 and len(c) == rec.length and c.min() >= 0 and c.max() < sixd.N_CODES
        np.testing.assert_array_equal(c, sixd.encode(ca, rec.gap_before))
        d = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
        np.testing.assert_array_equal(sixd.neighbour_counts(ca), (d < sixd.RADIUS).sum(1) - 1)
        starts = segment_starts(ca, rec.gap_before)
        for b in np.flatnonzero(starts)[1:]:
            breaks += 1
            assert c[b] // 9 == sixd.N_ANGLE - 1 and c[b - 1] // 9 == sixd.N_ANGLE - 1
        seen |= set(c.tolist())
    assert len(seen) > 60
    assert breaks > 0   # the small DB has chains with gaps


def test_6d_kind_through_stage_04(small_db, tmp_path):
    """The 6d kind: its own marker after the original specials (the other kinds' ids unchanged), the
    codes of the whole chain cut to the kept window, decoded back to the DB's chains."""
    out = tmp_path / "6d"
    run(tok_cfg(small_db, out, kind="6d", max_length=120))
    db = ProteinDB(small_db)
    vocab, ex = read_examples(out)
    assert vocab.kind == "6d" and vocab.n_struct == sixd.N_CODES and vocab.kind_id == KIND_MARKER["6d"] == 8
    assert vocab.aa_offset == 9 and vocab.tokens[8] == "<6d>" and vocab.meta["sixd"]["version"] == sixd.VERSION
    assert Vocab.for_kind("3di").aa_offset == 8 and Vocab.for_kind("geo", n_struct=4).tokens[:8][-1] == "<kanzi>"
    assert Vocab.load(out).to_dict() == vocab.to_dict()
    n_crop = 0
    for rows in ex.values():
        for pid, g, crop, nres, aa, codes, ids in rows:
            rec = db.get_global(g)
            assert ids[1 + nres + 1] == 8 and aa == rec.aa[crop:crop + nres]
            np.testing.assert_array_equal(codes, sixd.encode(rec.ca, rec.gap_before)[crop:crop + nres])
            n_crop += crop > 0
    assert n_crop > 0
    assert sum(len(r) for r in ex.values()) == len(db)
