"""Stage 02: per-residue ESM-2 embeddings (fair-esm), stored as sharded HDF5 aligned with the protein DB.

Four parts, in file order:

1. Loading (`load_esm`). By fair-esm name (``esm2_t33_650M_UR50D``: the file is taken from torch hub's
   cache, where fair-esm itself puts it, and downloaded from fair-esm's URL when absent) or by local
   path (``/models/esm2_t33_650M_UR50D.pt``, with ``...-contact-regression.pt`` beside it when
   present). fair-esm 2.0.0 calls ``torch.load`` without ``weights_only``; torch >= 2.6 then refuses
   real ESM-2 checkpoints because their config is a pickled ``argparse.Namespace``. We load the file
   ourselves with ``weights_only=True`` and exactly one extra allowed class (``argparse.Namespace``),
   then hand the dicts to fair-esm's own ``load_model_and_alphabet_core``: same model, nothing
   arbitrary unpickled. `write_random_checkpoint` writes a tiny randomly initialised ESM-2 in the same
   file format, for tests and the offline demo only; such files must have RANDOM in their name, are
   refused unless asked for (``allow_random=True``), and everything made from them says so.

2. Embedding (`embed`). Token-budget batches over length-sorted sequences (like fair-esm's
   ``scripts/extract.py --toks_per_batch``), a forward pass that reuses the model's own weights but runs
   attention through ``torch.nn.functional.scaled_dot_product_attention`` and stops at the requested
   layer (checked against ``model.forward`` in the tests), fp16/bf16 autocast on GPU, fp32 on CPU.

   Sequences longer than ``window`` (1022, the ESM-2 limit without BOS/EOS) are cut into overlapping
   windows, each run as its own sequence (with BOS/EOS). **Stitching rule**: windows have length
   ``window``, the first starts at 0 and the last ends at L, starts evenly spaced in between, with
   consecutive windows overlapping by at least ``overlap`` residues; the cut between window k and
   k+1 is the middle of their overlap, ``(start[k+1] + end[k]) // 2``; residues before the cut take
   their vector from window k, the others from window k+1. So every residue gets exactly one vector,
   computed with at least ``overlap // 2`` residues of context on each side (except at the chain
   ends). ``truncate=True`` instead keeps only the first ``window`` residues (as extract.py does).

3. Storage (`EmbeddingStore`): ``<out>/manifest.json`` plus, in full mode, one HDF5 file per DB shard
   (``shard_00000.h5``: ``offsets`` int64 [n+1] identical to the DB shard's, ``id`` [n], ``emb``
   float16 [R, D], ``n_windows`` uint16 [n]) or, with ``--max-residues``, one ``sample.h5`` holding a
   seeded uniform sample of train (and val) residues (groups ``train``/``val``: ``emb`` float16 [N, D],
   ``entry`` int64 global DB index, ``pos`` int32 residue position, ``aa``/``ss`` uint8 letters).

4. The stage (`run_extract`, `finalize`): SLURM array tasks take DB shards round-robin; each DB shard is
   embedded in blocks of about ``block_residues`` residues saved as atomic part files under ``work/``,
   so a killed task resumes at the last finished block and the result equals an uninterrupted run; the
   shard file is assembled atomically from its parts; the finalize step writes the report and, last,
   the manifest.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from . import layout
from .artifacts import atomic_path, read_json, read_manifest, write_json_atomic
from .batching import budget_batches
from .device import autocast, pick_device, pick_dtype
from .sharding import my_units

log = logging.getLogger("tokenfold.esm")

FORMAT = "tokenfold-embeddings"
VERSION = 1
WINDOW = 1022        # ESM-2 was trained on crops of 1024 tokens including BOS and EOS
OVERLAP = 256
STORE_DTYPE = np.float16

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


# ============================================================================= 1. loading
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


# ============================================================================= 2. embedding
def resolve_layer(num_layers: int, layer: int | None) -> int:
    """0..num_layers; None or -1 is the last layer (negative counts from the end, as in extract.py)."""
    if layer is None:
        return num_layers
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"layer {layer} outside 0..{num_layers}")
    return layer % (num_layers + 1)


def windows(L: int, window: int = WINDOW, overlap: int = OVERLAP) -> list[tuple[int, int, int, int]]:
    """The windows of a sequence of length L: (start, end, keep_from, keep_to), keep ranges tiling 0..L.

    See the module docstring for the rule. One window (0, L, 0, L) when L <= window.
    """
    if L <= window:
        return [(0, L, 0, L)]
    if not 0 <= overlap < window:
        raise ValueError("need 0 <= overlap < window")
    n = math.ceil((L - overlap) / (window - overlap))
    starts = [round(i * (L - window) / (n - 1)) for i in range(n)]
    ends = [s + window for s in starts]
    cuts = [0] + [(starts[k + 1] + ends[k]) // 2 for k in range(n - 1)] + [L]
    return [(starts[k], ends[k], cuts[k], cuts[k + 1]) for k in range(n)]


_TOKEN_TABLES: dict[int, np.ndarray] = {}


def _token_table(alphabet) -> np.ndarray:
    """ASCII byte -> token index (unknown characters -> <unk>, as alphabet.encode does)."""
    key = id(alphabet)
    if key not in _TOKEN_TABLES:
        tab = np.full(256, alphabet.unk_idx, dtype=np.int64)
        for tok, idx in alphabet.tok_to_idx.items():
            if len(tok) == 1:
                tab[ord(tok)] = idx
        _TOKEN_TABLES[key] = tab
    return _TOKEN_TABLES[key]


def tokenize(alphabet, seqs: Sequence[str]) -> torch.Tensor:
    """[B, max_len+2] int64 tokens: <cls> seq <eos> <pad>..., as fair-esm's BatchConverter builds them."""
    tab = _token_table(alphabet)
    T = max(len(s) for s in seqs) + 2
    toks = np.full((len(seqs), T), alphabet.padding_idx, dtype=np.int64)
    for i, s in enumerate(seqs):
        toks[i, 0] = alphabet.cls_idx
        toks[i, 1:len(s) + 1] = tab[np.frombuffer(s.encode("ascii", "replace"), dtype=np.uint8)]
        toks[i, len(s) + 1] = alphabet.eos_idx
    return torch.from_numpy(toks)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def forward_repr(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """Representation after `layer` layers, [B, T, D]; the same numbers as
    ``model(tokens, repr_layers=[layer])["representations"][layer]`` (tested), computed faster:
    attention through F.scaled_dot_product_attention (no T x T weights kept, flash/fused kernels where
    available), no attention-weight averaging, and no layers or LM head beyond `layer`."""
    padding_mask = tokens.eq(model.padding_idx)                     # [B, T]
    x = model.embed_scale * model.embed_tokens(tokens)
    if model.token_dropout:   # ESM-2's inference-time rescaling (no <mask> tokens here: factor 0.88)
        is_mask = tokens.eq(model.mask_idx)
        x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
        observed = is_mask.sum(-1).to(x.dtype) / (~padding_mask).sum(-1)
        x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]
    has_pad = bool(padding_mask.any())
    if has_pad:
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
    if layer == 0:
        return x
    B, T, D = x.shape
    first = model.layers[0].self_attn
    H, hd = first.num_heads, first.head_dim
    inv_freq = first.rot_emb.inv_freq
    freqs = torch.outer(torch.arange(T, device=x.device, dtype=inv_freq.dtype), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()                                  # [T, hd], as fair-esm's rotary
    attn_mask = (~padding_mask)[:, None, None, :] if has_pad else None  # True = may attend
    for blk in model.layers[:layer]:
        sa = blk.self_attn
        h = blk.self_attn_layer_norm(x)
        q = F.linear(h, sa.q_proj.weight, sa.q_proj.bias).view(B, T, H, hd).transpose(1, 2)
        k = F.linear(h, sa.k_proj.weight, sa.k_proj.bias).view(B, T, H, hd).transpose(1, 2)
        v = F.linear(h, sa.v_proj.weight, sa.v_proj.bias).view(B, T, H, hd).transpose(1, 2)
        c, s = cos.to(q.dtype), sin.to(q.dtype)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # default scale = hd**-0.5
        x = x + sa.out_proj(o.transpose(1, 2).reshape(B, T, D))
        h = blk.final_layer_norm(x)
        x = x + blk.fc2(F.gelu(blk.fc1(h)))
    if layer == model.num_layers:
        x = model.emb_layer_norm_after(x)
    return x


def default_toks_per_batch(device: torch.device) -> int:
    """GPU: large batches. CPU: 1024 tokens per thread, at most 4096. Small batches stay in cache (one
    thread, esm2_t6 shape, real chains: 512 -> 4450, 1024 -> 3950, 2048 -> 3250, 4096 -> 2600 residues
    per CPU second), but every op is a parallel region, and with several threads on a busy node bigger
    batches synchronise less often (2 threads, oversubscribed: 4096 ~25% faster than 1024)."""
    if device.type == "cuda":
        return 16384
    return min(4096, 1024 * max(1, torch.get_num_threads()))


def embed(model, alphabet, seqs: Sequence[str], toks_per_batch: int | None = None, layer: int | None = None,
          device: str | torch.device | None = None, window: int = WINDOW, truncate: bool = False,
          overlap: int = OVERLAP, precision: str = "auto", fast: bool = True,
          on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Per-residue vectors of `seqs`: a list of float32 [L_i, D] (L_i = min(L, window) with `truncate`).

    `layer`: 0..num_layers, default (None/-1) the last (after the final layer norm, as fair-esm).
    `device`: where to run (the model is moved there); default the model's device.
    `toks_per_batch`: padded tokens per batch (BOS/EOS included); default by device.
    `window`/`overlap`/`truncate`: the long-sequence rule of the module docstring.
    `precision`: auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, bf16 or fp16.
    `fast=False` runs fair-esm's own ``model.forward`` instead of `forward_repr` (same numbers, slower).
    `on_batch(n_residues)` is called after every batch (progress bars).
    """
    layer = resolve_layer(model.num_layers, layer)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if next(model.parameters()).device != device:
        model.to(device)
    toks_per_batch = toks_per_batch or default_toks_per_batch(device)
    amp = pick_dtype(precision, device)
    D = model.embed_dim

    # work items: (sequence, window start, end, keep_from, keep_to)
    items: list[tuple[int, int, int, int, int]] = []
    out: list[np.ndarray] = []
    for i, s in enumerate(seqs):
        L = min(len(s), window) if truncate else len(s)
        out.append(np.empty((L, D), dtype=np.float32))
        if L:
            items.extend((i, *w) for w in windows(L, window, overlap))
    lengths = [it[2] - it[1] for it in items]

    def run(batch: list[int]) -> None:
        chunk = [seqs[items[j][0]][items[j][1]:items[j][2]] for j in batch]
        toks = tokenize(alphabet, chunk).to(device, non_blocking=True)
        try:
            with torch.inference_mode(), autocast(device, amp):
                if fast:
                    rep = forward_repr(model, toks, layer)
                else:
                    rep = model(toks, repr_layers=[layer])["representations"][layer]
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            log.warning("out of GPU memory on a batch of %d x %d tokens; splitting it", len(batch), toks.shape[1])
            half = len(batch) // 2
            run(batch[:half])
            run(batch[half:])
            return
        rep = rep.float().cpu().numpy()
        n_res = 0
        for b, j in enumerate(batch):
            i, start, end, keep_from, keep_to = items[j]
            out[i][keep_from:keep_to] = rep[b, 1 + keep_from - start:1 + keep_to - start]
            n_res += keep_to - keep_from
        if on_batch is not None:
            on_batch(n_res)

    for batch in budget_batches(lengths, toks_per_batch, extra=2):   # + <cls>, <eos>
        run(batch)
    return out


# ============================================================================= 3. storage
def shard_file(k: int) -> str:
    return f"shard_{k:05d}.h5"


class EmbeddingShard:
    """The embeddings of one DB shard: ``offsets``/``ids`` in memory, ``emb`` read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{self.path}: not a {FORMAT} file")
            self.attrs = dict(f.attrs)
            self.offsets = f["offsets"][()]
            self.ids = f["id"].asstr()[()]
            self.n_windows = f["n_windows"][()]
            self.shape = f["emb"].shape

    def __len__(self):
        return len(self.ids)

    def get(self, j: int) -> np.ndarray:
        """float16 [L_j, D] of entry j (position in the DB shard)."""
        return self.get_many([j])[0]

    def get_many(self, js) -> list[np.ndarray]:
        """float16 [L_j, D] of each entry j, the file opened once."""
        with h5py.File(self.path, "r") as f:
            ds = f["emb"]
            return [ds[self.offsets[j]:self.offsets[j + 1]] for j in js]

    def take(self, rows: np.ndarray, block: int = 1 << 16) -> np.ndarray:
        """float16 [len(rows), D]: the given rows (sorted), read block by block, so that memory stays
        at one block of `block` rows instead of the whole shard (a 1% residue sample of a 650M
        model's shard touches nearly every block but keeps only its rows)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.shape[1]), np.float16)
        with h5py.File(self.path, "r") as f:
            ds = f["emb"]
            bounds = np.searchsorted(rows, np.arange(0, self.shape[0] + block, block))
            for i in range(len(bounds) - 1):
                a, b = bounds[i], bounds[i + 1]
                if a < b:
                    lo = rows[a]
                    out[a:b] = ds[lo:rows[b - 1] + 1][rows[a:b] - lo]
        return out

    def load(self) -> np.ndarray:
        """The whole shard, float16 [R, D] (entry j = rows offsets[j]:offsets[j+1])."""
        with h5py.File(self.path, "r") as f:
            return f["emb"][()]


class EmbeddingStore:
    """Reader of a stage-02 output directory (``data/embeddings/<model>_L<layer>/``).

    >>> store = EmbeddingStore("data/embeddings/esm2_t33_650M_UR50D_L33")
    >>> store.meta["model"], store.meta["dim"], store.random_weights
    >>> store.shard(0).get(5)        # full mode: float16 [L, D] of entry 5 of DB shard 0
    >>> store.sample("train")        # sample mode (--max-residues): dict of arrays
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = read_manifest(self.path, FORMAT, "stage 02")
        self.mode = self.meta["mode"]
        self.dim = int(self.meta["dim"])
        self.random_weights = bool(self.meta["random_weights"])
        self._shards: dict[int, EmbeddingShard] = {}

    @property
    def n_shards(self) -> int:
        return len(self.meta.get("shards", []))

    def shard(self, k: int) -> EmbeddingShard:
        if self.mode != "full":
            raise ValueError(f"{self.path}: holds a residue sample (--max-residues), not per-shard embeddings")
        if k not in self._shards:
            self._shards[k] = EmbeddingShard(self.path / self.meta["shards"][k]["file"])
        return self._shards[k]

    def sample(self, split: str = "train") -> dict[str, np.ndarray]:
        """Sample mode: emb float16 [N, D], entry int64, pos int32, aa uint8, ss uint8 of `split`."""
        if self.mode != "sample":
            raise ValueError(f"{self.path}: holds full per-shard embeddings, not a sample")
        with h5py.File(self.path / self.meta["sample"]["file"], "r") as f:
            if split not in f:
                raise KeyError(f"{self.path}: no {split} residues in the sample")
            return {k: f[split][k][()] for k in ("emb", "entry", "pos", "aa", "ss")}

    def residues(self, db, split: str, max_residues: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Up to `max_residues` residues of `split` drawn uniformly (seeded), in either mode:
        dict(emb float32 [N, D], entry, pos, aa, ss). `db` is the ProteinDB the store was made from."""
        if self.mode == "sample":
            d = self.sample(split)
            if max_residues is not None and len(d["entry"]) > max_residues:
                keep = np.sort(np.random.default_rng(seed).choice(len(d["entry"]), max_residues, replace=False))
                d = {k: v[keep] for k, v in d.items()}
            d["emb"] = d["emb"].astype(np.float32)
            return d
        sel = sample_residues(db, split, max_residues, seed)
        parts = {k: [] for k in ("emb", "entry", "pos", "aa", "ss")}
        for k, (entries, pos) in sel.items():
            sh = self.shard(k)
            dbs = db.shards[k]
            local = entries - dbs.first_index
            rows = sh.offsets[local] + pos
            if not np.array_equal(sh.ids, dbs.ids):
                raise ValueError(f"{sh.path}: ids differ from DB shard {dbs.path} (embeddings made from another DB?)")
            parts["emb"].append(sh.take(rows).astype(np.float32))
            parts["entry"].append(entries)
            parts["pos"].append(pos)
            rows_db = dbs.arrays["offsets"][local] + pos
            parts["aa"].append(dbs.arrays["aa"][rows_db])
            parts["ss"].append(dbs.arrays["ss"][rows_db])
            dbs.release()
        if not parts["emb"]:
            return {"emb": np.zeros((0, self.dim), np.float32), "entry": np.zeros(0, np.int64),
                    "pos": np.zeros(0, np.int32), "aa": np.zeros(0, np.uint8), "ss": np.zeros(0, np.uint8)}
        return {k: np.concatenate(v) for k, v in parts.items()}


# ----------------------------------------------------------------------------- residue sampling
def _db_shard_offsets(shard) -> np.ndarray:
    """Offsets of a DB shard without loading its other arrays."""
    with h5py.File(shard.path, "r") as f:
        return f["offsets"][()]


def sample_residues(db, split: str, max_residues: int | None, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A seeded uniform sample (without replacement) of the residues of `split`, all of them when
    `max_residues` is None or larger. Returns {db shard: (global entry index [n], residue position [n])},
    sorted in global residue order. Every array task computes the same sample."""
    from .db import SPLIT_CODES

    code = SPLIT_CODES[split]
    entries, lengths = [], []
    for k, shard in enumerate(db.shards):
        codes = np.asarray(db.split_codes[db.shard_starts[k]:db.shard_starts[k + 1]])
        js = np.flatnonzero(codes == code)
        entries.append(js + shard.first_index)
        lengths.append(np.diff(_db_shard_offsets(shard))[js])
    entries = np.concatenate(entries).astype(np.int64) if entries else np.zeros(0, np.int64)
    lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    if max_residues is None or max_residues >= total:
        picks = np.arange(total, dtype=np.int64)
    else:
        rng = np.random.default_rng([seed, code])   # one stream per split
        picks = np.sort(rng.choice(total, size=max_residues, replace=False))
    which = np.searchsorted(starts, picks, side="right") - 1
    g = entries[which]
    pos = (picks - starts[which]).astype(np.int32)
    out = {}
    shard_of = np.searchsorted(db.shard_starts, g, side="right") - 1
    for k in np.unique(shard_of):
        m = shard_of == k
        out[int(k)] = (g[m], pos[m])
    return out


# ============================================================================= 4. the stage
@dataclass
class ExtractConfig:
    db: Path
    out: Path
    model: str                       # the name or path given to load_esm
    layer: int | None = None         # None: last
    random_weights_for_testing: bool = False
    toks_per_batch: int | None = None
    device: str | None = None
    precision: str = "auto"
    window: int = WINDOW
    overlap: int = OVERLAP
    truncate: bool = False
    max_residues: int | None = None
    max_val_residues: int | None = None
    seed: int = 0
    block_residues: int = 1 << 18
    overwrite: bool = False


def model_num_layers(spec: str) -> int | None:
    """Number of layers from a fair-esm name or an ESM-2 style file name (``..._t33_...``)."""
    name = Path(spec).stem if spec.endswith(".pt") else spec
    if name in ESM2_MODELS:
        return ESM2_MODELS[name][0]
    m = re.search(r"_t(\d+)_", name)
    return int(m.group(1)) if m else None


def default_out_dir(spec: str, layer: int | None) -> Path:
    """``data/embeddings/<model>_L<layer>`` for a model name or checkpoint path."""
    name = Path(spec).stem if spec.endswith(".pt") else spec
    if layer is None or layer < 0:
        n = model_num_layers(spec)
        if n is None:
            raise ValueError(f"cannot tell the number of layers of {spec!r} from its name; pass --layer or --out")
        layer = resolve_layer(n, layer)
    return layout.embeddings_dir(name, layer)


def _work(out: Path) -> Path:
    return out / "work"


class _Meter:
    """Progress bar in residues (tqdm shows residues/s) plus a log line every `every` seconds."""

    def __init__(self, total: int, desc: str, every: float = 30.0):
        from .cli import progress

        self.bar = progress(total=total, desc=desc, unit="res", unit_scale=True)
        self.total, self.done, self.desc, self.every = total, 0, desc, every
        self.t0 = self.last = time.time()

    def __call__(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            log.info("%s: %d/%d residues (%.0f residues/s)", self.desc, self.done, self.total, rate)

    def close(self) -> float:
        self.bar.close()
        return time.time() - self.t0


def _stamp(cfg: ExtractConfig, info: dict, layer: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "model": info["name"], "model_path": info["path"],
            "layer": layer, "num_layers": info["num_layers"], "dim": info["embed_dim"], "dtype": "float16",
            "random_weights": bool(info["random_weights"]), "window": cfg.window, "overlap": cfg.overlap,
            "truncate": cfg.truncate}


def _embed_db_shard(cfg: ExtractConfig, k: int, shard, model, alphabet, info: dict, layer: int, device) -> dict:
    """Full mode, one DB shard -> ``shard_0000k.h5`` via resumable block parts. Returns its work report."""
    out = cfg.out / shard_file(k)
    parts_dir = _work(cfg.out) / f"shard_{k:05d}"
    a = shard.arrays
    offsets, ids = a["offsets"], a["id"]
    aa = a["aa"].tobytes().decode("ascii")
    lengths = np.diff(offsets)
    seqs = [aa[offsets[j]:offsets[j + 1]] for j in range(len(ids))]
    blocks = [(int(b[0]), int(b[-1]) + 1) for b in
              budget_batches(lengths, cfg.block_residues, padded=False, order=np.arange(len(lengths)))] or [(0, 0)]
    todo = [b for b in range(len(blocks)) if not (parts_dir / f"part_{b:05d}.npy").exists()]
    if len(todo) < len(blocks):
        log.info("DB shard %d: resuming, %d of %d blocks already done", k, len(blocks) - len(todo), len(blocks))
    meter = _Meter(int(sum(lengths[blocks[b][0]:blocks[b][1]].sum() for b in todo)), f"shard {k}")
    D = info["embed_dim"]
    for b in todo:
        j0, j1 = blocks[b]
        vecs = embed(model, alphabet, seqs[j0:j1], toks_per_batch=cfg.toks_per_batch, layer=layer, device=device,
                     window=cfg.window, truncate=cfg.truncate, overlap=cfg.overlap, precision=cfg.precision,
                     on_batch=meter)
        block = np.full((int(lengths[j0:j1].sum()), D), np.nan, dtype=STORE_DTYPE)
        r = 0
        for j, v in zip(range(j0, j1), vecs):
            block[r:r + len(v)] = v      # truncated entries keep NaN rows past the window
            r += int(lengths[j])
        with atomic_path(parts_dir / f"part_{b:05d}.npy", suffix=".npy") as tmp:
            np.save(tmp, block)
    seconds = meter.close()
    n_windows = np.array([0 if L == 0 else (1 if cfg.truncate else len(windows(int(L), cfg.window, cfg.overlap)))
                          for L in lengths], dtype=np.uint16)
    R = int(offsets[-1])
    with atomic_path(out, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(_stamp(cfg, info, layer))
            f.attrs.update({"db_shard": str(shard.path.name), "n_entries": len(ids), "n_residues": R})
            f.create_dataset("offsets", data=offsets)
            f.create_dataset("id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("n_windows", data=n_windows)
            ds = f.create_dataset("emb", shape=(R, D), dtype=STORE_DTYPE,
                                  chunks=(max(1, min(R, 512)), D) if R else None)
            for b, (j0, j1) in enumerate(blocks):
                if j1 > j0 and offsets[j1] > offsets[j0]:
                    ds[offsets[j0]:offsets[j1]] = np.load(parts_dir / f"part_{b:05d}.npy", mmap_mode="r")
    shutil.rmtree(parts_dir, ignore_errors=True)
    done = int(sum(lengths[blocks[b][0]:blocks[b][1]].sum() for b in todo))
    rep = {"db_shard": k, "file": out.name, "n_entries": len(ids), "n_residues": R,
           "n_long": int((n_windows > 1).sum()), "n_truncated": int((lengths > cfg.window).sum()) if cfg.truncate else 0,
           "seconds": seconds, "residues_embedded_now": done, "residues_per_s": done / max(seconds, 1e-9)}
    write_json_atomic(_work(cfg.out) / f"shard_{k:05d}.json", rep)
    return rep


def _sample_db_shard(cfg: ExtractConfig, k: int, shard, picks: dict, model, alphabet, info, layer, device) -> dict:
    """Sample mode, one DB shard -> ``work/sample_0000k.npz`` (the sampled residues of its entries)."""
    part = _work(cfg.out) / f"sample_{k:05d}.npz"
    a = shard.arrays
    offsets = a["offsets"]
    cols = {n: [] for n in ("split", "entry", "pos", "emb", "aa", "ss")}
    uniq_all = [np.unique(g) - shard.first_index for g, _ in picks.values()]
    total = sum(len(u) for u in uniq_all)
    meter = _Meter(int(sum(np.diff(offsets)[u].sum() for u in uniq_all)), f"sample shard {k}")
    for split_code, (g, pos) in picks.items():
        uniq, inv = np.unique(g, return_inverse=True)
        local = uniq - shard.first_index
        seqs = [a["aa"][offsets[j]:offsets[j + 1]].tobytes().decode("ascii") for j in local]
        vecs = embed(model, alphabet, seqs, toks_per_batch=cfg.toks_per_batch, layer=layer, device=device,
                     window=cfg.window, truncate=False, overlap=cfg.overlap, precision=cfg.precision, on_batch=meter)
        cols["emb"].append(np.stack([vecs[i][p] for i, p in zip(inv, pos)]).astype(STORE_DTYPE) if len(g)
                           else np.zeros((0, info["embed_dim"]), STORE_DTYPE))
        rows = offsets[g - shard.first_index] + pos
        cols["aa"].append(a["aa"][rows])
        cols["ss"].append(a["ss"][rows])
        cols["split"].append(np.full(len(g), split_code, np.uint8))
        cols["entry"].append(g)
        cols["pos"].append(pos)
    seconds = meter.close()
    arrays = {n: (np.concatenate(v) if v else np.zeros(0)) for n, v in cols.items()}
    with atomic_path(part, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    rep = {"db_shard": k, "file": part.name, "n_entries_embedded": total, "n_residues": meter.done,
           "n_sampled": int(len(arrays["entry"])), "seconds": seconds,
           "residues_per_s": meter.done / max(seconds, 1e-9)}
    write_json_atomic(_work(cfg.out) / f"shard_{k:05d}.json", rep)
    return rep


def _check_existing(cfg: ExtractConfig, mode: str) -> bool:
    """True when the output is complete (nothing to do). Refuses to mix modes or models in one directory."""
    mpath = cfg.out / "manifest.json"
    if mpath.exists():
        m = read_json(mpath)
        if m.get("mode") != mode:
            from .cli import die
            die(f"{cfg.out} already holds mode={m.get('mode')} embeddings; pass --overwrite or another --out")
        return True
    return False


def run_extract(cfg: ExtractConfig, num_tasks: int = 1, task_index: int = 0) -> list[dict]:
    """One array task of stage 02: embeds its DB shards (full mode) or its part of the sample."""
    from .db import SPLIT_CODES, ProteinDB

    db = ProteinDB(cfg.db)
    mode = "sample" if cfg.max_residues is not None else "full"
    if cfg.overwrite:
        _clear_outputs(cfg, db, num_tasks, task_index)
    elif _check_existing(cfg, mode):
        log.info("%s is complete (manifest.json exists); nothing to do (use --overwrite to redo)", cfg.out)
        return []
    units = my_units(len(db.shards), num_tasks, task_index)
    if mode == "full":
        pending = [k for k in units if not (cfg.out / shard_file(k)).exists()]
    else:
        pending = [k for k in units if not (_work(cfg.out) / f"sample_{k:05d}.npz").exists()]
    if not pending:
        log.info("task %d/%d: all %d of its DB shards are done", task_index, num_tasks, len(units))
        return []
    device = pick_device(cfg.device)
    model, alphabet, info = load_esm(cfg.model, allow_random=cfg.random_weights_for_testing, device=device)
    layer = resolve_layer(info["num_layers"], cfg.layer)
    cfg.out.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(cfg, info, layer)
    stamp_path = _work(cfg.out) / "stamp.json"
    if stamp_path.exists() and read_json(stamp_path) != stamp:
        from .cli import die
        die(f"{cfg.out} holds unfinished work made with other settings ({stamp_path}); pass --overwrite")
    write_json_atomic(stamp_path, stamp)
    log.info("task %d/%d: %s mode, %d DB shards to do (%s), %s layer %d, device %s%s", task_index, num_tasks, mode,
             len(pending), pending[:8], info["name"], layer, device,
             " -- RANDOM WEIGHTS (test/demo only)" if info["random_weights"] else "")
    reports = []
    if mode == "full":
        for k in pending:
            reports.append(_embed_db_shard(cfg, k, db.shards[k], model, alphabet, info, layer, device))
            db.shards[k].release()
            log.info("DB shard %d: %d residues in %.1f s (%.0f residues/s)", k, reports[-1]["n_residues"],
                     reports[-1]["seconds"], reports[-1]["residues_per_s"])
    else:
        train = sample_residues(db, "train", cfg.max_residues, cfg.seed)
        val_n = cfg.max_val_residues if cfg.max_val_residues is not None else min(cfg.max_residues, 100_000)
        val = sample_residues(db, "val", val_n, cfg.seed)
        for k in pending:
            picks = {}
            if k in train:
                picks[SPLIT_CODES["train"]] = train[k]
            if k in val:
                picks[SPLIT_CODES["val"]] = val[k]
            reports.append(_sample_db_shard(cfg, k, db.shards[k], picks, model, alphabet, info, layer, device))
            db.shards[k].release()
    return reports


def _clear_outputs(cfg: ExtractConfig, db, num_tasks: int, task_index: int) -> None:
    """--overwrite: remove this task's shard outputs, their work files, and the manifest/report."""
    for k in my_units(len(db.shards), num_tasks, task_index):
        for p in (cfg.out / shard_file(k), _work(cfg.out) / f"sample_{k:05d}.npz",
                  _work(cfg.out) / f"shard_{k:05d}.json"):
            p.unlink(missing_ok=True)
        shutil.rmtree(_work(cfg.out) / f"shard_{k:05d}", ignore_errors=True)
    for name in ("manifest.json", "sample.h5", "report.json", "report.png"):
        (cfg.out / name).unlink(missing_ok=True)
    (_work(cfg.out) / "stamp.json").unlink(missing_ok=True)


def finalize(cfg: ExtractConfig) -> dict:
    """Check every DB shard is done, write sample.h5 (sample mode), report.json/.png, then manifest.json."""
    from .cli import die
    from .db import SPLIT_CODES, ProteinDB

    db = ProteinDB(cfg.db)
    mode = "sample" if cfg.max_residues is not None else "full"
    if not cfg.overwrite and _check_existing(cfg, mode):
        log.info("%s already finalized", cfg.out)
        return read_json(cfg.out / "manifest.json")
    stamp_path = _work(cfg.out) / "stamp.json"
    if not stamp_path.exists():
        die(f"{cfg.out}: no stage-02 work found; run the extraction tasks first")
    stamp = read_json(stamp_path)
    n = len(db.shards)
    if mode == "full":
        missing = [k for k in range(n) if not (cfg.out / shard_file(k)).exists()]
    else:
        missing = [k for k in range(n) if not (_work(cfg.out) / f"sample_{k:05d}.npz").exists()]
    if missing:
        die(f"{cfg.out}: {len(missing)} of {n} DB shards not embedded yet (e.g. {missing[:10]}); "
            "run (or re-run) their array tasks first")
    reports = [read_json(_work(cfg.out) / f"shard_{k:05d}.json") for k in range(n)]
    manifest = dict(stamp)
    manifest.update({"mode": mode, "db": str(cfg.db), "db_n_entries": int(db.n_total)})
    if mode == "full":
        shards = []
        for k in range(n):
            sh = EmbeddingShard(cfg.out / shard_file(k))
            if sh.attrs.get("model") != stamp["model"] or int(sh.attrs.get("layer")) != stamp["layer"]:
                die(f"{sh.path}: made with {sh.attrs.get('model')} layer {sh.attrs.get('layer')}, "
                    f"expected {stamp['model']} layer {stamp['layer']}; pass --overwrite")
            shards.append({"file": shard_file(k), "db_file": db.manifest["shards"][k]["file"],
                           "n_entries": len(sh), "n_residues": int(sh.shape[0])})
        manifest["shards"] = shards
        manifest["n_residues"] = int(sum(s["n_residues"] for s in shards))
    else:
        # one part (DB shard) in memory at a time: count each split, then fill preallocated datasets.
        # Entries are global DB indices, so parts in shard order, each sorted by (entry, pos), are in
        # global residue order.
        parts = [_work(cfg.out) / f"sample_{k:05d}.npz" for k in range(n)]
        counts = {"train": 0, "val": 0}
        for part in parts:
            with np.load(part) as z:
                codes = z["split"]
            for split in counts:
                counts[split] += int((codes == SPLIT_CODES[split]).sum())
        cols = (("emb", STORE_DTYPE), ("entry", np.int64), ("pos", np.int32), ("aa", np.uint8), ("ss", np.uint8))
        with atomic_path(cfg.out / "sample.h5", suffix=".h5") as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs.update(stamp)
                ds = {split: {c: f.create_dataset(f"{split}/{c}", dtype=dt,
                                                  shape=(n_rows, stamp["dim"]) if c == "emb" else (n_rows,))
                              for c, dt in cols} for split, n_rows in counts.items()}
                filled = dict.fromkeys(counts, 0)
                for part in parts:
                    with np.load(part) as z:
                        p = {c: z[c] for c in z.files}
                    for split in counts:
                        sel = np.flatnonzero(p["split"] == SPLIT_CODES[split])
                        sel = sel[np.lexsort((p["pos"][sel], p["entry"][sel]))]
                        a = filled[split]
                        for c, dt in cols:
                            ds[split][c][a:a + len(sel)] = p[c][sel].astype(dt)
                        filled[split] = a + len(sel)
        manifest["sample"] = {"file": "sample.h5", "seed": cfg.seed, "max_residues": cfg.max_residues,
                              "max_val_residues": cfg.max_val_residues, "n_train": counts["train"],
                              "n_val": counts["val"]}
        manifest["n_residues"] = counts["train"] + counts["val"]
    report = _write_report(cfg, manifest, reports)
    manifest["report"] = "report.json"
    write_json_atomic(cfg.out / "manifest.json", manifest)
    log.info("stage 02 finalized: %s (%s mode, %d residues%s)", cfg.out, mode, manifest["n_residues"],
             ", RANDOM WEIGHTS" if manifest["random_weights"] else "")
    return manifest | {"report_summary": report["summary"]}


def _write_report(cfg: ExtractConfig, manifest: dict, reports: list[dict]) -> dict:
    from .report import save_figure, subplots, write_report

    secs = sum(r["seconds"] for r in reports)
    embedded = sum(r.get("residues_embedded_now", r["n_residues"]) for r in reports)
    summary = {"mode": manifest["mode"], "model": manifest["model"], "layer": manifest["layer"],
               "dim": manifest["dim"], "random_weights": manifest["random_weights"],
               "n_db_shards": len(reports), "n_residues_stored": manifest["n_residues"],
               "compute_seconds": secs, "residues_per_s": embedded / max(secs, 1e-9),
               "n_long_entries_windowed": int(sum(r.get("n_long", 0) for r in reports)),
               "n_truncated_entries": int(sum(r.get("n_truncated", 0) for r in reports))}
    rep = {"stage": "02_extract_esm_embeddings", "summary": summary, "shards": reports}
    if manifest["random_weights"]:
        rep["warning"] = RANDOM_BANNER
    # a residue sample for the plots: norms and a few coordinates
    rng = np.random.default_rng(0)
    if manifest["mode"] == "full":
        files = [cfg.out / s["file"] for s in manifest["shards"][:8]]
        vec = []
        for p in files:
            with h5py.File(p, "r") as f:
                R = f["emb"].shape[0]
                if R:
                    idx = np.sort(rng.choice(R, min(R, 2000), replace=False))
                    vec.append(f["emb"][idx].astype(np.float32))
        lengths = np.concatenate([np.diff(EmbeddingShard(p).offsets) for p in files]) if files else np.zeros(0)
    else:
        with h5py.File(cfg.out / "sample.h5", "r") as f:
            R = f["train/emb"].shape[0]
            idx = np.sort(rng.choice(R, min(R, 10000), replace=False)) if R else np.zeros(0, int)
            vec = [f["train/emb"][idx].astype(np.float32)] if R else []
        lengths = np.zeros(0)
    vec = np.concatenate(vec) if vec else np.zeros((0, manifest["dim"]), np.float32)
    fig, axes = subplots(3)
    if len(lengths):
        axes[0].hist(lengths, bins=40, color="tab:blue")
        axes[0].axvline(cfg.window, color="r", ls="--", label=f"window {cfg.window}")
        axes[0].legend()
    axes[0].set(title="entry lengths (first DB shards)", xlabel="residues", ylabel="entries")
    axes[1].bar([r["db_shard"] for r in reports], [r["residues_per_s"] for r in reports], color="tab:green")
    axes[1].set(title="throughput per DB shard", xlabel="DB shard", ylabel="residues/s")
    if len(vec):
        axes[2].hist(np.linalg.norm(vec, axis=1), bins=50, color="tab:purple")
        summary["mean_vector_norm"] = float(np.linalg.norm(vec, axis=1).mean())
    axes[2].set(title=f"L2 norm of layer-{manifest['layer']} vectors", xlabel="norm", ylabel="residues")
    title = f"stage 02: {manifest['model']} layer {manifest['layer']} ({manifest['mode']})"
    if manifest["random_weights"]:
        title += "\nRANDOM WEIGHTS - test/demo only, no learned information"
    axes[1].set_xticks([r["db_shard"] for r in reports][:20])
    fig.suptitle(title, color="red" if manifest["random_weights"] else "black", y=1.0 + 0.07 * title.count("\n") + 0.04)
    save_figure(fig, cfg.out / "report.png")
    write_report(cfg.out / "report.json", rep)
    return rep
