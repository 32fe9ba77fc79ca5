#!/usr/bin/env python3
"""A selftests recording (guest/selftests.py) cut down to what its check
reads, to commit as a test fixture (tests/fixtures/x86-selftests-*/).

The check (guest/selftests_expect.py) reads the memslot ioctls, the VM
ioctls, kvm_arch_prepare_memory_region, the process exits and the notes (the
end note's lost counts, bpf_misses); the fault path's tables (hundreds of
thousands of TDP SPTE changes while set_memory_region_test moves its slot)
are what makes a full recording several MB. Those tables are left empty
here, everything else is copied row for row with the recording's own meta.

    .venv/bin/python testbed/x86/trim_selftests.py FULL.kvt OUT.kvt
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from kvmtrace.recording import format as fmt  # noqa: E402
from kvmtrace.recording import reader  # noqa: E402
from kvmtrace.recording.writer import RecordingWriter  # noqa: E402

KEEP = ("memslot", "vm_ioctl", "prepare_region", "proc_exit", "notes", "stats",
        "memslot_snapshot")


def _struct(df, typ: pa.StructType) -> pa.StructArray:
    """The reader's DataFrame back into the table's Arrow struct type."""
    cols = [pa.array(df[f.name].tolist() if df[f.name].dtype == object else df[f.name],
                     type=f.type, from_pandas=True) for f in typ]
    cols = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols]
    return pa.StructArray.from_arrays(cols, fields=list(typ))


def main(argv) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    src, dst = argv[1], argv[2]
    try:
        rec = reader.read(src)
    except (OSError, reader.RecordingError) as e:
        print(f"trim_selftests: {src}: {e}", file=sys.stderr)
        return 1
    if not rec.complete or rec.problems:
        print(f"trim_selftests: {src}: incomplete or damaged: {rec.problems}", file=sys.stderr)
        return 1
    types = fmt.table_types()
    w = RecordingWriter(dst, rec.meta, force=True)
    for name in KEEP:
        df = rec.tables.get(name)
        if name in types and df is not None and len(df):
            w.add_events(name, _struct(df, types[name]))
    w.close()
    print(f"{dst}: {os.path.getsize(dst):,} bytes "
          f"({', '.join(f'{n} {len(rec.tables[n])}' for n in KEEP if n in rec.tables)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
