"""How many faults this host takes for what the guest did: the measured rule.

Why it exists: tests and benchmarks compare the tracer's fault counts with
the guest's report, so the report must say how many faults to expect. That
number depends on the host's MMU, not on the guest alone, and is only written
down where it was measured. On any other MMU expected_faults() says None
("not measured") rather than guess.
"""

import errno
import os
import platform

from kvmtrace.kvmapi import KVM_MEM_LOG_DIRTY_PAGES as LOG_DIRTY
from kvmtrace.kvmapi import KVM_MEM_READONLY as READONLY

# where the rule was measured (arm64: see arm64_rule() for the kernels)
MEASURED_MMUS = ("pvm-shadow", "arm64-stage2", "tdp")
WRITE_ACCESSES = ("w", "rw")


def host_mmu():
    """Which KVM MMU this host runs guests on.

    "pvm-shadow"  KVM-PVM (kvm_pvm module): shadow paging, the measured case
    "tdp"         VMX with EPT / SVM with NPT
    "shadow"      VMX/SVM with EPT/NPT disabled
    "arm64-stage2" an arm64 host (KVM's stage-2 tables; see arm64_rule())
    "none"        no KVM module loaded; "unknown" otherwise
    """
    if platform.machine() in ("aarch64", "arm64"):
        return "arm64-stage2" if os.path.exists("/dev/kvm") else "none"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "pvm-shadow"
    for module, param in (("kvm_intel", "ept"), ("kvm_amd", "npt")):
        try:
            with open(f"/sys/module/{module}/parameters/{param}") as f:
                return "tdp" if f.read().strip() in ("Y", "1") else "shadow"
        except OSError:
            continue
    return "none" if not os.path.isdir("/sys/module/kvm") else "unknown"


def writes_land(kind, flags):
    """Whether a guest write reaches host memory (else it exits as MMIO).

    READONLY slots (KVM_MEM_READONLY) and the pfnmap [vvar] slot (a
    read-only VMA) turn every guest write into a KVM_EXIT_MMIO (on arm64 a
    write to [vvar] fails KVM_RUN with EFAULT instead; host memory is
    unchanged either way).
    """
    return not (flags & READONLY) and kind != "pfnmap"


HUGE_HOST_KINDS = ("thp", "hugetlb")  # backings the host maps with 2 MiB pages
PAGES_PER_2M = 512
PREFETCH_GROUP = 8  # KVM's PTE_PREFETCH_NUM: direct prefetch looks at 8-aligned groups


