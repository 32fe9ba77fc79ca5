"""A batch reader for BPF ring buffers that never makes a Python object per event.

bcc's ``open_ring_buffer`` calls back into Python once per record, which caps
a collector far below the event rates of a busy host. kvmtrace gives each event
kind its own ring buffer, so every record in a ring has the same size; the
records between the consumer and producer positions then form one strided
array that numpy views and copies in one operation.

Layout (kernel/bpf/ringbuf.c, stable since 5.8): the map fd mmaps as one
read-write page holding ``consumer_pos``, then a read-only page holding
``producer_pos`` followed by the data area mapped twice in a row, so a run of
records that wraps around the end is still contiguous in memory. Each record
starts with ``u32 len`` (bit 31: BUSY, still being written; bit 30: DISCARD)
and ``u32 pg_off``, and is padded to 8 bytes.

A record whose BUSY bit is set stops the batch there: it and everything after
it is read next time. On x86 loads are not reordered with other loads, so the
header check orders the data copy that follows; on weakly ordered CPUs the
same holds in practice because the copy happens after a Python-level round
trip, but is not formally guaranteed.
"""

from __future__ import annotations

import mmap

import numpy as np

BUSY = np.uint32(1 << 31)
DISCARD = np.uint32(1 << 30)
PAGE = mmap.PAGESIZE


def decode(raw: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Decode a run of fixed-size ring records: (event bodies, bytes consumed).

    Stops at the first record still BUSY; drops DISCARDed ones. ``raw`` is a
    uint8 array (a view of the ring, or captured bytes in tests); the result
    is a copy, so the ring space can be handed back at once.
    """
    rec = dtype.itemsize
    n = len(raw) // rec
    raw = raw[:n * rec]
    lens = np.ndarray((n,), dtype=np.uint32, buffer=raw, strides=(rec,))
    busy = np.flatnonzero(lens & BUSY)
    if busy.size:
        n = int(busy[0])
        raw = raw[:n * rec]
    records = np.frombuffer(raw.tobytes(), dtype=dtype)  # the one copy
    keep = (records["_len"] & DISCARD) == 0
    return (records["body"] if keep.all() else records["body"][keep]), n * rec


class RingReader:
    def __init__(self, map_fd: int, size: int, record_dtype: np.dtype):
        if size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        self.size = size
        self.fd = map_fd
        self.dtype = record_dtype
        self.rec = record_dtype.itemsize
        self._cons_map = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data_map = mmap.mmap(map_fd, PAGE + 2 * size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=PAGE)
        self._cons = np.frombuffer(self._cons_map, dtype=np.uint64, count=1)
        self._prod = np.frombuffer(self._data_map, dtype=np.uint64, count=1)
        self._data = np.frombuffer(self._data_map, dtype=np.uint8, offset=PAGE)

    def read(self, max_records: int | None = None) -> np.ndarray:
        """Consume committed records; returns the event bodies (a structured array)."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        n = (prod - cons) // self.rec
        if max_records is not None:
            n = min(n, max_records)
        if n <= 0:
            return np.empty(0, dtype=self.dtype["body"])
        start = cons & (self.size - 1)
        bodies, used = decode(self._data[start:start + n * self.rec], self.dtype)
        self._cons[0] = cons + used  # hand the space back to BPF
        return bodies

    def close(self):
        self._cons = self._prod = self._data = None
        self._cons_map.close()
        self._data_map.close()
