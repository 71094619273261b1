"""Helpers of the stage-06 tests (generation, teacher forcing, evaluation, prediction).

Models are transformers' own LlamaForCausalLM, either *randomly initialised* (what is tested is the
machinery, not what a model learned) or with hand-written weights whose outputs are known:

- `bigram_llama`: the next token depends only on the current one (a table);
- `fixed_logits_llama`: the same logits whatever the input (a hand-written logit per token);
- `constant_checkpoint`: the same logits whatever the input (one structure code `logit`, the rest 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokenfold.vocab import AA_LETTERS, EOS, Vocab

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 64  # stage-04 crop: most small-DB chains are longer, so cropped examples are the rule here
SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}


# ----------------------------------------------------------------------------- models
def tiny_llama(vocab: Vocab, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab.size, hidden_size=kw.get("hidden", 64), intermediate_size=128,
                      num_hidden_layers=kw.get("layers", 2), num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _identity_layers(m) -> None:
    """Zero every layer's output projections: the residual stream stays the token embedding."""
    for layer in m.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def bigram_llama(vocab: Vocab, next_of: dict[int, int], default: int):
    """A Llama whose next token depends only on the current one (layers zeroed to identity, one-hot
    embeddings, lm_head = the table): a model with a known, hand-written behaviour."""
    m = tiny_llama(vocab, hidden=max(64, vocab.size + 1), layers=1)
    with torch.no_grad():
        _identity_layers(m)
        E = m.model.embed_tokens.weight
        E.zero_()
        E[torch.arange(vocab.size), torch.arange(vocab.size)] = 1.0
        W = m.lm_head.weight
        W.zero_()
        for cur in range(vocab.size):
            W[next_of.get(cur, default), cur] = 10.0
    return m


def random_seqs(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(AA_LETTERS[:20]), size=int(L))) for L in rng.integers(lo, hi, size=n)]


def _stage05_model(vocab: Vocab):
    from tokenfold.model import build_config, build_model

    return build_model(build_config("tiny", vocab, SMALL), seed=0)


def _save(model, vocab: Vocab, out: Path) -> Path:
    model.save_pretrained(out)
    vocab.save(out / "vocab.json")
    return out


def random_checkpoint(vocab: Vocab, out: Path) -> Path:
    """A RANDOMLY INITIALISED tiny checkpoint (stage 05 format): exercises the machinery, not learning."""
    return _save(_stage05_model(vocab), vocab, out)


def constant_checkpoint(vocab: Vocab, out: Path, code: int, logit: float) -> Path:
    """A tiny checkpoint (stage 05 format) whose logits are `logit` for structure code `code` and 0 for
    every other token, whatever it reads: every embedding is all ones (RMS 1, so the final norm keeps
    it, up to its eps), the layers add nothing, and the one non-zero lm_head row sums it to `logit`."""
    m = _stage05_model(vocab)
    with torch.no_grad():
        _identity_layers(m)
        m.model.embed_tokens.weight.fill_(1.0)
        W = m.lm_head.weight
        W.zero_()
        W[vocab.struct_offset + code] = logit / W.shape[1]
    return _save(m, vocab, out)


def fixed_logits_llama(vocab: Vocab, logits: dict[int, float]):
    """A Llama whose logits are the same whatever it reads: `logits[token id]` for the ids given, 0 for
    the others (embeddings all ones, layers adding nothing, one lm_head row per given token)."""
    m = tiny_llama(vocab, layers=1)
    with torch.no_grad():
        _identity_layers(m)
        m.model.embed_tokens.weight.fill_(1.0)
        W = m.lm_head.weight
        W.zero_()
        for tok, x in logits.items():
            W[tok] = x / W.shape[1]
    return m


# ----------------------------------------------------------------------------- stages 04 and 06
def tokenize(db, out, kind, **kw) -> Path:
    from tokenfold.tokenize import TokenizeConfig, run

    run(TokenizeConfig(db=str(db), kind=kind, out=str(out), max_length=MAX_LEN, **kw))
    return Path(out)


def evaluate_cli(*args) -> int:
    """06_evaluate.py's main() in this process (the CLI itself: argparse, defaults, exit codes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "06_evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in args])


def tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]
