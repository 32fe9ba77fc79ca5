"""Progress on stderr while recording: events/s and lost events per probe.

A terminal gets a rich live table; a log (CI, a pipe) gets one line per
10 seconds so it stays readable.

Progress is never worth a recording: when stderr goes away (a closed pipe,
a terminal hung up: SIGHUP stops record, and the terminal then fails every
write with EIO) the view goes quiet and recording goes on to its end marker.
Every path and reason shown is escaped: rich markup in a file name ("[/]")
is printed as typed.
"""

from __future__ import annotations

import os
import signal
import time

import functools

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table


class _Console(Console):
    def on_broken_pipe(self):  # rich's own: exit(1) in the middle of a recording
        raise BrokenPipeError


def _quiet_on_error(method):
    """An output error (EPIPE, EIO) silences the view instead of ending record."""
    @functools.wraps(method)
    def wrapper(self, *args, **kw):
        if self.broken:
            return None
        try:
            return method(self, *args, **kw)
        except (OSError, ValueError):  # ValueError: a closed stream
            self.broken = True
            live, self._live = self._live, None
            if live is not None:
                live.console.quiet = True
                try:
                    live.stop()
                except (OSError, ValueError):
                    pass
            return None
    return wrapper


class LiveView:
    def __init__(self, console: Console | None = None):
        self.console = console or _Console(stderr=True)
        self._live = None
        self._last = {}
        self._last_t = time.monotonic()
        self._last_line = 0.0
        self.broken = False

    @_quiet_on_error
    def start(self, session):
        self._last_t = time.monotonic()
        if self.console.is_terminal:
            self._live = Live(self._table(session, None, {}), console=self.console,
                              refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self.console.print(f"kvmtrace: recording to {escape(session.opts.output)} "
                               f"(Ctrl-C, SIGTERM, SIGHUP or SIGQUIT stops)")

    def _rates(self, session):
        now = time.monotonic()
        dt = max(now - self._last_t, 1e-6)
        rates = {k: (v - self._last.get(k, 0)) / dt for k, v in session.stats.events.items()}
        self._last, self._last_t = dict(session.stats.events), now
        return rates

    def _table(self, session, writer, rates):
        elapsed = time.monotonic() - session.stats.started
        size = os.path.getsize(session.opts.output) if os.path.exists(session.opts.output) else 0
        t = Table(title=f"kvmtrace record: {elapsed:6.1f} s, {size / 1e6:.2f} MB "
                        f"-> {escape(session.opts.output)}", title_justify="left")
        for col in ("event", "events", "events/s", "lost"):
            t.add_column(col, justify="left" if col == "event" else "right")
        for k in sorted(set(session.stats.events) | set(session.stats.lost)):
            lost = session.stats.lost.get(k, 0)
            t.add_row(k, f"{session.stats.events.get(k, 0):,}", f"{rates.get(k, 0):,.0f}",
                      f"[red]{lost:,}[/]" if lost else "0")
        return t

    @_quiet_on_error
    def update(self, session, writer):
        rates = self._rates(session)
        if self._live:
            self._live.update(self._table(session, writer, rates))
        elif time.monotonic() - self._last_line >= 10:
            self._last_line = time.monotonic()
            self.console.print(self._line(session, rates))

    def _line(self, session, rates):
        elapsed = time.monotonic() - session.stats.started
        total = sum(session.stats.events.values())
        lost = sum(session.stats.lost.values())
        rate = sum(rates.values())
        return f"kvmtrace: {elapsed:.1f} s, {total:,} events ({rate:,.0f}/s), {lost:,} lost"

    @_quiet_on_error
    def stop(self, session, writer):
        if self._live:
            self._live.update(self._table(session, writer, self._rates(session)))
            self._live.stop()
        total = sum(session.stats.events.values())
        lost = sum(session.stats.lost.values())
        cmd = ""
        if session.proc is not None:
            st = session.stats
            n = st.command_status
            status = "" if n is None else f" (exit status {n})" if n >= 0 else \
                f" (killed by {signal.Signals(-n).name})" if -n in signal.valid_signals() \
                else f" (status {n})"
            cmd = f"; command pid {session.proc.pid} {escape(st.command_stop or 'exited')}" \
                + status
        self.console.print(
            f"kvmtrace: stopped ({escape(session.stats.stopped_by or 'done')}) after "
            f"{time.monotonic() - session.stats.started:.1f} s: {total:,} events, "
            f"{lost:,} lost, {writer.batches} batches, {writer.bytes_written:,} bytes "
            f"in {escape(session.opts.output)}{cmd}")
