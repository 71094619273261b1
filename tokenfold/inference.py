"""Running a trained translator: the decoding settings, the model and decoder loaders, C-alpha PDB files.

What stage 06 (`tokenfold.evaluate`) and prediction (`tokenfold.predict`) share:

- `Decoding`: the decoding, device and thread settings; both command lines derive their flags from
  its fields (`tokenfold.cli.add_options`);
- `load_model`: a checkpoint (or run directory) on the chosen device and dtype (`tokenfold.device`,
  through stage 05's `checkpoint.load_for_inference`), with `set_cpu_threads` applied;
- `load_decoder`: structure codes -> C-alpha traces for the decodable kinds (``geo``, ``kanzi``);
- `write_ca_pdb`: a C-alpha-only PDB file, and `safe_name` for the file name of a protein id.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import atomic_path
from .cli import option
from .vocab import Vocab

log = logging.getLogger("tokenfold.inference")

DECODABLE = ("geo", "kanzi")
_GROUP = "decoding (constrained: one structure token per residue; greedy by default)"


@dataclass
class Decoding:
    """How to decode: greedy or sampled, batch shapes, device, dtype, threads (one flag per field)."""

    sample: bool = option(False, "sample instead of greedy decoding", group=_GROUP)
    temperature: float = option(1.0, "sampling temperature", group=_GROUP)
    top_k: int = option(0, "sample among the k most likely tokens (0: off)", group=_GROUP)
    top_p: float = option(1.0, "nucleus sampling mass (1.0: off)", group=_GROUP)
    batch_size: int | None = option(None, "proteins per generation batch (default 64 on a GPU, 16 on a CPU)",
                                    group=_GROUP)
    max_batch_tokens: int = option(65536, "bound on proteins x longest length per batch, for GPU memory",
                                   group=_GROUP)
    device: str = option("auto", "cuda, cuda:1, cpu, or auto (cuda when available)", group=_GROUP)
    dtype: str = option("auto", "model dtype (auto: bfloat16 on GPU, float32 on CPU)",
                        choices=("auto", "float32", "bfloat16", "float16"), group=_GROUP)
    kanzi_checkpoint: str | None = option(None, "Kanzi weights, to decode kanzi tokens", group=_GROUP)
    seed: int = option(0, "seed for sampling (and stage 06's baselines' train sample)", group=_GROUP)
    threads: int | None = option(None, "torch CPU threads (default: 1 for models under 20M parameters, where more "
                                       "threads only slow decoding down, else torch's choice)", group=_GROUP)

    def sampling(self, seed: int | None = None):
        """The `tokenfold.generate.Sampling` of these settings (seeded with `seed` when given)."""
        from .generate import Sampling

        return Sampling(do_sample=self.sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        seed=self.seed if seed is None else seed)


# ----------------------------------------------------------------------------- the model
SMALL_MODEL_PARAMS = 20_000_000


def set_cpu_threads(model, requested: int | None = None) -> int:
    """Torch CPU threads for decoding with `model`: `requested` if given; otherwise 1 for models under
    20M parameters (a decoding step of such a model is many tiny ops, and OpenMP threads mostly add
    synchronisation: tiny preset, 32 proteins, 2-core box shared with other jobs: 4.1 s on 1 thread,
    92.7 s on 2), else torch's default (the 75M `small` preset: 35.1 s on 1 thread, 25.4 s on 2).
    No effect on GPU models. Returns the thread count in use."""
    import torch

    if requested:
        torch.set_num_threads(int(requested))
    elif next(model.parameters()).device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        if torch.get_num_threads() != 1:
            log.info("decoding a model of < %dM parameters on CPU: 1 torch thread (--threads to change)",
                     SMALL_MODEL_PARAMS // 1_000_000)
        torch.set_num_threads(1)
    return torch.get_num_threads()


def load_model(checkpoint: str | os.PathLike, decoding: Decoding):
    """(model in eval mode, vocab, checkpoint dir) of a checkpoint or run directory, on `decoding`'s
    device and dtype, with its CPU threads set."""
    from .checkpoint import load_for_inference, resolve

    ckpt = resolve(checkpoint)
    model, vocab = load_for_inference(ckpt, device=decoding.device, dtype=decoding.dtype)
    set_cpu_threads(model, decoding.threads)
    return model, vocab, ckpt


# ----------------------------------------------------------------------------- decoders
def load_decoder(vocab: Vocab, search_dirs=(), kanzi_checkpoint: str | None = None):
    """An object with ``decode_many(list of codes) -> list of C-alpha [L,3]`` for decodable kinds, else None."""
    if vocab.kind == "geo":
        from .geotokens import GeoCodebook

        errors = []
        for d in list(search_dirs) + [None]:
            try:
                return GeoCodebook.from_vocab(vocab, d)
            except FileNotFoundError as e:
                errors.append(str(e))
        raise FileNotFoundError(f"geo codebook of this vocabulary not found: {errors[-1]}")
    if vocab.kind == "kanzi":
        from .kanzi import load_decoder as kanzi_decoder

        return kanzi_decoder(vocab, kanzi_checkpoint)
    return None


# ----------------------------------------------------------------------------- PDB output
ONE_TO_THREE = dict(zip("ACDEFGHIKLMNPQRSTVWY", (
    "ALA CYS ASP GLU PHE GLY HIS ILE LYS LEU MET ASN PRO GLN ARG SER THR VAL TRP TYR").split()))


def write_ca_pdb(path: str | os.PathLike, chains: dict[str, tuple[str, np.ndarray]], remark: str | None = None) -> Path:
    """A C-alpha-only PDB file (gemmi): one chain per entry ``name -> (amino acids, coordinates [L,3])``;
    residues numbered 1..L, non-finite coordinates left out; `remark` as REMARK 999 lines at the top."""
    import gemmi
    import textwrap

    st = gemmi.Structure()
    st.name = Path(path).stem
    st.raw_remarks = [f"REMARK 999 {line}" for line in textwrap.wrap(remark or "", 68)]
    model = gemmi.Model("1")
    for name, (aa, xyz) in chains.items():
        ch = gemmi.Chain(name)
        for i, (a, p) in enumerate(zip(aa, np.asarray(xyz, np.float64))):
            if not np.isfinite(p).all():
                continue
            res = gemmi.Residue()
            res.name = ONE_TO_THREE.get(a, "UNK")
            res.seqid = gemmi.SeqId(i + 1, " ")
            res.entity_type = gemmi.EntityType.Polymer
            atom = gemmi.Atom()
            atom.name = "CA"
            atom.element = gemmi.Element("C")
            atom.pos = gemmi.Position(*p)
            atom.occ = 1.0
            res.add_atom(atom)
            ch.add_residue(res)
        model.add_chain(ch)
    st.add_model(model)
    path = Path(path)
    with atomic_path(path, suffix=".pdb") as tmp:
        st.write_pdb(str(tmp))
    return path


def safe_name(name) -> str:
    """A protein id as a file name: anything but letters, digits, '-', '_', '.' becomes '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))
