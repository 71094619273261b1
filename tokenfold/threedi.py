"""Foldseek's 3Di structural alphabet: one letter per residue of a backbone, computed with mini3di.

Residues without a valid 3Di state (e.g. a missing N or C atom) get 'D', as Foldseek gives them.
`tests/test_threedi.py` pins the letters against Foldseek's own DB of the shared test set. The one
change to mini3di is speed: its partner search runs on plain arrays instead of numpy.ma
(`_partners_plain`, same result).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .structure import Chain

_ENCODER = None
_MAXF = np.finfo(np.float64).max


def _partners_plain(x) -> np.ndarray:
    """mini3di's `PartnerIndexEncoder._find_residue_partners` without numpy.ma (same result).

    mini3di computes D = |x_i|^2 - 2 x_i.x_j + |x_j|^2 on masked arrays (about half the 3Di time),
    with the first and last residue's |x|^2 set to NaN, then `nan_to_num(nan=inf)` (NaN -> +inf, the
    +inf diagonal -> largest float) and a masked `argmin` (masked pairs count as +inf). Here: the same
    arithmetic on plain arrays with those values set explicitly.
    `tests/test_threedi.py` checks it against mini3di's own method.
    """
    data = np.asarray(np.ma.getdata(x), dtype=np.float64)
    mask = np.ma.getmaskarray(x)[:, 0]
    filled = np.where(mask[:, None], 0.0, data)
    r = np.sum(filled * filled, axis=-1)
    D = filled @ filled.T
    D *= -2.0
    D += r[:, None]
    D += r[None, :]
    # mini3di sets |x|^2 of the first and last residue to NaN: their rows/columns become NaN, which
    # nan_to_num(nan=inf) makes +inf (unmasked vc rows are finite, so nothing else is NaN); the
    # diagonal, set to +inf before nan_to_num, becomes the largest finite float
    D[[0, -1], :] = np.inf
    D[:, [0, -1]] = np.inf
    if mask.any():
        D[mask, :] = np.inf
        D[:, mask] = np.inf
    np.fill_diagonal(D, _MAXF)
    return D.argmin(axis=1)


def _encoder(fast: bool = True):
    """mini3di's Encoder; with `fast` its partner search runs on plain arrays (`_partners_plain`)."""
    global _ENCODER
    if _ENCODER is None or getattr(_ENCODER, "_tokenfold_fast", None) != fast:
        import mini3di

        enc = mini3di.Encoder()
        enc._tokenfold_fast = False
        if fast:
            try:
                enc.feature_encoder.partner_index_encoder._find_residue_partners = _partners_plain
                enc._tokenfold_fast = True
            except AttributeError:  # another mini3di layout: keep its own (slower) implementation
                pass
        _ENCODER = enc
    return _ENCODER


def encode_3di_arrays(ca: np.ndarray, n: np.ndarray, c: np.ndarray, cb: np.ndarray, fast: bool = True) -> str:
    """Foldseek 3Di letters from backbone arrays (NaN = missing atom; such residues get 'D')."""
    if len(ca) == 0:
        return ""
    enc = _encoder(fast)
    states = enc.encode_atoms(ca=ca.astype(np.float64), cb=cb.astype(np.float64),
                              n=n.astype(np.float64), c=c.astype(np.float64))
    return enc.build_sequence(states)


def encode_3di(chain: Chain) -> str:
    """Foldseek 3Di letters for a chain (mini3di). Residues without a valid state get 'D' as in Foldseek."""
    return encode_3di_arrays(chain.ca, chain.n, chain.c, chain.cb)
