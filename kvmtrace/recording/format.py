"""The recording's layout, derived from the event declarations.

One Arrow IPC stream. Its schema has one column per table, each a
``list<struct<...>>``; each flush appends one record batch of a single row
whose cells hold everything captured for that table since the last flush.
Tables are:

- one per event kind in kvmtrace.probes.events (its fields, same names);
- ``vmas``: /proc/PID/smaps snapshots (at start, after each memslot change of
  that process, and at the end);
- ``memslot_snapshot`` (version 4 onwards): the memslots a traced VMM had
  when recording began (record --pid, or every VM on the host), read from
  the kernel by a BPF iterator (collectors/snapshot.py), each with the VMA
  behind its HVA: memslots set before recording are known from the start;
- ``qmp_mtree`` (version 5 onwards): QEMU's own view of guest memory, its
  ``info mtree -f`` as QEMU answered it through QMP (record --qmp,
  collectors/qmp.py), each with the QEMU process it came from and when it was
  asked and answered: the analysis names each memslot after QEMU's memory
  region (analysis/qemu.py);
- ``stats``: per flush and event kind, cumulative events read and lost;
- ``notes``: timestamped key / JSON value pairs (end-of-recording facts,
  collector warnings).

Schema metadata: ``kvmtrace.schema_version`` and ``kvmtrace.meta`` (JSON: host,
kernel, arch, KVM flavour, probes chosen and attached, clock base, decode
context such as PAT configuration). Readers accept any version up to their
own; new tables and fields may be added with a version bump, old ones are
never renamed.

Checksums (version 2 onwards): the schema metadata carries
``kvmtrace.header_crc32``, the CRC-32 of the version and the meta JSON; each
record batch message carries, in its own custom metadata, its sequence number
(``kvmtrace.batch``: 0, 1, 2 ...) and ``kvmtrace.crc32``, the CRC-32 of that
number, the batch header (row count, field nodes, buffer layout) and the
message body. A reader checks a batch before decoding its body: a flipped bit,
a lost or duplicated block or a batch moved elsewhere in the file is named, and
the body is never decoded. Version-1 recordings have no checksums and are read
with structural validation only.

Compression (version 3 onwards): batch bodies are compressed with Arrow IPC
buffer compression (zstd; lz4 is read too), each buffer prefixed with its
uncompressed length as Arrow defines it. The checksum covers the body as it
is on disk, compressed, so damage is still found before anything is
decompressed. Versions 1 and 2 never have compressed bodies.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np
import pyarrow as pa

from ..probes.codegen import event_dtype
from ..probes.events import EVENTS

SCHEMA_VERSION = 6  # 4: the memslot_snapshot table; 5: qmp_mtree; 6: memslot vma_name
VERSION_KEY = b"kvmtrace.schema_version"
META_KEY = b"kvmtrace.meta"
HEADER_CRC_KEY = b"kvmtrace.header_crc32"   # schema metadata, version 2+
SEQ_KEY = b"kvmtrace.batch"                 # record batch custom metadata, version 2+
CRC_KEY = b"kvmtrace.crc32"                 # record batch custom metadata, version 2+
CHECKSUMS_SINCE = 2
COMPRESSED_SINCE = 3  # batch bodies may be compressed (Arrow IPC buffer compression)

_NP_TO_PA = {np.dtype(t): pa.from_numpy_dtype(np.dtype(t))
             for t in ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")}
_PA_TO_NP = {v: k for k, v in _NP_TO_PA.items()}


def numpy_dtype(typ: pa.DataType) -> np.dtype:
    """The numpy dtype of an integer Arrow type."""
    return _PA_TO_NP[typ]

VMA_FIELDS = [
    ("ts", pa.uint64()), ("pid", pa.uint32()), ("reason", pa.string()),
    ("start", pa.uint64()), ("end", pa.uint64()), ("perms", pa.string()),
    ("offset", pa.uint64()), ("dev", pa.string()), ("inode", pa.uint64()),
    ("path", pa.string()), ("vmflags", pa.string()),
    ("size_kb", pa.uint64()), ("kernelpagesize_kb", pa.uint64()),
    ("mmupagesize_kb", pa.uint64()), ("rss_kb", pa.uint64()),
    ("anonhugepages_kb", pa.uint64()),
]
MEMSLOT_SNAPSHOT_FIELDS = [
    ("ts", pa.uint64()), ("pid", pa.uint32()), ("vm_fd", pa.int32()),
    ("as_id", pa.uint32()), ("slot", pa.uint32()), ("flags", pa.uint32()),
    ("gpa", pa.uint64()), ("size", pa.uint64()), ("hva", pa.uint64()),
    ("generation", pa.uint64()), ("gmem", pa.bool_()), ("gmem_offset", pa.uint64()),
    ("vma_found", pa.bool_()), ("vma_start", pa.uint64()), ("vma_end", pa.uint64()),
    ("vm_flags", pa.uint64()), ("vm_page_prot", pa.uint64()), ("vm_pgoff", pa.uint64()),
    ("vma_has_file", pa.bool_()), ("vma_ino", pa.uint64()), ("vma_dev", pa.uint32()),
    ("vma_fs_magic", pa.uint32()), ("vma_name", pa.string()),  # version 6
]
QMP_MTREE_FIELDS = [
    ("ts", pa.uint64()),          # CLOCK_MONOTONIC when QEMU's answer was read
    ("request_ts", pa.uint64()),  # when the command was sent (the view is of a moment between)
    ("pid", pa.uint32()),         # the QEMU process (SO_PEERCRED of the QMP socket; 0 unknown)
    ("socket", pa.string()),      # the QMP socket's path
    ("command", pa.string()),     # the HMP command run (human-monitor-command)
    ("text", pa.string()),        # QEMU's answer, as it came
]
STATS_FIELDS = [("ts", pa.uint64()), ("kind", pa.string()),
                ("events", pa.uint64()), ("lost", pa.uint64())]
NOTES_FIELDS = [("ts", pa.uint64()), ("key", pa.string()), ("value", pa.string())]


def event_struct(name: str) -> pa.StructType:
    """An event table's Arrow type: its fields' integers, and strings for its
    char arrays (numpy ``S<N>``)."""
    dt = event_dtype(EVENTS[name])
    types = {n: dt.fields[n][0] for n in dt.names}
    return pa.struct([(n, pa.string() if t.kind == "S" else _NP_TO_PA[t])
                      for n, t in types.items()])


def table_types() -> dict[str, pa.StructType]:
    return dict(_table_types())


@functools.lru_cache(maxsize=1)
def _table_types() -> dict[str, pa.StructType]:
    types = {name: event_struct(name) for name in EVENTS}
    types["vmas"] = pa.struct(VMA_FIELDS)
    types["memslot_snapshot"] = pa.struct(MEMSLOT_SNAPSHOT_FIELDS)
    types["stats"] = pa.struct(STATS_FIELDS)
    types["notes"] = pa.struct(NOTES_FIELDS)
    types["qmp_mtree"] = pa.struct(QMP_MTREE_FIELDS)
    return types


def schema(meta_json: str) -> pa.Schema:
    version, meta = str(SCHEMA_VERSION).encode(), meta_json.encode()
    return pa.schema(
        [pa.field(name, pa.list_(t)) for name, t in table_types().items()],
        metadata={VERSION_KEY: version, META_KEY: meta,
                  HEADER_CRC_KEY: header_checksum(version, meta)},
    )


# -- checksums ----------------------------------------------------------------

def header_checksum(version: bytes, meta: bytes) -> bytes:
    """CRC-32 of the schema version and the meta JSON, as 8 hex digits."""
    return b"%08x" % zlib.crc32(meta, zlib.crc32(version + b"\0"))


def batch_checksum(seq: int, header: "BatchHeader", body) -> bytes:
    """CRC-32 of a batch's sequence number, header and body, as 8 hex digits."""
    c = zlib.crc32(struct.pack("<qq", seq, header.length))
    c = zlib.crc32(header.nodes, c)
    c = zlib.crc32(header.buffers, c)
    return b"%08x" % zlib.crc32(body, c)


