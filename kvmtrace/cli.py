"""The kvmtrace command: a thin click shell over the library.

record needs root and bcc; report and diff read a recording offline and need
neither. Errors a user can cause print one line and exit non-zero (2; 1 is
kept for "found" with --fail-on / --fail-on-regression). Files are written
only through kvmtrace.outputs: never through a symlink, never over an existing
file without --force, mode 0600. A full disk on stdout is one line (exit 2);
a reader that goes away (``kvmtrace report x | head -1``) ends kvmtrace the
way it ends other unix tools, by SIGPIPE, silently.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import sys

import click

from . import __version__

# what each --threshold is (kvmtrace.analysis.compare): a relative increase
# (0.25 = +25%), or an absolute drop in a share of faults (0..1)
_SHARE_THRESHOLDS = ("levels", "memtype")


def _check_output(output: str | None, force: bool):
    """Refuse an unusable output path at once, before reading any recording."""
    from .outputs import OutputError, check

    if output:
        try:
            check(output, force)
        except OutputError as e:
            _fail(str(e))


def _emit(text: str, output: str | None, force: bool = False):
    """To stdout, or to a file (saying where it went)."""
    from .outputs import OutputError, write_text

    if not output:
        _write_stdout(text)
        return
    try:
        write_text(output, text, force)
    except OutputError as e:
        _fail(str(e))
    click.echo(f"kvmtrace: wrote {output}", err=True)


def _parse_thresholds(values) -> dict:
    from .analysis.compare import DEFAULT_THRESHOLDS

    out = {}
    for v in values:
        name, eq, num = (x.strip() for x in v.partition("="))
        if name not in DEFAULT_THRESHOLDS:
            _fail(f"unknown threshold '{name}' in '{v}' (one of {', '.join(DEFAULT_THRESHOLDS)})")
        pct = num.endswith("%")
        try:
            x = float(num[:-1] if pct else num) / (100 if pct else 1)
        except ValueError:
            x = None
        if not eq or x is None:
            _fail(f"threshold '{v}': expected NAME=NUMBER, e.g. {name}=0.25 or {name}=25%")
        if not math.isfinite(x) or x < 0:
            _fail(f"threshold '{v}': must be a finite number >= 0 (a regression is a move "
                  f"past it in the bad direction)")
        if name in _SHARE_THRESHOLDS and x > 1:
            _fail(f"threshold '{v}': {name} is a drop in the share of faults, between 0 and 1 "
                  f"(0%..100%)")
        out[name] = x
    return out


def _id_option(what: str, low: int, high: int):
    """A --pid / --slot check: a whole number in [low, high], else one line."""
    def check(ctx, param, value):
        if value is not None and not low <= value <= high:
            _fail(f"--{param.name} {value}: {what} must be between {low} and {high}")
        return value
    return check


def _fail(msg: str, code: int = 2):
    try:
        click.echo(f"kvmtrace: {msg}", err=True)
    except OSError:  # stderr gone too: the exit status still says it
        pass
    sys.exit(code)


def _stdout_to_devnull():
    """Point fd 1 at /dev/null, so the interpreter's last flush of what is still
    buffered for stdout succeeds quietly (no "Exception ignored")."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def _output_failed(e: OSError):
    _stdout_to_devnull()
    if e.errno == errno.EPIPE:
        # the reader went away (`| head`): end as cat, grep, ... do, killed by
        # SIGPIPE (status 141 in a shell), printing nothing
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
        sys.exit(128 + signal.SIGPIPE)  # not reached
    _fail(f"writing to standard output failed: {e.strerror or e}")


class _Main(click.Group):
    """The command group; turns a failing stdout (disk full, closed pipe) into
    one line or a quiet SIGPIPE exit instead of a traceback."""

    def invoke(self, ctx):
        try:
            try:
                return super().invoke(ctx)
            finally:
                if sys.stdout is not None:
                    sys.stdout.flush()  # a write error shows here, not at interpreter exit
        except OSError as e:
            # errors on named files are the commands' own (one line already);
            # an unnamed one is a write to stdout / stderr
            if getattr(e, "filename", None) is not None or e.errno is None:
                raise
            _output_failed(e)


