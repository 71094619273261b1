"""Stage 06's report: the work parts of an `Evaluation` merged into aggregate numbers and files.

`finalize` fits the train-split baselines, aggregates token accuracy (free-running and teacher-forced;
for struct2seq this is native sequence recovery, per residue and per protein, binned by length),
perplexity, the baselines' accuracy, the 3Di confusion matrix (struct2seq: the 20x20 amino-acid
substitution matrix), the self-consistency agreement (struct2seq with a folding checkpoint) and, for
decodable seq2struct kinds, the trace metrics of the predicted, ceiling and baseline traces; then writes the per-protein table, the
skipped examples, the predictions, the pred-vs-true PDB files, the pictures (`tokenfold.eval_plots`)
and ``metrics.json`` last. Files: see data/README.md, section stage 06.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .artifacts import write_text_atomic
from .cli import die
from .eval_plots import confusion_plot, structure_plots, token_plots
from .evaluate import TRACES, Evaluation
from .inference import DECODABLE, safe_name, write_ca_pdb
from .metrics import (DEFAULT_LENGTH_BINS, TRACE_METRICS, binned, confusion_matrix, kabsch, length_bin_labels,
                      summarize)
from .vocab import AA_LETTERS, N_AA_DESIGN

log = logging.getLogger("tokenfold.eval_report")

PER_PROTEIN_OTHERS = ("rmsd", "tm", "lddt", "rmsd_seg")  # per-protein columns of the non-model traces
STRUCTURE_NOTE = (
    "pred: decoded predicted tokens; ceiling: decoded TRUE tokens (the tokenizer's limit); base_*: "
    "decoded baseline tokens (train split's most frequent token, per-amino-acid most frequent token). "
    "Fixed residue correspondence; RMSD after Kabsch superposition; TM-score by tmtools normalised by "
    "the true length; lDDT on C-alpha (15 A, 0.5/1/2/4 A); GDT-TS; fractions within 2/4 A after the "
    "RMSD superposition; rmsd_seg: each segment between chain breaks of the true chain superposed "
    "on its own (tokens cannot place segments relative to each other across a gap).")
UNCONSTRAINED_NOTE = (
    "greedy free decoding over the whole vocabulary (source tokens still fed in the interleaved layout); "
    "valid = only target tokens (structure tokens; struct2seq: amino acids) before the end; length match = valid, "
    "exactly L, then <eos>")
CONSISTENCY_NOTE = (
    "self-consistency (a cheap analogue of scTM): the seq2struct checkpoint folds each designed sequence into "
    "structure tokens (constrained greedy decoding); agreement_designed = fraction equal to the input's tokens. "
    "agreement_native = the same for the native sequence: what that folding model reaches on real sequences, "
    "the reference to read agreement_designed against")
X_CODE = AA_LETTERS.index("X")


def finalize(ev: Evaluation) -> dict:
    """Merge `ev`'s parts into the report files; returns the content of metrics.json."""
    cfg, v, out = ev.cfg, ev.vocab, ev.out
    P = ev.load_parts()
    n = len(P["ids"])
    if n == 0:
        die(f"no protein of the {cfg.split} split could be evaluated "
            f"({len(P['skipped'])} skipped; first reason: {P['skipped'][0][1] if P['skipped'] else 'none'})")
    windowed = {"auto": v.kind == "3di", "yes": True, "no": False}[cfg.window_baseline]
    log.info("finalize: %d proteins; fitting baselines on the train split (<= %d residues)",
             n, cfg.baseline_max_residues)
    base = ev.fit_baselines(windowed=windowed)
    names = base.names if base is not None else []
    if base is not None:
        base.save(out / "baselines.npz")
    lengths = np.array([len(a) for a in P["aa"]])
    # the residues scored: all, except (struct2seq) those whose native amino acid is unknown (X)
    scored = [t != X_CODE if v.inverse else np.ones(len(t), bool) for t in P["true_codes"]]
    hits = lambda preds, truth=P["true_codes"]: [(p == t)[k] for p, t, k in zip(preds, truth, scored)]  # noqa: E731
    acc = per_protein(hits(P["pred_codes"]))
    tf_acc = per_protein(hits(P["tf_codes"]))
    ppl = np.exp(P["nll"] / P["n_targets"])
    base_pred = {b: [base.predict(b, x) for x in P["src_codes"]] for b in names}
    base_acc = {b: per_protein(hits(base_pred[b])) for b in names}
    tokens = {
        "accuracy": micro(hits(P["pred_codes"])),
        "accuracy_mean_per_protein": float(np.nanmean(acc)),
        "teacher_forced_accuracy": micro(hits(P["tf_codes"])),
        "perplexity": float(np.exp(P["nll"].sum() / P["n_targets"].sum())),
        "perplexity_note": ("exp(mean NLL of the true target tokens (" + ("amino acids" if v.inverse else
                            "structure tokens") + ") and <eos>, teacher-forced, full vocabulary)"),
        "generated_loglik_per_residue": float(P["loglik"].sum() / lengths.sum()),
        "baselines": {b: {"accuracy": micro(hits(base_pred[b])),
                          "accuracy_mean_per_protein": float(np.nanmean(base_acc[b]))} for b in names},
        "baseline_fit": ({**base.meta, "most_frequent_token": v.target_symbols[base.most_frequent]}
                         if base is not None else "no train split: no baselines"),
        "accuracy_by_length": binned(lengths, acc),
        "accuracy_by_length_per_residue": binned_residues(lengths, hits(P["pred_codes"])),
    }
    if v.inverse:
        tokens["note"] = ("struct2seq: accuracy = native sequence recovery (designed amino acid = native), per residue "
                          "(accuracy) and per protein (accuracy_mean_per_protein); residues whose native amino acid "
                          f"is unknown (X) are not scored ({sum(int((~k).sum()) for k in scored)} here)")
    tokens["beats_baselines"] = {b: tokens["accuracy"] > tokens["baselines"][b]["accuracy"] for b in names}
    metrics = {
        "stage": "06_evaluate", "config_hash": ev.fp_hash, "checkpoint": str(ev.ckpt), "tokens": str(ev.tokens),
        "db": str(cfg.db), "split": cfg.split, "kind": v.kind, "direction": v.direction, "interleaved": v.interleaved,
        "n_struct": v.n_struct, "n_proteins": n, "n_residues": int(lengths.sum()), "n_skipped": len(P["skipped"]),
        "skipped": [{"id": a, "reason": b} for a, b in P["skipped"][:100]],
        "decoding": {"constrained": True, **asdict(cfg.decoding.sampling())},
        "random_weights_upstream": bool(v.meta.get("random_weights", False)),
        **({"WARNING": v.meta["WARNING"]} if v.meta.get("WARNING") else {}),
        "vocab_meta": v.meta,
        "tokens_metrics": tokens,
        "length_bins": list(DEFAULT_LENGTH_BINS),
    }
    if cfg.unconstrained:
        metrics["unconstrained"] = {"validity_rate": float(P["unc_valid"].mean()),
                                    "length_match_rate": float(P["unc_length_match"].mean()),
                                    "note": UNCONSTRAINED_NOTE}
    per_protein_cols = {"accuracy": acc, "tf_accuracy": tf_acc, "perplexity": ppl,
                        "loglik": P["loglik"], **{f"acc_{b}": base_acc[b] for b in names}}
    if "cons_codes" in P:   # struct2seq: the source codes are the input structure tokens
        cons = {k: per_protein(hits(P[c], P["src_codes"])) for k, c in
                (("cons_agreement", "cons_codes"), ("cons_native_agreement", "cons_native_codes"))}
        metrics["self_consistency"] = {
            "checkpoint": str(ev.fold_ckpt), "agreement_designed": micro(hits(P["cons_codes"], P["src_codes"])),
            "agreement_native": micro(hits(P["cons_native_codes"], P["src_codes"])),
            "agreement_designed_mean_per_protein": float(np.nanmean(cons["cons_agreement"])),
            "agreement_native_mean_per_protein": float(np.nanmean(cons["cons_native_agreement"])),
            "note": CONSISTENCY_NOTE}
        per_protein_cols.update(cons)
    pred_all, true_all = (np.concatenate([x[k] for x, k in zip(P[key], scored)]) for key in ("pred_codes", "true_codes"))
    letters = None
    if v.inverse:
        letters = list(v.target_symbols[:N_AA_DESIGN])
        cm = confusion_matrix(pred_all, true_all, N_AA_DESIGN)
        metrics["substitution_matrix"] = {"letters": letters, "rows": "native", "columns": "designed",
                                          "counts": cm.tolist()}
    elif v.kind == "3di":
        letters = v.struct_symbols
        cm = confusion_matrix(pred_all, true_all, v.n_struct)
        metrics["confusion_matrix"] = {"letters": letters, "rows": "true", "columns": "predicted",
                                       "counts": cm.tolist()}
    decodable = v.kind in DECODABLE and not v.inverse
    if decodable:
        metrics["structure"] = structure_metrics(P["trace_metrics"], lengths, P["n_breaks"])
    write_text_atomic(out / "per_protein.tsv", per_protein_table(P, lengths, per_protein_cols, cfg.unconstrained,
                                                                 decodable))
    write_text_atomic(out / "skipped.tsv", "id\treason\n" + "".join(f"{a}\t{b}\n" for a, b in P["skipped"]))
    write_text_atomic(out / "predictions.fasta",
                      "".join(f">{P['ids'][i]}\n{v.target_text(P['pred_codes'][i])}\n" for i in range(n)))
    pngs = token_plots(out, lengths, acc, base_acc, tokens, "sequence recovery" if v.inverse else "token accuracy")
    if letters is not None:
        pngs.append(confusion_plot(out / ("substitution_matrix.png" if v.inverse else "confusion_3di.png"), cm, letters,
                                   "amino acid" if v.inverse else "3Di", ("native", "designed") if v.inverse
                                   else ("true", "predicted")))
    if decodable:
        metrics["pdb_files"] = len(write_pdbs(out / "pdb", P, cfg.n_pdb, v.meta.get("WARNING")))
        pngs += structure_plots(out, lengths, P["trace_metrics"], P, cfg.n_pictures)
    metrics["pngs"] = [p.name for p in pngs]
    from .report import write_report

    write_report(out / "metrics.json", metrics)
    log.info("finalize: %s", summary_line(metrics))
    return metrics