# -- Arrow IPC message framing ---------------------------------------------------
#
# A stream message is: 0xFFFFFFFF, an int32 metadata length L, L bytes of
# flatbuffer ``Message`` (format/Message.fbs), then ``bodyLength`` bytes of
# body; L == 0 is the end-of-stream marker. The few fields kvmtrace needs are
# read here with bounds-checked flatbuffer access (never trusting an offset),
# so that the declared body length, the batch header and the custom metadata
# are known before any body byte is read or decoded.

CONTINUATION = 0xFFFFFFFF
MSG_SCHEMA, MSG_DICTIONARY, MSG_RECORD_BATCH = 1, 2, 3
MESSAGE_TYPES = {1: "schema", 2: "dictionary batch", 3: "record batch", 4: "tensor",
                 5: "sparse tensor"}


class FormatError(ValueError):
    """Metadata that is not a well-formed Arrow message (one line)."""


class BatchHeader:
    """What a RecordBatch message header says: rows, field nodes and buffers
    (the raw little-endian struct arrays), and whether the body is compressed."""

    __slots__ = ("length", "nodes", "buffers", "compressed")

    def __init__(self, length: int, nodes: bytes, buffers: bytes, compressed: bool):
        self.length, self.nodes, self.buffers, self.compressed = \
            length, nodes, buffers, compressed


class MessageInfo:
    __slots__ = ("kind", "body_length", "custom", "batch")

    def __init__(self, kind: int, body_length: int, custom: dict, batch):
        self.kind, self.body_length, self.custom, self.batch = kind, body_length, custom, batch


