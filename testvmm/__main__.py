"""python -m testvmm: run the test VMM and write its report.

Examples (from the repository root):
  python -m testvmm                          # the demo scenario
  python -m testvmm --scenario minimal --report /tmp/guest.json
  python -m testvmm --slot anon:64:rw --slot memfd:32:r:region2 \\
      --slot anon:16:r+w:ro --change flags:1 --change fail-misaligned
  python -m testvmm --slot thp:1024:w:gpage2m  # guest maps it with 2 MiB pages
  python -m testvmm --scenario huge-base       # one of the `kvmtrace diff` pairs
  python -m testvmm --scenario demo --hold 5   # keep mappings for a tracer
  python -m testvmm --list                     # built-in scenarios as JSON
  python -m testvmm --scenario bar             # arm64: a PCI BAR (resource2, _wc)
  python -m testvmm --slot bar-uc:8:r --access 1:4:1:x:0:refused

The architecture comes from platform.machine(): x86_64 (x86.py) or aarch64
(arm64.py, e.g. in testbed/arm64/run).

Exit status: 0 when the guest ran as described (accesses KVM refused count
as described when their step says expect "refused"), 1 when it ran but
something differed (see "errors" in the report), 2 when it could not run at
all, 128 + the signal's number when SIGINT, SIGTERM or SIGHUP stopped it
(130, 143, 129; one line on stderr unless -q, no report written unless the
run had finished, e.g. during --hold).
"""

import json
import os
import signal
import sys
import time

import click

from . import scenario as sc_mod
from . import vmm
from .scenario import ScenarioError

PROG = "python -m testvmm"
LEVEL_NAMES = {1: "4K", 2: "2M", 3: "1G"}


