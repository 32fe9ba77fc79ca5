"""arm64 memory types: MAIR AttrIndx of a VMA's vm_page_prot, KVM's stage-2
``enum kvm_pgtable_prot``, the vm_flags bits KVM reads, and the rules by which
KVM turns a VMA into a stage-2 memory type (or refuses it).

Every table carries the kernel versions it holds for. "verified" means read in
that version's source (Debian linux-source 6.1.192, 6.12.118, 7.3.4) or in the
BTF of that version's Debian arm64 kernel (6.1.192, 6.19.14, 7.0.13, 7.1.13,
7.2.13, 7.3.4); "inferred" means the boundary comes from the upstream commit /
pull-request history. docs/arm64-probe-points.md lists the citations.

- VMA side: vm_page_prot bits [4:2] (PTE_ATTRINDX_MASK = 7 << 2,
  arch/arm64/include/asm/pgtable-hwdef.h, same in 6.1 .. 7.3) index MAIR_EL1;
  the MT_* index -> type table (arch/arm64/include/asm/memory.h) changed in
  5.10 (MTE: "MT_NORMAL must be index 0") and in 5.14 (Normal-WT and
  Device-GRE removed). From 5.14 to 7.3: 0 Normal, 1 Normal-Tagged,
  2 Normal-NC, 3 Device-nGnRnE, 4 Device-nGnRE.
- Stage-2 side: ``enum kvm_pgtable_prot`` (arch/arm64/include/asm/
  kvm_pgtable.h): X=1 W=2 R=4 DEVICE=8 (6.1), NORMAL_NC=16 added in 6.9,
  then from 6.19 X split into PX=1/UX=2 (X=3) and W=4 R=8 DEVICE=16
  NORMAL_NC=32. Decode with the enum read from the running kernel's BTF
  (recordings store it); the per-version table is only a fallback. Android
  GKI kernels carry different bits (PXN/UXN/NC at 5/6/4): trust BTF.
- Rules: before 6.17 any pfn that is not kernel memory (!pfn_is_map_memory)
  is mapped Device (Normal-NC with VM_ALLOW_ANY_UNCACHED from 6.9) whatever
  the VMA says; from 6.17 (series "KVM: arm64: Map GPU device memory as
  cacheable") only VM_PFNMAP/VM_MIXEDMAP non-kernel pfns are special, and a
  cacheable VMA is mapped Normal when the CPU has S2FWB and CTR_EL0.DIC, else
  refused (-EFAULT at fault, -EINVAL at memslot creation).
"""

from __future__ import annotations

import errno as _errno
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kvmtrace.memtype import CACHEABLE

# --------------------------------------------------------------------------
# Kernel versions

def parse_version(v) -> tuple[int, int, int]:
    """'6.1.0-56-arm64', '7.3.4+deb13-arm64', (6, 17) or '6.17' -> (6, 17, 0)."""
    if isinstance(v, (tuple, list)):
        parts = [int(x) for x in v][:3]
    else:
        m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(v))
        if not m:
            raise ValueError(f"not a kernel version: {v!r}")
        parts = [int(x) for x in m.groups() if x is not None]
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def _in_range(v, first, last) -> bool:
    """first/last are (major, minor) release bounds, inclusive; None = open."""
    mm = parse_version(v)[:2]
    return (first is None or mm >= tuple(first)) and (last is None or mm <= tuple(last))


# --------------------------------------------------------------------------
# VMA side: AttrIndx of vm_page_prot

PTE_ATTRINDX_SHIFT = 2
PTE_ATTRINDX_MASK = 0x7 << PTE_ATTRINDX_SHIFT   # pgtable-hwdef.h, 6.1 .. 7.3
PTE_PXN = 1 << 53
PTE_UXN = 1 << 54

# Names the shared CACHEABLE table doesn't carry (only pre-5.14 kernels use
# them): Normal write-through is cacheable, Device-GRE is not.


