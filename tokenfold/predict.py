"""Run a trained translator on your own inputs, in the direction its vocabulary says (`tokenfold.vocab`).

    python -m tokenfold.predict --checkpoint data/runs/<run>/final --fasta my.fasta --out predictions/
    python -m tokenfold.predict --checkpoint data/runs/<s2s run>/final --structures 1abc.pdb designs/ \\
        --out designs_out/ --num-designs 8 --sample --temperature 0.5

Inputs (either or both):

- ``--fasta``: seq2struct: amino-acid sequences (letters outside the 20 amino acids, B, Z, U, O, ...,
  read as X, as in training). struct2seq: structure tokens: 3Di letters, or space-separated token
  numbers for the other kinds (the format seq2struct prediction writes).
- ``--structures``: PDB/mmCIF files or directories, read the way stage 01 reads them (every protein
  chain; ids ``<file>`` or ``<file>_<chain>``). seq2struct takes the chain's sequence. struct2seq
  takes its structure tokens from the same kind's encoder: 3Di from mini3di, geo tokens from the
  checkpoint's geo codebook, Kanzi's tokens from its checkpoint (``--kanzi-checkpoint``, else the
  one named in vocab.json). esm tokens are computed from the sequence itself, so designing from
  them is refused.

Writes in --out:

- seq2struct: ``structure_tokens.fasta`` (``>id`` then the tokens: 3Di letters, or space-separated
  token numbers), ``pdb/<id>.pdb`` (C-alpha only, geo/kanzi kinds);
- struct2seq (design): ``designs.fasta``, ``--num-designs`` sequences per structure, each
  ``>id design=<k> loglik=<sum> mean_loglik=<per residue> L=<n>`` (+ ``recovery=`` against the native
  sequence for structure files) then the amino acids. loglik is the model's log-likelihood of the
  designed residues (`tokenfold.generate`). Greedy decoding gives one design whatever --num-designs
  says (the rest would be copies): ask for several with ``--sample``;
- ``rejects.tsv`` (id, reason): inputs that could not be used (empty, not a sequence / not tokens of
  this kind, longer than the model's context, a structure file that does not parse).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np

from .artifacts import write_text_atomic
from .cli import add_options, die, options_from_args, setup_logging
from .fasta import read_fasta
from .inference import Decoding, load_decoder, load_model, safe_name, write_ca_pdb
from .vocab import AA_LETTERS, Vocab

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


def fasta_sources(path: str, vocab: Vocab) -> tuple[list[tuple], list[tuple]]:
    """([(id, source, native amino acids or None)], [(id, reason)]) of a FASTA file, in `vocab`'s direction."""
    recs = read_fasta(path)
    if not recs:
        raise ValueError(f"{path}: no FASTA records")
    out, rejects = [], []
    for name, text in recs:
        if vocab.inverse:
            try:
                s, why = vocab.parse_symbols(text), None
            except ValueError as e:
                s, why = None, f"not {vocab.kind} tokens: {str(e)[:100]}"
            why = why or (None if len(s) else "empty")
            native = None
        else:
            s, why = clean_sequence(text)
            native = s
        if why:
            rejects.append((name, why))
        else:
            out.append((name, s, native))
    return out, rejects


def structure_sources(paths: list[str], vocab: Vocab, coder=None) -> tuple[list[tuple], list[tuple]]:
    """([(id, source, native amino acids)], [(id, reason)]) of PDB/mmCIF files and directories: every
    protein chain, read as stage 01 reads it; struct2seq sources are the chain's structure tokens from
    `coder` (`load_decoder`'s object: geo codebook or Kanzi; 3Di needs none)."""
    from .db_plan import PrepareOptions, disambiguated_bases, expand_structure_args
    from .ingest import ingest_structure_file

    if vocab.inverse and vocab.kind == "esm":
        raise ValueError("esm tokens are computed from the amino-acid sequence: a design from them would read the "
                         "answer; use a 3di, geo or kanzi checkpoint")
    files = expand_structure_args(paths)
    opts = PrepareOptions(min_length=1, max_unknown=1.0, min_plddt=0.0)
    out, rejects = [], []
    for f, base in zip(files, disambiguated_bases(files)):
        res = ingest_structure_file(str(f), base, opts)
        rejects += [(f"{Path(p).name}{':' + c if c else ''}", why) for p, c, why in res.rejects]
        for rec in res.records:
            if not vocab.inverse:
                out.append((rec.id, rec.aa, rec.aa))
                continue
            try:
                if vocab.kind == "3di":
                    if rec.ss is None:
                        raise ValueError("no 3Di (a C-alpha trace: N and C missing)")
                    codes = vocab.threedi_codes(rec.ss)
                elif vocab.kind == "geo":
                    codes = coder.encode(rec.ca, rec.gap_before, beam=int(vocab.meta["geo_codebook"].get("encode_beam", 1)))
                else:
                    codes = coder.encode(rec.ca)
                out.append((rec.id, np.asarray(codes, np.int64), rec.aa))
            except ValueError as e:
                rejects.append((rec.id, str(e).splitlines()[0][:160]))
    return out, rejects


