"""The host VMA behind each memslot, and the memory type it gives.

Two sources, in this order:

1. The VMA captured in BPF at the memslot ioctl itself (the memslot event's
   ``vma_*`` / ``vm_*`` fields: bpf_find_vma at syscall entry, Linux 5.17+,
   probes/bpf/vma.h). It is there even when the VMM exits or remaps at once,
   and it has vm_page_prot: on x86 the VMA's memory type is the PAT entry its
   PWT/PCD/PAT bits select (with the PAT configuration recorded at start); on
   arm64 the MAIR type its AttrIndx selects (kvmtrace.memtype.arm64).
2. /proc/PID/smaps, snapshotted when the collector sees the memslot event
   (a few ms later). It also gives the VMA's name / path (matched to a captured
   VMA by start, end and inode), its page size and THP use. It has no page
   protection, so on x86 a VMA that is neither VM_PFNMAP ('pf') nor
   VM_MIXEDMAP ('mm') is taken as write-back (struct pages with the default
   protection, PAT entry 0: anonymous, file, shmem/memfd, hugetlb), and for
   'pf' / 'mm' the physical frames KVM mapped are looked up in the PAT memtype
   list and System RAM ranges (kvmtrace.memtype.x86.pfn_memtype).

When neither saw the VMA, ``vma_source`` says why (which lookup was missing
and what happened to the snapshot).
"""

from __future__ import annotations

import errno as errno_mod
import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd

from ..memtype import arm64 as a64
from ..memtype import x86 as x86mt
from ..probes.events import VMA_STATUS
from .memslots import BEFORE_RECORDING

VMFLAG_NAMES = {"pf": "VM_PFNMAP", "io": "VM_IO", "mm": "VM_MIXEDMAP", "ht": "hugetlb",
                "hg": "THP advised", "nh": "no THP", "dd": "no dump", "sh": "shared"}

# vm_flags bit -> the smaps VmFlags mnemonic (fs/proc/task_mmu.c,
# show_smap_vma_flags; include/linux/mm.h). These bits are the same from 2.6
# to 6.18 (and as VMA_*_BIT in BTF from 6.19 to 7.3) for the flags the
# analysis reads: pf 10, io 14, ht 22, mm 28, hg 29, nh 30, sh 3. Bit 24 is
# VM_ARCH_1: VM_PAT on x86 ('ar'), VM_ARM64_BTI on arm64 ('bt').
VM_FLAG_MNEMONICS = {
    0: "rd", 1: "wr", 2: "ex", 3: "sh", 4: "mr", 5: "mw", 6: "me", 7: "ms", 8: "gd",
    9: "um", 10: "pf", 12: "uw", 13: "lo", 14: "io", 15: "sr", 16: "rr", 17: "dc",
    18: "de", 19: "lf", 20: "ac", 21: "nr", 22: "ht", 23: "sf", 24: "ar", 25: "wf",
    26: "dd", 27: "sd", 28: "mm", 29: "hg", 30: "nh", 31: "mg",
}
VM_PFNMAP, VM_IO, VM_MIXEDMAP = 1 << 10, 1 << 14, 1 << 28
KERNEL_MINORBITS = 20  # kernel dev_t: major << 20 | minor (include/linux/kdev_t.h)
ANON_INODE_FS_MAGIC = 0x09041934  # anon_inodefs' s_magic (include/uapi/linux/magic.h)

FOUND, NONE, FAILED, SKIPPED = (VMA_STATUS[k] for k in ("FOUND", "NONE", "FAILED", "SKIPPED"))

COLUMNS = ["slot_row", "vma", "vmflags", "pfnmap", "vma_count", "kernelpagesize_kb",
           "anonhuge_kb", "snapshot_delay_ms", "vma_covers", "vma_source", "vma_start",
           "vma_end", "vm_flags", "vm_page_prot", "vm_pgoff", "vma_has_file", "vma_ino",
           "vma_dev", "pgprot_memtype", "pgprot_memtype_source"]