@dataclass(frozen=True)
class MairTable:
    first: tuple | None      # first release (major, minor) it holds for
    last: tuple | None       # last release, None = still current
    names: tuple             # AttrIndx 0..7 -> name ("unused(N)" if no MT_*)
    source: str


MAIR_TABLES = (
    MairTable(None, (5, 9),
              ("Device-nGnRnE", "Device-nGnRE", "Device-GRE", "Normal-NC", "Normal",
               "Normal-WT", "unused(6)", "unused(7)"),
              "arch/arm64/include/asm/memory.h before 5.10 (inferred: the 5.10 MTE "
              "patch 'arm64: mte: Add PROT_MTE support to mmap() and mprotect()' "
              "shows these as removed lines)"),
    MairTable((5, 10), (5, 13),
              ("Normal", "Normal-Tagged", "Normal-NC", "Normal-WT", "Device-nGnRnE",
               "Device-nGnRE", "Device-GRE", "unused(7)"),
              "arch/arm64/include/asm/memory.h 5.10-5.13 (torvalds/linux copy with "
              "BPF_JIT_REGION; MTE reorder merged for 5.10)"),
    MairTable((5, 14), None,
              ("Normal", "Normal-Tagged", "Normal-NC", "Device-nGnRnE", "Device-nGnRE",
               "unused(5)", "unused(6)", "unused(7)"),
              "arch/arm64/include/asm/memory.h, verified 6.1.192, 6.12.118, 7.3.4 "
              "(Normal-WT/Device-GRE removed by Will Deacon, 2021-06, v5.14)"),
)

# kvm_vma_is_cacheable() (arch/arm64/kvm/mmu.c, 6.17+): false exactly for these.
KVM_NONCACHEABLE_VMA_TYPES = frozenset({"Normal-NC", "Device-nGnRnE", "Device-nGnRE"})


def mair_table(kernel_version) -> MairTable:
    for t in MAIR_TABLES:
        if _in_range(kernel_version, t.first, t.last):
            return t
    raise ValueError(f"no MAIR table for {kernel_version!r}")


def attrindx(pgprot_values) -> np.ndarray:
    """AttrIndx (0..7) of an array of pgprot / PTE values."""
    v = np.asarray(pgprot_values, dtype=np.uint64)
    return ((v >> np.uint64(PTE_ATTRINDX_SHIFT)) & np.uint64(0x7)).astype(np.int64)


def attrindx_memtype(pgprot_values, kernel_version) -> np.ndarray:
    """Memory-type names (object array) for vm_page_prot values."""
    names = np.array(mair_table(kernel_version).names, dtype=object)
    return names[attrindx(pgprot_values)]


def memtype_cacheable(name):
    """True / False, or None for a name no table knows."""
    return CACHEABLE.get(name)


def kvm_vma_is_cacheable(vma_memtype) -> bool:
    """Mirror of kvm_vma_is_cacheable(): everything but NC / Device-nGnR(n)E
    counts as cacheable, including Normal-Tagged and unused indices."""
    return vma_memtype not in KVM_NONCACHEABLE_VMA_TYPES


# --------------------------------------------------------------------------
# vm_flags bits (include/linux/mm.h)

@dataclass(frozen=True)
class FlagBit:
    name: str
    bit: int
    first: tuple | None
    last: tuple | None
    source: str


