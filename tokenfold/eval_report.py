"""Stage 06's report: the work parts of an `Evaluation` merged into aggregate numbers and files.

`finalize` fits the train-split baselines, aggregates token accuracy (free-running and teacher-forced;
for struct2seq this is native sequence recovery, per residue and per protein, binned by length),
perplexity, the baselines' accuracy, the 3Di confusion matrix (struct2seq: the 20x20 amino-acid
substitution matrix), the self-consistency agreement (struct2seq with a folding checkpoint) and, for
decodable seq2struct kinds, the trace metrics of the predicted, ceiling and baseline traces; then
writes the per-protein table, the skipped examples, the predictions, the pred-vs-true PDB files, the pictures (`tokenfold.eval_plots`)
and ``metrics.json`` last. Files: see data/README.md, section stage 06.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .artifacts import atomic_path
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
    """Merge `ev`'s parts into the report files; returns the content of metrics.json.

    Streams the parts: one part is in memory at a time. per_protein.tsv, skipped.tsv,
    predictions.fasta and the PDB files are written as the parts go by; what is kept for the
    aggregates and pictures is a few numbers per protein (lengths, scored residues and hits,
    NLL, trace metrics) and the token counts (confusion/substitution matrix). The C-alpha traces
    drawn in ca_traces_3d.png are read back from their parts at the end."""
    cfg, v, out = ev.cfg, ev.vocab, ev.out
    paths = ev.part_paths()
    heads = [ev.read_part(p, ["ids", "skipped"]) for p in paths]   # small: nothing to report fails before the baselines
    sizes = np.array([len(h["ids"]) for h in heads], dtype=np.int64)
    skipped_all = [x for h in heads for x in h["skipped"]]
    del heads
    n = int(sizes.sum())
    if n == 0:
        die(f"no protein of the {cfg.split} split could be evaluated "
            f"({len(skipped_all)} skipped; first reason: {skipped_all[0][1] if skipped_all else 'none'})")
    windowed = {"auto": v.kind == "3di", "yes": True, "no": False}[cfg.window_baseline]
    log.info("finalize: %d proteins; fitting baselines on the train split (<= %d residues)",
             n, cfg.baseline_max_residues)
    base = ev.fit_baselines(windowed=windowed)
    names = base.names if base is not None else []
    if base is not None:
        base.save(out / "baselines.npz")
    decodable = v.kind in DECODABLE and not v.inverse
    consistency = bool(cfg.consistency_checkpoint)
    # the confusion matrix: 3Di letters, or (struct2seq) the 20x20 amino-acid substitution matrix
    letters = list(v.target_symbols[:N_AA_DESIGN]) if v.inverse else (v.struct_symbols if v.kind == "3di" else None)
    cm = np.zeros((len(letters), len(letters)), dtype=np.int64) if letters else None
    hit_keys = ["pred", "tf", *names, *(("cons", "cons_native") if consistency else ())]
    cols: dict[str, list] = {}                  # per-protein numbers, one array per part
    pdbs: list[Path] = []
    with contextlib.ExitStack() as stack:
        tsv, fasta, skip = (stack.enter_context(_atomic_text(out / name))
                            for name in ("per_protein.tsv", "predictions.fasta", "skipped.tsv"))
        skip.write("id\treason\n" + "".join(f"{a}\t{b}\n" for a, b in skipped_all))
        for k, path in enumerate(paths):
            P = ev.read_part(path)
            lengths = np.array([len(a) for a in P["aa"]], dtype=np.int64)
            # the residues scored: all, except (struct2seq) those whose native amino acid is unknown (X)
            scored = [t != X_CODE if v.inverse else np.ones(len(t), bool) for t in P["true_codes"]]
            preds = {"pred": P["pred_codes"], "tf": P["tf_codes"],
                     **{b: [base.predict(b, x) for x in P["src_codes"]] for b in names}}
            hits = {key: n_hits(p, P["true_codes"], scored) for key, p in preds.items()}
            if consistency:   # struct2seq: the source codes are the input structure tokens
                hits["cons"] = n_hits(P["cons_codes"], P["src_codes"], scored)
                hits["cons_native"] = n_hits(P["cons_native_codes"], P["src_codes"], scored)
            n_scored = np.array([int(s.sum()) for s in scored], dtype=np.int64)
            if cm is not None and len(lengths):
                pred, true = (np.concatenate([x[s] for x, s in zip(P[key], scored)]) for key in ("pred_codes", "true_codes"))
                cm += confusion_matrix(pred, true, len(letters))
            frac = {key: _fraction(h, n_scored) for key, h in hits.items()}
            per_protein = {"accuracy": frac["pred"], "tf_accuracy": frac["tf"],
                           "perplexity": np.exp(P["nll"] / P["n_targets"]), "loglik": P["loglik"],
                           **{f"acc_{b}": frac[b] for b in names},
                           **({"cons_agreement": frac["cons"], "cons_native_agreement": frac["cons_native"]}
                              if consistency else {})}
            tsv.write(per_protein_table(P, lengths, per_protein, cfg.unconstrained, decodable, header=k == 0))
            fasta.write("".join(f">{P['ids'][i]}\n{v.target_text(P['pred_codes'][i])}\n" for i in range(len(lengths))))
            if decodable and len(pdbs) < cfg.n_pdb:
                pdbs += write_pdbs(out / "pdb", P, cfg.n_pdb - len(pdbs), v.meta.get("WARNING"))
            for key, val in (("lengths", lengths), ("n_scored", n_scored), ("nll", P["nll"]),
                             ("n_targets", P["n_targets"]), ("loglik", P["loglik"]), ("n_breaks", P["n_breaks"]),
                             ("unc_valid", P["unc_valid"]), ("unc_length_match", P["unc_length_match"]),
                             *((f"hit_{h}", hits[h]) for h in hit_keys)):
                cols.setdefault(key, []).append(val)
            cols.setdefault("trace_metrics", []).append(P["trace_metrics"])
    C = {key: np.concatenate(parts, axis=1 if key == "trace_metrics" else 0) for key, parts in cols.items()}
    lengths, n_scored = C["lengths"], C["n_scored"]
    frac = {h: _fraction(C[f"hit_{h}"], n_scored) for h in hit_keys}   # per protein
    micro = lambda h: float(C[f"hit_{h}"].sum() / max(n_scored.sum(), 1))  # noqa: E731
    acc = frac["pred"]
    base_acc = {b: frac[b] for b in names}
    tokens = {
        "accuracy": micro("pred"),
        "accuracy_mean_per_protein": float(np.nanmean(acc)),
        "teacher_forced_accuracy": micro("tf"),
        "perplexity": float(np.exp(C["nll"].sum() / C["n_targets"].sum())),
        "perplexity_note": ("exp(mean NLL of the true target tokens (" + ("amino acids" if v.inverse else
                            "structure tokens") + ") and <eos>, teacher-forced, full vocabulary)"),
        "generated_loglik_per_residue": float(C["loglik"].sum() / lengths.sum()),
        "baselines": {b: {"accuracy": micro(b),
                          "accuracy_mean_per_protein": float(np.nanmean(base_acc[b]))} for b in names},
        "baseline_fit": ({**base.meta, "most_frequent_token": v.target_symbols[base.most_frequent]}
                         if base is not None else "no train split: no baselines"),
        "accuracy_by_length": binned(lengths, acc),
        "accuracy_by_length_per_residue": binned_residues(lengths, C["hit_pred"], n_scored),
    }
    if v.inverse:
        tokens["note"] = ("struct2seq: accuracy = native sequence recovery (designed amino acid = native), per residue "
                          "(accuracy) and per protein (accuracy_mean_per_protein); residues whose native amino acid "
                          f"is unknown (X) are not scored ({int(lengths.sum() - n_scored.sum())} here)")
    tokens["beats_baselines"] = {b: tokens["accuracy"] > tokens["baselines"][b]["accuracy"] for b in names}
    if names:   # the headline: free-running accuracy against the best baseline on these same chains
        best = max(names, key=lambda b: tokens["baselines"][b]["accuracy"])
        tokens["beats_all_baselines"] = all(tokens["beats_baselines"].values())
        tokens["margin_over_best_baseline"] = {"baseline": best,
                                               "points": 100 * (tokens["accuracy"] - tokens["baselines"][best]["accuracy"])}
    metrics = {
        "stage": "06_evaluate", "config_hash": ev.fp_hash, "checkpoint": str(ev.ckpt), "tokens": str(ev.tokens),
        "db": str(cfg.db), "split": cfg.split, "kind": v.kind, "direction": v.direction, "interleaved": v.interleaved,
        "n_struct": v.n_struct, "n_proteins": n, "n_residues": int(lengths.sum()), "n_skipped": len(skipped_all),
        "skipped": [{"id": a, "reason": b} for a, b in skipped_all[:100]],
        "decoding": {"constrained": True, **asdict(cfg.decoding.sampling())},
        "random_weights_upstream": bool(v.meta.get("random_weights", False)),
        **({"WARNING": v.meta["WARNING"]} if v.meta.get("WARNING") else {}),
        "vocab_meta": v.meta,
        "tokens_metrics": tokens,
        "length_bins": list(DEFAULT_LENGTH_BINS),
    }
    if cfg.unconstrained:
        metrics["unconstrained"] = {"validity_rate": float(C["unc_valid"].mean()),
                                    "length_match_rate": float(C["unc_length_match"].mean()),
                                    "note": UNCONSTRAINED_NOTE}
    if consistency:
        metrics["self_consistency"] = {
            "checkpoint": str(ev.fold_ckpt), "agreement_designed": micro("cons"),
            "agreement_native": micro("cons_native"),
            "agreement_designed_mean_per_protein": float(np.nanmean(frac["cons"])),
            "agreement_native_mean_per_protein": float(np.nanmean(frac["cons_native"])),
            "note": CONSISTENCY_NOTE}
    if v.inverse:
        metrics["substitution_matrix"] = {"letters": letters, "rows": "native", "columns": "designed",
                                          "counts": cm.tolist()}
    elif letters is not None:
        metrics["confusion_matrix"] = {"letters": letters, "rows": "true", "columns": "predicted",
                                       "counts": cm.tolist()}
    if decodable:
        metrics["structure"] = structure_metrics(C["trace_metrics"], lengths, C["n_breaks"])
    pngs = token_plots(out, lengths, acc, base_acc, tokens, "sequence recovery" if v.inverse else "token accuracy")
    if letters is not None:
        pngs.append(confusion_plot(out / ("substitution_matrix.png" if v.inverse else "confusion_3di.png"), cm, letters,
                                   "amino acid" if v.inverse else "3Di", ("native", "designed") if v.inverse
                                   else ("true", "predicted")))
    if decodable:
        metrics["pdb_files"] = len(pdbs)
        pngs += structure_plots(out, lengths, C["trace_metrics"], _PartColumns(ev, paths, sizes), cfg.n_pictures)
    metrics["pngs"] = [p.name for p in pngs]
    from .report import write_report

    write_report(out / "metrics.json", metrics)
    log.info("finalize: %s", summary_line(metrics))
    return metrics


def n_hits(preds: list[np.ndarray], truth: list[np.ndarray], scored: list[np.ndarray]) -> np.ndarray:
    """Per protein: how many scored residues have the prediction equal to the truth."""
    return np.array([int((p == t)[s].sum()) for p, t, s in zip(preds, truth, scored)], dtype=np.int64)


def _fraction(hits: np.ndarray, n_scored: np.ndarray) -> np.ndarray:
    """Fraction correct per protein (NaN for a protein without a scored residue)."""
    return np.where(n_scored > 0, hits / np.maximum(n_scored, 1), np.nan)


def binned_residues(lengths, hits: np.ndarray, n_scored: np.ndarray, edges=DEFAULT_LENGTH_BINS) -> list[dict]:
    """Per length bin: proteins, scored residues and the fraction of them correct (empty bins left out)."""
    idx = np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right") - 1
    out = []
    for b, label in enumerate(length_bin_labels(edges)):
        sel = idx == b
        if n_scored[sel].sum():
            out.append({"bin": label, "n": int(sel.sum()), "residues": int(n_scored[sel].sum()),
                        "accuracy": float(hits[sel].sum() / n_scored[sel].sum())})
    return out


@contextlib.contextmanager
def _atomic_text(path: Path):
    """A text file written as it goes, appearing complete (temp file + rename) when the block ends."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yield f


