"""The direction of a vocabulary (seq2struct / struct2seq): layouts, targets, ids, vocab.json versions.
(The seq2struct layouts and the length rule: tests/test_formats.py.)"""
import json

import numpy as np
import pytest

from tokenfold.vocab import BOS, EOS, SEP, Vocab

AA, SS = "MKX", "DVL"


@pytest.mark.parametrize("kind", ["3di", "geo"])
def test_struct2seq_appends_its_marker_and_moves_no_id(kind):
    n = None if kind == "3di" else 66
    fwd, inv = Vocab.for_kind(kind, n_struct=n), Vocab.for_kind(kind, n_struct=n, direction="struct2seq")
    assert inv.tokens[:fwd.size] == fwd.tokens and inv.tokens[fwd.size:] == ["<aa>"]
    assert inv.size == fwd.size + 1 and inv.aa_marker_id == fwd.size == inv.struct_end
    assert (inv.aa_offset, inv.struct_offset) == (fwd.aa_offset, fwd.struct_offset)
    assert fwd.aa_marker_id is None and fwd.target_marker == fwd.kind_id


def test_struct2seq_layouts_and_targets():
    v = Vocab.for_kind("3di", direction="struct2seq")
    s, a, m = v.struct_ids(v.threedi_codes(SS)), v.aa_ids(AA), v.aa_marker_id
    ids = v.encode(AA, v.threedi_codes(SS))
    assert ids.tolist() == [BOS, *s, SEP, m, *a, EOS]                       # <bos> s1..sL <sep> <aa> a1..aL <eos>
    assert v.loss_mask(ids).tolist() == [False] * 6 + [True] * 4            # the amino acids and <eos> only
    assert np.array_equal(v.prompt(v.threedi_codes(SS)), ids[:6])
    aa, codes = v.decode(ids)
    assert aa == AA and v.symbols(codes) == SS
    il = Vocab.for_kind("3di", direction="struct2seq", interleaved=True)
    ids = il.encode(AA, il.threedi_codes(SS))
    assert ids.tolist() == [BOS, m, s[0], a[0], s[1], a[1], s[2], a[2], EOS]  # <bos> <aa> s1 a1 s2 a2 .. <eos>
    assert il.loss_mask(ids).tolist() == [False, False, False, True, False, True, False, True, True]
    assert len(ids) == il.example_length(3) and len(v.encode(AA, v.threedi_codes(SS))) == v.example_length(3)
    # the two sides as codes; constrained decoding picks among the 20 amino acids (X is a target, not a choice)
    assert v.source_codes(AA, codes).tolist() == codes.tolist() and v.target_codes(AA, codes).tolist() == [10, 8, 20]
    assert v.choice_range == (v.aa_offset, v.aa_offset + 20) and v.target_range == (v.aa_offset, v.struct_offset)
    assert v.target_text([10, 8, 20]) == AA


def test_seq2struct_sides_are_the_other_way_round():
    v = Vocab.for_kind("3di")
    codes = v.threedi_codes(SS)
    assert v.source(AA, codes) == AA and v.source_codes(AA, codes).tolist() == [10, 8, 20]
    assert v.target_codes(AA, codes).tolist() == codes.tolist() and v.target_text(codes) == SS
    assert v.choice_range == v.target_range == (v.struct_offset, v.struct_end)
    ids = v.encode(AA, codes)
    assert v.is_target(ids).tolist() == v.is_struct(ids).tolist()


def test_vocab_json_records_the_direction_and_version_1_files_still_load(tmp_path):
    v = Vocab.for_kind("3di", interleaved=True, direction="struct2seq")
    v.save(tmp_path / "vocab.json")
    d = json.loads((tmp_path / "vocab.json").read_text())
    assert d["version"] == 2 and d["direction"] == "struct2seq" and d["tokens"][-1] == "<aa>"
    assert Vocab.load(tmp_path).to_dict() == v.to_dict()
    # a vocab.json written before directions existed (version 1: no direction, no <aa>) is a seq2struct vocabulary
    old = Vocab.for_kind("geo", n_struct=66).to_dict()
    old["version"] = 1
    for key in ("direction", "target_marker"):
        old.pop(key)
    (tmp_path / "old.json").write_text(json.dumps(old))
    w = Vocab.load(tmp_path / "old.json")
    assert w.direction == "seq2struct" and w.size == old["size"] and w.tokens == old["tokens"]
    old["version"] = 3
    (tmp_path / "new.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="version 3"):
        Vocab.load(tmp_path / "new.json")
    with pytest.raises(ValueError, match="direction"):
        Vocab.for_kind("3di", direction="sideways")


def test_structure_token_text_parses_back():
    v = Vocab.for_kind("3di", direction="struct2seq")
    assert v.symbols(v.parse_symbols("dv l\nP")) == "DVLP"
    with pytest.raises(ValueError):
        v.parse_symbols("DVB")
    g = Vocab.for_kind("geo", n_struct=66)
    assert g.parse_symbols(g.symbols([0, 65, 7])).tolist() == [0, 65, 7]
    for bad in ("0 66", "1 x"):
        with pytest.raises(ValueError):
            g.parse_symbols(bad)