VM_FLAG_BITS = (
    FlagBit("VM_SHARED", 3, None, None, "mm.h 0x8, 6.1 .. 7.3 (VMA_SHARED_BIT 3)"),
    FlagBit("VM_PFNMAP", 10, None, None, "mm.h 0x400, 6.1 .. 7.3 (VMA_PFNMAP_BIT 10 in BTF 6.19-7.3)"),
    FlagBit("VM_IO", 14, None, None, "mm.h 0x4000, 6.1 .. 7.3 (VMA_IO_BIT 14)"),
    FlagBit("VM_MIXEDMAP", 28, None, None, "mm.h 0x10000000, 6.1 .. 7.3 (VMA_MIXEDMAP_BIT 28)"),
    FlagBit("VM_MTE", 32, (5, 10), (6, 11), "VM_HIGH_ARCH_0; verified 6.1.192"),
    FlagBit("VM_MTE_ALLOWED", 33, (5, 10), (6, 11), "VM_HIGH_ARCH_1; verified 6.1.192"),
    FlagBit("VM_MTE", 36, (6, 12), None,
            "VM_HIGH_ARCH_4 (moved for arm64 POE, Joey Gouly); verified 6.12.118, BTF 6.19-7.3"),
    FlagBit("VM_MTE_ALLOWED", 37, (6, 12), None,
            "VM_HIGH_ARCH_5; verified 6.12.118, BTF 6.19-7.3"),
    FlagBit("VM_ALLOW_ANY_UNCACHED", 39, (6, 9), None,
            "VM_ALLOW_ANY_UNCACHED_BIT 39 (64-bit only), set by vfio-pci mmap; "
            "verified 6.12.118, 7.3.4, BTF 6.19-7.3; absent in 6.1"),
)


def vm_flag_bits(kernel_version) -> dict:
    """Flag name -> mask for this kernel (flags it lacks are left out)."""
    return {f.name: 1 << f.bit for f in VM_FLAG_BITS
            if _in_range(kernel_version, f.first, f.last)}


def vm_flags_decode(vm_flags, kernel_version) -> dict:
    """Flag name -> bool array for an array of vm_flags values."""
    v = np.asarray(vm_flags, dtype=np.uint64)
    return {n: (v & np.uint64(m)) != 0 for n, m in vm_flag_bits(kernel_version).items()}


# --------------------------------------------------------------------------
# Stage-2 side: enum kvm_pgtable_prot

_SW_BITS = {"SW0": 1 << 55, "SW1": 1 << 56, "SW2": 1 << 57, "SW3": 1 << 58}


@dataclass(frozen=True)
class ProtTable:
    first: tuple | None
    last: tuple | None
    values: dict
    source: str


KVM_PGTABLE_PROT_TABLES = (
    ProtTable((5, 10), (6, 8), {"X": 1, "W": 2, "R": 4, "DEVICE": 8, **_SW_BITS},
              "kvm_pgtable.h; verified 6.1.192 (source and BTF); 5.10-6.0 assumed "
              "(enum introduced with the 5.10 kvm_pgtable rework)"),
    ProtTable((6, 9), (6, 18), {"X": 1, "W": 2, "R": 4, "DEVICE": 8, "NORMAL_NC": 16, **_SW_BITS},
              "kvm_pgtable.h; verified 6.12.118; NORMAL_NC from 'KVM: arm64: Set io "
              "memory s2 pte as normalnc for vfio pci device' (v6.9, inferred)"),
    ProtTable((6, 19), None, {"PX": 1, "UX": 2, "X": 3, "W": 4, "R": 8, "DEVICE": 16,
                              "NORMAL_NC": 32, **_SW_BITS},
              "kvm_pgtable.h; verified BTF 6.19.14, 7.0.13, 7.1.13, 7.2.13, 7.3.4 and "
              "source 7.3.4 (FEAT_XNX series, Oliver Upton, 2025-11)"),
)

# The measured values (host-facts, emulated arm64 host): 6.1 RAM data 0x6,
# code 0x7, BAR 0xe; 7.3.4 RAM 0xf, BAR 0x1c.


def prot_table(kernel_version) -> ProtTable | None:
    for t in KVM_PGTABLE_PROT_TABLES:
        if _in_range(kernel_version, t.first, t.last):
            return t
    return None


def normalize_prot_enum(enum_values: dict) -> dict:
    """{'KVM_PGTABLE_PROT_R': 8, ...} or {'R': 8, ...} -> {'R': 8, ...}."""
    out = {}
    for k, v in enum_values.items():
        out[k[len("KVM_PGTABLE_PROT_"):] if k.startswith("KVM_PGTABLE_PROT_") else k] = int(v)
    return out


