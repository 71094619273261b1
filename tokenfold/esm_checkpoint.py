"""Loading ESM-2 (fair-esm) checkpoints safely, and the RANDOM test checkpoints that stand in for them.

`load_esm` takes a fair-esm name (``esm2_t33_650M_UR50D``: the file is taken from torch hub's cache,
where fair-esm itself puts it, and downloaded from fair-esm's URL when absent) or a local path
(``/models/esm2_t33_650M_UR50D.pt``, with ``...-contact-regression.pt`` beside it when present).

The fair-esm / torch >= 2.6 pitfall: fair-esm 2.0.0 calls ``torch.load`` without ``weights_only``;
torch >= 2.6 then refuses real ESM-2 checkpoints because their config is a pickled
``argparse.Namespace``. We load the file ourselves with ``weights_only=True`` and exactly one extra
allowed class (``argparse.Namespace``), then hand the dicts to fair-esm's own
``load_model_and_alphabet_core``: same model, nothing arbitrary unpickled.

`write_random_checkpoint` writes a tiny randomly initialised ESM-2 in the same file format (config
pickled the same way, so tests meet the same pitfall), for tests and the offline demo only; such
files must have RANDOM in their name, are refused unless asked for (``allow_random=True``), and
everything made from them says so (`RANDOM_BANNER`).
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from . import layout
from .artifacts import atomic_path

log = logging.getLogger("tokenfold.esm_checkpoint")

# fair-esm's ESM-2 family: name -> (layers, embedding dim, attention heads)
ESM2_MODELS = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
DEFAULT_MODEL = "esm2_t33_650M_UR50D"
DEFAULT_RANDOM_SHAPE = "esm2_t6_8M_UR50D"   # what --random-weights-for-testing builds by default
_HUB_MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
_HUB_REGRESSION_URL = "https://dl.fbaipublicfiles.com/fair-esm/regression/{name}-contact-regression.pt"
RANDOM_BANNER = ("RANDOM WEIGHTS: this ESM-2 checkpoint is randomly initialised (test/demo only); its embeddings "
                 "carry no learned information about proteins")


class EsmLoadError(RuntimeError):
    """A model that cannot be loaded; str() is the one-line reason shown to the user."""


def _safe_torch_load(path: Path):
    """torch.load with weights_only=True, allowing only argparse.Namespace (ESM-2's pickled config)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = " ".join(str(e).split())
        m = re.search(r"Unsupported global: (?:GLOBAL )?([^ ]+)", detail)
        what = f"it contains a pickled {m.group(1)}" if m else detail[:200]
        raise EsmLoadError(f"{path}: refusing to unpickle ({what}); only tensors, plain containers and "
                           "argparse.Namespace are allowed in an ESM checkpoint") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise EsmLoadError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0][:200]})") from None


def regression_path(model_path: str | os.PathLike) -> Path:
    """Where fair-esm expects the contact-regression weights of a local checkpoint."""
    p = Path(model_path)
    return Path(str(p.with_suffix("")) + "-contact-regression.pt")


def _hub_file(name: str) -> Path:
    """The file fair-esm's hub loader would use, downloading it when absent (one clear line if that fails)."""
    dst = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if dst.exists():
        return dst
    url = _HUB_MODEL_URL.format(name=name)
    log.info("downloading %s from %s to %s", name, url, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=True)
        reg = regression_path(dst)
        if not reg.exists():
            torch.hub.download_url_to_file(_HUB_REGRESSION_URL.format(name=name), str(reg), progress=False)
    except Exception as e:  # URLError, HTTPError, socket errors: all mean "not reachable from here"
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise EsmLoadError(
            f"cannot download ESM-2 weights {name} from {url} ({reason}); on a machine with network run "
            f"`python -c \"import torch; torch.hub.download_url_to_file('{url}', '{name}.pt')\"` "
            f"and pass the local path to --model (or put it in {dst.parent})") from None
    return dst


