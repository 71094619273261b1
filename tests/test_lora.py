"""Stage 05 from a pretrained LLM (--init-from) with LoRA (tokenfold/lora.py), on tiny RANDOM Llama- and
Qwen-style models (tokenfold/random_llm.py): the run learns, only the adapters and our tokens' rows
change, resume is exact, the merged export is a plain transformers model that HF generate, stage 06
and predict read."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import foldseek_chains, metric_records, write_threedi_tokens
from tokenfold import checkpoint as ckpt
from tokenfold import hf_vocab
from tokenfold.export import main as export_main
from tokenfold.stop import EXIT_OK, EXIT_REQUEUE
from tokenfold.train import train
from tokenfold.train_config import TrainConfig
from tokenfold.vocab import Vocab

torch.set_num_threads(1)


def _cfg(tok, out, llm, **kw):
    base = dict(tokens=str(tok), out=str(out), init_from=str(llm), lora_rank=8, lora_dropout=0.05, max_steps=16,
                lr=1e-2, warmup_steps=2, weight_decay=0.0, max_tokens=1200, eval_every=8, save_every=0,
                log_every=1, threads=1, eval_max_examples=None, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def lora_run(random_llm, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    chains = foldseek_chains(30, 70)[:8]
    tok = write_threedi_tokens(root / "tok", {"train": chains, "val": chains[:4]})
    res = train(_cfg(tok, root / "ref", random_llm("llama")))
    assert res.exit_code == EXIT_OK
    return root, tok, random_llm("llama")


def test_lora_learns_and_changes_only_adapters_and_new_rows(lora_run):
    root, tok, llm = lora_run
    loss = [r["loss"] for r in metric_records(root / "ref")]
    val = [r["loss"] for r in metric_records(root / "ref", "val")]
    assert np.mean(loss[-4:]) < 0.6 * np.mean(loss[:4]) and val[-1] < 0.6 * val[0], (loss, val)
    step = ckpt.latest_checkpoint(root / "ref")
    assert (step / "adapter_model.safetensors").exists() and not (step / "model.safetensors").exists()
    assert (step / "tokenizer.json").exists() and ckpt.weights_kind(step) == "adapter"
    # the merged final/ against the starting model (the LLM with our tokens at the mean embedding)
    v = Vocab.load(root / "ref" / "final")
    start = AutoModelForCausalLM.from_pretrained(llm)
    hf_vocab.fit_embeddings(start, v)
    before, after = start.state_dict(), load_file(root / "ref" / "final" / "model.safetensors")
    assert set(after) == set(before)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for k, w in after.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(w[:v.id_offset], before[k][:v.id_offset]), k            # the LLM's own rows: bit-identical
            assert (w[v.id_offset:v.size] != before[k][v.id_offset:v.size]).any(1).float().mean() > 0.5, k
        elif any(t in k for t in targets):
            assert not torch.equal(w, before[k]), k                                     # W + (alpha/r) B A
        else:
            assert torch.equal(w, before[k]), k                                         # norms: frozen
    # the snippet hf_vocab.py documents (plain transformers on a checkpoint) runs as written
    doc = hf_vocab.__doc__
    snippet = "\n".join(line[4:] for line in doc[doc.index("    from transformers"):].splitlines() if line.strip())
    ns = {"ckpt": str(root / "ref" / "final")}
    exec(snippet.replace("print(", "text = ("), ns)
    assert ns["ids"].tolist()[0] == list(v.prompt(ns["seq"])) and ns["text"].startswith("<")


def test_lora_resume_is_exact_and_the_export_cli_gives_final(lora_run, tmp_path):
    root, tok, llm = lora_run
    run = tmp_path / "run"
    assert train(_cfg(tok, run, llm, stop_after_steps=5)).exit_code == EXIT_REQUEUE   # saves step 5
    res = train(_cfg(tok, run, llm))           # the LoRA dropout's RNG state resumes too
    assert res.exit_code == EXIT_OK and res.step == 16
    np.testing.assert_allclose([r["loss"] for r in metric_records(run)],
                               [r["loss"] for r in metric_records(root / "ref")], rtol=1e-6, atol=0)
    a, b = load_file(root / "ref" / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    # the export CLI on the last step checkpoint writes what final/ holds
    assert export_main(["--checkpoint", str(ckpt.latest_checkpoint(run)), "--out", str(tmp_path / "exp")]) == 0
    e = load_file(tmp_path / "exp" / "model.safetensors")
    assert all(torch.equal(e[k], b[k]) for k in b)
    assert json.loads((tmp_path / "exp" / "checkpoint.json").read_text())["exported_from"]["weights"] == "adapter"
    with pytest.raises(ValueError, match="tokenfold.export"):     # stage 06 is pointed at the export
        ckpt.load_for_inference(ckpt.latest_checkpoint(run), device="cpu")


def test_qwen_interleaved_final_runs_in_hf_generate_stage06_and_predict(random_llm, small_db, tmp_path):
    """Qwen-style (tied head, spare rows), interleaved layout, through the real stage 04, LoRA + export,
    then plain transformers (the documented snippet), stage 06 and predict on final/."""
    from stage06 import evaluate_cli, tokenize
    from tokenfold.generate import generate
    from tokenfold.predict import main as predict_main

    tok = tokenize(small_db, tmp_path / "tok", "3di", interleaved=True)
    res = train(_cfg(tok, tmp_path / "run", random_llm("qwen2"), max_steps=3, eval_every=0, save_every=0,
                     max_tokens=2048))
    assert res.exit_code == EXIT_OK
    final = res.final_dir
    v = Vocab.load(final)
    model, hf_tok = AutoModelForCausalLM.from_pretrained(final).eval(), AutoTokenizer.from_pretrained(final)
    assert model.config.tie_word_embeddings and v.interleaved and v.size == len(hf_tok)
    seq = "MKTAYIAKQR"
    ids = hf_tok("<tf_bos><tf_3di><aa_M>", add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0].tolist() == [v.bos, v.kind_id, v.aa_ids("M")[0]]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)        # plain HF generate on the checkpoint
    assert out.shape[1] > ids.shape[1] and all(t < len(hf_tok) for t in out[0].tolist())
    g = generate(model, v, [seq])[0]                                    # our constrained decoding
    assert len(g.codes) == len(seq) and (g.codes >= 0).all() and (g.codes < 20).all()
    assert evaluate_cli("--checkpoint", final, "--tokens", tok, "--db", small_db, "--out", tmp_path / "eval",
                        "--max-proteins", "3", "--n-pdb", "0", "--window-baseline", "no", "--no-unconstrained") == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n_proteins"] == 3 and 0 <= m["tokens_metrics"]["accuracy"] <= 1, m
    (tmp_path / "in.fasta").write_text(f">p1\n{seq}\n")
    assert predict_main(["--checkpoint", str(final), "--fasta", str(tmp_path / "in.fasta"),
                         "--out", str(tmp_path / "pred")]) == 0
    assert len((tmp_path / "pred" / "structure_tokens.fasta").read_text().split("\n")[1]) == len(seq)
