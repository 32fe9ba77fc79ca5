"""Where events were lost: the BPF side's per (process, kind, 2 MiB region)
counts, copied into the recording as a ``lost_where`` note.

The per-kind totals (``kvmtrace_lost_count``) say how many events a ring
buffer dropped; this says which guest-physical regions they concerned, so a
report can mark exactly the memslots whose picture is incomplete. The table
is cumulative; the last note in a recording holds everything.
"""

from __future__ import annotations

import mmap
import struct

NOWHERE = (1 << 64) - 1
REGION_PAGES = 512  # the BPF side keys a region as gfn >> 9 (2 MiB of 4 KiB frames)


def lost_where(b, events) -> list[list]:
    """Rows [kind, pid, first_gfn | None, count, first_ts, last_ts], sorted."""
    rows = []
    for k, v in b["kvmtrace_lost_where"].items():
        if k.kind >= len(events):
            continue
        region = None if k.region == NOWHERE else int(k.region) * REGION_PAGES
        rows.append([events[k.kind].name, int(k.pid), region, int(v.count),
                     int(v.first_ts), int(v.last_ts)])
    rows.sort(key=lambda r: (r[0], r[1], -1 if r[2] is None else r[2]))
    return rows


class LostTotals:
    """The per-kind totals of ``kvmtrace_lost_total`` (probes/bpf/prelude.c: a
    BPF_F_MMAPABLE array, one u64 per event kind, added to atomically), read
    through mmap: no bpf() call, so reading them at every flush never holds
    the CPU's bpf_prog_active (see progstats.py for what that costs)."""

    def __init__(self, b, kinds: int):
        table = b["kvmtrace_lost_total"]
        size = -(-kinds * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
        self.kinds = kinds
        self._map = mmap.mmap(table.map_fd, size, mmap.MAP_SHARED, mmap.PROT_READ)

    def read(self) -> list[int]:
        return list(struct.unpack_from(f"<{self.kinds}Q", self._map))

    def close(self):
        self._map.close()
