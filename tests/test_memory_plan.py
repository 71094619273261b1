"""The memory plan printed before training (tokenfold/memory_plan.py): its arithmetic against a hand
computation, exact parameter counts (LoRA included), and the refusal of the 8B plans that cannot fit
on 80 GB GPUs, with the change that would fit."""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig

from tokenfold import hf_vocab, memory_plan
from tokenfold.model import build_config
from tokenfold.train_config import TrainConfig
from tokenfold.vocab import Vocab

torch.set_num_threads(1)
GiB = 1 << 30


def test_plan_arithmetic_by_hand():
    # d=64, f=128, 2 layers, 4 heads of 16, 2 KV heads (k = 32), V = 100 rows, untied head
    mc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    v = Vocab.for_kind("3di")
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64        # q, k+v, o, gate/up/down, 2 norms
    N = 2 * 100 * 64 + 2 * layer + 64                                       # embeddings, head, layers, final norm
    cfg = TrainConfig(fsdp=True, max_tokens=1000)
    shape = memory_plan.model_shape(mc, cfg, v)
    assert (shape.n_params, shape.n_trainable, shape.n_layer, shape.n_root) == (N, N, layer, N - 2 * layer) == \
        (86848, 86848, 36992, 12864)
    # FSDP over 4 ranks, bf16 (p = 2), no checkpointing, 1000 tokens
    t = memory_plan.estimate(shape, cfg, world=4, p=2)
    a = 2 * (6 * 64 + 2 * 32 + 4 * 128) + 16 * 64                            # activation bytes per token and layer
    assert t == {"weights": 4 * N / 4 + 2 * (12864 + 2 * layer), "gradients": 4 * N / 4, "optimizer": 8 * N / 4,
                 "activations": 1000 * 2 * a, "logits": 1000 * 100 * (8 + 2), "overhead": 2 * GiB}
    # DDP over 4 ranks, fp32, gradient checkpointing: full weights, gradients + DDP buckets, fp32 residual kept
    t = memory_plan.estimate(shape, dataclasses.replace(cfg, fsdp=False, grad_checkpointing=True), world=4, p=4)
    a32 = 4 * (6 * 64 + 2 * 32 + 4 * 128) + 16 * 64
    assert t == {"weights": 4 * N, "gradients": 8 * N, "optimizer": 8 * N, "activations": 1000 * (2 * 4 * 64 + a32),
                 "logits": 1000 * 100 * 12, "overhead": 2 * GiB}


def test_lora_counts_are_exact(random_llm):
    """LoRA r=4 on q/k/v/o/gate/up/down of the tiny Llama (d=64, k=32, f=128, 2 layers) + our 49 rows in
    the embedding and the untied head."""
    path = random_llm("llama")
    v = hf_vocab.extend_tokenizer(hf_vocab.load_tokenizer(path), Vocab.for_kind("3di"), str(path))
    cfg = TrainConfig(init_from=str(path), lora_rank=4, lora_dropout=0.0)
    from tokenfold.model_setup import model_config

    shape = memory_plan.model_shape(model_config(cfg, v, 100), cfg, v)
    r = 4
    per_layer = r * (64 + 64) * 2 + r * (64 + 32) * 2 + r * (64 + 128) * 3     # q,o | k,v | gate,up,down
    assert shape.n_trainable == 2 * per_layer + 2 * 49 * 64 == 14464
    assert shape.lora_modules == 7 and shape.lora_inputs == 6 * 64 + 128


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    """The published config.json of meta-llama/Llama-3.1-8B (no weights: the plan needs none)."""
    d = tmp_path_factory.mktemp("llama31_8b")
    build_config("llama3.1-8b", Vocab.for_kind("3di"), {"vocab_size": 128256}).save_pretrained(d)
    return d


def test_8b_plans_on_80gb_gpus(llama8b, capsys):
    """DDP of 8B with AdamW is refused (the issue's ~128 GB of weights, gradients and moments, plus
    activations) with the change that fits; the recipe (FSDP2 + LoRA r=64 + checkpointing) fits."""
    args = ["--tokens", "/nonexistent", "--init-from", str(llama8b), "--world-size", "8", "--gpu-memory-gb", "80",
            "--max-tokens", "16384"]
    with pytest.raises(SystemExit):
        memory_plan.main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: memory plan:") and err.endswith("use --fsdp --grad-checkpointing"), err
    cfg = TrainConfig(init_from=str(llama8b), fsdp=True, lora_rank=64, lora_alpha=128, grad_checkpointing=True,
                      max_tokens=16384, gpu_memory_gb=80)
    from tokenfold.model_setup import model_config

    v = dataclasses.replace(Vocab.for_kind("3di"), id_offset=128256)
    plan = memory_plan.check(cfg, model_config(cfg, v, 2052), v, 8, torch.bfloat16, 80 * GiB, 2052)
    assert plan.fits and plan.shape.n_params - plan.shape.n_trainable == 8_030_261_248 + 2 * 49 * 4096
    assert 160e6 < plan.shape.n_trainable < 170e6 and 10 * GiB < plan.total < 40 * GiB
    # without the 16 bytes/parameter of full training, the frozen bf16 weights are ~2 GiB per rank
    assert plan.terms["optimizer"] < 0.2 * GiB and plan.terms["weights"] < 6 * GiB
