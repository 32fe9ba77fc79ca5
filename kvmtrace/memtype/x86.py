"""x86 memory types: PAT indices in legacy sptes / PTEs, EPT memtype bits.

Which format an spte has depends on the MMU KVM runs (recorded as
``meta['kvm']['spte_format']``, kvmtrace.host.kvm):

- Legacy format: shadow paging (no EPT / NPT, and KVM-PVM) and AMD NPT,
  legacy or TDP MMU. The memory type is the host PAT entry indexed by
  PAT:PCD:PWT; PWT is bit 3, PCD bit 4, PAT bit 7 in a 4K entry and bit 12 in
  a 2M / 1G entry (_PAGE_PAT_LARGE; bit 7 is then PS). The host PAT is read
  from the boot log into the recording; Linux programs it, since 4.2
  (arch/x86/mm/pat/memtype.c, pat_init() / init_cache_modes(); "x86/mm/pat:
  Change PAT layout to include WT and WP"), as
  WB WC UC- UC WB WP UC- WT (LINUX_PAT). Xen PV guests and CPUs with the PAT
  errata use other layouts, hence ``pat``.
  KVM itself never puts a memory type in a legacy-format spte: make_spte()
  (arch/x86/kvm/mmu/spte.c) adds one only through kvm_x86_ops.get_mt_mask,
  which only VMX implements (SVM's returned 0, and was later dropped); the
  call was gated by shadow_memtype_mask, non-zero only once
  kvm_mmu_set_ept_masks() set up EPT, until commit 3fee4837ef40 ("KVM: x86:
  remove shadow_memtype_mask") replaced the gate by a kvm_x86_ops.get_mt_mask
  check. So KVM's legacy sptes have PAT:PCD:PWT = 0, host PAT entry 0 (WB);
  the CPU combines that with the MTRRs, and under NPT with the guest's PAT
  too (AMD APM vol. 2, "Combining Guest and Host PAT Types"). KVM-PVM wrote
  0 for every spte seen on the development host, whatever the guest PTE
  asked for.
- EPT format (Intel, legacy or TDP MMU): bits 5:3 are the memory type
  (0 UC, 1 WC, 4 WT, 5 WP, 6 WB; 2, 3 and 7 are reserved: an EPT
  misconfiguration), bit 6 IPAT makes the CPU ignore the guest's PAT
  (VMX_EPT_MT_EPTE_SHIFT, VMX_EPT_IPAT_BIT in arch/x86/include/asm/vmx.h;
  Intel SDM vol. 3, "EPT Translation Mechanism"). A leaf at any level (4K,
  2M, 1G) uses the same bits. KVM's vmx_get_mt_mask() (arch/x86/kvm/vmx/vmx.c)
  chooses them; from the code of 4.x, 6.1-6.14 and the 2025 quirk patches:
  * an MMIO pfn (kvm_is_mmio_pfn(): reserved and not WB in the host PAT, or
    outside E820 RAM): UC with IPAT clear, in every version;
  * a VM without non-coherent DMA (no VFIO device lacking snoop control):
    WB | IPAT; since KVM_X86_QUIRK_IGNORE_GUEST_PAT (2025; mainline 6.15 or
    6.16, backported to 6.12.78 stable, whose api.rst documents it) only
    while that quirk is on, its default; a VMM that disables it on a
    self-snooping CPU gets WB with IPAT clear;
  * a VM with non-coherent DMA: older kernels used the guest's MTRR type
    (and CR0.CD rules, changed in 6.7); once guest MTRR virtualization was
    dropped (6.11), WB with IPAT clear: the guest's PAT decides.
  (Version numbers other than 6.12.78 are from the kernel history as
  remembered, not checked against a tree.) Without IPAT the effective type
  is the EPT type combined with the guest's PAT (SDM "Memory Type Used for
  Translated Guest-Physical Addresses"): ``spte_memtype`` names KVM's part,
  ``ept_ipat`` says whether the guest's part counts.

Every decoder takes the spte as the full 64-bit word: NX (bit 63 in the
legacy format) or suppress-#VE (bit 63 in EPT) is commonly set, and a value
that went through float64 has lost its low bits (PWT, PCD, the EPT type).
Such input is refused rather than decoded wrong.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LINUX_PAT = ("WB", "WC", "UC-", "UC", "WB", "WP", "UC-", "WT")
LINUX_PAT_SOURCE = "assumed: Linux's PAT layout since 4.2 (the boot log was not readable)"

PWT, PCD, PAT_4K, PAT_LARGE = 1 << 3, 1 << 4, 1 << 7, 1 << 12
EPT_MT_SHIFT, EPT_MT_MASK, EPT_IPAT = 3, 0x7, 1 << 6
EPT_TYPES = {0: "UC", 1: "WC", 4: "WT", 5: "WP", 6: "WB"}

# Cache modes a PAT memtype list entry names (arch/x86/mm/pat/memtype.c,
# cattr_name(), unchanged since 4.2).
PAT_LIST_NAMES = {"write-back": "WB", "write-combining": "WC", "uncached-minus": "UC-",
                  "uncached": "UC", "write-through": "WT", "write-protected": "WP"}

_EXACT = 1 << 53  # float64 holds every integer below this exactly


def _u64(values) -> np.ndarray:
    """``values`` (array-like of 64-bit words) as uint64, exactly.

    Integers of any width are taken bit for bit (a negative int64 is the
    same 64-bit word). Floats are accepted only while every value is an
    integer below 2**53: anything else has already lost bits, and decoding
    it would give a confident wrong answer (e.g. NX|PCD|PWT read as WB)."""
    if not hasattr(values, "dtype"):  # a list / tuple / int: numpy would make
        values = np.array(values, dtype=object)  # float64 of ints past 2**63
    a = np.asarray(values)
    if a.dtype == object:
        out = np.empty(a.shape, dtype=np.uint64)
        flat = out.reshape(-1)
        for i, v in enumerate(a.reshape(-1)):
            if isinstance(v, (float, np.floating)):
                v = _exact_float(np.asarray([v]))[0]
            flat[i] = int(v) & 0xFFFF_FFFF_FFFF_FFFF
        return out
    if a.dtype.kind == "f":
        return _exact_float(a)
    if a.dtype.kind == "b":
        return a.astype(np.uint64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"64-bit words expected, not {a.dtype}")
    return a.astype(np.uint64)


def _exact_float(a: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(a) | (a < 0) | (a >= _EXACT) | (a != np.floor(a))
    if np.any(bad):
        raise TypeError("sptes went through float64 (a value is missing, negative or "
                        f"past 2**53, e.g. {a[bad].reshape(-1)[0]!r}): their low bits are "
                        "lost; pass them as unsigned 64-bit integers")
    return a.astype(np.uint64)


def legacy_pat_index(spte, level) -> np.ndarray:
    """PAT:PCD:PWT of legacy-format entries (sptes or host PTEs), 0-7.
    ``level``: 1 for a 4K entry, 2 / 3 for 2M / 1G (PAT at bit 12)."""
    spte = _u64(spte)
    level = np.asarray(level)
    pat_bit = np.where(level > 1, PAT_LARGE, PAT_4K).astype(np.uint64)
    return (((spte & np.uint64(PWT)) != 0).astype(np.uint8)
            | (((spte & np.uint64(PCD)) != 0).astype(np.uint8) << 1)
            | (((spte & pat_bit) != 0).astype(np.uint8) << 2))


def ept_ipat(spte) -> np.ndarray:
    """True where an EPT entry has IPAT set (the guest's PAT is ignored)."""
    return (_u64(spte) & np.uint64(EPT_IPAT)) != 0


def spte_memtype(spte, level, spte_format: str, pat=LINUX_PAT) -> np.ndarray:
    """Memory type names for an array of sptes.

    ``spte_format``: 'ept' (bits 5:3) or the legacy format (anything else:
    'legacy', shadow paging, NPT); ``pat``: the host PAT's eight entries,
    indexed by a legacy entry's PAT:PCD:PWT; ``level``: the entries' levels
    (1 = 4K), scalar or per spte."""
    spte = _u64(spte)
    if spte_format == "ept":
        mt = ((spte >> np.uint64(EPT_MT_SHIFT)) & np.uint64(EPT_MT_MASK)).astype(np.int64)
        names = np.array([EPT_TYPES.get(i, f"reserved({i})") for i in range(8)], dtype=object)
        return names[mt]
    names = np.array(list(pat), dtype=object)
    if len(names) != 8:
        raise ValueError(f"a host PAT has 8 entries, not {len(names)}")
    return names[legacy_pat_index(spte, level)]


def pfn_memtype(pfn, pat_list: list[dict] | None, ram: list[dict] | None, page_size=4096):
    """The host's memory type for physical frames, and where it came from.

    A frame inside a PAT memtype list range has that range's type (ioremap,
    PCI BAR mmap, ...). Otherwise a frame in System RAM is write-back (the
    kernel's direct map and every normal page use PAT entry 0). Anything else
    is unknown. ``pat_list`` / ``ram``: [{'start', 'end' (exclusive),
    'memtype'}] as recorded, None when they could not be read. Returns
    (types, sources) arrays.
    """
    pa = _u64(pfn) * np.uint64(page_size)
    types = np.full(pa.shape, "unknown", dtype=object)
    source = np.full(pa.shape, "PFN is neither in System RAM nor in the PAT memtype list",
                     dtype=object)
    if ram:
        for r in ram:
            hit = (pa >= np.uint64(r["start"])) & (pa < np.uint64(r["end"]))
            types[hit], source[hit] = "WB", "PFN is System RAM (write-back)"
    if pat_list:
        for r in pat_list:
            hit = (pa >= np.uint64(r["start"])) & (pa < np.uint64(r["end"]))
            types[hit] = PAT_LIST_NAMES.get(r["memtype"], r["memtype"])
            source[hit] = f"PAT memtype list: {r['memtype']}"
    unknown = types == "unknown"
    if pat_list is None:
        source[unknown] = "PFN not in System RAM; PAT memtype list not readable (debugfs)"
        if ram is None:
            source[unknown] = ("neither System RAM ranges nor the PAT memtype list were "
                               "recorded")
    elif ram is None:
        source[unknown] = ("PFN not in the PAT memtype list; System RAM ranges were not "
                           "recorded")
    return types, source


# ---------------------------------------------------------------- who decides
#
# What the final memory type of a guest access is made of, per MMU, and which
# part kvmtrace sees (the spte). Kernel source: arch/x86/kvm/mmu/spte.c
# make_spte(), arch/x86/kvm/vmx/vmx.c vmx_get_mt_mask(), arch/x86/kvm/svm/.
#
# NPT (AMD), 6.1 and 7.x alike: make_spte() ORs a memory type into the spte
# only through kvm_x86_ops.get_mt_mask, which SVM does not implement. 6.1
# gates the call on shadow_memtype_mask (set only by kvm_mmu_set_ept_masks():
# 0 on SVM); 7.x on kvm_x86_ops.get_mt_mask itself ("KVM: x86: remove
# shadow_memtype_mask", merged with the KVM_X86_QUIRK_IGNORE_GUEST_PAT
# series). kallsyms in testbed/x86: no
# svm_get_mt_mask on either kernel, shadow_memtype_mask on 6.1.0-57 only
# (not on 7.3.4). Measured in testbed/x86 on
# 6.1.0-57 and 7.3.4: every NPT leaf KVM installed, RAM or a PCI BAR mapped
# UC- or WC by the host, has PAT:PCD:PWT = 0 (tests/fixtures/x86-tdp). So the
# NPT entry selects host PAT entry 0, WB, which restricts nothing. Under
# nested paging the guest and the host have separate PATs (gPAT: the VMCB's
# G_PAT field; hPAT: the host's IA32_PAT), AMD APM vol. 2 "Nested Paging and
# VMRUN/VMEXIT" as quoted by KVM's nSVM PAT series (Jim Mattson, applied to
# kvm-x86/svm in 2026: commits 4b83e4ba836e "Cache and validate vmcb12 g_pat",
# d65cf222b899 "Save gPAT to vmcb12.g_pat on VMEXIT"). The CPU combines the
# guest's type (guest PTE bits through gPAT) with the host's (the NPT entry's
# bits through hPAT) and then with the host MTRRs of the system-physical
# address (the guest's MTRRs play no part in hardware); with a WB host type
# the guest's type stands. UNVERIFIED: that combining table (APM vol. 2,
# "Combining Guest and Host PAT Types" in the nested paging section) is
# cited from memory. No copy of it was found (2026-12-01: the search tool's
# docs, pages and code corpora have neither the APM section nor a
# hypervisor or emulator source implementing the combination).
# Nothing in kvmtrace computes the combined type; the table is only the
# reason the report calls a WB NPT entry over a UC-/WC VMA "unknown" rather
# than "upgraded". The host VMA's type (UC- from resourceN, WC from
# resourceN_wc) is not carried into the NPT entry: KVM cannot force WB on
# AMD, nor does it force the VMA's type; the guest and the host MTRRs decide.
#
# EPT (Intel): vmx_get_mt_mask() puts the type in bits 5:3 and may set IPAT
# (bit 6: the guest's PAT is ignored). Its branches, 6.1 and 7.x:
#   host MMIO pfn (kvm_is_mmio_pfn())            UC, IPAT clear   both
#   no non-coherent DMA                          WB | IPAT        6.1
#   no non-coherent DMA and quirk
#     KVM_X86_QUIRK_IGNORE_GUEST_PAT on (default) WB | IPAT        7.x
#   non-coherent DMA, guest CR0.CD set           UC|IPAT, or WB (quirk
#                                                CD_NW_CLEARED)   6.1 only
#   non-coherent DMA                             the guest MTRR type of the
#                                                gfn, IPAT clear  6.1
#   non-coherent DMA, or the quirk off           WB, IPAT clear   7.x (6.11+:
#                                                guest MTRRs no longer virtualized)
# Without IPAT the EPT type takes the MTRR's role and combines with the
# guest's PAT (Intel SDM vol. 3, "Memory Type Used for Translated
# Guest-Physical Addresses"): EPT UC lets the guest pick WC (PAT WC over
# MTRR UC gives WC), nothing cacheable; EPT WB leaves the guest's PAT type.

NPT_RULE = ("NPT (6.1, 7.x): KVM sets no memory type in NPT entries (make_spte() adds one "
            "only through kvm_x86_ops.get_mt_mask, which SVM lacks): PAT:PCD:PWT 0 is host PAT "
            "entry 0, WB, which restricts nothing; the final type is the guest's PAT type "
            "combined with it and then with the host MTRRs of the frame (AMD APM vol. 2, nested "
            "paging); the host VMA's type is not carried into the entry, nor can KVM force WB")
NPT_TYPED_RULE = ("NPT: the entry's PAT:PCD:PWT select a host PAT type KVM does not set "
                  "(make_spte() adds none on SVM); the final type is the stricter of it and "
                  "the guest's PAT type, combined with the host MTRRs")
EPT_RULES = {
    ("UC", False): ("EPT: vmx_get_mt_mask(): a host MMIO pfn (kvm_is_mmio_pfn()) is UC with "
                    "IPAT clear (6.1 and 7.x): the guest's PAT can make it WC, never cacheable"),
    ("WB", True): ("EPT: vmx_get_mt_mask(): no non-coherent DMA (7.x: and quirk "
                   "KVM_X86_QUIRK_IGNORE_GUEST_PAT on, its default; 6.1 also: guest CR0.CD with "
                   "quirk CD_NW_CLEARED): WB with IPAT, the guest's PAT is ignored: KVM forces "
                   "write-back"),
    ("WB", False): ("EPT: vmx_get_mt_mask(): WB with IPAT clear: non-coherent DMA (6.11+), or "
                    "quirk KVM_X86_QUIRK_IGNORE_GUEST_PAT off: the guest's PAT decides"),
    ("UC", True): ("EPT: vmx_get_mt_mask(): UC with IPAT: guest CR0.CD set with non-coherent "
                   "DMA and quirk KVM_X86_QUIRK_CD_NW_CLEARED off (kernels before 6.11)"),
}
EPT_GUEST_MTRR_RULE = ("EPT: vmx_get_mt_mask(): the guest's MTRR type of the gfn, IPAT clear "
                       "(non-coherent DMA, kernels before 6.11): combined with the guest's PAT")
SHADOW_RULE = ("shadow paging: KVM puts no memory type in the spte (no get_mt_mask without "
               "EPT): host PAT entry 0, WB, combined with the host MTRRs; the guest's PAT is "
               "not used by the CPU")


def mtrr_words(x86: dict) -> str:
    """The host MTRRs as a report or query states them (recording meta x86)."""
    mtrr = x86.get("mtrr")
    if mtrr is None:
        return "host MTRRs not recorded (" + (x86.get("mtrr_source") or "an older recording") + ")"
    if not mtrr:
        return "host MTRRs: no variable range set (/proc/mtrr; the default type applies)"
    return "host MTRRs (/proc/mtrr, variable ranges; the default type is not shown there): " + \
        ", ".join(f"{r['start']:#x}-{r['end']:#x} {r['memtype']}" for r in mtrr)


def _mtrr_combined(types: list[str]) -> str:
    """The type of a frame several variable MTRRs cover (Intel SDM vol. 3,
    "MTRR Precedences"; AMD APM vol. 2 likewise): UC if any is UC; WT over WB;
    anything else is undefined by the architecture."""
    t = set(types)
    if len(t) == 1:
        return types[0]
    if "UC" in t:
        return "UC"
    if t == {"WT", "WB"}:
        return "WT"
    return "undefined (" + "+".join(sorted(t)) + ")"


# between a rule and what the host MTRRs give the frame (model._x86_rules)
MTRR_SEP = "; host MTRR of the frame: "


def mtrr_of_frames(pfn, mtrr: list[dict], page_size: int = 4096) -> np.ndarray:
    """For each host frame, what the host MTRRs (/proc/mtrr's variable ranges,
    recording meta x86.mtrr) say of it, as a reason states it. Decided once per
    distinct set of covering ranges (at most a few dozen ranges: one mask each)."""
    pa = _u64(pfn) * np.uint64(page_size)
    ranges = mtrr[:62]  # one bit each of an int64 key
    key = np.zeros(pa.shape, dtype=np.int64)
    for i, r in enumerate(ranges):
        key[(pa >= np.uint64(r["start"])) & (pa < np.uint64(r["end"]))] |= np.int64(1) << i
    uniq, inv = np.unique(key, return_inverse=True)
    words = []
    for k in uniq:
        mine = [r for i, r in enumerate(ranges) if (int(k) >> i) & 1]
        words.append(MTRR_SEP[2:] + (
                f"{_mtrr_combined([r['memtype'] for r in mine])} (" + ", ".join(
                    f"{r['start']:#x}-{r['end']:#x} {r['memtype']}" for r in mine) + ")"
                if mine else "no variable range covers it (the MTRR default type, which "
                "/proc/mtrr does not show)"))
    return np.array(words, dtype=object)[inv.reshape(key.shape)]


def installed_words(memtype: str, rules=()) -> str:
    """How a reason says what KVM installed. Under NPT_RULE KVM installed no
    type at all: the entry's zero PAT:PCD:PWT select host PAT entry 0 (WB),
    so "KVM installed WB" would claim a choice KVM did not make."""
    rules = [str(r) for r in rules if r]
    mtrr = sorted({MTRR_SEP[2:] + r.split(MTRR_SEP, 1)[1] for r in rules if MTRR_SEP in r})
    base = [r.split(MTRR_SEP, 1)[0] for r in rules]
    words = (f"the NPT entries carry no memory type (PAT:PCD:PWT 0 selects host PAT entry 0, "
             f"{memtype})" if base and all(r == NPT_RULE for r in base) else
             f"KVM installed {memtype}")
    return "; ".join([words] + mtrr)


MTRR_TYPES = {"UC": 0, "WC": 1, "WT": 4, "WP": 5, "WB": 6}  # arch/x86/include/uapi/asm/mtrr.h


def vmx_get_mt_mask(kernel: str, is_mmio: bool, noncoherent_dma: bool = False,
                    ignore_guest_pat: bool = True, cr0_cd: bool = False,
                    cd_nw_cleared: bool = True, guest_mtrr: str = "WB") -> int:
    """The memory-type bits vmx_get_mt_mask() (arch/x86/kvm/vmx/vmx.c) returns,
    as the source of each kernel reads ('6.1' or '7.x'); see the table above.
    ``is_mmio``: kvm_is_mmio_pfn(pfn) (a reserved page not WB in the host PAT,
    or a frame outside E820 RAM: a PCI BAR); ``noncoherent_dma``:
    kvm_arch_has_noncoherent_dma(); ``ignore_guest_pat``: quirk
    KVM_X86_QUIRK_IGNORE_GUEST_PAT (7.x; default on); ``cr0_cd``,
    ``cd_nw_cleared``, ``guest_mtrr``: the guest's CR0.CD, quirk
    KVM_X86_QUIRK_CD_NW_CLEARED and its MTRR type of the gfn (6.1 only)."""
    wb, uc = MTRR_TYPES["WB"] << EPT_MT_SHIFT, MTRR_TYPES["UC"] << EPT_MT_SHIFT
    if is_mmio:
        return uc
    if kernel == "6.1":
        if not noncoherent_dma:
            return wb | EPT_IPAT
        if cr0_cd:
            return (wb if cd_nw_cleared else uc) | EPT_IPAT
        return MTRR_TYPES[guest_mtrr] << EPT_MT_SHIFT
    if kernel == "7.x":
        if ignore_guest_pat and not noncoherent_dma:
            return wb | EPT_IPAT
        return wb
    raise ValueError(f"vmx_get_mt_mask of kernel {kernel!r} not transcribed (6.1, 7.x)")


def mmu_kind(kvm_meta: dict | None) -> str:
    """'npt', 'ept' or 'shadow' from the recording's meta['kvm']."""
    kvm = kvm_meta or {}
    if kvm.get("spte_format") == "ept" or kvm.get("mmu") == "ept":
        return "ept"
    if kvm.get("mmu") == "npt":
        return "npt"
    return "shadow"


def guest_pat_combines(spte, mmu: str) -> np.ndarray:
    """True where the CPU combines the guest's PAT type with the spte's type:
    every NPT entry; an EPT entry without IPAT; never under shadow paging."""
    spte = _u64(spte)
    if mmu == "npt":
        return np.ones(spte.shape, bool)
    if mmu == "ept":
        return ~ept_ipat(spte)
    return np.zeros(spte.shape, bool)


def kvm_rules(spte, level, mmu: str, pat=LINUX_PAT) -> np.ndarray:
    """The kernel rule behind each installed spte's memory type (text)."""
    spte = _u64(spte)
    out = np.empty(spte.shape, dtype=object)
    if mmu == "ept":
        mt = spte_memtype(spte, level, "ept")
        ipat = ept_ipat(spte)
        for i, (m, p) in enumerate(zip(mt.reshape(-1), ipat.reshape(-1))):
            out.reshape(-1)[i] = EPT_RULES.get((m, bool(p)), EPT_GUEST_MTRR_RULE if not p
                                               else f"EPT: {m} with IPAT (no vmx_get_mt_mask() "
                                               "branch of 6.1 / 7.x gives it)")
        return out
    if mmu == "npt":
        idx = legacy_pat_index(spte, level)
        out[...] = NPT_RULE
        out[idx != 0] = NPT_TYPED_RULE
        return out
    out[...] = SHADOW_RULE
    return out


def combined_verdicts(vma_mt, spte_mt, combines, verdict, mmu: str = "npt") -> np.ndarray:
    """``verdict`` (compare_memtypes: VMA type vs spte type) where the guest's
    PAT is combined with the spte's type (``combines``, guest_pat_combines):

    - the spte's type is less strict than the VMA's ("upgraded" by the bare
      comparison: an NPT entry's WB against a UC- / WC BAR): unknown. The
      entry does not make the memory cacheable; it leaves the type to the
      guest's PAT (and, on NPT, the host MTRRs), which kvmtrace does not see;
    - an EPT UC entry without IPAT against a WC VMA: unknown, the guest can
      pick WC or UC (not "downgraded": WC is open to it).
    A stricter spte type than the VMA's stays "downgraded" (the guest cannot
    relax it), an equal one "consistent"."""
    out = np.array(verdict, dtype=object, copy=True)
    vma = pd.Series(vma_mt, dtype=object).to_numpy()
    spte = pd.Series(spte_mt, dtype=object).to_numpy()
    c = np.asarray(combines, bool)
    out[c & (out == "upgraded")] = "unknown"
    if mmu == "ept":
        out[c & (out == "downgraded") & (vma == "WC") & (spte == "UC")] = "unknown"
    return out