def describe_path(path: str, vmflags: str) -> str:
    if not path:
        return "[anon]"
    if path.startswith("/memfd:"):
        return "memfd:" + path[len("/memfd:"):].replace(" (deleted)", "")
    return path


def kernel_file_name(name: str, fs_magic: int, ino: int, dev: int) -> str:
    """A VMA's file named from what BPF read at the ioctl (its dentry's own
    name, recording format 6), as /proc/PID/maps would show it where that can
    be told (anon_inode:NAME, memfd:NAME); else its last path component with
    the inode. Used when no smaps snapshot showed the VMA (the VMM had
    exited or unmapped it by then)."""
    where = f"inode {ino} on {dev_name(dev)}"
    if not name:
        return f"file {where}"
    if fs_magic == ANON_INODE_FS_MAGIC:
        return f"anon_inode:{name}"
    if name.startswith("memfd:"):
        return name
    return f".../{name} ({where})"


def special_mapping_name(name: str) -> str:
    """A file-less VMA's name as BPF read it (a special mapping's own:
    [vvar], [vdso] ...; probes/bpf/vma_name.h), or '' when what was read is
    not such a bracketed name."""
    return name if re.fullmatch(r"\[[ -~]{1,62}\]", name or "") else ""


def is_pfn_mapped(vmflags: str) -> bool:
    flags = vmflags.split()
    return "pf" in flags or "mm" in flags


def vm_flags_mnemonics(vm_flags: int) -> str:
    """vm_flags as smaps' VmFlags line spells it."""
    return " ".join(m for bit, m in VM_FLAG_MNEMONICS.items() if vm_flags >> bit & 1)


def dev_name(dev: int) -> str:
    """A kernel dev_t as /proc/PID/maps prints it (major:minor, hex)."""
    return f"{dev >> KERNEL_MINORBITS:02x}:{dev & ((1 << KERNEL_MINORBITS) - 1):02x}"


def pgprot_memtype(prot: int, meta: dict, when: str = "at the ioctl") -> tuple[str | None, str]:
    """(memory type, how it was read) for a vm_page_prot value read ``when``."""
    arch = meta.get("arch") or ""
    if arch == "aarch64":
        kernel = meta.get("kernel")
        mt = str(a64.attrindx_memtype([prot], kernel)[0])
        idx = int(a64.attrindx([prot])[0])
        return mt, f"vm_page_prot {prot:#x} {when}: AttrIndx {idx} -> {mt}"
    if arch not in ("x86_64", ""):
        return None, f"vm_page_prot {prot:#x}: no decoder for {arch}"
    pat = ((meta.get("x86") or {}).get("pat") or {}).get("entries") or list(x86mt.LINUX_PAT)
    idx = int(x86mt.legacy_pat_index([prot], [1])[0])
    bits = [n for n, b in (("PWT", x86mt.PWT), ("PCD", x86mt.PCD), ("PAT", x86mt.PAT_4K))
            if prot & b]
    return pat[idx], (f"vm_page_prot {prot:#x} {when}: PAT index {idx} "
                      f"({'|'.join(bits) or 'no PWT/PCD/PAT'}) -> {pat[idx]}")


def _errno(err: int) -> str:
    return errno_mod.errorcode.get(-err, f"errno {-err}") if err < 0 else str(err)


def _bpf_why(ev, meta: dict) -> str:
    """Why the memslot event carries no VMA."""
    if ev is None:
        return "no memslot event for this slot version"
    status = ev.vma_status
    if status == NONE:
        return "no VMA contained the slot's userspace_addr at the ioctl (bpf_find_vma: ENOENT)"
    if status == FAILED:
        err = int(ev.vma_err)
        return ("the BPF VMA lookup at the ioctl failed (" + _errno(err)
                + (": the mmap lock was contended" if -err == errno_mod.EBUSY else "") + ")")
    if status == SKIPPED:
        return "the request could not be read at the ioctl, so no VMA was looked up"
    vl = meta.get("vma_lookup")
    if not isinstance(vl, dict):
        return "this recording has no BPF VMA lookup (made by a kvmtrace without it)"
    reason = vl.get("reason") if isinstance(vl.get("reason"), str) else ""
    return f"this kernel's BPF VMA lookup is unavailable ({reason or 'reason not recorded'})"