class Stopped(BaseException):
    """A stop signal arrived (raised in the main thread by its handler)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _on_stop_signal(signum, frame):
    # one stop is enough: a second signal must not interrupt the clean-up
    for sig in vmm.STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def build_scenario(scenario, scenario_file, slots, accesses, changes, vcpus):
    if scenario_file:
        sc = sc_mod.Scenario.load(scenario_file)
    elif scenario or not (slots or accesses or changes):
        sc = sc_mod.builtin(scenario or "demo")
    else:
        sc = sc_mod.Scenario("cli")
    for spec in slots:
        sc_mod.add_slot_spec(sc, spec)
    for spec in accesses:
        sc_mod.add_access_spec(sc, spec)
    for spec in changes:
        sc_mod.add_change_spec(sc, spec)
    if vcpus:
        sc.vcpus = vcpus
    return sc.validate()


def write_json(path, obj):
    if path == "-":
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def summary(report):
    slots = [s for s in report["slots"] if s["role"] == "data"]
    ok = sum(1 for s in slots if s["status"] == "ok")
    counts = ", ".join(f"{k}={n}" for k, n in sorted(report["exits"]["counts"].items()))
    levels = ", ".join(f"{LEVEL_NAMES.get(int(k), f'level {k}')} {n}"
                       for k, n in report["expected_levels_total"].items())
    errors = "" if report["ok"] else ": " + "; ".join(report["errors"])
    return (f"testvmm: pid {report['pid']}, {ok}/{len(slots)} slots, "
            f"{len(report['memslot_ioctls'])} memslot ioctls, exits {counts}, "
            f"expected faults {report['expected_faults_total']} ({levels or '-'}), "
            f"run {(report['run_ns'] or 0) / 1e6:.2f} ms{errors}")


def _err(msg):
    click.echo(f"testvmm: {msg}", err=True)


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=f"\b\nslot backings: {', '.join(sc_mod.ALL_KINDS)}\naccesses: r w rw x\n"
           f"changes: {', '.join(sc_mod.CHANGE_KINDS)}")
@click.option("--scenario", type=click.Choice(sorted(sc_mod.BUILTIN)),
              help="Built-in scenario (default demo unless --slot is given).")
@click.option("--scenario-file", metavar="FILE.json",
              help="Scenario as JSON (the report's 'scenario' object).")
@click.option("--slot", "slots", multiple=True, metavar="KIND:NPAGES[:ACCESS][:FLAGS]",
              help="Add a slot, e.g. anon:64:rw, memfd:32:r+w:region2, anon:16:r:ro,dirty, "
                   "thp:1024:w:gpage2m (FLAGS: ro, dirty, region2, gpage2m = the guest maps "
                   "the slot with 2 MiB pages; NPAGES a multiple of 512).")
@click.option("--access", "accesses", multiple=True,
              metavar="SLOT:FIRST:NPAGES:ACCESS[:VCPU[:EXPECT]]",
              help="Add an access step; EXPECT refused: KVM must refuse it (arm64: e.g. x on "
                   "a bar-* slot), the guest goes on after it.")
@click.option("--change", "changes", multiple=True, metavar="KIND[:SLOT[:METHOD]]",
              help="Add a memslot change after the run, e.g. flags:1, move:2:recreate, "
                   "delete:3, fail-overlap:1, fail-misaligned.")
@click.option("--vcpus", type=int, help="Number of vCPUs (steps name theirs).")
@click.option("--report", metavar="FILE.json", help="Write the report here ('-': stdout).")
@click.option("--hold", type=float, default=0.0, metavar="SECONDS",
              help="After writing the report, keep everything mapped this long.")
@click.option("--delay", type=float, default=0.0, metavar="SECONDS",
              help="Sleep before opening /dev/kvm (time for a tracer to attach).")
@click.option("--pause", type=float, default=0.0, metavar="SECONDS",
              help="Sleep after the memslots and vCPUs exist, before the guest runs "
                   "(a tracer attaching then finds a running VM's memslots set).")
@click.option("--gate", metavar="PATH",
              help="After setting up, say so on stderr and run the guest once PATH exists.")
@click.option("--gate-timeout", type=float, default=vmm.GATE_LIMIT, metavar="SECONDS",
              show_default=True, help="Give up waiting for --gate's PATH after this long.")
@click.option("--timeout", type=float, default=30.0, metavar="SECONDS", show_default=True,
              help="Give up on a guest that runs longer.")
@click.option("--device", default="/dev/kvm", hidden=True)  # tests
@click.option("--list", "list_", is_flag=True, help="Print the built-in scenarios as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No summary line.")
def cli(scenario, scenario_file, slots, accesses, changes, vcpus, report, hold, delay,
        pause, gate, gate_timeout, timeout, device, list_, quiet):
    """Run a small KVM guest that touches chosen pages of chosen memslot
    backings, and report exactly what it did."""
    return run_cli(scenario, scenario_file, slots, accesses, changes, vcpus, report, hold,
                   delay, timeout, device, list_, quiet, pause, gate, gate_timeout)


def run_cli(scenario, scenario_file, slots, accesses, changes, vcpus, report_path, hold,
            delay, timeout, device, list_, quiet, pause=0.0, gate=None, gate_timeout=None):
    """The command's work; returns its exit status."""
    if list_:
        json.dump({n: f().to_dict() for n, f in sc_mod.BUILTIN.items()}, sys.stdout, indent=1)
        print()
        return 0
    try:
        sc = build_scenario(scenario, scenario_file, slots, accesses, changes, vcpus)
    except (ScenarioError, OSError, ValueError, TypeError) as e:
        _err(f"bad scenario: {e}")
        return 2

    def on_report(report):
        if report_path:
            write_json(report_path, report)
        if not quiet:
            click.echo(summary(report), err=True)

    # SIGINT, SIGTERM and SIGHUP (e.g. a tracer ending a --hold early, or
    # kvmtrace record stopping mid-run) unwind normally: the vCPU threads are
    # ended before their mappings go, the temporary backing file is removed
    for sig in vmm.STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    try:
        if delay > 0:
            time.sleep(delay)
        report = vmm.run(sc, timeout=timeout, on_report=on_report, hold=hold, device=device,
                         log=None if quiet else _err, pause=pause, gate=gate,
                         gate_timeout=vmm.GATE_LIMIT if gate_timeout is None else gate_timeout)
    except (vmm.VmmError, ScenarioError, OSError) as e:
        _err(str(e))
        return 2
    except Stopped as e:
        name = signal.Signals(e.signum).name
        if not quiet:
            _err(f"stopped by {name}")
        return 128 + e.signum
    return 0 if report["ok"] else 1


def main(argv=None):
    """Entry point; returns the exit status (argv: the arguments, default sys.argv[1:])."""
    try:
        return cli.main(args=argv, prog_name=PROG, standalone_mode=False) or 0
    except click.ClickException as e:  # a usage error: click's message, exit 2
        e.show()
        return e.exit_code
    except click.exceptions.Abort:  # Ctrl-C before the handlers are in place
        return 130


if __name__ == "__main__":
    sys.exit(main())
