"""Append-only writer: one record batch per flush, synced to disk.

After ``flush`` returns, the batch is on disk (fsync), so a writer killed
with SIGKILL leaves a file that reads back up to its last flush.

Batch bodies are compressed (Arrow IPC buffer compression, zstd by default:
``COMPRESSION``), except batches holding less than COMPRESS_FROM bytes of
data. Each batch message carries its sequence number and a CRC-32 of its
header and body, as they are on disk (compressed), in its
custom metadata (see format.py), so the reader can tell a batch damaged on
disk from a good one before decoding it. Arrow's stream writer serialises
(and compresses) each batch once, into memory, with a placeholder where the
checksum goes; the checksum is computed over those bytes and written into
the placeholder (same length), and the message goes to the file as it is.

Arrays are built from numpy buffers (``pa.Array.from_buffers``), not with
``pa.array``: besides being a copy less, ``pa.array`` imports pandas (0.7 s
here), which record never needs.
"""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pyarrow as pa

from .. import outputs
from ..probes import codegen
from . import format as fmt

# Arrow IPC buffer compression of every batch: "zstd", "lz4" or None
# (bench/bytes_per_event.py and bench/decode_rate.py measure the choices side
# by side; $KVMTRACE_COMPRESSION=none|lz4|zstd overrides it, for them).
COMPRESSION = {"none": None, "lz4": "lz4"}.get(os.environ.get("KVMTRACE_COMPRESSION", ""),
                                               "zstd")
# A batch holding less array data than this is written uncompressed: Arrow
# compresses buffer by buffer, each with its own length prefix and frame,
# which makes a small batch (a few events, the 20-odd empty tables) larger,
# not smaller (measured: 3.1 KB against 1.5 KB for 17 set_spte events).
COMPRESS_FROM = 64 << 10
_PLACEHOLDER = b"00000000"  # where a batch's CRC-32 goes (8 hex digits)
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the IPC stream's end marker


