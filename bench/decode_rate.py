"""Collector decode rate: ring records -> Arrow, old design vs new, side by side.

Input: real set_spte events, as ring records (8-byte header, the event,
padding: what BPF writes). By default a guest faulting 65,536 pages is
recorded first (root; --pages) and its set_spte events are laid out as ring
records; --input FILE.kvt takes them from a recording; without root the 17
records captured in tests/fixtures/raw-x86-pvm/set_spte.bin are tiled (their
repetition makes compression look cheaper than it is). The records fill one
ring's worth (--ring-pages, default 1024 pages = 4 MiB, what the collector
reads per poll at most) and a larger run (--big-mib), repeated if needed.

- old: ringbuf.decode (one copy of the run into a structured array, row
  after row) then one strided copy per field into contiguous numpy arrays and
  pa.array: what the collector did up to this change;
- new: ringbuf.decode_columns (one transposing copy: every 8-byte field is a
  contiguous row, narrower fields are read with a stride of 8 from rows
  already in cache) then Arrow arrays over those buffers (no copy);
- new+write CODEC: new decode, then the writer's encoding of those events as
  one batch (Arrow IPC serialisation, compression with CODEC: none, lz4 or
  zstd, the recording's default; checksum) into memory: the collector's
  whole path per event kind, without the write and fsync.

Each step runs on one core (pyarrow's threads off). The variants run
interleaved, --repeats times; events/s is given as the median (min .. max),
per second of the thread's CPU time (what one core does, robust to other
load on the host) and per second of wall time.

    .venv/bin/python bench/decode_rate.py [--repeats 15] [--ring-pages 1024]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench._common import ROOT, footer, header, median, summary  # noqa: E402
from kvmtrace.collectors.ringbuf import decode, decode_columns  # noqa: E402
from kvmtrace.probes import codegen  # noqa: E402
from kvmtrace.probes.events import EVENTS  # noqa: E402
from kvmtrace.recording import format as fmt  # noqa: E402
from kvmtrace.recording import writer as W  # noqa: E402


def old_path(raw, dt, typ):
    """The collector before: structured copy, then per-field strided copies and pa.array."""
    bodies, _ = decode(raw, dt)
    return pa.StructArray.from_arrays(
        [pa.array(np.ascontiguousarray(bodies[f.name]), type=f.type) for f in typ],
        fields=list(typ))


def new_path(raw, dt, typ):
    cols, _ = decode_columns(raw, dt)
    return W._struct_from_numpy(cols, typ)


def write_path(raw, dt, typ, codec=W.COMPRESSION):
    """New decode + the writer's encoding of one batch (Arrow IPC, ``codec``,
    checksum) into memory."""
    w = _writer(codec)
    w.add_events("set_spte", decode_columns(raw, dt)[0])
    return w.encode()


_W = {}


def _writer(codec):
    """A writer on a scratch file; only its encode() is timed (no write, no fsync)."""
    if codec not in _W:
        import tempfile
        d = tempfile.mkdtemp(prefix="kvmtrace-decode-")
        _W[codec] = W.RecordingWriter(os.path.join(d, "scratch.kvt"),
                                      {"kernel": os.uname().release}, compression=codec)
    return _W[codec]


def records(a, dt) -> tuple[np.ndarray, str]:
    """Ring bytes of real set_spte events, and where they came from."""
    path = a.input
    if path is None and os.geteuid() == 0:
        from bench._common import KVMTRACE, check, guest_args, run, scratch
        path = scratch() / "decode-input.kvt"
        check(run(KVMTRACE + ["record", "-o", path, "--force", "--probes", "faults", "--"]
                  + guest_args(a.pages)), "kvmtrace record")
    if path is None:
        return (np.fromfile(ROOT / "tests/fixtures/raw-x86-pvm/set_spte.bin", dtype=np.uint8),
                "tests/fixtures/raw-x86-pvm (tiled)")
    from kvmtrace.recording.reader import read
    t = read(path)["set_spte"]
    rec = np.zeros(len(t), dtype=dt)
    rec["_len"] = dt["body"].itemsize  # committed: neither BUSY nor DISCARD
    for f in dt["body"].names:
        rec["body"][f] = t[f].to_numpy()
    return rec.view(np.uint8), f"{path} (recorded)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", metavar="FILE.kvt", help="take the events from this recording")
    ap.add_argument("--pages", type=int, default=65536,
                    help="pages the guest recorded for the input faults (root)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ring-pages", type=int, default=1024)
    ap.add_argument("--big-mib", type=int, default=64)
    a = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    t0 = header("decode rate: ring records -> Arrow, old vs new (events/s, one core)", a)
    dt = codegen.record_dtype(EVENTS["set_spte"])
    typ = fmt.table_types()["set_spte"]
    one, source = records(a, dt)
    print(f"# input: {len(one) // dt.itemsize:,} set_spte records from {source}")
    assert len(one) % dt.itemsize == 0
    for label, nbytes in (("one ring", a.ring_pages * 4096), ("big run", a.big_mib << 20)):
        n = nbytes // dt.itemsize
        raw = np.tile(one, n // (len(one) // dt.itemsize) + 1)[:n * dt.itemsize].copy()
        ref = old_path(raw, dt, typ)
        assert new_path(raw, dt, typ).equals(ref), "new decode differs from old"
        variants = [("old", old_path), ("new", new_path)] + [
            (f"new+write {c or 'none'}", lambda r, d, t, c=c: write_path(r, d, t, c))
            for c in (None, "lz4", "zstd")]
        cpu = {k: [] for k, _ in variants}
        wall = {k: [] for k in cpu}
        for _ in range(a.repeats):
            for k, f in variants:
                t, c = time.perf_counter(), time.thread_time()
                f(raw, dt, typ)
                cpu[k].append(time.thread_time() - c)
                wall[k].append(time.perf_counter() - t)
        print(f"\n{label}: {n:,} set_spte records of {dt.itemsize} bytes ({nbytes >> 10} KiB)")
        print("  M events/s per CPU second (thread CPU time) | per wall second")
        for k in cpu:
            print(f"  {k:15s} {summary([n / max(x, 1e-9) for x in cpu[k]], 1e-6, '{:.1f}')}"
                  f" | {summary([n / x for x in wall[k]], 1e-6, '{:.1f}')}")
        print(f"  new / old  {median(cpu['old']) / median(cpu['new']):.1f}x CPU, "
              f"{median(wall['old']) / median(wall['new']):.1f}x wall (ratios of medians)")
    footer(t0)


if __name__ == "__main__":
    main()