def predict(checkpoint: str, out: str, fasta: str | None = None, structures: list[str] | None = None,
            decoding: Decoding | None = None, num_designs: int = 1) -> dict:
    """Predict every usable input into `out` (module docstring); returns counts."""
    from .generate import generate

    out = Path(out)
    decoding = decoding or Decoding()
    if num_designs < 1:
        raise ValueError("--num-designs must be >= 1")
    decoding.sampling()  # checked before the model loads
    model, vocab, ckpt = load_model(checkpoint, decoding)
    # geo/kanzi: the tokenizer (seq2struct decodes its output to C-alpha, struct2seq encodes structure files)
    coder = load_decoder(vocab, [ckpt], decoding.kanzi_checkpoint) if structures or not vocab.inverse else None
    inputs, rejects = fasta_sources(fasta, vocab) if fasta else ([], [])
    if structures:
        more, bad = structure_sources(structures, vocab, coder)
        inputs, rejects = inputs + more, rejects + bad
    limit = vocab.max_residues(getattr(model.config, "max_position_embeddings", 1 << 30))  # the length rule
    keep, seen = [], set()
    for name, src, native in inputs:
        why = (f"{len(src)} residues, the model's context holds {limit}" if len(src) > limit
               else "duplicate id" if name in seen else None)
        if why:
            rejects.append((name, why))
            continue
        seen.add(name)
        keep.append((name, src, native))
    n_designs = num_designs if (vocab.inverse and decoding.sample) else 1
    if vocab.inverse and num_designs > 1 and not decoding.sample:
        log.warning("--num-designs %d with greedy decoding: one design per structure (add --sample)", num_designs)
    log.info("predict: %d inputs, %d rejected, %d design(s) each", len(keep), len(rejects), n_designs)
    runs = [generate(model, vocab, [s for _, s, _ in keep], sampling=decoding.sampling(seed=decoding.seed + k),
                     batch_size=decoding.batch_size, max_batch_tokens=decoding.max_batch_tokens, show_progress=True)
            for k in range(n_designs)]
    pdbs = []
    if vocab.inverse:
        write_text_atomic(out / "designs.fasta", "".join(
            _design_record(name, k + 1, gens[i], native) for i, (name, _, native) in enumerate(keep)
            for k, gens in enumerate(runs)))
    else:
        gens = runs[0]
        if coder is not None and keep:
            for (name, s, _), ca in zip(keep, coder.decode_many([g.codes for g in gens])):
                pdbs.append(write_ca_pdb(out / "pdb" / f"{safe_name(name)}.pdb", {"A": (s, ca)}))
        write_text_atomic(out / "structure_tokens.fasta",
                          "".join(f">{name} kind={vocab.kind} L={len(s)}\n{vocab.symbols(g.codes)}\n"
                                  for (name, s, _), g in zip(keep, gens)))
    write_text_atomic(out / "rejects.tsv", "id\treason\n" + "".join(f"{a}\t{b}\n" for a, b in rejects))
    return {"n_predicted": len(keep), "n_rejected": len(rejects), "pdb_files": len(pdbs), "kind": vocab.kind,
            "direction": vocab.direction, "n_designs": n_designs}


def _design_record(name: str, k: int, g, native: str | None) -> str:
    seq = "".join(AA_LETTERS[int(c)] for c in g.codes)
    head = f">{name} design={k} loglik={g.loglik:.3f} mean_loglik={g.loglik / len(seq):.4f} L={len(seq)}"
    if native:
        known = np.array([a != "X" for a in native])
        same = np.array([a == b for a, b in zip(seq, native)])
        head += f" recovery={same[known].mean():.4f}" if known.any() else ""
    return f"{head}\n{seq}\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenfold.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir of stage 05 (vocab.json beside it)")
    p.add_argument("--fasta", help="input FASTA: amino-acid sequences (seq2struct) or structure tokens (struct2seq)")
    p.add_argument("--structures", nargs="+", metavar="PATH", help="PDB/mmCIF files or directories")
    p.add_argument("--out", required=True, help="output dir: structure_tokens.fasta + pdb/<id>.pdb (seq2struct), "
                                                "designs.fasta (struct2seq), rejects.tsv")
    p.add_argument("--num-designs", type=int, default=1, help="struct2seq: sequences per structure (with --sample)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_options(p, Decoding)
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    if not (a.fasta or a.structures):
        die("give --fasta and/or --structures")
    try:
        r = predict(a.checkpoint, a.out, a.fasta, a.structures, options_from_args(Decoding, a), a.num_designs)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    if r["n_predicted"] == 0:
        die(f"nothing could be predicted ({r['n_rejected']} rejected: see {a.out}/rejects.tsv)")
    what = (f"{r['n_designs']} design(s) for each of {r['n_predicted']} structures ({r['kind']} tokens) -> "
            f"{a.out}/designs.fasta" if r["direction"] == "struct2seq" else
            f"{r['n_predicted']} sequences ({r['kind']} tokens) -> {a.out}/structure_tokens.fasta")
    print(f"predicted {what}" + (f", {r['pdb_files']} PDB files in {a.out}/pdb/" if r["pdb_files"] else "")
          + (f"; {r['n_rejected']} rejected (rejects.tsv)" if r["n_rejected"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