def per_protein(hits: list[np.ndarray]) -> np.ndarray:
    """Fraction correct per protein (NaN for a protein without a scored residue)."""
    return np.array([h.mean() if len(h) else np.nan for h in hits])


def micro(hits: list[np.ndarray]) -> float:
    """Fraction correct over all scored residues."""
    return float(np.concatenate(hits).mean())


def binned_residues(lengths, hits: list[np.ndarray], edges=DEFAULT_LENGTH_BINS) -> list[dict]:
    """Per length bin: proteins, scored residues and the fraction of them correct (empty bins left out)."""
    idx = np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right") - 1
    out = []
    for b, label in enumerate(length_bin_labels(edges)):
        h = [hits[i] for i in np.flatnonzero(idx == b)]
        if h and sum(len(x) for x in h):
            out.append({"bin": label, "n": len(h), "residues": int(sum(len(x) for x in h)), "accuracy": micro(h)})
    return out


def structure_metrics(tm: np.ndarray, lengths: np.ndarray, n_breaks: np.ndarray) -> dict:
    """Summaries of the trace metrics `tm` [trace, protein, metric] of each trace, and the model's by length."""
    s = {name: {m: summarize(tm[t, :, j]) for j, m in enumerate(TRACE_METRICS)} for t, name in enumerate(TRACES)}
    s["by_length"] = {m: binned(lengths, tm[0, :, j]) for j, m in enumerate(TRACE_METRICS)
                      if m in ("rmsd", "tm", "lddt")}
    s["proteins_with_chain_breaks"] = int((n_breaks > 0).sum())
    s["note"] = STRUCTURE_NOTE
    return s


