"""Trace and token metrics on hand-made cases with known answers, and on real chains from ../shared."""
import numpy as np
import pytest

from conftest import need_shared
from tokenfold.metrics import (binned, confusion_matrix, gdt_ts, kabsch, lddt_ca, max_fraction_within, rmsd,
                               tm_d0, tm_score, token_accuracy, trace_metrics)


def _rotation(seed=0) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a*a+b*b-c*c-d*d, 2*(b*c-a*d), 2*(b*d+a*c)],
                     [2*(b*c+a*d), a*a-b*b+c*c-d*d, 2*(c*d-a*b)],
                     [2*(b*d-a*c), 2*(c*d+a*b), a*a-b*b-c*c+d*d]])


def _helix(L=60) -> np.ndarray:
    """An ideal alpha-helix C-alpha trace (2.3 A radius, 100 deg/residue, 1.5 A rise): ~3.8 A bonds."""
    t = np.radians(100.0) * np.arange(L)
    return np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * np.arange(L)], 1)


@pytest.fixture(scope="module")
def real_chain():
    """A real chain (C-alpha, sequence) from ../shared, parsed with gemmi only (no pipeline code)."""
    import gemmi

    path = need_shared("structures", "foldseek_regression_homstrad")
    f = sorted(path.glob("*.pdb"))[0]
    st = gemmi.read_structure(str(f))
    ch = st[0][0]
    ca = np.array([r["CA"][0].pos.tolist() for r in ch if r.find_atom("CA", "*")])
    seq = gemmi.one_letter_code([r.name for r in ch if r.find_atom("CA", "*")]).upper().replace("-", "X")
    assert len(ca) > 50
    return ca, seq


def test_identical_traces_are_perfect():
    x = _helix()
    m = trace_metrics(x, x)
    assert m["rmsd"] == pytest.approx(0, abs=1e-6)
    assert m["tm"] == pytest.approx(1.0, abs=1e-6)
    assert m["lddt"] == 1.0 and m["gdt_ts"] == 1.0 and m["frac_lt2"] == 1.0 and m["frac_lt4"] == 1.0


def test_rotated_translated_copy_has_zero_rmsd(real_chain):
    ca, seq = real_chain
    moved = ca @ _rotation(3).T + np.array([40.0, -12.0, 7.5])
    m = trace_metrics(moved, ca, seq)
    assert m["rmsd"] == pytest.approx(0, abs=1e-5)
    assert m["tm"] == pytest.approx(1.0, abs=1e-5)
    assert m["lddt"] == pytest.approx(1.0) and m["gdt_ts"] == pytest.approx(1.0)
    r, t = kabsch(moved, ca)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(moved @ r.T + t, ca, atol=1e-6)


def test_mirror_image_is_not_superposable():
    """A reflection is not a rigid motion: Kabsch must not 'fix' a mirrored helix."""
    x = _helix()
    assert rmsd(x * np.array([1, 1, -1]), x) > 1.0


