#!/usr/bin/env python3
"""How `kvmtrace report` scales: time and peak memory on recordings of 1M to
100M fault events, side by side with DuckDB computing the same per-slot
summary from the same events as Parquet, and with pyarrow reading the file.

    sudo .venv/bin/python bench/report_scale.py [--events 1000000,10000000]
        [--formats text,json,csv] [--repeats 1] [--base FILE] [--pages 65536]
        [--mem-limit-gib 12]

The big recordings are replicated from a real one: the test VMM faulting
--pages pages is recorded (or --base FILE is used), then its fault events
(every event kind that carries a vCPU thread's fault: pt_walk,
spte_requested, set_spte, page_fault, tdp_spte_changed, fault_handler and
arm64's stage-2 kinds) are written K times, copy k on thread ids shifted by
k * 2^22 and timestamps shifted by k ns. Each copy is then a vCPU of its own
that faults the same pages in the same slots at the same moments, so pairing,
slot attribution and verdicts see K times the faults of the real run; the
memslots, VMAs, notes and ioctls are the real run's. The ``stats`` table
(events read per kind) is scaled by K so lost-event shares stay right.

The copies are written time slice by time slice (every copy of the base
run's first 1/S of its fault events, then the next slice ...), as a real
recording's flushes follow time, not copy by copy; the events are the same
either way. The Parquet files DuckDB reads are written from the same copies
as they are made (no tool reads the big recording to make them).

Each tool runs in a child process; its peak RSS is the child's ru_maxrss
(os.wait4), its CPU time the child's user + system time (less moved by other
work on a busy host than the wall time; DuckDB runs on one thread). A child
is limited to --mem-limit-gib of address space (RLIMIT_AS), so a run that
would not fit fails with MemoryError instead of pushing the host into the
OOM killer. Linux carries a process's peak over fork and exec into that
figure, so this script keeps its own memory small: replication and the
Parquet export run in child processes too. DuckDB's query pairs each request
with the thread's last start and first install (ASOF joins), attributes it to a slot by GFN range and
gives faults and the median service time per slot: the core of kvmtrace's
per-slot summary, without its verdicts and text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

FAULT_KINDS = ("pt_walk", "spte_requested", "set_spte", "page_fault", "tdp_spte_changed",
               "fault_handler", "s2_fault", "s2_map", "user_mem_abort")
TID_STRIDE = 1 << 22  # PID_MAX_LIMIT: a shifted tid never meets a real one


def timed(cmd, env=None, limit_gib: float = 0) -> tuple[float, int, int, float]:
    """(seconds, peak RSS in MiB, exit code, CPU seconds) of one child process."""
    import resource

    def cap():
        if limit_gib:
            n = int(limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    t = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], cwd=C.ROOT, env=C.bench_env(env),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=cap)
    err = p.stderr.read().decode(errors="replace").strip()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.monotonic() - t
    rc = os.waitstatus_to_exitcode(status)
    if rc:
        print(f"#   {' '.join(map(str, cmd[:6]))}...: exit {rc}: {err[-300:]}", flush=True)
    return dt, ru.ru_maxrss // 1024, rc, ru.ru_utime + ru.ru_stime


def record_base(d: Path, pages: int) -> Path:
    out = d / "base.kvt"
    p = C.run(C.KVMTRACE + ["record", "-o", out, "--force", "--"] + C.guest_args(pages))
    C.check(p, "record")
    return out


SLICES_PER_COPY = 64  # time slices of the base run: a window of the big file spans a few


def replicate(base: Path, out: Path, events: int, pq_dir: Path | None = None) -> int:
    """``base`` with its fault events written K times (see the module's doc)
    into ``out``, and the kinds DuckDB reads into ``pq_dir`` as Parquet;
    returns the fault events written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(C.ROOT))
    from kvmtrace.recording.reader import read
    from kvmtrace.recording.writer import RecordingWriter

    rec = read(str(base))
    kinds = [k for k in FAULT_KINDS if k in rec.tables and len(rec.tables[k])]
    per_copy = sum(len(rec.tables[k]) for k in kinds)
    if not per_copy:
        sys.exit(f"{base}: no fault events to replicate")
    copies = max(1, math.ceil(events / per_copy))
    if copies >= (1 << 32) // TID_STRIDE:
        sys.exit(f"{events} events need {copies} copies of {base}: record more --pages")
    w = RecordingWriter(str(out), rec.meta, force=True)

    def arrow(name, df):
        typ = w.types[name]
        cols = [pa.array(df[f.name].to_numpy(), type=f.type) for f in typ]
        return pa.StructArray.from_arrays(cols, fields=list(typ))

    for name, df in rec.tables.items():
        if name in kinds or name not in w.types or not len(df):
            continue
        if name == "stats":
            df = df.copy()
            fault = df["kind"].isin(kinds)
            for c in ("events", "lost"):
                df.loc[fault, c] = df.loc[fault, c] * copies
        w._pending[name].append(arrow(name, df))
    w.flush()
    writers, pq_parts = {}, {}

    def pq_write(name):
        t = pa.concat_tables(pq_parts.pop(name))
        if name not in writers:
            writers[name] = pq.ParquetWriter(pq_dir / f"{name}.parquet", t.schema)
        writers[name].write_table(t)

    if pq_dir is not None:
        pq_dir.mkdir(parents=True, exist_ok=True)
    # time slices of the base run's fault events (by ts): each is written for every copy
    tss = np.concatenate([rec.tables[k]["ts"].to_numpy(dtype=np.uint64) for k in kinds])
    edges = np.unique(np.quantile(tss, np.linspace(0, 1, SLICES_PER_COPY + 1)[1:-1],
                                  method="lower").astype(np.uint64))
    sliced = {k: np.searchsorted(edges, rec.tables[k]["ts"].to_numpy(dtype=np.uint64),
                                 side="right") for k in kinds}
    for i in range(len(edges) + 1):
        for k in range(copies):
            for name in kinds:
                df = rec.tables[name][sliced[name] == i].copy()
                if not len(df):
                    continue
                df["tid"] = df["tid"].to_numpy(dtype=np.uint64) + np.uint64(k * TID_STRIDE)
                for c in ("ts", "exit_ts"):
                    if c in df:
                        df[c] = df[c].to_numpy(dtype=np.uint64) + np.uint64(k)
                w._pending[name].append(arrow(name, df))
                if pq_dir is not None and name in PARQUET_KINDS:
                    part = pq_parts.setdefault(name, [])
                    part.append(pa.Table.from_pandas(df, preserve_index=False))
                    if sum(len(x) for x in part) >= 1 << 20:  # row groups of ~1M rows
                        pq_write(name)
            if sum(len(x) for x in w._pending.values()) > 64:
                w.flush()
        w.flush()
    w.close()
    for name in list(pq_parts):
        pq_write(name)
    for x in writers.values():
        x.close()
    return copies * per_copy


