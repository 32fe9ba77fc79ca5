"""Fault-path overhead: what tracing adds to each guest page fault, side by side.

The test VMM's guest writes --pages pages once each (one shadow page fault
per page on KVM-PVM); its own report gives the time its vCPU ran (run_ns),
which is what the tracer slows down. Variants, interleaved, --repeats times:

- untraced;
- kvmtrace record (every probe, the default), and --probes faults;
- kvmtrace record with uncompressed batches (KVMTRACE_COMPRESSION=none), to
  show what compressing the recording costs per fault;
- bpftrace counting the three kvmmmu tracepoints a fault fires into a map;
- perf record -a of the same three tracepoints (default buffers).

Each tool launches the guest itself (record -- CMD, bpftrace -c, perf record
-- CMD), so its start-up is outside run_ns. Two measures per fault: wall
time (run_ns / faults) and the vCPU thread's CPU time (bench/_guest.py: guest
mode, KVM's fault handling and the tracepoint handlers, BPF or perf's, all
run on that thread), which other load on the host does not inflate. Printed:
ns per fault (median and spread), ns added per fault against the median
untraced run, and the ratios of kvmtrace's added cost to bpftrace's and
perf's.

    .venv/bin/python bench/fault_overhead.py [--pages 65536] [--repeats 7]
"""

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._common import (FAULT_TPS, KVMTRACE, bpftrace_count_script, check, footer,  # noqa: E402
                           guest_args, guest_report, have, header, median, need_root,
                           perf_stats, run, scratch, summary)


def variants(d, pages):
    out = {"untraced": lambda r: guest_args(pages, report=r)}
    for name, extra, env in (("kvmtrace", [], {}),
                             ("kvmtrace faults", ["--probes", "faults"], {}),
                             ("kvmtrace uncompressed", [], {"KVMTRACE_COMPRESSION": "none"})):
        out[name] = (lambda r, extra=extra, env=env, name=name:
                     (env, KVMTRACE + ["record", "-o", d / f"{name.replace(' ', '-')}.kvt",
                                       "--force"] + extra + ["--"] + guest_args(pages, report=r)))
    if have("bpftrace"):
        out["bpftrace"] = lambda r: ["bpftrace", "-q", "-e", bpftrace_count_script(), "-c",
                                     shlex.join(guest_args(pages, report=r))]
    if have("perf"):
        out["perf"] = lambda r: (["perf", "record", "-q", "-a", "-e", ",".join(FAULT_TPS), "-o",
                                  d / "perf.data", "--"] + guest_args(pages, report=r))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    need_root()
    t0 = header("fault-path overhead per guest page fault (ns), tools side by side", a)
    d = scratch()
    vs = variants(d, a.pages)
    ns = {k: [] for k in vs}
    cpu = {k: [] for k in vs}
    faults = None
    cpu_file = d / "vcpu-cpu.json"
    for i in range(a.repeats):
        for name, make in vs.items():
            rep = d / "guest.json"
            for f in (rep, cpu_file):
                if f.exists():
                    f.unlink()
            cmd = make(rep)
            env = {}
            if isinstance(cmd, tuple):
                env, cmd = cmd
            p = run(cmd, env=dict(env, KVMTRACE_BENCH_CPU=str(cpu_file)))
            check(p, name)
            g = guest_report(rep)
            faults = g["faults"]
            ns[name].append(g["run_ns"] / g["faults"])
            cpu[name].append(sum(json.loads(cpu_file.read_text())["vcpu_cpu_ns"]) / g["faults"])
            if name == "perf" and i == 0:
                st = perf_stats(d / "perf.data")
                print(f"# perf kept {sum(st['samples'].values()):,} samples, "
                      f"{st['lost_records']} LOST records")
        print(f"# repeat {i + 1}/{a.repeats} done", flush=True)
    print(f"\n{faults:,} faults per run; ns per fault: median (min .. max)")
    for label, data in (("vCPU thread CPU time", cpu), ("wall time (run_ns)", ns)):
        base = median(data["untraced"])
        print(f" {label}")
        added = {}
        for name, v in data.items():
            added[name] = median(v) - base
            extra = "" if name == "untraced" else f"   added {added[name]:7.0f}"
            print(f"  {name:22s} {summary(v, 1, '{:.0f}')}{extra}")
        k = added.get("kvmtrace")
        for other in ("bpftrace", "perf"):
            if other in added and added[other] > 0 and k is not None:
                print(f"  kvmtrace / {other:8s}  {k / added[other]:.2f}x the added cost")
        if "kvmtrace uncompressed" in added:
            print(f"  kvmtrace zstd - uncompressed: {k - added['kvmtrace uncompressed']:+.0f} ns "
                  f"per fault")
    footer(t0)


if __name__ == "__main__":
    main()
