"""Geo tokens: held-out reconstruction on real chains, chain breaks, short chains, persistence."""
import numpy as np
import pytest
from conftest import need_shared

from tokenfold.geotokens import GAP_OFFSET, GeoCodebook, open_loop_codes, reconstruction_rmsd, segment_starts
from tokenfold.metrics import segment_rmsd
from tokenfold.structure import parse_structure_file
from tokenfold.vocab import Vocab


def _chains(folder: str) -> list:
    out = []
    for f in sorted(need_shared("structures", folder).iterdir()):
        for ch in parse_structure_file(f).chains:
            if len(ch) >= 5:
                out.append(ch)
    return out


@pytest.fixture(scope="module")
def fitted():
    """K=512 (the stage-04 default) fit on two folders of ../shared, evaluated on a third.

    Train: MDAnalysis DSSP chains + Foldseek's SCOPe examples (~80 chains, ~11,600 residues).
    Held out: the 40 GTalign query chains (71-1,129 residues), minus any sequence seen in training.
    """
    train = _chains("mdanalysistests_dssp") + _chains("foldseek_example")
    seen = {c.aa for c in train}
    test = [c for c in _chains("gtalign_afsp") if c.aa not in seen]
    cb = GeoCodebook.fit([(c.ca, None) for c in train], K=512, seed=0, refine_iters=2)
    return cb, train, test


def test_heldout_reconstruction_meets_target(fitted):
    cb, train, test = fitted
    assert len(test) >= 35 and cb.K == 512 and cb.n_tokens == 514
    r = reconstruction_rmsd(cb, [c.ca for c in test])
    L = np.array([len(c) for c in test])
    assert np.median(r) <= 0.5                     # the target: median C-alpha RMSD <= 0.5 A, K <= 1000
    assert r.max() < 1.0
    # no drift: the long chains are reconstructed as well as the short ones ...
    assert np.median(r[L >= 400]) <= 0.5
    # ... while quantising the true geometry open-loop drifts far away on the same chains
    long = [c for c in test if len(c) >= 400][:3]
    open_r = [segment_rmsd(cb.decode(open_loop_codes(cb, c.ca)), c.ca, segment_starts(c.ca)) for c in long]
    assert min(open_r) > 2 * max(reconstruction_rmsd(cb, [c.ca for c in long]))


def test_encoding_ignores_rigid_motion_and_decoding_is_a_fixed_point(fitted):
    cb, _, test = fitted
    ca = next(c.ca for c in test if segment_starts(c.ca).sum() == 1).astype(np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))                  # a proper rotation
    codes = cb.encode(ca)
    moved = cb.encode(ca @ q.T + [40.0, -7.0, 3.0])
    assert (codes == moved).mean() > 0.99
    assert codes[0] == cb.START and (codes[1:] < cb.K).all()
    # the decoded trace encodes to the same codes (decode is the encoder's own reconstruction)
    assert (cb.encode(cb.decode(codes)) == codes).mean() > 0.99


def test_chain_breaks_are_not_bridged(fitted):
    cb, _, test = fitted
    ca = next(c.ca for c in test if len(c) >= 120 and segment_starts(c.ca[:120]).sum() == 1).astype(np.float64)
    # a gap made by deleting 8 residues; a break that only the DB knows of (gap_before, normal distance);
    # and a one-residue segment between two gaps
    cut = np.concatenate([ca[:40], ca[48:70], ca[71:72], ca[74:120]])
    gap = np.zeros(len(cut), bool)
    gap[55] = True
    starts = segment_starts(cut, gap)
    assert np.flatnonzero(starts).tolist() == [0, 40, 55, 62, 63]
    codes = cb.encode(cut, gap)
    assert codes[0] == cb.START
    assert np.flatnonzero(codes == cb.BREAK).tolist() == [40, 55, 62, 63]
    assert (np.delete(codes, [0, 40, 55, 62, 63]) < cb.K).all()
    x = cb.decode(codes).astype(np.float64)
    d = np.linalg.norm(np.diff(x, axis=0), axis=1)
    # across each break the decoded trace jumps GAP_OFFSET A: no fake 3.8 A bond
    assert np.allclose(d[[39, 54, 61, 62]], GAP_OFFSET)
    assert (np.abs(np.delete(d, [39, 54, 61, 62]) - 3.8) < 0.5).all()
    np.testing.assert_array_equal(cb.segments(codes), starts)
    assert segment_rmsd(x, cut, starts) < 0.5
    # a cis peptide (2.9 A) is a bond, not a break
    assert not segment_starts(np.array([[0, 0, 0], [2.9, 0, 0], [4.5, 2.5, 0]]))[1:].any()


