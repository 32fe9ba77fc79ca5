"""The kvmtrace command: a thin click shell over the library.

record needs root and bcc; report and diff read a recording offline and need
neither. Errors a user can cause print one line and exit non-zero.
"""

from __future__ import annotations

import os
import sys

import click

from . import __version__


def _emit(text: str, output: str | None):
    """To stdout, or to a file (saying where it went)."""
    if not output:
        click.echo(text, nl=False)
        return
    try:
        with open(output, "w") as f:
            f.write(text)
    except OSError as e:
        _fail(f"{output}: {e.strerror}")
    click.echo(f"kvmtrace: wrote {output}", err=True)


def _parse_thresholds(values) -> dict:
    from .analysis.compare import DEFAULT_THRESHOLDS

    out = {}
    for v in values:
        name, _, num = v.partition("=")
        if name not in DEFAULT_THRESHOLDS:
            _fail(f"unknown threshold '{name}' (one of {', '.join(DEFAULT_THRESHOLDS)})")
        try:
            out[name] = float(num.rstrip("%")) / (100 if num.endswith("%") else 1)
        except ValueError:
            _fail(f"threshold '{v}': expected NAME=NUMBER, e.g. latency=0.25 or latency=25%")
    return out


def _fail(msg: str, code: int = 2):
    click.echo(f"kvmtrace: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvmtrace")
def main():
    """Trace how KVM maps guest memory and check the memory types it installs.

    \b
      kvmtrace doctor                      what this host can trace
      kvmtrace record -o vm.kvt -- CMD     record a VMM you launch
      kvmtrace record -o vm.kvt --pid P    record a running VMM (Ctrl-C stops)
      kvmtrace report vm.kvt               memslots, faults, memory types, errors
    """


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="recording file to write")
@click.option("--pid", "pids", multiple=True, type=int,
              help="trace only this process (and its children); repeatable")
@click.option("--duration", type=float, help="stop after this many seconds")
@click.option("--probes", default="all", show_default=True,
              help="probe set (all, memslots, faults), groups or probe names, comma separated")
@click.option("--force", is_flag=True, help="overwrite an existing output file")
@click.option("--flush-interval", type=float, default=1.0, show_default=True,
              help="seconds between flushes to disk")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(output, pids, duration, probes, force, flush_interval, command):
    """Record memslots, faults and sptes to OUTPUT.

    Traces every VM on the host, the given --pid(s), or COMMAND (after --),
    stopping when it exits. Ctrl-C or SIGTERM stop cleanly; the file holds
    everything captured until then.
    """
    from .collectors.live import LiveView
    from .collectors.session import Options, RecordError, Session

    if os.path.exists(output) and not force:
        _fail(f"{output} exists; use --force to overwrite it")
    if os.geteuid() != 0:
        _fail("record needs root (BPF and tracefs); try: sudo kvmtrace record ...")
    opts = Options(output=output, probes=probes, pids=tuple(pids), command=tuple(command),
                   duration=duration, flush_s=flush_interval)
    try:
        stats = Session(opts).run(live=LiveView())
    except RecordError as e:
        _fail(str(e))
    if stats.command_status not in (None, 0):
        sys.exit(stats.command_status if stats.command_status > 0 else 1)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def doctor(fmt):
    """What this host can trace, tried rather than guessed.

    Exits non-zero, with the fix, when recording is impossible here.
    """
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .host import doctor as doc

    checks = doc.run()
    blocked = [c for c in checks if c.blocks_record and not c.ok]
    if fmt == "json":
        click.echo(json.dumps({"can_record": not blocked,
                               "checks": [c.__dict__ for c in checks]}, indent=1))
    else:
        t = Table(title="kvmtrace doctor", title_justify="left")
        for c in ("check", "", "detail"):
            t.add_column(c, overflow="fold")
        for c in checks:
            mark = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[c.ok]
            detail = escape(c.detail) + (f"\n[yellow]fix:[/] {escape(c.fix)}"
                                         if c.fix and not c.ok else "")
            t.add_row(c.name, mark, detail)
        console = Console()
        console.print(t)
        console.print("[green]record can run here[/]" if not blocked else
                      "[red]record cannot run here:[/] " + "; ".join(
                          f"{c.name}: {c.fix or c.detail}" for c in blocked))
    sys.exit(1 if blocked else 0)


@main.command()
@click.argument("recording", type=click.Path(dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv", "html"]),
              default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="write the report here instead of stdout (html: default report.html)")
@click.option("--pid", type=int, help="only this VMM process")
@click.option("--slot", type=int, help="only this memslot id")
@click.option("--table", type=click.Choice(["slots", "ops", "faults", "ranges", "verdicts",
                                             "errors", "vmas"]),
              help="json / csv: just this table (csv default: slots)")
@click.option("--fail-on", "fail_on", type=click.Choice(["mismatch", "error"]), multiple=True,
              help="exit 1 when a memory-type mismatch (downgraded / upgraded) or an error "
                   "(rejected memslot, failed fault) is found; repeatable")
def report(recording, fmt, pid, slot, table, fail_on, output):
    """Analyse RECORDING offline: memslots, faults, memory types, errors.

    Needs neither root nor bcc.
    """
    from . import render
    from .analysis.model import build
    from .recording.reader import RecordingError

    try:
        model = build(recording)
    except RecordingError as e:
        _fail(str(e))
    if fmt == "json":
        _emit(render.to_json(model, pid, slot, table) + "\n", output)
    elif fmt == "csv":
        _emit(render.to_csv(model, pid, slot, table), output)
    elif fmt == "html":
        from .html import report_html
        _emit(report_html(model, render.tables(model, pid, slot)), output or "report.html")
    else:
        from rich.console import Console
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)  # files and pipes: no wrapping at 80 columns
        render.to_text(model, console, pid, slot)
    v = model.verdicts
    if "mismatch" in fail_on and v["verdict"].isin(["downgraded", "upgraded"]).any():
        click.echo("kvmtrace: memory-type mismatch found", err=True)
        sys.exit(1)
    if "error" in fail_on and len(model.errors):
        click.echo(f"kvmtrace: {len(model.errors)} error(s) found", err=True)
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
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="write here instead of stdout (html: default diff.html)")
@click.option("--fail-on-regression", is_flag=True, help="exit 1 when a regression is found")
def diff(base, new, metrics, thresholds, fmt, output, fail_on_regression):
    """What got slower or changed from BASE to NEW, and why.

    Slots are matched by GPA range and size; a changed backing or flags
    (dirty logging) is named as the cause of what moved.
    """
    from . import render
    from .analysis.compare import METRICS, compare
    from .analysis.model import build
    from .recording.reader import RecordingError

    thr = _parse_thresholds(thresholds)
    try:
        mb, mn = build(base), build(new)
    except RecordingError as e:
        _fail(str(e))
    c = compare(mb, mn, thr, metrics or METRICS)
    if fmt == "json":
        _emit(render.diff_to_json(mb, mn, c) + "\n", output)
    elif fmt == "html":
        from .html import diff_html
        _emit(diff_html(mb, mn, c), output or "diff.html")
    else:
        from rich.console import Console
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
        render.diff_to_text(mb, mn, c, console)
    if fail_on_regression and c.regressions:
        sys.exit(1)


if __name__ == "__main__":
    main()
