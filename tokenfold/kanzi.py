"""Adapter to Kanzi (Dilip et al. 2025, https://github.com/rdilip/kanzi), a flow autoencoder that turns a
C-alpha trace into one FSQ token per residue (1000 tokens for the released checkpoint) and back.

Kanzi is not on PyPI (the PyPI package ``kanzi`` is an unrelated compressor): install it from its
source (``pip install ../shared/third_party/kanzi`` here, or ``pip install git+https://github.com/rdilip/kanzi.git``).
Its ``timm`` imports torchvision, which must be the build that matches your torch (see `INSTALL_HINT`).

What this module relies on (``kanzi.models``, tested against the real package in tests/test_kanzi.py):

* the checkpoint is ``{"model_cfg": dict for DAEConfig, "model": state dict}``. We read it with
  ``torch.load(weights_only=True)`` (Kanzi's ``DAE.from_pretrained`` does not) and build ``DAE`` with the
  GPT prior switched off: the prior (``gpt.*`` weights) only serves unconditional generation;
* ``DAE.encode(x [1, L, 3], preprocess=False) -> (s, c, idx [1, L])``: coordinates in NANOMETRES,
  mean-centred; we convert from Angstrom and centre here. One chain at a time (no batch encoding
  upstream). The encoder's attention mask is 256 positions wide and Kanzi was trained on AFDB chains
  shorter than 256 residues, so chains longer than `MAX_RESIDUES` are refused here (stage 04 crops or
  drops them: ``--max-length`` is capped at `MAX_RESIDUES` for the kanzi kind);
* ``DAE.decode(idx [1, L], n_steps)`` integrates an SDE from ``torch.randn`` noise and returns nanometres,
  centred: we seed it, so the same codes give the same trace, and the caller's random stream is untouched;
* ``DAE.codebook_size`` = prod(FSQ levels) = the number of tokens. Kanzi knows no chain breaks.

RANDOM test checkpoints (`write_random_checkpoint`): Kanzi's own ``DAE``/``DAEConfig`` with random
weights, saved in upstream's format plus a ``tokenfold`` marker; named ``kanzi_<shape>_RANDOM_seed<s>.pt``,
refused unless asked for (``allow_random``), and everything made from them says RANDOM WEIGHTS.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import layout
from .artifacts import atomic_path, sha256_file

log = logging.getLogger("tokenfold.kanzi")

INSTALL_HINT = ("install Kanzi from its source: pip install ../shared/third_party/kanzi (or "
                "pip install git+https://github.com/rdilip/kanzi.git); its timm needs the torchvision build "
                "that matches your torch (a CPU torch wants the CPU torchvision)")
ANGSTROM_PER_NM = 10.0
MAX_RESIDUES = 255   # trained on AFDB chains shorter than 256; the encoder's attention mask is 256 wide
RANDOM_BANNER = ("RANDOM WEIGHTS: this Kanzi checkpoint is randomly initialised (test/demo only); its tokens "
                 "carry no learned structure information and its decoded traces are not protein-like")
# DAEConfig fields of the random test checkpoints; FSQ levels (8,5,5,5) = 1000 codes, as the released one.
# The released checkpoint's architecture is not documented here: "base" only matches its ~30M parameters.
_COMMON = dict(levels=(8, 5, 5, 5), use_qknorm=True)
RANDOM_SHAPES = {
    "tiny": dict(n_channels_encoder=32, n_channels_decoder=32, n_layers_encoder=1, n_layers_decoder=1, n_heads=4,
                 mlp_factor=2, **_COMMON),                                                 # 39k parameters
    "small": dict(n_channels_encoder=128, n_channels_decoder=128, n_layers_encoder=2, n_layers_decoder=4,
                  n_heads=4, mlp_factor=4, **_COMMON),                                     # 1.7M
    "base": dict(n_channels_encoder=256, n_channels_decoder=384, n_layers_encoder=4, n_layers_decoder=10,
                 n_heads=8, mlp_factor=4, **_COMMON),                                      # 30.7M
}
DEFAULT_RANDOM_SHAPE = "tiny"


class KanziUnavailable(RuntimeError):
    """The Kanzi package or checkpoint is missing or unusable; str() is the one-line reason."""


def kanzi_classes():
    """(DAE, DAEConfig) from the installed Kanzi package, or one clear line saying why not."""
    try:
        from kanzi.models import DAE, DAEConfig
    except ImportError as e:
        raise KanziUnavailable(f"the kanzi token kind needs the Kanzi package ({e}); {INSTALL_HINT}") from None
    except Exception as e:  # noqa: BLE001 - e.g. "operator torchvision::nms does not exist": mismatched torchvision
        msg = " ".join(str(e).split())[:160]
        raise KanziUnavailable(f"the Kanzi package failed to import ({type(e).__name__}: {msg}); {INSTALL_HINT}") from None
    return DAE, DAEConfig


def _json_cfg(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def load_kanzi_model(checkpoint: str | os.PathLike | None, device: str | None = None, allow_random: bool = False):
    """Kanzi's DAE from a local checkpoint, in eval mode, and ``info`` (checkpoint, sha256, random_weights,
    config, n_params, gpt_prior_dropped). One-line `KanziUnavailable` for a missing package or file, a file
    that is not a Kanzi checkpoint, or a RANDOM test checkpoint when `allow_random` is false."""
    if checkpoint is None:
        raise KanziUnavailable("the kanzi token kind needs a checkpoint: pass --kanzi-checkpoint PATH (Kanzi's "
                               "released weights, e.g. cleaned_model.pt), or --random-weights-for-testing for tests")
    path = Path(checkpoint)
    if not path.is_file():
        raise KanziUnavailable(f"Kanzi checkpoint not found: {path}")
    DAE, DAEConfig = kanzi_classes()
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable, not a torch file, or refused pickled objects
        msg = " ".join(str(e).split())[:160]
        raise KanziUnavailable(f"{path}: not a Kanzi checkpoint (torch.load with weights_only=True: {msg})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_cfg"), dict) or not isinstance(ckpt.get("model"), dict):
        raise KanziUnavailable(f"{path}: not a Kanzi checkpoint (expected a dict with 'model_cfg' and 'model')")
    marker = ckpt.get("tokenfold")
    random_weights = bool(isinstance(marker, dict) and marker.get("random_weights")) or "RANDOM" in path.name
    if random_weights and not allow_random:
        raise KanziUnavailable(f"{path}: is a RANDOM-weights test checkpoint; pass --random-weights-for-testing "
                               "(allow_random=True) to use it on purpose")
    try:
        cfg = DAEConfig(**ckpt["model_cfg"])
        cfg.gpt_prior = False
        model = DAE(cfg)
    except Exception as e:  # noqa: BLE001 - a config Kanzi's classes cannot build
        raise KanziUnavailable(f"{path}: model_cfg does not build Kanzi's DAE ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:160]})") from None
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("gpt.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KanziUnavailable(f"{path}: weights do not fit Kanzi's DAE (missing {list(missing)[:3]}, "
                               f"unexpected {list(unexpected)[:3]})")
    model.eval()
    if device is not None:
        model.to(device)
    info = {"checkpoint": str(path.resolve()), "sha256": sha256_file(path), "random_weights": random_weights,
            "config": _json_cfg(ckpt["model_cfg"]), "n_params": int(sum(p.numel() for p in model.parameters())),
            "gpt_prior_dropped": len(state) < len(ckpt["model"])}
    if random_weights:
        log.warning("!!! %s: %s", path.name, RANDOM_BANNER)
    return model, info


class KanziTokenizer:
    """encode: C-alpha [L,3] in Angstrom -> codes [L]; decode: codes -> C-alpha [L,3] in Angstrom (centred).

    `model` is a loaded Kanzi DAE; `KanziTokenizer.from_checkpoint` loads one. `info` is what
    `load_kanzi_model` says about its checkpoint.
    """

    def __init__(self, model, device: str | None = None, n_decode_steps: int = 100, seed: int = 0,
                 info: dict | None = None):
        self.model = model
        self.device = device
        self.n_decode_steps = int(n_decode_steps)
        self.seed = int(seed)
        self.info = dict(info or {})
        self.n_tokens = int(model.codebook_size)

    @classmethod
    def from_checkpoint(cls, checkpoint, device: str | None = None, allow_random: bool = False,
                        **kw) -> "KanziTokenizer":
        if device is None:
            from .device import pick_device

            device = str(pick_device("auto"))
        model, info = load_kanzi_model(checkpoint, device, allow_random=allow_random)
        return cls(model, device=device, info=info, **kw)

    @property
    def random_weights(self) -> bool:
        return bool(self.info.get("random_weights"))

    @property
    def meta(self) -> dict:
        """What stage 04 records in vocab.json (stage 06 decodes with the same checkpoint and settings)."""
        m = {**self.info, "n_tokens": self.n_tokens, "n_decode_steps": self.n_decode_steps, "seed": self.seed,
             "max_residues": MAX_RESIDUES,
             "units": "Kanzi works in nm on centred coordinates; this adapter converts from/to Angstrom"}
        if self.random_weights:
            m["WARNING"] = RANDOM_BANNER
        return m

    @staticmethod
    def to_kanzi_input(ca: np.ndarray) -> np.ndarray:
        """[L,3] Angstrom -> [1,L,3] float32 nanometres, mean-centred (what Kanzi's encoder expects)."""
        ca = np.asarray(ca, dtype=np.float64)
        if ca.ndim != 2 or ca.shape[1] != 3 or len(ca) == 0:
            raise ValueError(f"C-alpha coordinates must be [L,3] with L >= 1, got {ca.shape}")
        if len(ca) > MAX_RESIDUES:
            raise ValueError(f"{len(ca)} residues: Kanzi encodes at most {MAX_RESIDUES} (trained on chains < 256)")
        if not np.isfinite(ca).all():
            raise ValueError("C-alpha coordinates contain NaN/inf")
        return ((ca - ca.mean(axis=0)) / ANGSTROM_PER_NM).astype(np.float32)[None]

    def encode(self, ca: np.ndarray) -> np.ndarray:
        """Codes int64 [L] of one chain."""
        import torch

        x = torch.from_numpy(self.to_kanzi_input(ca)).to(self.device or "cpu")
        with torch.no_grad():
            *_, idx = self.model.encode(x, preprocess=False)
        codes = idx.reshape(-1).long().cpu().numpy()
        if len(codes) != len(ca):
            raise RuntimeError(f"Kanzi returned {len(codes)} tokens for {len(ca)} residues")
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_tokens):
            raise RuntimeError(f"Kanzi returned a token outside 0..{self.n_tokens - 1}")
        return codes

    def decode(self, codes) -> np.ndarray:
        """Centred C-alpha trace float32 [L,3] in Angstrom (seeded: the same codes give the same trace)."""
        import torch

        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if codes.size == 0 or codes.min() < 0 or codes.max() >= self.n_tokens:
            raise ValueError(f"Kanzi codes must be a non-empty sequence in 0..{self.n_tokens - 1}")
        idx = torch.from_numpy(codes)[None].to(self.device or "cpu")
        devices = [self.device] if self.device and str(self.device).startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            with torch.no_grad():
                x = self.model.decode(idx, n_steps=self.n_decode_steps)
        x = x.detach().float().cpu().numpy()[0]
        if x.shape != (len(codes), 3):
            raise RuntimeError(f"Kanzi decoded {x.shape} for {len(codes)} tokens")
        return (x * ANGSTROM_PER_NM).astype(np.float32)

    def decode_many(self, code_lists) -> list[np.ndarray]:
        """One chain at a time (Kanzi's decoder has no padding mask, so chains of different lengths cannot share a batch)."""
        return [self.decode(c) for c in code_lists]