def _array(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """A null-free Arrow array over a contiguous numpy array (no copy)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(typ, len(values), [None, pa.py_buffer(values)])


def _struct_from_numpy(arr, typ: pa.StructType) -> pa.StructArray:
    """A struct array from a structured numpy array or collectors' Columns
    (anything indexable by field name, with a length), or an Arrow struct
    array of the table's type as it is."""
    if isinstance(arr, pa.StructArray) and arr.type == typ:
        return arr
    n = len(arr)
    return pa.StructArray.from_arrays(
        [(pa.array(codegen.text_column(arr[f.name]), type=pa.string())  # a char array
          if pa.types.is_string(f.type) else
          _array(np.asarray(arr[f.name], dtype=fmt.numpy_dtype(f.type)), f.type))
         for f in typ] if n else [pa.nulls(0, f.type) for f in typ],
        fields=list(typ))


def _strings(values: list) -> pa.Array:
    data = [str(v).encode("utf-8", "backslashreplace") for v in values]
    ends = np.cumsum([len(d) for d in data], dtype=np.int64)
    if len(ends) and ends[-1] >= 1 << 31:
        raise OverflowError("more string data than an Arrow string array holds")
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    offsets[1:] = ends
    return pa.Array.from_buffers(pa.string(), len(data),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def _struct_from_rows(rows: list[dict], typ: pa.StructType) -> pa.StructArray:
    try:
        cols = []
        for f in typ:
            vals = [r[f.name] for r in rows]
            if pa.types.is_string(f.type):
                if not all(isinstance(v, str) for v in vals):
                    raise TypeError(f.name)
                cols.append(_strings(vals))
            else:
                if not all(type(v) is int for v in vals):
                    raise TypeError(f.name)
                cols.append(_array(np.array(vals, dtype=fmt.numpy_dtype(f.type)), f.type))
        return pa.StructArray.from_arrays(cols, fields=list(typ))
    except (KeyError, TypeError, OverflowError, ValueError):
        return pa.array(rows, type=typ)  # missing or odd values: Arrow's rules (nulls, errors)


def batch_metadata(batch: pa.RecordBatch, seq: int) -> dict[bytes, bytes]:
    """The custom metadata sealing ``batch`` as the ``seq``-th batch of a
    stream written *uncompressed* (default IPC write options): its sequence
    number and the CRC-32 of its header and body. (The writer seals the
    bytes it writes itself, see ``seal``; this is for tools and tests that
    write uncompressed streams with pyarrow's stream writer.)"""
    msg = batch.serialize()
    meta_len = struct.unpack_from("<i", msg, 4)[0]
    info = fmt.parse_message(memoryview(msg)[8:8 + meta_len])
    body = memoryview(msg)[8 + meta_len:]
    return {fmt.SEQ_KEY: str(seq).encode(),
            fmt.CRC_KEY: fmt.batch_checksum(seq, info.batch, body)}


def seal(stream: bytearray, seq: int):
    """Write the checksum into the record batch message(s) of ``stream`` (bytes
    of an IPC stream, as Arrow wrote them, batches carrying the placeholder)
    in place; messages of other kinds pass unchanged."""
    pos = 0
    while pos + 8 <= len(stream):
        cont, meta_len = struct.unpack_from("<Ii", stream, pos)
        if cont != fmt.CONTINUATION or meta_len <= 0:
            break
        meta = bytes(stream[pos + 8:pos + 8 + meta_len])
        info = fmt.parse_message(meta)
        body_at = pos + 8 + meta_len
        if info.kind == fmt.MSG_RECORD_BATCH:
            span = fmt.custom_value_span(meta, fmt.CRC_KEY)
            if span is None or span[1] != len(_PLACEHOLDER):
                raise RuntimeError("a batch without its checksum placeholder")
            crc = fmt.batch_checksum(seq, info.batch,
                                     memoryview(stream)[body_at:body_at + info.body_length])
            at = pos + 8 + span[0]
            stream[at:at + len(crc)] = crc
        pos = body_at + info.body_length


class _Capture:
    """The file object Arrow's stream writer writes into: memory (one copy of
    each buffer Arrow hands over), passed on to the real file once a batch is
    sealed."""

    closed = False

    def __init__(self):
        self.buf = bytearray()

    def write(self, data) -> int:
        self.buf += data  # bytes, or a pyarrow Buffer (valid only during the call)
        return len(data)

    def flush(self):
        pass

    def close(self):
        pass

    def take(self) -> bytearray:
        out, self.buf = self.buf, bytearray()
        return out


class RecordingWriter:
    def __init__(self, path: str, meta: dict, *, force: bool = False,
                 compression: str | None = COMPRESSION):
        self.path = path
        self.types = fmt.table_types()
        self.schema = fmt.schema(json.dumps(meta, sort_keys=True, default=str))
        self._file = os.fdopen(outputs.create(path, force), "wb")  # 0600, never via a link
        self.compression = compression
        self._streams: dict = {}  # codec -> (Arrow stream writer, its _Capture)
        self._schema_written = False
        self._pending: dict[str, list] = {name: [] for name in self.types}
        self.bytes_written = 0
        self.batches = 0
        self.flush(force=True)  # an empty first batch: the file is a valid recording at once

    def add_events(self, name: str, records):
        """Events of one kind: collectors' Columns, a structured numpy array or an
        Arrow struct array of the table's type."""
        if len(records):
            self._pending[name].append(_struct_from_numpy(records, self.types[name]))

    def add_rows(self, name: str, rows: list[dict]):
        if rows:
            self._pending[name].append(_struct_from_rows(rows, self.types[name]))

    def note(self, key: str, value, ts: int | None = None):
        self.add_rows("notes", [{"ts": ts if ts is not None else time.monotonic_ns(),
                                 "key": key, "value": json.dumps(value, default=str)}])

    def flush(self, force: bool = False):
        if force or any(self._pending.values()):
            self._file.write(self.encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.bytes_written = self._file.tell()

    def encode(self) -> bytearray:
        """Everything pending as the next batch: the bytes to append to the file
        (the schema message first, the first time), sealed."""
        cols = []
        for name, typ in self.types.items():
            parts = self._pending[name]
            values = (pa.concat_arrays(parts) if len(parts) > 1 else parts[0]) if parts \
                else pa.nulls(0, typ)
            offsets = np.array([0, len(values)], dtype=np.int32)
            cols.append(pa.ListArray.from_arrays(_array(offsets, pa.int32()), values))
            parts.clear()
        batch = pa.RecordBatch.from_arrays(cols, schema=self.schema)
        writer, sink = self._stream(self.compression if batch.nbytes >= COMPRESS_FROM else None)
        writer.write_batch(batch, custom_metadata={
            fmt.SEQ_KEY: str(self.batches).encode(), fmt.CRC_KEY: _PLACEHOLDER})
        data = sink.take()
        meta_len = struct.unpack_from("<i", data, 4)[0]
        if fmt.parse_message(bytes(data[8:8 + meta_len])).kind == fmt.MSG_SCHEMA:
            if self._schema_written:  # each codec's stream begins with the schema: once is all
                del data[:8 + meta_len]
            self._schema_written = True
        seal(data, self.batches)
        self.batches += 1
        return data

    def _stream(self, codec):
        """The Arrow stream writer (into memory) that writes batches with ``codec``:
        compressed and uncompressed batches can follow each other in one stream
        (compression is declared per batch message)."""
        if codec not in self._streams:
            sink = _Capture()
            self._streams[codec] = (pa.ipc.new_stream(sink, self.schema, options=(
                pa.ipc.IpcWriteOptions(compression=codec, use_threads=False))), sink)
        return self._streams[codec]  # use_threads off: one core, the guest has the other

    def abandon(self):
        """After a failed write: close without writing more (what was synced stays)."""
        try:
            self._file.close()
        except OSError:
            pass

    def close(self):
        self.flush()
        for writer, _ in self._streams.values():
            writer.close()
        self._file.write(_EOS)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