class _PartColumns:
    """``P[key][i]`` of the protein at position i of the report, read back from its part on demand
    (what structure_plots needs of the few proteins it draws)."""

    def __init__(self, ev: Evaluation, paths: list[Path], sizes: np.ndarray):
        self.ev, self.paths, self.first = ev, paths, np.concatenate([[0], np.cumsum(sizes)])

    def __getitem__(self, key: str) -> "_PartColumn":
        return _PartColumn(self, key)


class _PartColumn:
    def __init__(self, parts: _PartColumns, key: str):
        self.parts, self.key = parts, key

    def __getitem__(self, i: int):
        p = self.parts
        k = int(np.searchsorted(p.first, i, side="right")) - 1
        return p.ev.read_part(p.paths[k], [self.key])[self.key][i - int(p.first[k])]


def structure_metrics(tm: np.ndarray, lengths: np.ndarray, n_breaks: np.ndarray) -> dict:
    """Summaries of the trace metrics `tm` [trace, protein, metric] of each trace, and the model's by length."""
    s = {name: {m: summarize(tm[t, :, j]) for j, m in enumerate(TRACE_METRICS)} for t, name in enumerate(TRACES)}
    s["by_length"] = {m: binned(lengths, tm[0, :, j]) for j, m in enumerate(TRACE_METRICS)
                      if m in ("rmsd", "tm", "lddt")}
    s["proteins_with_chain_breaks"] = int((n_breaks > 0).sum())
    s["vs_baseline_traces"] = vs_baseline_traces(s)
    s["note"] = STRUCTURE_NOTE
    return s