def is_random_checkpoint(model_data: dict, name: str) -> bool:
    marker = model_data.get("tokenfold") if isinstance(model_data, dict) else None
    return bool(isinstance(marker, dict) and marker.get("random_weights")) or "RANDOM" in name


def load_esm(name_or_path: str | os.PathLike, allow_random: bool = False, device: str | None = None):
    """Load an ESM-2 model. Returns ``(model, alphabet, info)``; the model is in eval mode.

    `name_or_path`: a fair-esm name (see `ESM2_MODELS`; taken from torch hub's cache or downloaded) or
    the path of a local ``.pt`` checkpoint in fair-esm's format. `allow_random`: accept a RANDOM test
    checkpoint (refused otherwise, so random weights are never used by accident).
    `info`: name, path, source, num_layers, embed_dim, attention_heads, random_weights, file_bytes.
    """
    import esm

    spec = str(name_or_path)
    if Path(spec).exists() or spec.endswith(".pt"):
        path, source = Path(spec), "local"
        if not path.exists():
            raise EsmLoadError(f"{path}: no such checkpoint file")
    elif spec in ESM2_MODELS:
        path, source = _hub_file(spec), "hub"
    else:
        raise EsmLoadError(f"unknown model {spec!r}: give an existing .pt path or one of {', '.join(ESM2_MODELS)}")
    name = path.stem
    model_data = _safe_torch_load(path)
    if not isinstance(model_data, dict) or "model" not in model_data or "cfg" not in model_data:
        raise EsmLoadError(f"{path}: not an ESM-2 checkpoint (expected fair-esm's dict with 'cfg' and 'model')")
    random_weights = is_random_checkpoint(model_data, name)
    if random_weights and not allow_random:
        raise EsmLoadError(f"{path}: is a RANDOM-weights test checkpoint; pass --random-weights-for-testing "
                           "(allow_random=True) to use it on purpose")
    reg_path = regression_path(path)
    regression = _safe_torch_load(reg_path) if reg_path.exists() else None
    if regression is None:
        log.info("%s: no %s beside it (only needed for contact prediction, not for embeddings)",
                 path.name, reg_path.name)
    # fair-esm picks its ESM-2 code path from the name; a renamed file keeps working.
    core_name = name if name.startswith("esm2") else f"esm2_{name}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        model, alphabet = esm.pretrained.load_model_and_alphabet_core(core_name, model_data, regression)
    if not isinstance(model, esm.ESM2):
        raise EsmLoadError(f"{path}: only ESM-2 models are supported (got {type(model).__name__})")
    model.eval()
    if device is not None:
        model.to(device)
    info = {"name": name, "path": str(path), "source": source, "num_layers": model.num_layers,
            "embed_dim": model.embed_dim, "attention_heads": model.attention_heads,
            "random_weights": random_weights, "file_bytes": path.stat().st_size}
    if random_weights:
        log.warning("!!! %s: %s", path.name, RANDOM_BANNER)
    else:
        log.info("loaded %s (%d layers, dim %d) from %s", name, model.num_layers, model.embed_dim, path)
    return model, alphabet, info


def random_checkpoint_path(shape: str = DEFAULT_RANDOM_SHAPE, seed: int = 0,
                           models_dir: str | os.PathLike | None = None) -> Path:
    """Conventional file name of a random test checkpoint with the shape of a real ESM-2 model."""
    return Path(models_dir if models_dir is not None else layout.MODELS) / f"{shape}_RANDOM_seed{seed}.pt"


