"""Our tokens inside a pretrained LLM's vocabulary (stage 05 ``--init-from PATH``).

PATH is a Hugging Face model directory with its tokenizer files (Llama, Qwen, Mistral, ...), or a hub
name where the cluster has the HF cache or network. The LLM keeps its whole vocabulary; ours
(tokenfold/vocab.py) is added after it as added tokens, in our id order::

    <tf_pad> <tf_bos> <tf_sep> <tf_eos> <tf_3di> <tf_esm> <tf_geo> <tf_kanzi>   special tokens
    <aa_A> <aa_C> .. <aa_Y> <aa_X>                                             amino acids
    <3di_A> .. <3di_Y>   or   <geo_0> .. <geo_511>  (<kind>_<code>)             structure tokens
    <tf_aa>                                                                    struct2seq only

so our token of minimal id i has the LLM id ``id_offset + i`` (``id_offset`` = the tokenizer's length
before), and the extended vocabulary is the same `Vocab` with that offset: stages 05/06 and predict
use its ``bos``/``eos``/``struct_offset``/``size`` as before (structure tokens are contiguous, so the
generation constraint is still one slice of the logits). Each added token is exactly one token
whatever surrounds it: added tokens are split off before the BPE model runs. A protein written as
plain letters is not (BPE merges "MKV" into one token: the known failure). Names the LLM already has
are refused.

Embeddings are resized to hold the new ids (never shrunk: Qwen's matrices have spare rows past its
tokenizer) and every new row of the input embedding and of an untied output head starts as the mean
of the LLM's own rows (`fit_embeddings`). The generation config's eos/pad/bos become ours.

Stage-04 shards keep the minimal ids (uint16): `token_dataset` adds the offset as examples are read
(`MappedTokens`), in stage 05 and stage 06; nothing is re-tokenized. Every checkpoint stores the
extended tokenizer and vocab.json with its ``id_offset``; plain transformers then works on it::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt); model = AutoModelForCausalLM.from_pretrained(ckpt)
    seq = "MKTAYIAKQR"
    prompt = "<tf_bos>" + "".join(f"<aa_{a}>" for a in seq) + "<tf_sep><tf_3di>"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=len(seq) + 1, do_sample=False)  # stops at <tf_eos>
    print(tok.decode(out[0, ids.shape[1]:]))   # <3di_D><3di_V>...<tf_eos> (unconstrained: may stray)
"""
from __future__ import annotations

import logging
import os

import numpy as np

from .vocab import AA_LETTERS, Vocab

log = logging.getLogger("tokenfold.hf_vocab")

RANDOM_MARK = "tokenfold_random_weights"   # config.json key of the test models (tokenfold/random_llm.py)


def token_names(vocab: Vocab) -> list[str]:
    """The added-token text of each of our tokens, in minimal id order."""
    specials = [f"<tf_{s[1:-1]}>" for s in vocab.specials]
    aas = [f"<aa_{a}>" for a in AA_LETTERS]
    if vocab.kind == "3di":
        structs = [f"<3di_{s}>" for s in vocab.struct_symbols]
    else:
        structs = [f"<{vocab.kind}_{k}>" for k in range(vocab.n_struct)]
    return specials + aas + structs + (["<tf_aa>"] if vocab.inverse else [])   # struct2seq's <aa> marker


def load_tokenizer(source: str | os.PathLike):
    """The LLM's own tokenizer (a local directory, or a hub name from the HF cache / network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--init-from {source}: no tokenizer there ({str(e).splitlines()[0]}); pass a local "
                                "Hugging Face model directory with its tokenizer files, or a hub name the HF cache "
                                "holds") from None


def extend_tokenizer(tokenizer, vocab: Vocab, source: str) -> Vocab:
    """Add our tokens to `tokenizer` (in place) and return the extended `Vocab` (ids inside the LLM's)."""
    from tokenizers import AddedToken

    if vocab.id_offset:
        raise ValueError("the vocabulary is already an extended one")
    names = token_names(vocab)
    have = tokenizer.get_vocab()
    clash = [n for n in names if n in have]
    if clash:
        raise ValueError(f"{source}: its tokenizer already has token(s) {clash[:5]}: cannot add ours unambiguously")
    base = len(tokenizer)
    n_special = len(vocab.specials)
    tokenizer.add_tokens([AddedToken(n, special=True, normalized=False) for n in names[:n_special]],
                         special_tokens=True)
    tokenizer.add_tokens([AddedToken(n, special=False, normalized=False) for n in names[n_special:]])
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(base, base + len(names))):
        raise ValueError(f"{source}: the tokenizer gave our added tokens ids {ids[:3]}..., not {base}.. in order")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = names[0]
    meta = dict(vocab.meta, llm={"source": str(source), "base_vocab_size": base, "added_tokens": names})
    return Vocab(kind=vocab.kind, struct_symbols=vocab.struct_symbols, interleaved=vocab.interleaved, meta=meta,
                 direction=vocab.direction, id_offset=base)


def fit_embeddings(model, vocab: Vocab) -> None:
    """Resize `model`'s embeddings to hold `vocab` (never shrinking) and start every new token's input
    row and (untied) output row from the mean of the LLM's own rows; our ids in the generation config."""
    import torch

    base = vocab.id_offset
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < base:
        raise ValueError(f"the model has {rows} embedding rows, fewer than its tokenizer's {base} tokens")
    model.resize_token_embeddings(max(rows, vocab.size), mean_resizing=False)
    with torch.no_grad():
        mats = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not mats[0]:
            mats.append(head.weight)
        for w in mats:
            w[base:vocab.size] = w[:base].float().mean(0).to(w.dtype)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = vocab.bos, vocab.eos, vocab.pad
    model.config.pad_token_id = vocab.pad


def is_random_test_model(config) -> bool:
    return bool(getattr(config, RANDOM_MARK, False))


# ----------------------------------------------------------------------------- token shards
class MappedTokens:
    """A `tokenfold.shards.TokenDataset` read through an id offset: minimal ids -> ids in the LLM."""

    def __init__(self, ds, offset: int):
        self.ds, self.offset = ds, int(offset)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.ds[i], dtype=np.int64) + self.offset

    def __getattr__(self, name):   # root, split, lengths, ids, db_index, crop_start, n_res, n_tokens
        if name == "ds":             # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.ds, name)


def token_dataset(root: str | os.PathLike, split: str, vocab: Vocab):
    """The `split` examples of a stage-04 token directory in `vocab`'s ids (mapped when it is extended)."""
    from .shards import TokenDataset

    ds = TokenDataset(root, split)
    return MappedTokens(ds, vocab.id_offset) if vocab.id_offset else ds
