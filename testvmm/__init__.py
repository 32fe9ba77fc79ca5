"""testvmm: the test VMM, the independent witness kvmtrace's tests compare against.

A small pure-Python KVM VMM. It runs guest code that touches chosen pages of
memslots with chosen backings (anonymous, shared, memfd, file, THP, hugetlb,
[vvar], PCI BARs), changes memslots afterwards, and writes a JSON report of
exactly what it did: every memslot ioctl as issued, every exit, each slot's
addresses and VMA, and the faults and memory types this host's KVM should
produce for it (faults.py, the measured rules). The tests, `make demo` and the
benchmarks record it with kvmtrace and hold kvmtrace's report against this one.

Why apart from kvmtrace: a witness that shared the tracer's code could agree
with it on a wrong answer. It shares only KVM's ABI (kvmtrace.kvmapi: ioctl
numbers, structs, flags, exit reasons, defined once so neither side can type
a different number) and otherwise uses the standard library alone (click for
its command line). It is not shipped: pyproject.toml packages `kvmtrace*`
only, so it runs from a checkout (the repository root on sys.path):

    python -m testvmm --scenario demo --report guest.json
    python -m testvmm --list                  # the built-in scenarios
    python -m testvmm --help

Modules: __main__ (the command line), vmm (run a Scenario on /dev/kvm, the
report), scenario (what the guest does, built-in scenarios), backings (host
memory behind a slot), faults (the expected faults, measured per MMU and
kernel), x86 / arm64 (vCPU set-up and guest code per architecture), kvmcall
(ioctl helpers), tiny (the smallest arm64 guest, for the arm64 testbed's
smoke check). vmm.run() runs a scenario from Python.
"""