def _smaps_why(pid: int, g, gone: set) -> str:
    if g is None or not len(g):
        if pid in gone:
            return "the VMM had exited before the smaps snapshot"
        return "no smaps snapshot of the VMM was taken"
    return ("no smaps snapshot showed a VMA at the slot's address (unmapped before the "
            "snapshot)")


def _smaps_gone(notes: pd.DataFrame | None) -> set:
    """pids whose smaps snapshot came back empty: gone or exiting (collector notes)."""
    out = set()
    if notes is None or not len(notes) or "key" not in notes:
        return out
    for v in notes.loc[notes["key"] == "smaps_unavailable", "value"]:
        try:
            d = json.loads(v) if isinstance(v, str) else v
            out.add(int(d["pid"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _events_by_slot(memslot: pd.DataFrame | None) -> dict:
    """(pid, vm_fd, slot, ts) -> the memslot event (ts is the slot version's start_ts)."""
    if memslot is None or not len(memslot):
        return {}
    keys = zip(memslot["pid"].astype("int64"), memslot["vm_fd"].astype("int64"),
               memslot["slot"].astype("int64"), memslot["ts"].astype("uint64"))
    return {(int(p), int(v), int(s), int(t)): i for i, (p, v, s, t) in enumerate(keys)}


EVENT_FIELDS = ("vma_status", "vma_err", "vma_has_file", "vma_covers", "vma_count", "vma_dev",
                "vma_start", "vma_end", "vm_flags", "vm_page_prot", "vm_pgoff", "vma_ino",
                "vma_fs_magic")
EVENT_TEXT = "vma_name"  # the one text field among them (format 6; '' before)


def _event(memslot, k):
    """The VMA fields of memslot event ``k`` as exact ints (a row Series of
    mixed integer columns would be float64: vm_page_prot has bit 63 set); a
    field an older recording lacks reads as 0 (lookup unavailable)."""
    if k is None:
        return None
    return SimpleNamespace(**{f: int(memslot[f][k]) if f in memslot else 0
                              for f in EVENT_FIELDS},
                           **{EVENT_TEXT: str(memslot[EVENT_TEXT][k]) if EVENT_TEXT in memslot
                              else ""})


# how the VMA of a slot set before recording was read (collectors/snapshot.py)
AT_START = "read by a BPF iterator when recording began"


def _events_from_snapshot(snapshot: pd.DataFrame | None) -> dict:
    """(pid, vm_fd, as_id, slot) -> the slot's VMA as the iterator read it at
    the start, in the memslot event's VMA fields (EVENT_FIELDS)."""
    out = {}
    if snapshot is None or not len(snapshot):
        return out
    for r in snapshot.itertuples(index=False):
        end = int(r.hva) + int(r.size)
        out[(int(r.pid), int(r.vm_fd), int(r.as_id), int(r.slot))] = SimpleNamespace(**{
            "vma_status": FOUND if r.vma_found else NONE, "vma_err": 0,
            "vma_has_file": int(r.vma_has_file), "vma_covers": int(int(r.vma_end) >= end),
            "vma_count": 1 if r.vma_found else 0, "vma_dev": int(r.vma_dev),
            "vma_start": int(r.vma_start), "vma_end": int(r.vma_end),
            "vm_flags": int(r.vm_flags), "vm_page_prot": int(r.vm_page_prot),
            "vm_pgoff": int(r.vm_pgoff), "vma_ino": int(r.vma_ino),
            "vma_fs_magic": int(r.vma_fs_magic), "vma_name": str(r.vma_name)})
    return out


class _Smaps:
    """One process's smaps snapshots, indexed for the per-slot lookups: rows
    sorted by (ts, start), each snapshot's starts and ends as arrays, so a
    slot finds its rows by binary search instead of filtering every row of
    every snapshot (30,801 slot versions x 5,719 rows took 23 min that way).
    Text columns are plain objects: Arrow-backed strings make each small
    selection cost a pyarrow take."""

    def __init__(self, g: pd.DataFrame):
        g = g.sort_values(["ts", "start"], kind="stable").reset_index(drop=True)
        self.col = {c: g[c].to_numpy() for c in g.columns}  # numpy, not Arrow, columns
        self.n = len(g)
        self.ts = g["ts"].to_numpy(dtype=np.int64)
        self.start = g["start"].to_numpy(dtype=np.uint64)
        self.end = g["end"].to_numpy(dtype=np.uint64)
        self.inode = g["inode"].to_numpy(dtype=np.uint64)
        self.snap_ts, first = np.unique(self.ts, return_index=True)
        self.bounds = np.r_[first, len(g)]
        # a snapshot whose VMAs are sorted and disjoint (any real smaps) is
        # searched by bisection; any other (a corrupt file) by a mask
        bad = np.zeros(len(g), dtype=np.int64)
        if len(g):
            bad[:-1] = self.end[:-1] > self.start[1:]  # overlaps the next VMA
            bad[self.bounds[1:] - 1] = 0               # the next is another snapshot's
            bad |= self.start > self.end
        self.searchable = (np.add.reduceat(bad, self.bounds[:-1]) == 0) if len(g) else \
            np.ones(0, dtype=bool)

    def __len__(self):
        return self.n

    def at(self, i: int, c: str):
        return self.col[c][i]

    def _in_snapshot(self, k: int, lo: int, hi: int) -> np.ndarray:
        a, b = int(self.bounds[k]), int(self.bounds[k + 1])
        if self.searchable[k]:
            i = a + int(np.searchsorted(self.end[a:b], np.uint64(lo), side="right"))
            j = a + int(np.searchsorted(self.start[a:b], np.uint64(hi), side="left"))
            return np.arange(i, max(i, j))
        m = (self.start[a:b] < np.uint64(hi)) & (self.end[a:b] > np.uint64(lo))
        return a + np.flatnonzero(m)

    def rows(self, start_ts: int, lo: int, hi: int):
        """The rows (indexes, by start) of the first snapshot at or after
        ``start_ts`` that overlap [lo, hi), else of the last one before; None
        if no snapshot does."""
        if hi <= lo:
            return None
        k0 = int(np.searchsorted(self.snap_ts, start_ts, side="left"))
        for k in list(range(k0, len(self.snap_ts))) + list(range(k0 - 1, -1, -1)):
            idx = self._in_snapshot(k, lo, hi)
            if len(idx):
                return idx
        return None

    def matching(self, start: int, end: int, ino: int, has_file: bool,
                 among: np.ndarray | None = None) -> np.ndarray:
        """Rows (indexes, ``among`` these or all) showing the VMA [start, end)
        of inode ``ino`` (else, for a file, the VMA holding ``start`` with it)."""
        idx = np.arange(self.n) if among is None else among
        st, en, ino_ = self.start[idx], self.end[idx], self.inode[idx]
        m = (st == np.uint64(start)) & (en == np.uint64(end)) \
            & (ino_ == np.uint64(ino if has_file else 0))
        if not m.any() and has_file:  # split or merged since: the file still names it
            m = (st <= np.uint64(start)) & (en > np.uint64(start)) & (ino_ == np.uint64(ino))
        return idx[m]


def slot_vmas(slots: pd.DataFrame, vmas: pd.DataFrame, memslot: pd.DataFrame | None = None,
              meta: dict | None = None, notes: pd.DataFrame | None = None,
              snapshot: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per slot version: its VMA, from the BPF capture at the ioctl
    (``memslot``'s VMA fields; for a slot set before recording, the start's
    ``snapshot``) when there is one, else from the smaps snapshot taken after
    the slot was set (else the last before)."""
    meta = meta or {}
    rows = []
    by_pid = {pid: _Smaps(g) for pid, g in vmas.groupby("pid")} if len(vmas) else {}
    events = _events_by_slot(memslot)
    if memslot is not None:  # the VMA fields as numpy arrays: one element each per slot
        memslot = {f: memslot[f].to_numpy() for f in EVENT_FIELDS + (EVENT_TEXT,)
                   if f in memslot}
    at_start = _events_from_snapshot(snapshot)
    gone = _smaps_gone(notes)
    for i, s in zip(slots.index, slots.itertuples(index=False)):  # tuples: no Series per row
        g = by_pid.get(s.pid)
        lo, hi = int(s.hva), int(s.hva) + int(s.size_bytes)
        before = getattr(s, "created_by", None) == BEFORE_RECORDING
        if before:
            ev = at_start.get((int(s.pid), int(s.vm_fd), int(s.as_id), int(s.slot)))
        else:
            ev = _event(memslot, events.get((int(s.pid), int(s.vm_fd),
                                             int(s.as_id) << 16 | int(s.slot), int(s.start_ts))))
        hit = g.rows(int(s.start_ts), lo, hi) if g is not None else None
        row = {"slot_row": i, "vma_start": None, "vma_end": None, "vm_flags": None,
               "vm_page_prot": None, "vm_pgoff": None, "vma_has_file": None, "vma_ino": None,
               "vma_dev": "", "pgprot_memtype": None, "pgprot_memtype_source": "",
               "kernelpagesize_kb": None, "anonhuge_kb": 0, "snapshot_delay_ms": np.nan}
        if hit is not None and len(hit):
            f0 = int(hit[0])
            row.update(kernelpagesize_kb=int(g.at(f0, "kernelpagesize_kb")),
                       anonhuge_kb=int(g.col["anonhugepages_kb"][hit].sum()),
                       snapshot_delay_ms=np.nan if before else
                       (int(g.at(f0, "ts")) - int(s.start_ts)) / 1e6)
        if ev is not None and ev.vma_status == FOUND:
            rows.append(_from_bpf(row, ev, hit, g, meta, AT_START if before else
                                  "captured in BPF at the ioctl"))
        elif hit is not None and len(hit):
            f0 = int(hit[0])
            vmf = g.col["vmflags"][hit]
            flags = " ".join(dict.fromkeys(" ".join(vmf).split()))
            row.update(
                vma=describe_path(g.at(f0, "path"), g.at(f0, "vmflags"))
                + ("" if len(hit) == 1 else f" (+{len(hit) - 1} more)"),
                vmflags=flags, pfnmap=any(is_pfn_mapped(v) for v in vmf),
                vma_count=len(hit),
                vma_covers=bool(g.start[hit].min() <= lo and g.end[hit].max() >= hi),
                vma_source=("smaps snapshot when recording began (set before recording; "
                            "the BPF iterator found no VMA at its address)" if before else
                            f"smaps snapshot {row['snapshot_delay_ms']:.1f} ms after the ioctl "
                            f"(not captured at the ioctl: {_bpf_why(ev, meta)})"))
            rows.append(row)
        else:
            row.update(vma="not observed", vmflags="", pfnmap=False, vma_count=0,
                       vma_covers=False,
                       vma_source=(f"VMA not captured: {_smaps_why(int(s.pid), g, gone)}, "
                                   f"and {_bpf_why(ev, meta)}"))
            rows.append(row)
    out = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("vma_start", "vma_end", "vm_flags", "vm_page_prot", "vm_pgoff", "vma_ino"):
        out[c] = pd.array([r[c] for r in rows], dtype="UInt64")  # exact, not via float64
    out["kernelpagesize_kb"] = pd.array(  # a corrupt smaps value past int64 is no page size
        [k if k is not None and k < 1 << 63 else None for k in
         (r["kernelpagesize_kb"] for r in rows)], dtype="Int64")
    out["vma_has_file"] = out["vma_has_file"].astype("boolean")
    return out


def _from_bpf(row: dict, ev, hit, g, meta: dict, how: str) -> dict:
    """The slot's VMA as captured at the ioctl; its name, page size and THP use
    from the smaps snapshot that shows the same VMA (start, end, inode: a later
    snapshot may show another mapping at that address)."""
    start, end = int(ev.vma_start), int(ev.vma_end)
    flags, prot = int(ev.vm_flags), int(ev.vm_page_prot)
    has_file, ino, dev = bool(ev.vma_has_file), int(ev.vma_ino), int(ev.vma_dev)
    same = None  # the slot's own snapshot first, then any other
    if hit is not None and len(hit):
        same = g.matching(start, end, ino, has_file, among=hit)
    if (same is None or not len(same)) and g is not None and len(g):
        same = g.matching(start, end, ino, has_file)
    if same is not None and len(same):
        f = int(same[np.argmin(g.ts[same])])  # the earliest snapshot (argmin: its first)
        name = describe_path(g.at(f, "path"), g.at(f, "vmflags"))
        if hit is None or not len(hit) or int(g.start[hit[0]]) != int(g.start[f]) \
                or int(g.ts[hit[0]]) != int(g.ts[f]):
            row.update(kernelpagesize_kb=int(g.at(f, "kernelpagesize_kb")),
                       anonhuge_kb=int(g.at(f, "anonhugepages_kb")))
    else:
        name = (kernel_file_name(ev.vma_name, ev.vma_fs_magic, ino, dev) if has_file else
                special_mapping_name(ev.vma_name) or
                ("[no file, VM_PFNMAP]" if flags & (VM_PFNMAP | VM_MIXEDMAP) else "[anon]"))
        row.update(kernelpagesize_kb=None, anonhuge_kb=0)  # smaps showed another mapping
    count = int(ev.vma_count)
    mt, mt_src = pgprot_memtype(prot, meta, "at the ioctl" if how.endswith("ioctl")
                                else "when recording began")
    row.update(
        vma=name + ("" if count <= 1 else f" (+{count - 1} more)"),
        vmflags=vm_flags_mnemonics(flags), pfnmap=bool(flags & (VM_PFNMAP | VM_MIXEDMAP)),
        vma_count=count, vma_covers=bool(ev.vma_covers),
        vma_source=how + _coverage(count, bool(ev.vma_covers)),
        vma_start=start, vma_end=end, vm_flags=flags, vm_page_prot=prot,
        vm_pgoff=int(ev.vm_pgoff), vma_has_file=has_file, vma_ino=ino if has_file else None,
        vma_dev=dev_name(dev) if has_file else "", pgprot_memtype=mt,
        pgprot_memtype_source=mt_src)
    return row


def _coverage(count: int, covers: bool) -> str:
    if covers:
        return "" if count <= 1 else f" ({count} adjacent VMAs cover the slot)"
    if count >= 8:  # bpf/vma.h walks at most KVMTRACE_VMA_WALK VMAs
        return f" (the slot spans {count} or more VMAs; the first is shown)"
    return f" (the slot runs past its {'VMA' if count == 1 else f'{count} VMAs'} into a hole)"


def vmflag_words(vmflags: str) -> str:
    """The smaps VmFlags that matter for memory types, spelled out."""
    words = [VMFLAG_NAMES[f] for f in vmflags.split() if f in ("pf", "io", "mm", "ht")]
    return "|".join(words) or "-"
