"""x86 memory types: PAT indices in legacy sptes / PTEs, EPT memtype bits.

Holds for Linux 4.2 onwards (the PAT layout below was fixed by commit
"x86/mm/pat: Change PAT layout to include WT and WP", arch/x86/mm/pat/memtype.c)
and for every KVM x86 spte format up to 6.18 (arch/x86/kvm/mmu/spte.h,
arch/x86/include/asm/vmx.h):

- Legacy format (shadow paging and AMD NPT): the memory type is the PAT entry
  indexed by PAT:PCD:PWT; PWT is bit 3, PCD bit 4, PAT bit 7 in a 4K entry and
  bit 12 in a 2M / 1G entry (_PAGE_PAT_LARGE).
- EPT format (Intel): bits 5:3 are the memory type (0 UC, 1 WC, 4 WT, 5 WP,
  6 WB); bit 6 (IPAT) makes it ignore the guest's PAT.
- KVM-PVM (shadow paging) writes PAT/PCD/PWT = 0, i.e. PAT entry 0 (WB), for
  every spte seen on the development host, whatever the guest PTE asked for.
"""

from __future__ import annotations

import numpy as np

LINUX_PAT = ("WB", "WC", "UC-", "UC", "WB", "WP", "UC-", "WT")
LINUX_PAT_SOURCE = "assumed: Linux's PAT layout since 4.2 (the boot log was not readable)"

PWT, PCD, PAT_4K, PAT_LARGE = 1 << 3, 1 << 4, 1 << 7, 1 << 12
EPT_MT_SHIFT, EPT_MT_MASK, EPT_IPAT = 3, 0x7, 1 << 6
EPT_TYPES = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}

# Cache modes a PAT memtype list entry names (arch/x86/mm/pat/memtype.c,
# cattr_name()).
PAT_LIST_NAMES = {"write-back": "WB", "write-combining": "WC", "uncached-minus": "UC-",
                  "uncached": "UC", "write-through": "WT", "write-protected": "WP"}


def legacy_pat_index(spte: np.ndarray, level: np.ndarray) -> np.ndarray:
    spte = np.asarray(spte, dtype=np.uint64)
    level = np.asarray(level)
    pat_bit = np.where(level > 1, PAT_LARGE, PAT_4K).astype(np.uint64)
    return (((spte & np.uint64(PWT)) != 0).astype(np.uint8)
            | (((spte & np.uint64(PCD)) != 0).astype(np.uint8) << 1)
            | (((spte & pat_bit) != 0).astype(np.uint8) << 2))


def spte_memtype(spte, level, spte_format: str, pat=LINUX_PAT) -> np.ndarray:
    """Memory type names for an array of sptes."""
    spte = np.asarray(spte, dtype=np.uint64)
    if spte_format == "ept":
        mt = ((spte >> np.uint64(EPT_MT_SHIFT)) & np.uint64(EPT_MT_MASK)).astype(np.int64)
        names = np.array([EPT_TYPES.get(i, f"reserved({i})") for i in range(8)], dtype=object)
        return names[mt]
    names = np.array(list(pat), dtype=object)
    return names[legacy_pat_index(spte, level)]


def pfn_memtype(pfn, pat_list: list[dict] | None, ram: list[dict] | None, page_size=4096):
    """The host's memory type for physical frames, and where it came from.

    A frame inside a PAT memtype list range has that range's type (ioremap,
    PCI BAR mmap, ...). Otherwise a frame in System RAM is write-back (the
    kernel's direct map and every normal page use PAT entry 0). Anything else
    is unknown. Returns (types, sources) arrays.
    """
    pa = np.asarray(pfn, dtype=np.uint64) * np.uint64(page_size)
    types = np.full(pa.shape, "unknown", dtype=object)
    source = np.full(pa.shape, "PFN is neither in System RAM nor in the PAT memtype list",
                     dtype=object)
    if ram:
        for r in ram:
            hit = (pa >= r["start"]) & (pa < r["end"])
            types[hit], source[hit] = "WB", "PFN is System RAM (write-back)"
    if pat_list:
        for r in pat_list:
            hit = (pa >= r["start"]) & (pa < r["end"])
            types[hit] = PAT_LIST_NAMES.get(r["memtype"], r["memtype"])
            source[hit] = f"PAT memtype list: {r['memtype']}"
    if pat_list is None:
        unknown = types == "unknown"
        source[unknown] = "PFN not in System RAM; PAT memtype list not readable (debugfs)"
    return types, source
