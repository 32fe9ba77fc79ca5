"""python -m kvmtrace.guest: run the built-in guest and write its report.

Examples:
  python -m kvmtrace.guest                          # the demo scenario
  python -m kvmtrace.guest --scenario minimal --report /tmp/guest.json
  python -m kvmtrace.guest --slot anon:64:rw --slot memfd:32:r:region2 \\
      --slot anon:16:r+w:ro --change flags:1 --change fail-misaligned
  python -m kvmtrace.guest --slot thp:1024:w:gpage2m  # guest maps it with 2 MiB pages
  python -m kvmtrace.guest --scenario huge-base       # one of the `kvmtrace diff` pairs
  python -m kvmtrace.guest --scenario demo --hold 5   # keep mappings for a tracer
  python -m kvmtrace.guest --list                     # built-in scenarios as JSON
  python -m kvmtrace.guest --scenario bar             # arm64: a PCI BAR (resource2, _wc)
  python -m kvmtrace.guest --slot bar-uc:8:r --access 1:4:1:x:0:refused

The architecture comes from platform.machine(): x86_64 (x86.py) or aarch64
(arm64.py, e.g. in testbed/arm64/run).

Exit status: 0 when the guest ran as described (accesses KVM refused count
as described when their step says expect "refused"), 1 when it ran but
something differed (see "errors" in the report), 2 when it could not run at all.
"""

import argparse
import json
import os
import signal
import sys
import time

from . import scenario as sc_mod
from .scenario import ScenarioError


def build_scenario(args):
    custom = args.slot or args.access or args.change
    if args.scenario_file:
        sc = sc_mod.Scenario.load(args.scenario_file)
    elif args.scenario or not custom:
        sc = sc_mod.builtin(args.scenario or "demo")
    else:
        sc = sc_mod.Scenario("cli")
    for spec in args.slot or ():
        sc_mod.add_slot_spec(sc, spec)
    for spec in args.access or ():
        sc_mod.add_access_spec(sc, spec)
    for spec in args.change or ():
        sc_mod.add_change_spec(sc, spec)
    if args.vcpus:
        sc.vcpus = args.vcpus
    return sc.validate()


def write_json(path, obj):
    if path == "-":
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


LEVEL_NAMES = {1: "4K", 2: "2M", 3: "1G"}


def summary(report):
    slots = [s for s in report["slots"] if s["role"] == "data"]
    ok = sum(1 for s in slots if s["status"] == "ok")
    counts = ", ".join("%s=%d" % kv for kv in sorted(report["exits"]["counts"].items()))
    levels = ", ".join("%s %d" % (LEVEL_NAMES.get(int(k), "level %s" % k), n)
                       for k, n in report["expected_levels_total"].items())
    return ("kvmtrace.guest: pid %d, %d/%d slots, %d memslot ioctls, exits %s, "
            "expected faults %d (%s), run %.2f ms%s" % (
                report["pid"], ok, len(slots), len(report["memslot_ioctls"]), counts,
                report["expected_faults_total"], levels or "-", (report["run_ns"] or 0) / 1e6,
                "" if report["ok"] else ": " + "; ".join(report["errors"])))


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m kvmtrace.guest",
        description="Run a small KVM guest that touches chosen pages of chosen memslot "
                    "backings, and report exactly what it did.",
        epilog="slot backings: %s; accesses: r w rw x; changes: %s"
               % (", ".join(sc_mod.ALL_KINDS), ", ".join(sc_mod.CHANGE_KINDS)))
    ap.add_argument("--scenario", choices=sorted(sc_mod.BUILTIN),
                    help="built-in scenario (default demo unless --slot is given)")
    ap.add_argument("--scenario-file", metavar="FILE.json",
                    help="scenario as JSON (the report's 'scenario' object)")
    ap.add_argument("--slot", action="append", metavar="KIND:NPAGES[:ACCESS][:FLAGS]",
                    help="add a slot, e.g. anon:64:rw, memfd:32:r+w:region2, anon:16:r:ro,dirty, "
                         "thp:1024:w:gpage2m (FLAGS: ro, dirty, region2, gpage2m = the guest "
                         "maps the slot with 2 MiB pages; NPAGES a multiple of 512)")
    ap.add_argument("--access", action="append",
                    metavar="SLOT:FIRST:NPAGES:ACCESS[:VCPU[:EXPECT]]",
                    help="add an access step; EXPECT refused: KVM must refuse it (arm64: "
                         "e.g. x on a bar-* slot), the guest goes on after it")
    ap.add_argument("--change", action="append", metavar="KIND[:SLOT[:METHOD]]",
                    help="add a memslot change after the run, e.g. flags:1, move:2:recreate, "
                         "delete:3, fail-overlap:1, fail-misaligned")
    ap.add_argument("--vcpus", type=int, help="number of vCPUs (steps name theirs)")
    ap.add_argument("--report", metavar="FILE.json", help="write the report here ('-': stdout)")
    ap.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                    help="after writing the report, keep everything mapped this long")
    ap.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                    help="sleep before opening /dev/kvm (time for a tracer to attach)")
    ap.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="give up on a guest that runs longer (default 30)")
    ap.add_argument("--device", default="/dev/kvm", help=argparse.SUPPRESS)  # tests
    ap.add_argument("--list", action="store_true", help="print the built-in scenarios as JSON")
    ap.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    args = ap.parse_args(argv)

    if args.list:
        json.dump({n: f().to_dict() for n, f in sc_mod.BUILTIN.items()}, sys.stdout, indent=1)
        print()
        return 0
    try:
        sc = build_scenario(args)
    except (ScenarioError, OSError, ValueError, TypeError) as e:
        print("kvmtrace.guest: bad scenario: %s" % e, file=sys.stderr)
        return 2

    from . import vmm  # after argument checks: --help works without KVM

    def on_report(report):
        if args.report:
            write_json(args.report, report)
        if not args.quiet:
            print(summary(report), file=sys.stderr, flush=True)

    # SIGTERM (e.g. a tracer ending a --hold early) unwinds normally, so the
    # temporary backing file is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.delay > 0:
        time.sleep(args.delay)
    try:
        report = vmm.run(sc, timeout=args.timeout, on_report=on_report, hold=args.hold,
                         device=args.device,
                         log=None if args.quiet else
                         lambda m: print("kvmtrace.guest: " + m, file=sys.stderr))
    except (vmm.VmmError, ScenarioError) as e:
        print("kvmtrace.guest: %s" % e, file=sys.stderr)
        return 2
    except OSError as e:
        print("kvmtrace.guest: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
