"""``kvmtrace query``: the memory type of a guest range *now*, for a running VM.

Given what kvmtrace.collectors.snapshot read from the live process (its
memslots and VMAs, through BPF iterators) and, optionally, a short recording
of it (the window), one row per memslot a requested range touches:

- the memslot: address space, slot, GPA, size, HVA, flags;
- the VMA(s) behind the slot's HVA range: name, VM_* flags, vm_page_prot and
  the memory type it selects (analysis/vmas.pgprot_memtype: x86 PAT entry,
  arm64 AttrIndx), or, without the VMA iterator, what smaps allows
  (analysis/vmas.py's rules);
- what KVM installed: x86 KVM has no page-table dump, so these are the
  mappings a recording window saw KVM install (faults and prefetches, the
  last per guest page); without a window, nothing, and the row says so;
- who decides the final type on this host (the MMU in use);
- a verdict as ``kvmtrace report`` gives: consistent / downgraded / upgraded /
  unknown (one input was not observable; ``reason`` says which).

Exit status for scripts (``exit_code``): 0 every row consistent, 1 a
mismatch (downgraded or upgraded), 2 cannot tell (the first unknown row's
reason is the one line on stderr).

This module reads only data handed to it (no /proc, no BPF), like the rest
of kvmtrace.analysis.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import kvmapi
from ..memtype import arm64 as a64
from ..memtype import x86 as x86mt
from . import vmas as vmas_mod
from .model import VERDICT_ORDER, compare_memtypes

PAGE = os.sysconf("SC_PAGE_SIZE")  # query runs on the host it asks about (4K, 16K or 64K)
MISMATCH = ("downgraded", "upgraded")
# A window sees only what KVM installs while it records: a page the guest
# touched before (still mapped, never faulted again) is not in it.
BEFORE_WINDOW = ("a page KVM installed before the window began is not seen (it stays "
                 "mapped without a new fault; the window shows only installs during it)")

COLUMNS = [
    "pid", "vm_fd", "as_id", "slot", "gpa", "size_bytes", "hva", "flags", "flag_names",
    "range_gpa", "range_size_bytes", "range_hva",
    "vma", "vma_start", "vma_end", "vmflags", "vm_flags", "vm_page_prot", "pfnmap",
    "vma_count", "vma_covers", "vma_memtype", "vma_memtype_source", "vma_source",
    "installed_pages", "installed_memtype", "installed_levels", "installed_pfns",
    "pat_memtype_list", "installed_source", "decided_by", "rule", "verdict", "reason",
]


class QueryError(ValueError):
    """Bad input: one line for the user."""


# -- parsing what is asked ------------------------------------------------------
_SIZE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)\s*([kKmMgGtT]i?[bB]?|[bB])?$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_number(text: str, what: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise QueryError(f"{what} '{text}': expected a number (decimal or 0x hex, "
                         "optionally with K/M/G)")
    n = int(m[1], 0)
    unit = (m[2] or "").lower()[:1]
    return n * _UNITS[unit]


def parse_range(text: str, what: str) -> tuple[int, int]:
    """'A' (one page from A), 'A+SIZE' or 'A-B' (B exclusive) -> (start, size)."""
    text = text.strip()
    if "+" in text:
        a, _, s = text.partition("+")
        start, size = parse_number(a, what), parse_number(s, f"{what} size")
    elif "-" in text[1:]:
        a, _, b = text.partition("-")
        start, end = parse_number(a, what), parse_number(b, f"{what} end")
        if end <= start:
            raise QueryError(f"{what} '{text}': the end must be above the start")
        size = end - start
    else:
        start, size = parse_number(text, what), PAGE
    if size <= 0:
        raise QueryError(f"{what} '{text}': the size must be more than 0")
    if start + size > 1 << 64:
        raise QueryError(f"{what} '{text}': the range ends past 2^64")
    return start, size


# -- who decides ---------------------------------------------------------------------
def decided_by(context: dict) -> str:
    """Who decides the memory type the guest finally gets, on this host."""
    arch = context.get("arch")
    kvm = context.get("kvm") or {}
    pat = ((context.get("x86") or {}).get("pat") or {})
    pat_text = (f"host PAT {' '.join(pat.get('entries') or x86mt.LINUX_PAT)} "
                f"({pat.get('source') or x86mt.LINUX_PAT_SOURCE})")
    listed = (context.get("x86") or {}).get("pat_memtype_list") is not None
    pat_list = ("the host PAT memtype list (debugfs) holds the type reserved for each "
                "remapped physical range" if listed else
                "the host PAT memtype list is not readable (debugfs)")
    pat_list += "; " + x86mt.mtrr_words(context.get("x86") or {})
    mmu = kvm.get("mmu")
    if arch == "aarch64":
        return ("stage 2: with FEAT_S2FWB the stage-2 attribute decides, else stage 1 and "
                "stage 2 combine (the stricter wins); KVM picks Device / Normal-NC for "
                "non-cacheable VM_PFNMAP (s2_force_noncacheable, VM_ALLOW_ANY_UNCACHED) and "
                "refuses a cacheable VM_PFNMAP without FWB and DIC")
    if mmu == "shadow":
        who = "KVM-PVM" if kvm.get("vendor") == "pvm" else "shadow paging"
        return (f"{who}: the spte's PAT/PCD/PWT bits select an entry of the {pat_text}; "
                f"{pat_list}")
    if mmu == "ept":
        return ("EPT: the spte's memory type (bits 5:3) and IPAT (vmx_get_mt_mask: UC for "
                "MMIO pfns, WB with IPAT when no non-coherent DMA, else the guest's PAT "
                f"combines); {pat_list}")
    if mmu == "npt":
        return ("NPT: the nested entry's PAT/PCD/PWT select an entry of the "
                f"{pat_text}, combined with the guest's own PAT (the stricter wins); {pat_list}")
    return "unknown: the KVM MMU in use was not identified (kvm, kvm_intel, kvm_amd, kvm_pvm)"


# -- the VMA side ----------------------------------------------------------------
@dataclass
class _Vma:
    start: int
    end: int
    name: str
    vmflags: str            # smaps mnemonics
    vm_flags: int | None    # None: smaps only
    prot: int | None
    memtype: str
    memtype_source: str
    pfnmap: bool


def _names(smaps: list[dict]) -> dict:
    return {(v["start"], v["end"]): v for v in smaps}


def _bpf_vmas(vmas: pd.DataFrame, smaps: list[dict], context: dict) -> list[_Vma]:
    by_range = _names(smaps)
    out = []
    for r in vmas.itertuples(index=False):
        start, end, flags, prot = int(r.start), int(r.end), int(r.vm_flags), int(r.vm_page_prot)
        sm = by_range.get((start, end))
        if sm is not None:
            name = vmas_mod.describe_path(sm["path"], sm["vmflags"])
        elif int(r.has_file):
            name = f"file inode {int(r.ino)} on {vmas_mod.dev_name(int(r.dev))}"
        else:
            name = "[anon]"
        mt, src = vmas_mod.pgprot_memtype(prot, context)
        out.append(_Vma(start, end, name, vmas_mod.vm_flags_mnemonics(flags), flags, prot,
                        mt or "unknown", src.replace(" at the ioctl", " now"),
                        bool(flags & (vmas_mod.VM_PFNMAP | vmas_mod.VM_MIXEDMAP))))
    return out


def _smaps_vmas(smaps: list[dict], context: dict) -> list[_Vma]:
    x86 = (context.get("arch") or "x86_64") == "x86_64"
    out = []
    for v in smaps:
        pf = vmas_mod.is_pfn_mapped(v["vmflags"])
        if not x86:
            mt, src = "unknown", "smaps has no page protection (arm64 AttrIndx unknown)"
        elif pf:
            mt, src = "unknown", ("smaps has no page protection; a VM_PFNMAP / VM_MIXEDMAP "
                                  "VMA's type is that of its frames (PAT memtype list)")
        else:
            mt, src = "WB", ("smaps: neither VM_PFNMAP nor VM_MIXEDMAP, so struct pages with "
                             "the default protection (PAT entry 0): write-back")
        out.append(_Vma(v["start"], v["end"], vmas_mod.describe_path(v["path"], v["vmflags"]),
                        v["vmflags"], None, None, mt, src, pf))
    return out


def _covering(vmas: list[_Vma], lo: int, hi: int) -> list[_Vma]:
    return [v for v in vmas if v.start < hi and v.end > lo]


# -- the KVM side (a recording window) ----------------------------------------------
def _installs(window, pid: int) -> pd.DataFrame | None:
    """The last mapping KVM installed per (vm_fd, gfn) in the window: faults and
    prefetches. None without a window."""
    if window is None:
        return None
    cols = ["ts", "vm_fd", "gfn", "pfn", "level", "spte_memtype", "kind", "rule"]
    parts = []
    f = window.faults
    if len(f):
        f = f[(f["pid"] == pid) & f["spte_memtype"].notna() & (f["spte_memtype"] != "")]
        parts.append(pd.DataFrame({"ts": f["install_ts"].fillna(f["ts"]).astype("int64"),
                                   "vm_fd": f["vm_fd"].astype("int64"),
                                   "gfn": f["gfn"].astype("uint64"), "pfn": f["pfn"],
                                   "level": f["level"].astype("int64"),
                                   "spte_memtype": f["spte_memtype"], "kind": "fault",
                                   "rule": f["rule"].astype(object) if "rule" in f else None}))
    p = window.prefetch
    if len(p) and "spte" in p:
        p = p[p["pid"] == pid]
        fmt = ((window.meta.get("kvm") or {}).get("spte_format")) or "legacy"
        pat = ((window.meta.get("x86") or {}).get("pat") or {}).get("entries") or x86mt.LINUX_PAT
        if len(p) and fmt in ("legacy", "ept"):
            mt = x86mt.spte_memtype(p["spte"].astype("uint64").to_numpy(),
                                    p["level"].astype("int64").to_numpy(), fmt, pat)
            parts.append(pd.DataFrame({"ts": p["ts"].astype("int64"),
                                       "vm_fd": p["vm_fd"].astype("int64"),
                                       "gfn": p["gfn"].astype("uint64"), "pfn": pd.NA,
                                       "level": p["level"].astype("int64"),
                                       "spte_memtype": mt, "kind": "prefetch",
                                       "rule": x86mt.kvm_rules(
                                           p["spte"].astype("uint64").to_numpy(),
                                           p["level"].astype("int64").to_numpy(),
                                           x86mt.mmu_kind(window.meta.get("kvm") or {}), pat)}))
    if not parts:
        return pd.DataFrame(columns=cols)
    d = pd.concat([x for x in parts if len(x)] or [parts[0]], ignore_index=True)
    return d.sort_values("ts").drop_duplicates(["vm_fd", "gfn"], keep="last")


def _window_words(window, seconds: float | None, arch: str = "x86_64",
                  ctx: dict | None = None) -> str:
    lost = int(window.lost["lost"].sum()) if len(window.lost) else 0
    what = (f"the last mapping per page that a {seconds:g} s recording window saw KVM "
            f"install" if seconds else "the last mapping per page a recording saw KVM install")
    why = (" (x86 KVM has no page-table dump to read)" if arch == "x86_64" else
           f" (arm64: kvm_pgtable_stage2_map's prot; {_stage2_dump_words(ctx or {})})")
    return what + (f" ({lost:,} events lost)" if lost else "") + why


def _stage2_dump_words(ctx: dict) -> str:
    """What the arm64 stage-2 page-table dump (KVM's debugfs, 6.15+ with
    CONFIG_PTDUMP_STAGE2_DEBUGFS) offers here, from the snapshot's context."""
    d = ctx.get("stage2_dump") or {}
    if d.get("paths"):
        return ("a stage-2 page-table dump exists (" + ", ".join(d["paths"]) + ") but it "
                "shows valid/R/W/XN/AF/block, not the memory attributes, so the type is not "
                "read from it")
    return d.get("why") or "no stage-2 page-table dump was looked for"


