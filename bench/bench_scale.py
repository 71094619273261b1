#!/usr/bin/env python
"""Memory and speed of the pipeline at millions of entries (AFDB50: 66.7M): peak RSS per stage against
the number of entries N, fitted as bytes per entry, and each stage's throughput.

    python bench/bench_scale.py --entries 1000000 5000000 20000000     # ~1.5 h on 2 cores; ~37 GB scratch at 20M
    python bench/bench_scale.py --entries 2000 --train-seconds 5        # a minute (tests/test_bench_scale.py)

For each N, in a scratch directory (``--work``, deleted afterwards unless ``--keep``; ``--resume``
continues a killed bench where it stopped, stage by stage):

0. ``build``  a real-format Foldseek DB of N entries (`bench/scale_db.py`: mutated 30-60-residue
   windows of the ~1,100 chains of ../shared/data/foldseek_db, written with vectorised numpy);
1. ``01``     01_prepare_db.py on it (the Foldseek path: DB shards of ``--items-per-shard`` entries,
   finalize, the MMseqs2 split with ``--mmseqs-mode linclust``);
2. ``04``     04_tokenize.py --tokens 3di;
3. ``05``     05_train_lm.py, tiny preset on the CPU: dataset, epoch plan, then ``--train-seconds`` of
   batches through the model, then SIGUSR1 (the stage saves a checkpoint and exits 124, as on SLURM);
4. ``06``     stage 06's reading of the DB for evaluation: `Evaluation` (checkpoint, token and DB
   indexes, work units) and `Evaluation.unit_rows` over every test protein, each DB shard read once;
   no generation (that costs the same per protein at any N, and is benched by bench_generate.py).

Every stage runs as its own process through ``--measure`` (the CLI under runpy), which records the
peak RSS of the stage process itself (VmHWM at its exit; anonymous and file-backed pages sampled every
0.2 s) and, separately, of its children (MMseqs2 for stage 01, DataLoader workers for stage 05). The
goal (issue 14): per process, memory flat in N or growing by at most ~100 bytes per entry. The
reference of the fit is that goal line, 100 B/entry, and each slope is printed as a ratio to it, with
the extrapolation to 66.7M.
Timings on a shared machine are wall-clock and noisy; CPU seconds are printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve()
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
AFDB50 = 66_700_000
GOAL_BYTES_PER_ENTRY = 100.0
DISK_BYTES_PER_ENTRY = 1900     # Foldseek DB + protein DB + 3Di token shards, 30-60 residues (measured, + margin)
STAGES = ("build", "01", "04", "05", "05ref", "06")


# ----------------------------------------------------------------------------- the stage wrapper
def _status(pid="self") -> dict:
    """kB fields of /proc/PID/status (VmHWM, VmRSS, RssAnon, RssFile, RssShmem); {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")}


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class PeakSampler:
    """Peaks of this process's anonymous and file-backed resident memory, and of its descendants'
    (MMseqs2, loader workers), sampled every `interval` s. (ru_maxrss cannot be used: Linux carries
    the RSS of the forked parent over into a child's maxrss, and children of a big process inherit it.)"""

    def __init__(self, interval: float = 0.2):
        import threading

        self.anon = self.file = self.children = self.children_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(interval)

    def sample(self) -> None:
        me = _status()
        self.anon = max(self.anon, me.get("RssAnon", 0))
        self.file = max(self.file, me.get("RssFile", 0) + me.get("RssShmem", 0))
        kids = [_status(p) for p in _descendants(os.getpid())]
        self.children = max([self.children] + [k.get("VmHWM", 0) for k in kids])
        self.children_sum = max(self.children_sum, sum(k.get("VmRSS", 0) for k in kids))

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.sample()
        return {"rss_self": _status().get("VmHWM", 0) * 1024, "anon_self": self.anon * 1024,
                "file_self": self.file * 1024, "rss_children": self.children * 1024,
                "rss_children_sum": self.children_sum * 1024}


def measure_main(result: str, argv: list[str]) -> None:
    """Run one CLI (``argv[0]`` a script) in this process; write its exit status, memory peaks (own:
    exact VmHWM, sampled anonymous / file-backed; descendants: sampled) and CPU seconds to `result`."""
    import runpy

    sys.argv = list(argv)
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))   # as `python SCRIPT` does: that tree's tokenfold
    code, t0, peaks = 0, time.time(), PeakSampler()
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - recorded, then re-raised
        code = 1
        raise
    finally:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        Path(result).write_text(json.dumps({
            "rc": code, "seconds": time.time() - t0, **peaks.stop(),
            "cpu_self": me.ru_utime + me.ru_stime, "cpu_children": kids.ru_utime + kids.ru_stime}))
    sys.exit(code)


