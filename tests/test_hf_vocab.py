"""Our tokens inside a pretrained LLM's vocabulary (tokenfold/hf_vocab.py), on tiny RANDOM Llama- and
Qwen-style models with BPE tokenizers saved in the files a download has (tokenfold/random_llm.py)."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenfold import hf_vocab
from tokenfold.vocab import AA_LETTERS, Vocab

torch.set_num_threads(1)
SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAIGHKGKKYHPAVWNDGSPLIQILNEP"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_added_token_is_one_token_and_ids_follow_the_llm(random_llm, arch):
    tok = hf_vocab.load_tokenizer(random_llm(arch))
    base = len(tok)
    seq = SEQ.replace("U", "X")
    assert len(tok(seq, add_special_tokens=False).input_ids) < len(seq)   # BPE merges plain letters: the failure
    v = hf_vocab.extend_tokenizer(tok, Vocab.for_kind("3di"), "test")
    assert v.id_offset == base and len(tok) == v.size == base + 8 + len(AA_LETTERS) + 20
    assert (v.bos, v.eos, v.struct_offset) == (base + 1, base + 3, base + 8 + len(AA_LETTERS))
    # written as added tokens, a protein is one token per residue, and the text gives our ids exactly
    text = "".join(f"<aa_{a}>" for a in seq)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == list(v.aa_ids(seq)) and len(ids) == len(seq)
    codes = np.arange(len(seq)) % 20
    example = v.encode(seq, codes)
    names = hf_vocab.token_names(Vocab.for_kind("3di"))
    assert tok("".join(names[i - base] for i in example), add_special_tokens=False).input_ids == list(example)
    assert tok.decode(example) == "".join(names[i - base] for i in example)
    assert v.decode(example)[0] == seq and (v.decode(example)[1] == codes).all()
    assert v.loss_mask(example).sum() == len(seq) + 1   # structure tokens + <eos>, never an amino acid
    # structure tokens are one contiguous slice (generation constraints), also for 512 codes
    t2 = hf_vocab.load_tokenizer(random_llm(arch))
    g = hf_vocab.extend_tokenizer(t2, Vocab.for_kind("geo", n_struct=512, interleaved=True), "test")
    assert t2.convert_tokens_to_ids(["<geo_0>", "<geo_511>"]) == [g.struct_offset, g.size - 1]


def test_vocab_json_keeps_the_offset_and_clashes_are_refused(random_llm, tmp_path):
    tok = hf_vocab.load_tokenizer(random_llm("llama"))
    v = hf_vocab.extend_tokenizer(tok, Vocab.for_kind("esm", n_struct=16), "test")
    v.save(tmp_path / "vocab.json")
    w = Vocab.load(tmp_path)
    assert (w.id_offset, w.size, w.eos, w.meta["llm"]["base_vocab_size"]) == (v.id_offset, v.size, v.eos, v.id_offset)
    assert Vocab.load(tmp_path).prompt("MK").tolist() == v.prompt("MK").tolist()
    with pytest.raises(ValueError, match="already has"):
        hf_vocab.extend_tokenizer(tok, Vocab.for_kind("esm", n_struct=16), "test")   # added twice


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_new_rows_start_at_the_mean_embedding(random_llm, arch):
    path = random_llm(arch)
    tok = hf_vocab.load_tokenizer(path)
    v = hf_vocab.extend_tokenizer(tok, Vocab.for_kind("3di"), "test")
    model = AutoModelForCausalLM.from_pretrained(path)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    rows = model.get_input_embeddings().weight.shape[0]
    hf_vocab.fit_embeddings(model, v)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == max(rows, v.size)   # Qwen has spare rows: not shrunk, not grown
    assert (emb.shape[0] > rows) == (arch == "llama")
    for w, key in ((emb, "model.embed_tokens.weight"), (head, "lm_head.weight")):
        old = before.get(key, before["model.embed_tokens.weight"])
        assert torch.equal(w[:v.id_offset], old[:v.id_offset])                    # the LLM's rows untouched
        assert torch.allclose(w[v.id_offset:v.size], old[:v.id_offset].mean(0).expand(v.size - v.id_offset, -1))
    assert (head.data_ptr() == emb.data_ptr()) == (arch == "qwen2")            # tied stays tied
    assert model.generation_config.eos_token_id == v.eos and model.generation_config.pad_token_id == v.pad


def test_token_shards_are_read_in_the_llm_ids(random_llm, tmp_path):
    from conftest import foldseek_chains, write_threedi_tokens

    tokdir = write_threedi_tokens(tmp_path / "tok", {"train": foldseek_chains(20, 40)[:3]})
    v = hf_vocab.extend_tokenizer(hf_vocab.load_tokenizer(random_llm("llama")), Vocab.load(tokdir), "test")
    plain, mapped = hf_vocab.token_dataset(tokdir, "train", Vocab.load(tokdir)), hf_vocab.token_dataset(tokdir, "train", v)
    assert len(mapped) == 3 and (mapped.lengths == plain.lengths).all() and list(mapped.ids) == list(plain.ids)
    assert (mapped[1] == plain[1].astype(np.int64) + v.id_offset).all() and mapped[1][0] == v.bos


def test_struct2seq_inside_an_llm_adds_the_aa_marker_and_generates_amino_acids(random_llm):
    """An extended struct2seq vocabulary (stage 05 --init-from on struct2seq tokens): <tf_aa> is added
    after the structure tokens, the example is one token per added token, the loss is on the amino
    acids and <eos>, and constrained generation / teacher forcing work in the LLM's ids."""
    from tokenfold.generate import generate
    from tokenfold.teacher_forcing import teacher_forced

    path = random_llm("llama")
    tok = hf_vocab.load_tokenizer(path)
    base = len(tok)
    minimal = Vocab.for_kind("3di", direction="struct2seq")
    v = hf_vocab.extend_tokenizer(tok, minimal, "test")
    assert v.inverse and v.id_offset == base and len(tok) == v.size == base + minimal.size
    assert tok.convert_tokens_to_ids("<tf_aa>") == v.aa_marker_id == v.size - 1
    seq = "MKTAYIAKQR"
    codes = np.arange(len(seq)) % 20
    example = v.encode(seq, codes)
    assert (example == minimal.encode(seq, codes) + base).all()
    names = hf_vocab.token_names(minimal)
    assert tok("".join(names[i - base] for i in example), add_special_tokens=False).input_ids == list(example)
    assert v.loss_mask(example).sum() == len(seq) + 1 and v.is_target(example[v.loss_mask(example)][:-1]).all()
    model = AutoModelForCausalLM.from_pretrained(path)
    hf_vocab.fit_embeddings(model, v)
    g = generate(model, v, [codes])[0]
    assert len(g.codes) == len(seq) and (g.codes >= 0).all() and (g.codes < 20).all()
    tf = teacher_forced(model, v, [example])[0]
    assert tf.n_targets == len(seq) + 1 and len(tf.pred_codes) == len(seq) and np.isfinite(tf.nll)
