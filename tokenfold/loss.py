"""The training objective of stage 05 and what validation measures with it.

Loss: cross-entropy over the loss targets of `tokenfold.vocab.Vocab.labels` (the generated part: the
structure tokens and <eos>, never an amino acid; for a struct2seq vocabulary the amino acids and <eos>). The training loop divides the summed loss by the number of targets of
the *global* batch (all ranks, all accumulation steps), so one process and N processes with the same
global batch compute the same update (tests/test_distributed.py).

Accuracy: teacher-forced accuracy of the generated part, the argmax of the next-token distribution given
the true prefix, counted on the targets other than <eos> (structure tokens; struct2seq: amino acids).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import Dist
from .vocab import EOS, IGNORE_INDEX, Vocab


def token_stats(logits: torch.Tensor, labels: torch.Tensor):
    """(summed cross-entropy over the loss targets, number of correctly predicted target tokens: every
    loss target but <eos>, i.e. the structure tokens, or the amino acids of a struct2seq vocabulary).

    `labels` are unshifted (HF convention): position t's logits predict labels[t + 1].
    """
    logits = logits[:, :-1, :].float()
    tgt = labels[:, 1:].to(logits.device)
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == tgt) & (tgt != IGNORE_INDEX) & (tgt != EOS)).sum()
    return loss_sum, correct


@torch.no_grad()
def evaluate(model, batches, vocab: Vocab, dist: Dist, autocast) -> dict:
    """Validation loss (per loss target) and teacher-forced structure-token accuracy, over all ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)  # loss, n_loss, correct, n_struct
    for b in batches:
        with autocast():
            logits = model(**b.model_inputs(dist.device), use_cache=False).logits
        loss_sum, correct = token_stats(logits, b.labels)
        sums += torch.tensor([loss_sum.item(), b.n_loss, correct.item(), b.n_struct], dtype=torch.float64,
                             device=dist.device)
    dist.all_reduce_sum(sums)
    model.train(was_training)
    loss, n_loss, correct, n_struct = sums.tolist()
    return {"loss": loss / max(n_loss, 1), "acc": correct / max(n_struct, 1), "n_struct": int(n_struct)}