def run_stage(work: Path, name: str, argv: list[str], stop_after=None) -> dict:
    """One stage as a subprocess through --measure; `stop_after(proc)` may signal it while it runs."""
    res, log = work / f"{name}.rusage.json", work / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENFOLD_PROGRESS="0")
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(BENCH), "--measure", str(res), "--", *map(str, argv)],
                             cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        if stop_after is not None:
            stop_after(p)
        p.wait()
    r = json.loads(res.read_text()) if res.exists() else {"rc": p.returncode}
    r["log"] = str(log)
    if r["rc"] not in (0, 124):
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"stage {name} failed (exit {r['rc']}): " + " | ".join(tail))
    return r


# ----------------------------------------------------------------------------- stage 06's DB reading
def read_eval_main(a) -> None:
    """The DB-reading side of stage 06 (no model): every test protein's tokens, true C-alpha and
    checks, unit by unit, as `Evaluation.run_units` reads them."""
    from tokenfold.eval_config import EvalConfig
    from tokenfold.evaluate import Evaluation

    t0 = time.time()
    ev = Evaluation(EvalConfig(checkpoint=a.checkpoint, out=a.out, tokens=a.tokens, db=a.db))
    todo = ev.todo_units()
    t1 = time.time()
    rows = skipped = 0
    sample = ev.db.shards[todo[0][0]] if todo else None   # one DB shard load on its own, timed
    if sample is not None:
        sample.arrays
        sample.release()
    load = time.time() - t1
    shards = len({k for k, _, _ in todo})
    t2 = time.time()
    for _, _, r, s in ev.unit_rows(todo):
        rows, skipped = rows + len(r), skipped + len(s)
    read = time.time() - t2
    Path(a.result).write_text(json.dumps({
        "proteins": rows, "skipped": skipped, "units": len(todo), "db_shards": len(ev.db.shards),
        "seconds_setup": t1 - t0, "seconds_read": read, "seconds_per_shard_load": load,
        # the code before issue 14 loaded the whole DB shard again for every unit (chunk of 512 proteins)
        "estimated_seconds_read_one_load_per_unit": read + load * (len(todo) - shards)}))


# ----------------------------------------------------------------------------- one N
def _train_timer(run_dir: Path, seconds: float, seen: dict, limit: float = 7200):
    """Send SIGUSR1 `seconds` after the run's first train line (metrics.jsonl); the stage then saves
    and exits 124. Gives up (SIGTERM) after `limit` seconds. ``seen["first_train_line_s"]``: when the
    first train line appeared (start-up: imports, dataset, epoch plan, model, first validation and steps)."""
    def stop(p: subprocess.Popen):
        t0, first = time.time(), None
        while p.poll() is None and time.time() - t0 < limit:
            m = run_dir / "metrics.jsonl"
            if first is None and m.exists() and '"split": "train"' in m.read_text():
                first = time.time()
                seen["first_train_line_s"] = first - t0
            if first is not None and time.time() - first >= seconds:
                p.send_signal(signal.SIGUSR1)
                return
            time.sleep(0.5)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return stop


def _mmseqs_timed(work: Path) -> tuple[str | None, Path]:
    """A stand-in `mmseqs` for stage 01's --mmseqs that runs the real one under /usr/bin/time, which
    records its wall time, CPU seconds and peak RSS (a small parent, so the peak is MMseqs2's own)."""
    exe, log = shutil.which("mmseqs"), work / "mmseqs_time.jsonl"
    if exe is None or not Path("/usr/bin/time").exists():
        return None, log
    script = work / "mmseqs_timed.sh"
    fmt = '{"wall_s": %e, "user_s": %U, "sys_s": %S, "maxrss_kb": %M, "exit": %x}'
    script.write_text(f"#!/bin/sh\nexec /usr/bin/time -a -o '{log}' -f '{fmt}' '{exe}' \"$@\"\n")
    script.chmod(0o755)
    return str(script), log


