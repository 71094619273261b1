"""The minimal vocabulary of the translator LM, and how one example becomes a token sequence.

Token ids::

    0 <pad>  1 <bos>  2 <sep>  3 <eos>  4 <3di>  5 <esm>  6 <geo>  7 <kanzi>   specials
    8..28    the 20 amino acids + X                                           (`aa_offset`)
    29..     the K structure tokens of this vocabulary's kind                 (`struct_offset`..`struct_end`)
    29+K     <aa>: only in struct2seq vocabularies (appended, so no other id moves)

A kind added after the first four (``6d``) has its marker at id 8, after the eight original
specials, and its amino acids, structure tokens (and <aa>) one id later; the ids of the first four
kinds' vocabularies (and so their token shards and checkpoints) never change.

Every example has a **prompt part** (what the model reads: one token per residue of the *source*) and
a **generated part** (what it learns to write: one token per residue of the *target*, then <eos>).
The direction (`DIRECTIONS`) says which side is which:

    seq2struct  source = amino acids,       target = structure tokens (the default; folding)
    struct2seq  source = structure tokens,  target = amino acids     (inverse folding)

Example layouts (L residues, x_i source tokens, y_i target tokens, <m> the target marker: <kind> for
seq2struct, <aa> for struct2seq)::

    plain        <bos> x_1 .. x_L <sep> <m> y_1 .. y_L <eos>
    interleaved  <bos> <m> x_1 y_1 x_2 y_2 .. x_L y_L <eos>

so seq2struct reads ``<bos> a_1..a_L <sep> <kind> s_1..s_L <eos>`` and struct2seq
``<bos> s_1..s_L <sep> <aa> a_1..a_L <eos>``. The loss is taken only where the *target* of a position
is a target token or <eos> (`loss_mask`), never on the prompt. Generation prompts with everything
up to y_1 (`prompt`) and picks among `choice_range` (the structure tokens; for struct2seq the 20
amino acids, never X). An example of L residues has 2L+4 tokens (plain) or 2L+3 (interleaved):
`example_length`, and its inverse `max_residues`, the one length rule of stages 04 (crop), 05
(--max-len, model positions), 06 and predict.

Inside a pretrained LLM (stage 05 --init-from) the same tokens are added to its tokenizer, in this
order, after its own: every id above is shifted by ``id_offset`` (the LLM's vocabulary size), and the
instance attributes ``pad``, ``bos``, ``sep``, ``eos``, ``kind_id``, ``aa_offset``, ``struct_offset``,
``struct_end``, ``aa_marker_id`` and ``size`` say where they are (`tokenfold.hf_vocab`). Stage-04
shards keep the ids above.

``vocab.json`` format version 2 records the direction; version 1 files (before directions existed)
load as seq2struct vocabularies, with the same ids.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifacts import write_json_atomic

SPECIALS = ("<pad>", "<bos>", "<sep>", "<eos>", "<3di>", "<esm>", "<geo>", "<kanzi>")
PAD, BOS, SEP, EOS = 0, 1, 2, 3
KIND_MARKER = {"3di": 4, "esm": 5, "geo": 6, "kanzi": 7, "6d": 8}
AA_MARKER = "<aa>"   # struct2seq's target marker, appended after the structure tokens
AA_LETTERS = "ACDEFGHIKLMNPQRSTVWYX"
N_AA_DESIGN = 20     # struct2seq generates the 20 standard amino acids (AA_LETTERS[:20]), never X
THREEDI_LETTERS = "ACDEFGHIKLMNPQRSTVWY"
SEQ2STRUCT, STRUCT2SEQ = "seq2struct", "struct2seq"
DIRECTIONS = (SEQ2STRUCT, STRUCT2SEQ)
VERSION = 2          # 2: "direction" (version 1 files load as seq2struct)


def letter_lut(letters: str, default: int) -> np.ndarray:
    """int64 [256]: byte -> position of the letter in `letters` (either case), `default` elsewhere."""
    lut = np.full(256, default, dtype=np.int64)
    for i, c in enumerate(letters):
        lut[ord(c)] = lut[ord(c.lower())] = i
    return lut


AA_LUT = letter_lut(AA_LETTERS, AA_LETTERS.index("X"))   # unknown letters read as X
THREEDI_LUT = letter_lut(THREEDI_LETTERS, -1)
IGNORE_INDEX = -100  # label value the HF loss ignores


@dataclass
class Vocab:
    kind: str                  # 3di | esm | geo | kanzi | 6d
    struct_symbols: list[str]  # printable form of each structure token, code k -> struct_symbols[k]
    interleaved: bool = False
    meta: dict = field(default_factory=dict)
    direction: str = SEQ2STRUCT
    id_offset: int = 0         # > 0: the ids live inside a pretrained LLM's vocabulary (module docstring)

    def __post_init__(self):
        if self.kind not in KIND_MARKER:
            raise ValueError(f"unknown structure token kind {self.kind!r}; expected one of {sorted(KIND_MARKER)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; expected one of {', '.join(DIRECTIONS)}")
        o = self.id_offset
        self.pad, self.bos, self.sep, self.eos = PAD + o, BOS + o, SEP + o, EOS + o
        self.specials = SPECIALS + ((f"<{self.kind}>",) if KIND_MARKER[self.kind] >= len(SPECIALS) else ())
        self.aa_offset = o + len(self.specials)
        self.struct_offset = self.aa_offset + len(AA_LETTERS)
        self.struct_end = self.struct_offset + len(self.struct_symbols)
        self.kind_id = KIND_MARKER[self.kind] + o
        self.inverse = self.direction == STRUCT2SEQ
        self.aa_marker_id = self.struct_end if self.inverse else None
        self.size = self.struct_end + (1 if self.inverse else 0)
        self._aa_lut = AA_LUT + self.aa_offset
        # the generated part: which tokens are targets, which ones constrained decoding picks from
        self.target_marker = self.aa_marker_id if self.inverse else self.kind_id
        self.target_range = ((self.aa_offset, self.struct_offset) if self.inverse
                             else (self.struct_offset, self.struct_end))
        self.choice_range = ((self.aa_offset, self.aa_offset + N_AA_DESIGN) if self.inverse
                             else self.target_range)

    # ---- construction / persistence
    @classmethod
    def for_kind(cls, kind: str, n_struct: int | None = None, interleaved: bool = False,
                 direction: str = SEQ2STRUCT, **meta) -> "Vocab":
        if kind == "3di":
            symbols = list(THREEDI_LETTERS)
        else:
            if not n_struct:
                raise ValueError(f"kind {kind!r} needs the number of structure tokens")
            symbols = [f"{kind}{k}" for k in range(n_struct)]
        return cls(kind=kind, struct_symbols=symbols, interleaved=interleaved, meta=meta, direction=direction)

    @property
    def n_struct(self) -> int:
        return len(self.struct_symbols)

    @property
    def tokens(self) -> list[str]:
        struct = [f"<{s}>" if self.kind != "3di" else f"[{s}]" for s in self.struct_symbols]
        return list(self.specials) + list(AA_LETTERS) + struct + ([AA_MARKER] if self.inverse else [])

    def to_dict(self) -> dict:
        return {"format": "tokenfold-vocab", "version": VERSION, "kind": self.kind, "direction": self.direction,
                "interleaved": self.interleaved, "n_struct": self.n_struct, "struct_symbols": self.struct_symbols,
                "aa_offset": self.aa_offset, "struct_offset": self.struct_offset, "size": self.size,
                "target_marker": self.target_marker, "specials": list(self.specials), "aa_letters": AA_LETTERS,
                "tokens": self.tokens, "meta": self.meta, **({"id_offset": self.id_offset} if self.id_offset else {})}

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        d = json.loads(path.read_text())
        if d.get("format") != "tokenfold-vocab":
            raise ValueError(f"{path}: not a tokenfold vocabulary")
        if d.get("version", 1) not in (1, VERSION):
            raise ValueError(f"{path}: vocabulary format version {d.get('version')}; this code reads 1 and {VERSION}")
        v = cls(kind=d["kind"], struct_symbols=d["struct_symbols"], interleaved=d["interleaved"], meta=d.get("meta", {}),
                direction=d.get("direction", SEQ2STRUCT), id_offset=int(d.get("id_offset", 0)))
        if v.size != d["size"]:
            raise ValueError(f"{path}: size {d['size']} does not match its symbols ({v.size})")
        return v

    # ---- per-token maps
    def aa_ids(self, aa: str) -> np.ndarray:
        return self._aa_lut[np.frombuffer(aa.encode("ascii"), dtype=np.uint8)]

    def struct_ids(self, codes) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_struct):
            raise ValueError(f"structure code outside 0..{self.n_struct - 1}")
        return codes + self.struct_offset

    def threedi_codes(self, ss: str) -> np.ndarray:
        """3Di letters -> codes 0..19 (the order of THREEDI_LETTERS)."""
        codes = THREEDI_LUT[np.frombuffer(ss.encode("ascii"), dtype=np.uint8)]
        if (codes < 0).any():
            raise ValueError(f"not a 3Di letter in {ss!r}")
        return codes

    def is_struct(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.struct_offset) & (ids < self.struct_end)

    def is_target(self, ids) -> np.ndarray:
        """True where a token belongs to the generated part's kind (structure tokens; struct2seq: amino acids)."""
        ids = np.asarray(ids)
        lo, hi = self.target_range
        return (ids >= lo) & (ids < hi)

    # ---- the two sides of an example: source (prompt part) and target (generated part)
    def source(self, aa: str, codes):
        """What the prompt part holds of a protein: its amino acids (seq2struct) or structure codes."""
        return np.asarray(codes, dtype=np.int64) if self.inverse else aa

    def source_ids(self, source) -> np.ndarray:
        """Token ids of a source: an amino-acid string (seq2struct) or structure codes (struct2seq)."""
        return self.struct_ids(source) if self.inverse else self.aa_ids(source)

    def source_codes(self, aa: str, codes) -> np.ndarray:
        """The source as integer codes: amino-acid indices 0..20 (AA_LETTERS; seq2struct) or structure codes."""
        return np.asarray(codes, dtype=np.int64) if self.inverse else AA_LUT[np.frombuffer(aa.encode("ascii"), np.uint8)]

    def target_codes(self, aa: str, codes) -> np.ndarray:
        """The target as integer codes: structure codes (seq2struct) or amino-acid indices 0..20 (struct2seq)."""
        return AA_LUT[np.frombuffer(aa.encode("ascii"), np.uint8)] if self.inverse else np.asarray(codes, np.int64)

    @property
    def n_source(self) -> int:
        """Number of source codes: the structure tokens (struct2seq) or the 21 amino-acid letters."""
        return self.n_struct if self.inverse else len(AA_LETTERS)

    @property
    def n_target(self) -> int:
        """Number of target codes: the 21 amino-acid letters (struct2seq) or the structure tokens."""
        return len(AA_LETTERS) if self.inverse else self.n_struct

    @property
    def target_symbols(self) -> list[str]:
        return list(AA_LETTERS) if self.inverse else self.struct_symbols

    def target_text(self, codes) -> str:
        """Printable target codes: an amino-acid string (struct2seq), else `symbols`."""
        return "".join(AA_LETTERS[int(c)] for c in codes) if self.inverse else self.symbols(codes)

    # ---- examples
    def example_length(self, n_res: int) -> int:
        """Tokens of the example of a protein of n_res residues: 2L+4 (plain) or 2L+3 (interleaved)."""
        return 2 * int(n_res) + (3 if self.interleaved else 4)

    def max_residues(self, n_tokens: int) -> int:
        """The longest protein whose example fits in n_tokens tokens (inverse of `example_length`)."""
        return max(0, (int(n_tokens) - self.example_length(0)) // 2)

    def prompt(self, source) -> np.ndarray:
        """Tokens before y_1 (module docstring); `source` as `source_ids` takes it."""
        if self.interleaved:
            return np.array([self.bos, self.target_marker], dtype=np.int64)
        return np.concatenate([[self.bos], self.source_ids(source), [self.sep, self.target_marker]]).astype(np.int64)

    def encode(self, aa: str, codes) -> np.ndarray:
        """One training example as token ids (int64); len(codes) must equal len(aa)."""
        codes = np.asarray(codes)
        if len(codes) != len(aa):
            raise ValueError(f"{len(aa)} residues but {len(codes)} structure tokens")
        a, s = self.aa_ids(aa), self.struct_ids(codes)
        src, tgt = (s, a) if self.inverse else (a, s)
        if self.interleaved:
            tgt = np.stack([src, tgt], axis=1).reshape(-1)   # x_1 y_1 x_2 y_2 ...
        return np.concatenate([self.prompt(codes if self.inverse else aa), tgt, [self.eos]]).astype(np.int64)

    def decode(self, ids) -> tuple[str, np.ndarray]:
        """Inverse of `encode`: (amino acids, structure codes)."""
        ids = np.asarray(ids, dtype=np.int64)
        aa_mask = (ids >= self.aa_offset) & (ids < self.struct_offset)
        aa = "".join(AA_LETTERS[i - self.aa_offset] for i in ids[aa_mask])
        codes = ids[self.is_struct(ids)] - self.struct_offset
        return aa, codes

    def loss_mask(self, ids) -> np.ndarray:
        """bool, same shape as ids: True where the token is a training *target* (target token or <eos>)."""
        ids = np.asarray(ids)
        return self.is_target(ids) | (ids == self.eos)

    def labels(self, ids) -> np.ndarray:
        """HF-style labels: the ids where `loss_mask`, IGNORE_INDEX elsewhere (HF shifts internally)."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(self.loss_mask(ids), ids, IGNORE_INDEX)

    def symbols(self, codes) -> str:
        """Printable text of structure codes: 3Di letters joined, other kinds space-separated numbers."""
        if self.kind == "3di":
            return "".join(self.struct_symbols[int(c)] for c in codes)
        return " ".join(str(int(c)) for c in codes)

    def parse_symbols(self, text: str) -> np.ndarray:
        """Inverse of `symbols`: 3Di letters (either case, whitespace ignored) or space-separated code numbers."""
        if self.kind == "3di":
            return self.threedi_codes("".join(text.split()))
        try:
            codes = np.array([int(w) for w in text.split()], dtype=np.int64)
        except ValueError:
            raise ValueError(f"{self.kind} tokens are space-separated numbers 0..{self.n_struct - 1}") from None
        self.struct_ids(codes)   # range check
        return codes