def _arm64_rule(row: dict, g, ctx: dict) -> str:
    """The arm64 rule that decides this range's stage-2 type (memtype/arm64.py's
    expected_stage2, for a data fault), in the words ``kvmtrace report``'s
    faults carry: the VMA's type and flags read now, the CPU's S2FWB / DIC, and
    whether the frames are kernel memory (the window's pfns against System RAM;
    without them: a VMA that is neither VM_PFNMAP nor VM_MIXEDMAP holds struct
    pages)."""
    import errno as errno_mod
    kernel = ctx.get("kernel")
    cpu = ctx.get("arm64") or {}
    flags = row.get("vm_flags")
    if flags is None or row.get("vma_count") in (0, None):
        return a64.RULES["unknown"].words + " (no VMA read)"
    pfn_is_ram = None
    if g is not None and len(g):
        pfn = pd.to_numeric(g["pfn"], errors="coerce").dropna()
        if len(pfn) and ctx.get("ram") is not None:
            pa = pfn.to_numpy(dtype=np.uint64) * np.uint64(PAGE)
            hit = np.zeros(len(pa), bool)
            for r in ctx["ram"]:
                hit |= (pa >= np.uint64(r["start"])) & (pa < np.uint64(r["end"]))
            pfn_is_ram = bool(hit.mean() >= 0.5)
    if pfn_is_ram is None and not row.get("pfnmap"):
        pfn_is_ram = True
    vma_mt = str(row.get("vma_memtype") or "unknown").split("/")[0]
    mt, err, words = a64.expected_stage2(
        kernel, None if vma_mt == "unknown" else vma_mt, int(flags), pfn_is_ram,
        cpu.get("fwb"), cpu.get("dic"), False)
    return words + (f" [{errno_mod.errorcode.get(err, err)}]" if err else "")


