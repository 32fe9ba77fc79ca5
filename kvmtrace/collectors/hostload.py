"""How loaded the host was while recording: load average, CPU steal and iowait.

Fault service times and event rates depend on the host: a diff between a
recording made on an idle host and one made while something else ran (on this
development host, the arm64 emulator) should say so. record samples
/proc/loadavg and the aggregate ``cpu`` line of /proc/stat at start, at every
flush and at the end, and writes two ``host_load`` notes: one at start (the
load averages then) and one at the end with, over the run, the per-interval
minimum and maximum (intervals of about a second) and the whole-run share of
steal, iowait and busy time.
A recording cut by SIGKILL has only the first.
kvmtrace.analysis.hostload reads them back.
"""

from __future__ import annotations

import os
import time

from ..host.procfs import read_text

# /proc/stat cpu columns (proc(5)); guest / guest_nice are already in user / nice
_COLS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")




def loadavg() -> dict | None:
    text = read_text("/proc/loadavg")
    if not text:
        return None
    a = text.split()
    running, _, total = a[3].partition("/")
    return {"load1": float(a[0]), "load5": float(a[1]), "load15": float(a[2]),
            "running": int(running), "tasks": int(total)}


def cpu_times() -> dict | None:
    text = read_text("/proc/stat")
    if not text or not text.startswith("cpu "):
        return None
    vals = [int(x) for x in text.split("\n", 1)[0].split()[1:1 + len(_COLS)]]
    return dict(zip(_COLS, vals + [0] * (len(_COLS) - len(vals))))


def _shares(a: dict, b: dict) -> dict | None:
    """Percent of all CPU time between two /proc/stat samples."""
    d = {k: b[k] - a[k] for k in _COLS}
    total = sum(d.values())
    if total <= 0:
        return None
    return {"steal_pct": 100.0 * d["steal"] / total,
            "iowait_pct": 100.0 * d["iowait"] / total,
            "busy_pct": 100.0 * (total - d["idle"] - d["iowait"]) / total}


MIN_INTERVAL_S = 1.0  # shorter intervals are a few clock ticks: 0% or 100%


class HostLoad:
    """Samples taken by record; ``start_note`` / ``end_note`` are the notes.

    ``sample`` may be called as often as record flushes: it takes an interval
    only when ``MIN_INTERVAL_S`` has passed (about 160 us a sample, measured
    on the development host). The intervals' boundaries are kept (one small
    dict a second) so that the end can fold a short last interval into the
    one before it: the intervals then cover the whole run exactly and its
    share always lies between their minimum and maximum."""

    def __init__(self):
        self.first = cpu_times()
        self.t0 = time.monotonic()
        self.bounds = [(self.t0, self.first)] if self.first else []
        la = loadavg()
        self.start = la
        self.load1 = [la["load1"]] if la else []

    def sample(self, final: bool = False):
        """An interval boundary when ``MIN_INTERVAL_S`` has passed since the
        last one (or at the end): the load average now and /proc/stat."""
        t = time.monotonic()
        if not final and self.bounds and t - self.bounds[-1][0] < MIN_INTERVAL_S:
            return None
        la = loadavg()
        if la:
            self.load1.append(la["load1"])
        now = cpu_times()
        if now and self.bounds and _shares(self.bounds[-1][1], now):
            # (an interval shorter than a clock tick has no shares: skipped)
            self.bounds.append((t, now))
        return la

    def intervals(self) -> list[dict]:
        """The CPU shares per interval, a short last one folded into the one
        before (it is a few clock ticks: 0% or 100%)."""
        b = list(self.bounds)
        if len(b) >= 3 and b[-1][0] - b[-2][0] < MIN_INTERVAL_S / 2:
            del b[-2]
        return [sh for (_, x), (_, y) in zip(b, b[1:]) if (sh := _shares(x, y))]

    def start_note(self) -> dict:
        return {"phase": "start", "cpus": os.cpu_count(), "loadavg": self.start}

    def end_note(self) -> dict:
        la = self.sample(final=True)
        shares = self.intervals()
        r = {}
        if self.load1:
            r["load1"] = {"min": min(self.load1), "max": max(self.load1)}
        if len(self.bounds) >= 2:
            t_span = self.bounds[-1][0] - self.bounds[0][0]
            for k in shares[0] if shares else ():
                vals = [sh[k] for sh in shares]
                r[k] = {"min": round(min(vals), 2), "max": round(max(vals), 2)}
            whole = _shares(self.bounds[0][1], self.bounds[-1][1]) or {}
            for k, v in whole.items():
                r.setdefault(k, {})["run"] = round(v, 2)
            if t_span < MIN_INTERVAL_S / 2:  # too short for intervals: only the run
                shares = []
                for k in whole:
                    r[k] = {"run": r[k]["run"]}
        return {"phase": "end", "cpus": os.cpu_count(), "loadavg": la, "intervals": len(shares),
                "seconds": round(time.monotonic() - self.t0, 3), **r}
