"""The minimal vocabulary of the translator LM, and how one example becomes a token sequence.

Token ids::

    0 <pad>  1 <bos>  2 <sep>  3 <eos>  4 <3di>  5 <esm>  6 <geo>  7 <kanzi>   specials
    8..28    the 20 amino acids + X                                           (`aa_offset`)
    29..     the K structure tokens of this vocabulary's kind                 (`struct_offset`)

A kind added after the first four (``6d``) has its marker at id 8, after the eight original
specials, and its amino acids and structure tokens one id later; the ids of the first four kinds'
vocabularies (and so their token shards and checkpoints) never change.

Example layouts (L residues, a_i amino acids, s_i structure tokens)::

    plain        <bos> a_1 .. a_L <sep> <kind> s_1 .. s_L <eos>
    interleaved  <bos> <kind> a_1 s_1 a_2 s_2 .. a_L s_L <eos>

Inside a pretrained LLM (stage 05 --init-from) the same tokens are added to its tokenizer, in this
order, after its own: every id above is shifted by ``id_offset`` (the LLM's vocabulary size), and the
instance attributes ``pad``, ``bos``, ``sep``, ``eos``, ``kind_id``, ``aa_offset``, ``struct_offset`` and
``size`` say where they are (`tokenfold.hf_vocab`). Stage-04 shards keep the ids above.

The loss is taken only where the *target* is a structure token or <eos> (`loss_mask`), never on
amino acids or the prompt. Generation prompts with everything up to the first structure token.
An example of L residues has 2L+4 tokens (plain) or 2L+3 (interleaved): `example_length`, and its
inverse `max_residues`, the one length rule of stages 04 (crop), 05 (--max-len, model positions), 06
and predict.
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
AA_LETTERS = "ACDEFGHIKLMNPQRSTVWYX"
THREEDI_LETTERS = "ACDEFGHIKLMNPQRSTVWY"


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
    id_offset: int = 0         # > 0: the ids live inside a pretrained LLM's vocabulary (module docstring)

    def __post_init__(self):
        if self.kind not in KIND_MARKER:
            raise ValueError(f"unknown structure token kind {self.kind!r}; expected one of {sorted(KIND_MARKER)}")
        o = self.id_offset
        self.pad, self.bos, self.sep, self.eos = PAD + o, BOS + o, SEP + o, EOS + o
        self.specials = SPECIALS + ((f"<{self.kind}>",) if KIND_MARKER[self.kind] >= len(SPECIALS) else ())
        self.aa_offset = o + len(self.specials)
        self.struct_offset = self.aa_offset + len(AA_LETTERS)
        self.size = self.struct_offset + len(self.struct_symbols)
        self.kind_id = KIND_MARKER[self.kind] + o
        self._aa_lut = AA_LUT + self.aa_offset

    # ---- construction / persistence
    @classmethod
    def for_kind(cls, kind: str, n_struct: int | None = None, interleaved: bool = False, **meta) -> "Vocab":
        if kind == "3di":
            symbols = list(THREEDI_LETTERS)
        else:
            if not n_struct:
                raise ValueError(f"kind {kind!r} needs the number of structure tokens")
            symbols = [f"{kind}{k}" for k in range(n_struct)]
        return cls(kind=kind, struct_symbols=symbols, interleaved=interleaved, meta=meta)

    @property
    def n_struct(self) -> int:
        return len(self.struct_symbols)

    @property
    def tokens(self) -> list[str]:
        return list(self.specials) + list(AA_LETTERS) + [f"<{s}>" if self.kind != "3di" else f"[{s}]" for s in self.struct_symbols]

    def to_dict(self) -> dict:
        return {"format": "tokenfold-vocab", "version": 1, "kind": self.kind, "interleaved": self.interleaved,
                "n_struct": self.n_struct, "struct_symbols": self.struct_symbols,
                "aa_offset": self.aa_offset, "struct_offset": self.struct_offset, "size": self.size,
                "specials": list(self.specials), "aa_letters": AA_LETTERS, "tokens": self.tokens, "meta": self.meta,
                **({"id_offset": self.id_offset} if self.id_offset else {})}

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
        v = cls(kind=d["kind"], struct_symbols=d["struct_symbols"], interleaved=d["interleaved"],
                meta=d.get("meta", {}), id_offset=int(d.get("id_offset", 0)))
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
        return (ids >= self.struct_offset) & (ids < self.size)

    # ---- examples
    def example_length(self, n_res: int) -> int:
        """Tokens of the example of a protein of n_res residues: 2L+4 (plain) or 2L+3 (interleaved)."""
        return 2 * int(n_res) + (3 if self.interleaved else 4)

    def max_residues(self, n_tokens: int) -> int:
        """The longest protein whose example fits in n_tokens tokens (inverse of `example_length`)."""
        return max(0, (int(n_tokens) - self.example_length(0)) // 2)

    def prompt(self, aa: str) -> np.ndarray:
        """Tokens before the first structure token (plain layout) / before a_1 (interleaved)."""
        if self.interleaved:
            return np.array([self.bos, self.kind_id], dtype=np.int64)
        return np.concatenate([[self.bos], self.aa_ids(aa), [self.sep, self.kind_id]]).astype(np.int64)

    def encode(self, aa: str, codes) -> np.ndarray:
        """One training example as token ids (int64); len(codes) must equal len(aa)."""
        codes = np.asarray(codes)
        if len(codes) != len(aa):
            raise ValueError(f"{len(aa)} residues but {len(codes)} structure tokens")
        body = self.struct_ids(codes)
        if self.interleaved:
            body = np.stack([self.aa_ids(aa), body], axis=1).reshape(-1)   # a_1 s_1 a_2 s_2 ...
        return np.concatenate([self.prompt(aa), body, [self.eos]]).astype(np.int64)

    def decode(self, ids) -> tuple[str, np.ndarray]:
        """Inverse of `encode`: (amino acids, structure codes)."""
        ids = np.asarray(ids, dtype=np.int64)
        aa_mask = (ids >= self.aa_offset) & (ids < self.struct_offset)
        aa = "".join(AA_LETTERS[i - self.aa_offset] for i in ids[aa_mask])
        codes = ids[self.is_struct(ids)] - self.struct_offset
        return aa, codes

    def loss_mask(self, ids) -> np.ndarray:
        """bool, same shape as ids: True where the token is a training *target* (structure or <eos>)."""
        ids = np.asarray(ids)
        return self.is_struct(ids) | (ids == self.eos)

    def labels(self, ids) -> np.ndarray:
        """HF-style labels: the ids where `loss_mask`, IGNORE_INDEX elsewhere (HF shifts internally)."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(self.loss_mask(ids), ids, IGNORE_INDEX)

    def symbols(self, codes) -> str:
        """Printable text of structure codes: 3Di letters joined, other kinds space-separated numbers."""
        if self.kind == "3di":
            return "".join(self.struct_symbols[int(c)] for c in codes)
        return " ".join(str(int(c)) for c in codes)
