"""Read a recording back into pandas tables, tolerating a cut-off end.

A recording whose writer died (SIGKILL, power loss, disk full) ends in the
middle of a message or without the end-of-stream marker; everything up to the
last complete batch is returned and ``complete`` says whether the end was
clean.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa

from . import format as fmt


class RecordingError(Exception):
    """A file that is not a readable kvmtrace recording (one-line message)."""


@dataclass
class Recording:
    path: str
    meta: dict
    schema_version: int
    tables: dict[str, pd.DataFrame]
    complete: bool
    batches: int
    problems: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


def _open(path: str):
    if not os.path.exists(path):
        raise RecordingError(f"{path}: no such file")
    if os.path.isdir(path):
        raise RecordingError(f"{path}: is a directory, not a recording")
    if os.path.getsize(path) == 0:
        raise RecordingError(f"{path}: empty file (the recording was never started, "
                             f"or was cut off before its header)")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise RecordingError(f"{path}: {e.strerror}") from None
    try:
        return f, pa.ipc.open_stream(f)
    except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError):
        f.close()
        raise RecordingError(f"{path}: not a kvmtrace recording (no Arrow stream header)") \
            from None


def read(path: str) -> Recording:
    f, reader = _open(path)
    with f:
        md = reader.schema.metadata or {}
        if fmt.VERSION_KEY not in md:
            raise RecordingError(f"{path}: an Arrow stream, but not a kvmtrace recording")
        version = int(md[fmt.VERSION_KEY])
        if version > fmt.SCHEMA_VERSION:
            raise RecordingError(f"{path}: recording schema {version} is newer than this "
                                 f"kvmtrace reads ({fmt.SCHEMA_VERSION}); upgrade kvmtrace")
        meta = json.loads(md.get(fmt.META_KEY, b"{}"))
        parts: dict[str, list] = {n: [] for n in reader.schema.names}
        complete, batches, problems = True, 0, []
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowInvalid, pa.ArrowException, OSError, EOFError) as e:
                complete = False
                problems.append(f"recording ends mid-write after {batches} flushes "
                                f"({str(e).splitlines()[0][:120]})")
                break
            batches += 1
            for i, name in enumerate(batch.schema.names):
                parts[name].append(batch.column(i).flatten())
        if complete and not _has_eos(path):
            complete = False
            problems.append(f"recording was not closed (no end marker) after {batches} flushes")
    tables = {}
    for name, typ in fmt.table_types().items():
        chunks = [c for c in parts.get(name, []) if len(c)]
        arr = pa.concat_arrays(chunks) if chunks else pa.array([], type=typ)
        tables[name] = pa.RecordBatch.from_struct_array(arr).to_pandas()
    return Recording(path, meta, version, tables, complete, batches, problems)


def _has_eos(path: str) -> bool:
    """The Arrow stream end marker: continuation token 0xFFFFFFFF then length 0."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 8))
        return f.read() == b"\xff\xff\xff\xff\x00\x00\x00\x00"
