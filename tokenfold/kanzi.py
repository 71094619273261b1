"""Adapter to Kanzi (Dilip et al. 2025, https://github.com/rdilip/kanzi), a flow autoencoder that turns a
C-alpha trace into one FSQ token per residue (1000 tokens for the released checkpoint) and back.

Kanzi's published API (``kanzi.models``), which this module is written against:

* ``DAEConfig(**ckpt["model_cfg"])`` and ``DAE(cfg)``; the checkpoint is a dict with ``model_cfg``
  (plain dict) and ``model`` (state dict). We load it ourselves with ``torch.load(weights_only=True)``
  (Kanzi's ``DAE.from_pretrained`` calls ``torch.load`` without it) and build the model with the
  GPT prior switched off: it is only used for unconditional generation, not for encode/decode.
* ``DAE.encode(x [B, L, 3], preprocess=False) -> (s, c, idx [B, L])``: coordinates in NANOMETRES,
  mean-centred (``preprocess=True`` would do both; we do it here so the conversion is ours and tested).
  Batch encoding is not supported upstream (one chain at a time).
* ``DAE.decode(idx [B, L], n_steps=100, noise_weight=0.45, score_weight=1.0, cfg_weight=1.0)``
  ``-> x [B, L, 3]`` in nanometres, centred. Decoding samples an SDE (``torch.randn``): we seed it.
* ``DAE.codebook_size`` = prod(FSQ levels) = the number of tokens.

Kanzi was trained on AFDB chains shorter than 256 residues and has no notion of chain breaks: a
chain is encoded as one trace (stage 04's ``--max-length`` keeps inputs in its range).

NOT RUN AGAINST REAL WEIGHTS in this repository: neither the package nor a checkpoint can be
downloaded here. The glue (units, centring, shapes, dtypes, seeding, error messages) is tested with
a stand-in object that has Kanzi's API shape (tests/test_kanzi.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

INSTALL_HINT = ("pip install git+https://github.com/rdilip/kanzi.git  (and download a checkpoint, e.g. "
                "cleaned_model.pt, as Kanzi's README says)")
ANGSTROM_PER_NM = 10.0


class KanziUnavailable(RuntimeError):
    """The Kanzi package or checkpoint is missing; the message says what to install or pass."""


def load_kanzi_model(checkpoint: str | os.PathLike | None, device: str | None = None):
    """Kanzi's DAE from a local checkpoint, in eval mode. Clear one-line errors when anything is missing."""
    if checkpoint is None:
        raise KanziUnavailable(f"the kanzi token kind needs a checkpoint: pass --kanzi-checkpoint PATH ({INSTALL_HINT})")
    path = Path(checkpoint)
    if not path.is_file():
        raise KanziUnavailable(f"Kanzi checkpoint not found: {path}")
    try:
        from kanzi.models import DAE, DAEConfig
    except ImportError as e:
        raise KanziUnavailable(f"the kanzi token kind needs the Kanzi package ({e}); {INSTALL_HINT}") from None
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model_cfg" not in ckpt or "model" not in ckpt:
        raise KanziUnavailable(f"{path}: not a Kanzi checkpoint (expected a dict with 'model_cfg' and 'model')")
    cfg = DAEConfig(**ckpt["model_cfg"])
    cfg.gpt_prior = False
    model = DAE(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    unexpected = [k for k in unexpected if not k.startswith("gpt.")]
    if missing or unexpected:
        raise KanziUnavailable(f"{path}: weights do not fit Kanzi's DAE (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    if device is not None:
        model.to(device)
    return model


class KanziTokenizer:
    """encode: C-alpha [L,3] in Angstrom -> codes [L]; decode: codes -> C-alpha [L,3] in Angstrom (centred).

    `model` is a loaded Kanzi DAE (or anything with its API shape); `KanziTokenizer.from_checkpoint`
    loads the real one.
    """

    def __init__(self, model, device: str | None = None, n_decode_steps: int = 100, seed: int = 0,
                 checkpoint: str | None = None):
        self.model = model
        self.device = device
        self.n_decode_steps = int(n_decode_steps)
        self.seed = int(seed)
        self.checkpoint = checkpoint
        self.n_tokens = int(getattr(model, "codebook_size", 1000))

    @classmethod
    def from_checkpoint(cls, checkpoint, device: str | None = None, **kw) -> "KanziTokenizer":
        if device is None:
            from .device import pick_device

            device = str(pick_device("auto"))
        return cls(load_kanzi_model(checkpoint, device), device=device, checkpoint=str(checkpoint), **kw)

    @property
    def meta(self) -> dict:
        return {"checkpoint": self.checkpoint, "n_tokens": self.n_tokens, "n_decode_steps": self.n_decode_steps,
                "seed": self.seed, "units": "Kanzi works in nm on centred coordinates; this adapter converts"}

    @staticmethod
    def to_kanzi_input(ca: np.ndarray) -> np.ndarray:
        """[L,3] Angstrom -> [1,L,3] float32 nanometres, mean-centred (what Kanzi's encoder expects)."""
        ca = np.asarray(ca, dtype=np.float64)
        if ca.ndim != 2 or ca.shape[1] != 3 or len(ca) == 0:
            raise ValueError(f"C-alpha coordinates must be [L,3] with L >= 1, got {ca.shape}")
        if not np.isfinite(ca).all():
            raise ValueError("C-alpha coordinates contain NaN/inf")
        return ((ca - ca.mean(axis=0)) / ANGSTROM_PER_NM).astype(np.float32)[None]

    def encode(self, ca: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(self.to_kanzi_input(ca))
        if self.device is not None:
            x = x.to(self.device)
        with torch.no_grad():
            out = self.model.encode(x, preprocess=False)
        idx = out[-1] if isinstance(out, (tuple, list)) else out
        codes = idx.reshape(-1).long().cpu().numpy() if hasattr(idx, "cpu") else np.asarray(idx).reshape(-1)
        if len(codes) != len(ca):
            raise RuntimeError(f"Kanzi returned {len(codes)} tokens for {len(ca)} residues")
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_tokens):
            raise RuntimeError(f"Kanzi returned a token outside 0..{self.n_tokens - 1}")
        return codes.astype(np.int64)

    def decode(self, codes) -> np.ndarray:
        """Centred C-alpha trace float32 [L,3] in Angstrom (seeded, so the same codes give the same trace)."""
        import torch

        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_tokens):
            raise ValueError(f"Kanzi codes must lie in 0..{self.n_tokens - 1}")
        idx = torch.from_numpy(codes)[None]
        if self.device is not None:
            idx = idx.to(self.device)
        devices = [self.device] if self.device and str(self.device).startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            with torch.no_grad():
                x = self.model.decode(idx, n_steps=self.n_decode_steps)
        x = x.detach().float().cpu().numpy()[0] if hasattr(x, "detach") else np.asarray(x, np.float32)[0]
        if x.shape != (len(codes), 3):
            raise RuntimeError(f"Kanzi decoded {x.shape} for {len(codes)} tokens")
        return (x * ANGSTROM_PER_NM).astype(np.float32)

    def decode_many(self, code_lists) -> list[np.ndarray]:
        return [self.decode(c) for c in code_lists]


def load_decoder(vocab, checkpoint: str | os.PathLike | None = None, device: str | None = None) -> KanziTokenizer:
    """The Kanzi tokenizer for a kanzi vocabulary (stage 06): `checkpoint`, else the one stage 04 used."""
    ref = vocab.meta.get("kanzi") or {}
    tok = KanziTokenizer.from_checkpoint(checkpoint or ref.get("checkpoint"), device=device,
                                         n_decode_steps=ref.get("n_decode_steps", 100), seed=ref.get("seed", 0))
    if tok.n_tokens != vocab.n_struct:
        raise KanziUnavailable(f"the Kanzi checkpoint has {tok.n_tokens} tokens, the vocabulary {vocab.n_struct}")
    return tok
