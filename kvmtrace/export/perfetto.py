"""One recording as a Perfetto trace (open it at ui.perfetto.dev, or query it
with Perfetto's trace processor).

Tracks, all on one packet sequence, times in CLOCK_MONOTONIC ns as recorded
(a clock snapshot makes MONOTONIC the trace clock and pairs it with
REALTIME, so the UI also shows wall-clock time):

- a process track per VMM process (named by its program when the recording
  knows it, see export/tables.py), and under it
- a thread track per vCPU thread: each fault a slice from its start
  (``start_ts``) to KVM's install (``install_ts``) or, where the fault
  handler's return was traced (kprobes), to that return; named
  ``ACCESS SIZE MEMTYPE`` (``write 4K WB``, ``exec 4K Device``); its
  arguments hold the fault's columns (gfn, gpa, slot, mapping_size_bytes,
  pfn, spte, verdict, both memory types, the kernel rule, service_ns); names
  as in the tables (docs/tables.md). A fault whose start or
  end was not seen is an instant at ``ts``. MMIO exits (``kvm_mmio``) are
  instants on the same track (``MMIO write``, gpa, len_bytes, val).
- a track per VM (``VM fd N``): each memslot ioctl an instant (``create slot
  1``, ``failed create slot 10``) with the request and KVM's answer; under
  it a track per memslot whose slices are the slot's versions (create to
  move / flags change / delete, or the end of the trace), named by GPA range
  and VMA, with the verdict, the reason and the memory types as arguments;
  and a counter track per memslot with faults: its fault rate (faults/s per
  bin, bins of 1-2-5 x 10^k ns, about 200 over the recording).

Faults of one thread that overlap (they do not in KVM; a damaged recording
could) go on child tracks (``faults (overlapping)``), so slices always nest.
Written with the ``perfetto`` package's protos (TraceProtoBuilder); the tests
read the file back with the same package's ``Trace`` proto.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..analysis import identity, pages
from ..analysis.model import Model
from . import ExportError, need
from .tables import processes_table

__all__ = ["trace_bytes", "export", "SEQUENCE_ID"]

SEQUENCE_ID = 1
_END, _COUNTER, _INSTANT, _BEGIN = 0, 1, 2, 3  # order of events at the same time
MMIO_TYPES = {0: "MMIO read (unsatisfied)", 1: "MMIO read", 2: "MMIO write"}
_U64_LIVE = 2**64 - 1


def _nice_bin(span: int, target: int = 200) -> int:
    """A 1-2-5 x 10^k ns bin width giving about ``target`` bins over ``span``."""
    want = max(1, span // target)
    k = 10 ** int(math.floor(math.log10(want)))
    for m in (1, 2, 5, 10):
        if m * k >= want:
            return m * k
    return 10 * k


def _isnull(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


class _Builder:
    def __init__(self, pb2, builder):
        self.pb2 = pb2
        self.b = builder
        self.next_uuid = 1
        self.events: list[tuple] = []  # (ts, order, n, fill)

    def track(self, **kw) -> int:
        uuid = self.next_uuid
        self.next_uuid += 1
        p = self.b.add_packet()
        p.trusted_packet_sequence_id = SEQUENCE_ID
        td = p.track_descriptor
        td.uuid = uuid
        if "parent" in kw:
            td.parent_uuid = kw["parent"]
        if "name" in kw:
            td.name = kw["name"]
        if "process" in kw:
            pid, name = kw["process"]
            td.process.pid = pid
            td.process.process_name = name
        if "thread" in kw:
            pid, tid, name = kw["thread"]
            td.thread.pid, td.thread.tid, td.thread.thread_name = pid, tid, name
        if "counter_unit" in kw:
            td.counter.unit_name = kw["counter_unit"]
        return uuid

    def event(self, ts: int, order: int, track: int, name: str | None = None,
              args: dict | None = None, value: float | None = None):
        self.events.append((int(ts), order, len(self.events), track, name, args, value))

    def emit(self):
        te_type = self.pb2.TrackEvent
        kinds = {_BEGIN: te_type.TYPE_SLICE_BEGIN, _END: te_type.TYPE_SLICE_END,
                 _INSTANT: te_type.TYPE_INSTANT, _COUNTER: te_type.TYPE_COUNTER}
        mono = self.pb2.BUILTIN_CLOCK_MONOTONIC
        for ts, order, _, track, name, args, value in sorted(self.events):
            p = self.b.add_packet()
            p.trusted_packet_sequence_id = SEQUENCE_ID
            p.timestamp = ts
            p.timestamp_clock_id = mono
            ev = p.track_event
            ev.type = kinds[order]
            ev.track_uuid = track
            if name is not None:
                ev.name = name
            if value is not None:
                ev.double_counter_value = value
            for k, v in (args or {}).items():
                _annotate(ev, k, v)


def _annotate(ev, name: str, v):
    """One debug annotation; ('ptr', n) is shown as hex; null values are left out."""
    if _isnull(v):
        return
    a = ev.debug_annotations.add()
    a.name = name
    if isinstance(v, tuple):
        a.pointer_value = int(v[1])
    elif isinstance(v, (bool, np.bool_)):
        a.bool_value = bool(v)
    elif isinstance(v, (int, np.integer)):
        v = int(v)
        if v >= 2**63:
            a.uint_value = v
        else:
            a.int_value = v
    elif isinstance(v, (float, np.floating)):
        a.double_value = float(v)
    else:
        a.string_value = str(v)


def _ptr(v):
    return None if _isnull(v) else ("ptr", int(v))


def _fault_name(r) -> str:
    access = r.access or "fault"
    mt = r.spte_memtype or "nothing installed"
    size = "" if _isnull(r.mapping_size_bytes) else pages.size_name(int(r.mapping_size_bytes))
    return " ".join(x for x in (access, size, mt) if x)


def _fault_args(r, page: int) -> dict:
    out = {"fault_id": r.fault_id, "gfn": _ptr(r.gfn), "gpa": _ptr(int(r.gfn) * page),
           "slot": r.slot, "level": r.level, "mapping_size_bytes": r.mapping_size_bytes,
           "vcpu_fd": r.vcpu_fd, "cpu": r.cpu,
           "pfn": _ptr(r.pfn), "spte": _ptr(r.spte), "error_code": _ptr(r.error_code),
           "start_kind": r.start_kind or None, "service_ns": r.service_ns,
           "verdict": r.verdict or None, "spte_memtype": r.spte_memtype or None,
           "vma_memtype": r.vma_memtype or None,
           "vma_memtype_source": r.vma_memtype_source or None,
           "expected_memtype": r.expected_memtype or None, "rule": r.rule or None,
           "ipa": _ptr(r.ipa), "esr": _ptr(r.esr), "phys": _ptr(r.phys),
           "map_size_bytes": r.map_size_bytes, "install_kind": r.install_kind or None,
           "handler_ret": r.handler_ret}
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


def _span(model: Model) -> tuple[int, int]:
    """First and last time of the recording (events, its clock, its end)."""
    ts = []
    for t in (model.faults, model.ops, model.exits, model.invalidations):
        if len(t):
            ts += [int(t["ts"].min()), int(t["ts"].max())]
    f = model.faults
    for c in ("start_ts", "install_ts", "handler_exit_ts"):
        if len(f) and f[c].notna().any():
            ts += [int(f[c].min()), int(f[c].max())]
    s = model.slots
    if len(s):
        ts.append(int(s["start_ts"].min()))
        ended = s["end_ts"][s["end_ts"] != _U64_LIVE]
        if len(ended):
            ts.append(int(ended.max()))
    start = (model.meta.get("clock") or {}).get("monotonic_ns")
    if type(start) is int:
        ts.append(start)
    return (min(ts), max(ts)) if ts else (0, 0)


def trace_bytes(model: Model) -> bytes:
    """The Perfetto trace of a model, serialized."""
    need("perfetto", "export")
    pb2 = need("perfetto.protos.perfetto.trace.perfetto_trace_pb2", "export")
    builder_mod = need("perfetto.trace_builder.proto_builder", "export")
    b = _Builder(pb2, builder_mod.TraceProtoBuilder())
    page = pages.page_size(model.meta)
    t0, t1 = _span(model)

    # the trace clock: MONOTONIC, tied to REALTIME when the recording has both
    p = b.b.add_packet()
    p.trusted_packet_sequence_id = SEQUENCE_ID
    p.sequence_flags = pb2.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
    clock = model.meta.get("clock") or {}
    snap = p.clock_snapshot
    snap.primary_trace_clock = pb2.BUILTIN_CLOCK_MONOTONIC
    mono, real = clock.get("monotonic_ns"), clock.get("realtime_ns")
    c = snap.clocks.add()
    c.clock_id, c.timestamp = pb2.BUILTIN_CLOCK_MONOTONIC, mono if type(mono) is int else t0
    if type(mono) is int and type(real) is int:
        c = snap.clocks.add()
        c.clock_id, c.timestamp = pb2.BUILTIN_CLOCK_REALTIME, real

    names = {(r.pid, r.proc): r.vmm for r in processes_table(model).itertuples(index=False)}
    proc_tracks: dict = {}

    def proc_track(pid, proc):
        key = (int(pid), int(proc))
        if key not in proc_tracks:
            label = names.get(key) or f"pid {identity.label(*key)}"
            proc_tracks[key] = b.track(process=(key[0], label))
        return proc_tracks[key]

    # vCPU threads: named by their vCPU fd
    f, ex = model.faults, model.exits
    vcpu = pd.concat([f[["pid", "proc", "tid", "vcpu_fd"]], ex[["pid", "proc", "tid", "vcpu_fd"]]])
    thread_tracks: dict = {}
    for (pid, proc, tid), g in vcpu.groupby(["pid", "proc", "tid"], sort=True):
        fds = g["vcpu_fd"][g["vcpu_fd"] >= 0]
        name = f"vCPU fd {int(fds.mode().iloc[0])} (tid {tid})" if len(fds) else f"tid {tid}"
        proc_track(pid, proc)
        thread_tracks[(int(pid), int(proc), int(tid))] = [b.track(thread=(int(pid), int(tid),
                                                                          name))]

    # faults: slices on their thread's track (overlaps on child lanes)
    lane_end: dict = {}
    for r in f.itertuples(index=False):
        key = (int(r.pid), int(r.proc), int(r.tid))
        begin = r.start_ts if not _isnull(r.start_ts) else None
        end = r.handler_exit_ts if not _isnull(r.handler_exit_ts) else \
            r.install_ts if not _isnull(r.install_ts) else None
        args = _fault_args(r, page)
        name = _fault_name(r)
        if begin is None or end is None or int(end) < int(begin):
            b.event(r.ts, _INSTANT, thread_tracks[key][0], name,
                    args | {"note": "start or end of the fault not seen"})
            continue
        begin, end = int(begin), int(end)
        ends = lane_end.setdefault(key, [])
        lane = next((i for i, e in enumerate(ends) if e <= begin), len(ends))
        if lane == len(ends):
            ends.append(0)
            if lane >= len(thread_tracks[key]):
                thread_tracks[key].append(b.track(parent=thread_tracks[key][0],
                                                  name="faults (overlapping)"))
        ends[lane] = end
        track = thread_tracks[key][lane]
        b.event(begin, _BEGIN, track, name, args)
        b.event(end, _END, track)

    s = model.slots
    slot_ids = s["slot"].to_numpy() if len(s) else np.zeros(0, dtype="int64")
    for r in ex.itertuples(index=False):
        b.event(r.ts, _INSTANT, thread_tracks[(int(r.pid), int(r.proc), int(r.tid))][0],
                MMIO_TYPES.get(int(r.type), f"MMIO type {r.type}"),
                {"gpa": _ptr(r.gpa), "len_bytes": r.len_bytes, "val": _ptr(r.val),
                 "vcpu_fd": r.vcpu_fd,
                 "slot": int(slot_ids[r.slot_row]) if r.slot_row >= 0 else None})

    # VMs: memslot ioctls as instants, slot versions as slices, fault rates
    vm_tracks: dict = {}

    def vm_track(pid, proc, vm_fd):
        key = (int(pid), int(proc), int(vm_fd))
        if key not in vm_tracks:
            vm_tracks[key] = b.track(parent=proc_track(pid, proc),
                                     name=f"VM fd {vm_fd}" if vm_fd >= 0 else "VM (fd unknown)")
        return vm_tracks[key]

    for r in model.ops.itertuples(index=False):
        sid = f"{r.as_id}:{r.slot_id}" if r.as_id else f"{r.slot_id}"
        b.event(r.ts, _INSTANT, vm_track(r.pid, r.proc, r.vm_fd), f"{r.op} slot {sid}",
                {"ioctl": r.ioctl_name, "gpa": _ptr(r.gpa), "size_bytes": r.size_bytes,
                 "hva": _ptr(r.hva), "flags": r.flag_names or None, "ret": r.ret,
                 "errno": r.errno or None, "reason": r.reason or None,
                 "latency_ns": r.latency_ns})

    v = model.verdicts
    verdict_of = {(r.pid, r.proc, r.vm_fd, r.as_id, r.slot, r.version): r
                  for r in v[v["version"] >= 0].itertuples(index=False)}
    slot_tracks: dict = {}
    for r in s.itertuples(index=False):
        key = (int(r.pid), int(r.proc), int(r.vm_fd), int(r.as_id), int(r.slot))
        if key not in slot_tracks:
            sid = f"{r.as_id}:{r.slot}" if r.as_id else f"{r.slot}"
            slot_tracks[key] = b.track(parent=vm_track(r.pid, r.proc, r.vm_fd),
                                       name=f"slot {sid}")
        vr = verdict_of.get(key + (int(r.version),))
        end = t1 if int(r.end_ts) == _U64_LIVE else int(r.end_ts)
        name = f"{int(r.gpa):#x}+{_size(int(r.size_bytes))} {r.vma or '?'}"
        args = {"verdict": vr.verdict if vr else None, "reason": vr.reason if vr else None,
                "vma_memtype": (vr.vma_memtype or None) if vr else None,
                "spte_memtype": (vr.spte_memtype or None) if vr else None,
                "faults": vr.faults if vr else None, "lost": vr.lost if vr else None,
                "gpa": _ptr(r.gpa), "size_bytes": r.size_bytes, "hva": _ptr(r.hva),
                "flags": r.flag_names or None,
                "version": r.version, "created_by": r.created_by,
                "ended_by": r.ended_by or None, "vma": r.vma, "vmflags": r.vmflags,
                "vma_source": r.vma_source}
        if vr is not None:
            name += f": {vr.verdict}"
        b.event(int(r.start_ts), _BEGIN, slot_tracks[key], name, args)
        b.event(max(end, int(r.start_ts)), _END, slot_tracks[key])

    fin = f[f["slot_row"] >= 0]
    if len(fin) and len(s):
        width = _nice_bin(max(1, t1 - t0))
        rows = fin["slot_row"].to_numpy()
        keys = s[["pid", "proc", "vm_fd", "as_id", "slot"]].to_numpy()[rows]
        bins = (fin["ts"].to_numpy(dtype="int64") - t0) // width
        df = pd.DataFrame(keys, columns=["pid", "proc", "vm_fd", "as_id", "slot"]).assign(bin=bins)
        for key, g in df.groupby(["pid", "proc", "vm_fd", "as_id", "slot"], sort=True):
            key = tuple(int(x) for x in key)
            sid = f"{key[3]}:{key[4]}" if key[3] else f"{key[4]}"
            track = b.track(parent=vm_track(*key[:3]), name=f"slot {sid} faults/s",
                            counter_unit="faults/s")
            counts = g["bin"].value_counts()
            lo, hi = int(counts.index.min()) - 1, int(counts.index.max()) + 1
            for k in range(max(lo, 0), hi + 1):
                b.event(t0 + k * width, _COUNTER, track,
                        value=float(counts.get(k, 0)) * 1e9 / width)
    b.emit()
    return b.b.serialize()


def export(path, out, force: bool = False) -> int:
    """Write RECORDING's Perfetto trace to ``out`` (0600, never through a link);
    returns its size in bytes."""
    from ..analysis.model import build
    from ..recording.reader import RecordingError
    from . import write_bytes

    need("perfetto", "export")
    try:
        model = build(path)
    except RecordingError as e:
        raise ExportError(str(e)) from None
    data = trace_bytes(model)
    write_bytes(out, data, force)
    return len(data)