def _clustering_seconds(log: Path) -> float | None:
    """Seconds between stage 01's 'clustering N sequences' line and its 'finalized' line (log times)."""
    stamps = {}
    for line in log.read_text().splitlines():
        for key in ("clustering", "finalized"):
            if f"tokenfold.split: {key}" in line or f"tokenfold.db_finalize: {key}" in line:
                h, m, s = map(int, line[:8].split(":"))
                stamps[key] = h * 3600 + m * 60 + s
    if len(stamps) < 2:
        return None
    return (stamps["finalized"] - stamps["clustering"]) % 86400


def _finish_01(work: Path, n: int, r: dict) -> dict:
    db, mmseqs_log = work / "db", work / "mmseqs_time.jsonl"
    man = json.loads((db / "manifest.json").read_text())
    rep = json.loads((db / "report.json").read_text())
    return dict(rate=n / r["seconds"], unit="entries/s", split=man["split_sizes"], split_method=man["split"]["detail"],
                clusters=rep["split"]["clusters"], clustering_seconds=_clustering_seconds(Path(r["log"])),
                db_bytes=_du(db),
                mmseqs=[json.loads(x) for x in mmseqs_log.read_text().splitlines()] if mmseqs_log.exists() else None)


def _finish_04(work: Path, n: int, r: dict) -> dict:
    mf = json.loads((work / "tok" / "manifest.json").read_text())
    n_ex = sum(s["n_examples"] for s in mf["splits"].values())
    return dict(rate=n_ex / r["seconds"], unit="examples/s", examples=n_ex, token_bytes=_du(work / "tok"),
                train_examples=mf["splits"]["train"]["n_examples"])


