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
import re
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


def _emit(text, output: str | None, force: bool = False):
    """To stdout, or to a file (saying where it went); ``text``: a string or an
    iterable of strings (a streamed report, written as it is made)."""
    from .outputs import OutputError, write_text

    if not output:
        for chunk in ([text] if isinstance(text, str) else text):
            _write_stdout(chunk)
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

    def main(self, *args, **kw):
        # `python -m kvmtrace.cli` too: usage lines, the man page and shell
        # completion (_KVMTRACE_COMPLETE=bash_source kvmtrace) say kvmtrace
        kw.setdefault("prog_name", "kvmtrace")
        kw.setdefault("complete_var", "_KVMTRACE_COMPLETE")
        return super().main(*args, **kw)

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


# spaces (and rich's colour codes around them) at the end of a line
_TRAILING = re.compile(r"(?:[ ]|\x1b\[[0-9;]*m)+$", re.M)


def _render(draw, to_file: bool, width: int | None = None) -> str:
    """A rich text view as a string, ``width`` columns wide: by default for a
    file plain 200 columns; for stdout as stdout wants it (a terminal: its
    width and colours; else 200 columns, no colours). Tables fit the width
    (render.fit_table); no line ends in padding. Written afterwards in one go
    by _emit."""
    import io

    from .render import make_console

    class Buf(io.StringIO):
        # rich draws box characters or ASCII by the file's encoding: stdout's
        encoding = "utf-8" if to_file else (getattr(sys.stdout, "encoding", None) or "utf-8")

    buf = Buf()
    if to_file:
        kw = {"width": width or 200}
    else:
        probe = make_console()
        kw = {"width": width or probe.width, "force_terminal": probe.is_terminal,
              "color_system": probe.color_system, "no_color": probe.no_color}
    draw(make_console(file=buf, **kw))
    return _TRAILING.sub(lambda m: "".join(re.findall(r"\x1b\[[0-9;]*m", m.group())),
                         buf.getvalue())


def _width_option(ctx, param, value):
    """--width: 40 to 10000 columns, else one line and exit 2."""
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 40 <= n <= 10000:
        _fail(f"--width {value}: a number of columns from 40 to 10000")
    return n


WIDTH = click.option("--width", metavar="COLUMNS", callback=_width_option,
                     help="text: fit tables to this many columns (default: the terminal's; "
                          "200 in a pipe or file); narrower tables drop box lines, then "
                          "low-value columns, never split a number")


def _text_only(fmt: str, width, table=None, tables=()):
    """Options that only shape some formats are refused elsewhere, never ignored."""
    if width is not None and fmt != "text":
        _fail(f"--width applies to --format text, not {fmt}")
    if table is not None and fmt not in tables:
        _fail(f"--table applies to --format {', '.join(tables)}, not {fmt} "
              f"(which shows every table)")


def _incomplete(model) -> str:
    """One line when the recording is incomplete or damaged, else ''."""
    rec = model.recording
    if rec.complete and not rec.problems:
        return ""
    from .render import plain

    more = f" (+{len(rec.problems) - 1} more)" if len(rec.problems) > 1 else ""
    why = plain(rec.problems[0])[:300] + more if rec.problems else "not complete"
    return f"{plain(rec.path)}: recording incomplete or damaged: {why}"


def _need_plots():
    """--format html: one line when matplotlib is missing (an optional extra)."""
    from . import plots

    if not plots.available():
        _fail(plots.MISSING)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmtrace")
