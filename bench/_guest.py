"""The test VMM (python -m testvmm) with an optional busy loop after each page
the guest touches, so that a benchmark can choose the fault rate.

    python bench/_guest.py [--spin=N] TESTVMM-OPTIONS...

``--spin=N`` adds ``mov r9d, N; 1: dec r9d; jnz 1b`` after each access the
guest makes (x86 only): N iterations of native guest code at CPL3 between two
page faults. N=0 (the default) is the test VMM unchanged. The rate reached is
measured, not assumed: the guest's report gives run_ns and the fault count.

With $KVMTRACE_BENCH_CPU=FILE, the CPU time each vCPU thread used while it
ran the guest (guest mode, KVM's fault handling and the tracepoints' BPF or
perf handlers all run on it) is written to FILE as JSON: unlike run_ns, it
does not grow when other work on the host takes the CPU away.
"""

import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def spin_code(n: int) -> bytes:
    if not 0 < n < 1 << 31:
        raise SystemExit(f"--spin={n}: 1 to 2^31-1")
    return (b"\x41\xb9" + struct.pack("<I", n)  # mov r9d, n
            + b"\x41\xff\xc9"                    # dec r9d
            + b"\x75\xfb")                       # jnz -5 (the dec)


def _measure_vcpu_cpu(path):
    import json
    import threading
    import time

    from testvmm import vmm

    lock, out = threading.Lock(), []
    orig = vmm.Vmm._vcpu_loop

    def loop(self, vc):
        t = time.thread_time_ns()
        try:
            return orig(self, vc)
        finally:
            with lock:
                out.append(time.thread_time_ns() - t)
                with open(path, "w") as f:
                    json.dump({"vcpu_cpu_ns": out}, f)

    vmm.Vmm._vcpu_loop = loop


def main():
    argv = sys.argv[1:]
    if os.environ.get("KVMTRACE_BENCH_CPU"):
        _measure_vcpu_cpu(os.environ["KVMTRACE_BENCH_CPU"])
    spin = 0
    if argv and argv[0].startswith("--spin="):
        spin = int(argv.pop(0).split("=", 1)[1])
    if spin:
        from testvmm import x86
        loop = spin_code(spin)
        for k in ("r", "w", "rw"):
            x86.ACCESS_BODIES[k] = x86.ACCESS_BODIES[k] + loop
    from testvmm.__main__ import main as testvmm_main
    sys.exit(testvmm_main(argv))


if __name__ == "__main__":
    main()
