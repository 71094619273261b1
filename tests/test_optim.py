"""Stage 05 optimisation: the warmup + cosine schedule, no weight decay on norms and biases, and the
training precision (never fp16 autocast, which would need a gradient scaler)."""
import math

import pytest
import torch

from tokenfold.model import build_config, build_model
from tokenfold.optim import lr_lambda, make_optimizer, train_dtype
from tokenfold.train_config import TrainConfig
from tokenfold.vocab import Vocab


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    f = lr_lambda(total_steps=100, warmup=10, min_ratio=0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert f(1000) == pytest.approx(0.1)                                   # stays at the floor
    after = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert f(30) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 20 / 90)))


def test_no_weight_decay_on_norms_and_biases():
    model = build_model(build_config("tiny", Vocab.for_kind("3di"), {"num_hidden_layers": 1, "hidden_size": 64,
                                                                      "intermediate_size": 128}), seed=0)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.05, lr=1e-3, beta1=0.8, beta2=0.9), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert norms and norms == {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["lr"] == 1e-3 and decay["betas"] == (0.8, 0.9)


def test_training_precision_is_never_fp16(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert train_dtype("auto", cpu) == torch.float32 and train_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert train_dtype("auto", gpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a V100 or T4
    assert train_dtype("auto", gpu) == torch.float32                              # pick_dtype says fp16
    with pytest.raises(ValueError, match="fp16 training is not supported"):
        train_dtype("fp16", gpu)
