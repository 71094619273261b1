"""The on-disk contracts between stages: protein DB shards, vocabulary, token shards."""
import pickle

import numpy as np
import pytest

from tokenfold.artifacts import write_json_atomic
from tokenfold.db import ProteinDB, ProteinRecord, write_shard
from tokenfold.shards import TokenDataset, TokenShardWriter, shard_stem
from tokenfold.vocab import EOS, IGNORE_INDEX, Vocab


def _records():
    rng = np.random.default_rng(0)
    gap = np.zeros(5, bool); gap[3] = True
    return [
        ProteinRecord(id="a_A", aa="ACDEF", ss="DDVVL", ca=rng.normal(size=(5, 3)).astype(np.float32),
                      plddt=np.arange(5, dtype=np.float32), gap_before=gap, source="structure", origin="x.pdb"),
        ProteinRecord(id="seqonly", aa="MKV", source="fasta", origin="s.fa"),
    ]


def test_db_shard_roundtrip_and_split(tmp_path):
    recs = _records()
    write_shard(tmp_path / "shards/shard_00000.h5", recs[:1])
    write_shard(tmp_path / "shards/shard_00001.h5", recs[1:])
    write_json_atomic(tmp_path / "manifest.json", {"format": "tokenfold-db", "shards": [
        {"file": "shards/shard_00000.h5", "n_entries": 1}, {"file": "shards/shard_00001.h5", "n_entries": 1}]})
    np.save(tmp_path / "split.npy", np.array([2, 0], np.uint8))
    db = ProteinDB(tmp_path)
    assert len(db) == 2
    a, b = db[0], db[1]
    assert (a.id, a.aa, a.ss, a.split, a.n_breaks) == ("a_A", "ACDEF", "DDVVL", "test", 1)
    np.testing.assert_array_equal(a.ca, recs[0].ca)
    np.testing.assert_array_equal(a.plddt, recs[0].plddt)
    assert (b.ss, b.ca, b.plddt, b.split, b.index) == (None, None, None, "train", 1)
    assert [r.id for r in db.iter(split="train")] == ["seqonly"]
    assert list(db.indices("test")) == [0]
    # an excluded entry disappears from len/indexing but keeps its global position
    np.save(tmp_path / "split.npy", np.array([3, 1], np.uint8))
    db = ProteinDB(tmp_path)
    assert len(db) == 1 and db[0].id == "seqonly" and db.global_index(0) == 1


def test_record_length_mismatch_is_refused():
    with pytest.raises(ValueError):
        ProteinRecord(id="x", aa="ACD", ss="DD")


@pytest.mark.parametrize("interleaved", [False, True])
def test_vocab_encode_decode_and_loss_mask(tmp_path, interleaved):
    v = Vocab.for_kind("geo", n_struct=300, interleaved=interleaved)
    codes = np.array([0, 299, 17])
    ids = v.encode("MKX", codes)
    aa, back = v.decode(ids)
    assert aa == "MKX" and back.tolist() == codes.tolist()
    mask = v.loss_mask(ids)
    assert mask.sum() == 4 and ids[mask][-1] == EOS        # 3 structure tokens + <eos>
    assert (v.labels(ids)[~mask] == IGNORE_INDEX).all()
    assert np.array_equal(ids[: len(v.prompt("MKX"))], v.prompt("MKX"))
    v.save(tmp_path / "vocab.json")
    w = Vocab.load(tmp_path)
    assert w.to_dict() == v.to_dict()


@pytest.mark.parametrize("interleaved", [False, True])
def test_example_length_rule(interleaved):
    """The one length rule: 2L+4 tokens (plain), 2L+3 (interleaved), and its inverse."""
    v = Vocab.for_kind("3di", interleaved=interleaved)
    for L in (1, 7, 1024):
        assert v.example_length(L) == len(v.encode("A" * L, np.zeros(L, int))) == 2 * L + 4 - interleaved
        assert v.max_residues(v.example_length(L)) == L and v.max_residues(v.example_length(L) - 1) == L - 1
    assert v.example_length(1024) == 2052 - interleaved and v.max_residues(2048) == 1022


def test_3di_vocab():
    v = Vocab.for_kind("3di")
    codes = v.threedi_codes("DVPL")
    assert v.symbols(codes) == "DVPL" and v.n_struct == 20


def test_token_shards_roundtrip(tmp_path):
    v = Vocab.for_kind("3di")
    w = TokenShardWriter(tmp_path, "train", 0)
    ex = [v.encode("ACD", v.threedi_codes("DVL")), v.encode("MK", v.threedi_codes("PP"))]
    w.add(ex[0], "p1", 5, 3); w.add(ex[1], "p2", 9, 2, crop_start=4)
    index = tmp_path / f"{shard_stem('train', 0)}.idx.npz"
    assert not index.exists()          # the index appears last, when the shard is complete
    w.close()
    assert index.exists()
    w = TokenShardWriter(tmp_path, "train", 1); w.add(ex[1], "p3", 11, 2); w.close()
    ds = TokenDataset(tmp_path, "train")
    # the index columns are read only when asked for: one shard's by meta(i), all by the properties
    assert ds.meta(2) == ("p3", 11, 0, 2) and ds.meta(1) == ("p2", 9, 4, 2) and ds._columns == {}
    assert ds.shard_of(1) == 0 and ds.shard_of(2) == 1 and ds[-1].tolist() == ex[1].tolist()
    again = pickle.loads(pickle.dumps(ds))         # DataLoader workers started with spawn: no token data copied
    assert len(pickle.dumps(ds)) < 2000 and [again[i].tolist() for i in range(3)] == [ds[i].tolist() for i in range(3)]
    assert len(ds) == 3 and ds.ids.tolist() == ["p1", "p2", "p3"]
    for i, e in enumerate([ex[0], ex[1], ex[1]]):
        assert ds[i].tolist() == e.tolist()
    assert ds.db_index.tolist() == [5, 9, 11] and ds.crop_start.tolist() == [0, 4, 0]
    assert ds.n_tokens == sum(len(e) for e in [ex[0], ex[1], ex[1]])


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """mkstemp's private 0600 must not leak into artifacts that a cluster group shares."""
    import os

    from tokenfold.artifacts import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]     # no temp file left behind