def test_rmsd_known_value():
    """Two halves moved apart by +-d along x (perpendicular to nothing special): after the optimal
    superposition the deviation of every point is exactly d, so RMSD = d."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)) * 5
    y = x.copy()
    y[:, 0] += 1.5  # pure translation: RMSD 0
    assert rmsd(y, x) == pytest.approx(0, abs=1e-9)
    # scaling about the centroid by s: residual of each point is (s-1)|x_i - c|; RMSD = |s-1| * radius of gyration
    c = x.mean(0)
    z = c + 1.1 * (x - c)
    rg = np.sqrt(np.mean(np.sum((x - c) ** 2, 1)))
    assert rmsd(z, x) == pytest.approx(0.1 * rg, rel=1e-9)


def test_lddt_hand_computed():
    # three points on a line, 3 A apart: pairs (0,1)=3, (1,2)=3, (0,2)=6, all within 15 A
    true = np.array([[0.0, 0, 0], [3.0, 0, 0], [6.0, 0, 0]])
    pred = true.copy()
    pred[2, 0] = 7.5  # (1,2): 4.5 vs 3 -> error 1.5; (0,2): 7.5 vs 6 -> error 1.5; (0,1) exact
    # per ordered pair: exact pair scores 4/4, the two others pass only the 2 and 4 A thresholds (2/4)
    expected = (2 * 1.0 + 4 * 0.5) / 6
    assert lddt_ca(pred, true) == pytest.approx(expected)
    glob, per_res = lddt_ca(pred, true, per_residue=True)
    np.testing.assert_allclose(per_res, [(1 + 0.5) / 2, (1 + 0.5) / 2, 0.5])
    # pairs beyond the 15 A inclusion radius of the truth are not scored, however wrong they are
    far = np.array([[0.0, 0, 0], [3.0, 0, 0], [40.0, 0, 0]])
    bad = far.copy()
    bad[2] = [100.0, 0, 0]
    assert lddt_ca(bad, far) == 1.0
    # superposition-free: a rotated copy is perfect
    x = _helix()
    assert lddt_ca(x @ _rotation(5).T + 3.0, x) == pytest.approx(1.0)


def test_gdt_known_cases():
    x = _helix(40)
    y = x.copy()
    y[20:] += np.array([60.0, 0, 0])       # second half 60 A away: no superposition holds both halves
    assert gdt_ts(y, x) == pytest.approx(0.5)
    assert max_fraction_within(y, x, 1.0) == pytest.approx(0.5)
    # the last 10 residues thrown far away in random directions: at best the first 30 fit, at every cutoff
    z = x.copy()
    z[30:] = np.random.default_rng(2).normal(size=(10, 3)) * 100.0
    assert gdt_ts(z, x) == pytest.approx(0.75)
    # every residue within 0.5 A of the truth (no superposition can make it worse than the identity)
    w = x + np.random.default_rng(3).uniform(-0.25, 0.25, size=x.shape)
    assert gdt_ts(w, x) == 1.0


def test_tm_score_matches_tmtools_and_its_formula(real_chain):
    """Our TM-score is tmtools' own number; recomputing the TM sum from tmtools' superposition gives it
    too; and on a noisy copy (identity alignment obvious) TM-align's free alignment agrees."""
    from tmtools import tm_align

    ca, seq = real_chain
    rng = np.random.default_rng(0)
    noisy = ca + rng.normal(scale=1.2, size=ca.shape)
    ours = tm_score(noisy, ca, seq)
    res = tm_align(np.ascontiguousarray(noisy, float), np.ascontiguousarray(ca, float), seq, seq, [seq, seq])
    assert ours == res.tm_norm_chain2
    d = np.linalg.norm(noisy @ np.asarray(res.u).T + np.asarray(res.t) - ca, axis=1)
    assert ours == pytest.approx(np.mean(1 / (1 + (d / tm_d0(len(ca))) ** 2)), abs=2e-3)
    free = tm_align(np.ascontiguousarray(noisy, float), np.ascontiguousarray(ca, float), seq, seq)
    assert ours == pytest.approx(free.tm_norm_chain2, abs=1e-3)
    assert 0.3 < ours < 0.95


def test_tm_score_uses_the_residue_correspondence(real_chain):
    """A register shift by 5 residues: TM-align alone would re-align it; the fixed correspondence must not."""
    ca, seq = real_chain
    shifted = np.roll(ca, 5, axis=0)
    assert tm_score(shifted, ca, seq) < 0.5


def test_nonfinite_residues_are_left_out():
    x = _helix()
    y = x.copy()
    y[5] = np.nan
    m = trace_metrics(y, x)
    assert m["rmsd"] == pytest.approx(0, abs=1e-6) and m["tm"] == pytest.approx(1.0, abs=1e-6)
    assert all(np.isnan(v) for v in trace_metrics(x[:2], x[:2]).values())


def test_token_metrics_and_bins():
    assert token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    cm = confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    b = binned([10, 60, 70, 250], [1.0, 0.0, 1.0, 0.5])
    assert b == [{"bin": "0-49", "n": 1, "mean": 1.0, "median": 1.0},
                 {"bin": "50-99", "n": 2, "mean": 0.5, "median": 0.5},
                 {"bin": "200-299", "n": 1, "mean": 0.5, "median": 0.5}]


def test_segment_rmsd_ignores_the_pose_across_a_break():
    x = _helix(40)
    y = x.copy()
    y[25:] = y[25:] @ _rotation(7).T + 30.0     # second segment moved rigidly as a whole
    starts = np.zeros(40, bool)
    starts[[0, 25]] = True
    m = trace_metrics(y, x, starts=starts)
    assert m["rmsd"] > 5 and m["rmsd_seg"] == pytest.approx(0, abs=1e-6)
    assert trace_metrics(x + 0.1, x)["rmsd_seg"] == pytest.approx(0, abs=1e-9)
