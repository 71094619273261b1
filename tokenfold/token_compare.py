"""The token kinds side by side: one table per kind (3di, geo, esm, 6d, ...).

Per token directory of stage 04, on the held-out split (default val):

* the ESM-2 k-means tokenizer's own claims: **utilisation** (codes used / codes in the vocabulary),
  **perplexity** of the code distribution (exp of its entropy), **unique tokens per protein** (that
  paper expects 20-50);
* **NMI with 3Di** (per residue, scikit-learn's normalized_mutual_info_score against the DB's 3Di
  letters of the same residues), next to NMI(amino acid; 3Di) and NMI(code; amino acid): a code that
  only knows the amino acid is no structure token;
* **reconstruction** where the kind decodes to C-alpha (geo: its codebook, closed loop; 6d: bin
  centres, open loop, `tokenfold.sixd.decode`): per-protein C-alpha RMSD, each segment superposed on
  its own (`tokenfold.metrics.segment_rmsd`);
* **learnability**, from the sweep's cells of that token set (`tokenfold.sweep`): held-out loss, free-
  running and teacher-forced accuracy against the kind's own stage-06 baselines, at equal compute
  (the same model sizes, train fractions and epochs for every kind: one token per residue in every
  kind, so the same tokens seen; FLOPs differ only by the output layer's vocabulary). Losses of
  vocabularies of different sizes are not comparable as they stand; ``gain_over_unigram`` (the train
  split's code entropy minus the loss, nats) is.

    python -m tokenfold.token_compare --tokens data/tokens/3di data/tokens/geo --sweep data/sweeps/kinds --out DIR

Writes token_kinds.json, token_kinds.md (the tables) and token_kinds.png into --out (a sweep's collect
step writes them into the sweep directory).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .artifacts import read_json, write_json_atomic, write_text_atomic
from .metrics import segment_rmsd, summarize
from .report import save_figure, subplots

log = logging.getLogger("tokenfold.token_compare")

DECODERS = ("geo", "6d")


def _nmi(a, b) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(a, b)) if len(a) else float("nan")


def kind_stats(tokens: Path, split: str = "val", seed: int = 0) -> dict:
    """The tokenizer numbers of one token directory on `split` (module docstring)."""
    from .db import ProteinDB
    from .geotokens import segment_starts
    from .shards import TokenDataset
    from .vocab import Vocab

    vocab = Vocab.load(tokens / "vocab.json")
    mf = read_json(tokens / "manifest.json")
    db = ProteinDB(mf["db"])
    ds = TokenDataset(tokens, split)
    decoder = None
    if vocab.kind == "geo":
        from .geotokens import GeoCodebook

        decoder = GeoCodebook.from_vocab(vocab, tokens).decode
    elif vocab.kind == "6d":
        from .sixd import decode as decoder
    codes, aa, ss, uniq, rmsd = [], [], [], [], []
    for i in range(len(ds)):
        a, c = vocab.decode(ds[i].astype(np.int64))
        rec = db.get_global(int(ds.db_index[i]))
        s, n = int(ds.crop_start[i]), int(ds.n_res[i])
        codes.append(c)
        uniq.append(len(np.unique(c)))
        if rec.ss is not None:
            aa.append(np.frombuffer(a.encode(), np.uint8))
            ss.append(np.frombuffer(rec.ss[s:s + n].encode(), np.uint8))
        else:
            aa.append(None)
            ss.append(None)
        if decoder is not None and rec.ca is not None:
            ca, gap = rec.ca[s:s + n], rec.gap_before[s:s + n]
            rmsd.append(segment_rmsd(decoder(c), ca, segment_starts(ca, gap)))
    allc = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    counts = np.bincount(allc, minlength=vocab.n_struct)
    p = counts[counts > 0] / max(counts.sum(), 1)
    has = [j for j in range(len(codes)) if ss[j] is not None]
    c3, a3, s3 = (np.concatenate([x[j] for j in has]) if has else np.zeros(0, np.int64) for x in (codes, aa, ss))
    train_ppl = (read_json(tokens / "report.json").get("token_frequency", {}).get("train", {}).get("perplexity")
                 if (tokens / "report.json").exists() else None)
    u = np.array(uniq)
    out = {"tokens": str(tokens), "kind": vocab.kind, "n_struct": vocab.n_struct, "split": split,
           "n_proteins": len(ds), "n_residues": int(len(allc)),
           "utilisation": float((counts > 0).mean()), "codes_used": int((counts > 0).sum()),
           "perplexity": float(np.exp(-(p * np.log(p)).sum())) if len(p) else float("nan"),
           "train_unigram_entropy_nats": float(np.log(train_ppl)) if train_ppl else None,
           "unique_per_protein": {"mean": float(u.mean()) if len(u) else float("nan"),
                                  "median": float(np.median(u)) if len(u) else float("nan"),
                                  "p10": float(np.percentile(u, 10)) if len(u) else float("nan"),
                                  "p90": float(np.percentile(u, 90)) if len(u) else float("nan"),
                                  "fraction_in_20_50": float(((u >= 20) & (u <= 50)).mean()) if len(u) else float("nan")},
           "nmi_3di": _nmi(c3, s3), "nmi_aa_3di": _nmi(a3, s3), "nmi_code_aa": _nmi(c3, a3),
           "nmi_3di_shuffled": _nmi(np.random.default_rng(seed).permutation(c3), s3),
           "n_residues_with_3di": int(len(s3)),
           "random_weights": bool(vocab.meta.get("random_weights")   # esm/kanzi tokens from a RANDOM model
                                 or vocab.meta.get("esm_codebook", {}).get("random_weights", False))}
    if decoder is not None:
        out["reconstruction"] = {"decodable": True, "rmsd_A": summarize(rmsd),
                                 "how": "closed-loop geo codebook" if vocab.kind == "geo" else
                                 "bin centres, 3.8 A bonds, open loop (tokenfold.sixd.decode)"}
    else:
        out["reconstruction"] = {"decodable": False}
    return out


def learnability(recs: list[dict], unigram: float | None) -> list[dict]:
    """One row per cell of this token set: loss, accuracies, baselines, compute."""
    rows = []
    for r in sorted(recs, key=lambda r: (r["N"], r["fraction"])):
        rows.append({"cell": r["cell"], "size": r["size"], "fraction": r["fraction"], "N": r["N"], "D": r["D"],
                     "flops": r["flops"], "loss": r["loss"], "perplexity": r["perplexity"],
                     "gain_over_unigram": (unigram - r["loss"]) if unigram is not None else None,
                     "accuracy": r["accuracy"], "teacher_forced_accuracy": r["teacher_forced_accuracy"],
                     "baselines": r["baselines"],
                     "beats": {b: r["accuracy"] > v for b, v in r["baselines"].items()}})
    return rows


def compare(tokens: list[Path], recs: list[dict] | None = None, split: str = "val") -> dict:
    """{set name: {"tokenizer": kind_stats, "learnability": rows}} plus the compute each kind got."""
    out = {"split": split, "kinds": {}}
    for t in tokens:
        st = kind_stats(Path(t), split)
        mine = [r for r in (recs or []) if r["tokens_set"] == Path(t).name]
        out["kinds"][Path(t).name] = {"tokenizer": st, "learnability": learnability(mine, st["train_unigram_entropy_nats"])}
    cells = {(r["size"], r["fraction"]) for r in (recs or [])}
    out["equal_compute"] = {f"{s} f{f:g}": {r["tokens_set"]: {"D": r["D"], "flops": r["flops"], "N": r["N"]}
                                           for r in (recs or []) if (r["size"], r["fraction"]) == (s, f)}
                            for s, f in sorted(cells)}
    return out


def _f(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"


def markdown(table: dict) -> str:
    """One table per kind (the issue's request), then the learnability rows."""
    lines = [f"# Token kinds side by side ({table['split']} split)", ""]
    for name, k in table["kinds"].items():
        t = k["tokenizer"]
        u, rec = t["unique_per_protein"], t["reconstruction"]
        lines += [f"## {name} ({t['kind']}, {t['n_struct']} codes{', from a RANDOM-weights model' if t['random_weights'] else ''})",
                  "", "| measure | value |", "|---|---|",
                  f"| utilisation | {_f(t['utilisation'])} ({t['codes_used']} of {t['n_struct']}) |",
                  f"| perplexity | {_f(t['perplexity'], 1)} |",
                  (f"| unique tokens per protein, mean / median (p10-p90) | {_f(u['mean'], 1)} / {_f(u['median'], 1)} "
                   f"({_f(u['p10'], 0)}-{_f(u['p90'], 0)}); {_f(u['fraction_in_20_50'], 2)} of proteins in 20-50 |"),
                  (f"| NMI(code; 3Di) | {_f(t['nmi_3di'])} (amino acid: {_f(t['nmi_aa_3di'])}, shuffled codes: "
                   f"{_f(t['nmi_3di_shuffled'])}) |"),
                  f"| NMI(code; amino acid) | {_f(t['nmi_code_aa'])} |",
                  "| reconstruction, C-alpha RMSD median (max) | " + (
                      f"{_f(rec['rmsd_A'].get('median'), 2)} A ({_f(rec['rmsd_A'].get('max'), 2)} A), {rec['how']} |"
                      if rec["decodable"] else "not decodable |")]
        for r in k["learnability"]:
            b = ", ".join(f"{n} {_f(v)}" for n, v in r["baselines"].items())
            lines.append(f"| learnability {r['size']} f{r['fraction']:g} (D {_f(r['D'])}) | loss {_f(r['loss'])} "
                         f"(gain over unigram {_f(r['gain_over_unigram'])}), free-running acc {_f(r['accuracy'])}, "
                         f"teacher-forced {_f(r['teacher_forced_accuracy'])}; baselines {b} |")
        lines.append("")
    return "\n".join(lines)


def write_tables(out: Path, table: dict) -> list[str]:
    """token_kinds.json, token_kinds.md, token_kinds.png in `out`; returns the file names."""
    write_json_atomic(out / "token_kinds.json", table)
    write_text_atomic(out / "token_kinds.md", markdown(table))
    names = list(table["kinds"])
    fig, ax = subplots(4, ncols=4, size=3.6)
    T = [table["kinds"][n]["tokenizer"] for n in names]
    for a, (lab, vals) in zip(ax[:3], (("utilisation", [t["utilisation"] for t in T]),
                                       ("unique tokens per protein (mean)", [t["unique_per_protein"]["mean"] for t in T]),
                                       ("NMI(code; 3Di)", [t["nmi_3di"] for t in T]))):
        a.bar(names, vals)
        a.set_title(lab, fontsize=9)
    a = ax[3]
    for j, n in enumerate(names):
        rows = table["kinds"][n]["learnability"]
        if rows:
            r = max(rows, key=lambda r: r["D"])
            a.bar(j - 0.2, r["accuracy"], 0.4, color="C0", label="free-running" if j == 0 else None)
            a.bar(j + 0.2, max(r["baselines"].values()), 0.4, color="grey", label="best baseline" if j == 0 else None)
    a.set_xticks(range(len(names)), names)
    a.set_title("accuracy vs own best baseline", fontsize=9)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    save_figure(fig, out / "token_kinds.png")
    return ["token_kinds.json", "token_kinds.md", "token_kinds.png"]


def main(argv=None) -> int:
    from .cli import die, setup_logging

    ap = argparse.ArgumentParser(prog="python -m tokenfold.token_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", nargs="+", required=True, help="stage-04 token directories, one per kind")
    ap.add_argument("--sweep", help="a sweep directory whose cells/*.json give the learnability rows")
    ap.add_argument("--split", default="val", choices=("val", "test", "train"))
    ap.add_argument("--out", required=True, help="where token_kinds.json/.md/.png go")
    a = ap.parse_args(argv)
    setup_logging()
    recs = [json.loads(p.read_text()) for p in sorted(Path(a.sweep).glob("cells/*.json"))] if a.sweep else []
    try:
        table = compare([Path(t) for t in a.tokens], recs, a.split)
    except (FileNotFoundError, ValueError) as e:
        die(str(e).splitlines()[0])
    print("\n".join(str(Path(a.out) / f) for f in write_tables(Path(a.out), table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