def vs_baseline_traces(s: dict) -> dict:
    """Do the predicted traces beat each baseline trace on mean TM-score and mean lDDT, and by how much
    (pred - baseline; positive = better). `beats_all` needs both metrics against every baseline."""
    out = {}
    for name in TRACES:
        if not name.startswith("base_") or not s[name]["tm"].get("n"):
            continue
        d = {m: s["pred"][m]["mean"] - s[name][m]["mean"] for m in ("tm", "lddt")}
        out[name[5:]] = {"tm": s[name]["tm"]["mean"], "lddt": s[name]["lddt"]["mean"], "tm_gain": d["tm"],
                         "lddt_gain": d["lddt"], "beats": bool(d["tm"] > 0 and d["lddt"] > 0)}
    return {"baselines": out, "beats_all": bool(out) and all(b["beats"] for b in out.values()),
            "metric": "mean TM-score and mean lDDT over proteins; gain = predicted minus baseline"}


def per_protein_table(P: dict, lengths: np.ndarray, scores: dict[str, np.ndarray], unconstrained: bool,
                      decodable: bool, header: bool = True) -> str:
    """per_protein.tsv (or the rows of one part, `header` False): one row per protein; `scores` are its
    per-protein token columns, in order."""
    cols = ["id", "db_index", "crop_start", "length", "n_breaks", *scores]
    cols += ["unc_valid", "unc_length_match", "unc_n_struct"] if unconstrained else []
    if decodable:
        cols += list(TRACE_METRICS) + [f"{t}_{m}" for t in TRACES[1:] for m in PER_PROTEIN_OTHERS]
    lines = ["\t".join(cols)] if header else []
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
    return "".join(line + "\n" for line in lines)


