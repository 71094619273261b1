"""Stage 05 settings: which settings a resumed run must share with the checkpointed one; the length
contract with stage 04 (--max-len, model positions) that stage 06 relies on."""
import json

import numpy as np

from tokenfold.artifacts import write_json_atomic
from tokenfold.train_config import TrainConfig, changed_settings, compat_fingerprint


def test_resume_compares_the_fingerprint_and_fills_options_added_since_with_defaults(tmp_path):
    cfg = TrainConfig(tokens="t", out=str(tmp_path), lr=1e-3)
    fp = compat_fingerprint(cfg, total_steps=50, layout_name="padded", world=2)
    assert fp["microbatches_per_step"] == 2 and fp["total_steps"] == 50 and "eval_every" not in fp
    assert changed_settings(tmp_path, fp) == []                               # no run_config.json yet
    write_json_atomic(tmp_path / "run_config.json", {"fingerprint": fp})
    assert changed_settings(tmp_path, fp) == []
    # settings a resume may change are not in the fingerprint
    later = TrainConfig(tokens="elsewhere", out="o", lr=1e-3, eval_every=1, save_every=2, device="cpu",
                        threads=1, stop_after_steps=3)
    assert changed_settings(tmp_path, compat_fingerprint(later, 50, "padded", 2)) == []
    # grad_accum may change, as long as the global batch (micro-batches per step) does not
    assert changed_settings(tmp_path, compat_fingerprint(TrainConfig(lr=1e-3, grad_accum=2), 50, "padded", 1)) == []
    assert changed_settings(tmp_path, compat_fingerprint(TrainConfig(lr=1e-3), 50, "padded", 1)) == \
        ["microbatches_per_step"]
    assert changed_settings(tmp_path, compat_fingerprint(TrainConfig(lr=2e-3, seed=1), 60, "packed", 2)) == \
        ["batch_layout", "lr", "seed", "total_steps"]
    # a run recorded before an option existed compares as that option's default
    old = dict(fp)
    del old["struct_input_noise"]
    write_json_atomic(tmp_path / "run_config.json", {"fingerprint": old})
    assert changed_settings(tmp_path, fp) == []
    assert changed_settings(tmp_path, compat_fingerprint(TrainConfig(lr=1e-3, struct_input_noise=0.5), 50, "padded",
                                                         2)) == ["struct_input_noise"]


# ----------------------------------------------------------------------------- the length contract (04 -> 05 -> 06)
def test_max_len_follows_stage_04_and_a_shorter_one_is_refused(small_db, tmp_path):
    import pytest

    from tokenfold.model import build_config
    from tokenfold.shards import TokenDataset
    from tokenfold.tokenize import TokenizeConfig, run
    from tokenfold.train_config import resolve_max_len
    from tokenfold.vocab import Vocab

    for interleaved, need in ((False, 204), (True, 203)):         # 100 residues: 2L+4 / 2L+3 tokens
        tok = tmp_path / f"tok{interleaved}"
        run(TokenizeConfig(db=str(small_db), kind="3di", out=str(tok), max_length=100, interleaved=interleaved))
        v = Vocab.load(tok)
        assert json.loads((tok / "manifest.json").read_text())["max_example_tokens"] == need
        longest = max(TokenDataset(tok, s).lengths.max() for s in ("train", "val", "test"))
        assert longest == need                                    # small_db has chains over 100 residues: cropped
        assert resolve_max_len(TrainConfig(tokens=str(tok)), v) == need
        assert resolve_max_len(TrainConfig(tokens=str(tok), max_len=300), v) == 300
        with pytest.raises(ValueError, match=r"--max-len 150 is shorter than examples .* --max-length 73") as e:
            resolve_max_len(TrainConfig(tokens=str(tok), max_len=150), v)
        assert "\n" not in str(e.value)
    # token shards without a manifest (made outside stage 04's finalize): their longest example
    (tok / "manifest.json").unlink()
    assert resolve_max_len(TrainConfig(tokens=str(tok)), v) == 203
    # the model's positions hold --max-len: raised when the preset has fewer, an explicit smaller value refused
    assert build_config("tiny", v, min_positions=2052).max_position_embeddings == 2052
    assert build_config("tiny", v, min_positions=100).max_position_embeddings == 2048
    big = build_config("tiny", v, {"max_position_embeddings": 4096}, min_positions=2052)
    assert big.max_position_embeddings == 4096
    with pytest.raises(ValueError, match="max_position_embeddings=1024 holds fewer than the 2052 tokens"):
        build_config("tiny", v, {"max_position_embeddings": 1024}, min_positions=2052)


