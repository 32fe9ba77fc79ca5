"""How many faults this host takes for what the guest did: the measured rule.

Why it exists: tests and benchmarks compare the tracer's fault counts with
the guest's report, so the report must say how many faults to expect. That
number depends on the host's MMU, not on the guest alone, and is only written
down where it was measured. On any other MMU expected_faults() says None
("not measured") rather than guess.
"""

import os

# where the rule was measured
MEASURED_MMUS = ("pvm-shadow",)
WRITE_ACCESSES = ("w", "rw")


def host_mmu():
    """Which KVM MMU this host runs guests on.

    "pvm-shadow"  KVM-PVM (kvm_pvm module): shadow paging, the measured case
    "tdp"         VMX with EPT / SVM with NPT
    "shadow"      VMX/SVM with EPT/NPT disabled
    "none"        no KVM module loaded; "unknown" otherwise
    """
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "pvm-shadow"
    for module, param in (("kvm_intel", "ept"), ("kvm_amd", "npt")):
        try:
            with open("/sys/module/%s/parameters/%s" % (module, param)) as f:
                return "tdp" if f.read().strip() in ("Y", "1") else "shadow"
        except OSError:
            continue
    return "none" if not os.path.isdir("/sys/module/kvm") else "unknown"


def writes_land(kind, flags):
    """Whether a guest write reaches host memory (else it exits as MMIO).

    READONLY slots (KVM_MEM_READONLY = 2) and the pfnmap [vvar] slot (a
    read-only VMA) turn every guest write into a KVM_EXIT_MMIO.
    """
    return not (flags & 2) and kind != "pfnmap"


HUGE_HOST_KINDS = ("thp", "hugetlb")  # backings the host maps with 2 MiB pages
PAGES_PER_2M = 512
PREFETCH_GROUP = 8  # KVM's PTE_PREFETCH_NUM: direct prefetch looks at 8-aligned groups


def expected_faults(kind, flags, touched, mmu, status="ok", role="data", extra=None,
                    gpage2m=False, host_written=None):
    """Shadow page faults expected for one slot, with the sptes they install.

    kind: backing kind; flags: the slot's memslot flags during the run;
    touched: [(page, access)] in guest order, access in r / w / rw / x (the
    system slot lists its code pages as "x"); mmu: host_mmu(); gpage2m: the
    guest maps the slot with 2 MiB pages; host_written: pages the VMM wrote
    before the run (default: the pages with an "x" access, which get an
    execute stub).
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
    if status != "ok":
        result.update(total=0, faults=0, set_spte=0, level=None)
        return result
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


LOG_DIRTY = 1  # KVM_MEM_LOG_DIRTY_PAGES


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


def expected_dirty_pages(kind, flags, touched, gpage2m=False, host_written=None):
    """Pages KVM_GET_DIRTY_LOG should report for a dirty-logged slot.

    4 KiB guest pages: those the guest wrote to memory (measured: the bitmap
    held exactly the w / rw pages, none only read). 2 MiB guest pages: every
    page that got a writable spte, which includes pages only read after the
    frame was written (see expected_faults).
    """
    if not writes_land(kind, flags):
        return []
    return expected_faults(kind, flags | LOG_DIRTY, touched, "pvm-shadow", gpage2m=gpage2m,
                           host_written=host_written)["dirty_pages"]