@pytest.mark.parametrize("L", [1, 2, 3, 4, 6])
def test_short_chains(fitted, L):
    cb, train, _ = fitted
    ca = train[0].ca[10:10 + L].astype(np.float64)
    codes = cb.encode(ca)
    x = cb.decode(codes)
    assert codes.shape == (L,) and x.shape == (L, 3) and x.dtype == np.float32
    assert codes[0] == cb.START and np.allclose(x[0], 0.0)       # first residue: at the origin
    if L >= 2:   # second residue on +x at the coded bond length
        assert abs(x[1, 0] - np.linalg.norm(ca[1] - ca[0])) < 0.3 and np.allclose(x[1, 1:], 0.0)
    if L >= 3:   # third in the xy plane, y > 0
        assert abs(x[2, 2]) < 1e-6 and x[2, 1] > 0
        assert segment_rmsd(x, ca, segment_starts(ca)) < 0.5
    assert cb.encode(np.zeros((0, 3))).shape == (0,) and cb.decode([]).shape == (0, 3)


def test_decode_accepts_any_codes_and_rejects_bad_ones(fitted):
    cb = fitted[0]
    codes = np.random.default_rng(0).integers(0, cb.n_tokens, 300)
    x = cb.decode(codes)
    assert x.shape == (300, 3) and np.isfinite(x).all()
    st = cb.segments(codes)
    d = np.linalg.norm(np.diff(x.astype(np.float64), axis=0), axis=1)
    bond = cb.internal_coordinates()["bond"]
    inside = ~st[1:]
    np.testing.assert_allclose(d[inside], bond[codes[1:][inside]], atol=1e-4)
    for bad in ([cb.n_tokens], [-1], [[1, 2]]):
        with pytest.raises(ValueError):
            cb.decode(bad)
    with pytest.raises(ValueError):
        cb.encode(np.array([[0, 0, 0], [np.nan, 0, 0], [3.8, 0, 0]]))


def test_internal_coordinates_of_helix_and_strand_codes(fitted):
    """Codes mean what the docstring says: the most used codes of helices sit near the alpha-helix
    C-alpha geometry (bond angle ~91, dihedral ~+50), and every code has a ~3.8 A bond or a cis one."""
    cb, train, _ = fitted
    ic = cb.internal_coordinates()
    use = np.bincount(np.concatenate(cb.encode_many([c.ca for c in train[:20]])), minlength=cb.n_tokens)[:cb.K]
    top = np.argsort(use)[::-1][:20]
    helixy = (np.abs(ic["angle"][top] - 91) < 8) & (np.abs(ic["dihedral"][top] - 50) < 15)
    assert helixy.sum() >= 10
    assert ((np.abs(ic["bond"] - 3.8) < 0.3) | (np.abs(ic["bond"] - 2.95) < 0.3)).mean() > 0.95


def test_beam_search_lowers_error(fitted):
    cb, _, test = fitted
    cas = [c.ca for c in test[:12]]
    greedy, beam = reconstruction_rmsd(cb, cas), reconstruction_rmsd(cb, cas, beam=4)
    assert np.median(beam) < np.median(greedy)


def test_save_load_is_deterministic_and_pickle_free(fitted, tmp_path):
    cb, train, test = fitted
    small = [(c.ca, None) for c in train[:15]]
    a = GeoCodebook.fit(small, K=32, seed=3, refine_iters=1)
    b = GeoCodebook.fit(small, K=32, seed=3, refine_iters=1)
    a.fit_index = np.arange(15)
    a.save(tmp_path / "a.npz")
    b.fit_index = np.arange(15)
    b.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert set(z.files) == {"centroids", "meta_json", "fit_db_index"}
    c = GeoCodebook.load(tmp_path / "a.npz")
    for key in ("K", "n_tokens", "features", "version", "seed", "fit_chains", "fit_residues", "fit_rms_step_error"):
        assert key in c.meta
    assert c.meta["K"] == 32 and c.n_tokens == 34 and c.fit_index.tolist() == list(range(15))
    np.testing.assert_array_equal(c.encode(test[0].ca), a.encode(test[0].ca))
    with pytest.raises(ValueError, match="sha256"):
        GeoCodebook.load(tmp_path / "a.npz", sha256="0" * 64)
    with pytest.raises(ValueError, match="at least K"):
        GeoCodebook.fit(small[:1], K=512)


def test_from_vocab_finds_the_codebook(tmp_path, fitted):
    from tokenfold.artifacts import sha256_file

    cb = GeoCodebook.fit([(c.ca, None) for c in fitted[1][:10]], K=16, refine_iters=0)
    path = cb.save(tmp_path / "geo" / "cb.npz")
    ref = {"path": str(tmp_path / "elsewhere.npz"), "relpath": "../geo/cb.npz", "sha256": sha256_file(path)}
    v = Vocab.for_kind("geo", n_struct=cb.n_tokens, geo_codebook=ref)
    assert GeoCodebook.from_vocab(v, tmp_path / "tokens").K == 16        # found relative to the vocab's dir
    with pytest.raises(FileNotFoundError):
        GeoCodebook.from_vocab(v)                                         # absolute path does not exist
    v.meta["geo_codebook"]["sha256"] = "f" * 64
    with pytest.raises(ValueError, match="sha256"):
        GeoCodebook.from_vocab(v, tmp_path / "tokens")