def test_default_settings_hold_every_example_of_the_shared_set(shared_structures_db, tmp_path, capsys):
    """The issue's case: ~1,100 real chains, stage 04/05 defaults. Chains over 1,024 residues are cropped
    to 2,052-token examples; stage 05 trains and stage 06 evaluates them whole, none skipped or cut."""
    import re
    import shutil

    import pytest
    import torch

    from stage06 import evaluate_cli
    from tokenfold.artifacts import read_json, write_json_atomic
    from tokenfold.eval_config import EvalConfig
    from tokenfold.evaluate import Evaluation, evaluate_chunk, protein_rows
    from tokenfold.inference import Decoding
    from tokenfold.shards import TokenDataset
    from tokenfold.tokenize import TokenizeConfig, run
    from tokenfold.train import train

    tok = tmp_path / "tokens"
    run(TokenizeConfig(db=str(shared_structures_db), kind="3di", out=str(tok)))   # stage 04 defaults
    lengths = {s: TokenDataset(tok, s).lengths for s in ("train", "val", "test")}
    split = max(lengths, key=lambda s: lengths[s].max())
    assert lengths[split].max() == 2052                         # a cropped 1,024-residue chain (plain layout)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(TrainConfig(tokens=str(tok), out=str(tmp_path / "run"), max_steps=1, eval_every=0,
                                eval_max_examples=4, save_every=0, threads=1))   # stage 05 defaults otherwise
        assert res.exit_code == 0
        final = tmp_path / "run" / "final"
        assert read_json(final / "config.json")["max_position_embeddings"] == 2052
        assert read_json(tmp_path / "run" / "run_config.json")["fingerprint"]["max_len"] == 2052
        cfg = EvalConfig(checkpoint=str(final), out=str(tmp_path / "eval"), tokens=str(tok), db=str(shared_structures_db),
                         split=split, unconstrained=False, decoding=Decoding(device="cpu"))
        ev = Evaluation(cfg)                                     # nothing refused: every example fits
        i = int(np.argmax(ev.ds.lengths))
        k = int(np.searchsorted(ev.db.shard_starts, ev.ds.db_index[i], side="right") - 1)
        rows, skipped = protein_rows(ev.ds, ev.db.shards[k], np.array([i]), ev.vocab)
        part = evaluate_chunk(ev.model, ev.vocab, rows, skipped, cfg, None, None, chunk_seed=0)
        assert json.loads(str(part["skipped"])) == [] and len(part["pred_codes"]) == len(part["true_codes"]) == 1024
    finally:
        torch.set_num_threads(n)
    # the state before the contract: a model of 2,048 positions is refused in one line, not evaluated on a subset
    old = tmp_path / "old"
    shutil.copytree(final, old)
    write_json_atomic(old / "config.json", {**read_json(final / "config.json"), "max_position_embeddings": 2048})
    with pytest.raises(SystemExit) as e:
        evaluate_cli("--checkpoint", old, "--tokens", tok, "--db", shared_structures_db, "--split", split,
                     "--out", tmp_path / "eval_old")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and not (tmp_path / "eval_old").exists()
    assert re.fullmatch(r"error: \d+ of \d+ \w+ examples of .* longer than the model's 2048 positions .* "
                        r"--max-length 1022, or a model trained with stage 05's default --max-len", err[-1]), err
