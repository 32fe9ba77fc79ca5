"""Decode throughput of the collector's batch path, on real captured records.

Tiles the set_spte ring records captured on the development host
(tests/fixtures/raw-x86-pvm/set_spte.bin) into one large buffer and times the
two steps the collector runs per poll: ring bytes -> numpy records
(collectors.ringbuf.decode) and numpy records -> Arrow struct array
(recording.writer). Prints events/s for each, and for bcc's per-event
callback path measured the same way (ctypes callback per record), side by
side in one run.

    .venv/bin/python bench/decode_throughput.py [--events 2000000]
"""

import argparse
import ctypes
import time

import numpy as np

from kvmtrace.collectors.ringbuf import decode
from kvmtrace.probes import codegen
from kvmtrace.probes.events import EVENTS
from kvmtrace.recording import format as fmt
from kvmtrace.recording.writer import _struct_from_numpy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2_000_000)
    a = ap.parse_args()
    dt = codegen.record_dtype(EVENTS["set_spte"])
    one = np.fromfile("tests/fixtures/raw-x86-pvm/set_spte.bin", dtype=np.uint8)
    reps = a.events // (len(one) // dt.itemsize) + 1
    raw = np.tile(one, reps)
    n = len(raw) // dt.itemsize

    t = time.perf_counter()
    bodies, _ = decode(raw, dt)
    t_decode = time.perf_counter() - t
    t = time.perf_counter()
    _struct_from_numpy(bodies, fmt.table_types()["set_spte"])
    t_arrow = time.perf_counter() - t

    # what a per-event callback costs (bcc's open_ring_buffer calls Python per record)
    CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    out = []
    size = dt["body"].itemsize
    cb = CB(lambda ctx, data, sz: out.append(ctypes.string_at(data, sz)) or 0)
    base = raw.ctypes.data
    m = min(n, 200_000)
    t = time.perf_counter()
    for i in range(m):
        cb(None, base + i * dt.itemsize + 8, size)
    t_cb = (time.perf_counter() - t) / m * n

    print(f"{n:,} set_spte records ({dt.itemsize} bytes each)")
    print(f"batch decode       : {n / t_decode / 1e6:8.1f} M events/s")
    print(f"numpy -> Arrow     : {n / t_arrow / 1e6:8.1f} M events/s")
    print(f"per-event callback : {n / t_cb / 1e6:8.2f} M events/s (copy only, no decode)")
    print(f"batch / callback   : {t_cb / (t_decode + t_arrow):8.1f}x")


if __name__ == "__main__":
    main()
