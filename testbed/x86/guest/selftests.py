#!/usr/bin/env python3
"""KVM's own selftests under `kvmtrace record`, inside the emulated AMD KVM
host (testbed/x86/run), and the report's memslot history checked against
what each test does.

The selftests (tools/testing/selftests/kvm of the running kernel's own
source, built by testbed/x86/build into /opt/kvm-selftests) were written by
KVM's developers, not here: set_memory_region_test creates, moves and
deletes a slot under a running vCPU, fills every memslot id KVM allows and
has one more refused; memslot_modification_stress_test adds and deletes a
slot while vCPUs run; dirty_log_test logs a KVM_MEM_LOG_DIRTY_PAGES slot.
All run in one recording (one bcc compile), each its own process; what
each must look like in the report is in selftests_expect.py (read from the
tests' sources), shared with the offline test tests/test_selftests_x86.py.

    python3 /kt/selftests.py [--out DIR] [--test NAME]...

Writes DIR/selftests.kvt, DIR/selftests.json (per test: pid, exit status,
arguments, KVM_CAP_NR_MEMSLOTS), DIR/<test>.log. Exit status 0 when every
test passed and every check held. Used by testbed/x86/e2e.
"""

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import selftests_expect as expect  # noqa: E402

BIN = "/opt/kvm-selftests"
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_NR_MEMSLOTS = 10


def nr_memslots() -> int:
    fd = os.open("/dev/kvm", os.O_RDWR)
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS)
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/selftests")
    ap.add_argument("--test", action="append", choices=sorted(expect.TESTS),
                    help="selftests to run (default: all)")
    args = ap.parse_args()
    tests = args.test or list(expect.TESTS)
    os.makedirs(args.out, exist_ok=True)
    out = args.out
    kvt = os.path.join(out, "selftests.kvt")
    print(f"kernel {os.uname().release}, selftests: {' '.join(tests)}", flush=True)
    # Each test: its pid (the sh that execs it) and exit status in files.
    script = "".join(
        f"sh -c 'echo $$ > {out}/{t}.pid; exec {BIN}/{t} {' '.join(expect.TESTS[t]['args'])}'"
        f" > {out}/{t}.log 2>&1; echo $? > {out}/{t}.rc\n" for t in tests)
    t0 = time.monotonic()
    rec = subprocess.run([sys.executable, "-m", "kvmtrace.cli", "record", "-o", kvt, "--force",
                          "--", "sh", "-c", script], text=True, stderr=subprocess.PIPE)
    sys.stderr.write(rec.stderr)
    print(f"record: exit {rec.returncode} in {time.monotonic() - t0:.1f} s", flush=True)
    runs = {"kernel": os.uname().release, "nr_memslots": nr_memslots(), "tests": {}}
    for t in tests:
        def read(ext):
            with open(os.path.join(out, f"{t}.{ext}")) as f:
                return int(f.read().strip())
        runs["tests"][t] = {"pid": read("pid"), "rc": read("rc"),
                            "args": expect.TESTS[t]["args"]}
        with open(os.path.join(out, f"{t}.log"), errors="replace") as f:
            log = f.read()
        # the lines that say which optional parts ran (selftests_expect reads them)
        runs["tests"][t]["log"] = "\n".join(
            ln for ln in log.splitlines() if "Skipping" in ln or "Testing" in ln
            or "slot zap" in ln)
        tail = log.strip().splitlines()[-3:]
        print(f"{t}: pid {runs['tests'][t]['pid']} exit {runs['tests'][t]['rc']}: "
              + " | ".join(tail), flush=True)
    with open(os.path.join(out, "selftests.json"), "w") as f:
        json.dump(runs, f, indent=1)
    if rec.returncode:
        print("FAIL kvmtrace record exited non-zero", flush=True)
        return 1
    t0 = time.monotonic()
    model = expect.memslot_model(kvt)  # kvmtrace.load()'s memslot part (see there why)
    print(f"memslot model: {time.monotonic() - t0:.1f} s", flush=True)
    if not model.complete or model.problems:
        print(f"FAIL recording incomplete: {model.problems}", flush=True)
        return 1
    failures = expect.check_all(model, runs, say=lambda s: print(s, flush=True))
    print(f"selftests checked: {len(tests)}; failures: {len(failures)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
