"""One recording: attach the probes, poll the rings, write batches, stop cleanly.

The loop polls every ring buffer every ``poll_s`` (records are submitted
without wake-ups, which is cheaper per event in BPF) and flushes the
recording at least every ``flush_s``. A memslot change triggers a
/proc/PID/smaps snapshot of that process at once, so the VMA behind the new
slot is captured while it is still mapped.

Stopping: SIGINT / SIGTERM / SIGHUP / SIGQUIT, --duration, or the launched
command exiting. In every case the launched command is stopped (SIGTERM, then
SIGKILL after ``GRACE_S``; not with ``leave_running``), the rings are
drained, a final smaps snapshot is taken, and the file is closed with its
end marker and an ``end`` note naming what stopped it. A second stop signal
while stopping skips the grace period. SIGHUP already ignored when record
starts (nohup) stays ignored. A stop signal before recording begins (during
the BPF compile) ends record at once, with no file. If record itself is
killed (SIGKILL), the command dies with it (PR_SET_PDEATHSIG, child.py) and
the file reads back up to the last flush.

Exit status (``Stats.exit_code``, RecordError.code): 0 when recording
stopped because it was asked to (a stop signal, --duration); the command's
own status when it exited by itself (128+N for a death by signal N); 2 for
a usage error (bad option, command not runnable, output path refused, no
such pid); 1 for a recording that failed (BPF, tracefs, a write error);
128+N for stop signal N before recording began.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..host import btf, procfs
from ..probes import codegen
from ..probes.load import LoadedProbes, ProbeLoadError, load_probes
from .. import outputs
from . import child, context, hostload, loss, progstats


GRACE_S = 3.0  # between SIGTERM and SIGKILL when record stops the command
LOST_WHERE_S = 10.0  # the lost_where note at most this often while recording


class RecordError(RuntimeError):
    """A recording that could not start or failed (one-line message for the
    user); ``code``: what record exits with (2 usage, 1 failure, 128+N)."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