# -- the rows -------------------------------------------------------------------------
def answer(snap, gpa: tuple[int, int] | None = None, hva: tuple[int, int] | None = None,
           slot: int | None = None, window=None, window_s: float | None = None,
           vm_fd: int | None = None) -> pd.DataFrame:
    """One row per (memslot, asked range); ``snap`` is a collectors.snapshot.Snapshot
    (or anything with its fields), ``window`` an analysis.model.Model of a
    recording of the same process, or None. ``df.attrs`` carries the sources."""
    ctx = snap.context
    pid = snap.pid
    if snap.vmas is not None:
        vmas = _bpf_vmas(snap.vmas, snap.smaps, ctx)
        vma_source = snap.vmas_source
    else:
        vmas = _smaps_vmas(snap.smaps, ctx)
        vma_source = f"/proc/{pid}/smaps, read now (BPF VMA iterator unavailable: " \
                     f"{snap.vmas_source})"
    installs = _installs(window, pid)
    arch = ctx.get("arch") or "x86_64"
    inst_src = (_window_words(window, window_s, arch, ctx) if window is not None else
                "not observed: x86 KVM has no page-table dump (--window SECONDS records what "
                "KVM installs meanwhile)"
                if arch == "x86_64" else
                f"not observed: {_stage2_dump_words(ctx)}; no recording window was asked for "
                "(--window SECONDS records what KVM installs meanwhile)")
    decider = decided_by(ctx)
    x86ctx = ctx.get("x86") or {}
    pat_list, ram = x86ctx.get("pat_memtype_list"), x86ctx.get("ram") or ctx.get("ram")

    base = {"pid": pid}
    rows = []
    attrs = {"pid": pid, "comm": snap.comm, "vm_fds": list(snap.vm_fds),
             "memslots_source": snap.memslots_source, "vmas_source": vma_source,
             "installed_source": inst_src, "decided_by": decider,
             "window_s": window_s or 0}

    def fail(reason: str, **extra):
        row = dict.fromkeys(COLUMNS)
        row.update(base, verdict="unknown", reason=reason, decided_by=decider,
                   installed_source=inst_src, **extra)
        rows.append(row)

    if not snap.vm_fds:
        fail(f"process {pid} ({snap.comm}) has no KVM VM open (no anon_inode:kvm-vm in "
             f"/proc/{pid}/fd)")
        return _frame(rows, attrs)
    if snap.memslots is None:
        fail(f"the memslots of a running VM are not readable here: {snap.memslots_source}")
        return _frame(rows, attrs)
    ms = snap.memslots
    if vm_fd is not None:
        ms = ms[ms["vm_fd"] == vm_fd]
        if vm_fd not in snap.vm_fds:
            fail(f"fd {vm_fd} of process {pid} is not a KVM VM (VM fds: "
                 f"{', '.join(map(str, snap.vm_fds))})")
            return _frame(rows, attrs)
    unread = _unread_slots(snap, vm_fd)
    if slot is not None:
        ms = ms[(ms["as_id"] == slot >> 16) & (ms["slot"] == slot & 0xFFFF)]
        if not len(ms) and unread:
            fail(f"{unread}; memslot {slot} may be one of those",
                 slot=slot & 0xFFFF, as_id=slot >> 16)
            return _frame(rows, attrs)
        if not len(ms):
            fail(f"no memslot {slot} in the VM(s) of process {pid} (slots: "
                 f"{', '.join(str(kvmapi.slot_id(int(a), int(s))) for a, s in zip(snap.memslots['as_id'], snap.memslots['slot']))})",
                 slot=slot & 0xFFFF, as_id=slot >> 16)
            return _frame(rows, attrs)
    asked = []
    for s in ms.itertuples(index=False):
        g0, size, h0 = int(s.gpa), int(s.size), int(s.hva)
        if gpa is not None:
            lo, hi = max(g0, gpa[0]), min(g0 + size, gpa[0] + gpa[1])
        elif hva is not None:
            lo = max(g0, g0 + hva[0] - h0)
            hi = min(g0 + size, g0 + hva[0] + hva[1] - h0)
        else:
            lo, hi = g0, g0 + size
        if lo < hi:
            asked.append((s, lo, hi))
    if not asked:
        if unread:  # not among the slots read: cannot tell, not "no memslot"
            fail(f"{unread}; the {_what_asked(gpa, hva, slot)} may be in one of "
                 "those", range_gpa=None if gpa is None else gpa[0],
                 range_hva=None if hva is None else hva[0],
                 range_size_bytes=(gpa or hva or (None, None))[1])
        elif gpa is not None:
            fail(f"no memslot of process {pid} covers GPA {gpa[0]:#x}+{gpa[1]:#x}",
                 range_gpa=gpa[0], range_size_bytes=gpa[1])
        elif hva is not None:
            over = _covering(vmas, hva[0], hva[0] + hva[1])
            extra = _vma_fields(over, hva[0], hva[0] + hva[1]) if over else {}
            fail(f"no memslot of process {pid} maps HVA {hva[0]:#x}+{hva[1]:#x}"
                 + ("" if over else " (and no VMA is there)"),
                 range_hva=hva[0], range_size_bytes=hva[1], vma_source=vma_source, **extra)
        else:
            fail(f"the VM(s) of process {pid} have no memslots")
        return _frame(rows, attrs)

    for s, lo, hi in asked:
        g0, h0 = int(s.gpa), int(s.hva)
        hlo, hhi = h0 + (lo - g0), h0 + (hi - g0)
        over = _covering(vmas, hlo, hhi)
        row = dict.fromkeys(COLUMNS)
        row.update(base, vm_fd=int(s.vm_fd), as_id=int(s.as_id), slot=int(s.slot), gpa=g0,
                   size_bytes=int(s.size), hva=h0, flags=int(s.flags),
                   flag_names="|".join(kvmapi.mem_flag_names(int(s.flags))),
                   range_gpa=lo, range_size_bytes=hi - lo, range_hva=hlo,
                   vma_source=vma_source,
                   installed_source=inst_src, decided_by=decider)
        row.update(_vma_fields(over, hlo, hhi))
        g = _kvm_side(row, installs, s, lo, hi, over, pat_list, ram, len(snap.vm_fds) == 1,
                      window)
        if arch == "aarch64":
            row["rule"] = _arm64_rule(row, g, ctx)
        rows.append(row)
    if unread and slot is None:
        # the rows above are right for the slots read; the range (or the VM)
        # may also be in a slot the iterator could not hold: a partial answer
        fail(f"partial answer: {unread}; the slot rows given are only the slots read, and the "
             f"{_what_asked(gpa, hva, slot)} may also be in one of the others")
        rows.insert(0, rows.pop())  # first: the one line a script sees on stderr
    return _frame(rows, attrs)


