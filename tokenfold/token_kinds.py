"""Stage 04's token kinds: what differs between them is the vocabulary and the codes of a chain.

* ``3di``   Foldseek's 20 3Di states, read from the DB (`ThreeDiKind`).
* ``esm``   the stage-03 codebook code of each residue's ESM-2 vector: from the stage-02 store when it
            holds full per-shard embeddings, else computed on the fly with the codebook's model (`EsmKind`).
* ``geo``   our decodable C-alpha tokens (`tokenfold.geotokens`), with a codebook fit on TRAIN chains
            beforehand (`tokenfold.geo_fit`) (`GeoKind`).
* ``kanzi`` Kanzi's FSQ tokens (`tokenfold.kanzi`, needs the package and ``--kanzi-checkpoint``; chains of at
            most 255 residues) (`KanziKind`).
* ``6d``    the hand-crafted baseline codebook: binned C-alpha angles, secondary structure and
            neighbour density (`tokenfold.sixd`), fixed bins, nothing fitted (`SixDKind`).

geo and kanzi encode the kept window of a chain on its own (a cropped example decodes by itself);
3di, esm and 6d tokens are computed on the whole chain and cut (`tokenfold.tokenize` picks the window).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import layout
from .artifacts import sha256_file
from .geotokens import GeoCodebook, segment_starts
from .metrics import segment_rmsd
from .vocab import Vocab

if TYPE_CHECKING:
    from .tokenize import TokenizeConfig

log = logging.getLogger("tokenfold.token_kinds")

KINDS = ("3di", "esm", "geo", "kanzi", "6d")


class TokenKind:
    """What differs between kinds: the vocabulary and the codes of a batch of (cropped) chains."""

    needs = "nothing"      # which DB data an entry must have: ss | ca | nothing
    chunk = 512            # chains handed to `codes` at a time (bounds memory)

    def __init__(self, cfg: TokenizeConfig):
        self.cfg = cfg

    def vocab(self) -> Vocab:
        raise NotImplementedError

    def codes(self, items: list[tuple], k: int, first_index: int) -> list:
        """items: (record, a, b) with the kept window [a, b) of entries of DB shard k (whose first global
        index is first_index); returns codes [b-a] or a one-line reason string for each."""
        raise NotImplementedError

    def extra(self, items, results) -> dict:
        """Per-example extra statistics (geo: reconstruction RMSD)."""
        return {}


class ThreeDiKind(TokenKind):
    """Foldseek's 3Di letters, as stored in the DB."""

    needs = "ss"

    def __init__(self, cfg: TokenizeConfig):
        super().__init__(cfg)
        self._v = Vocab.for_kind("3di", interleaved=cfg.interleaved, direction=cfg.direction)

    def vocab(self) -> Vocab:
        return self._v

    def codes(self, items, k, first_index):
        out = []
        for rec, a, b in items:
            try:
                out.append(self._v.threedi_codes(rec.ss)[a:b])
            except ValueError as e:
                out.append(str(e)[:120])
        return out


class GeoKind(TokenKind):
    """Closed-loop geo codes of the kept C-alpha window; the vocabulary points to the codebook file."""

    needs = "ca"

    def __init__(self, cfg: TokenizeConfig, codebook: GeoCodebook):
        super().__init__(cfg)
        self.cb = codebook

    def vocab(self) -> Vocab:
        out = self.cfg.out_dir
        path = Path(self.cb.path).resolve()
        ref = {"path": str(path), "relpath": os.path.relpath(path, out.resolve()), "sha256": sha256_file(path),
               "K": self.cb.K, "n_tokens": self.cb.n_tokens, "start_code": self.cb.START,
               "break_code": self.cb.BREAK, "encode_beam": self.cfg.geo_beam}
        return Vocab.for_kind("geo", n_struct=self.cb.n_tokens, interleaved=self.cfg.interleaved,
                              direction=self.cfg.direction, geo_codebook=ref)

    def codes(self, items, k, first_index):
        out: list = [None] * len(items)
        ok = []
        for i, (rec, a, b) in enumerate(items):
            if not np.isfinite(rec.ca[a:b]).all():
                out[i] = "C-alpha coordinates contain NaN"
            else:
                ok.append(i)
        cas = [items[i][0].ca[items[i][1]:items[i][2]] for i in ok]
        gaps = [items[i][0].gap_before[items[i][1]:items[i][2]] for i in ok]
        for i, c in zip(ok, self.cb.encode_many(cas, gaps, beam=self.cfg.geo_beam)):
            out[i] = c
        return out

    def extra(self, items, results) -> dict:
        rmsd = np.full(len(items), np.nan)
        nseg = np.zeros(len(items), np.int32)
        ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
        dec = self.cb.decode_many([results[i] for i in ok])
        for i, x in zip(ok, dec):
            rec, a, b = items[i]
            starts = segment_starts(rec.ca[a:b], rec.gap_before[a:b])
            rmsd[i] = segment_rmsd(x, rec.ca[a:b], starts)
            nseg[i] = int(starts.sum())
        return {"rmsd": rmsd, "n_segments": nseg}