def main():
    """Trace how KVM maps guest memory and check the memory types it installs.

    \b
      kvmtrace doctor                      what this host can trace
      kvmtrace probes                      every probe point; which attach here
      kvmtrace record -o vm.kvt -- CMD     record a VMM you launch
      kvmtrace record -o vm.kvt -p PID     record a running VMM (Ctrl-C stops)
      kvmtrace report vm.kvt               memslots, faults, memory types, errors
      kvmtrace report vm.kvt --format tsv  the same tables for grep / awk / cut
      kvmtrace diff base.kvt new.kvt       what got slower or changed, and why

    \b
    Shell completion (bash; zsh and fish the same with zsh_source / fish_source):
      eval "$(_KVMTRACE_COMPLETE=bash_source kvmtrace)"
    Manual: man ./docs/kvmtrace.1 (made from this help by scripts/manpage).
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
@click.option("-p", "--pid", "pids", multiple=True, metavar="PID", callback=_record_pids,
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
              help="pages (of the host's page size) of each fault-path ring buffer, a "
                   "power of two (default: 4 MiB of pages; perf's -m habit)")
@click.option("--leave-running", is_flag=True,
              help="COMMAND outlives record: not stopped when recording stops, not killed "
                   "if record dies")
@click.option("--no-cache", is_flag=True,
              help="compile the BPF program even if the compile cache "
                   "(/var/cache/kvmtrace/bpf) holds it")
@click.option("--qmp", "qmp", multiple=True, metavar="SOCKET|auto",
              help="QEMU's QMP unix socket: name each memslot after QEMU's memory region "
                   "(its `info mtree -f`, asked after memslot changes); 'auto' takes it from "
                   "COMMAND's -qmp unix:PATH; repeatable. QEMU serves one QMP client per "
                   "socket: give one no other tool uses")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(output, pids, duration, probes, force, flush_interval, buffer_pages, leave_running,
           no_cache, qmp, command):
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
    if qmp:
        from .collectors import qmp as qmp_mod
        try:
            qmp = tuple(qmp_mod.resolve(qmp, tuple(command)))
        except qmp_mod.QmpError as e:
            _fail(str(e))
    if os.geteuid() != 0:
        _fail("record needs root (BPF and tracefs); try: sudo kvmtrace record ...")
    opts = Options(output=output, probes=probes, pids=tuple(pids), command=tuple(command),
                   duration=duration, flush_s=flush_interval, force=force,
                   leave_running=leave_running, buffer_pages=buffer_pages,
                   cache=False if no_cache else None, qmp=tuple(qmp))
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
@WIDTH
def doctor(fmt, width):
    """What this host can trace, tried rather than guessed.

    Exits non-zero, with the fix, when recording is impossible here. Run as
    an ordinary user it says what that user lacks (root, CAP_BPF, access to
    tracefs) rather than guessing at the rest.
    """
    import json

    from rich.markup import escape
    from rich.text import Text

    from . import doctor as doc
    from .render import Col, _c, fit_table

    _text_only(fmt, width)
    checks = doc.run()
    blocked = [c for c in checks if c.blocks_record and not c.ok]
    if fmt == "json":
        _emit(json.dumps({"can_record": not blocked,
                          "checks": [c.__dict__ for c in checks]}, indent=1) + "\n", None)
    else:
        rows = []
        for c in checks:
            mark = {True: _c("yes", "green"), False: _c("no", "red"), None: _c("")}[c.ok]
            detail = Text.assemble(_c(c.detail), *((("\nfix: ", "yellow"), _c(c.fix))
                                                   if c.fix and not c.ok else ()))
            rows.append([c.name, mark, detail])
        verdict = ("[green]record can run here[/]" if not blocked else
                   "[red]record cannot run here:[/] " + escape("; ".join(
                       f"{c.name}: {c.fix or c.detail}" for c in blocked)))

        def draw(console):
            fit_table(console, "kvmtrace doctor",
                      [Col("check"), Col(""), Col("detail", "prose", min=30)], rows)
            console.print(verdict)
        _emit(_render(draw, False, width), None)
    sys.exit(1 if blocked else 0)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@WIDTH
def probes(fmt, width):
    """Every probe point kvmtrace knows, and whether it can attach here.

    Nothing is loaded: the answer comes from the checks record makes before
    it builds its program (tracepoint formats in tracefs, kprobes, kallsyms,
    the kernel's BTF) and this user's privileges; `kvmtrace doctor` loads
    them for real. Names and groups are what `record --probes` takes.
    Without root, a tracepoint's presence cannot be read (tracefs is root's):
    such probes show as "?" with the reason.
    """
    import json

    from . import doctor as doc
    from .probes.catalogue import GROUPS
    from .render import Col, _c, fit_table

    _text_only(fmt, width)
    host, table = doc.probe_table()
    if fmt == "json":
        _emit(json.dumps({"host_problems": host, "groups": GROUPS, "probes": table}, indent=1)
              + "\n", None)
        return
    mark = {True: _c("yes", "green"), False: _c("no", "red"), None: _c("?", "yellow")}
    rows = [[p["name"], p["group"], p["type"], mark[p["attach"]],
             p["why"] or p["doc"]] for p in table]
    n = sum(p["attach"] is True for p in table)

    def draw(console):
        for line in host:
            console.print(_c(f"note: {line}", "yellow"))
        fit_table(console, f"kvmtrace probes: {n} of {len(table)} can attach here",
                  [Col("probe"), Col("group"), Col("type", drop=1), Col("here"),
                   Col("why not / what it traces", "prose", min=24)], rows)
    _emit(_render(draw, False, width), None)


FAIL_ON = ("mismatch", "error", "loss", "truncated")


@main.command()
@click.argument("recording", type=click.Path(dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["text", "tsv", "json", "csv", "html"]),
              default="text", show_default=True,
              help="text: tables for people, fitted to the terminal; tsv: tab-separated "
                   "tables for grep / awk / cut; json, csv: every column (docs/tables.md); "
                   "html: one file with plots (needs matplotlib: pip install 'kvmtrace[html]')")
@click.option("-o", "--output", type=click.Path(), metavar="FILE",
              help="write the report to FILE instead of stdout, in any format; html without "
                   "-o writes ./report.html, never over an existing file without --force. "
                   "A new file, mode 0600, never through a symlink")
@click.option("--force", is_flag=True, help="replace an existing output file")
@click.option("-p", "--pid", type=int, callback=_id_option("a process id", 1, 2**31 - 1),
              help="only this VMM process")
@click.option("--slot", type=int, callback=_id_option("a memslot id", 0, 2**32 - 1),
              help="only this memslot id")
@click.option("--table", type=click.Choice(["slots", "ops", "faults", "ranges", "verdicts",
                                             "errors", "vmas", "lost"]),
              help="only this table (text, tsv, json, csv; csv default: slots)")
@click.option("--fail-on", "fail_on", type=click.Choice([*FAIL_ON, "any"]), multiple=True,
              help="exit 1 when found: mismatch (a memory type downgraded / upgraded), error "
                   "(a rejected memslot, a failed fault), loss (lost events), truncated (the "
                   "recording is incomplete: cut short, not closed or damaged; a warning on "
                   "stderr says so in any case); any: all of these. Repeatable")
@WIDTH
def report(recording, fmt, pid, slot, table, fail_on, output, force, width):
    """Analyse RECORDING offline: memslots, faults, memory types, errors.

    Needs neither root nor bcc. A directory of recordings, a quoted glob or a
    Parquet dataset from kvmtrace export gets the fleet summary instead (as
    kvmtrace fleet: per host, kernel, KVM flavour and VMM).

    \b
    Exit status: 0 done; 1 something --fail-on names was found; 2 usage error
    or an unreadable recording (one line on stderr).
    """
    from . import render
    from .analysis.model import build
    from .recording.reader import RecordingError

    if os.path.isdir(recording) or (not os.path.exists(recording)
                                    and any(c in recording for c in "*?[")):
        # many recordings (a directory, a glob, a Parquet dataset): the fleet summary
        if pid is not None or slot is not None or table or fmt == "html":
            _fail(f"{recording}: many recordings are summarised per host, kernel and VMM "
                  "(kvmtrace fleet); --pid, --slot, --table and html apply to one recording")
        fleet_fail = {"truncated": "incomplete"}
        want = FAIL_ON if "any" in fail_on else fail_on
        ctx = click.get_current_context()
        return ctx.invoke(fleet, inputs=(recording,), engine="duckdb", scheduler=None,
                          workers=None, fmt=fmt, output=output, force=force,
                          skip_unreadable=False,
                          fail_on=tuple(fleet_fail.get(w, w) for w in want), width=width)
    _text_only(fmt, width, table, ("text", "tsv", "json", "csv"))
    if fmt == "html":
        _need_plots()
    _check_output(output or ("report.html" if fmt == "html" else None), force)
    try:
        # html plots from the raw events; the other views never read them again, and
        # but for the per-fault rows (--table faults, the whole TSV report) they read
        # the faults only as per-slot aggregates, made window by window
        model = build(recording, keep_raw=fmt == "html",
                      lean=fmt in ("text", "json", "csv") and table != "faults")
    except RecordingError as e:
        _fail(str(e))
    if fmt == "text":
        _emit(_render(lambda con: render.to_text(model, con, pid, slot, table), bool(output),
                      width), output, force)
    elif fmt == "tsv":
        _emit(render.to_tsv(model, pid, slot, table), output, force)
    elif fmt == "json":
        _emit(render.json_chunks(model, pid, slot, table, end="\n"), output, force)
    elif fmt == "csv":
        _emit(render.csv_chunks(model, pid, slot, table), output, force)
    elif fmt == "html":
        from .html import report_html
        _emit(report_html(model, render.tables(model, pid, slot)), output or "report.html",
              force)
    incomplete = _incomplete(model)
    want = set(FAIL_ON) if "any" in fail_on else set(fail_on)
    found = []
    if "mismatch" in want and model.verdicts["verdict"].isin(["downgraded", "upgraded"]).any():
        found.append("memory-type mismatch found")
    if "error" in want and len(model.errors):
        found.append(f"{len(model.errors)} error(s) found")
    lost = int(model.lost["lost"].sum()) if len(model.lost) else 0
    if "loss" in want and lost:
        found.append(f"{lost:,} events lost while recording")
    if "loss" in want and model.skipped:
        found.append(f"the kernel skipped the probe programs {sum(model.skipped.values()):,} "
                     "times while recording")
    if "truncated" in want and incomplete:
        found.append(incomplete)
    elif incomplete:
        click.echo(f"kvmtrace: warning: {incomplete}", err=True)
    for line in found:
        click.echo(f"kvmtrace: {line}", err=True)
    if found:
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
@click.option("--format", "fmt", type=click.Choice(["text", "tsv", "json", "html"]),
              default="text", show_default=True,
              help="text: tables for people; tsv: the slots, latency, vms and findings tables "
                   "tab-separated, for grep / awk / cut; json; html: one file with plots "
                   "(needs matplotlib: pip install 'kvmtrace[html]')")
@click.option("-o", "--output", type=click.Path(), metavar="FILE",
              help="write to FILE instead of stdout, in any format; html without -o writes "
                   "./diff.html, never over an existing file without --force. A new file, "
                   "mode 0600, never through a symlink")
@click.option("--force", is_flag=True, help="replace an existing output file")
@click.option("--fail-on-regression", is_flag=True, help="exit 1 when a regression is found")
@click.option("--allow-arch-mismatch", is_flag=True,
              help="compare recordings of different architectures (refused otherwise: their "
                   "fault paths, page sizes and memory types differ)")
@WIDTH
def diff(base, new, metrics, thresholds, fmt, output, force, fail_on_regression,
         allow_arch_mismatch, width):
    """What got slower or changed from BASE to NEW, and why.

    Slots are matched by GPA range and size; a changed backing or flags
    (dirty logging) is named as the cause of what moved.

    \b
    Exit status: 0 done; 1 --fail-on-regression and a regression found; 2
    usage error, an unreadable recording, or BASE and NEW of different
    architectures without --allow-arch-mismatch (one line on stderr).
    """
    from . import render
    from .analysis.compare import METRICS, compare
    from .analysis.model import build
    from .recording.reader import RecordingError

    _text_only(fmt, width)
    thr = _parse_thresholds(thresholds)
    if fmt == "html":
        _need_plots()
    _check_output(output or ("diff.html" if fmt == "html" else None), force)
    try:
        mb, mn = build(base), build(new)
    except RecordingError as e:
        _fail(str(e))
    ab, an = mb.meta.get("arch"), mn.meta.get("arch")
    if ab and an and ab != an and not allow_arch_mismatch:
        from .render import plain
        _fail(f"BASE is {plain(ab)} and NEW is {plain(an)}: recordings of different "
              "architectures are not comparable (fault paths, page sizes, memory types); "
              "--allow-arch-mismatch compares them anyway")
    c = compare(mb, mn, thr, metrics or METRICS)
    if fmt == "text":
        _emit(_render(lambda con: render.diff_to_text(mb, mn, c, con), bool(output), width),
              output, force)
    elif fmt == "tsv":
        _emit(render.diff_to_tsv(mb, mn, c), output, force)
    elif fmt == "json":
        _emit(render.diff_to_json(mb, mn, c) + "\n", output, force)
    else:
        from .html import diff_html
        _emit(diff_html(mb, mn, c), output or "diff.html", force)
    for side, m in (("BASE", mb), ("NEW", mn)):
        if _incomplete(m):
            click.echo(f"kvmtrace: warning: {side} {_incomplete(m)}", err=True)
    if fail_on_regression and c.regressions:
        sys.exit(1)


@main.command()
@click.option("-p", "--pid", required=True, type=int,
              callback=_id_option("a process id", 1, 2**31 - 1),
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


# -- export and fleet (kvmtrace/export, kvmtrace/fleet.py) --------------------

_PERFETTO_SUFFIXES = (".pftrace", ".perfetto-trace", ".perfetto")


@main.command()
@click.argument("out", type=click.Path())
@click.argument("recordings", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["parquet", "perfetto"]),
              help="parquet: OUT is a dataset directory (the default); perfetto: OUT is a "
                   "trace file (the default when OUT ends in .pftrace)")
@click.option("--force", is_flag=True,
              help="parquet: replace the dataset at OUT (only if an export wrote all of it), "
                   "or with --append the recordings already in it; perfetto: replace OUT")
@click.option("--append", is_flag=True, help="parquet: add the recordings to the dataset at OUT")
def export(out, recordings, fmt, force, append):
    """Export recordings for other tools: Parquet (DuckDB, polars, Spark) or Perfetto.

    \b
      kvmtrace export --format parquet DIR a.kvt b.kvt   one dataset, Hive-partitioned:
                                    DIR/<table>/host=H/recording=R/part-0.parquet
      kvmtrace export --append DIR c.kvt                 add to it
      kvmtrace export --format perfetto vm.pftrace vm.kvt   open in ui.perfetto.dev

    The dataset holds the raw events (DIR/raw/<kind>), the derived tables
    (docs/tables.md) and the recordings and processes tables. Files are 0600,
    directories 0700, nothing is written through a symlink, and OUT must be
    new or empty unless --append or --force.
    """
    from . import outputs
    from .export import ExportError

    if fmt is None:
        fmt = "perfetto" if out.endswith(_PERFETTO_SUFFIXES) else "parquet"
    try:
        if fmt == "perfetto":
            if append:
                _fail("--append applies to --format parquet (a trace holds one recording)")
            if len(recordings) != 1:
                _fail("--format perfetto takes one recording (a trace has one clock)")
            _check_output(out, force)
            from .export import perfetto as pf
            size = pf.export(recordings[0], out, force)
            click.echo(f"kvmtrace: wrote {out} ({size:,} bytes; open it at "
                       "ui.perfetto.dev)", err=True)
            return
        from .export import parquet as pq

        done = pq.export(recordings, out, force=force, append=append)
        for d in done:  # said once all of it is in place (a failure leaves OUT as it was)
            click.echo(f"kvmtrace: {d['path']} -> host={d['host']}/recording={d['id']} "
                       f"({d['rows']['faults']:,} faults)", err=True)
        click.echo(f"kvmtrace: wrote {out} ({len(done)} recording(s))", err=True)
    except (ExportError, outputs.OutputError) as e:
        _fail(str(e))


def _workers(ctx, param, value):
    if value is not None and not 1 <= value <= 256:
        _fail(f"--workers {value}: from 1 to 256 worker processes")
    return value


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="PATH...")
@click.option("--engine", type=click.Choice(["duckdb", "dask"]), default="duckdb",
              show_default=True, help="duckdb: in-process; dask: on Dask distributed")
@click.option("--scheduler", metavar="ADDRESS",
              help="dask: an existing scheduler, e.g. tcp://10.0.0.1:8786 (its workers must "
                   "see the dataset's files; default: a local cluster)")
@click.option("--workers", type=int, callback=_workers,
              help="dask local cluster: worker processes (default 2)")
@click.option("--format", "fmt", type=click.Choice(["text", "tsv", "json", "csv"]),
              default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(),
              help="write here instead of stdout (a new file, mode 0600, never through a "
                   "symlink)")
@click.option("--force", is_flag=True, help="replace an existing output file")
@click.option("--skip-unreadable", is_flag=True,
              help="leave out (and name) files that are not readable recordings instead of "
                   "stopping at the first")
@click.option("--fail-on", "fail_on", multiple=True,
              type=click.Choice(["mismatch", "error", "loss", "incomplete", "unreadable"]),
              help="exit 1 when the fleet has memory-type mismatches, errors, lost events, "
                   "incomplete recordings or (with --skip-unreadable) unreadable files")
@WIDTH
def fleet(inputs, engine, scheduler, workers, fmt, output, force, skip_unreadable, fail_on,
          width):
    """Summarise many recordings per host, kernel, KVM flavour and VMM.

    PATH: .kvt recordings, directories of them, globs (quoted: 'logs/*/*.kvt')
    or Parquet datasets from kvmtrace export. Per group: recordings, verdicts,
    mismatches, errors, faults, fault service time p50 / p90 / p99 (nearest
    rank) and lost events, computed over the Parquet export (recordings are
    exported to a temporary dataset first) by DuckDB, or by Dask distributed
    with --engine dask. The same rows either way.
    """
    from . import fleet as fl

    _text_only(fmt, width)
    if engine != "dask" and (scheduler or workers is not None):
        _fail("--scheduler and --workers apply to --engine dask")
    if scheduler and workers is not None:
        _fail("--workers sizes a local cluster; with --scheduler the cluster is yours")
    _check_output(output, force)
    if engine == "dask":
        import logging
        logging.getLogger("distributed").setLevel(logging.ERROR)
    try:
        f = fl.summarise(inputs, engine=engine, scheduler=scheduler, workers=workers or 2,
                         skip_unreadable=skip_unreadable)
    except (fl.FleetError, fl.ExportError) as e:
        _fail(str(e))
    for p, why in f.skipped:
        click.echo(f"kvmtrace: skipped {why}", err=True)
    if fmt == "text":
        _emit(_render(lambda con: fl.to_text(f, con), bool(output), width), output, force)
    elif fmt == "json":
        _emit(fl.to_json(f), output, force)
    elif fmt == "csv":
        _emit(f.summary.to_csv(index=False), output, force)
    else:
        from .analysis import schema
        from .render import tsv_table
        _emit(tsv_table(f.summary, schema.FLEET), output, force)
    for what in fail_on:
        line = fl.found(f, what)
        if line:
            click.echo(f"kvmtrace: {line}", err=True)
            sys.exit(1)


if __name__ == "__main__":
    main()
