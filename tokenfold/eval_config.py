"""Stage 06's settings (`EvalConfig`, one flag of 06_evaluate.py per field; decoding: `Decoding`'s), the
fingerprint a resumed evaluation must match, and the checks of what may be evaluated together."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import layout
from .cli import option
from .inference import Decoding
from .vocab import Vocab


@dataclass
class EvalConfig:
    """What stage 06 evaluates and how; one flag of 06_evaluate.py per field (decoding: `Decoding`'s)."""

    checkpoint: str = option(help="checkpoint dir or run dir of stage 05 (default data/runs/<run>/final)")
    out: str = option(help="output dir (default data/eval/<run>)")
    tokens: str | None = option(None, "token shards dir (default data/tokens/<kind>[_interleaved][_struct2seq])")
    db: str | None = option(None, "protein DB with the true C-alpha (default: the DB the token manifest names, "
                                  f"else {layout.DB})")
    split: str = option("test", "split to evaluate", choices=("test", "val", "train"))
    max_proteins: int | None = option(None, "only the first N examples of the split (quick looks)")
    chunk_size: int = option(512, "proteins per work part (resume granularity)")
    unconstrained: bool = option(True, "the unconstrained generation pass (validity and length-match rates); "
                                       "--no-unconstrained skips it")
    baseline_max_residues: int = option(200_000, "train residues used to fit the baselines (seeded sample of "
                                                 "whole proteins)")
    window_baseline: str = option("auto", "fit the windowed logistic-regression baseline (auto: for 3Di only)",
                                  choices=("auto", "yes", "no"))
    n_pdb: int = option(100, "write pred-vs-true PDB files for this many proteins")
    consistency_checkpoint: str | None = option(None, "struct2seq only: a seq2struct checkpoint (or run dir) of the "
                                                      "same token kind; folds designed and native sequences back into "
                                                      "structure tokens (self-consistency: agreement with the input)")
    n_pictures: int = option(3, "proteins drawn in ca_traces_3d.png (best, median, worst TM-score)", cli=False)
    decoding: Decoding = field(default_factory=Decoding)

    def fingerprint(self, ckpt: Path) -> dict:
        """What the results depend on (not where or how fast they are computed)."""
        from .device import pick_device, pick_dtype

        d = self.decoding
        return {"checkpoint": str(ckpt.resolve()), "weights": _weights_key(ckpt)[1],
                "tokens": str(Path(self.tokens).resolve()) if self.tokens else None, "split": self.split,
                "sampling": asdict(d.sampling()), "unconstrained": self.unconstrained,
                "max_proteins": self.max_proteins, "chunk_size": self.chunk_size,
                "baseline_max_residues": self.baseline_max_residues, "seed": d.seed,
                "kanzi_checkpoint": d.kanzi_checkpoint, "consistency_checkpoint": _weights_key(self.consistency_checkpoint),
                "dtype": str(pick_dtype(d.dtype, pick_device(d.device))),  # auto: bf16 on GPU, fp32 on CPU
                "db": str(Path(self.db).resolve()) if self.db else None}


def _weights_key(ckpt) -> list | None:
    """[checkpoint dir, [[weight file, size, mtime], ...]]: identifies a checkpoint's weights (None: no checkpoint)."""
    if not ckpt:
        return None
    from .checkpoint import resolve

    ckpt = resolve(ckpt)
    weights = sorted(ckpt.glob("*.safetensors")) or sorted(ckpt.glob("*.bin"))
    return [str(ckpt.resolve()), [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weights]]


def check_same_vocab(a: Vocab, b: Vocab, where: str) -> None:
    if (a.kind, a.interleaved, a.struct_symbols, a.direction) != (b.kind, b.interleaved, b.struct_symbols, b.direction):
        raise ValueError(f"{where}: vocabulary ({b.kind}, {b.direction}, interleaved={b.interleaved}, {b.n_struct} "
                         f"tokens) differs from the checkpoint's ({a.kind}, {a.direction}, interleaved={a.interleaved}, "
                         f"{a.n_struct} tokens)")


def check_consistency_vocab(design: Vocab, fold: Vocab, where: str) -> None:
    """The self-consistency model must be a seq2struct model of the designing vocabulary's structure tokens."""
    if not design.inverse:
        raise ValueError("--consistency-checkpoint is for struct2seq checkpoints (designed sequences folded back)")
    if fold.inverse or (fold.kind, fold.struct_symbols) != (design.kind, design.struct_symbols):
        raise ValueError(f"{where}: a {fold.direction} model of {fold.kind} tokens ({fold.n_struct}); the self-"
                         f"consistency check needs a seq2struct model of the same {design.kind} tokens ({design.n_struct})")


def check_lengths(lengths: np.ndarray, n_positions: int | None, what: str, vocab: Vocab) -> None:
    """The length rule of stages 05 and 06: every example evaluated fits the model's positions. A model
    that cannot hold some is refused (one line): leaving them out would favour short chains."""
    long = int((lengths > n_positions).sum()) if n_positions and len(lengths) else 0
    if long:
        raise ValueError(f"{long} of {len(lengths)} {what} are longer than the model's {n_positions} positions "
                         f"(up to {int(lengths.max())} tokens), and leaving them out would favour short chains: "
                         f"evaluate tokens made with 04_tokenize.py --max-length {vocab.max_residues(n_positions)}, "
                         "or a model trained with stage 05's default --max-len")