def _unread_slots(snap, vm_fd: int | None) -> str:
    """'' when every memslot of the VM(s) asked about was read, else which VM
    fds were cut short: the memslot iterator writes at most MAX_SLOTS records
    per VM (one seq buffer, collectors/snapshot.py) and its walk stops after a
    fixed number of steps (the trailer's count is then a lower bound)."""
    cut = [v for v in (getattr(snap, "vms", None) or []) if not v.get("complete", True)
           and (vm_fd is None or v.get("vm_fd") == vm_fd)]
    if not cut:
        return ""
    parts = []
    for v in cut:
        seen = sum(int(a.get("slots") or 0) for a in v.get("address_spaces") or [])
        parts.append(f"VM fd {v['vm_fd']} has at least {max(seen, int(v.get('slots') or 0)):,} "
                     f"memslots and the BPF iterator read {int(v.get('slots') or 0):,} of them "
                     "(its buffer holds no more)")
    return "; ".join(parts)


def _what_asked(gpa, hva, slot) -> str:
    if slot is not None:
        return f"memslot {slot}"
    if gpa is not None:
        return f"GPA range {gpa[0]:#x}+{gpa[1]:#x}"
    if hva is not None:
        return f"HVA range {hva[0]:#x}+{hva[1]:#x}"
    return "VM's memory"