def _finish_05(run: Path, name: str):
    def finish(work: Path, n: int, r: dict) -> dict:
        from tokenfold.checkpoint import latest_checkpoint

        if latest_checkpoint(run) is None:
            raise FileNotFoundError(f"no checkpoint in {run}")
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        m = re.search(r"read in ([\d.]+) s; epoch plan of (\d+) micro-batches in ([\d.]+) s", Path(r["log"]).read_text())
        tps = sorted(x["tokens_per_s"] for x in recs[1:] or recs)
        seen = work / f"{name}.seen.json"
        return dict(rate=tps[len(tps) // 2] if tps else 0.0, unit="useful-tok/s (median)",
                    steps=recs[-1]["step"] if recs else 0, dataset_seconds=float(m.group(1)) if m else None,
                    plan_microbatches=int(m.group(2)) if m else None, data_setup_seconds=float(m.group(3)) if m else None,
                    **(json.loads(seen.read_text()) if seen.exists() else {}))
    return finish


def _finish_06(work: Path, n: int, r: dict) -> dict:
    x = json.loads((work / "06.read.json").read_text())
    return dict(x, rate=(x["proteins"] + x["skipped"]) / max(x["seconds_read"], 1e-9), unit="proteins/s (read)")


class Stages:
    """The stages of one N in its scratch `work`, in order. With ``resume``, a stage whose earlier run
    there completed (its measurement saved, its outputs readable) is not run again; from the first
    stage that is run on, every later one runs too, on a clean output directory, so each measurement is
    of one whole, uninterrupted run of that stage."""

    def __init__(self, work: Path, n: int, resume: bool):
        self.work, self.n, self.fresh = work, n, not resume

    def reuse(self, name: str, finish) -> dict | None:
        res = self.work / f"{name}.rusage.json"
        if self.fresh or not res.exists():
            return None
        r = dict(json.loads(res.read_text()), log=str(self.work / f"{name}.log"))
        if r["rc"] not in (0, 124):
            return None
        try:
            r.update(finish(self.work, self.n, r))
        except (OSError, KeyError, ValueError, AttributeError):
            return None
        print(f"  N={self.n:,} stage {name}: resumed (its complete run in {self.work})", flush=True)
        return dict(r, resumed=True)

    def run(self, name: str, outs: list[Path], argv: list, finish, stop_after=None) -> dict:
        r = self.reuse(name, finish)
        if r is not None:
            return r
        self.fresh = True
        for out in outs:
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink(missing_ok=True)
        r = run_stage(self.work, name, argv, stop_after=stop_after)
        r.update(finish(self.work, self.n, r))
        _say(self.n, name, r)
        return r


def _train(stages: Stages, tree: Path, tok: Path, run: Path, a, name: str, workers: bool = True) -> dict:
    """Stage 05 of code tree `tree` on the token shards `tok` for a.train_seconds of batches."""
    train = [tree / "05_train_lm.py", "--tokens", tok, "--out", run, "--preset", "tiny", "--device", "cpu",
             "--threads", "1", "--max-tokens", a.max_tokens, "--max-steps", 1_000_000, "--eval-every", 0,
             "--save-every", 0, "--log-every", 5, "--eval-max-examples", 100]
    if workers and a.data_workers is not None:
        train += ["--data-workers", a.data_workers]
    seen: dict = {}
    timer = _train_timer(run, a.train_seconds, seen)

    def stop_after(p):
        timer(p)
        (stages.work / f"{name}.seen.json").write_text(json.dumps(seen))
    return stages.run(name, [run], train, _finish_05(run, name), stop_after=stop_after)


def bench_one(n: int, work: Path, a) -> dict:
    import scale_db

    work.mkdir(parents=True, exist_ok=True)
    out = {"entries": n, "stages": {}}
    st = out["stages"]
    stages = Stages(work, n, a.resume)
    built = work / "build.json"
    fsdb = work / "fsdb" / "scale"
    if a.resume and built.exists():
        st["build"] = dict(json.loads(built.read_text()), resumed=True)
    else:
        stages.fresh = True
        t, c = time.time(), time.process_time()
        info = scale_db.build(fsdb, n, a.shared_db, seed=a.seed, block=a.block)
        st["build"] = {"seconds": time.time() - t, "cpu": time.process_time() - c, "rate": n / (time.time() - t),
                       "unit": "entries/s", "bytes": info["bytes"], "residues": info["residues"],
                       "rss_self": None, "anon_self": None, "file_self": None, "rss_children": None}
        built.write_text(json.dumps(st["build"]))
        print(f"  N={n:,}: Foldseek DB {info['bytes'] / 2**30:.2f} GiB in {st['build']['seconds']:.0f} s", flush=True)

    db, tok, run, ev = work / "db", work / "tok", work / "run", work / "eval"
    mmseqs, mmseqs_log = _mmseqs_timed(work)
    st["01"] = stages.run("01", [db, mmseqs_log], [ROOT / "01_prepare_db.py", "--foldseek-db", fsdb, "--out", db,
                                     "--items-per-shard", a.items_per_shard, "--mmseqs-mode", a.mmseqs_mode,
                                     *(["--mmseqs", mmseqs] if mmseqs else []),
                                     *(["--mmseqs-threads", a.mmseqs_threads] if a.mmseqs_threads else [])], _finish_01)
    st["04"] = stages.run("04", [tok], [ROOT / "04_tokenize.py", "--db", db, "--tokens", "3di", "--out", tok], _finish_04)
    st["05"] = _train(stages, ROOT, tok, run, a, "05")
    if a.reference:
        st["05ref"] = _train(stages, Path(a.reference), tok, work / "run_ref", a, "05ref", workers=False)
    from tokenfold.checkpoint import latest_checkpoint

    st["06"] = stages.run("06", [ev], [BENCH, "--read-eval", "--checkpoint", latest_checkpoint(run), "--tokens", tok,
                                     "--db", db, "--out", ev, "--result", work / "06.read.json"], _finish_06)
    if st["06"]["skipped"]:
        raise RuntimeError(f"stage 06 reading skipped {st['06']['skipped']} proteins (see {st['06']['log']})")
    return out


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MB"


def _say(n: int, name: str, r: dict) -> None:
    print(f"  N={n:,} stage {name}: {r['seconds']:.0f} s, {r['rate']:,.0f} {r['unit']}, peak RSS {_mb(r['rss_self'])}"
          f" (anonymous {_mb(r['anon_self'])}, file-backed {_mb(r['file_self'])}; children {_mb(r['rss_children'])})",
          flush=True)


# ----------------------------------------------------------------------------- fit and report
def fit(runs: list[dict]) -> dict:
    """Peak RSS = a + b * N per stage process (least squares over the N run), b in bytes per entry."""
    import numpy as np

    fits = {}
    for s in STAGES[1:]:
        for who in ("rss_self", "anon_self", "rss_children"):
            pts = [(r["entries"], r["stages"][s][who]) for r in runs if r["stages"].get(s, {}).get(who)]
            if len(pts) < 2:
                continue
            x, y = np.array(pts, dtype=np.float64).T
            b, a = np.polyfit(x, y, 1)
            fits[f"{s} {dict(rss_self='rss', anon_self='anon', rss_children='children')[who]}"] = {"bytes_per_entry": float(b), "intercept_bytes": float(a),
                                       "at_66.7M_bytes": float(a + b * AFDB50), "goal_ratio": float(b / GOAL_BYTES_PER_ENTRY)}
    return fits


def report(runs: list[dict], fits: dict) -> str:
    lines = [f"{'N':>12}  {'stage':5} {'wall s':>8} {'CPU s':>8} {'throughput':>26}  {'peak RSS':>10} {'anon':>10} "
             f"{'file':>10} {'children':>10}"]
    for r in runs:
        for s in STAGES:
            x = r["stages"].get(s)
            if x is None:
                continue
            cpu = x.get("cpu", (x.get("cpu_self") or 0) + (x.get("cpu_children") or 0))
            rate = f"{x['rate']:,.0f} {x['unit'].split(' ')[0]}"
            lines.append(f"{r['entries']:>12,}  {s:5} {x['seconds']:8.0f} {cpu:8.0f} {rate:>26}  "
                         f"{_mb(x['rss_self']):>10} {_mb(x['anon_self']):>10} {_mb(x['file_self']):>10} "
                         f"{_mb(x['rss_children']):>10}")
    for r in runs:
        st, n = r["stages"], r["entries"]
        mm = (st.get("01") or {}).get("mmseqs") or []
        if mm:
            m = mm[-1]
            lines.append(f"N={n:,}: MMseqs2 {st['01']['split_method']}: {m['wall_s']:.0f} s wall, "
                         f"{m['user_s'] + m['sys_s']:.0f} CPU s, peak RSS {m['maxrss_kb'] / 2**20:.2f} GiB; "
                         f"clusters {sum(st['01']['clusters'].values()):,}")
        if "05ref" in st:
            new, ref = st["05"], st["05ref"]
            lines.append(f"N={n:,}: stage 05 vs the reference code: anonymous peak {_mb(new['anon_self'])} vs "
                         f"{_mb(ref['anon_self'])} ({new['anon_self'] / ref['anon_self']:.2f}x), first train line after "
                         f"{new.get('first_train_line_s', 0):.0f} s vs {ref.get('first_train_line_s', 0):.0f} s")
        if "06" in st:
            x = st["06"]
            lines.append(f"N={n:,}: stage 06 reading {x['proteins']:,} test proteins in {x['units']} units: "
                         f"{x['seconds_read']:.0f} s; one DB shard load {x['seconds_per_shard_load']:.1f} s, so one "
                         f"load per unit (the code before) ~{x['estimated_seconds_read_one_load_per_unit']:.0f} s")
    if fits:
        lines.append("")
        lines.append(f"peak memory = a + b*N per process (reference: the goal, {GOAL_BYTES_PER_ENTRY:.0f} bytes/entry); "
                     "self = VmHWM (all resident pages, memmapped files included), anon = anonymous only")
        for k, f in fits.items():
            lines.append(f"  {k:14} b = {f['bytes_per_entry']:8.1f} B/entry ({f['goal_ratio']:.2f}x the goal), "
                         f"a = {_mb(f['intercept_bytes'])}; at 66.7M: {f['at_66.7M_bytes'] / 2**30:.1f} GiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000],
                   help="Ns to run, each from scratch (default 1M 5M 20M)")
    p.add_argument("--work", default=f"/tmp/{os.environ.get('USER', 'tokenfold')}/bench_scale",
                   help="scratch directory (one subdirectory per N, deleted after it unless --keep)")
    p.add_argument("--json", default=None, help="results file (default WORK/bench_scale.json)")
    p.add_argument("--shared-db", default=str(ROOT.parent / "shared" / "data" / "foldseek_db" / "shared"),
                   help="the Foldseek DB whose chains are mutated (default ../shared/data/foldseek_db/shared)")
    p.add_argument("--items-per-shard", type=int, default=250_000, help="stage 01 DB shard size (afdb50.env's)")
    p.add_argument("--mmseqs-mode", default="linclust", choices=("linclust", "cluster"))
    p.add_argument("--mmseqs-threads", type=int, default=None, help="stage 01 MMseqs2 threads (default: its own)")
    p.add_argument("--train-seconds", type=float, default=60.0, help="stage 05: seconds of training batches")
    p.add_argument("--max-tokens", type=int, default=8192, help="stage 05 micro-batch budget")
    p.add_argument("--data-workers", type=int, default=None, help="stage 05 --data-workers (default: its own)")
    p.add_argument("--block", type=int, default=250_000, help="entries generated per block of the DB build")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep each N's scratch data")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed bench: keep each N's scratch (as --keep), reuse the N already complete in "
                        "the results file, and in an N's scratch every stage whose earlier run completed; the stages "
                        "from the first incomplete one on run again from scratch")
    p.add_argument("--reference", default=None, metavar="TREE",
                   help="also run the stage 05 of this older checkout (e.g. `git archive 4b3cbb9`, before issue 14) "
                        "on the same token shards: the named reference for stage 05's memory and start-up")
    # internal modes: one stage process
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--read-eval", action="store_true", help=argparse.SUPPRESS)
    for name in ("checkpoint", "tokens", "db", "out", "result"):
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        measure_main(argv[1], argv[3:])   # --measure RESULT -- SCRIPT ARGS...
    a = p.parse_args(argv)
    if a.read_eval:
        read_eval_main(a)
        return 0

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(a.json or work / "bench_scale.json")
    done = {}
    if a.resume and out_json.exists():
        done = {r["entries"]: r for r in json.loads(out_json.read_text())["runs"]}
    # scratch still to be written: the largest N, or with kept scratch every N less what is there already
    todo = [DISK_BYTES_PER_ENTRY * n - (_du(work / f"n{n}") if (work / f"n{n}").exists() else 0)
            for n in a.entries if n not in done]
    need = (sum(todo) if a.keep or a.resume else max(todo, default=0))
    free = shutil.disk_usage(work).free
    if need > free:
        print(f"error: N = {', '.join(f'{n:,}' for n in a.entries)} need about {need / 2**30:.0f} GiB more "
              f"scratch under {work}, {free / 2**30:.0f} GiB free", file=sys.stderr)
        return 1
    runs = []
    print(f"bench_scale: N = {', '.join(f'{n:,}' for n in a.entries)}; scratch {work}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    for n in sorted(a.entries):
        d = work / f"n{n}"
        if n in done:
            print(f"  N={n:,}: complete in {out_json}, not run again", flush=True)
            runs.append(done[n])
        else:
            if not a.resume:
                shutil.rmtree(d, ignore_errors=True)
            try:
                runs.append(bench_one(n, d, a))
            finally:
                if not (a.keep or a.resume):
                    shutil.rmtree(d, ignore_errors=True)
        fits = fit(runs)
        out_json.write_text(json.dumps({"runs": runs, "fits": fits, "goal_bytes_per_entry": GOAL_BYTES_PER_ENTRY,
                                        "cpus": os.cpu_count(), "args": vars(a)}, indent=1, default=str))
    print(report(runs, fit(runs)))
    print(f"results: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