def per_protein_table(P: dict, lengths: np.ndarray, scores: dict[str, np.ndarray], unconstrained: bool,
                      decodable: bool) -> str:
    """per_protein.tsv: one row per protein; `scores` are its per-protein token columns, in order."""
    cols = ["id", "db_index", "crop_start", "length", "n_breaks", *scores]
    cols += ["unc_valid", "unc_length_match", "unc_n_struct"] if unconstrained else []
    if decodable:
        cols += list(TRACE_METRICS) + [f"{t}_{m}" for t in TRACES[1:] for m in PER_PROTEIN_OTHERS]
    lines = ["\t".join(cols)]
    for i in range(len(P["ids"])):
        row = [P["ids"][i], int(P["db_index"][i]), int(P["crop_start"][i]), int(lengths[i]), int(P["n_breaks"][i])]
        row += [s[i] for s in scores.values()]
        if unconstrained:
            row += [int(P["unc_valid"][i]), int(P["unc_length_match"][i]), int(P["unc_n"][i])]
        if decodable:
            row += list(P["trace_metrics"][0, i])
            row += [P["trace_metrics"][t, i, TRACE_METRICS.index(m)] for t in range(1, len(TRACES))
                    for m in PER_PROTEIN_OTHERS]
        lines.append("\t".join(_fmt(x) for x in row))
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    if isinstance(x, (float, np.floating)):
        return "nan" if not np.isfinite(x) else f"{float(x):.4f}"
    return str(x)