class _Interrupted(BaseException):
    """A stop signal before recording began (BaseException: nothing may catch it
    as an ordinary error on the way out, bcc's loader included)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _identity(path: str):
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _WriteFailed(Exception):
    def __init__(self, err: OSError):
        super().__init__(err)
        self.err = err


@dataclass
class Options:
    output: str
    probes: str = "all"
    pids: tuple[int, ...] = ()
    command: tuple[str, ...] = ()
    duration: float | None = None
    flush_s: float = 1.0
    poll_s: float = 0.02
    force: bool = False  # replace an existing regular file (never a link)
    leave_running: bool = False  # the launched command outlives record
    # pages of each high-rate ring, or {event name: pages} (default: what each
    # kind's expected rate calls for, probes.codegen.ring_pages)
    buffer_pages: int | dict | None = None
    cache: bool | None = None  # the BPF compile cache (None: unless $KVMTRACE_BPF_CACHE=0)
    qmp: tuple[str, ...] = ()  # QEMU's QMP sockets to ask for its memory map (qmp.py)


@dataclass
class Stats:
    events: dict = field(default_factory=dict)
    lost: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    stopped_by: str = ""  # the first cause wins: a signal name, duration, command exited
    command_status: int | None = None  # as Popen.returncode: -N for signal N
    command_stop: str = ""  # how the command ended: exited, SIGTERM, SIGKILL ..., left running

    @property
    def exit_code(self) -> int:
        """What record exits with after a recording that was written."""
        if self.stopped_by == "command exited":
            return child.exit_status(self.command_status) or 0
        return 0


class Session:
    def __init__(self, opts: Options):
        self.opts = opts
        self.stats = Stats()
        self._stop = False
        self.proc: child.Child | None = None
        self.snapshotted_pids: set[int] = set()
        self._pidfds: list[int] = []  # of --pid processes (pidfd_open)
        self.write_error: OSError | None = None
        self._last_stats: dict | None = None
        self.btf = None
        self._phase = "setup"  # setup: a stop signal raises; then: it sets _stop
        self._stop_signal: str | None = None
        self._hurry = False  # a second stop signal: no grace for the command
        self._dispositions: dict = {}
        self._old_handlers: dict = {}
        self._error: BaseException | None = None
        self.load: hostload.HostLoad | None = None
        self.qmp = None  # qmp.Collector with --qmp

    # -- setup --------------------------------------------------------------
    def _load_probes(self, filter_pids: bool) -> LoadedProbes:
        """Select, build, load and attach the probes (kvmtrace.probes.load, as doctor)."""
        try:
            return load_probes(self.opts.probes, filter_pids=filter_pids,
                               buffer_pages=self.opts.buffer_pages, cache=self.opts.cache)
        except ProbeLoadError as e:
            raise RecordError(f"BPF program failed to load: {e}" if e.stage == "bpf" else str(e),
                              code=2 if e.stage == "selection" else 1) from None

    def _precheck(self):
        """Usage errors, before seconds of BPF compile and before any file exists."""
        opts = self.opts
        if opts.command:
            try:
                child.check_runnable(list(opts.command))
            except child.SpawnError as e:
                raise RecordError(str(e), code=2) from None
        if not opts.output:
            raise RecordError("--output: an empty path", code=2)
        try:  # what the writer (outputs.create) would refuse, refused now, in its words
            outputs._check(opts.output, opts.force)
        except outputs.OutputError as e:
            raise RecordError(str(e), code=2) from None
        d = os.path.dirname(os.path.abspath(opts.output))
        if not os.path.isdir(d):
            raise RecordError(f"{opts.output}: no such directory {d}", code=2)
        for pid in opts.pids:
            if not os.path.exists(f"/proc/{pid}"):
                raise RecordError(f"no process with pid {pid}", code=2)

    def _spawn(self, b):
        try:
            return child.spawn(list(self.opts.command), lambda pid: self._add_pid(b, pid),
                               own_group=not child.in_terminal_foreground(),
                               leave_running=self.opts.leave_running,
                               dispositions=self._dispositions)
        except child.SpawnError as e:
            raise RecordError(str(e), code=2) from None

    @staticmethod
    def _mark_vmm(b, pid: int):
        """A VMM already running: its exit is recorded like a new one's (proc.c)."""
        b["kvmtrace_vmms"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    @staticmethod
    def _add_pid(b, pid: int):
        b["kvmtrace_pids"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    # -- running ------------------------------------------------------------
    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return  # a library caller's thread: signals are the caller's business
        for s in child.STOP_SIGNALS:
            d = signal.getsignal(s)
            self._dispositions[s] = signal.SIG_IGN if d == signal.SIG_IGN else signal.SIG_DFL
            if s == signal.SIGHUP and d == signal.SIG_IGN:
                continue  # nohup: a hangup does not stop the recording
            self._old_handlers[s] = signal.signal(s, self._on_signal)

    def _restore_signals(self):
        for s, h in self._old_handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._old_handlers = {}

    def _on_signal(self, signum, _frame):
        if self._phase == "setup":
            raise _Interrupted(signum)
        if self._stop_signal is None:
            self._stop_signal = signal.Signals(signum).name
            if not self.stats.stopped_by:
                self.stats.stopped_by = self._stop_signal
        else:
            self._hurry = True
        self._stop = True

    def _snapshot(self, writer, pid: int, reason: str):
        vmas = procfs.read_smaps(pid)
        if not vmas:  # gone, or exiting (an exiting process shows an empty smaps)
            writer.note("smaps_unavailable", {"pid": pid, "reason": reason})
            return
        ts = time.monotonic_ns()
        writer.add_rows("vmas", [dict(v, ts=ts, pid=pid, reason=reason) for v in vmas])
        self.snapshotted_pids.add(pid)

    def _slot_reader(self):
        """(the memslot iterator reader, '') or (None, why this host has none)."""
        from . import snapshot
        try:
            return snapshot.IteratorReader(cache=self.opts.cache), ""
        except snapshot.SnapshotError as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 - bcc's own errors: recording goes on
            return None, f"{type(e).__name__}: {e}"

    @staticmethod
    def _memslot_snapshot(writer, reader, why: str, pid: int):
        """The memslots ``pid`` has now (table memslot_snapshot), or a note
        saying why they cannot be read: then the report knows them only from
        their faults and from memslot ioctls made while recording."""
        from . import snapshot
        if reader is not None:
            try:
                rows = snapshot.recorded_memslots(reader, pid, time.monotonic_ns())
                writer.add_rows("memslot_snapshot", rows)
                writer.note("memslot_snapshot", {"pid": pid, "slots": len(rows),
                                                 "source": "BPF iterator (task_file, task_vma)"})
                return
            except snapshot.SnapshotError as e:
                why = str(e)
        writer.note("memslot_snapshot_unavailable", {"pid": pid, "reason": why})

    def _drain(self, readers, writer):
        memslot_pids = self._read_rings(readers, writer)
        for pid in memslot_pids:
            self._snapshot(writer, pid, "memslot")
            # a snapshot takes tens of ms: read the other rings after each (not
            # memslot: its next records must trigger their own snapshots)
            self._read_rings(readers, writer, skip="memslot")
        if self.qmp is not None:
            self.qmp.changed(memslot_pids)
            self._qmp_take(writer)

    def _qmp_take(self, writer):
        """QEMU's answers and the QMP notes so far, into the recording."""
        rows, notes = self.qmp.take()
        writer.add_rows("qmp_mtree", rows)
        for ts, value in notes:
            writer.note("qmp", value, ts)

    def _read_rings(self, readers, writer, skip=None) -> set[int]:
        """Read every ring (but ``skip``); the pids of memslot events read."""
        memslot_pids = set()
        for ev, rd in readers:
            if ev.name == skip:
                continue
            recs = rd.read()
            if len(recs):
                writer.add_events(ev.name, recs)
                self.stats.events[ev.name] = self.stats.events.get(ev.name, 0) + len(recs)
                if ev.name == "memslot":
                    memslot_pids.update(set(recs["pid"].tolist()))
        return memslot_pids

    def _lost(self, b, events, writer, final=False):
        totals = getattr(self, "_lost_totals", None)
        if totals is None:  # once: the mmap reader, or why not (then bpf() lookups)
            try:
                totals = loss.LostTotals(b, len(events))
            except (OSError, KeyError, ValueError):
                totals = False
            self._lost_totals = totals
        if totals:
            for ev, n in zip(events, totals.read()):
                self.stats.lost[ev.name] = n
        else:
            table = b["kvmtrace_lost_count"]
            for i, ev in enumerate(events):
                self.stats.lost[ev.name] = int(sum(table[ctypes.c_int(i)]))
        total = sum(self.stats.lost.values())
        # where they were lost, when it moved: at most every LOST_WHERE_S while
        # recording (walking the map is a bpf() call per entry, each holding
        # bpf_prog_active: see LostTotals), and at the end
        now = time.monotonic()
        if total != getattr(self, "_lost_noted", 0) and (
                final or now - getattr(self, "_lost_where_at", 0.0) >= LOST_WHERE_S):
            writer.note("lost_where", loss.lost_where(b, events))
            self._lost_noted = total
            self._lost_where_at = now

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
        """Record until stopped; ``Stats.exit_code`` is what record exits with.

        Raises RecordError (one line; ``code``) when no recording was made or
        the recording failed; the file, if one was created, is then closed as
        far as it could be written."""
        self._install_signals()
        try:
            return self._run(live)
        except _Interrupted as e:
            raise RecordError(f"stopped by {e.name} before recording began; nothing written",
                              code=128 + e.signum) from None
        finally:
            self._phase = "done"
            self._restore_signals()

    def _run(self, live):
        opts = self.opts
        self._precheck()
        # VMMs running already: their memslots are read from the kernel once the
        # probes are attached (the iterator compiles first, so that reading it
        # then takes milliseconds, not the second bcc needs)
        running = list(opts.pids) or ([] if opts.command else context.vmm_pids())
        slot_reader, slot_reader_why = self._slot_reader() if running else (
            None, "the VMM started while record loaded its probes (the memslot iterator is "
                  "compiled only for VMMs running when record starts)")
        try:
            loaded = self._load_probes(filter_pids=bool(opts.pids or opts.command))
        except BaseException:
            if slot_reader is not None:
                slot_reader.close()
            raise

        b, prog, hdr = loaded.bpf, loaded.program, loaded.headers
        self.btf = loaded.selection.btf
        # record --pid stops once every traced process has exited (perf's -p habit)
        for pid in opts.pids:
            try:
                self._pidfds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                raise RecordError(f"process {pid} exited before recording began",
                                  code=2) from None
            except OSError:  # no pidfd_open (before 5.3): record runs until stopped
                pass
            self._add_pid(b, pid)
        # numpy (the ring reader) is imported once the probes are attached and
        # filtering: its import (0.1 to 0.2 s) does not delay the first event
        from .ringbuf import RingReader

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
                "attached": loaded.attached,
                "unavailable": loaded.unavailable,
                "events": [e.name for e in prog.events],
            },
            "filter": {"pids": list(opts.pids), "command": list(opts.command)},
            "tracefs": loaded.selection.tracefs,
            "bcc_headers": {"source": hdr.source, "version": hdr.version,
                            "matches_kernel": hdr.matches_kernel},
            "btf": btf.context(self.btf, prog.cflags),
            "vma_lookup": prog.vma_lookup,  # in-BPF VMA lookup at memslot ioctls, or why not
            "ring_pages": {ev.name: rd.size // codegen.PAGE_SIZE for ev, rd in readers},
            "bpf_cache": loaded.cache,  # compiled, or loaded from the compile cache
        })
        # from here a stop signal ends the recording cleanly instead of raising
        self._phase = "recording"
        try:
            # imported here: pyarrow's import (0.1 s) comes after the probes are
            # attached, so it does not delay the first event recorded
            from ..recording.writer import RecordingWriter

            writer = RecordingWriter(opts.output, meta, force=opts.force)
        except OSError as e:  # outputs.OutputError included
            failed = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)  # else: the path
            raise RecordError(str(e) if isinstance(e, outputs.OutputError) else
                              f"{opts.output}: {e.strerror}", code=1 if failed else 2) from None
        self.stats.started = time.monotonic()  # --duration counts from here
        self.load = hostload.HostLoad()
        writer.note("host_load", self.load.start_note())
        if opts.command and not self._stop:
            # launched once the file exists: the loop must run when its first
            # memslot ioctl comes (the smaps snapshot). A command that fails
            # at exec (past _precheck: a foreign ELF, ...) leaves no file.
            created = _identity(opts.output)
            try:
                self.proc = self._spawn(b)
            except BaseException:
                writer.abandon()
                if created and _identity(opts.output) == created:
                    os.unlink(opts.output)
                raise
            writer.note("command", {"pid": self.proc.pid, "argv": list(opts.command),
                                    "own_process_group": self.proc.own_group,
                                    "leave_running": opts.leave_running})
        if opts.qmp and not self._stop:
            from . import qmp
            self.qmp = qmp.Collector(list(opts.qmp))
            self.qmp.start()
        try:
            for pid in (opts.pids or ([] if opts.command else context.vmm_pids())):
                self._snapshot(writer, pid, "start")
                self._memslot_snapshot(writer, slot_reader, slot_reader_why, pid)
                self._mark_vmm(b, pid)
            if live:
                live.start(self)
            self._loop(b, prog, readers, writer, live)
        except _WriteFailed as e:  # the recording file could not be written (disk full, ...)
            self.write_error = e.err
            self.stats.stopped_by = f"write error: {e.err.strerror}"
        except Exception as e:  # noqa: BLE001 - a bug or a host failure: still close the file
            self._error = e
            self.stats.stopped_by = f"error: {type(e).__name__}: {e}"
        finally:
            if slot_reader is not None:
                slot_reader.close()
            self._finish(b, prog, readers, writer, live)
        if self.write_error is not None:
            raise RecordError(f"writing {opts.output} failed ({self.write_error.strerror}); "
                              "recording stopped, the file holds everything up to the last "
                              "successful flush")
        if self._error is not None:
            raise RecordError(f"recording stopped by an unexpected error "
                              f"({type(self._error).__name__}: {self._error}); {opts.output} "
                              "is closed and readable, the traceback is in its end note")
        return self.stats

    @staticmethod
    def _flush(writer):
        try:
            writer.flush()
        except OSError as e:
            raise _WriteFailed(e) from None

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
            if self._stop:  # a stop signal (handled during the poll) comes first
                break
            if self.proc is not None and self.proc.poll() is not None:
                self.stats.stopped_by = self.stats.stopped_by or "command exited"
                self.stats.command_status = self.proc.returncode
                break
            if deadline is not None and now >= deadline:
                self.stats.stopped_by = self.stats.stopped_by or "duration"
                break
            if self._pidfds and len(select.select(self._pidfds, [], [], 0)[0]) == len(
                    self._pidfds):  # a pidfd is readable once its process has exited
                self.stats.stopped_by = self.stats.stopped_by or "traced processes exited"
                break
            if now >= next_flush:
                self._lost(b, prog.events, writer)
                writer.add_rows("stats", self._stats_rows(prog.events))
                self._flush(writer)
                self.load.sample()
                next_flush = now + opts.flush_s
                if live:
                    live.update(self, writer)

    def _final_records(self, b, prog, readers, writer):
        self._drain(readers, writer)
        for pid in sorted(self.snapshotted_pids | set(self.opts.pids)):
            if os.path.exists(f"/proc/{pid}"):
                self._snapshot(writer, pid, "end")
        self._lost(b, prog.events, writer, final=True)
        writer.add_rows("stats", self._stats_rows(prog.events, always=True))
        writer.note("host_load", self.load.end_note())
        # programs the kernel skipped (the CPU's bpf_prog_active held): events
        # missing without a full ring (progstats.py)
        writer.note("bpf_misses", progstats.recursion_misses(b))
        end = {
            "stopped_by": self.stats.stopped_by or "unknown",
            "signal": self._stop_signal,
            "exit_code": self.stats.exit_code,
            "command_status": self.stats.command_status,
            "command_pid": self.proc.pid if self.proc else None,
            "command_stop": self.stats.command_stop or None,
            "elapsed_s": round(time.monotonic() - self.stats.started, 3),
            "events": self.stats.events, "lost": self.stats.lost,
            "clock": context.clock_base(),
        }
        if self._error is not None:
            end["error"] = "".join(traceback.format_exception(self._error))[-4000:]
        writer.note("end", end)

    def _finish(self, b, prog, readers, writer, live):
        self._phase = "stopping"  # stop signals: the first is kept, a second hurries
        for fd in self._pidfds:
            os.close(fd)
        self._pidfds = []
        if self.qmp is not None:  # QEMU's last answer, before the command is stopped
            try:
                self.qmp.finish()
            except Exception as e:  # noqa: BLE001 - QMP never fails a recording
                writer.note("qmp", {"status": "lost", "reason": f"{type(e).__name__}: {e}"})
            self._qmp_take(writer)
        if self.proc is not None:
            def waiting():  # the command's teardown events, drained while it stops
                try:
                    self._drain(readers, writer)
                except Exception:  # noqa: BLE001 - the final drain below reports it
                    pass
                return self._hurry
            self.stats.command_stop = self.proc.stop(GRACE_S, waiting)
            self.stats.command_status = self.proc.returncode
        try:
            if self.write_error is None:
                self._final_records(b, prog, readers, writer)
            writer.close()
        except OSError as e:
            self.write_error = self.write_error or e
            writer.abandon()
        except Exception as e:  # noqa: BLE001 - keep what was flushed
            self._error = self._error or e
            writer.abandon()
        for _, rd in readers:
            rd.close()
        if getattr(self, "_lost_totals", None):
            self._lost_totals.close()
        if live and self.write_error is None:
            live.stop(self, writer)