PARQUET_KINDS = ("spte_requested", "pt_walk", "page_fault", "set_spte")


DUCKDB_QUERY = """
import json, sys, duckdb
d, slots = sys.argv[1], json.loads(sys.argv[2])
con = duckdb.connect()
con.execute("SET threads=1")
con.execute("CREATE TABLE slots(slot BIGINT, lo UBIGINT, hi UBIGINT)")
con.executemany("INSERT INTO slots VALUES (?, ?, ?)", slots)
start = 'page_fault' if __import__('os').path.exists(f'{d}/page_fault.parquet') else 'pt_walk'
q = f'''
WITH r AS (SELECT ts::BIGINT ts, tid, gfn FROM '{d}/spte_requested.parquet'),
w AS (SELECT ts::BIGINT ts, tid FROM '{d}/{start}.parquet'),
i AS (SELECT ts::BIGINT ts, tid, gfn FROM '{d}/set_spte.parquet'),
a AS (SELECT r.*, w.ts start_ts FROM r ASOF LEFT JOIN w ON r.tid = w.tid AND r.ts >= w.ts),
b AS (SELECT a.*, i.ts install_ts FROM a ASOF LEFT JOIN i ON a.tid = i.tid AND i.ts >= a.ts)
SELECT s.slot, count(*) faults, median(install_ts - start_ts) p50_ns
FROM b JOIN slots s ON b.gfn >= s.lo AND b.gfn < s.hi GROUP BY s.slot ORDER BY s.slot'''
print(con.execute(q).fetchall())
"""