class Stage2Prot(NamedTuple):
    memtype: np.ndarray   # "Device" (nGnRE), "Normal-NC", "Normal", or "invalid"
    r: np.ndarray
    w: np.ndarray
    x: np.ndarray         # any execute bit (X, or PX|UX)
    px: np.ndarray | None  # privileged / unprivileged exec where the enum splits them
    ux: np.ndarray | None
    valid: np.ndarray     # False where stage2_set_prot_attr() would return -EINVAL
    enum_source: str


def stage2_prot_decode(prot_array, enum_values: dict | None = None,
                       kernel_version=None) -> Stage2Prot:
    """Decode kvm_pgtable_stage2_map()'s prot argument.

    enum_values is ``enum kvm_pgtable_prot`` as read from the recording's BTF;
    the per-version table is used only when it is missing. Invalid
    combinations are the ones arch/arm64/kvm/hyp/pgtable.c
    stage2_set_prot_attr() refuses: DEVICE|NORMAL_NC, and X with either.
    """
    if enum_values:
        vals, source = normalize_prot_enum(enum_values), "BTF enum kvm_pgtable_prot"
    else:
        if kernel_version is None:
            raise ValueError("need enum_values or kernel_version")
        t = prot_table(kernel_version)
        if t is None:
            raise ValueError(f"no kvm_pgtable_prot table for {kernel_version!r}")
        vals, source = t.values, f"table: {t.source}"
    p = np.asarray(prot_array, dtype=np.uint64)

    def bit(name):
        m = vals.get(name)
        return None if m is None else (p & np.uint64(m)) != 0

    r, w = bit("R"), bit("W")
    px, ux = bit("PX"), bit("UX")
    x_mask = vals.get("X") or (vals.get("PX", 0) | vals.get("UX", 0))
    x = (p & np.uint64(x_mask)) != 0
    dev = bit("DEVICE")
    nc = bit("NORMAL_NC")
    if nc is None:
        nc = np.zeros(p.shape, dtype=bool)
    memtype = np.full(p.shape, "Normal", dtype=object)
    memtype[nc] = "Normal-NC"
    memtype[dev] = "Device"
    both = dev & nc
    memtype[both] = "invalid"
    valid = ~both & ~((dev | nc) & x)
    return Stage2Prot(memtype, r, w, x, px, ux, valid, source)


# --------------------------------------------------------------------------
# KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED

from ..kvmapi import KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED  # noqa: E402

KVM_CAP_ARM_CACHEABLE_PFNMAP_NOTE = (
    "include/uapi/linux/kvm.h (6.17+, verified 7.3.4): 243. On a VM fd "
    "KVM_CHECK_EXTENSION returns kvm_supports_cacheable_pfnmap() = "
    "cpus_have_final_cap(ARM64_HAS_STAGE2_FWB) && cpus_have_final_cap("
    "ARM64_HAS_CACHE_DIC) (arch/arm64/include/asm/kvm_mmu.h); on /dev/kvm it "
    "returns -EINVAL (arch/arm64/kvm/arm.c kvm_vm_ioctl_check_extension, 7.3.4). "
    "Kernels before 6.17 don't know the cap: 0.")


# --------------------------------------------------------------------------
# Memslot / fault rules

@dataclass(frozen=True)
class Rule:
    id: str
    first: tuple | None        # first release (major, minor), None = older than we track
    last: tuple | None         # last release, None = still current
    where: str                 # function (arch/arm64/kvm/mmu.c unless said)
    errno: int                 # 0 = maps; errno the function returns otherwise
    stage2: str | None         # stage-2 memory type when it maps
    words: str                 # for reports


CACHEABLE_PFNMAP_FIRST = (6, 17)   # series merged for v6.17 (kvmarm next 2025-07-07)
NORMAL_NC_FIRST = (6, 9)
MTE_ALLOWED_FIRST = (6, 2)         # assumed, see the rule's words