def write_random_checkpoint(path: str | os.PathLike, num_layers: int = 2, embed_dim: int = 64, heads: int = 4,
                            seed: int = 0) -> Path:
    """Write a randomly initialised ESM-2 (fair-esm's own `ESM2` class) in fair-esm's checkpoint format.

    The file looks like a real one to fair-esm's loaders: ``{"cfg": {"model": argparse.Namespace(...)},
    "model": state dict with the ``encoder.sentence_encoder.`` / ``encoder.`` prefixes}``, and random
    contact-regression weights go to ``<stem>-contact-regression.pt`` beside it. A plain
    ``{"tokenfold": {"random_weights": True, ...}}`` entry marks it, and the file name must contain
    RANDOM, so `load_esm` can recognise and refuse it unless asked. For tests and demos only.
    """
    import esm

    path = Path(path)
    if "RANDOM" not in path.name or not path.name.startswith("esm2") or path.suffix != ".pt":
        raise ValueError(f"{path.name}: a random test checkpoint must be named esm2*RANDOM*.pt")
    if embed_dim % heads or (embed_dim // heads) % 2:
        raise ValueError("embed_dim must be a multiple of heads with an even head dimension (rotary)")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
        model = esm.ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=heads,
                         alphabet=alphabet, token_dropout=True)
        # fair-esm leaves layer-norm weights at 1 and biases at 0 and draws the rest; perturb the norms
        # too so that every parameter matters in the tests.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layer_norm" in n:
                    p.add_(0.1 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(gen_state)
    body, regression = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("contact_head."):
            regression[k] = v.clone()
        elif k.startswith("lm_head."):
            body["encoder." + k] = v.clone()
        else:
            body["encoder.sentence_encoder." + k] = v.clone()
    cfg_model = argparse.Namespace(
        _name="esm2", arch=path.stem, encoder_layers=num_layers, encoder_embed_dim=embed_dim,
        encoder_ffn_embed_dim=4 * embed_dim, encoder_attention_heads=heads, token_dropout=True,
        dropout=0.0, attention_dropout=0.0, max_positions=1026)
    model_data = {"cfg": {"model": cfg_model}, "model": body,
                  "tokenfold": {"random_weights": True, "seed": int(seed), "note": RANDOM_BANNER}}
    with atomic_path(regression_path(path), suffix=".pt") as tmp:
        torch.save({"model": regression}, tmp)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(model_data, tmp)
    log.warning("wrote %s (%d layers, dim %d, %d heads, seed %d): %s", path, num_layers, embed_dim, heads,
                seed, RANDOM_BANNER)
    return path


def ensure_random_checkpoint(shape: str = DEFAULT_RANDOM_SHAPE, seed: int = 0,
                             models_dir: str | os.PathLike | None = None) -> Path:
    """The random test checkpoint with the shape of fair-esm model `shape`, written if absent."""
    if shape not in ESM2_MODELS:
        raise EsmLoadError(f"unknown ESM-2 shape {shape!r}; one of {', '.join(ESM2_MODELS)}")
    path = random_checkpoint_path(shape, seed, models_dir)
    if not path.exists():
        n, d, h = ESM2_MODELS[shape]
        write_random_checkpoint(path, num_layers=n, embed_dim=d, heads=h, seed=seed)
    return path


def model_num_layers(spec: str) -> int | None:
    """Number of layers from a fair-esm name or an ESM-2 style file name (``..._t33_...``)."""
    name = Path(spec).stem if spec.endswith(".pt") else spec
    if name in ESM2_MODELS:
        return ESM2_MODELS[name][0]
    m = re.search(r"_t(\d+)_", name)
    return int(m.group(1)) if m else None


def resolve_checkpoint(spec: str | None, random_weights: bool = False, seed: int = 0, write: bool = True) -> str:
    """What `load_esm` gets for a ``--model`` value: `spec`, else `DEFAULT_MODEL`. With `random_weights`
    (tests and demo only) a fair-esm name, default `DEFAULT_RANDOM_SHAPE`, stands for the random
    checkpoint of that shape (`random_checkpoint_path`), written first when absent if `write`."""
    if not random_weights:
        return spec or DEFAULT_MODEL
    spec = spec or DEFAULT_RANDOM_SHAPE
    if spec not in ESM2_MODELS:
        return spec
    return str(ensure_random_checkpoint(spec, seed) if write else random_checkpoint_path(spec, seed))
