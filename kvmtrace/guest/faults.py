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


def expected_faults(kind, flags, touched, mmu, status="ok", role="data", extra=None):
    """Shadow page faults (kvmmmu:kvm_mmu_set_spte events) expected for one slot.

    kind: backing kind; flags: the slot's memslot flags during the run;
    touched: [(page, access)] in guest order, access in r / w / rw / x (the
    system slot lists its code pages as "x"); mmu: host_mmu().
    Returns {"total", "read_sptes", "write_sptes", "mmio_exits", "level",
    "rule"}; total is None where the rule was not measured.

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
    """
    result = {"total": None, "read_sptes": 0, "write_sptes": 0, "mmio_exits": 0,
              "level": 1, "rule": mmu if mmu in MEASURED_MMUS else "not measured"}
    if status != "ok":
        result.update(total=0, level=None)
        return result
    lands = writes_land(kind, flags)
    state = {}  # page -> "r" (read-only spte) or "w" (writable spte)
    for page, access in touched:
        mapped = state.get(page)
        if access in ("r", "x", "rw") and mapped is None:
            result["read_sptes"] += 1
            mapped = state[page] = "r"
        if access in WRITE_ACCESSES:
            if not lands:
                result["mmio_exits"] += 1
            elif mapped != "w":
                result["write_sptes"] += 1
                state[page] = "w"
    if mmu in MEASURED_MMUS:
        result["total"] = result["read_sptes"] + result["write_sptes"]
    return result


def expected_dirty_pages(kind, flags, touched):
    """Pages KVM_GET_DIRTY_LOG should report: those the guest wrote to memory.

    Measured with the rule above: the bitmap held exactly the w / rw pages of
    the dirty-logged slot, and none that were only read.
    """
    if not writes_land(kind, flags):
        return []
    return sorted({p for p, a in touched if a in WRITE_ACCESSES})