def expected_faults(kind, flags, touched, mmu, status="ok", role="data", extra=None,
                    gpage2m=False, host_written=None, kernel=None, fs=None):
    """Shadow page faults expected for one slot, with the sptes they install.

    kind: backing kind; flags: the slot's memslot flags during the run;
    touched: [(page, access)] in guest order, access in r / w / rw / x (the
    system slot lists its code pages as "x"); mmu: host_mmu(); gpage2m: the
    guest maps the slot with 2 MiB pages; host_written: pages the VMM wrote
    before the run (default: the pages with an "x" access, which get an
    execute stub); kernel: the host's release, fs: the file kind's
    filesystem (arm64 only; kernel defaults to this one's). For arm64
    ("arm64-stage2") see arm64_expected_faults() for what the counts mean
    there.
    Returns {"total", "faults", "levels", "set_spte", "set_spte_levels",
    "prefetched", "read_sptes", "write_sptes", "mmio_exits", "level",
    "dirty_pages", "rule"}: total == faults is the number of faults
    (kvmmmu:kvm_mmu_spte_requested events), levels their mapping levels
    ({1: 4 KiB, 2: 2 MiB}); set_spte counts kvmmmu:kvm_mmu_set_spte events
    (faults + prefetched neighbours); read_sptes / write_sptes split those
    by the spte's W bit; dirty_pages is what KVM_GET_DIRTY_LOG should report
    if the slot logs dirty pages. Counts are None where not measured.

    Measured 2026-11-25 on KVM-PVM (kernel 6.18.44, shadow paging,
    tdp_mmu=N) by counting kvmmmu:kvm_mmu_set_spte per gfn for the guest's
    threads (a tracefs instance with set_event_pid + event-fork, cross-checked
    with bpftrace), mapping gfn -> slot with the report's GPA ranges, over the
    demo scenario and targeted runs (--access sequences per page):

    * Per 4 KiB guest page: the first read or execute installs one read-only
      spte (1 event, "r-xu"); the first write installs one writable spte
      (1 event, "rwxu"). A page read/executed first and written later takes a
      second fault when written (2 events); written first, then read or
      executed: 1. Repeated accesses: no more. E.g. 16 pages each r, w, rw
      and x: 16 + 16 + 32 + 16 events.
      (Why: the guest PTEs are built with Accessed/Dirty clear, so KVM maps a
      read fault without write access to catch the first write and set D, and
      never prefetches neighbouring sptes, which it only does for guest PTEs
      with A set.)
    * Same for anon, anon-shared, memfd, file, thp and hugetlb: all level 1
      (4 KiB sptes), because the guest maps 4 KiB pages; THP and hugetlb
      (2 MiB host pages, nr_hugepages set for the test) change nothing.
    * Dirty logging (KVM_MEM_LOG_DIRTY_PAGES): no extra fault; a write is 1
      event as without it (and KVM_GET_DIRTY_LOG reports exactly the written
      pages).
    * READONLY slot and the pfnmap [vvar] slot: a read or execute installs 1
      read-only spte; a write never installs one, whether the page was read
      before or not: it exits as KVM_EXIT_MMIO (one exit per write
      instruction) and host memory is unchanged. [vvar] pages with nothing
      behind them (pages 1 and 3 of 4 on 6.18) make KVM_RUN fail with EFAULT
      on a guest read and on a guest write alike: the VMM does not touch them
      (backings.probe_readable).
    * System slot: 1 event per page of guest code (fetch, "r-xu"); the page
      table pages take none (KVM walks them in software: kvm_mmu_pagetable_walk
      and kvm_mmu_set_accessed_bit, no spte), nor do the stack (the guest
      code never uses it) and page 0 (the PVM emulator reads linear address
      0 when it emulates `out`, through a software walk, so page 0 must be
      mapped but gets no spte).
    In all of the above each fault is one spte_requested and one set_spte.

    2 MiB guest pages (gpage2m: PDE with PS=1, A/D clear), measured
    2026-11-26 on the same host with bpftrace counting kvm_mmu_set_spte
    (gfn, level, spte W bit) and kvm_mmu_spte_requested (gfn, level) for
    comm kvmtrace-vcpu*, plus kvm:kvm_unmap_hva_range, over every backing x
    {w, r, r then w, rw, x, w then r} on 4 pages in each of two 2 MiB
    frames, with and without dirty logging, and the sequences "r 0-7, w 0,
    r 1-7" and "r 0, x 1-3, x 5" (hugetlb with nr_hugepages=16, restored
    after; THP: enabled=madvise, defrag=madvise, use_zero_page=1):

    * thp and hugetlb without dirty logging: one fault per 2 MiB frame and
      access kind, level 2 (spte_requested level 2, set_spte level 2): the
      first read/execute maps the whole frame read-only (thp: the huge zero
      page, Rss 0), the first write maps it writable; a frame read first and
      written later takes 2 faults, both level 2 (thp: plus one
      kvm_unmap_hva_range of the 2 MiB range when the huge zero page is
      replaced). E.g. w on 4 pages in each of 2 frames: 2 faults; r then w:
      4; x: 2. No prefetch (KVM only prefetches into 4 KiB shadow pages).
      THP came from the fault path itself: after the run AnonHugePages
      covered every written frame, without any host touch first.
    * thp and hugetlb with dirty logging: KVM maps 4 KiB sptes only (level 1
      on every event); the counts follow the 4 KiB rules below, where the
      host page state is the 2 MiB frame's.
    * anon (MADV_NOHUGEPAGE), anon-shared, memfd, file (4 KiB host pages),
      and thp/hugetlb under dirty logging: level 1 faults, one per 4 KiB
      page touched as for 4 KiB guest pages, except:
      - KVM shadows the 2 MiB guest page with one "direct" 4 KiB shadow page
        whose access is the guest PDE's, without W while the PDE's D bit is
        clear. The first guest write to the frame sets D, and KVM replaces
        the read-only shadow page with a writable one: every spte installed
        in the frame before is dropped, so pages read before re-fault when
        touched again (anon: "r 0-7, w 0, r 1-7" = 16 faults).
      - In the writable shadow page a read fault installs a writable spte
        when the host page is writable (memfd/anon-shared pages, anon pages
        already written, a thp/hugetlb frame once written), so a later write
        takes no fault; under dirty logging that read marks the page dirty
        (memfd: "r 0-7, w 0, r 1-7" with dirty logging: dirty log 0-7).
      - After each fault KVM prefetches neighbours in the 8-page aligned
        group of the faulting page: each run of pages without an spte,
        from its start, while the host page is present and writable
        (get_user_pages_fast_only with FOLL_WRITE); the first run whose
        first page is not stops the prefetch. Prefetched sptes are set_spte
        events without spte_requested, writable iff the shadow page is; no
        prefetch into a writable shadow page under dirty logging (a
        read-only one still prefetches). E.g. anon "r 0, x 1-3, x 5" (the
        VMM wrote stubs into 1, 2, 3, 5): 2 faults, 5 set_spte; thp/hugetlb
        with dirty logging (stubs made the frame writable): 1 fault, 8
        set_spte; memfd "r 0-7, w 0, r 1-7": 9 faults, 16 set_spte.
      - Host page state (for thp/hugetlb: the whole 2 MiB frame's): a page
        the guest reads first is read-only for private memory (anon: the
        zero page; thp: the huge zero page; MAP_PRIVATE hugetlb: a read-only
        PTE) and for a MAP_SHARED file (write-notify), writable for shmem
        (memfd, anon-shared); once written, by the guest or by the VMM's
        execute stubs, it is writable.
    * READONLY slots with 2 MiB guest pages were not measured (None).
    """
    result = {"total": None, "faults": None, "levels": {}, "set_spte": None,
              "set_spte_levels": {}, "prefetched": 0, "read_sptes": 0, "write_sptes": 0,
              "mmio_exits": 0, "level": 1, "dirty_pages": [],
              "rule": mmu if mmu in MEASURED_MMUS else "not measured"}
    if mmu == "arm64-stage2":
        if role == "system":  # code pages and vectors: written by the VMM
            host_written = [p for p, _ in touched]
        return arm64_expected_faults(kind, flags, touched, arm64_rule(kernel), host_written,
                                     status, fs)
    if status != "ok":
        result.update(total=0, faults=0, set_spte=0, level=None)
        return result
    if mmu == "tdp":
        return tdp_expected_faults(kind, flags, touched, role, extra, host_written, fs, result)
    if gpage2m and not writes_land(kind, flags):
        result.update(level=None, rule="not measured (2 MiB guest pages on a read-only slot)")
        return result
    if host_written is None:
        host_written = [p for p, a in touched if a == "x"]
    if not gpage2m:
        sim = _Guest4K(kind, flags, result)
    elif kind in HUGE_HOST_KINDS and not flags & LOG_DIRTY:
        sim = _Guest2MHost2M(result)
    else:
        sim = _Guest2MSptes4K(kind, flags, host_written, result)
    for page, access in touched:
        if access in ("r", "x", "rw"):
            sim.access(page, False)
        if access in WRITE_ACCESSES:
            sim.access(page, True)
    result["dirty_pages"] = sorted(result["dirty_pages"])
    levels = result["levels"]
    result["level"] = next(iter(levels)) if len(levels) == 1 else (None if levels else 1)
    if mmu in MEASURED_MMUS:
        result["faults"] = result["total"] = sum(levels.values())
        result["set_spte"] = result["read_sptes"] + result["write_sptes"]
    else:
        result["levels"], result["set_spte_levels"] = {}, {}
    return result



