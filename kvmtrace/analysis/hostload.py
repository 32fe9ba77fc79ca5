"""How loaded the host was while a recording was made, read back from its
``host_load`` notes (written by kvmtrace.collectors.hostload), and whether two
recordings ran under comparable load (diff says so when they did not: fault
service times and event rates depend on it).
"""

from __future__ import annotations

import json


def host_load(recording) -> dict | None:
    """What a recording says about host load, for analysis and diff.

    ``recording``: a ``kvmtrace.recording.reader.Recording`` (or its ``notes``
    DataFrame). Returns None for a recording made before host load was
    recorded, else::

        {"complete": bool,            # False: cut before the end note (SIGKILL)
         "cpus": int,
         "start": {"load1", "load5", "load15", "running", "tasks"},
         "end":   {... the same at the end} or None,
         "load1":      {"min", "max"},               # 1-min load average seen
         "steal_pct":  {"min", "max", "run"},        # per flush interval; whole run
         "iowait_pct": {"min", "max", "run"},
         "busy_pct":   {"min", "max", "run"},
         "intervals": int, "seconds": float}

    Percentages are of all CPUs' time; min / max are over intervals of about
    a second (the flush interval when longer): ``intervals`` of them; ``run``
    is the share over the whole recording. A recording shorter than half a
    second has no intervals: only ``run``."""
    notes = recording["notes"] if not hasattr(recording, "columns") else recording
    rows = notes[notes["key"] == "host_load"]
    if not len(rows):
        return None
    start, end = None, None
    for v in rows["value"]:
        try:
            d = json.loads(v)
        except ValueError:
            continue
        if not isinstance(d, dict):
            continue
        if not isinstance(d.get("loadavg"), (dict, type(None))):
            d["loadavg"] = None  # a damaged note: the rest may still say something
        if d.get("phase") == "start":
            start = d
        elif d.get("phase") == "end":
            end = d
    out = {"complete": end is not None,
           "cpus": (end or start or {}).get("cpus"),
           "start": (start or {}).get("loadavg"),
           "end": (end or {}).get("loadavg")}
    if end:
        out.update({k: v for k, v in end.items() if k not in ("phase", "cpus", "loadavg")})
    elif start and start.get("loadavg") and _number(start["loadavg"].get("load1")):
        l1 = start["loadavg"]["load1"]
        out["load1"] = {"min": l1, "max": l1}
    return out


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _get(load: dict | None, key: str, part: str):
    """load[key][part] when it is a number, else None (notes may be damaged)."""
    v = (load or {}).get(key)
    v = v.get(part) if isinstance(v, dict) else None
    return v if _number(v) else None


# Two recordings ran under different load when the share of busy CPU time over
# the whole run differs by this many percentage points, or CPU steal by this
# many: service times measured then are not comparable as they stand.
BUSY_POINTS = 25.0
STEAL_POINTS = 5.0


def load_difference(base: dict | None, new: dict | None) -> str | None:
    """One sentence when ``base`` and ``new`` (host_load results) ran under
    different host load, else None (also when either is unknown)."""
    if not base or not new:
        return None
    parts = []
    for key, points, name in (("busy_pct", BUSY_POINTS, "CPU busy"),
                              ("steal_pct", STEAL_POINTS, "CPU steal")):
        b, n = _get(base, key, "run"), _get(new, key, "run")
        if b is not None and n is not None and abs(n - b) >= points:
            parts.append(f"{name} {b:.0f}% -> {n:.0f}%")
    if not parts:
        return None
    l1 = [_get(x, "load1", "max") for x in (base, new)]
    if None not in l1:
        parts.append(f"load average up to {l1[0]:.1f} -> {l1[1]:.1f}")
    return ("the two recordings ran under different host load (" + ", ".join(parts)
            + "): service-time changes may come from the host, not from KVM")
