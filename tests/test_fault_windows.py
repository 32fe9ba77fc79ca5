"""The report's windowed pass (analysis/windows.py, faultstats.py) gives what
the whole-recording pass gives, on real x86 recordings (this host's shadow
MMU, the emulated AMD host's TDP MMU with kprobes, vfio), whatever the window;
and the numpy as-of join equals pandas' merge_asof."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvmtrace.analysis import faults, faultstats, summary, windows
from kvmtrace.analysis.model import build

FIX = Path(__file__).parent / "fixtures"
X86 = [FIX / "x86-pvm-demo.kvt", *sorted((FIX / "x86-tdp").glob("*.kvt")),
       *sorted((FIX / "x86-vfio").glob("*.kvt"))]


@pytest.mark.parametrize("forward", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_asof_index_is_merge_asof(seed, forward):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(0, 400)), int(rng.integers(0, 400))
    lt = np.sort(rng.integers(0, 300, n)).astype(np.int64)  # ties on purpose
    rt = rng.integers(0, 300, m).astype(np.int64)
    ltid, rtid = rng.integers(0, 5, n).astype(np.int64), rng.integers(0, 5, m).astype(np.int64)
    # per thread the right side is in time order, as a ring gives it
    o = np.lexsort((rt, rtid))
    rt, rtid = rt[o], rtid[o]
    got = faults.asof_index(ltid, lt, rtid, rt, forward)
    left = pd.DataFrame({"t": lt, "tid": ltid, "i": np.arange(n)})
    right = pd.DataFrame({"t": rt, "tid": rtid, "j": np.arange(m)}).sort_values("t",
                                                                                kind="stable")
    want = pd.merge_asof(left, right, on="t", by="tid",
                         direction="forward" if forward else "backward",
                         allow_exact_matches=True).sort_values("i")["j"]
    got_t = np.where(got >= 0, rt[np.maximum(got, 0)] if m else 0, -1)
    want_t = np.where(want.notna(), rt[want.fillna(0).astype(int)] if m else 0, -1)
    # the same time on the same thread (equal times may name either of two equal rows)
    assert (got_t == want_t).all()
    assert (rtid[got[got >= 0]] == ltid[got >= 0]).all()


def test_thread_neighbours_stay_integers():
    ts = np.array([1, 2, 2**62, 2**62 + 1, 2**62 + 3], dtype=np.int64)
    tid = np.array([1, 2, 1, 2, 1], dtype=np.int64)
    prev, has_prev, nxt, has_next = faults.thread_neighbours(tid, ts)
    assert has_prev.tolist() == [False, False, True, True, True]
    assert prev[2:].tolist() == [1, 2, 2**62]
    assert nxt[:2].tolist() == [2**62, 2**62 + 1] and has_next.tolist() == [True, True, True,
                                                                              False, False]


def _views(m):
    cols = ["pid", "proc", "vm_fd", "slot", "version", "faults", "lost", "verdict",
            "vma_memtype", "spte_memtype", "reason"]
    return {"verdicts": m.verdicts[cols], "ranges": m.ranges, "errors": m.errors,
            "summary": summary.slot_summary(m),
            "prefetch": m.prefetch.sort_values(["ts", "tid", "gfn"]).reset_index(drop=True)}


@pytest.mark.parametrize("path", X86, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("window", [1, 37, None])
def test_windowed_report_equals_whole(path, window, monkeypatch):
    if window:
        monkeypatch.setattr(windows, "WINDOW_REQUESTS", window)
    whole, lean = build(path), build(path, keep_raw=False, lean=True)
    assert len(lean.faults) == 0 and len(whole.faults)
    for name, w in _views(whole).items():
        pd.testing.assert_frame_equal(_views(lean)[name], w, obj=name)
    assert lean.fault_stats.outside == int((whole.faults["slot_row"] < 0).sum())
    assert int(lean.fault_stats.classes["faults"].sum()) == len(whole.faults)
    assert lean.event_counts == whole.event_counts


def test_stats_merge_is_exact():
    """Aggregates of halves merged = aggregates of the whole."""
    m = build(FIX / "x86-pvm-demo.kvt")
    f = m.faults
    fail = pd.DataFrame({"tid": f["tid"].iloc[[10, -1]].to_numpy(),
                         "ts": f["ts"].iloc[[10, -1]].to_numpy()})
    whole = faultstats.of_faults(f, fail)
    half = len(f) // 2
    merged = faultstats.merge([faultstats.of_faults(f.iloc[:half], fail),
                               faultstats.of_faults(f.iloc[half:], fail)])
    key = faultstats.CLASS_KEYS
    pd.testing.assert_frame_equal(
        merged.classes.sort_values(key).reset_index(drop=True),
        whole.classes.sort_values(key).reset_index(drop=True))
    pd.testing.assert_frame_equal(merged.before_failure, whole.before_failure)
    pd.testing.assert_frame_equal(merged.pages.astype({c: str for c in ("vma_memtype",
                                                                          "spte_memtype",
                                                                          "verdict")}),
                                  whole.pages.astype({c: str for c in ("vma_memtype",
                                                                       "spte_memtype",
                                                                       "verdict")}))


@pytest.mark.parametrize("seed", range(4))
def test_median_from_counts_is_pandas_median(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    row = rng.integers(0, 5, n)
    val = rng.integers(0, 50 if seed % 2 else 2**40, n)  # many repeats / none
    want = pd.Series(val).groupby(row).median()
    sv = pd.DataFrame({"slot_row": row, "service_ns": val, "count": np.ones(n, np.int64)})
    got = faultstats.median_per_slot(faultstats._counted(sv))
    pd.testing.assert_series_equal(got, want, check_names=False, check_index_type=False)
