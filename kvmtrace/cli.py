"""The kvmtrace command: a thin click shell over the library.

record needs root and bcc; report and diff read a recording offline and need
neither. Errors a user can cause print one line and exit non-zero.
"""

from __future__ import annotations

import os
import sys

import click

from . import __version__


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


if __name__ == "__main__":
    main()
