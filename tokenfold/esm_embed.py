"""Per-residue ESM-2 vectors of protein sequences: tokenisation, a fast forward, long-sequence windows.

`embed` runs token-budget batches over length-sorted sequences (`tokenfold.batching.budget_batches`,
like fair-esm's ``scripts/extract.py --toks_per_batch``) through `forward_repr`, a forward pass that
reuses the model's own weights but runs attention through
``torch.nn.functional.scaled_dot_product_attention`` and stops at the requested layer (checked
against ``model.forward`` in the tests); fp16/bf16 autocast on GPU, fp32 on CPU (`tokenfold.device`).

Sequences longer than ``window`` (1022, the ESM-2 limit without BOS/EOS) are cut into overlapping
windows, each run as its own sequence (with BOS/EOS). **Stitching rule**: windows have length
``window``, the first starts at 0 and the last ends at L, starts evenly spaced in between, with
consecutive windows overlapping by at least ``overlap`` residues; the cut between window k and
k+1 is the middle of their overlap, ``(start[k+1] + end[k]) // 2``; residues before the cut take
their vector from window k, the others from window k+1. So every residue gets exactly one vector,
computed with at least ``overlap // 2`` residues of context on each side (except at the chain
ends). ``truncate=True`` instead keeps only the first ``window`` residues (as extract.py does).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .batching import budget_batches
from .device import autocast, pick_dtype

log = logging.getLogger("tokenfold.esm_embed")

WINDOW = 1022        # ESM-2 was trained on crops of 1024 tokens including BOS and EOS
OVERLAP = 256


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