class _Rule:
    """Counting shared by the rules: one fault, one installed spte."""

    def __init__(self, result):
        self.r = result

    def install(self, page, level, writable, fault=True):
        r = self.r
        if fault:
            r["levels"][level] = r["levels"].get(level, 0) + 1
        else:
            r["prefetched"] += 1
        r["set_spte_levels"][level] = r["set_spte_levels"].get(level, 0) + 1
        r["write_sptes" if writable else "read_sptes"] += 1


class _Guest4K(_Rule):
    """4 KiB guest PTEs: one spte per page and access kind, no prefetch."""

    def __init__(self, kind, flags, result):
        super().__init__(result)
        self.lands = writes_land(kind, flags)
        self.log_dirty = bool(flags & LOG_DIRTY)
        self.state = {}  # page -> "r" (read-only spte) or "w" (writable spte)

    def access(self, page, write):
        mapped = self.state.get(page)
        if not write:
            if mapped is None:
                self.state[page] = "r"
                self.install(page, 1, False)
        elif not self.lands:
            self.r["mmio_exits"] += 1
        elif mapped != "w":
            self.state[page] = "w"
            self.install(page, 1, True)
            if self.log_dirty:
                self.r["dirty_pages"].append(page)


class _Guest2MHost2M(_Rule):
    """2 MiB guest pages on 2 MiB host pages: one level-2 spte per frame."""

    def __init__(self, result):
        super().__init__(result)
        self.state = {}  # frame -> "r" / "w"

    def access(self, page, write):
        frame = page // PAGES_PER_2M
        mapped = self.state.get(frame)
        if write and mapped != "w":
            self.state[frame] = "w"
            self.install(frame * PAGES_PER_2M, 2, True)
        elif not write and mapped is None:
            self.state[frame] = "r"
            self.install(frame * PAGES_PER_2M, 2, False)


