"""Stage 05 checkpoints: the contract with stage 06 (AutoModelForCausalLM.from_pretrained + vocab.json),
the weights_only trainer state, final/ as a copy of the last step."""
import numpy as np
import torch

from conftest import foldseek_chains
from tokenfold import checkpoint as ckpt
from tokenfold.model import build_config, build_model
from tokenfold.vocab import Vocab

torch.set_num_threads(1)


def test_checkpoint_loads_with_auto_model_and_for_inference(tmp_path):
    from transformers import AutoModelForCausalLM

    v = Vocab.for_kind("3di")
    model = build_model(build_config("tiny", v, {"num_hidden_layers": 1, "hidden_size": 64,
                                                  "intermediate_size": 128}), "sdpa", seed=1)
    run = tmp_path / "run"
    d = ckpt.save(ckpt.step_dir(run, 7), model, v, {"step": 7, "note": "x", "t": torch.arange(3)}, {"step": 7})
    ckpt.publish(d, run / "final")
    (_, aa, ss), = foldseek_chains(20, 60)[:1]
    x = torch.from_numpy(v.encode(aa, v.threedi_codes(ss)))[None]
    with torch.no_grad():
        ref = model.eval()(input_ids=x).logits
        auto = AutoModelForCausalLM.from_pretrained(run / "final").eval()
        torch.testing.assert_close(auto(input_ids=x).logits, ref)
        m2, v2 = ckpt.load_for_inference(run, device="cpu")   # a run directory resolves to final/
        torch.testing.assert_close(m2(input_ids=x).logits, ref)
    assert v2.to_dict() == v.to_dict() and not m2.training
    state = ckpt.load_trainer_state(d)                         # weights_only=True
    assert state["step"] == 7 and torch.equal(state["t"], torch.arange(3))
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [7]
    np.testing.assert_equal(sorted(p.name for p in (run / "final").iterdir()),
                            sorted(p.name for p in d.iterdir()))
