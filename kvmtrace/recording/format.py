"""The recording's layout, derived from the event declarations.

One Arrow IPC stream. Its schema has one column per table, each a
``list<struct<...>>``; each flush appends one record batch of a single row
whose cells hold everything captured for that table since the last flush.
Tables are:

- one per event kind in kvmtrace.probes.events (its fields, same names);
- ``vmas``: /proc/PID/smaps snapshots (at start, after each memslot change of
  that process, and at the end);
- ``stats``: per flush and event kind, cumulative events read and lost;
- ``notes``: timestamped key / JSON value pairs (end-of-recording facts,
  collector warnings).

Schema metadata: ``kvmtrace.schema_version`` and ``kvmtrace.meta`` (JSON: host,
kernel, arch, KVM flavour, probes chosen and attached, clock base, decode
context such as PAT configuration). Readers accept any version up to their
own; new tables and fields may be added with a version bump, old ones are
never renamed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..probes.codegen import event_dtype
from ..probes.events import EVENTS

SCHEMA_VERSION = 1
VERSION_KEY = b"kvmtrace.schema_version"
META_KEY = b"kvmtrace.meta"

_NP_TO_PA = {np.dtype(t): pa.from_numpy_dtype(np.dtype(t))
             for t in ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")}

VMA_FIELDS = [
    ("ts", pa.uint64()), ("pid", pa.uint32()), ("reason", pa.string()),
    ("start", pa.uint64()), ("end", pa.uint64()), ("perms", pa.string()),
    ("offset", pa.uint64()), ("dev", pa.string()), ("inode", pa.uint64()),
    ("path", pa.string()), ("vmflags", pa.string()),
    ("size_kb", pa.uint64()), ("kernelpagesize_kb", pa.uint64()),
    ("mmupagesize_kb", pa.uint64()), ("rss_kb", pa.uint64()),
    ("anonhugepages_kb", pa.uint64()),
]
STATS_FIELDS = [("ts", pa.uint64()), ("kind", pa.string()),
                ("events", pa.uint64()), ("lost", pa.uint64())]
NOTES_FIELDS = [("ts", pa.uint64()), ("key", pa.string()), ("value", pa.string())]


def event_struct(name: str) -> pa.StructType:
    dt = event_dtype(EVENTS[name])
    return pa.struct([(n, _NP_TO_PA[dt.fields[n][0]]) for n in dt.names])


def table_types() -> dict[str, pa.StructType]:
    types = {name: event_struct(name) for name in EVENTS}
    types["vmas"] = pa.struct(VMA_FIELDS)
    types["stats"] = pa.struct(STATS_FIELDS)
    types["notes"] = pa.struct(NOTES_FIELDS)
    return types


def schema(meta_json: str) -> pa.Schema:
    return pa.schema(
        [pa.field(name, pa.list_(t)) for name, t in table_types().items()],
        metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), META_KEY: meta_json.encode()},
    )