class _Guest2MSptes4K(_Rule):
    """2 MiB guest pages mapped with 4 KiB sptes (4 KiB host pages, or dirty logging).

    Models KVM's direct shadow page per guest frame (read-only until the
    guest PDE is dirty, then replaced by a writable one), the host page
    state that decides writable-on-read and prefetch, and direct prefetch.
    """

    def __init__(self, kind, flags, host_written, result):
        super().__init__(result)
        self.kind = kind
        self.log_dirty = bool(flags & LOG_DIRTY)
        self.host = {}  # page, or frame for 2 MiB host pages -> "ro" / "rw"
        self.dirty_frames = set()  # guest PDE D bit set
        self.sp_writable = {}  # frame -> whether its current shadow page has W
        self.sptes = {}  # page -> "r" / "w", in the current shadow page of its frame
        for p in host_written:
            self.host[self._hkey(p)] = "rw"

    def _hkey(self, page):
        return ("frame", page // PAGES_PER_2M) if self.kind in HUGE_HOST_KINDS else page

    def _host_fault(self, page, write):
        key = self._hkey(page)
        if write:
            self.host[key] = "rw"
        elif key not in self.host:
            self.host[key] = "rw" if self.kind in ("memfd", "anon-shared") else "ro"

    def access(self, page, write):
        frame = page // PAGES_PER_2M
        if write:
            self.dirty_frames.add(frame)
        sp_w = frame in self.dirty_frames
        if self.sp_writable.get(frame, sp_w) != sp_w:  # a new, writable shadow page
            self.sptes = {p: a for p, a in self.sptes.items() if p // PAGES_PER_2M != frame}
        self.sp_writable[frame] = sp_w
        mapped = self.sptes.get(page)
        if mapped == "w" or (mapped == "r" and not write):
            return
        self._host_fault(page, write)
        writable = write or (sp_w and self.host[self._hkey(page)] == "rw")
        self.sptes[page] = "w" if writable else "r"
        self.install(page, 1, writable)
        if writable and self.log_dirty:
            self.r["dirty_pages"].append(page)
        self._prefetch(page, sp_w)

    def _prefetch(self, page, sp_w):
        if sp_w and self.log_dirty:
            return
        first = page - page % PREFETCH_GROUP
        run = []
        for p in list(range(first, first + PREFETCH_GROUP)) + [None]:
            if p is not None and p not in self.sptes:
                run.append(p)
                continue
            if run:
                n = 0
                while n < len(run) and self.host.get(self._hkey(run[n])) == "rw":
                    n += 1
                if n == 0:
                    return
                for q in run[:n]:
                    self.sptes[q] = "w" if sp_w else "r"
                    self.install(q, 1, sp_w, fault=False)
                run = []


def expected_dirty_pages(kind, flags, touched, gpage2m=False, host_written=None, mmu=None,
                         fs=None):
    """Pages KVM_GET_DIRTY_LOG should report for a dirty-logged slot.

    4 KiB guest pages: those the guest wrote to memory (measured: the bitmap
    held exactly the w / rw pages, none only read). 2 MiB guest pages: every
    page that got a writable spte, which includes pages only read after the
    frame was written (see expected_faults). arm64 (mmu "arm64-stage2", no
    guest page tables): the pages written (measured on 6.1 and 7.3.4, anon
    and memfd: exactly the w / rw pages; KVM maps read faults read-only
    while logging).
    """
    if not writes_land(kind, flags):
        return []
    if mmu == "arm64-stage2":
        return sorted({p for p, a in touched if a in WRITE_ACCESSES})
    if mmu == "tdp":
        return expected_faults(kind, flags | LOG_DIRTY, touched, "tdp", gpage2m=gpage2m,
                               host_written=host_written, fs=fs)["dirty_pages"]
    return expected_faults(kind, flags | LOG_DIRTY, touched, "pvm-shadow", gpage2m=gpage2m,
                           host_written=host_written)["dirty_pages"]


# --------------------------------------------------------------------------
# x86 with TDP (NPT / EPT): the TDP MMU maps guest-physical pages directly

# backings whose host page a guest read maps writable (shared memory without
# write-notify: a read fault installs a writable host PTE)
# a read maps these writable on TDP; bar-uc / bar-wc (a writable MAP_SHARED
# VM_PFNMAP BAR: the pfn comes writable from the host pte) measured on 6.1.0-57
# and 7.3.4 (tests/fixtures/x86-tdp/bar-*: "rw" steps took one fault per page);
# bar-vfio assumed the same (a writable MAP_SHARED VM_PFNMAP BAR as well)
TDP_WRITABLE_ON_READ = ("memfd", "anon-shared", "bar-uc", "bar-wc", "bar-vfio")


def tdp_expected_faults(kind, flags, touched, role, extra, host_written, fs, result):
    """expected_faults() on a TDP host (mmu "tdp": SVM with NPT, VMX with EPT).

    Measured 2026-12-01 on an emulated AMD host (testbed/x86: QEMU TCG,
    -cpu EPYC,+svm,+npt, kvm_amd npt=Y, tdp_mmu=Y), Debian 6.1.0-57 and
    7.3.4, by counting kvmmmu:kvm_mmu_spte_requested per gfn and level for
    the guest's vCPU threads with bpftrace (and kvm:kvm_page_fault's error
    codes), over the built-in scenarios:

    * The guest's own page tables are guest-physical memory: every table
      page on the walk to a page the guest touches takes one fault (NPF
      with PFERR_GUEST_PAGE: the walker sets Accessed bits, a write), as
      does each code page (one fetch fault). The system slot's extra
      "page_tables_walked" lists those table pages. Stack and page 0: none.
    * Data pages, 4 KiB host pages (anon, anon-shared, memfd, file): one
      fault per page and kind of first access, level 1, whatever the guest
      page size (NPT does not see it). A read or execute maps the page
      writable when the host page is (memfd / anon-shared, and pages the
      VMM wrote, e.g. execute stubs): a later write takes no fault. Private
      anonymous memory read first maps the zero page read-only, so "rw" is
      2 faults; a MAP_SHARED file read first is read-only too (write-notify).
    * READONLY slots and [vvar] (pfnmap): reads map read-only, writes exit
      as KVM_EXIT_MMIO and never fault a spte in.
    * Dirty logging: no extra fault; a writable spte marks its page dirty.
    * thp / hugetlb (2 MiB host pages, no dirty logging): one level-2 fault
      per 2 MiB frame whose first access is a write; nothing after. A frame
      read first (THP: the huge zero page, split by the first write) was not
      measured, nor were huge kinds under dirty logging: None.
    The TDP MMU never prefetches: set_spte == faults.
    """
    if role == "system":
        tables = (extra or {}).get("page_tables_walked")
        if tables is None:
            result["rule"] = "not measured (no page_tables_walked)"
            return result
        host_written = [p for p, _ in touched] + list(tables)
        touched = [(p, "w") for p in tables] + list(touched)
    if host_written is None:
        host_written = [p for p, a in touched if a == "x"]
    lands = writes_land(kind, flags)
    log_dirty = bool(flags & LOG_DIRTY)
    rule = _Rule(result)
    if kind in HUGE_HOST_KINDS:
        if log_dirty:
            result.update(level=None, rule="not measured (2 MiB host pages under dirty logging)")
            return result
        first = {}
        for page, access in touched:
            first.setdefault(page // PAGES_PER_2M, access)
        if any(a not in WRITE_ACCESSES or a == "rw" for a in first.values()):
            result.update(level=None, rule="not measured (2 MiB host frame read first)")
            return result
        for frame in sorted(first):
            rule.install(frame * PAGES_PER_2M, 2, True)
    else:
        on_read = kind in TDP_WRITABLE_ON_READ or (kind == "file" and fs == "tmpfs")
        host_rw = set(host_written)
        state = {}  # page -> "r" / "w"
        for page, access in touched:
            for write in ((False, True) if access == "rw" else (access in WRITE_ACCESSES,)):
                mapped = state.get(page)
                if not write:
                    if mapped is None:
                        writable = lands and (on_read or page in host_rw)
                        state[page] = "w" if writable else "r"
                        rule.install(page, 1, writable)
                        if writable and log_dirty:
                            result["dirty_pages"].append(page)
                elif not lands:
                    result["mmio_exits"] += 1
                elif mapped != "w":
                    state[page] = "w"
                    host_rw.add(page)
                    rule.install(page, 1, True)
                    if log_dirty:
                        result["dirty_pages"].append(page)
    result["dirty_pages"] = sorted(result["dirty_pages"])
    levels = result["levels"]
    result["level"] = next(iter(levels)) if len(levels) == 1 else (None if levels else 1)
    result["faults"] = result["total"] = sum(levels.values())
    result["set_spte"] = result["read_sptes"] + result["write_sptes"]
    return result


# --------------------------------------------------------------------------
# arm64: KVM's stage-2 tables


def arm64_rule(release=None):
    """Which measured arm64 rule applies to kernel `release` (default: this
    one's): "6.1" (6.1.x), "7.x" (7.*, measured on 7.3.4), None otherwise."""
    release = release or os.uname().release
    parts = release.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1].split("-")[0].split("+")[0])
    except (ValueError, IndexError):
        return None
    if (major, minor) == (6, 1):
        return "6.1"
    if major == 7:
        return "7.x"
    return None


# enum kvm_pgtable_prot as measured (BTF of each kernel); the rule reports
# prots by name, these give the raw values kvm_pgtable_stage2_map's prot has
ARM64_PROT_BITS = {
    "6.1": {"X": 0x1, "W": 0x2, "R": 0x4, "DEVICE": 0x8},
    "7.x": {"X": 0x3, "W": 0x4, "R": 0x8, "DEVICE": 0x10, "NORMAL_NC": 0x20},  # X = PX|UX
}
ARM64_4K_KINDS = ("anon", "anon-shared", "memfd", "file")
# PCI BAR backings: bar-uc / bar-wc (sysfs resourceN / resourceN_wc) and
# bar-cacheable (the kvmtrace_cbar test module: the BAR mapped Normal cacheable)
# and bar-vfio (the BAR region mmap'ed from a VFIO device fd, as QEMU does)
ARM64_BAR_KINDS = ("bar-uc", "bar-wc", "bar-cacheable", "bar-vfio")
ARM64_SHMEM_KINDS = ("anon-shared", "memfd")


def _thp_setting(name):
    """The selected word of /sys/kernel/mm/transparent_hugepage/<name>, or None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/" + name) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def arm64_ctr_el0():
    """CTR_EL0 as EL0 reads it, or None off arm64 (read here, not through kvmtrace)."""
    from .arm64 import read_ctr_el0

    return read_ctr_el0()


def arm64_memslot_errno(kind, flags=0, rule=None, dic=None):
    """errno KVM_SET_USER_MEMORY_REGION should return for a new slot of `kind`
    on arm64 (0: accepted), or None where not measured.

    Measured 2026-11-26 in the emulated arm64 host (QEMU 7.2 -cpu max: S2FWB
    yes, CTR_EL0.DIC no) with the bar-cacheable backing (the kvmtrace_cbar
    test module: the ivshmem BAR remap_pfn_range()d with the VMA's default,
    Normal cacheable, pgprot; a VM_PFNMAP VMA over a pfn that is not RAM):
      6.1    accepted; the pages are mapped DEVICE|R|W at stage 2 ("PFNMAP
             forced to Device", like bar-uc / bar-wc)
      7.x    refused with EINVAL by kvm_arch_prepare_memory_region: a
             cacheable VM_PFNMAP VMA needs kvm_supports_cacheable_pfnmap()
             (S2FWB and CTR_EL0.DIC; the kernel has the rule from 6.17).
             With DIC (dic=True): accepted is what the source says, but it
             was not measured (None).
    rule: arm64_rule() (default: this kernel's); dic: CTR_EL0.DIC (default:
    read it). Other kinds: 0 (the measured runs all created their slots).
    """
    if kind != "bar-cacheable":
        return 0
    rule = rule or arm64_rule()
    if rule == "6.1":
        return 0
    if rule != "7.x":
        return None
    if dic is None:
        ctr = arm64_ctr_el0()
        dic = None if ctr is None else bool(ctr >> 29 & 1)
    return errno.EINVAL if dic is False else None


def arm64_prot_value(names, rule):
    """Raw kvm_pgtable_prot of a prot name like "R|W|DEVICE" under `rule`."""
    bits = ARM64_PROT_BITS[rule]
    return sum(bits[n] for n in names.split("|") if n)


def arm64_expected_faults(kind, flags, touched, rule, host_written=None, status="ok", fs=None,
                          thp=None):
    """The arm64 rule: stage-2 faults and kvm_pgtable_stage2_map calls of one slot.

    Returns expected_faults()'s dict, where on arm64
      total == faults  kvm:kvm_guest_fault events with an IPA in the slot:
                       every stage-2 abort, including writes that exit as
                       MMIO, refused accesses and faults retried after an
                       MMU-notifier invalidation
      set_spte         kvm_pgtable_stage2_map calls (a kprobe at its entry;
                       6.1 makes one that fails, see below), levels /
                       set_spte_levels the same calls by size {1: 4 KiB,
                       2: 2 MiB}, read_sptes / write_sptes by W in prot
      map_prots        those calls by prot name ("R|W", "R|W|X", "R|W|DEVICE"..;
                       arm64_prot_value() gives the raw value per kernel)
      relax_perms      kvm_pgtable_stage2_relax_perms calls (permission
                       faults on an existing entry of the same size), relax_prots
      mmio_exits       KVM_EXIT_MMIO (writes to a READONLY slot)
      refused          accesses KVM refuses: [vvar] writes (KVM_RUN EFAULT),
                       execute from a PCI BAR (an instruction abort injected
                       into the guest)
      retries          faults that map nothing because the host COW'd the
                       page meanwhile (mmu_invalidate_retry): the guest faults again
    or None counts where not measured (kind/flags outside the measured set,
    or a kernel without a measured rule).

    Measured 2026-11-25 in the emulated arm64 host (QEMU 7.2 TCG,
    virtualization=on, -cpu max, no CTR_EL0.DIC: KVM gives data mappings no
    X) on Debian 6.1.0-56 (6.1.192) and 7.3.4+deb13: tracefs kprobes
    `p:kt/s2map kvm_pgtable_stage2_map addr=%x1 size=%x2 phys=%x3 prot=%x4`,
    `p:kt/relax kvm_pgtable_stage2_relax_perms addr=%x1 prot=%x2`, return
    probes on kvm_handle_guest_abort (and user_mem_abort, 7.3.4), plus
    kvm:kvm_guest_fault, kvm:kvm_mmio, kvm:kvm_unmap_hva_range, in a tracefs
    instance with set_event_pid on the guest process, mapped to slots by
    the report's GPA ranges. Runs: minimal, demo, smp, bar, huge-base,
    huge-4k, [vvar] reads/writes, and a matrix of every backing (anon,
    anon-shared, memfd, file, thp, hugetlb with nr_hugepages=16, anon and
    memfd READONLY and LOG_DIRTY, bar-uc, bar-wc) x 4 pages (thp/hugetlb:
    one 2 MiB frame) each of r, w, rw, x, r-then-w, w-then-r, r-then-x,
    x-then-w, x-then-r. The guest runs with the MMU off (arm64.py), so every
    stage-2 abort is the guest's own access, one per first touch.

    * Each first access of a page is one fault and one 4 KiB map (2 MiB for
      thp and hugetlb, one per frame: later accesses in the frame take none).
      prot = R, plus W when the host page is writable after KVM faulted it
      in (get_user_pages with FOLL_WRITE succeeds) and the slot allows it,
      plus X for an instruction fetch, plus DEVICE for a PCI BAR:
        read       anon: R (the zero page); file (MAP_SHARED, write-notify):
                   R; anon-shared / memfd: R|W (shmem maps the page writable);
                   thp: 2M R (the huge zero page); hugetlb (private): 2M R
        write      R|W (2M R|W for thp / hugetlb)
        execute    R|W|X: every executed page holds the VMM's stub, so the
                   host page is already written (the system slot's code pages
                   likewise: 1 fault, 4K R|W|X each)
      E.g. demo anon pages 0-15 r: 16 maps R, 16-31 w: 16 maps R|W.
    * A later access the entry lacks is a permission fault:
        execute after read: 1 fault, relax_perms(+X)
        write after read, no copy needed (file: page_mkwrite; hugetlb:
        private page reused; memfd under dirty logging): 1 fault,
        relax_perms(R|W)
        write after read of the anon zero page (the host copies it):
          6.1: 2 faults: the copy's MMU notifier unmaps the page and
               change_pte() calls kvm_pgtable_stage2_map(4K, R) for the new
               page (it succeeds when a 4 KiB table still exists in that
               2 MiB: another page of the region is mapped); the fault retries
               and relaxes to R|W. anon rw: 3 faults, maps R + R, 1 relax.
          7.3.4 (no change_pte since 6.9): the fault retries, the next one
               finds no entry and maps R|W. anon rw: 3 faults, maps R + R|W.
        write after read of the huge zero page (thp):
          6.1: the host splits the frame into 4 KiB zero pages and copies
               the written one; change_pte's map (4K R) fails (no table: the
               2 MiB block was just unmapped) but is a call; the retried
               fault maps 4K R|W. The frame is 4 KiB pages from then on
               (reads map the zero page R, writes copy as above).
               thp rw on 4 pages of a frame: 11 faults, maps 2M R, 4K R x7,
               4K R|W, 3 relax.
          7.3.4: the host allocates a huge page for the frame; the fault
               retries and maps 2M R|W. thp rw: 3 faults, maps 2M R, 2M R|W.
    * READONLY slot: reads R, execute R|X, never W; each write instruction is
      a fault and a KVM_EXIT_MMIO, nothing mapped (anon and memfd measured).
    * Dirty logging (KVM_MEM_LOG_DIRTY_PAGES; anon and memfd measured): only
      write faults map W (reads R even for memfd, execute R|X), 4 KiB only;
      a write after that is relax_perms(R|W) unless the host copies the page
      (anon zero page: as above). KVM_GET_DIRTY_LOG held exactly the pages
      written.
    * PCI BAR, through resource2 (uncached mmap) and through resource2_wc
      (write-combine mmap) alike: 1 fault and one 4K map R|W|DEVICE
      (6.1: 0xe, 7.3.4: 0x1c) per page on the first access, read or write;
      no 2 MiB maps although hva and GPA are 2 MiB aligned. The
      write-combine mapping is forced to Device at stage 2 on both kernels
      (7.3.4 has KVM_PGTABLE_PROT_NORMAL_NC = 0x20, unused here). Execute:
      1 fault, nothing mapped, refused: user_mem_abort returns -ENOEXEC
      (probed on 7.3.4; inlined on 6.1) and kvm_handle_guest_abort injects
      an instruction abort (ESR 0x86000010) into the guest on both kernels;
      KVM_RUN does not fail. The abort's vector fetch adds one fault and
      one 4K R|W|X map in the system slot (page 0; the VMM adds it to the
      system slot's pages when the guest took an exception).
    * [vvar] (pfnmap): 6.1: 2 pages, VM_PFNMAP (no VM_IO), page 1 has
      nothing behind it (skipped); 7.3.4: 4 pages, VM_MIXEDMAP, all
      readable. A read maps 4K R (Normal memory: kernel pages); a write is
      one fault and KVM_RUN fails with EFAULT (user_mem_abort -14) on both,
      nothing mapped (x86 exits as MMIO instead).
    * The host: THP enabled=always (thp slots are MADV_HUGEPAGE, anon ones
      MADV_NOHUGEPAGE), shmem_enabled=never, /tmp (the file kind) on ramfs:
      page cache with write-notify, so a read maps R. A file on tmpfs is
      shmem and follows the memfd rule (memfd measured, not tmpfs files).
    Not measured (None): thp / hugetlb with READONLY or dirty logging,
    READONLY BAR slots, thp with THP "never", memfd / anon-shared (and tmpfs
    files) with shmem THP on (shmem_enabled always / within_size / force),
    hosts with CTR_EL0.DIC (KVM then maps all normal memory executable, so
    execute after read would take no fault), kernels other than 6.1 and 7.x.

    thp: {"enabled": ..., "shmem_enabled": ...} (the bracketed words of
    /sys/kernel/mm/transparent_hugepage/*; default: read them).
    """
    result = {"total": None, "faults": None, "levels": {}, "set_spte": None,
              "set_spte_levels": {}, "prefetched": 0, "read_sptes": 0, "write_sptes": 0,
              "mmio_exits": 0, "level": 1, "dirty_pages": [], "relax_perms": None,
              "refused": 0, "retries": 0, "map_prots": {}, "relax_prots": {},
              "rule": f"arm64-stage2 {rule}" if rule else
              f"not measured (arm64 kernel {os.uname().release})"}
    if status != "ok":
        result.update(total=0, faults=0, set_spte=0, relax_perms=0, level=None)
        return result
    thp = thp or {name: _thp_setting(name) for name in ("enabled", "shmem_enabled")}
    if kind == "file" and fs == "tmpfs":
        kind = "memfd"  # shmem
    why = None
    if kind in HUGE_HOST_KINDS + ARM64_BAR_KINDS and flags & (READONLY | LOG_DIRTY):
        why = f"{kind} with flags {flags:#x}"
    elif kind == "bar-cacheable" and rule != "6.1" and touched:  # 7.x: refused, untouched
        why = "bar-cacheable accepted as a memslot (a CPU with CTR_EL0.DIC)"
    elif kind == "thp" and thp.get("enabled") == "never":
        why = "thp with transparent_hugepage/enabled=never"
    elif kind in ARM64_SHMEM_KINDS and thp.get("shmem_enabled") in ("always", "within_size",
                                                                        "force"):
        why = f"shmem with transparent_hugepage/shmem_enabled={thp['shmem_enabled']}"
    if rule is None or why:
        if why and rule is not None:
            result["rule"] += f" (not measured: {why})"
        result["level"] = None
        return result
    if host_written is None:
        host_written = [p for p, a in touched if a == "x"]
    sim = _Arm64Stage2(kind, flags, rule, host_written, result)
    for page, access in touched:
        for a in (("r", "w") if access == "rw" else (access,)):
            sim.access(page, a)
    result["dirty_pages"] = sorted(set(result["dirty_pages"]))
    levels = result["levels"]
    result["faults"] = result["total"]
    result["set_spte"] = sum(levels.values())
    result["set_spte_levels"] = dict(levels)
    result["level"] = next(iter(levels)) if len(levels) == 1 else (None if levels else 1)
    return result


class _Arm64Stage2:
    """Host page state + stage-2 entries of one slot, access by access (see
    arm64_expected_faults)."""

    def __init__(self, kind, flags, rule, host_written, result):
        self.kind, self.rule, self.r = kind, rule, result
        self.readonly = bool(flags & READONLY)
        self.logging = bool(flags & LOG_DIRTY)
        self.huge = kind in HUGE_HOST_KINDS
        self.host = {}  # page (4K kinds, split thp frames) or ("f", frame) -> state
        self.split = set()  # thp frames the host split into 4 KiB pages (6.1)
        self.s2 = {}  # page -> set of prot names (4 KiB entries)
        self.blocks = {}  # frame -> set of prot names (2 MiB entries)
        result.update(total=0, relax_perms=0)
        for p in host_written:  # the VMM's execute stubs: written, so writable
            key = self._hkey(p)
            self.host[key] = "huge" if key[0] == "f" and kind == "thp" else "rw"

    # -- host side
    def _hkey(self, page):
        frame = page // PAGES_PER_2M
        if self.huge and frame not in self.split:
            return ("f", frame)
        return ("p", page)

    def _host_state(self, page):
        return self.host.get(self._hkey(page), "none")

    # -- stage-2 side
    def _entry(self, page):
        frame = page // PAGES_PER_2M
        if frame in self.blocks:
            return self.blocks[frame]
        return self.s2.get(page)

    def _table_exists(self, page):
        frame = page // PAGES_PER_2M
        return any(q // PAGES_PER_2M == frame for q in self.s2)

    def _zap(self, page, whole_frame):
        frame = page // PAGES_PER_2M
        if whole_frame:
            self.blocks.pop(frame, None)
            for q in [q for q in self.s2 if q // PAGES_PER_2M == frame]:
                del self.s2[q]
        else:
            self.s2.pop(page, None)

    def _map(self, page, prot, size2m, installs=True):
        r = self.r
        level = 2 if size2m else 1
        r["levels"][level] = r["levels"].get(level, 0) + 1
        name = "|".join(prot)
        r["map_prots"][name] = r["map_prots"].get(name, 0) + 1
        r["write_sptes" if "W" in prot else "read_sptes"] += 1
        if installs:
            if size2m:
                self.blocks[page // PAGES_PER_2M] = set(prot)
            else:
                self.s2[page] = set(prot)

    def _relax(self, page, prot):
        r = self.r
        r["relax_perms"] += 1
        name = "|".join(prot)
        r["relax_prots"][name] = r["relax_prots"].get(name, 0) + 1
        self._entry(page).update(prot)

    @staticmethod
    def _prot(writable, execute, device=False):
        prot = ["R"] + (["W"] if writable else []) + (["X"] if execute else [])
        return prot + (["DEVICE"] if device else [])

    # -- one guest access
    def access(self, page, a):
        r = self.r
        need = {"r": "R", "w": "W", "x": "X"}[a]
        for _ in range(4):  # a fault, and the refaults after a retry
            entry = self._entry(page)
            if entry is not None and need in entry:
                return
            r["total"] += 1
            if self._fault(page, a, entry):
                return
            r["retries"] += 1

    def _fault(self, page, a, entry):
        """One stage-2 abort; False when KVM retried (the guest faults again)."""
        r, kind = self.r, self.kind
        write, execute = a == "w", a == "x"
        if write and self.readonly:
            r["mmio_exits"] += 1
            return True
        if kind == "pfnmap" and write:  # read-only VMA: KVM_RUN EFAULT
            r["refused"] += 1
            return True
        if kind in ARM64_BAR_KINDS:
            if execute:  # -ENOEXEC: an instruction abort for the guest
                r["refused"] += 1
                return True
            # vfio-pci's VMA has VM_ALLOW_ANY_UNCACHED from 6.9: KVM maps it
            # Normal-NC there (7.x), Device before (6.1)
            nc = kind == "bar-vfio" and self.rule != "6.1"
            prot = self._prot(not self.readonly, False, device=not nc)
            self._map(page, prot + (["NORMAL_NC"] if nc else []), False)
            return True
        if kind == "pfnmap":
            self._map(page, self._prot(False, execute), False)
            return True
        # RAM: fault the host page in (KVM's get_user_pages)
        state = self._host_state(page)
        if write and state == "zero":  # the host copies the anon zero page
            self._zap(page, False)
            self.host[self._hkey(page)] = "rw"
            if self.rule == "6.1":  # change_pte: map the copy R, if a table is there
                self._map(page, ["R"], False, installs=self._table_exists(page))
            return False
        if write and state == "hzero":  # the huge zero page of a thp frame
            frame = page // PAGES_PER_2M
            self._zap(page, True)
            if self.rule == "6.1":  # split into 4K zero pages, copy this one
                del self.host[("f", frame)]
                self.split.add(frame)
                for q in range(frame * PAGES_PER_2M, (frame + 1) * PAGES_PER_2M):
                    self.host[("p", q)] = "zero"
                self.host[("p", page)] = "rw"
                self._map(page, ["R"], False, installs=False)  # no table: the call fails
            else:  # 7.x: a new huge page
                self.host[("f", frame)] = "huge"
            return False
        key = self._hkey(page)
        if state == "none":
            if write:
                state = "huge" if key[0] == "f" and kind == "thp" else "rw"
            elif kind in ARM64_SHMEM_KINDS:
                state = "rw"
            elif kind == "file" or kind == "hugetlb":
                state = "ro"
            elif key[0] == "f":
                state = "hzero"
            else:
                state = "zero"
        elif write and state == "ro":  # page_mkwrite / private hugetlb page reused
            state = "rw"
        self.host[key] = state
        host_writable = state in ("rw", "huge")
        writable = host_writable and not self.readonly and (write or not self.logging)
        prot = self._prot(writable, execute)
        block = key[0] == "f" and not self.logging
        if entry is not None:  # permission fault on an entry of the same size
            self._relax(page, prot)
        else:
            self._map(page, prot, block)
        if self.logging and writable:
            r["dirty_pages"].append(page)
        return True
