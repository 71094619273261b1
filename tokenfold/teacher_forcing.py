"""Teacher-forced scoring: how likely a model finds the TRUE generated part of an example.

Each example (as stage 04 writes it) is fed whole, in length-grouped, right-padded batches
(`tokenfold.batching.budget_batches`). Per example: the negative log-likelihood summed over the
training targets (target tokens and ``<eos>``, the training loss; its mean gives stage 06's
perplexity) and the model's argmax among the tokens constrained decoding may choose
(`Vocab.choice_range`: structure tokens, or the 20 amino acids of struct2seq) at each target
position (stage 06's teacher-forced accuracy). Either direction (`tokenfold.vocab`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batching import budget_batches
from .generate import default_batch_size
from .recipe import Recipe, recipe_inputs
from .vocab import Vocab


@dataclass
class TeacherForced:
    """Scores of the true tokens of one example: negative log-likelihood summed over the loss targets
    (target tokens and <eos>, the training loss), and the model's argmax among the allowed choices."""

    nll: float          # sum over n_targets
    n_targets: int      # L + 1 (target tokens + <eos>)
    pred_codes: np.ndarray  # target codes: argmax over `Vocab.choice_range` at each target (teacher forced)


@torch.inference_mode()
def teacher_forced(model, vocab: Vocab, examples: list[np.ndarray], batch_size: int | None = None,
                   max_batch_tokens: int = 65536) -> list[TeacherForced]:
    """Score token examples (as written by stage 04) in length-grouped, right-padded batches."""
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    lo, hi = vocab.target_range
    clo, chi = vocab.choice_range
    recipe = Recipe.of(model.config)   # tokenfold/recipe.py: the mask and positions training used
    out: list[TeacherForced | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    try:
        for b in budget_batches([len(e) for e in examples], max_batch_tokens, max_rows=batch_size):
            T = max(len(examples[i]) for i in b)
            ids = torch.full((len(b), T), vocab.pad, dtype=torch.long)
            att = torch.zeros((len(b), T), dtype=torch.long)
            for r, i in enumerate(b):
                e = torch.as_tensor(np.asarray(examples[i], dtype=np.int64))
                ids[r, :len(e)] = e
                att[r, :len(e)] = 1
            ids, att = ids.to(device), att.to(device)
            extra = recipe_inputs(ids, att.bool(), vocab, recipe)
            logits = model(input_ids=ids, attention_mask=extra.get("attention_mask", att),
                           position_ids=extra.get("position_ids"), use_cache=False).logits[:, :-1].float()
            tgt = ids[:, 1:]
            valid = att[:, 1:].bool()
            tmask = (tgt >= lo) & (tgt < hi) & valid
            lmask = tmask | ((tgt == vocab.eos) & valid)
            nll = -torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0]
            arg = logits[..., clo:chi].argmax(-1) + (clo - lo)
            nll_sum = (nll * lmask).sum(1).cpu().numpy()
            n_t = lmask.sum(1).cpu().numpy()
            arg, tmask = arg.cpu().numpy(), tmask.cpu().numpy()
            for r, i in enumerate(b):
                out[i] = TeacherForced(nll=float(nll_sum[r]), n_targets=int(n_t[r]), pred_codes=arg[r][tmask[r]])
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
