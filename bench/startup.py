"""Start-up: time to the first recorded event, and `report` on a small file.

A generator process creates and closes a KVM VM every millisecond (a
KVM_CREATE_VM ioctl: an event kvmtrace records, vm_ioctl). Each tool is
started at t0 and traces it; the time to the first event is the event's own
timestamp (CLOCK_MONOTONIC, from BPF) minus t0:

- kvmtrace record --pid GEN, its BPF program loaded from the compile cache
  (the default once the cache holds it: a first run fills it);
- kvmtrace record --pid GEN --no-cache (bcc compiles the program: what every
  start cost before the cache);
- bpftrace attaching the same tracepoints kvmtrace attaches (the kvmmmu and
  kvm ones, the ioctl syscalls, sched fork/exit), printing the first event of
  the generator and exiting (its whole run is also timed).

Also timed, with the same interleaving: `python -c pass` (the interpreter
alone), `python -c "import kvmtrace.cli"`, `kvmtrace --help`, and `kvmtrace
report` of the committed demo recording (text, and --format json). Wall
times; median (min .. max) of --repeats runs. Tools run with Python's
bytecode cache on, as installed (bench._common.bench_env).

    .venv/bin/python bench/startup.py [--repeats 5]
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._common import (KVMTRACE, PY, ROOT, bench_env, footer, have, header,  # noqa: E402
                           median, need_root, run, scratch, summary)

GENERATOR = r"""
import os, sys, time
sys.path.insert(0, os.getcwd())
from kvmtrace import kvmapi
from testvmm.kvmcall import ioctl, open_kvm
kvm = open_kvm()
print("ready", flush=True)
while True:
    vm = ioctl(kvm, kvmapi.KVM_CREATE_VM, 0)
    os.close(vm)
    time.sleep(0.001)
"""

# what kvmtrace's default program attaches on this kind of host
TRACEPOINTS = ["syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl", "sched:sched_process_exit",
               "sched:sched_process_fork", "kvm:kvm_page_fault", "kvmmmu:kvm_mmu_pagetable_walk",
               "kvmmmu:kvm_mmu_spte_requested", "kvmmmu:kvm_mmu_set_spte",
               "kvmmmu:kvm_tdp_mmu_spte_changed", "kvmmmu:fast_page_fault",
               "kvmmmu:handle_mmio_page_fault", "kvm:kvm_unmap_hva_range", "kvm:kvm_mmio",
               "kvm:kvm_userspace_exit"]


def first_event_kvmtrace(d, gen_pid, no_cache=False):
    out = d / "startup.kvt"
    cmd = KVMTRACE + ["record", "-o", out, "--force", "--pid", str(gen_pid), "--duration", "1"]
    if no_cache:
        cmd.append("--no-cache")
    t0 = time.monotonic_ns()
    p = run(cmd, timeout=300)
    wall = (time.monotonic_ns() - t0) / 1e9
    if p.returncode != 0:
        raise RuntimeError(f"kvmtrace: {p.stderr[-400:]}")
    from kvmtrace.recording.reader import read
    rec = read(out)
    ts = [int(rec[k]["ts"].min()) for k in ("vm_ioctl", "memslot") if len(rec[k])]
    first = (min(ts) - t0) / 1e9 if ts else None
    return first, wall, rec.meta.get("bpf_cache", {}).get("status")


def first_event_bpftrace(gen_pid):
    probes = ",".join(f"tracepoint:{t}" for t in TRACEPOINTS if _exists(t))
    prog = f'{probes} /pid == {gen_pid}/ {{ printf("first %llu\\n", nsecs); exit(); }}'
    t0 = time.monotonic_ns()
    p = run(["bpftrace", "-e", prog], timeout=300)
    wall = (time.monotonic_ns() - t0) / 1e9
    for line in p.stdout.splitlines():
        if line.startswith("first "):
            return (int(line.split()[1]) - t0) / 1e9, wall
    raise RuntimeError(f"bpftrace: {p.stderr[-400:]}")


def _exists(tp):
    cat, ev = tp.split(":")
    return os.path.exists(f"/sys/kernel/tracing/events/{cat}/{ev}")


def wall(cmd):
    t = time.perf_counter()
    p = run(cmd, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd}: {p.stderr[-300:]}")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    need_root()
    t0 = header("start-up: time to the first recorded event; report on a small file", a)
    d = scratch()
    gen = subprocess.Popen([PY, "-c", GENERATOR], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                           env=bench_env())
    try:
        assert gen.stdout.readline().strip() == "ready"
        first_event_kvmtrace(d, gen.pid)  # fills the compile cache if it is empty
        demo = ROOT / "tests/fixtures/x86-pvm-demo.kvt"
        res = {k: [] for k in ("kvmtrace (cache)", "kvmtrace --no-cache", "bpftrace")}
        whole = {k: [] for k in res}
        cache = {}
        other = {"python -c pass": [PY, "-c", "pass"],
                 "import kvmtrace.cli": [PY, "-c", "import kvmtrace.cli"],
                 "kvmtrace --help": KVMTRACE + ["--help"],
                 "report demo (text)": KVMTRACE + ["report", demo],
                 "report demo (json)": KVMTRACE + ["report", demo, "--format", "json"]}
        times = {k: [] for k in other}
        for i in range(a.repeats):
            for k in res:
                if k == "bpftrace":
                    if not have("bpftrace"):
                        continue
                    f, w = first_event_bpftrace(gen.pid)
                else:
                    f, w, st = first_event_kvmtrace(d, gen.pid, no_cache="no-cache" in k)
                    cache.setdefault(k, set()).add(st)
                res[k].append(f)
                whole[k].append(w)
            for k, cmd in other.items():
                times[k].append(wall(cmd))
            print(f"# repeat {i + 1}/{a.repeats} done", flush=True)
    finally:
        gen.kill()
        gen.wait()
    print("\ntime to the first recorded event, s: median (min .. max)   [whole run, s]")
    for k, v in res.items():
        if v:
            note = f"  compile cache: {'/'.join(sorted(map(str, cache[k])))}" if k in cache else ""
            print(f"  {k:22s} {summary(v, 1, '{:.2f}')}   [{summary(whole[k], 1, '{:.2f}')}]"
                  f"{note}")
    kc, kn, bt = (median(res[k]) for k in res)
    if kc and kn:
        print(f"  cache / no cache       {kc / kn:.2f}x")
    if kc and bt:
        print(f"  kvmtrace (cache) / bpftrace  {kc / bt:.2f}x")
    print("\nwall time, s: median (min .. max)")
    for k, v in times.items():
        print(f"  {k:22s} {summary(v, 1, '{:.3f}')}")
    footer(t0)


if __name__ == "__main__":
    main()