RULES = {r.id: r for r in (
    Rule("ram", None, None, "user_mem_abort", 0, "Normal",
         "kernel memory (struct page in the linear map): mapped Normal cacheable"),
    Rule("device_pfn_forced", None, (6, 16), "user_mem_abort (kvm_is_device_pfn)", 0, "Device",
         "PFNMAP forced to Device: kernel before the cacheable-PFNMAP rules maps every "
         "pfn that is not kernel memory (!pfn_is_map_memory) as Device-nGnRE, whatever "
         "the VMA's memory type"),
    Rule("device_pfn_normal_nc", NORMAL_NC_FIRST, (6, 16), "user_mem_abort", 0, "Normal-NC",
         "pfn not kernel memory, VMA has VM_ALLOW_ANY_UNCACHED (vfio-pci): mapped "
         "Normal-NC whatever the VMA's memory type (6.9-6.16)"),
    Rule("exec_on_device", None, (6, 16), "user_mem_abort -> kvm_handle_guest_abort", _errno.ENOEXEC,
         None, "instruction fetch from a device pfn: user_mem_abort returns -ENOEXEC and "
         "kvm_handle_guest_abort injects a prefetch abort into the guest (KVM_RUN does "
         "not fail)"),
    Rule("cacheable_pfnmap", CACHEABLE_PFNMAP_FIRST, None, "user_mem_abort / kvm_s2_fault_pin_pfn",
         0, "Normal",
         "cacheable VM_PFNMAP/VM_MIXEDMAP pfn (no kernel mapping) mapped Normal cacheable: "
         "CPU has S2FWB and CTR_EL0.DIC (kvm_supports_cacheable_pfnmap)"),
    Rule("cacheable_pfnmap_refused", CACHEABLE_PFNMAP_FIRST, None,
         "user_mem_abort / kvm_s2_fault_pin_pfn", _errno.EFAULT, None,
         "cacheable VM_PFNMAP/VM_MIXEDMAP pfn refused: CPU lacks S2FWB or CTR_EL0.DIC "
         "(!kvm_supports_cacheable_pfnmap); the fault returns -EFAULT and KVM_RUN fails "
         "with EFAULT"),
    Rule("force_noncacheable_device", CACHEABLE_PFNMAP_FIRST, None,
         "user_mem_abort (s2_force_noncacheable / map_non_cacheable)", 0, "Device",
         "non-cacheable VMA (Normal-NC or Device) over a PFNMAP/MIXEDMAP pfn: "
         "s2_force_noncacheable, mapped Device-nGnRE"),
    Rule("force_noncacheable_nc", CACHEABLE_PFNMAP_FIRST, None,
         "user_mem_abort (s2_force_noncacheable / map_non_cacheable)", 0, "Normal-NC",
         "non-cacheable VMA over a PFNMAP/MIXEDMAP pfn with VM_ALLOW_ANY_UNCACHED: "
         "s2_force_noncacheable, mapped Normal-NC"),
    Rule("exec_on_force_noncacheable", CACHEABLE_PFNMAP_FIRST, None,
         "user_mem_abort / kvm_s2_fault_compute_prot -> kvm_handle_guest_abort",
         _errno.ENOEXEC, None,
         "instruction fetch from force-noncacheable memory: -ENOEXEC, turned into an "
         "instruction abort injected into the guest (KVM_RUN does not fail)"),
    Rule("mte_shared_fault", None, (6, 1), "user_mem_abort", _errno.EFAULT, None,
         "MTE enabled VM and a VM_SHARED VMA: -EFAULT (6.1: 'Check the VMM hasn't "
         "introduced a new VM_SHARED VMA')"),
    Rule("mte_not_allowed_fault", MTE_ALLOWED_FIRST, None, "user_mem_abort", _errno.EFAULT, None,
         "MTE enabled VM and a VMA without VM_MTE_ALLOWED: -EFAULT (verified 6.12.118, "
         "7.3.4; the change from the VM_SHARED test is assumed to be v6.2)"),
    Rule("unknown", None, None, "-", 0, None,
         "unknown: an input the rule needs was not observed"),
    # memslot creation (kvm_arch_prepare_memory_region)
    Rule("memslot_ok", None, None, "kvm_arch_prepare_memory_region", 0, None,
         "memslot accepted"),
    Rule("memslot_outside_ipa", None, None, "kvm_arch_prepare_memory_region", _errno.EFAULT, None,
         "memslot ends beyond the VM's IPA space: -EFAULT"),
    Rule("memslot_pfnmap_dirty_log", None, None, "kvm_arch_prepare_memory_region", _errno.EINVAL,
         None, "VM_PFNMAP VMA in a memslot with KVM_MEM_LOG_DIRTY_PAGES: -EINVAL"),
    Rule("memslot_mte_shared", None, (6, 1), "kvm_arch_prepare_memory_region", _errno.EINVAL,
         None, "MTE enabled VM and a VM_SHARED VMA in the memslot: -EINVAL"),
    Rule("memslot_mte_not_allowed", MTE_ALLOWED_FIRST, None, "kvm_arch_prepare_memory_region",
         _errno.EINVAL, None,
         "MTE enabled VM and a VMA without VM_MTE_ALLOWED in the memslot: -EINVAL"),
    Rule("memslot_cacheable_pfnmap", CACHEABLE_PFNMAP_FIRST, None, "kvm_arch_prepare_memory_region",
         _errno.EINVAL, None,
         "cacheable VM_PFNMAP VMA in a memslot on a CPU without S2FWB + CTR_EL0.DIC: -EINVAL "
         "(checked for every VM_PFNMAP VMA, even one over RAM)"),
)}


