"""The one FASTA parser (tokenfold/fasta.py): where records start, their ids and sequences, ranges."""
from tokenfold.fasta import read_fasta, read_records, record_offsets


def test_records_ids_sequences_and_ranges(tmp_path):
    text = ("text before the first record\n>a first protein\nMKV\n  LA G\n>\nACD\n"
            ">b\r\nMK\r\nV*\r\n>c\nM>K\n>d\n")
    f = tmp_path / "x.fa"
    f.write_bytes(text.encode())
    # ids: the header's first word (record_<n> when it has none); '>' starts a record only at a line start
    assert read_fasta(f) == [("a", "MKVLAG"), ("record_2", "ACD"), ("b", "MKV*"), ("c", "M>K"), ("d", "")]
    offsets = record_offsets(f)
    assert len(offsets) == 6 and offsets[-1] == len(text) and all(text[o] == ">" for o in offsets[:-1])
    records = read_records(f, offsets, 0, 5)
    assert records[1] == ("", "ACD")  # a record without an id: the caller names or rejects it
    for a in range(6):
        for b in range(a, 6):
            assert read_records(f, offsets, a, b) == records[a:b]