def _write_stdout(text: str):
    """All of ``text`` to stdout, or an OSError (EPIPE, ENOSPC, ...).

    Through the binary layer in a loop: with PYTHONUNBUFFERED=1 the text layer
    writes straight to the unbuffered file and drops what a short write left
    (a reader that went away then ends nothing, silently, with status 0)."""
    out = sys.stdout
    if out is None:  # started with stdout closed
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    binary = getattr(out, "buffer", None)
    if binary is None:  # a replaced stream (tests, embedding)
        out.write(text)
        out.flush()
        return
    out.flush()
    # backslashreplace: a string the terminal's encoding cannot show is never a traceback
    view = memoryview(text.encode(out.encoding or "utf-8", "backslashreplace"))
    while view:
        n = binary.write(view)
        if n is None:  # a non-blocking stdout that is full: wait until writable
            import select
            select.select([], [binary.fileno()], [])
            n = 0
        view = view[n:]
    binary.flush()


def _render(draw, to_file: bool) -> str:
    """A rich text view as a string: for a file plain 200 columns; for stdout
    as stdout wants it (a terminal: its width and colours; else 200 columns,
    no colours). Written afterwards in one go by _emit."""
    import io

    from .render import make_console

    class Buf(io.StringIO):
        # rich draws box characters or ASCII by the file's encoding: stdout's
        encoding = "utf-8" if to_file else (getattr(sys.stdout, "encoding", None) or "utf-8")

    buf = Buf()
    if to_file:
        kw = {"width": 200}
    else:
        probe = make_console()
        kw = {"width": probe.width, "force_terminal": probe.is_terminal,
              "color_system": probe.color_system, "no_color": probe.no_color}
    draw(make_console(file=buf, **kw))
    return buf.getvalue()


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmtrace")
def main():
    """Trace how KVM maps guest memory and check the memory types it installs.

    \b
      kvmtrace doctor                      what this host can trace
      kvmtrace record -o vm.kvt -- CMD     record a VMM you launch
      kvmtrace record -o vm.kvt --pid P    record a running VMM (Ctrl-C stops)
      kvmtrace report vm.kvt               memslots, faults, memory types, errors
    """


def _seconds(low: float, high: float | None, what: str):
    """A --duration / --flush-interval value: a finite number of seconds in
    [low, high] (low excluded when 0), else one line and exit 2."""
    def check(ctx, param, value):
        if value is None:
            return None
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        name = "--" + param.name.replace("_", "-")
        ok = math.isfinite(x) and (x > low if low == 0 else x >= low) and (
            high is None or x <= high)
        if not ok:
            rng = f"more than {low:g}" if low == 0 else f"at least {low:g}"
            rng += f" and at most {high:g}" if high is not None else ""
            _fail(f"{name} {value}: {what} must be a number of seconds {rng}")
        return x
    return check