class _Flat:
    """Bounds-checked reads of one flatbuffer."""

    def __init__(self, buf: bytes):
        self.b = buf

    def _get(self, fmt: str, pos: int):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.b):
            raise FormatError("message metadata points outside itself")
        return struct.unpack_from(fmt, self.b, pos)[0]

    def table(self, pos: int) -> tuple[int, int, int]:
        """(table position, vtable position, vtable size in bytes)."""
        vt = pos - self._get("<i", pos)
        vt_size = self._get("<H", vt)
        if vt_size < 4 or vt_size % 2:
            raise FormatError("malformed flatbuffer vtable")
        self._get(f"<{vt_size // 2}H", vt)  # the whole vtable is inside the buffer
        return pos, vt, vt_size

    def root(self) -> tuple[int, int, int]:
        return self.table(self._get("<I", 0))

    def field(self, t, idx: int) -> int | None:
        pos, vt, vt_size = t
        slot = 4 + 2 * idx
        if slot + 2 > vt_size:
            return None
        off = self._get("<H", vt + slot)
        return pos + off if off else None

    def scalar(self, t, idx: int, fmt: str, default):
        p = self.field(t, idx)
        return default if p is None else self._get(fmt, p)

    def ref(self, t, idx: int) -> int | None:
        p = self.field(t, idx)
        return None if p is None else p + self._get("<I", p)

    def vector(self, pos: int, elem_size: int) -> tuple[int, int]:
        """(start, count) of the vector at pos, checked to lie in the buffer."""
        n = self._get("<I", pos)
        if n * elem_size > len(self.b) - pos - 4:
            raise FormatError("flatbuffer vector longer than the message metadata")
        return pos + 4, n

    def string(self, pos: int) -> bytes:
        start, n = self.vector(pos, 1)
        return bytes(self.b[start:start + n])


def parse_message(meta: bytes) -> MessageInfo:
    """The flatbuffer ``Message`` of one IPC message (without its 8-byte
    prefix): its kind, body length, custom metadata and, for a record batch,
    its header. Raises FormatError for anything malformed."""
    fb = _Flat(meta)
    try:
        msg = fb.root()
        kind = fb.scalar(msg, 1, "<B", 0)
        body_length = fb.scalar(msg, 3, "<q", 0)
        custom = {}
        kv = fb.ref(msg, 4)
        if kv is not None:
            start, n = fb.vector(kv, 4)
            for i in range(n):
                p = start + 4 * i
                t = fb.table(p + fb._get("<I", p))
                k, v = fb.ref(t, 0), fb.ref(t, 1)
                custom[fb.string(k) if k is not None else b""] = \
                    fb.string(v) if v is not None else b""
        batch = None
        if kind in (MSG_RECORD_BATCH, MSG_DICTIONARY):
            hdr = fb.ref(msg, 2)
            if hdr is None:
                raise FormatError(f"{MESSAGE_TYPES[kind]} message without its header")
            h = fb.table(hdr)
            if kind == MSG_DICTIONARY:  # DictionaryBatch { id; data: RecordBatch; ... }
                data = fb.ref(h, 1)
                if data is None:
                    raise FormatError("dictionary batch without its data")
                h = fb.table(data)
            raw = []
            for idx in (1, 2):  # nodes: [FieldNode], buffers: [Buffer], 16 bytes each
                p = fb.ref(h, idx)
                if p is None:
                    raw.append(b"")
                    continue
                start, n = fb.vector(p, 16)
                raw.append(bytes(meta[start:start + 16 * n]))
            batch = BatchHeader(fb.scalar(h, 0, "<q", 0), raw[0], raw[1],
                                fb.ref(h, 3) is not None)
    except (struct.error, IndexError, OverflowError) as e:  # defensive: _get checks bounds
        raise FormatError(f"malformed message metadata ({type(e).__name__})") from None
    return MessageInfo(kind, body_length, custom, batch)


def custom_value_span(meta: bytes, key: bytes) -> tuple[int, int] | None:
    """(start, length) of the value of ``key`` in a message's custom metadata,
    as offsets into ``meta`` (the flatbuffer ``Message``), or None. The writer
    seals a batch by overwriting a placeholder of the same length there."""
    fb = _Flat(meta)
    try:
        kv = fb.ref(fb.root(), 4)
        if kv is None:
            return None
        start, n = fb.vector(kv, 4)
        for i in range(n):
            p = start + 4 * i
            t = fb.table(p + fb._get("<I", p))
            k, v = fb.ref(t, 0), fb.ref(t, 1)
            if k is not None and v is not None and fb.string(k) == key:
                return v + 4, fb.vector(v, 1)[1]
    except (struct.error, IndexError, OverflowError) as e:
        raise FormatError(f"malformed message metadata ({type(e).__name__})") from None
    return None