class EsmKind(TokenKind):
    """Codes of the stage-03 codebook. Vectors come from the stage-02 store when it holds full per-shard
    embeddings of this DB; otherwise (a sampled store, or none) they are computed here with the
    codebook's own model and layer (`tokenfold.esm_embed.embed`, same windowing rule as stage 02)."""

    needs = "nothing"      # a sequence is enough
    chunk = 64             # on-the-fly vectors of a 650M ESM-2: 64 chains x 300 x 1280 floats ~ 100 MB

    def __init__(self, cfg: TokenizeConfig):
        super().__init__(cfg)
        from .codebook import Codebook

        self.path = Path(cfg.codebook) if cfg.codebook else layout.codebook_path(512)
        if not self.path.exists():
            raise FileNotFoundError(f"stage-03 codebook not found: {self.path} (run 03_train_codebook.py or pass --codebook)")
        self.cb = Codebook.load(self.path)             # checksum-verified
        m = self.cb.meta
        self.random_weights = bool(m.get("random_weights"))
        if self.random_weights and not cfg.random_weights_for_testing:
            raise ValueError(f"{self.path} was made from a RANDOM-weights ESM-2 (test/demo only); pass "
                             "--random-weights-for-testing to tokenize with it on purpose")
        if cfg.embeddings:
            emb_dir = Path(cfg.embeddings)
        elif m.get("embeddings_dir"):
            emb_dir = Path(m["embeddings_dir"])
        else:
            from .extract import default_out_dir

            emb_dir = default_out_dir(str(m["esm_model"]), int(m["layer"]))
        if cfg.direction == "struct2seq":
            log.warning("esm tokens are computed from the amino-acid sequence itself: struct2seq on them measures "
                        "how much of the sequence the codes keep, not inverse folding from structure")
        self.emb_dir, self.store, self.model = emb_dir, None, None
        if (emb_dir / "manifest.json").exists():
            from .embedding_store import EmbeddingStore

            store = EmbeddingStore(emb_dir)
            if str(store.meta.get("model")) != str(m.get("esm_model")) or int(store.meta.get("layer", -1)) != int(m["layer"]):
                raise ValueError(f"{emb_dir}: embeddings of {store.meta.get('model')} layer {store.meta.get('layer')}, "
                                 f"but the codebook was trained on {m.get('esm_model')} layer {m['layer']}")
            if store.mode == "full":
                self.store = store
        spec = cfg.esm_model or (m.get("esm_model_path") if m.get("esm_model_path") and Path(m["esm_model_path"]).exists()
                                 else m["esm_model"])
        self.model_spec = str(spec)
        log.info("esm tokens: codebook %s (K=%d, %s layer %s%s); vectors %s", self.path, self.cb.K, m.get("esm_model"),
                 m["layer"], ", RANDOM WEIGHTS" if self.random_weights else "",
                 f"from {emb_dir}" if self.store is not None else f"computed on the fly with {self.model_spec}")

    def vocab(self) -> Vocab:
        m = self.cb.meta
        ref = {"path": str(self.path.resolve()), "sha256": sha256_file(self.path), "esm_model": m.get("esm_model"),
               "layer": m.get("layer"), "normalize": m.get("normalize"), "K": self.cb.K,
               "random_weights": self.random_weights,
               "vectors": str(self.emb_dir) if self.store is not None else f"computed on the fly ({self.model_spec})"}
        # top-level labels, as the kanzi kind's: stages 05/06 and the sweep read them from vocab.meta
        extra = {"random_weights": True, "WARNING": f"esm tokens from a RANDOM-weights ESM-2 ({m.get('esm_model')}): "
                 "test/demo only, no learned information"} if self.random_weights else {}
        return Vocab.for_kind("esm", n_struct=self.cb.K, interleaved=self.cfg.interleaved,
                              direction=self.cfg.direction, esm_codebook=ref, **extra)

    def _embed(self, seqs: list[str]) -> list[np.ndarray]:
        from .esm_checkpoint import load_esm
        from .esm_embed import embed

        if self.model is None:
            self.model, self.alphabet, info = load_esm(self.model_spec, allow_random=self.cfg.random_weights_for_testing,
                                                       device=self.cfg.device)
            if bool(info.get("random_weights")) != self.random_weights:
                raise ValueError(f"{self.model_spec}: random_weights={info.get('random_weights')} but the codebook "
                                 f"says {self.random_weights}: not the model the codebook was trained on")
            if int(info["embed_dim"]) != self.cb.dim:
                raise ValueError(f"{self.model_spec}: dimension {info['embed_dim']}, the codebook's is {self.cb.dim}")
        return embed(self.model, self.alphabet, seqs, layer=int(self.cb.meta["layer"]), device=self.cfg.device)

    def codes(self, items, k, first_index):
        if self.store is not None:
            sh = self.store.shard(k)
            js = [rec.index - first_index for rec, _, _ in items]
            for (rec, _, _), j in zip(items, js):
                if j >= len(sh) or sh.ids[j] != rec.id:
                    raise ValueError(f"{sh.path}: entry {j} is not {rec.id!r} (embeddings made from another DB?)")
            embs = sh.get_many(js)
        else:
            embs = self._embed([rec.aa for rec, _, _ in items])
        out = []
        for (rec, a, b), e in zip(items, embs):
            if len(e) != rec.length:
                out.append(f"{len(e)} embedding rows for {rec.length} residues")
                continue
            c = np.asarray(self.cb.assign(np.asarray(e[a:b], dtype=np.float32)), dtype=np.int64)
            out.append(c if (c >= 0).all() else "non-finite embedding vector")
        return out


