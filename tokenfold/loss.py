"""The training objective of stage 05 and what validation measures with it.

Loss: cross-entropy over the loss targets of `tokenfold.vocab.Vocab.labels` (the generated part: the
structure tokens and <eos>, never an amino acid; for a struct2seq vocabulary the amino acids and
<eos>). The training loop divides the summed loss by the number of targets of the *global* batch
(all ranks, all accumulation steps), so one process and N processes with the same global batch compute the same update (tests/test_distributed.py).

Accuracy: teacher-forced accuracy of the generated part, the argmax of the next-token distribution given
the true prefix, counted on the targets other than <eos> (structure tokens; struct2seq: amino acids).

`LossModel` is what training and validation call: the causal LM's decoder gives hidden states, and
the LM head is applied only at the positions whose target is a loss target, in chunks of
`chunk` rows (`chunked_stats`). With a 128k-token LLM vocabulary the full ``[tokens, vocabulary]``
logits of a 16k-token micro-batch would take 8 GB in fp32; chunked, at most one chunk's logits
exist at a time, and backward recomputes each chunk (`torch.utils.checkpoint`). The result equals
`token_stats` over full logits to floating-point tolerance (tests/test_loss.py). The head is applied
as the model's output module (so LoRA/trainable-token wrappers and FSDP see it used); models that
post-process logits (``final_logit_softcapping``, ``logit_scale``) are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .distributed import Dist
from .vocab import IGNORE_INDEX, Vocab

LOGIT_CHUNK_BYTES = 1 << 30   # default chunk: fp32 logits of one chunk under 1 GiB


def _stats(logits: torch.Tensor, tgt: torch.Tensor, eos: int):
    """(summed cross-entropy, correct target tokens) of logits [N, V] against targets [N]; `eos` is the
    vocabulary's <eos> id (a loss target not counted in the accuracy)."""
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, tgt, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        correct = ((logits.argmax(-1) == tgt) & (tgt != IGNORE_INDEX) & (tgt != eos)).sum()
    return loss_sum, correct


def token_stats(logits: torch.Tensor, labels: torch.Tensor, eos: int):
    """(summed cross-entropy over the loss targets, number of correctly predicted target tokens: every
    loss target but <eos> (id `eos`), i.e. the structure tokens, or the amino acids of a struct2seq
    vocabulary).

    `labels` are unshifted (HF convention): position t's logits predict labels[t + 1]."""
    logits = logits[:, :-1, :]
    tgt = labels[:, 1:].to(logits.device)
    return _stats(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), eos)


def default_chunk(vocab_rows: int) -> int:
    """Rows per chunk that keep one chunk's fp32 logits under LOGIT_CHUNK_BYTES."""
    return max(1, LOGIT_CHUNK_BYTES // (4 * int(vocab_rows)))


def _head_stats(h: torch.Tensor, tgt: torch.Tensor, head, eos: int):
    return _stats(head(h), tgt, eos)


def chunked_stats(hidden: torch.Tensor, head, labels: torch.Tensor, eos: int, chunk: int):
    """`token_stats` from the final hidden states [B, T, d] and the LM head module, computing logits only
    at loss targets, `chunk` rows at a time. Several chunks are each recomputed in backward, so only
    one chunk's logits are alive at any time."""
    tgt = labels[:, 1:].to(hidden.device)
    keep = tgt != IGNORE_INDEX
    h, tgt = hidden[:, :-1][keep], tgt[keep]
    n = h.shape[0]
    if n <= chunk:
        return _head_stats(h, tgt, head, eos)
    loss_sum = h.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=h.device)
    for a in range(0, n, chunk):
        if torch.is_grad_enabled():
            l, c = checkpoint(_head_stats, h[a:a + chunk], tgt[a:a + chunk], head, eos, use_reentrant=False)
        else:
            l, c = _head_stats(h[a:a + chunk], tgt[a:a + chunk], head, eos)
        loss_sum, correct = loss_sum + l, correct + c
    return loss_sum, correct


class LossModel(torch.nn.Module):
    """A causal LM (plain transformers model or a peft model) whose forward returns
    (summed loss, correct target tokens) of a batch: what DDP / FSDP wrap and the step calls."""

    def __init__(self, lm, chunk: int | None = None):
        super().__init__()
        self.lm = lm
        base = self.causal_lm
        self.chunk = chunk or default_chunk(base.config.vocab_size)
        for key in ("final_logit_softcapping", "logit_scale"):
            if getattr(base.config, key, None):
                raise ValueError(f"{type(base).__name__} post-processes its logits ({key}); the chunked loss of "
                                 "tokenfold/loss.py applies the LM head alone and does not support it")

    @property
    def causal_lm(self):
        """The transformers model (inside a peft wrapper when there is one)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, input_ids, labels, eos: int, position_ids=None, attention_mask=None):
        base = self.causal_lm
        hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
        return chunked_stats(hidden, base.get_output_embeddings(), labels, eos, self.chunk)


@torch.no_grad()
def evaluate(loss_model, batches, vocab: Vocab, dist: Dist, autocast, lockstep: bool = False) -> dict:
    """Validation loss (per loss target) and teacher-forced target-token accuracy, over all ranks.
    `lockstep` (FSDP: every forward is collective): every rank runs as many forwards as the rank with
    the most batches; the extra ones read one token without targets and count nothing."""
    was_training = loss_model.training
    loss_model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)  # loss, n_loss, correct, n_struct
    n = len(batches)
    if lockstep and dist.enabled:
        most = torch.tensor([n], device=dist.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        n = int(most.item())
    for i in range(n):
        b = batches[i] if i < len(batches) else None
        ids = b.model_inputs(dist.device) if b is not None else {
            "input_ids": torch.full((1, 1), vocab.bos, dtype=torch.long, device=dist.device)}
        labels = b.labels if b is not None else torch.full((1, 1), IGNORE_INDEX, dtype=torch.long)
        with autocast():
            loss_sum, correct = loss_model(**ids, labels=labels, eos=vocab.eos)
        if b is not None:
            sums += torch.tensor([loss_sum.item(), b.n_loss, correct.item(), b.n_struct], dtype=torch.float64,
                                 device=dist.device)
    dist.all_reduce_sum(sums)
    loss_model.train(was_training)
    loss, n_loss, correct, n_struct = sums.tolist()
    return {"loss": loss / max(n_loss, 1), "acc": correct / max(n_struct, 1), "n_struct": int(n_struct)}
