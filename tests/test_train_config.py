"""Stage 05 settings: which settings a resumed run must share with the checkpointed one."""
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
