"""One recording: attach the probes, poll the rings, write batches, stop cleanly.

The loop polls every ring buffer every ``poll_s`` (records are submitted
without wake-ups, which is cheaper per event in BPF) and flushes the
recording at least every ``flush_s``. A memslot change triggers a
/proc/PID/smaps snapshot of that process at once, so the VMA behind the new
slot is captured while it is still mapped.

Stopping: SIGINT / SIGTERM, --duration, or the launched command exiting. In
every case the rings are drained, a final smaps snapshot is taken, and the
file is closed with its end marker.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..host import bccload
from ..host import btf
from ..host import headers as bcc_headers
from ..host import procfs, tracefs
from ..probes import catalogue, codegen, program
from ..recording.writer import RecordingWriter
from . import child, context
from .ringbuf import RingReader


class RecordError(RuntimeError):
    """A recording that could not start (one-line message for the user)."""


@dataclass
class Options:
    output: str
    probes: str = "all"
    pids: tuple[int, ...] = ()
    command: tuple[str, ...] = ()
    duration: float | None = None
    flush_s: float = 1.0
    poll_s: float = 0.02


@dataclass
class Stats:
    events: dict = field(default_factory=dict)
    lost: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    stopped_by: str = ""
    command_status: int | None = None


class Session:
    def __init__(self, opts: Options):
        self.opts = opts
        self.stats = Stats()
        self._stop = False
        self.proc: child.Child | None = None
        self.snapshotted_pids: set[int] = set()
        self.write_error: OSError | None = None
        self._last_stats: dict | None = None
        self.btf = None

    # -- setup --------------------------------------------------------------
    def _select(self):
        root = tracefs.ensure_mounted()
        try:
            wanted = catalogue.parse_selection(self.opts.probes)
        except catalogue.SelectionError as e:
            raise RecordError(str(e)) from None
        self.btf = btf.open_kernel()
        avail = catalogue.availability(wanted, root, self.btf)
        usable = [p for p in wanted if avail[p.name] is None]
        if not any(p.group == "memslots" for p in usable) and not any(
                p.group == "faults" for p in usable):
            raise RecordError("none of the chosen probes can attach here: "
                              + "; ".join(f"{k}: {v}" for k, v in avail.items() if v))
        return root, wanted, avail, usable

    def _compile(self, usable, filter_pids: bool):
        hdr = bcc_headers.find()
        if hdr is None:
            raise RecordError(bcc_headers.missing_hint())
        cflags = bcc_headers.apply(hdr)
        prog = program.build(usable, filter_pids,
                             catalogue.offsets(usable, self.btf) if self.btf else {})
        try:
            b = bccload.load(prog.text, cflags + prog.cflags, after=prog.attach_all)
        except bccload.BPFLoadError as e:
            raise RecordError(f"BPF program failed to load: {e}") from None
        return b, prog, hdr

    def _spawn(self, b):
        cmd = list(self.opts.command)
        if shutil.which(cmd[0]) is None:
            raise RecordError(f"cannot run {cmd[0]}: command not found")
        return child.spawn(cmd, lambda pid: self._add_pid(b, pid))

    @staticmethod
    def _add_pid(b, pid: int):
        b["kvmtrace_pids"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    # -- running ------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        self._stop = True
        self.stats.stopped_by = signal.Signals(signum).name

    def _snapshot(self, writer, pid: int, reason: str):
        vmas = procfs.read_smaps(pid)
        if not vmas:  # gone, or exiting (an exiting process shows an empty smaps)
            writer.note("smaps_unavailable", {"pid": pid, "reason": reason})
            return
        ts = time.monotonic_ns()
        writer.add_rows("vmas", [dict(v, ts=ts, pid=pid, reason=reason) for v in vmas])
        self.snapshotted_pids.add(pid)

    def _drain(self, readers, writer):
        memslot_pids = set()
        for ev, rd in readers:
            recs = rd.read()
            if len(recs):
                writer.add_events(ev.name, recs)
                self.stats.events[ev.name] = self.stats.events.get(ev.name, 0) + len(recs)
                if ev.name == "memslot":
                    memslot_pids.update(int(p) for p in np.unique(recs["pid"]))
        for pid in memslot_pids:
            self._snapshot(writer, pid, "memslot")

    def _lost(self, b, events):
        table = b["kvmtrace_lost_count"]
        for i, ev in enumerate(events):
            self.stats.lost[ev.name] = int(sum(table[ctypes.c_int(i)]))

    def _stats_rows(self, events, always=False):
        """Cumulative counts per event kind, when they moved since the last rows
        (an idle recording then writes no batch: each costs ~10 KB of Arrow
        metadata for the empty tables)."""
        now = {ev.name: (self.stats.events.get(ev.name, 0), self.stats.lost.get(ev.name, 0))
               for ev in events}
        if not always and now == self._last_stats:
            return []
        self._last_stats = now
        ts = time.monotonic_ns()
        return [{"ts": ts, "kind": k, "events": e, "lost": n} for k, (e, n) in now.items()]

    def run(self, live=None) -> Stats:
        opts = self.opts
        if os.path.exists(opts.output) and os.path.isdir(opts.output):
            raise RecordError(f"{opts.output}: is a directory")
        root, wanted, avail, usable = self._select()
        filter_pids = bool(opts.pids or opts.command)
        b, prog, hdr = self._compile(usable, filter_pids)
        for pid in opts.pids:
            if not os.path.exists(f"/proc/{pid}"):
                raise RecordError(f"no process with pid {pid}")
            self._add_pid(b, pid)
        readers = []
        for ev in prog.events:
            table = b[codegen.ring_name(ev)]
            readers.append((ev, RingReader(table.map_fd, table.max_entries,
                                           codegen.record_dtype(ev))))
        meta = context.host_context()
        meta.update({
            "command_line": sys.argv,
            "probes": {
                "requested": opts.probes,
                "attached": [p.name for p in usable],
                "unavailable": {k: v for k, v in avail.items() if v},
                "events": [e.name for e in prog.events],
            },
            "filter": {"pids": list(opts.pids), "command": list(opts.command)},
            "tracefs": root,
            "bcc_headers": {"source": hdr.source, "version": hdr.version,
                            "matches_kernel": hdr.matches_kernel},
            "btf": btf.context(self.btf, prog.cflags),
        })
        try:
            writer = RecordingWriter(opts.output, meta)
        except OSError as e:
            raise RecordError(f"{opts.output}: {e.strerror}") from None

        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for pid in (opts.pids or ([] if opts.command else context.vmm_pids())):
                self._snapshot(writer, pid, "start")
            if opts.command:
                self.proc = self._spawn(b)
            if live:
                live.start(self)
            self._loop(b, prog, readers, writer, live)
        except OSError as e:  # the recording file could not be written (disk full, ...)
            self.write_error = e
            self.stats.stopped_by = f"write error: {e.strerror}"
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self._finish(b, prog, readers, writer, live)
        if self.write_error is not None:
            raise RecordError(f"writing {opts.output} failed ({self.write_error.strerror}); "
                              "recording stopped, the file holds everything up to the last "
                              "successful flush")
        return self.stats

    def _loop(self, b, prog, readers, writer, live):
        opts = self.opts
        deadline = None if opts.duration is None else self.stats.started + opts.duration
        next_flush = time.monotonic() + opts.flush_s
        wake = select.epoll()
        for ev, rd in readers:
            if ev.wakeup:
                wake.register(rd.fd, select.EPOLLIN)
        while not self._stop:
            try:
                wake.poll(opts.poll_s)
            except InterruptedError:
                pass
            self._drain(readers, writer)
            now = time.monotonic()
            if self.proc is not None and self.proc.poll() is not None:
                self.stats.stopped_by = "command exited"
                self.stats.command_status = self.proc.returncode
                break
            if deadline is not None and now >= deadline:
                self.stats.stopped_by = "duration"
                break
            if now >= next_flush:
                self._lost(b, prog.events)
                writer.add_rows("stats", self._stats_rows(prog.events))
                writer.flush()
                next_flush = now + opts.flush_s
                if live:
                    live.update(self, writer)

    def _final_records(self, b, prog, readers, writer):
        self._drain(readers, writer)
        for pid in sorted(self.snapshotted_pids | set(self.opts.pids)):
            if os.path.exists(f"/proc/{pid}"):
                self._snapshot(writer, pid, "end")
        self._lost(b, prog.events)
        writer.add_rows("stats", self._stats_rows(prog.events, always=True))
        writer.note("end", {
            "stopped_by": self.stats.stopped_by or "unknown",
            "command_status": self.stats.command_status,
            "elapsed_s": round(time.monotonic() - self.stats.started, 3),
            "events": self.stats.events, "lost": self.stats.lost,
            "clock": context.clock_base(),
        })

    def _finish(self, b, prog, readers, writer, live):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            if self.proc.wait(timeout=3) is None:
                self.proc.kill()
                self.proc.wait()
            self.stats.command_status = self.proc.returncode
        try:
            if self.write_error is None:
                self._final_records(b, prog, readers, writer)
            writer.close()
        except OSError as e:
            self.write_error = self.write_error or e
            writer.abandon()
        for _, rd in readers:
            rd.close()
        if live and self.write_error is None:
            live.stop(self, writer)