PYARROW_READ = """
import sys
sys.path.insert(0, sys.argv[2])
from kvmtrace.recording.reader import read
read(sys.argv[1])
"""


def slot_ranges(base: Path) -> list:
    """The slots of ``base`` as (slot, lo, hi) GFN ranges (a replicated recording
    has the base run's memslots)."""
    sys.path.insert(0, str(C.ROOT))
    from kvmtrace.analysis.model import build

    s = build(str(base)).slots
    return [[int(r.slot), int(r.gfn_start), int(r.gfn_end)] for r in s.itertuples()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", default="1000000,10000000",
                    help="fault events per recording, comma-separated")
    ap.add_argument("--formats", default="text,json,csv")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--base", type=Path, help="a recording to replicate (default: record one)")
    ap.add_argument("--pages", type=int, default=65536, help="pages the base run faults")
    ap.add_argument("--no-duckdb", action="store_true")
    ap.add_argument("--mem-limit-gib", type=float, default=12,
                    help="address-space limit of each measured child (0: none)")
    args = ap.parse_args()
    t0 = C.header("report at scale: kvmtrace report vs DuckDB and pyarrow, same data", args)
    d = C.scratch()
    base = args.base or record_base(d, args.pages)
    formats = [f for f in args.formats.split(",") if f]
    for n in [int(float(x)) for x in args.events.split(",")]:
        kvt = d / f"scale-{n}.kvt"
        pq_dir = d / f"pq-{n}"
        rep = [C.PY, __file__, "--_replicate", base, kvt, n]
        written = int(C.run(rep + ([] if args.no_duckdb else [pq_dir]),
                            timeout=7200).stdout or 0)
        if not written:
            sys.exit(f"replicating {base} failed")
        print(f"\n## {written:,} fault events, {kvt.stat().st_size / 2**20:.0f} MiB on disk",
              flush=True)
        res: dict[str, list] = {}
        slots = None
        if not args.no_duckdb:
            p = C.run([C.PY, __file__, "--_slots", base], timeout=600)
            C.check(p, "reading the base run's slots")
            slots = json.loads(p.stdout)
        lim = args.mem_limit_gib
        for _ in range(args.repeats):  # interleaved: every tool once per round
            for f in formats:
                out = d / f"out.{f}"
                cmd = C.KVMTRACE + ["report", kvt, "--format", f, "-o", out, "--force"]
                res.setdefault(f"report --format {f}", []).append(timed(cmd, limit_gib=lim))
            res.setdefault("pyarrow read (kvmtrace reader)", []).append(
                timed([C.PY, "-c", PYARROW_READ, kvt, C.ROOT], limit_gib=lim))
            if slots is not None:
                res.setdefault("DuckDB per-slot summary (Parquet)", []).append(
                    timed([C.PY, "-c", DUCKDB_QUERY, pq_dir, json.dumps(slots)],
                          limit_gib=lim))
        duck = res.get("DuckDB per-slot summary (Parquet)", [])
        ref = C.median([r[0] for r in duck])
        ref_cpu = C.median([r[3] for r in duck])
        for what, runs in res.items():
            secs = [r[0] for r in runs]
            cpu = [r[3] for r in runs]
            rss = [r[1] for r in runs]
            ok = all(r[2] == 0 for r in runs)
            ratio = (f"  {C.median(secs) / ref:5.1f}x DuckDB (CPU {C.median(cpu) / ref_cpu:.1f}x)"
                     if ref else "")
            print(f"  {what:36s} {C.summary(secs)} s, CPU {C.summary(cpu)} s, peak RSS "
                  f"{C.summary(rss, fmt='{:.0f}')} MiB{ratio}{'' if ok else '  FAILED'}",
                  flush=True)
        kvt.unlink()
        if pq_dir.exists():
            import shutil
            shutil.rmtree(pq_dir)
    C.footer(t0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_replicate"]:
        print(replicate(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]),
                        Path(sys.argv[5]) if len(sys.argv) > 5 else None))
    elif sys.argv[1:2] == ["--_slots"]:
        print(json.dumps(slot_ranges(Path(sys.argv[2]))))
    else:
        C.need_root()
        main()
