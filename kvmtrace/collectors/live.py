"""Progress on stderr while recording: events/s and lost events per probe.

A terminal gets a rich live table; a log (CI, a pipe) gets one line per
10 seconds so it stays readable.
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


class LiveView:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._live = None
        self._last = {}
        self._last_t = time.monotonic()
        self._last_line = 0.0

    def start(self, session):
        self._last_t = time.monotonic()
        if self.console.is_terminal:
            self._live = Live(self._table(session, None, {}), console=self.console,
                              refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self.console.print(f"kvmtrace: recording to {session.opts.output} "
                               f"(Ctrl-C or SIGTERM stops)")

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
                        f"-> {session.opts.output}", title_justify="left")
        for col in ("event", "events", "events/s", "lost"):
            t.add_column(col, justify="left" if col == "event" else "right")
        for k in sorted(set(session.stats.events) | set(session.stats.lost)):
            lost = session.stats.lost.get(k, 0)
            t.add_row(k, f"{session.stats.events.get(k, 0):,}", f"{rates.get(k, 0):,.0f}",
                      f"[red]{lost:,}[/]" if lost else "0")
        return t

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

    def stop(self, session, writer):
        if self._live:
            self._live.update(self._table(session, writer, self._rates(session)))
            self._live.stop()
        total = sum(session.stats.events.values())
        lost = sum(session.stats.lost.values())
        self.console.print(
            f"kvmtrace: stopped ({session.stats.stopped_by or 'done'}) after "
            f"{time.monotonic() - session.stats.started:.1f} s: {total:,} events, "
            f"{lost:,} lost, {writer.batches} batches, {writer.bytes_written:,} bytes "
            f"in {session.opts.output}")
