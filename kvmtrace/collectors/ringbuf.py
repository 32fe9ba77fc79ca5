"""A batch reader for BPF ring buffers that never makes a Python object per event.

bcc's ``open_ring_buffer`` calls back into Python once per record, which caps
a collector far below the event rates of a busy host. kvmtrace gives each event
kind its own ring buffer, so every record in a ring has the same size; the
records between the consumer and producer positions then form one strided
array that numpy decodes in a few whole-array operations.

Layout (kernel/bpf/ringbuf.c, stable since 5.8): the map fd mmaps as one
read-write page holding ``consumer_pos``, then a read-only page holding
``producer_pos`` followed by the data area mapped twice in a row, so a run of
records that wraps around the end is still contiguous in memory. Each record
starts with ``u32 len`` (bit 31: BUSY, still being written; bit 30: DISCARD)
and ``u32 pg_off``, and is padded to 8 bytes.

Decoding is columnar (``decode_columns``): the run of records, a multiple of
8 bytes each, is viewed as an (records x words) matrix of u64 and transposed
in one copy, so that every 8-byte field is then a contiguous row, ready to be
an Arrow column as it is (no further copy), and every narrower field is read
with a short stride from a row that is already in cache. Copying each field
out of the records with the records' own stride instead touches every cache
line of the run once per field, which is what made the first collector
convert 2.6 M events/s into Arrow (bench/decode_rate.py measures both).

A record whose BUSY bit is set stops the batch there: it and everything after
it is read next time. On x86 loads are not reordered with other loads, so the
header check orders the data copy that follows; on weakly ordered CPUs the
same holds in practice because the copy happens after a Python-level round
trip, but is not formally guaranteed.
"""

from __future__ import annotations

import functools
import mmap

import numpy as np

BUSY = np.uint32(1 << 31)
DISCARD = np.uint32(1 << 30)
PAGE = mmap.PAGESIZE


def decode(raw: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Decode a run of fixed-size ring records: (event bodies, bytes consumed).

    Stops at the first record still BUSY; drops DISCARDed ones. ``raw`` is a
    uint8 array (a view of the ring, or captured bytes in tests); the result
    is a copy (a structured array, row after row), so the ring space can be
    handed back at once. The collector uses ``decode_columns``.
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


class Columns:
    """Decoded events of one kind, column by column: ``cols[name]`` is a
    contiguous numpy array per field (in the event's field order); ``len()``
    is the number of events. Indexing by field name gives that column, as
    for a structured array."""

    __slots__ = ("cols", "n")

    def __init__(self, cols: dict[str, np.ndarray], n: int):
        self.cols, self.n = cols, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    @property
    def names(self) -> list[str]:
        return list(self.cols)


@functools.lru_cache(maxsize=None)
def _plan(dtype: np.dtype) -> tuple[int, tuple]:
    """(u64 words per record, ((name, field dtype, word, byte offset in word), ...))
    for a record dtype made by codegen.record_dtype (header, then ``body``)."""
    rec = dtype.itemsize
    if rec % 8:
        raise ValueError(f"ring record size {rec} is not a multiple of 8")
    body, base = dtype.fields["body"]
    fields = []
    for name in body.names:
        fdt, off = body.fields[name][:2]
        off += base
        word, sub = divmod(off, 8)
        if fdt.kind == "S":  # a char array: whole words of its own
            if sub or fdt.itemsize % 8:
                raise ValueError(f"char field {name} is not whole 8-byte words")
        elif sub + fdt.itemsize > 8 or off % fdt.itemsize:
            raise ValueError(f"field {name} straddles a word or is misaligned")
        fields.append((name, fdt, word, sub))
    return rec // 8, tuple(fields)


def decode_columns(raw: np.ndarray, dtype: np.dtype) -> tuple[Columns, int]:
    """Decode a run of fixed-size ring records into columns: (Columns, bytes consumed).

    The same records as ``decode`` (stops at the first BUSY record, drops
    DISCARDed ones), copied out of ``raw`` (so the ring space can be handed
    back at once) by one transposing copy, see the module docstring."""
    words, fields = _plan(dtype)
    rec = words * 8
    n = len(raw) // rec
    if n == 0:
        return Columns({name: np.empty(0, fdt) for name, fdt, _, _ in fields}, 0), 0
    mat = np.ndarray((n, words), dtype="<u8", buffer=raw, offset=0)
    lens = np.ndarray((n,), dtype="<u4", buffer=raw, strides=(rec,))
    flags = lens & (BUSY | DISCARD)
    keep = None
    if flags.any():
        busy = np.flatnonzero(flags & BUSY)
        if busy.size:
            n = int(busy[0])
            mat, flags = mat[:n], flags[:n]
        discard = (flags & DISCARD) != 0
        if discard.any():
            keep = ~discard
    # (words, n): the one pass over the records. Always a copy: for a single
    # record mat.T is already C-contiguous and ascontiguousarray would return
    # a view of the ring, which BPF may overwrite once the space is handed back
    # (and which keeps the mmap exported, so close() raised BufferError).
    t = mat.T.copy(order="C")
    tb = t.view(np.uint8)
    cols = {}
    for name, fdt, word, sub in fields:
        if fdt.kind == "S":  # its words, one row each, back into records
            col = np.ascontiguousarray(t[word:word + fdt.itemsize // 8].T).view(fdt)[:, 0]
        elif fdt.itemsize == 8:
            col = t[word].view(fdt)
        else:  # a narrower field: every 8th .. byte of a row already copied
            col = np.ndarray((n,), dtype=fdt, buffer=tb, offset=word * n * 8 + sub,
                             strides=(8,)).copy()
        cols[name] = col if keep is None else col[keep]
    return Columns(cols, n if keep is None else int(keep.sum())), n * rec


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

    def read(self, max_records: int | None = None) -> Columns:
        """Consume committed records; returns the events, column by column."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        n = (prod - cons) // self.rec
        if max_records is not None:
            n = min(n, max_records)
        start = cons & (self.size - 1)
        cols, used = decode_columns(self._data[start:start + max(n, 0) * self.rec],
                                    self.dtype)
        if used:
            self._cons[0] = cons + used  # hand the space back to BPF
        return cols

    def close(self):
        self._cons = self._prod = self._data = None
        for m in (self._cons_map, self._data_map):
            try:
                m.close()
            except BufferError:
                # an array somewhere still views the ring (seen once with
                # Python 3.13 / numpy 2.2 in testbed/x86 7.x): the mapping
                # goes with the last view; never fail a finished recording
                pass
