"""Stage 06's report: the work parts of an `Evaluation` merged into aggregate numbers and files.

`finalize` fits the train-split baselines, aggregates token accuracy (free-running and teacher-forced),
perplexity, the baselines' accuracy, the 3Di confusion matrix and, for decodable kinds, the trace
metrics of the predicted, ceiling and baseline traces; then writes the per-protein table, the
skipped examples, the predictions, the pred-vs-true PDB files, the pictures (`tokenfold.eval_plots`)
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
from .metrics import DEFAULT_LENGTH_BINS, TRACE_METRICS, binned, confusion_matrix, kabsch, summarize

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
    "greedy free decoding over the whole vocabulary (amino acids still fed in the interleaved layout); "
    "valid = only structure tokens before the end; length match = valid, exactly L, then <eos>")


def finalize(ev: Evaluation) -> dict:
    """Merge `ev`'s parts into the report files; returns the content of metrics.json.

    Streams the parts: one part is in memory at a time. per_protein.tsv, skipped.tsv,
    predictions.fasta and the PDB files are written as the parts go by; what is kept for the
    aggregates and pictures is a few numbers per protein (lengths, accuracies, NLL, trace metrics)
    and the token counts (confusion matrix, correct predictions). The C-alpha traces drawn in
    ca_traces_3d.png are read back from their parts at the end."""
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
    decodable = v.kind in DECODABLE
    cols: dict[str, list] = {}                  # per-protein numbers, one array per part
    correct = dict.fromkeys(["pred", "tf", *names], 0)
    n_res_all = 0
    cm = np.zeros((v.n_struct, v.n_struct), dtype=np.int64)
    pdbs: list[Path] = []
    with contextlib.ExitStack() as stack:
        tsv, fasta, skip = (stack.enter_context(_atomic_text(out / name))
                            for name in ("per_protein.tsv", "predictions.fasta", "skipped.tsv"))
        skip.write("id\treason\n" + "".join(f"{a}\t{b}\n" for a, b in skipped_all))
        for k, path in enumerate(paths):
            P = ev.read_part(path)
            lengths = np.array([len(a) for a in P["aa"]], dtype=np.int64)
            acc = np.array([np.mean(p == t) for p, t in zip(P["pred_codes"], P["true_codes"])])
            tf_acc = np.array([np.mean(p == t) for p, t in zip(P["tf_codes"], P["true_codes"])])
            base_pred = {b: [base.predict(b, a) for a in P["aa"]] for b in names}
            base_acc = {b: np.array([np.mean(p == t) for p, t in zip(base_pred[b], P["true_codes"])]) for b in names}
            if len(lengths):
                true = np.concatenate(P["true_codes"])
                pred = np.concatenate(P["pred_codes"])
                n_res_all += len(true)
                correct["pred"] += int((pred == true).sum())
                correct["tf"] += int((np.concatenate(P["tf_codes"]) == true).sum())
                for b in names:
                    correct[b] += int((np.concatenate(base_pred[b]) == true).sum())
                if v.kind == "3di":
                    cm += confusion_matrix(pred, true, v.n_struct)
            per_protein = {"accuracy": acc, "tf_accuracy": tf_acc, "perplexity": np.exp(P["nll"] / P["n_targets"]),
                           **{f"acc_{b}": base_acc[b] for b in names}}
            tsv.write(per_protein_table(P, lengths, per_protein, cfg.unconstrained, decodable, header=k == 0))
            fasta.write("".join(f">{P['ids'][i]}\n{v.symbols(P['pred_codes'][i])}\n" for i in range(len(lengths))))
            if decodable and len(pdbs) < cfg.n_pdb:
                pdbs += write_pdbs(out / "pdb", P, cfg.n_pdb - len(pdbs), v.meta.get("WARNING"))
            for key, val in (("lengths", lengths), ("acc", acc), ("tf_acc", tf_acc), ("nll", P["nll"]),
                             ("n_targets", P["n_targets"]), ("n_breaks", P["n_breaks"]),
                             ("unc_valid", P["unc_valid"]), ("unc_length_match", P["unc_length_match"]),
                             *((f"base_{b}", base_acc[b]) for b in names)):
                cols.setdefault(key, []).append(val)
            cols.setdefault("trace_metrics", []).append(P["trace_metrics"])
    C = {key: np.concatenate(parts, axis=1 if key == "trace_metrics" else 0) for key, parts in cols.items()}
    lengths, acc = C["lengths"], C["acc"]
    base_acc = {b: C[f"base_{b}"] for b in names}
    micro = lambda key: correct[key] / n_res_all  # noqa: E731
    tokens = {
        "accuracy": micro("pred"),
        "accuracy_mean_per_protein": float(acc.mean()),
        "teacher_forced_accuracy": micro("tf"),
        "perplexity": float(np.exp(C["nll"].sum() / C["n_targets"].sum())),
        "perplexity_note": "exp(mean NLL of the true structure tokens and <eos>, teacher-forced, full vocabulary)",
        "baselines": {b: {"accuracy": micro(b),
                          "accuracy_mean_per_protein": float(base_acc[b].mean())} for b in names},
        "baseline_fit": ({**base.meta, "most_frequent_token": v.struct_symbols[base.most_frequent]}
                         if base is not None else "no train split: no baselines"),
        "accuracy_by_length": binned(lengths, acc),
    }
    tokens["beats_baselines"] = {b: tokens["accuracy"] > tokens["baselines"][b]["accuracy"] for b in names}
    if names:   # the headline: free-running accuracy against the best baseline on these same chains
        best = max(names, key=lambda b: tokens["baselines"][b]["accuracy"])
        tokens["beats_all_baselines"] = all(tokens["beats_baselines"].values())
        tokens["margin_over_best_baseline"] = {"baseline": best,
                                               "points": 100 * (tokens["accuracy"] - tokens["baselines"][best]["accuracy"])}
    metrics = {
        "stage": "06_evaluate", "config_hash": ev.fp_hash, "checkpoint": str(ev.ckpt), "tokens": str(ev.tokens),
        "db": str(cfg.db), "split": cfg.split, "kind": v.kind, "interleaved": v.interleaved, "n_struct": v.n_struct,
        "n_proteins": n, "n_residues": int(lengths.sum()), "n_skipped": len(skipped_all),
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
    if v.kind == "3di":
        metrics["confusion_matrix"] = {"letters": v.struct_symbols, "rows": "true", "columns": "predicted",
                                       "counts": cm.tolist()}
    if decodable:
        metrics["structure"] = structure_metrics(C["trace_metrics"], lengths, C["n_breaks"])
    pngs = token_plots(out, lengths, acc, base_acc, tokens)
    if v.kind == "3di":
        pngs.append(confusion_plot(out / "confusion_3di.png", cm, v.struct_symbols))
    if decodable:
        metrics["pdb_files"] = len(pdbs)
        pngs += structure_plots(out, lengths, C["trace_metrics"], _PartColumns(ev, paths, sizes), cfg.n_pictures)
    metrics["pngs"] = [p.name for p in pngs]
    from .report import write_report

    write_report(out / "metrics.json", metrics)
    log.info("finalize: %s", summary_line(metrics))
    return metrics


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
    s["note"] = STRUCTURE_NOTE
    return s


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
    mode = "sampled" if m.get("decoding", {}).get("do_sample") else "greedy"
    s = ("[RANDOM WEIGHTS upstream: see metrics.json WARNING] " if m.get("WARNING") else "") + (
         f"{m['n_proteins']} proteins, free-running ({mode}) accuracy {t['accuracy']:.3f} (teacher-forced "
         f"{t['teacher_forced_accuracy']:.3f}, perplexity {t['perplexity']:.2f}); baselines "
         + ", ".join(f"{b} {d['accuracy']:.3f}" for b, d in t["baselines"].items()))
    if "margin_over_best_baseline" in t:
        g = t["margin_over_best_baseline"]
        s += (f"; beats baselines: {'yes' if t['beats_all_baselines'] else 'no'} "
              f"({g['points']:+.1f} points vs {g['baseline']})")
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