def load_decoder(vocab, checkpoint: str | os.PathLike | None = None, device: str | None = None) -> KanziTokenizer:
    """The Kanzi tokenizer of a kanzi vocabulary (stage 06): `checkpoint`, else the one stage 04 used, with
    stage 04's decoding settings. It must be the same weights (sha256); a RANDOM checkpoint is accepted
    only when stage 04 made these tokens with it."""
    ref = vocab.meta.get("kanzi") or {}
    tok = KanziTokenizer.from_checkpoint(checkpoint or ref.get("checkpoint"), device=device,
                                         allow_random=bool(ref.get("random_weights")),
                                         n_decode_steps=ref.get("n_decode_steps", 100), seed=ref.get("seed", 0))
    if ref.get("sha256") and tok.info["sha256"] != ref["sha256"]:
        raise KanziUnavailable(f"{tok.info['checkpoint']}: not the Kanzi checkpoint these tokens were made with "
                               f"(sha256 differs from stage 04's {ref.get('checkpoint')})")
    if tok.n_tokens != vocab.n_struct:
        raise KanziUnavailable(f"the Kanzi checkpoint has {tok.n_tokens} tokens, the vocabulary {vocab.n_struct}")
    return tok


# ----------------------------------------------------------------------------- RANDOM test checkpoints
def random_checkpoint_path(shape: str = DEFAULT_RANDOM_SHAPE, seed: int = 0,
                           models_dir: str | os.PathLike | None = None) -> Path:
    """Conventional file name of a random Kanzi test checkpoint."""
    return Path(models_dir if models_dir is not None else layout.MODELS) / f"kanzi_{shape}_RANDOM_seed{seed}.pt"