def _vma_fields(over: list[_Vma], lo: int, hi: int) -> dict:
    if not over:
        return {"vma": "none", "vma_count": 0, "vma_covers": False, "vma_memtype": "unknown",
                "vma_memtype_source": "no VMA at the slot's HVA range", "pfnmap": False,
                "vmflags": ""}
    first = over[0]
    covers = over[0].start <= lo and over[-1].end >= hi and all(
        a.end == b.start for a, b in zip(over, over[1:]))
    types = list(dict.fromkeys(v.memtype for v in over))
    srcs = list(dict.fromkeys(v.memtype_source for v in over))
    return {"vma": first.name + ("" if len(over) == 1 else f" (+{len(over) - 1} more)"),
            "vma_start": first.start, "vma_end": over[-1].end,
            "vmflags": " ".join(dict.fromkeys(" ".join(v.vmflags for v in over).split())),
            "vm_flags": first.vm_flags, "vm_page_prot": first.prot,
            "pfnmap": any(v.pfnmap for v in over), "vma_count": len(over),
            "vma_covers": covers, "vma_memtype": "/".join(types),
            "vma_memtype_source": "; ".join(srcs)}


def _kvm_side(row: dict, installs, s, lo: int, hi: int, over: list[_Vma], pat_list, ram,
              one_vm: bool, window=None):
    """Installed mappings in [lo, hi) of slot ``s``, the PAT memtype list for their
    frames, and the verdict."""
    vma_mt = row["vma_memtype"]
    if installs is None:
        row.update(installed_pages=None, installed_memtype="", installed_levels="",
                   installed_pfns="", pat_memtype_list="",
                   verdict="unknown",
                   reason=f"host VMA {vma_mt}; KVM's installed type "
                          f"{row['installed_source']}")
        return None
    # a VM created before the window began is not known by its fd to the
    # recording (vm_fd < 0): its pages are placed by GPA when it is the
    # process's only VM
    fd_ok = installs["vm_fd"] == int(s.vm_fd)
    if one_vm:
        fd_ok = fd_ok | (installs["vm_fd"] < 0)
    since = _version_start(window, s)
    g = installs[fd_ok
                 & (installs["gfn"] >= np.uint64(lo // PAGE))
                 & (installs["gfn"] < np.uint64((hi + PAGE - 1) // PAGE))
                 & (installs["ts"] >= since)]
    g, zapped = _drop_unmapped(g, window, s, int(row["pid"]))
    if not len(g):
        row.update(installed_pages=0, installed_memtype="", installed_levels="",
                   installed_pfns="", pat_memtype_list="", verdict="unknown",
                   reason=f"host VMA {vma_mt}; KVM installed nothing in this range that is "
                          f"still mapped" + (f" ({zapped} page(s) installed, then unmapped by "
                          f"an invalidation)" if zapped else " (no guest access during the "
                          "window)") + f"; {BEFORE_WINDOW}")
        return g
    gfn = g["gfn"].to_numpy(dtype=np.uint64)
    page_hva = int(s.hva) + (gfn - np.uint64(int(s.gpa) // PAGE)).astype(np.int64) * PAGE
    # each installed page against the VMA that holds it
    vma_mt_page = np.full(len(g), "unknown", dtype=object)
    vma_src_page = np.full(len(g), "no VMA at this page's HVA", dtype=object)
    for v in over:
        hit = (page_hva >= v.start) & (page_hva < v.end)
        vma_mt_page[hit] = v.memtype
        vma_src_page[hit] = v.memtype_source
    pfn = pd.to_numeric(g["pfn"], errors="coerce").to_numpy(dtype=float)
    known_pfn = ~np.isnan(pfn)
    pat_note = ""
    if known_pfn.any():
        pts, psrc = x86mt.pfn_memtype(pfn[known_pfn].astype(np.uint64), pat_list, ram)
        # a VM_PFNMAP page with no vm_page_prot (smaps fallback): its frame decides
        unk = (vma_mt_page[known_pfn] == "unknown")
        idx = np.flatnonzero(known_pfn)[unk]
        vma_mt_page[idx] = pts[unk]
        vma_src_page[idx] = psrc[unk]
        pat_note = "; ".join(f"{n} page(s): {t}" for t, n in
                             pd.Series(psrc).value_counts().items())
    spte_mt = g["spte_memtype"].to_numpy(dtype=object)
    v = compare_memtypes(vma_mt_page, spte_mt)
    counts = pd.Series(v).value_counts()
    verdict = next(x for x in VERDICT_ORDER if x in counts.index)
    worst = int(np.flatnonzero(v == verdict)[0])
    levels = pd.Series(g["level"].to_numpy()).value_counts().sort_index()
    row.update(installed_pages=int(len(g)),
               installed_memtype="/".join(sorted(set(spte_mt))),
               installed_levels=", ".join(f"level {int(k)}: {int(n)}" for k, n in levels.items()),
               installed_pfns=_pfn_ranges(pfn[known_pfn]),
               pat_memtype_list=pat_note, verdict=verdict)
    rules = g["rule"].to_numpy(dtype=object) if "rule" in g else []
    reason = (f"host VMA {vma_mt_page[worst]} ({vma_src_page[worst]}); "
              f"{x86mt.installed_words(spte_mt[worst], rules)} for {len(g)} page(s) seen in "
              "the window")
    asked_pages = (hi - lo + PAGE - 1) // PAGE
    if len(g) < asked_pages:  # a partial answer: say which part
        reason += (f" (of {asked_pages} in the range; the others: not touched in the window "
                   f"or installed before it)")
    if verdict == "downgraded":
        reason += ": the guest gets a stricter type than the VMA (slower)"
    elif verdict == "upgraded":
        reason += ": non-cacheable memory mapped cacheable in the guest (mismatched attributes)"
    if len(counts) > 1:
        reason += " [" + ", ".join(f"{k}: {n} pages" for k, n in counts.items()) + "]"
    if zapped:
        reason += f"; {zapped} other page(s) installed, then unmapped by an invalidation"
    lost = int(window.lost["lost"].sum()) if window is not None and len(window.lost) else 0
    if lost and verdict == "consistent":  # as report: "consistent" is only what was seen
        row["verdict"] = "unknown"
        reason = f"unknown: {lost:,} events lost in the window; what was seen says: {reason}"
    row["reason"] = reason
    return g


def _version_start(window, s) -> int:
    """When the slot's current mappings can have been installed: the window's
    create or move of this slot (KVM zaps a moved or deleted slot's mappings;
    a flags-only change keeps them), or 0 when the slot predates the window."""
    sl = window.slots if window is not None else None
    if sl is None or not len(sl):
        return 0
    mine = sl[(sl["slot"] == int(s.slot)) & (sl["as_id"] == int(s.as_id))
              & (sl["gpa"].astype("uint64") == np.uint64(int(s.gpa)))
              & (sl["size_bytes"].astype("uint64") == np.uint64(int(s.size)))] \
        .sort_values("start_ts")
    if not len(mine):
        return 0
    last = mine.iloc[-1]
    for r in mine.iloc[::-1].itertuples(index=False):
        last = r
        if r.created_by != "flags":
            break
    return int(last.start_ts)


def _drop_unmapped(g: pd.DataFrame, window, s, pid: int) -> tuple[pd.DataFrame, int]:
    """Installs not unmapped since by an MMU-notifier invalidation of their
    HVA (kvm_unmap_hva_range), and how many were."""
    inv = window.invalidations if window is not None else None
    if inv is None or not len(inv) or not len(g):
        return g, 0
    inv = inv[inv["pid"] == pid]
    hva = (np.uint64(int(s.hva))
           + (g["gfn"].to_numpy(dtype=np.uint64) - np.uint64(int(s.gpa) // PAGE)) * np.uint64(PAGE))
    ts = g["ts"].to_numpy(dtype=np.int64)
    gone = np.zeros(len(g), dtype=bool)
    for a, b, t in zip(inv["hva_start"].to_numpy(dtype=np.uint64),
                       inv["hva_end"].to_numpy(dtype=np.uint64),
                       inv["ts"].to_numpy(dtype=np.int64)):
        gone |= (hva >= a) & (hva < b) & (ts < t)
    return g[~gone], int(gone.sum())


def _pfn_ranges(pfn: np.ndarray, most: int = 4) -> str:
    if not len(pfn):
        return ""
    p = np.unique(pfn.astype(np.int64))
    breaks = np.flatnonzero(np.diff(p) != 1)
    starts = np.r_[p[0], p[breaks + 1]]
    ends = np.r_[p[breaks], p[-1]]
    parts = [f"{a:#x}" if a == b else f"{a:#x}-{b:#x}" for a, b in zip(starts, ends)]
    return ", ".join(parts[:most]) + (f" (+{len(parts) - most} more)" if len(parts) > most else "")


_INT_COLS = ("vm_fd", "as_id", "slot", "gpa", "size_bytes", "hva", "flags", "range_gpa",
             "range_size_bytes", "range_hva", "vma_start", "vma_end", "vm_flags", "vm_page_prot",
             "vma_count", "installed_pages")


def _frame(rows: list[dict], attrs: dict) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in _INT_COLS:
        df[c] = pd.array([None if r[c] is None else int(r[c]) for r in rows], dtype="UInt64")
    for c in ("pfnmap", "vma_covers"):
        df[c] = pd.array([r[c] for r in rows], dtype="boolean")
    df.attrs.update(attrs, exit_code=exit_code(df))
    return df


def exit_code(df: pd.DataFrame) -> int:
    """0 all consistent, 1 any mismatch, 2 cannot tell."""
    v = set(df["verdict"])
    if v & set(MISMATCH):
        return 1
    if not len(df) or v - {"consistent"}:
        return 2
    return 0


def first_unknown(df: pd.DataFrame) -> str:
    u = df[df["verdict"] != "consistent"]
    return str(u["reason"].iloc[0]) if len(u) else ""


def to_records(df: pd.DataFrame) -> list[dict]:
    """JSON-ready rows (ints exact, NA as None)."""
    out = []
    for r in df.to_dict("records"):
        out.append({k: (None if v is pd.NA or (isinstance(v, float) and np.isnan(v)) else
                        int(v) if isinstance(v, (np.integer,)) else
                        bool(v) if isinstance(v, (np.bool_,)) else v)
                    for k, v in r.items()})
    return out


def _hex(v) -> str:
    return "-" if v is None or v is pd.NA else f"{int(v):#x}"


def to_text(df: pd.DataFrame) -> str:
    """The rows as plain text, one block per memslot (what ``kvmtrace query`` prints)."""
    a = df.attrs
    lines = [f"process {a.get('pid')} ({a.get('comm', '')}), VM fd(s) "
             f"{', '.join(map(str, a.get('vm_fds') or [])) or 'none'}",
             f"  memslots:      {a.get('memslots_source', '')}",
             f"  VMAs:          {a.get('vmas_source', '')}",
             f"  KVM installed: {a.get('installed_source', '')}",
             f"  decided by:    {a.get('decided_by', '')}", ""]
    for r in df.to_dict("records"):
        if r["slot"] is pd.NA or r["slot"] is None:
            lines += [f"{r['verdict']}: {r['reason']}", ""]
            continue
        part = ("" if r["range_size_bytes"] == r["size_bytes"] else
                f"  (asked: GPA {_hex(r['range_gpa'])}+{_hex(r['range_size_bytes'])}, "
                f"HVA {_hex(r['range_hva'])})")
        lines.append(f"slot {r['slot']} (as {r['as_id']}, VM fd {r['vm_fd']}): GPA "
                     f"{_hex(r['gpa'])}+{_hex(r['size_bytes'])}  HVA {_hex(r['hva'])}  flags "
                     f"{r['flag_names'] or '-'}{part}")
        lines.append(f"  VMA:       {r['vma']} {_hex(r['vma_start'])}-{_hex(r['vma_end'])} "
                     f"{vmas_mod.vmflag_words(r['vmflags'] or '')} [{r['vmflags']}]"
                     + ("" if r["vma_covers"] in (True, None) or r["vma_covers"] is pd.NA
                        else " (does not cover the whole range)"))
        lines.append(f"  VMA type:  {r['vma_memtype']} ({r['vma_memtype_source']})")
        if r["installed_pages"] is None or r["installed_pages"] is pd.NA:
            lines.append("  KVM:       not observed")
        elif not r["installed_pages"]:
            lines.append("  KVM:       nothing installed in the window")
        else:
            lines.append(f"  KVM:       {r['installed_memtype']}, {r['installed_pages']} page(s) "
                         f"({r['installed_levels']})"
                         + (f", pfns {r['installed_pfns']}" if r["installed_pfns"] else ""))
            if r["pat_memtype_list"]:
                lines.append(f"  frames:    {r['pat_memtype_list']}")
        if r.get("rule"):
            lines.append(f"  rule:      {r['rule']}")
        lines.append(f"  verdict:   {r['verdict']}: {r['reason']}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
