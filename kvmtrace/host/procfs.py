"""Readers for /proc and debugfs files the recording keeps as context.

smaps gives each VMA's path and VmFlags (pf = VM_PFNMAP, io = VM_IO,
mm = VM_MIXEDMAP, ht = hugetlb); its page protection is not shown, which is
why the x86 memory type of a PFNMAP VMA is derived from the PAT memtype list
of its physical range instead (see kvmtrace.memtype.x86).
"""

from __future__ import annotations

import re

_HEADER = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S+)\s+([0-9a-f]+)\s+(\S+)\s+(\d+)\s*(.*)$")
SMAPS_KB_FIELDS = ("Size", "KernelPageSize", "MMUPageSize", "Rss", "AnonHugePages")


def parse_smaps(text: str) -> list[dict]:
    """One dict per VMA: start, end, perms, offset, dev, inode, path, vmflags, *_kb."""
    vmas, cur = [], None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            cur = {"start": int(m[1], 16), "end": int(m[2], 16), "perms": m[3],
                   "offset": int(m[4], 16), "dev": m[5], "inode": int(m[6]),
                   "path": m[7].strip(), "vmflags": ""}
            cur.update({f"{k.lower()}_kb": 0 for k in SMAPS_KB_FIELDS})
            vmas.append(cur)
            continue
        if cur is None:
            continue
        key, _, val = line.partition(":")
        if key == "VmFlags":
            cur["vmflags"] = val.strip()
        elif key in SMAPS_KB_FIELDS:
            cur[f"{key.lower()}_kb"] = int(val.split()[0])
    return vmas


def read_smaps(pid: int) -> list[dict] | None:
    try:
        with open(f"/proc/{pid}/smaps") as f:
            return parse_smaps(f.read())
    except (OSError, ValueError):
        return None


_PAT = re.compile(r"\[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\]\s+(\S+)")


def parse_pat_memtype_list(text: str) -> list[dict]:
    """Lines like 'PAT: [mem 0x...-0x...] write-combining' -> start, end, memtype."""
    return [{"start": int(a, 16), "end": int(b, 16), "memtype": t}
            for a, b, t in _PAT.findall(text)]


# arch/x86/kernel/cpu/mtrr/if.c mtrr_seq_show (2.6 to 7.x):
# "reg%02i: base=0x%06lx000 (%5luMB), size=%5lu%cB, count=%d: %s" with the type as
# mtrr_attrib_to_str names it
_MTRR = re.compile(r"^reg\d+: base=0x([0-9a-f]+) \(\s*\d+MB\), size=\s*(\d+)([KM])B, "
                   r"count=\d+: (\S+)", re.M)
MTRR_TYPES = {"uncachable": "UC", "write-combining": "WC", "write-through": "WT",
              "write-protect": "WP", "write-back": "WB"}


def parse_mtrr(text: str) -> list[dict]:
    """The variable-range MTRRs of /proc/mtrr -> start, end (exclusive), memtype
    (UC / WC / WT / WP / WB; '?' when the kernel hides them from the reader).
    /proc/mtrr shows neither the default type nor the fixed ranges below 1 MiB."""
    out = []
    for base, size, unit, kind in _MTRR.findall(text):
        start = int(base, 16)
        n = int(size) << (10 if unit == "K" else 20)
        out.append({"start": start, "end": start + n, "memtype": MTRR_TYPES.get(kind, "?")})
    return out


def parse_iomem_ram(text: str) -> list[dict]:
    """Top-level 'System RAM' ranges of /proc/iomem (inclusive end made exclusive).

    Without root /proc/iomem shows zeros; callers record what they got."""
    out = []
    for line in text.splitlines():
        if line.startswith(" ") or "System RAM" not in line:
            continue
        rng = line.split(":")[0].strip()
        a, b = rng.split("-")
        start, end = int(a, 16), int(b, 16) + 1
        if end > 1:
            out.append({"start": start, "end": end})
    return out


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, Z, ...), None if gone.
    A zombie (Z: exited, not yet reaped by its parent) still has a comm
    but no fds and no mappings: query says it exited instead of reading
    nothing from it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = stat.rpartition(")")[2].split()  # comm may hold spaces and ')'
    return rest[0] if rest else None
