"""How an example is shown to the translator beyond its token ids: the attention mask and the RoPE
positions of a checkpoint (`Recipe`), and the one function that applies them (`recipe_inputs`).

A recipe is stored in the checkpoint's config.json under ``"tokenfold"`` (`Recipe.store`), read back
by `Recipe.of(config)` (a config without one: the plain causal LM, so older checkpoints load as they
were trained), and applied alike by training batches (tokenfold/data.py), validation, teacher forcing
(tokenfold/teacher_forcing.py), batched generation (tokenfold/generate.py) and the one-by-one HF
``generate()`` reference (tokenfold/generate_reference.py)::

    prefix_lm          bidirectional attention inside the prefix ``<bos> a_1..a_L <sep>``; from
                       ``<kind>`` on, causal (s_i sees every amino acid and s_<i, never s_{i+1})
    aligned_positions  the input token that predicts s_i (``<kind>`` for s_1, else s_{i-1}) gets
                       a_i's RoPE position i, so the query for residue i sits at distance 0 of a_i

(struct2seq, inverse folding: the same with the roles swapped: the prefix is ``<bos> s_1..s_L <sep>``
and the target marker ``<aa>``; `Vocab.target_marker`.)
    aa_window          W > 0: inside the prefix, a token attends only to prefix tokens at most W
                       positions away (a local inductive bias for small data: each layer mixes
                       residues i-W..i+W, like a convolution); the structure tokens still see every
                       amino acid. 0: no limit

The recipe needs the plain example layout (not interleaved) and a 4-D attention mask, so the padded
batch layout with SDPA or eager attention (not flash-attn's packed rows). With plain transformers::

    from transformers import AutoModelForCausalLM
    from tokenfold.recipe import Recipe, recipe_inputs
    from tokenfold.vocab import Vocab
    model = AutoModelForCausalLM.from_pretrained(d); vocab = Vocab.load(f"{d}/vocab.json")
    ids = torch.as_tensor(vocab.encode(aa, codes))[None]       # or vocab.prompt(aa) to generate
    extra = recipe_inputs(ids, torch.ones_like(ids, dtype=torch.bool), vocab, Recipe.of(model.config))
    logits = model(input_ids=ids, **extra).logits               # extra = {} for a plain causal LM
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .vocab import Vocab

RECIPE_KEY = "tokenfold"   # config.json key that holds the `Recipe` of a checkpoint


@dataclass(frozen=True)
class Recipe:
    """The mask and positions of a checkpoint (module docstring)."""

    prefix_lm: bool = False
    aligned_positions: bool = False
    aa_window: int = 0

    @property
    def is_default(self) -> bool:
        return self == Recipe()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, config) -> "Recipe":
        """The recipe stored in a model config (the plain causal LM when none is)."""
        d = getattr(config, RECIPE_KEY, None) or {}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"config.json {RECIPE_KEY!r} has unknown recipe fields {unknown}: "
                             "written by a newer tokenfold?")
        return cls(**d)

    def store(self, config) -> None:
        setattr(config, RECIPE_KEY, self.to_dict())


def recipe_inputs(ids: torch.Tensor, valid: torch.Tensor, vocab: Vocab, recipe: Recipe) -> dict:
    """`position_ids` [B, T] and a 4-D boolean `attention_mask` [B, 1, T, T] (True: may attend) that
    apply `recipe` to rows of plain-layout token ids: whole examples, prompts, or anything in between.
    `valid` [B, T] marks the real tokens, contiguous in each row (left or right padding). A padding
    query attends to itself only (no empty softmax row); no real token sees padding. {} for the
    default recipe: callers keep plain causal attention (and its fast path).

    transformers hands a 4-D mask to the attention as it is (masking_utils), and explicit
    position_ids with a 4-D mask are never mistaken for packed sequences."""
    if recipe.is_default:
        return {}
    if vocab.interleaved:
        raise ValueError("the prefix-LM / aligned-positions recipe needs the plain layout, not the interleaved one")
    B, T = ids.shape
    dev = ids.device
    t = torch.arange(T, device=dev)
    valid = valid.to(dev, torch.bool)
    start = valid.int().argmax(1)                       # first real token of each row
    is_kind = (ids == vocab.target_marker) & valid    # <kind>, or <aa> for struct2seq
    kind_at = torch.where(is_kind.any(1), is_kind.int().argmax(1), torch.full_like(start, T))  # prompt end
    pos = (t[None] - start[:, None]).clamp(min=0)
    if recipe.aligned_positions:  # <kind> -> 1 (= a_1), s_j -> j + 1 (= a_{j+1}): the query for s_i sits at a_i
        pos = torch.where(t[None] >= kind_at[:, None], t[None] - kind_at[:, None] + 1, pos)
    allowed = (t[None, :] <= t[:, None])[None].expand(B, T, T)      # [B, query, key] causal
    prefix = t[None] < kind_at[:, None]        # <bos> a_1..a_L <sep>; <kind>, the first structure query, is not
    in_prefix = prefix[:, :, None] & prefix[:, None, :]                # query and key both in the prefix
    if recipe.prefix_lm:
        allowed = allowed | in_prefix
    if recipe.aa_window > 0:   # inside the prefix, only keys at most aa_window positions away
        near = (t[None, :] - t[:, None]).abs() <= recipe.aa_window
        allowed = allowed & (~in_prefix | near[None])
    allowed = (allowed & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
    return {"position_ids": pos, "attention_mask": allowed[:, None]}