def write_random_checkpoint(path: str | os.PathLike, shape: str = DEFAULT_RANDOM_SHAPE, seed: int = 0,
                            gpt_prior: bool = False) -> Path:
    """A randomly initialised Kanzi ``DAE`` (Kanzi's own classes, shape `RANDOM_SHAPES[shape]`) saved as
    upstream saves it, ``{"model_cfg": asdict(cfg), "model": state_dict}``, plus a ``tokenfold`` marker;
    `gpt_prior` includes the GPT prior's ``gpt.*`` weights, as checkpoints that carry the prior do.
    The name must contain RANDOM. Same shape and seed, same bytes. For tests and demos only."""
    import torch

    path = Path(path)
    if "RANDOM" not in path.name or path.suffix != ".pt":
        raise ValueError(f"{path.name}: a random Kanzi test checkpoint must be named *RANDOM*.pt")
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random Kanzi shape {shape!r}; one of {', '.join(RANDOM_SHAPES)}")
    DAE, DAEConfig = kanzi_classes()
    cfg = DAEConfig(**RANDOM_SHAPES[shape], gpt_prior=gpt_prior)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DAE(cfg)
    data = {"model_cfg": asdict(cfg), "model": model.state_dict(),
            "tokenfold": {"random_weights": True, "shape": shape, "seed": int(seed), "note": RANDOM_BANNER}}
    buf = io.BytesIO()    # torch.save names the archive after the file: a buffer keeps the bytes reproducible
    torch.save(data, buf)
    with atomic_path(path, suffix=".pt") as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    log.warning("wrote %s (Kanzi %s, %d parameters, seed %d): %s", path, shape,
                sum(p.numel() for p in model.parameters()), seed, RANDOM_BANNER)
    return path


def resolve_checkpoint(spec: str | None, random_weights: bool = False, seed: int = 0) -> str | None:
    """What `load_kanzi_model` gets for ``--kanzi-checkpoint``: `spec` as given; with `random_weights`
    (tests and demo only) no spec or a shape name of `RANDOM_SHAPES` stands for the random checkpoint of
    that shape in data/models/, written first when absent."""
    if not random_weights or (spec is not None and spec not in RANDOM_SHAPES):
        return spec
    path = random_checkpoint_path(spec or DEFAULT_RANDOM_SHAPE, seed)
    if not path.exists():
        write_random_checkpoint(path, spec or DEFAULT_RANDOM_SHAPE, seed)
    return str(path)
