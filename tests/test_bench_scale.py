"""bench/bench_scale.py: the generated Foldseek DB reads back as what it was made from, and the whole
bench runs end to end at N = 2,000 (so that it does not rot; its numbers are not checked here)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, need_shared

sys.path.insert(0, str(ROOT / "bench"))
import scale_db  # noqa: E402
from tokenfold.foldseek import FoldseekDB  # noqa: E402


def test_index_lines_match_python_formatting():
    rng = np.random.default_rng(0)
    keys, offs, lens = np.arange(500), rng.integers(0, 10**12, 500), rng.integers(0, 10**4, 500)
    offs[:3] = [0, 9, 10]
    want = "".join(f"{k}\t{o}\t{n}\n" for k, o, n in zip(keys, offs, lens)).encode()
    assert scale_db.index_bytes(keys, offs, lens) == want


def test_generated_db_is_windows_of_the_shared_chains(tmp_path):
    shared = need_shared("foldseek_db") / "shared"
    info = scale_db.build(tmp_path / "s", 300, shared, seed=1, mutate=0.0, block=128)   # 3 blocks
    db = FoldseekDB(tmp_path / "s")
    b = db.read_range(0, len(db))
    assert len(db) == 300 == info["entries"] and info["residues"] == int(b.lengths.sum())
    assert b.ids[:2] == [scale_db.entry_id(0), scale_db.entry_id(1)] and b.ids[-1] == "AF-X000000299-F1-model_v4"
    assert b.has_ss.all() and b.has_ca.all() and b.lengths.min() >= 30 and b.lengths.max() <= 60
    par = FoldseekDB(shared).read_range(0, len(FoldseekDB(shared)))
    starts = np.concatenate([[0], np.cumsum(b.lengths)])
    pstarts = np.concatenate([[0], np.cumsum(par.lengths)])
    paa = par.aa.tobytes()
    def matches(j, pos):
        L = int(b.lengths[j])
        k = int(np.searchsorted(pstarts, pos, side="right")) - 1
        # 3Di unmutated, C-alpha = Foldseek's truncated milli-Angstrom values plus at most 0.1 A of noise
        return (pos + L <= pstarts[k + 1] and b.ss[starts[j]:starts[j + 1]].tobytes() == par.ss[pos:pos + L].tobytes()
                and np.abs(b.ca[starts[j]:starts[j + 1]] - par.ca[pos:pos + L]).max() <= 0.1011)

    for j in range(0, 300, 7):
        aa, pos, found = b.aa[starts[j]:starts[j + 1]].tobytes(), -1, False
        while not found:      # unmutated: the window is in a parent chain (some chains occur twice)
            pos = paa.find(aa, pos + 1)
            assert pos >= 0, f"entry {j} is no window of a shared chain"
            found = matches(j, pos)


@pytest.mark.slow
def test_bench_runs_end_to_end_at_2000_entries_and_resumes(tmp_path):
    need_shared("foldseek_db")
    w = tmp_path / "w"

    def bench(*extra):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--entries", "2000",
                            "--work", str(w), "--items-per-shard", "1000", "--train-seconds", "1",
                            "--max-tokens", "4096", *extra], cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    out = bench()
    res = json.loads((w / "bench_scale.json").read_text())
    (run,) = res["runs"]
    st = run["stages"]
    assert run["entries"] == 2000 and list(st) == ["build", "01", "04", "05", "06"]
    for s in ("01", "04", "05", "06"):
        assert st[s]["rc"] in (0, 124) and st[s]["rss_self"] > 10 * 2**20 and st[s]["seconds"] > 0
        assert not st[s].get("resumed")
    assert st["01"]["split_method"].startswith("mmseqs easy-linclust") or "hash" in st["01"]["split_method"]
    assert st["04"]["examples"] == 2000 and st["05"]["rc"] == 124 and st["05"]["steps"] >= 1
    assert st["05"]["plan_microbatches"] >= 1 and st["06"]["proteins"] == st["01"]["split"]["test"] > 0
    assert "peak RSS" in out and not (w / "n2000").exists()   # scratch removed

    # --resume after a kill during stage 05: build, 01 and 04 are taken from the scratch, 05 and 06 run again
    bench("--resume", "--json", str(tmp_path / "first.json"))
    (w / "n2000" / "05.rusage.json").unlink()
    out = bench("--resume", "--json", str(tmp_path / "second.json"))
    first, second = (json.loads((tmp_path / f).read_text())["runs"][0]["stages"] for f in ("first.json", "second.json"))
    assert [s for s in second if second[s].get("resumed")] == ["build", "01", "04"]
    for s in ("build", "01", "04"):
        assert second[s] == dict(first[s], resumed=True)
    assert second["05"]["rc"] == 124 and second["05"]["steps"] >= 1 and second["06"]["proteins"] == first["06"]["proteins"]
    assert "stage 04: resumed" in out and "stage 05: resumed" not in out
    # ... and once the N is complete in the results file, it is not run again
    before = json.loads((tmp_path / "second.json").read_text())["runs"]
    out = bench("--resume", "--json", str(tmp_path / "second.json"))
    assert "complete in" in out and json.loads((tmp_path / "second.json").read_text())["runs"] == before
