"""Predict structure tokens (and, for decodable kinds, C-alpha traces) for your own sequences.

    python -m tokenfold.predict --checkpoint data/runs/<run>/final --fasta my.fasta --out predictions/

Writes in --out: ``structure_tokens.fasta`` (``>id`` then the tokens: 3Di letters, or space-separated
token numbers for the other kinds), ``pdb/<id>.pdb`` (C-alpha only, geo/kanzi kinds), and
``rejects.tsv`` (id, reason) for records that could not be predicted (empty, not a protein
sequence, longer than the model's context). Letters outside the 20 amino acids (B, Z, U, O, ...) are
read as X, as in training.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from .artifacts import write_text_atomic
from .cli import add_options, die, options_from_args, setup_logging
from .fasta import read_fasta
from .inference import Decoding, load_decoder, load_model, safe_name, write_ca_pdb

log = logging.getLogger("tokenfold.predict")

_NOT_SEQ = re.compile(r"[^A-Za-z*\-]")


def clean_sequence(seq: str) -> tuple[str | None, str | None]:
    """(sequence in upper case without a trailing stop '*', None) or (None, reason)."""
    s = seq.upper().rstrip("*")
    if not s:
        return None, "empty sequence"
    bad = _NOT_SEQ.search(s)
    if bad or "*" in s or "-" in s:
        ch = bad.group(0) if bad else ("*" if "*" in s else "-")
        return None, f"not a protein sequence (character {ch!r})"
    return s, None


def predict(checkpoint: str, fasta: str, out: str, decoding: Decoding | None = None) -> dict:
    """Predict every usable record of `fasta` into `out` (module docstring); returns counts."""
    from .generate import generate

    out = Path(out)
    decoding = decoding or Decoding()
    sampling = decoding.sampling()  # checked before the model loads
    model, vocab, ckpt = load_model(checkpoint, decoding)
    recs = read_fasta(fasta)
    if not recs:
        raise ValueError(f"{fasta}: no FASTA records")
    limit = vocab.max_residues(getattr(model.config, "max_position_embeddings", 1 << 30))  # the length rule
    keep, rejects, seen = [], [], set()
    for name, seq in recs:
        s, why = clean_sequence(seq)
        if why is None and len(s) > limit:
            why = f"{len(s)} residues, the model's context holds {limit}"
        if why is None and name in seen:
            why = "duplicate id"
        if why:
            rejects.append((name, why))
            continue
        seen.add(name)
        keep.append((name, s))
    log.info("predict: %d sequences, %d rejected", len(keep), len(rejects))
    gens = generate(model, vocab, [s for _, s in keep], sampling=sampling, batch_size=decoding.batch_size,
                    max_batch_tokens=decoding.max_batch_tokens, show_progress=True)
    decoder = load_decoder(vocab, [ckpt], decoding.kanzi_checkpoint)  # None for kinds that do not decode
    pdbs = []
    if decoder is not None and keep:
        for (name, s), ca in zip(keep, decoder.decode_many([g.codes for g in gens])):
            pdbs.append(write_ca_pdb(out / "pdb" / f"{safe_name(name)}.pdb", {"A": (s, ca)}))
    write_text_atomic(out / "structure_tokens.fasta",
                      "".join(f">{name} kind={vocab.kind} L={len(s)}\n{vocab.symbols(g.codes)}\n"
                              for (name, s), g in zip(keep, gens)))
    write_text_atomic(out / "rejects.tsv", "id\treason\n" + "".join(f"{a}\t{b}\n" for a, b in rejects))
    return {"n_predicted": len(keep), "n_rejected": len(rejects), "pdb_files": len(pdbs), "kind": vocab.kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenfold.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir of stage 05 (vocab.json beside it)")
    p.add_argument("--fasta", required=True, help="input amino-acid sequences (FASTA)")
    p.add_argument("--out", required=True,
                   help="output dir: structure_tokens.fasta, pdb/<id>.pdb (geo/kanzi), rejects.tsv")
    p.add_argument("-v", "--verbose", action="store_true")
    add_options(p, Decoding)
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    try:
        r = predict(a.checkpoint, a.fasta, a.out, options_from_args(Decoding, a))
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    if r["n_predicted"] == 0:
        die(f"no sequence could be predicted ({r['n_rejected']} rejected: see {a.out}/rejects.tsv)")
    print(f"predicted {r['n_predicted']} sequences ({r['kind']} tokens) -> {a.out}/structure_tokens.fasta"
          + (f", {r['pdb_files']} PDB files in {a.out}/pdb/" if r["pdb_files"] else "")
          + (f"; {r['n_rejected']} rejected (rejects.tsv)" if r["n_rejected"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
