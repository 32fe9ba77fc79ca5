"""Append-only writer: one record batch per flush, synced to disk.

After ``flush`` returns, the batch is on disk (fsync), so a writer killed
with SIGKILL leaves a file that reads back up to its last flush.

Each batch message carries its sequence number and a CRC-32 of its header
and body in its custom metadata (see format.py), so the reader can tell a
batch damaged on disk from a good one before decoding it.
"""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pyarrow as pa

from .. import outputs
from . import format as fmt


def _struct_from_numpy(arr: np.ndarray, typ: pa.StructType) -> pa.StructArray:
    return pa.StructArray.from_arrays(
        [pa.array(np.ascontiguousarray(arr[f.name]), type=f.type) for f in typ],
        fields=list(typ))


def _struct_from_rows(rows: list[dict], typ: pa.StructType) -> pa.StructArray:
    return pa.array(rows, type=typ)


def batch_metadata(batch: pa.RecordBatch, seq: int) -> dict[bytes, bytes]:
    """The custom metadata sealing ``batch`` as the ``seq``-th batch of a
    stream: its sequence number and the CRC-32 of its header and body.

    The body and header are those of ``batch.serialize()``, which uses the
    default IPC write options, as the stream writer does: the same bytes."""
    msg = batch.serialize()
    meta_len = struct.unpack_from("<i", msg, 4)[0]
    info = fmt.parse_message(memoryview(msg)[8:8 + meta_len])
    body = memoryview(msg)[8 + meta_len:]
    return {fmt.SEQ_KEY: str(seq).encode(),
            fmt.CRC_KEY: fmt.batch_checksum(seq, info.batch, body)}


class RecordingWriter:
    def __init__(self, path: str, meta: dict, *, force: bool = False):
        self.path = path
        self.types = fmt.table_types()
        self.schema = fmt.schema(json.dumps(meta, sort_keys=True, default=str))
        self._file = os.fdopen(outputs.create(path, force), "wb")  # 0600, never via a link
        self._writer = pa.ipc.new_stream(self._file, self.schema)
        self._pending: dict[str, list] = {name: [] for name in self.types}
        self.bytes_written = 0
        self.batches = 0
        self.flush(force=True)  # an empty first batch: the file is a valid recording at once

    def add_events(self, name: str, records: np.ndarray):
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
            cols = []
            for name, typ in self.types.items():
                parts = self._pending[name]
                values = (pa.concat_arrays(parts) if len(parts) > 1 else parts[0]) if parts \
                    else pa.array([], type=typ)
                cols.append(pa.ListArray.from_arrays(
                    pa.array([0, len(values)], type=pa.int32()), values))
                parts.clear()
            batch = pa.RecordBatch.from_arrays(cols, schema=self.schema)
            self._writer.write_batch(batch, custom_metadata=batch_metadata(batch, self.batches))
            self.batches += 1
        self._file.flush()
        os.fsync(self._file.fileno())
        self.bytes_written = self._file.tell()

    def abandon(self):
        """After a failed write: close without writing more (what was synced stays)."""
        try:
            self._file.close()
        except OSError:
            pass

    def close(self):
        self.flush()
        self._writer.close()  # writes the end-of-stream marker
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
