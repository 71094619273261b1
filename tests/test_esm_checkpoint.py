"""ESM-2 checkpoints: loading a local path or a fair-esm name, the fair-esm / torch >= 2.6 weights_only
pitfall, RANDOM test checkpoints refused unless asked for, and what a --model value means.

All with a tiny RANDOMLY INITIALISED ESM-2 written in fair-esm's own checkpoint format
(`write_random_checkpoint`): the real fair-esm loader code runs, real weights cannot be downloaded here.
"""
import pickle
import urllib.error
from pathlib import Path, PurePosixPath

import pytest
import torch

from tokenfold import esm_checkpoint as C

pytest_plugins = ["esm_fixtures"]   # tiny_ckpt


def test_plain_fair_esm_loader_hits_weights_only_trap_and_ours_loads(tiny_ckpt):
    import esm

    assert C.regression_path(tiny_ckpt).exists()
    # fair-esm 2.0.0's own local loader: torch >= 2.6 refuses the pickled argparse.Namespace config,
    # exactly as it refuses real ESM-2 checkpoints
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        esm.pretrained.load_model_and_alphabet_local(str(tiny_ckpt))
    model, alphabet, info = C.load_esm(tiny_ckpt, allow_random=True)
    assert isinstance(model, esm.ESM2) and not model.training
    assert (info["num_layers"], info["embed_dim"], info["attention_heads"]) == (2, 64, 4)
    assert info["random_weights"] is True and info["source"] == "local"
    # every weight came from the file (prefixes stripped as fair-esm does), contact head included
    raw = C._safe_torch_load(tiny_ckpt)["model"] | C._safe_torch_load(C.regression_path(tiny_ckpt))["model"]
    sd = model.state_dict()
    for k, v in raw.items():
        key = k.removeprefix("encoder.sentence_encoder.").removeprefix("encoder.")
        assert torch.equal(sd[key], v), key
    assert set(sd) == {k.removeprefix("encoder.sentence_encoder.").removeprefix("encoder.") for k in raw}
    # the config is pickled like the real ones: an argparse.Namespace under cfg["model"]
    assert type(C._safe_torch_load(tiny_ckpt)["cfg"]["model"]).__name__ == "Namespace"


def test_random_checkpoint_refused_unless_asked(tiny_ckpt, tmp_path):
    with pytest.raises(C.EsmLoadError, match="RANDOM"):
        C.load_esm(tiny_ckpt)
    # recognised by the marker inside the file too, whatever the file is called
    renamed = tmp_path / "esm2_t2_tiny.pt"
    renamed.write_bytes(tiny_ckpt.read_bytes())
    with pytest.raises(C.EsmLoadError, match="RANDOM"):
        C.load_esm(renamed)
    assert C.load_esm(renamed, allow_random=True)[2]["random_weights"]
    with pytest.raises(ValueError, match="RANDOM"):
        C.write_random_checkpoint(tmp_path / "esm2_t2_plain.pt")


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path):
    bad = tmp_path / "esm2_bad.pt"
    torch.save({"cfg": {"model": PurePosixPath("x")}, "model": {}}, bad)
    with pytest.raises(C.EsmLoadError, match="refusing to unpickle.*PurePosixPath"):
        C.load_esm(bad)


def test_load_by_name_uses_hub_cache_and_fails_in_one_line_without_network(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))   # torch.hub.set_dir, undone after
    calls = []

    def offline(url, dst, *a, **k):   # what this sandbox does; keeps the test hermetic where there is network
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(C.EsmLoadError) as ei:
        C.load_esm("esm2_t6_8M_UR50D")
    msg = str(ei.value)
    assert "\n" not in msg and "cannot download" in msg and "--model" in msg
    assert calls == ["https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt"]
    with pytest.raises(C.EsmLoadError, match="unknown model"):
        C.load_esm("esm3_nonsense")
    # a file already in torch hub's cache (where fair-esm downloads to) is used without network
    cached = tmp_path / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(tiny_ckpt.read_bytes())
    model, _, info = C.load_esm("esm2_t6_8M_UR50D", allow_random=True)
    assert info["source"] == "hub" and info["random_weights"] and len(calls) == 1



def test_model_spec_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # random checkpoints go to data/models of the working directory
    assert C.resolve_checkpoint(None) == C.DEFAULT_MODEL
    assert C.resolve_checkpoint("esm2_t6_8M_UR50D") == "esm2_t6_8M_UR50D"
    assert C.resolve_checkpoint("my_RANDOM.pt", random_weights=True) == "my_RANDOM.pt"   # a file: as given
    # random weights: a fair-esm name (default the small shape) means that shape's random checkpoint ...
    named = C.resolve_checkpoint(None, random_weights=True, seed=1, write=False)
    assert named == str(C.random_checkpoint_path(C.DEFAULT_RANDOM_SHAPE, 1)) and not Path(named).exists()
    # ... written when absent, and then a loadable RANDOM ESM-2 of that shape
    assert C.resolve_checkpoint(C.DEFAULT_RANDOM_SHAPE, random_weights=True, seed=1) == named
    info = C.load_esm(named, allow_random=True)[2]
    shape = C.ESM2_MODELS[C.DEFAULT_RANDOM_SHAPE]
    assert info["random_weights"] and (info["num_layers"], info["embed_dim"], info["attention_heads"]) == shape