def rule_applies(rule_id: str, kernel_version) -> bool:
    r = RULES[rule_id]
    return _in_range(kernel_version, r.first, r.last)


def _result(rule_id):
    r = RULES[rule_id]
    return (r.stage2, r.errno, r.words)


def expected_stage2(kernel_version, vma_memtype, vm_flags, pfn_is_ram, cpu_fwb, cpu_dic,
                    exec_fault, *, mte_enabled=False, perm_fault=False):
    """What KVM installs at stage 2 for one guest fault.

    vma_memtype: attrindx_memtype() name of the VMA (None if not observed);
    vm_flags: the VMA's vm_flags (int); pfn_is_ram: pfn_is_map_memory(pfn),
    i.e. the pfn has a kernel linear-map alias (None if not observed);
    cpu_fwb / cpu_dic: ARM64_HAS_STAGE2_FWB / ARM64_HAS_CACHE_DIC (None if
    unknown). Returns (stage-2 memtype or None, errno or 0, words).
    Mirrors arch/arm64/kvm/mmu.c user_mem_abort() of 6.1.192 / 6.12.118 and,
    from 6.17, of the cacheable-PFNMAP series (7.3.4: kvm_s2_fault_pin_pfn /
    kvm_s2_fault_compute_prot).
    """
    bits = vm_flag_bits(kernel_version)
    flags = int(vm_flags)
    allow_uc = bool(flags & bits.get("VM_ALLOW_ANY_UNCACHED", 0))
    v = parse_version(kernel_version)[:2]
    if pfn_is_ram is None:
        return (None, 0, RULES["unknown"].words + " (is the pfn kernel memory?)")

    if v < CACHEABLE_PFNMAP_FIRST:
        if not pfn_is_ram:
            if exec_fault:
                return _result("exec_on_device")
            if allow_uc and rule_applies("device_pfn_normal_nc", v):
                return _result("device_pfn_normal_nc")
            stage2, err, words = _result("device_pfn_forced")
            if vma_memtype is not None:
                words += f" (VMA: {vma_memtype})"
            return stage2, err, words
        return _mte_or_ram(v, flags, bits, mte_enabled, perm_fault)

    special = flags & (bits["VM_PFNMAP"] | bits["VM_MIXEDMAP"])
    if special and not pfn_is_ram:
        if vma_memtype is None:
            return (None, 0, RULES["unknown"].words + " (VMA memory type)")
        if kvm_vma_is_cacheable(vma_memtype):
            if cpu_fwb is None or cpu_dic is None:
                return (None, 0, RULES["unknown"].words + " (CPU S2FWB / CTR_EL0.DIC)")
            if not (cpu_fwb and cpu_dic):
                return _result("cacheable_pfnmap_refused")
            stage2, err, words = _mte_or_ram(v, flags, bits, mte_enabled, perm_fault)
            if err:
                return stage2, err, words
            return _result("cacheable_pfnmap")
        if exec_fault:
            return _result("exec_on_force_noncacheable")
        return _result("force_noncacheable_nc" if allow_uc else "force_noncacheable_device")
    return _mte_or_ram(v, flags, bits, mte_enabled, perm_fault)