class KanziKind(TokenKind):
    """Kanzi's tokens of the kept C-alpha window (at most `kanzi.MAX_RESIDUES`), one chain at a time."""

    needs = "ca"

    def __init__(self, cfg: TokenizeConfig):
        super().__init__(cfg)
        from .kanzi import KanziTokenizer, resolve_checkpoint

        self.tok = KanziTokenizer.from_checkpoint(
            resolve_checkpoint(cfg.kanzi_checkpoint, cfg.random_weights_for_testing, cfg.seed), device=cfg.device,
            allow_random=cfg.random_weights_for_testing, n_decode_steps=cfg.kanzi_decode_steps, seed=cfg.seed)

    def vocab(self) -> Vocab:
        m = self.tok.meta
        extra = {"random_weights": True, "WARNING": m["WARNING"]} if self.tok.random_weights else {}
        return Vocab.for_kind("kanzi", n_struct=self.tok.n_tokens, interleaved=self.cfg.interleaved,
                              direction=self.cfg.direction, kanzi=m, **extra)

    def codes(self, items, k, first_index):
        out = []
        for rec, a, b in items:
            try:
                out.append(self.tok.encode(rec.ca[a:b]))
            except ValueError as e:
                out.append(str(e)[:120])
        return out


class SixDKind(TokenKind):
    """The "6D" codes of the whole chain (neighbour density needs all of it), cut to the kept window."""

    needs = "ca"

    def vocab(self) -> Vocab:
        from . import sixd

        return Vocab.for_kind("6d", n_struct=sixd.N_CODES, interleaved=self.cfg.interleaved, sixd=sixd.definition())

    def codes(self, items, k, first_index):
        from . import sixd

        out = []
        for rec, a, b in items:
            try:
                out.append(sixd.encode(rec.ca, rec.gap_before)[a:b])
            except ValueError as e:
                out.append(str(e)[:120])
        return out


def make_kind(cfg: TokenizeConfig, geo_codebook: GeoCodebook | None = None) -> TokenKind:
    """The token kind `cfg.kind` (geo needs its fitted codebook)."""
    if cfg.kind == "3di":
        return ThreeDiKind(cfg)
    if cfg.kind == "geo":
        return GeoKind(cfg, geo_codebook)
    if cfg.kind == "esm":
        return EsmKind(cfg)
    if cfg.kind == "6d":
        return SixDKind(cfg)
    return KanziKind(cfg)