def summary_line(m: dict) -> str:
    """The one-line summary of metrics.json that stage 06 prints."""
    t = m["tokens_metrics"]
    what = "sequence recovery" if m.get("direction") == "struct2seq" else "accuracy"
    s = ("[RANDOM WEIGHTS upstream: see metrics.json WARNING] " if m.get("WARNING") else "") + (
         f"{m['n_proteins']} proteins, {what} {t['accuracy']:.3f} (teacher-forced {t['teacher_forced_accuracy']:.3f}, "
         f"perplexity {t['perplexity']:.2f}); baselines "
         + ", ".join(f"{b} {d['accuracy']:.3f}" for b, d in t["baselines"].items()))
    if "self_consistency" in m:
        c = m["self_consistency"]
        s += (f"; self-consistency: designed {c['agreement_designed']:.3f} of the input's tokens "
              f"(native sequences: {c['agreement_native']:.3f})")
    if "structure" in m:
        p, c = m["structure"]["pred"], m["structure"]["ceiling"]
        if p["rmsd"].get("n"):
            s += (f"; RMSD median {p['rmsd']['median']:.2f} A, TM mean {p['tm']['mean']:.3f} "
                  f"(ceiling RMSD {c['rmsd']['median']:.2f} A, TM {c['tm']['mean']:.3f})")
    if "unconstrained" in m:
        u = m["unconstrained"]
        s += f"; unconstrained valid {u['validity_rate']:.2f}, length match {u['length_match_rate']:.2f}"
    return s


def write_pdbs(pdb_dir: Path, P: dict, limit: int, warning: str | None = None) -> list[Path]:
    """<id>_pred_vs_true.pdb for the first `limit` proteins with a true trace: chain A = truth,
    chain B = decoded prediction superposed on it (Kabsch); `warning` (RANDOM WEIGHTS) as a REMARK."""
    out = []
    for i in range(len(P["ids"])):
        if len(out) >= limit:
            break
        true, pred, aa = P["true_ca"][i], P["pred_ca"][i], P["aa"][i]
        ok = np.isfinite(true).all(1) & np.isfinite(pred).all(1)
        if ok.sum() < 3:
            continue
        r, t = kabsch(pred[ok], true[ok])
        moved = pred.astype(np.float64) @ r.T + t
        out.append(write_ca_pdb(pdb_dir / f"{safe_name(P['ids'][i])}_pred_vs_true.pdb", {"A": (aa, true), "B": (aa, moved)},
                               remark=warning))
    return out
