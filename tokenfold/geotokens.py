"""Geo tokens (v2): decodable C-alpha tokens that survive prediction errors (no external weights).

What a token means
------------------
Every residue gets a *placement code* a[i] in 0..K-1 (`tokenfold.geoframes`: where the C-alpha sits
relative to the three before it; K k-means vectors fit on train chains, closed-loop beam encoding).
The token of residue i is the PAIR of codes of residue i-1 and residue i::

    token[i] = a[i-1] * K + a[i]        (n_tokens = K*K + 2)

so every code is written twice: as the "own" half of its residue's token and as the "copy" half of
the next residue's token. A single wrong token therefore loses nothing: its residue's code is still
in the next token, its predecessor's code in the previous one. This is the hinge problem of geo v1
(token = placement code): one wrong code rotated the whole rest of the chain, and only information
that spans the position (the next token's copy of it) can resist it.

Special tokens: ``START = K*K`` on the first residue of a chain, ``BREAK = K*K + 1`` on the first
residue after a chain break; the second residue of a segment has no coded predecessor and its copy
half repeats its own code (token a*K + a). No geometry crosses a break: segments are decoded
independently and a later segment is drawn ``GAP_OFFSET`` A away (no fake 3.8 A bond).

What the redundancy cannot do: the copy half is a function of the previous token, so a model that
generates left to right and conditions on its own output will mostly write consistent pairs; the
pairs catch errors that are independent per position (and `decode_probs` uses per-position
uncertainty), not a wrong code the model then commits to.

How decoding works
------------------
1. The code sequence behind the tokens is recovered by Viterbi (exact MAP over the K codes of each
   residue, per segment): each token scores the pair (a[i-1], a[i]) it says with an error model
   (right with probability 1 - `TOKEN_ERROR`; when wrong, half the time in one half only, half the
   time anywhere), plus a transition prior log P(a[i] | a[i-1]) counted on the train chains at fit
   time (`PRIOR_WEIGHT`). A lone wrong token disagrees with both neighbours and is outvoted; the
   prior decides ties (a near-miss in one half of one token) and runs of wrong tokens.
2. The codes are placed residue by residue (`PlacementCodebook.decode_many`).

`decode_probs` takes per-position probabilities [L, n_tokens] instead of argmax tokens: each position
then scores every code pair with the model's own probability (log P[i, a[i-1]*K + a[i]]), so a
confident position outvotes an unsure neighbour and a near-tie keeps its second choice in play. It
helps on per-position errors (simulated below), NOT on a left-to-right model's own output: on the
shared set's 110 test chains, decoding the greedy run's per-position probabilities of two tiny models
gave the traces of their argmax tokens (mean TM 0.098 vs 0.098; with --struct-input-noise 0.9 0.111 vs
0.113), since each step's distribution is conditioned on the model's previous choice and its copy
halves agree with that choice. Stage 06 and predict therefore decode tokens (no probability option).

Measured (`bench/bench_tokenize.py`, one run on a busy 2-core machine; fit on 300 train chains of
../shared, 60,620 residues; scored on 170 held-out chains of other sources, 36,662 residues; the
substitution and scoring rules of `tokenfold.georobust`; geo v1 = K=512 placement codes, one per residue):

    median over chains        K=32 pair tokens (1,026)     geo v1 (514 tokens)
                              RMSD    TM     lDDT          RMSD    TM     lDDT
    no substitution           0.65   0.980  0.908          0.17   0.999  1.000
    random  5% / 10% / 20%    0.70   0.961  0.899         17.8    0.411  0.497
                              7.62   0.760  0.749         19.0    0.301  0.402
                             15.2    0.516  0.578         21.2    0.218  0.334
    near miss 10%             4.01   0.699  0.685          1.79   0.878  0.816

Reconstruction is flat with length (median 0.69 / 0.63 / 0.65 / 0.67 A for < 100 / 100-199 /
200-399 / >= 400 residues; greedy encoding 0.84 A). Near misses cost MORE than in geo v1: with 32
codes the nearest other code is a median 1.35 A away (v1's K=512: 0.38 A), and where the two copies of a code
differ by a near miss nothing says which one is right (the prior guesses). Larger K trades vocabulary
for both (K / tokens / RMSD / TM at 10% random / TM at 10% near): 16 / 258 / 0.99 / 0.74 / 0.58;
24 / 578 / 0.85 / 0.78 / 0.64; 32 / 1,026 / 0.65 / 0.76 / 0.70; 45 / 2,027 / 0.55 / 0.81 / 0.74;
64 / 4,098 / 0.45 / 0.84 / 0.78. Decoding simulated model probabilities (`georobust.simulated_probs`,
40 chains) instead of their argmax: argmax wrong on 12% of positions (arbitrary wrong tokens) TM 0.73
-> 0.94; 23%: 0.48 -> 0.81; near-miss-like noise, 9%: 0.80 -> 0.86; 43%: 0.42 -> 0.51. Speed, one
core: encode 10k residues/s (beam 4; 0.4x geo v1), decode 23k residues/s (0.5x geo v1).

File format (``save``/``load``): an ``.npz`` without pickles holding ``centroids`` float64 [K,3]
(placement codes), ``transitions`` int64 [K,K] and ``first`` int64 [K] (code counts of the train
chains, the Viterbi prior), ``meta_json`` and, when known, ``fit_db_index`` (the DB indices of the
train chains), written with fixed zip timestamps: refitting with the same inputs and seed gives a
byte-identical file.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .geoframes import GAP_OFFSET, MAX_BOND, PlacementCodebook, segment_positions, segment_starts
from .metrics import segment_rmsd
from .artifacts import atomic_path, sha256_file

__all__ = ["GeoCodebook", "reconstruction_rmsd", "segment_starts", "segment_positions", "GAP_OFFSET", "MAX_BOND"]

FORMAT = "tokenfold-geo-codebook"
VERSION = 2
FEATURES = ("pair token (a[i-1], a[i]) of placement codes; placement = local_frame_xyz(CA_i | CA_i-3..CA_i-1): "
            "virtual bond length, bond angle, dihedral")
DEFAULT_K = 32          # 1,026 tokens
DEFAULT_BEAM = 4        # closed-loop encoder beam (fit and encode)
MAX_K = 250             # K*K + 2 structure tokens + the amino acids must fit the uint16 token shards
TOKEN_ERROR = 0.1       # Viterbi error model: probability that a hard token is wrong
PRIOR_WEIGHT = 1.0      # weight of log P(a[i] | a[i-1]) in the Viterbi
PRIOR_SMOOTHING = 0.5   # pseudo-count added to every transition count


class GeoCodebook:
    """Pair tokens over K placement codes, with the Viterbi decoder. See the module docstring."""

    def __init__(self, centroids: np.ndarray, transitions: np.ndarray | None = None,
                 first: np.ndarray | None = None, meta: dict | None = None):
        self.local = PlacementCodebook(centroids)
        K = self.local.K
        if K > MAX_K:
            raise ValueError(f"geo K={K}: at most {MAX_K} placement codes ({K * K + 2} tokens would not fit uint16)")
        self.transitions = np.zeros((K, K), np.int64) if transitions is None else np.asarray(transitions, np.int64)
        self.first = np.zeros(K, np.int64) if first is None else np.asarray(first, np.int64)
        if self.transitions.shape != (K, K) or self.first.shape != (K,):
            raise ValueError(f"transition counts must be [{K},{K}] and [{K}]")
        t = self.transitions + PRIOR_SMOOTHING
        f = self.first + PRIOR_SMOOTHING
        self._log_t = np.log(t / t.sum(1, keepdims=True))
        self._log_f = np.log(f / f.sum())
        self.meta = dict(meta or {})
        self.meta.setdefault("encode_beam", DEFAULT_BEAM)
        self.meta.update(format=FORMAT, version=VERSION, K=K, n_tokens=K * K + 2, start_code=K * K,
                         break_code=K * K + 1, features=FEATURES, max_bond=MAX_BOND, gap_offset=GAP_OFFSET)
        self.path: Path | None = None
        self.fit_index: np.ndarray | None = None   # global DB indices of the chains it was fit on

    # ---- sizes and special tokens
    @property
    def centroids(self) -> np.ndarray:
        return self.local.centroids

    @property
    def K(self) -> int:
        """Placement codes (each token is a pair of them)."""
        return self.local.K

    @property
    def n_tokens(self) -> int:
        """Structure tokens in the vocabulary: K*K code pairs + START + BREAK."""
        return self.K * self.K + 2

    @property
    def START(self) -> int:
        return self.K * self.K

    @property
    def BREAK(self) -> int:
        return self.K * self.K + 1

    def internal_coordinates(self) -> dict:
        """Per placement code: virtual bond length (A), bond angle and dihedral (degrees)."""
        return self.local.internal_coordinates()

    def segments(self, tokens) -> np.ndarray:
        """bool [L]: True where a decoded segment starts (START/BREAK, and position 0)."""
        t = np.asarray(tokens, dtype=np.int64)
        st = t >= self.K * self.K
        if len(t):
            st[0] = True
        return st

    # ---- codes <-> tokens
    def tokens_from_codes(self, codes) -> np.ndarray:
        """Pair tokens of a placement-code sequence (codes >= K mark segment starts)."""
        a = np.asarray(codes, dtype=np.int64)
        K = self.K
        st = self.local.segments(a)
        prev = np.concatenate([[0], a[:-1]]) if len(a) else a
        prev = np.where(st | np.concatenate([[True], st[:-1]])[:len(a)], a, prev)   # 2nd residue: copy itself
        t = prev * K + a
        return np.where(st, np.where(np.arange(len(a)) == 0, self.START, self.BREAK), t).astype(np.int64)

    def placement_codes(self, tokens) -> np.ndarray:
        """MAP placement codes behind (possibly wrong) tokens; K / K+1 at segment starts."""
        return self.placement_codes_many([tokens])[0]

    def placement_codes_many(self, token_lists: Sequence, batch: int = 128) -> list[np.ndarray]:
        """`placement_codes` for many token sequences (Viterbi vectorised over sequences)."""
        toks = [self._check(t) for t in token_lists]
        K = self.K
        l_both = np.log(1 - TOKEN_ERROR)
        l_one = np.log(TOKEN_ERROR * 0.5 / max(2 * (K - 1), 1))
        l_rand = np.log(TOKEN_ERROR * 0.5 / max((K - 1) ** 2, 1))
        l_first = np.log(TOKEN_ERROR / max(K - 1, 1))
        ar = np.arange(K)
        out: list[np.ndarray | None] = [None] * len(toks)
        order = sorted(range(len(toks)), key=lambda j: -len(toks[j]))
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            T = np.zeros((len(idx), max(len(toks[j]) for j in idx)), np.int64)
            for r, j in enumerate(idx):
                T[r, :len(toks[j])] = toks[j]
            cp, ow = T // K, T % K

            def first(rows, i):
                return np.where(ar[None] == ow[rows, i][:, None], l_both, l_first)

            def pair(tot, rows, i):   # log-potential l_rand / l_one / l_both (none / one / both halves match)
                c, o, r = cp[rows, i], ow[rows, i], np.arange(len(rows))
                tot += l_rand
                tot[r, :, c] += l_one - l_rand
                tot[r, o, :] += l_one - l_rand
                tot[r, o, c] += l_both - 2 * l_one + l_rand

            for j, c in zip(idx, self._viterbi([self.segments(toks[j]) for j in idx], first, pair)):
                out[j] = c
        return out  # type: ignore[return-value]

    def _viterbi(self, starts: list[np.ndarray], first, pair) -> list[np.ndarray]:
        """Exact MAP code sequences, per segment, of a batch of sequences (segment starts `starts`):
        `first(rows, i)` [R,K] scores the 2nd residue of a segment, `pair(tot, rows, i)` adds the score
        of each pair to `tot` [R, K (a[i]), K (a[i-1])] in place; the transition prior is added to both."""
        K, B = self.K, len(starts)
        n = np.array([len(s) for s in starts], np.int64)
        Lmax = int(n.max()) if B else 0
        P = np.full((B, Lmax + 1), -1, np.int64)         # segment position; -1 past the end
        for b, s in enumerate(starts):
            P[b, :n[b]] = segment_positions(s)
        prior = np.ascontiguousarray(PRIOR_WEIGHT * self._log_t.T)     # [a[i], a[i-1]]
        score = np.zeros((B, K))
        back = np.zeros((B, Lmax, K), np.int16 if K < 2**15 else np.int64)
        end = np.zeros((B, Lmax), np.int64)                 # best code where a segment ends
        for i in range(Lmax):
            r1 = np.flatnonzero(P[:, i] == 1)
            if len(r1):
                score[r1] = first(r1, i) + PRIOR_WEIGHT * self._log_f
            r2 = np.flatnonzero(P[:, i] >= 2)
            if len(r2):
                tot = score[r2][:, None, :] + prior
                pair(tot, r2, i)
                arg = tot.argmax(2)
                back[r2, i] = arg
                score[r2] = np.take_along_axis(tot, arg[:, :, None], 2)[:, :, 0]
            ends = np.flatnonzero((P[:, i] >= 1) & (P[:, i + 1] <= 0))
            end[ends, i] = score[ends].argmax(1)
        codes = np.where(np.arange(Lmax)[None] == 0, K, K + 1).astype(np.int64) + np.zeros((B, 1), np.int64)
        cur = np.zeros(B, np.int64)
        rows = np.arange(B)
        for i in range(Lmax - 1, -1, -1):
            e = (P[:, i] >= 1) & (P[:, i + 1] <= 0)
            cur[e] = end[e, i]
            m = P[:, i] >= 1
            codes[m, i] = cur[m]
            m2 = P[:, i] >= 2
            cur[m2] = back[rows[m2], i, cur[m2]]
        return [codes[b, :n[b]] for b in range(B)]

    def _check(self, tokens) -> np.ndarray:
        t = np.asarray(tokens, dtype=np.int64)
        if t.ndim != 1 or (t.size and (t.min() < 0 or t.max() >= self.n_tokens)):
            raise ValueError(f"geo tokens must be a 1-D sequence in 0..{self.n_tokens - 1}")
        return t

    # ---- encode / decode
    def encode(self, ca: np.ndarray, gap_before: np.ndarray | None = None, beam: int | None = None) -> np.ndarray:
        """Tokens int64 [L] of one chain. `gap_before` (bool [L]) marks residues that follow a gap."""
        return self.encode_many([ca], [gap_before], beam=beam)[0]

    def encode_many(self, cas: Sequence[np.ndarray], gaps: Sequence | None = None, beam: int | None = None,
                    batch: int = 256) -> list[np.ndarray]:
        """`encode` for many chains (closed-loop beam search, vectorised over chains of similar length)."""
        beam = int(self.meta["encode_beam"] if beam is None else beam)
        return [self.tokens_from_codes(c) for c in self.local.encode_many(cas, gaps, beam=beam, batch=batch)]

    def decode(self, tokens) -> np.ndarray:
        """C-alpha trace float32 [L,3] of a token sequence. Any sequence of valid tokens decodes."""
        return self.decode_many([tokens])[0]

    def decode_many(self, token_lists: Sequence, batch: int = 256) -> list[np.ndarray]:
        """`decode` for many token sequences (MAP codes, then placed residue by residue)."""
        return self.local.decode_many(self.placement_codes_many(token_lists), batch=batch)

    def decode_probs(self, prob_lists: Sequence, batch: int = 256) -> list[np.ndarray]:
        """C-alpha traces from per-position token probabilities ([L, n_tokens] each, rows need not be
        normalised). A position starts a segment where START+BREAK hold at least half of its mass."""
        return self.local.decode_many([self._codes_from_probs(p) for p in prob_lists], batch=batch)

    def _codes_from_probs(self, probs) -> np.ndarray:
        P = np.asarray(probs, dtype=np.float64)
        K, G = self.K, self.K * self.K
        if (P.ndim != 2 or P.shape[1] != self.n_tokens or not np.isfinite(P).all() or (P < 0).any()
                or (P.sum(1) <= 0).any()):
            raise ValueError(f"token probabilities must be [L, {self.n_tokens}], finite, >= 0, each row with mass > 0")
        geo = P[:, :G].sum(1)
        starts = P[:, G:].sum(1) >= geo
        if len(P):
            starts[0] = True
        lp = np.log(P[:, :G] / np.maximum(geo, 1e-300)[:, None] + 1e-9).reshape(-1, K, K)
        lf = np.log(np.exp(lp).sum(1))

        def pair(tot, rows, i):
            tot += lp[i].T

        return self._viterbi([starts], lambda rows, i: lf[i][None], pair)[0]

    # ---- persistence (npz, no pickle, deterministic bytes)
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        arrays = {"centroids": self.centroids, "transitions": self.transitions, "first": self.first,
                  "meta_json": np.array(json.dumps(self.meta, sort_keys=True))}
        if self.fit_index is not None:
            arrays["fit_db_index"] = np.asarray(self.fit_index, dtype=np.int64)
        with atomic_path(path, suffix=".npz") as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for name, arr in arrays.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
                    zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, sha256: str | None = None) -> "GeoCodebook":
        path = Path(path)
        if sha256 is not None:
            got = sha256_file(path)
            if got != sha256:
                raise ValueError(f"{path}: sha256 {got[:12]}... does not match the expected {sha256[:12]}...")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta_json"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} file")
            if meta.get("version") != VERSION:
                raise ValueError(f"{path}: geo codebook version {meta.get('version')}, this code reads {VERSION}: "
                                 "refit it and re-tokenize (04_tokenize.py --tokens geo --refit-geo)")
            cb = cls(z["centroids"], z["transitions"], z["first"], meta)
            cb.fit_index = z["fit_db_index"] if "fit_db_index" in z.files else None
        cb.path = path
        return cb

    @classmethod
    def from_vocab(cls, vocab, vocab_dir: str | os.PathLike | None = None) -> "GeoCodebook":
        """The decoder a geo vocabulary points to (`vocab.meta["geo_codebook"]`), checksum-verified.

        Tries the path relative to the vocabulary's directory first, then the absolute path.
        """
        ref = vocab.meta.get("geo_codebook")
        if not ref:
            raise ValueError("this vocabulary has no geo codebook reference (not a geo vocabulary?)")
        candidates = []
        if vocab_dir is not None and ref.get("relpath"):
            candidates.append(Path(os.path.normpath(Path(vocab_dir) / ref["relpath"])))
        candidates.append(Path(ref["path"]))
        for p in candidates:
            if p.exists():
                return cls.load(p, sha256=ref.get("sha256"))
        raise FileNotFoundError(f"geo codebook not found at {' or '.join(map(str, candidates))}")

    # ---- fitting
    @classmethod
    def fit(cls, chains: Iterable[tuple[np.ndarray, np.ndarray | None]], K: int = DEFAULT_K, seed: int = 0,
            max_residues: int = 1_000_000, refine_iters: int = 3, beam: int = DEFAULT_BEAM,
            meta: dict | None = None) -> "GeoCodebook":
        """Learn the placement codes (`PlacementCodebook.fit`: k-means, then `refine_iters` closed-loop
        steps with a `beam`-wide encoder) and the transition prior from (ca, gap_before) pairs of
        TRAIN chains. Deterministic for a seed."""
        if K > MAX_K:
            raise ValueError(f"geo K={K}: at most {MAX_K} placement codes")
        chains = [(np.asarray(ca, np.float64), g) for ca, g in chains]
        chains = [(ca, g) for ca, g in chains if len(ca) and np.isfinite(ca).all()]
        local, codes, hist = PlacementCodebook.fit(chains, K, seed=seed, max_residues=max_residues,
                                                   refine_iters=refine_iters, beam=beam)
        trans, first = np.zeros((K, K), np.int64), np.zeros(K, np.int64)
        for c in codes:
            geo = c < K
            pair = geo[1:] & geo[:-1]
            np.add.at(trans, (c[:-1][pair], c[1:][pair]), 1)
            np.add.at(first, c[1:][geo[1:] & ~geo[:-1]], 1)
        cb = cls(local.centroids, trans, first)
        cb.meta.update(meta or {})
        cb.meta.update(seed=seed, fit_chains=len(chains), fit_residues=int(sum(len(c) for c, _ in chains)),
                       refine_iters=refine_iters, fit_beam=beam, encode_beam=beam,
                       fit_rms_step_error=[round(float(h), 4) for h in hist])
        return cb


def reconstruction_rmsd(cb: GeoCodebook, cas: Sequence[np.ndarray], gaps: Sequence | None = None,
                        beam: int | None = None) -> np.ndarray:
    """Per-chain `segment_rmsd` of decode(encode(ca)) against ca."""
    gaps = [None] * len(cas) if gaps is None else list(gaps)
    dec = cb.decode_many(cb.encode_many(cas, gaps, beam=beam))
    return np.array([segment_rmsd(x, ca, segment_starts(ca, g)) for x, ca, g in zip(dec, cas, gaps)])