def _ring_pages(ctx, param, value):
    """--buffer-size: a power of two from 1 to 65536 pages (BPF ring buffers
    are a power-of-two number of pages), else one line and exit 2."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1 or n > 65536 or n & (n - 1):
        _fail(f"--buffer-size {value}: a power of two number of pages, 1 to 65536")
    return n


def _record_pids(ctx, param, values):
    """--pid values: whole numbers > 0, else one line and exit 2."""
    out = []
    for v in values:
        try:
            pid = int(v)
        except ValueError:
            pid = 0
        if not 0 < pid < 2**31:
            _fail(f"--pid {v}: a process id is a whole number between 1 and {2**31 - 1}")
        out.append(pid)
    return tuple(out)


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("-o", "--output", required=True, metavar="FILE",
              help="recording file to write (a new file, mode 0600, never through a symlink)")
@click.option("--pid", "pids", multiple=True, metavar="PID", callback=_record_pids,
              help="trace only this process (and its children); repeatable")
@click.option("--duration", metavar="SECONDS", callback=_seconds(0, None, "the duration"),
              help="stop after this many seconds (> 0)")
@click.option("--probes", default="all", show_default=True,
              help="probe set (all, memslots, faults), groups or probe names, comma separated")
@click.option("--force", is_flag=True, help="replace an existing output file")
@click.option("--flush-interval", metavar="SECONDS", default="1",
              callback=_seconds(0.05, 3600, "the flush interval"), show_default=True,
              help="seconds between flushes to disk, 0.05 to 3600 (a SIGKILL loses at most "
                   "this much)")
@click.option("-m", "--buffer-size", "buffer_pages", metavar="PAGES", callback=_ring_pages,
              help="pages (4 KiB) of each fault-path ring buffer, a power of two "
                   "(default 1024 = 4 MiB; perf's -m habit)")
@click.option("--leave-running", is_flag=True,
              help="COMMAND outlives record: not stopped when recording stops, not killed "
                   "if record dies")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(output, pids, duration, probes, force, flush_interval, buffer_pages, leave_running,
           command):
    """Record memslots, faults and sptes to OUTPUT.

    Traces every VM on the host, the given --pid(s), or COMMAND (after --),
    stopping when it exits. SIGINT (Ctrl-C), SIGTERM, SIGHUP and SIGQUIT stop
    cleanly: COMMAND gets SIGTERM (SIGKILL 3 s later; at once on a second
    signal) and the file is closed with everything captured. COMMAND never
    outlives record (it is killed if record is), unless --leave-running.

    \b
    Exit status: 0 stopped by a signal or --duration; COMMAND's own status
    when it exited by itself (128+N: killed by signal N); 2 usage error
    (nothing recorded); 1 the recording failed; 128+N stop signal N came
    before recording began (nothing recorded).
    """
    try:  # Ctrl-C while numpy / pyarrow / bcc load: one line too, not a traceback
        from .collectors.live import LiveView
        from .collectors.session import Options, RecordError, Session
    except KeyboardInterrupt:
        _fail("stopped by SIGINT before recording began; nothing written", 128 + 2)

    if leave_running and not command:
        _fail("--leave-running needs a COMMAND to launch (after --)")
    if command and not command[0]:
        _fail("empty COMMAND name after --")
    if os.geteuid() != 0:
        _fail("record needs root (BPF and tracefs); try: sudo kvmtrace record ...")
    opts = Options(output=output, probes=probes, pids=tuple(pids), command=tuple(command),
                   duration=duration, flush_s=flush_interval, force=force,
                   leave_running=leave_running, buffer_pages=buffer_pages)
    try:
        stats = Session(opts).run(live=LiveView())
    except RecordError as e:
        _fail(str(e), e.code)
    except KeyboardInterrupt:  # before Session installed its handlers
        _fail("stopped by SIGINT before recording began; nothing written", 128 + 2)
    sys.exit(stats.exit_code)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def doctor(fmt):
    """What this host can trace, tried rather than guessed.

    Exits non-zero, with the fix, when recording is impossible here.
    """
    import json

    from rich.markup import escape
    from rich.table import Table

    from . import doctor as doc

    checks = doc.run()
    blocked = [c for c in checks if c.blocks_record and not c.ok]
    if fmt == "json":
        _emit(json.dumps({"can_record": not blocked,
                          "checks": [c.__dict__ for c in checks]}, indent=1) + "\n", None)
    else:
        t = Table(title="kvmtrace doctor", title_justify="left")
        for c in ("check", "", "detail"):
            t.add_column(c, overflow="fold")
        for c in checks:
            mark = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[c.ok]
            detail = escape(c.detail) + (f"\n[yellow]fix:[/] {escape(c.fix)}"
                                         if c.fix and not c.ok else "")
            t.add_row(escape(c.name), mark, detail)
        verdict = ("[green]record can run here[/]" if not blocked else
                   "[red]record cannot run here:[/] " + escape("; ".join(
                       f"{c.name}: {c.fix or c.detail}" for c in blocked)))

        def draw(console):
            console.print(t)
            console.print(verdict)
        _emit(_render(draw, False), None)
    sys.exit(1 if blocked else 0)


@main.command()
@click.argument("recording", type=click.Path(dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv", "html"]),
              default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(),
              help="write the report here instead of stdout (html: default report.html); "
                   "a new file, mode 0600, never through a symlink")
@click.option("--force", is_flag=True, help="replace an existing output file")
@click.option("--pid", type=int, callback=_id_option("a process id", 1, 2**31 - 1),
              help="only this VMM process")
@click.option("--slot", type=int, callback=_id_option("a memslot id", 0, 2**32 - 1),
              help="only this memslot id")
@click.option("--table", type=click.Choice(["slots", "ops", "faults", "ranges", "verdicts",
                                             "errors", "vmas", "lost"]),
              help="json / csv: just this table (csv default: slots)")
@click.option("--fail-on", "fail_on", type=click.Choice(["mismatch", "error", "loss"]),
              multiple=True,
              help="exit 1 when a memory-type mismatch (downgraded / upgraded), an error "
                   "(rejected memslot, failed fault) or lost events are found; repeatable")
def report(recording, fmt, pid, slot, table, fail_on, output, force):
    """Analyse RECORDING offline: memslots, faults, memory types, errors.

    Needs neither root nor bcc.
    """
    from . import render
    from .analysis.model import build
    from .recording.reader import RecordingError

    _check_output(output or ("report.html" if fmt == "html" else None), force)
    try:
        model = build(recording)
    except RecordingError as e:
        _fail(str(e))
    if fmt == "text":
        _emit(_render(lambda con: render.to_text(model, con, pid, slot), bool(output)),
              output, force)
    elif fmt == "json":
        _emit(render.to_json(model, pid, slot, table) + "\n", output, force)
    elif fmt == "csv":
        _emit(render.to_csv(model, pid, slot, table), output, force)
    elif fmt == "html":
        from .html import report_html
        _emit(report_html(model, render.tables(model, pid, slot)), output or "report.html",
              force)
    v = model.verdicts
    if "mismatch" in fail_on and v["verdict"].isin(["downgraded", "upgraded"]).any():
        click.echo("kvmtrace: memory-type mismatch found", err=True)
        sys.exit(1)
    if "error" in fail_on and len(model.errors):
        click.echo(f"kvmtrace: {len(model.errors)} error(s) found", err=True)
        sys.exit(1)
    lost = int(model.lost["lost"].sum()) if len(model.lost) else 0
    if "loss" in fail_on and lost:
        click.echo(f"kvmtrace: {lost:,} events lost while recording", err=True)
        sys.exit(1)


@main.command()
@click.argument("base", type=click.Path(dir_okay=True))
@click.argument("new", type=click.Path(dir_okay=True))
@click.option("--metric", "metrics", multiple=True,
              type=click.Choice(["latency", "faults", "levels", "memtype", "invalidations",
                                 "exits", "errors", "backing"]),
              help="compare only these (repeatable; default all)")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="regression threshold, e.g. latency=0.25 (median +25%, CI must clear it), "
                   "faults=10%, levels=0.1, memtype, invalidations, exits (repeatable)")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "html"]), default="text",
              show_default=True)
@click.option("-o", "--output", type=click.Path(),
              help="write here instead of stdout (html: default diff.html); a new file, "
                   "mode 0600, never through a symlink")
@click.option("--force", is_flag=True, help="replace an existing output file")
@click.option("--fail-on-regression", is_flag=True, help="exit 1 when a regression is found")
def diff(base, new, metrics, thresholds, fmt, output, force, fail_on_regression):
    """What got slower or changed from BASE to NEW, and why.

    Slots are matched by GPA range and size; a changed backing or flags
    (dirty logging) is named as the cause of what moved.
    """
    from . import render
    from .analysis.compare import METRICS, compare
    from .analysis.model import build
    from .recording.reader import RecordingError

    thr = _parse_thresholds(thresholds)
    _check_output(output or ("diff.html" if fmt == "html" else None), force)
    try:
        mb, mn = build(base), build(new)
    except RecordingError as e:
        _fail(str(e))
    c = compare(mb, mn, thr, metrics or METRICS)
    if fmt == "text":
        _emit(_render(lambda con: render.diff_to_text(mb, mn, c, con), bool(output)),
              output, force)
    elif fmt == "json":
        _emit(render.diff_to_json(mb, mn, c) + "\n", output, force)
    else:
        from .html import diff_html
        _emit(diff_html(mb, mn, c), output or "diff.html", force)
    if fail_on_regression and c.regressions:
        sys.exit(1)


@main.command()
@click.option("--pid", required=True, type=int, callback=_id_option("a process id", 1, 2**31 - 1),
              help="the VMM process")
@click.option("--gpa", metavar="A[+SIZE]",
              help="guest-physical range (SIZE default one page; 0x hex, K/M/G suffixes)")
@click.option("--hva", metavar="A[+SIZE]", help="host-virtual range in the VMM")
@click.option("--slot", type=int, callback=_id_option("a memslot id", 0, 2**32 - 1),
              help="one memslot (as_id << 16 | slot, as in KVM_SET_USER_MEMORY_REGION)")
@click.option("--vm-fd", type=int, callback=_id_option("a file descriptor", 0, 2**31 - 1),
              help="only this VM fd of the process (default: all its VMs)")
@click.option("--window", metavar="SECONDS", default="0",
              callback=lambda ctx, param, v: 0.0 if v in (None, "0") else
              _seconds(0, 3600, "the recording window")(ctx, param, v),
              help="also record this long and show what KVM installs meanwhile (x86 has no "
                   "page-table dump; default 0: don't record)")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def query(pid, gpa, hva, slot, vm_fd, window, fmt):
    """The memory type of a guest range of a running VM, now.

    Per memslot: GPA, HVA, flags; the VMA behind it with its VM_* flags and
    the memory type its vm_page_prot selects; what KVM installed (seen in a
    --window recording); who decides the final type on this host; a verdict.
    Memslots and VMAs are read live by BPF iterators (root).

    \b
    Exit status: 0 consistent, 1 mismatch (downgraded / upgraded), 2 cannot
    tell (the reason on stderr) or a usage error.
    """
    import json

    from .analysis import query as q

    if sum(x is not None for x in (gpa, hva, slot)) > 1:
        _fail("give one of --gpa, --hva, --slot")
    try:
        g = q.parse_range(gpa, "--gpa") if gpa is not None else None
        h = q.parse_range(hva, "--hva") if hva is not None else None
    except q.QueryError as e:
        _fail(str(e))
    if os.geteuid() != 0:
        _fail("query needs root (BPF iterators, /proc/PID of another process); try: "
              "sudo kvmtrace query ...")
    if not os.path.exists(f"/proc/{pid}"):
        _fail(f"--pid {pid}: no such process")
    from . import query as run_query  # kvmtrace.query()
    from .collectors.snapshot import SnapshotError

    rng = g or h
    try:
        df = run_query(pid, gpa=g[0] if g else None, hva=h[0] if h else None,
                       size=rng[1] if rng else None, slot=slot, window=window, vm_fd=vm_fd)
    except (SnapshotError, q.QueryError) as e:
        _fail(str(e))
    if fmt == "json":
        _emit(json.dumps({k: v for k, v in df.attrs.items()} | {"rows": q.to_records(df)},
                         indent=1, default=str) + "\n", None)
    else:
        _emit(q.to_text(df), None)
    code = df.attrs["exit_code"]
    if code == 2:
        click.echo(f"kvmtrace: cannot tell: {q.first_unknown(df)}", err=True)
    elif code == 1:
        bad = df[df["verdict"].isin(q.MISMATCH)].iloc[0]
        click.echo(f"kvmtrace: mismatch: slot {bad['slot']}: {bad['reason']}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
