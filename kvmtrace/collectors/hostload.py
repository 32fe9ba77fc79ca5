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
    on the development host)."""

    def __init__(self):
        self.first = self.prev = cpu_times()
        self.t0 = self.t_prev = time.monotonic()
        la = loadavg()
        self.start = la
        self.samples = 0
        self.range: dict[str, list[float]] = {}  # name -> [min, max]
        if la:
            self._see("load1", la["load1"])

    def _see(self, name: str, v: float):
        r = self.range.get(name)
        if r is None:
            self.range[name] = [v, v]
        else:
            r[0], r[1] = min(r[0], v), max(r[1], v)

    def sample(self, final: bool = False):
        """One interval: the load average now, the CPU shares since the last
        sample. The last interval of a run counts in min / max only when at
        least half as long as the others; it always counts in the whole run."""
        t = time.monotonic()
        if not final and t - self.t_prev < MIN_INTERVAL_S:
            return None
        la = loadavg()
        if la:
            self._see("load1", la["load1"])
        now = cpu_times()
        if now and self.prev:
            sh = _shares(self.prev, now)
            if sh:  # an interval shorter than a clock tick has no shares
                if t - self.t_prev >= MIN_INTERVAL_S / 2:
                    self.samples += 1
                    for k, v in sh.items():
                        self._see(k, v)
                self.prev, self.t_prev = now, t
        return la

    def start_note(self) -> dict:
        return {"phase": "start", "cpus": os.cpu_count(), "loadavg": self.start}

    def end_note(self) -> dict:
        la = self.sample(final=True)
        whole = _shares(self.first, self.prev) if self.first and self.prev else None
        r = {k: {"min": round(v[0], 2), "max": round(v[1], 2)} for k, v in self.range.items()}
        for k, v in (whole or {}).items():
            r.setdefault(k, {})["run"] = round(v, 2)
        return {"phase": "end", "cpus": os.cpu_count(), "loadavg": la, "intervals": self.samples,
                "seconds": round(time.monotonic() - self.t0, 3), **r}
