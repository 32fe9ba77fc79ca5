"""Recording size: bytes per fault event, kvmtrace against perf and bpftrace.

The test VMM's guest writes --pages pages (one shadow page fault each, three
tracepoint events per fault: kvm_mmu_pagetable_walk, kvm_mmu_spte_requested,
kvm_mmu_set_spte). Each tool records the same run shape, interleaved,
--repeats times:

- kvmtrace record (every probe, the default): the .kvt's whole size (header,
  host metadata, smaps snapshots, every table) over its fault events;
- the same recording re-written by the writer batch for batch with each
  codec: none (schema version 2's layout), lz4, zstd (the default): the
  same data, only the compression differs;
- perf record -a -e of the three tracepoints: perf.data's size over the
  samples it holds;
- bpftrace printing the same fields as kvmtrace records (time, pid, tid, cpu
  and the tracepoint's fields, one line per event): the log's size over its
  lines.

    .venv/bin/python bench/bytes_per_event.py [--pages 65536] [--repeats 3]
"""

import argparse
import json
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyarrow as pa  # noqa: E402

from bench._common import (FAULT_TPS, KVMTRACE, check, footer, guest_args, have,  # noqa: E402
                           header, median, need_root, perf_stats, run, scratch, summary)

FAULT_KINDS = ("pt_walk", "spte_requested", "set_spte")

BPFTRACE_LOG = (
    'tracepoint:kvmmmu:kvm_mmu_pagetable_walk { printf("w %llu %d %d %d %llx %x\\n", '
    'nsecs, pid, tid, cpu, args->addr, args->pferr); } '
    'tracepoint:kvmmmu:kvm_mmu_spte_requested { printf("r %llu %d %d %d %llx %llx %d\\n", '
    'nsecs, pid, tid, cpu, args->gfn, args->pfn, args->level); } '
    'tracepoint:kvmmmu:kvm_mmu_set_spte { printf("s %llu %d %d %d %llx %llx %d %d %d %d\\n", '
    'nsecs, pid, tid, cpu, args->gfn, args->spte, args->level, args->r, args->x, args->u); }')


def kvt_fault_events(path) -> int:
    with pa.ipc.open_stream(pa.memory_map(str(path))) as r:
        return sum(len(b.column(b.schema.get_field_index(k)).flatten())
                   for b in r for k in FAULT_KINDS)


def rewrite(src, dst, codec):
    """``src`` written again by the writer, batch for batch, with ``codec``
    (its first, empty batch is the writer's own first batch)."""
    from kvmtrace.recording import format as fmt
    from kvmtrace.recording.writer import RecordingWriter

    if os.path.exists(dst):
        os.unlink(dst)
    with pa.ipc.open_stream(pa.memory_map(str(src))) as r:
        meta = json.loads(r.schema.metadata[fmt.META_KEY])
        batches = list(r)
    w = RecordingWriter(str(dst), meta, compression=codec)
    for i, b in enumerate(batches):
        tables = [(name, b.column(j).flatten()) for j, name in enumerate(b.schema.names)]
        if i == 0 and not any(len(v) for _, v in tables):
            continue
        for name, v in tables:
            if len(v):
                w.add_events(name, v)
        w.flush(force=True)
    w.close()
    return os.path.getsize(dst)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    need_root()
    t0 = header("bytes per fault event: kvmtrace .kvt vs perf.data vs bpftrace log", a)
    d = scratch()
    res = {k: [] for k in ("kvmtrace", "kvt none", "kvt lz4", "kvt zstd", "perf", "bpftrace")}
    counts = {}
    for i in range(a.repeats):
        kvt = d / "size.kvt"
        p = run(KVMTRACE + ["record", "-o", kvt, "--force", "--"] + guest_args(a.pages))
        check(p, "kvmtrace record")
        n = kvt_fault_events(kvt)
        counts["kvmtrace"] = n
        res["kvmtrace"].append(os.path.getsize(kvt) / n)
        for codec in (None, "lz4", "zstd"):
            res[f"kvt {codec or 'none'}"].append(rewrite(kvt, d / "rw.kvt", codec) / n)
        if have("perf"):
            pd = d / "size.data"
            p = run(["perf", "record", "-q", "-a", "-e", ",".join(FAULT_TPS), "-o", pd, "--"]
                    + guest_args(a.pages))
            check(p, "perf record")
            st = perf_stats(pd)
            n = sum(st["samples"].values())
            counts["perf"] = n
            res["perf"].append(os.path.getsize(pd) / n)
        if have("bpftrace"):
            log = d / "size.log"
            p = run(["bpftrace", "-q", "-o", log, "-e", BPFTRACE_LOG, "-c",
                     shlex.join(guest_args(a.pages))])
            check(p, "bpftrace")
            with open(log, "rb") as f:
                n = sum(1 for line in f if line[:2] in (b"w ", b"r ", b"s "))
            counts["bpftrace"] = n
            lost = sum(int(m) for m in re.findall(r"Lost (\d+) events", p.stdout + p.stderr))
            if lost:
                counts["bpftrace lost"] = lost
            res["bpftrace"].append(os.path.getsize(log) / n)
        print(f"# repeat {i + 1}/{a.repeats} done", flush=True)
    print(f"\nfault events per file (last run): " +
          ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print("bytes per fault event: median (min .. max)")
    for k, v in res.items():
        if v:
            print(f"  {k:10s} {summary(v, 1, '{:.1f}')}")
    k = median(res["kvmtrace"])
    for other in ("perf", "bpftrace", "kvt none"):
        if res[other]:
            print(f"  kvmtrace / {other:9s} {k / median(res[other]):.2f}x")
    footer(t0)


if __name__ == "__main__":
    main()