def _mte_or_ram(v, flags, bits, mte_enabled, perm_fault):
    if mte_enabled and not perm_fault:
        if v < MTE_ALLOWED_FIRST:
            if flags & bits["VM_SHARED"]:
                return _result("mte_shared_fault")
        elif not flags & bits.get("VM_MTE_ALLOWED", 0):
            return _result("mte_not_allowed_fault")
    return _result("ram")


def expected_memslot(kernel_version, vmas, cpu_fwb, cpu_dic, *, mte_enabled=False,
                     dirty_logging=False, beyond_ipa=False):
    """Whether kvm_arch_prepare_memory_region accepts a memslot.

    vmas: (vma_memtype, vm_flags) of every VMA the slot's hva range meets,
    in address order (the kernel walks them with find_vma_intersection and
    stops at the first refusal). Returns (errno or 0, words). Verified
    against 6.1.192, 6.12.118 and 7.3.4 (pKVM and guest_memfd checks left out).
    """
    v = parse_version(kernel_version)[:2]
    bits = vm_flag_bits(v)
    if beyond_ipa:
        return RULES["memslot_outside_ipa"].errno, RULES["memslot_outside_ipa"].words
    for vma_memtype, vm_flags in vmas:
        flags = int(vm_flags)
        if mte_enabled:
            if v < MTE_ALLOWED_FIRST:
                if flags & bits["VM_SHARED"]:
                    r = RULES["memslot_mte_shared"]
                    return r.errno, r.words
            elif not flags & bits.get("VM_MTE_ALLOWED", 0):
                r = RULES["memslot_mte_not_allowed"]
                return r.errno, r.words
        if flags & bits["VM_PFNMAP"]:
            if dirty_logging:
                r = RULES["memslot_pfnmap_dirty_log"]
                return r.errno, r.words
            if v >= CACHEABLE_PFNMAP_FIRST:
                if vma_memtype is None or cpu_fwb is None or cpu_dic is None:
                    return 0, RULES["unknown"].words + " (VMA memory type or CPU features)"
                if kvm_vma_is_cacheable(vma_memtype) and not (cpu_fwb and cpu_dic):
                    r = RULES["memslot_cacheable_pfnmap"]
                    return r.errno, r.words
    return 0, RULES["memslot_ok"].words


def rules_table(kernel_version=None) -> list[dict]:
    """The rules as rows (for reports / docs), optionally only those in force."""
    rows = []
    for r in RULES.values():
        if kernel_version is not None and not _in_range(kernel_version, r.first, r.last):
            continue
        first = ".".join(map(str, r.first)) if r.first else None
        last = ".".join(map(str, r.last)) if r.last else None
        rng = (f"{first}-{last}" if first and last else f">={first}" if first
               else f"<={last}" if last else "all")
        rows.append({"id": r.id, "kernels": rng, "where": r.where, "stage2": r.stage2,
                     "errno": (_errno.errorcode.get(r.errno, r.errno) if r.errno else 0),
                     "words": r.words})
    return rows
