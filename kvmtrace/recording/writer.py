"""Append-only writer: one record batch per flush, synced to disk.

After ``flush`` returns, the batch is on disk (fsync), so a writer killed
with SIGKILL leaves a file that reads back up to its last flush.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa

from . import format as fmt


def _struct_from_numpy(arr: np.ndarray, typ: pa.StructType) -> pa.StructArray:
    return pa.StructArray.from_arrays(
        [pa.array(np.ascontiguousarray(arr[f.name]), type=f.type) for f in typ],
        fields=list(typ))


def _struct_from_rows(rows: list[dict], typ: pa.StructType) -> pa.StructArray:
    return pa.array(rows, type=typ)


class RecordingWriter:
    def __init__(self, path: str, meta: dict):
        self.path = path
        self.types = fmt.table_types()
        self.schema = fmt.schema(json.dumps(meta, sort_keys=True, default=str))
        self._file = open(path, "wb")
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
            self._writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=self.schema))
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