def _fmt(x) -> str:
    if isinstance(x, (float, np.floating)):
        return "nan" if not np.isfinite(x) else f"{float(x):.4f}"
    return str(x)


def summary_line(m: dict) -> str:
    """The one-line summary of metrics.json that stage 06 prints."""
    t = m["tokens_metrics"]
    what = "sequence recovery" if m.get("direction") == "struct2seq" else "accuracy"
    mode = "sampled" if m.get("decoding", {}).get("do_sample") else "greedy"
    s = ("[RANDOM WEIGHTS upstream: see metrics.json WARNING] " if m.get("WARNING") else "") + (
         f"{m['n_proteins']} proteins, free-running ({mode}) {what} {t['accuracy']:.3f} (teacher-forced "
         f"{t['teacher_forced_accuracy']:.3f}, perplexity {t['perplexity']:.2f}); baselines "
         + ", ".join(f"{b} {d['accuracy']:.3f}" for b, d in t["baselines"].items()))
    if "margin_over_best_baseline" in t:
        g = t["margin_over_best_baseline"]
        s += (f"; beats baselines: {'yes' if t['beats_all_baselines'] else 'no'} "
              f"({g['points']:+.1f} points vs {g['baseline']})")
    if "self_consistency" in m:
        c = m["self_consistency"]
        s += (f"; self-consistency: designed {c['agreement_designed']:.3f} of the input's tokens "
              f"(native sequences: {c['agreement_native']:.3f})")
    if "structure" in m:
        p, c = m["structure"]["pred"], m["structure"]["ceiling"]
        if p["rmsd"].get("n"):
            s += (f"; RMSD median {p['rmsd']['median']:.2f} A, TM mean {p['tm']['mean']:.3f}, lDDT mean "
                  f"{p['lddt']['mean']:.3f} (ceiling RMSD {c['rmsd']['median']:.2f} A, TM {c['tm']['mean']:.3f})")
        vb = m["structure"].get("vs_baseline_traces", {})
        if vb.get("baselines"):
            s += ("; beats baseline traces: " + ("yes" if vb["beats_all"] else "no") + " ("
                  + ", ".join(f"{b} TM {d['tm']:.3f} ({d['tm_gain']:+.3f}), lDDT {d['lddt']:.3f} ({d['lddt_gain']:+.3f})"
                              for b, d in vb["baselines"].items()) + ")")
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
