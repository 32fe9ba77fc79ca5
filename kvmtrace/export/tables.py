"""The two tables an export adds to a recording's own (declared in
analysis/schema.py): ``recordings`` (one row: host, kernel, KVM flavour,
clock, completeness, versions) and ``processes`` (the VMM processes and the
name fleets group them by)."""

from __future__ import annotations

import json
import os

import pandas as pd

from .. import __version__
from ..analysis import identity, schema
from ..analysis.model import Model
from ..probes.events import EVENTS

__all__ = ["EXPORT_VERSION", "recordings_table", "processes_table", "vmm_label", "kvm_flavour"]

EXPORT_VERSION = 1  # of the dataset layout (paths, partitioning, added tables)
NO_VMM = "(no VMM seen)"

# tables whose rows name a VMM process (pid, proc)
_PROCESS_TABLES = ("ops", "slots", "faults", "prefetch", "invalidations", "exits", "errors",
                   "verdicts", "lost_where")


def _int(v):
    return v if type(v) is int else None


def _end_note(rec) -> dict:
    v = rec.last_note("end")
    return v if isinstance(v, dict) else {}


def kvm_flavour(meta: dict) -> str:
    kvm = meta.get("kvm") or {}
    return "/".join(str(kvm.get(k) or "unknown") for k in ("vendor", "mmu"))


def recordings_table(model: Model, path, header_sha: str) -> pd.DataFrame:
    """The ``recordings`` row of one recording."""
    rec, meta = model.recording, model.meta
    end = _end_note(rec)
    clock = meta.get("clock") or {}
    start = _int(clock.get("monotonic_ns"))
    stop = _int((end.get("clock") or {}).get("monotonic_ns")) \
        if isinstance(end.get("clock"), dict) else None
    events = sum(len(rec[name]) for name in EVENTS)
    lost = int(model.lost["lost"].sum()) if len(model.lost) else 0
    host = meta.get("host")
    row = {
        "hostname": host if isinstance(host, str) and host else None,
        "file": os.path.basename(os.fspath(path)),
        "header_sha256": header_sha,
        "kernel": meta.get("kernel"), "arch": meta.get("arch"),
        "kvm": kvm_flavour(meta),
        "spte_format": (meta.get("kvm") or {}).get("spte_format"),
        "page_size_bytes": _int(meta.get("page_size")),
        "start_realtime_ns": _int(clock.get("realtime_ns")),
        "start_monotonic_ns": start,
        "duration_ns": stop - start if start is not None and stop is not None
        and stop >= start else None,
        "complete": bool(rec.complete and not rec.problems),
        "batches": int(rec.batches),
        "problems": "; ".join(rec.problems),
        "stopped_by": end.get("stopped_by") if isinstance(end.get("stopped_by"), str) else None,
        "events": events, "lost_events": lost,
        "recording_schema_version": int(rec.schema_version),
        "tables_schema_version": schema.SCHEMA_VERSION,
        "export_version": EXPORT_VERSION,
        "kvmtrace_version": meta.get("kvmtrace_version")
        if isinstance(meta.get("kvmtrace_version"), str) else None,
        "exported_by": __version__,
    }
    return schema.RECORDINGS.conform(pd.DataFrame([row], dtype=object))


def vmm_label(argv) -> str | None:
    """A VMM's name from its command line: basename of argv[0], and for a
    Python interpreter running a module, ``python -m MODULE``."""
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    prog = os.path.basename(argv[0]) or argv[0]
    if prog.startswith("python") and "-m" in argv[1:-1]:
        return f"{prog} -m {argv[argv.index('-m', 1) + 1]}"
    return prog


def _command(rec, meta) -> tuple[dict, list | None]:
    """(pid -> (argv, source)) known from the notes, and the launched argv."""
    known = {}
    notes = rec["notes"]
    for v in notes.loc[notes["key"] == "command", "value"]:
        try:
            c = json.loads(v)
        except ValueError:
            continue
        if isinstance(c, dict) and _int(c.get("pid")) and vmm_label(c.get("argv")):
            known.setdefault(c["pid"], (c["argv"], "command note"))
    argv = (meta.get("filter") or {}).get("command") if isinstance(meta.get("filter"), dict) \
        else None
    argv = argv if vmm_label(argv) else None
    end_pid = _int(_end_note(rec).get("command_pid"))
    if argv and end_pid and end_pid not in known:
        known[end_pid] = (argv, "end note")
    return known, argv


def processes_table(model: Model) -> pd.DataFrame:
    """One row per VMM process (pid, proc) seen in any table of the recording."""
    parts = [getattr(model, t)[["pid", "proc"]] for t in _PROCESS_TABLES
             if len(getattr(model, t))]
    if not parts:
        return schema.PROCESSES.empty()
    procs = (pd.concat(parts).astype("int64").drop_duplicates()
             .sort_values(["pid", "proc"]).reset_index(drop=True))
    known, argv = _command(model.recording, model.meta)
    # an older recording names its launched command but not its pid: with one
    # VMM process only, that process is the command (or its only VMM child)
    only = argv is not None and not known and len(procs) == 1
    rows = []
    for pid, proc in procs.itertuples(index=False):
        a, source = known.get(pid, (None, None)) if proc == 0 else (None, None)
        if a is None and only:
            a, source = argv, "only VMM of the launched command"
        label = vmm_label(a) if a else None
        rows.append({"pid": pid, "proc": proc,
                     "vmm": label or f"pid {identity.label(pid, proc)}",
                     "cmdline": " ".join(a) if a else None, "vmm_source": source or "pid"})
    return schema.PROCESSES.conform(pd.DataFrame(rows, dtype=object))
