"""arm64 memory-type decoders and KVM stage-2 rules (kvmtrace.memtype.arm64).

Values come from the emulated arm64 host (shared/notes/host-facts.md: 6.1 RAM
data 0x6, code 0x7, BAR 0xe; 7.3.4 RAM 0xf, BAR 0x1c) and from the kernel
sources / Debian arm64 kernel BTF cited in docs/arm64-probe-points.md.
"""

import errno

import numpy as np
import pytest

from kvmtrace.memtype import CACHEABLE
from kvmtrace.memtype import arm64 as a

# enum kvm_pgtable_prot as read from the BTF of Debian's arm64 kernels.
ENUM_61 = {"KVM_PGTABLE_PROT_X": 0x1, "KVM_PGTABLE_PROT_W": 0x2, "KVM_PGTABLE_PROT_R": 0x4,
           "KVM_PGTABLE_PROT_DEVICE": 0x8, "KVM_PGTABLE_PROT_SW0": 1 << 55,
           "KVM_PGTABLE_PROT_SW1": 1 << 56, "KVM_PGTABLE_PROT_SW2": 1 << 57,
           "KVM_PGTABLE_PROT_SW3": 1 << 58}
ENUM_73 = {"KVM_PGTABLE_PROT_PX": 0x1, "KVM_PGTABLE_PROT_UX": 0x2, "KVM_PGTABLE_PROT_X": 0x3,
           "KVM_PGTABLE_PROT_W": 0x4, "KVM_PGTABLE_PROT_R": 0x8,
           "KVM_PGTABLE_PROT_DEVICE": 0x10, "KVM_PGTABLE_PROT_NORMAL_NC": 0x20,
           "KVM_PGTABLE_PROT_SW0": 1 << 55, "KVM_PGTABLE_PROT_SW1": 1 << 56,
           "KVM_PGTABLE_PROT_SW2": 1 << 57, "KVM_PGTABLE_PROT_SW3": 1 << 58}

PFNMAP, IO, MIXEDMAP, SHARED = 0x400, 0x4000, 0x10000000, 0x8
ALLOW_UC = 1 << 39
# vfio-pci mmap: VM_ALLOW_ANY_UNCACHED | VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP
VFIO_FLAGS = ALLOW_UC | IO | PFNMAP | 0x40000 | 0x4000000
SYSFS_BAR_FLAGS = IO | PFNMAP | 0x40000 | 0x4000000      # resource2 / resource2_wc


# ---------------------------------------------------------------- versions

@pytest.mark.parametrize("s,want", [
    ("6.1.0-56-arm64", (6, 1, 0)), ("7.3.4+deb13-arm64", (7, 3, 4)), ("6.17", (6, 17, 0)),
    ((6, 12), (6, 12, 0)), ("6.19.14+deb13-arm64", (6, 19, 14)),
])
def test_parse_version(s, want):
    assert a.parse_version(s) == want


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError):
        a.parse_version("arm64")


# ---------------------------------------------------------------- AttrIndx

def _pgprot(idx, extra=0x0060000000000f43):
    """A user vm_page_prot with AttrIndx idx (PXN|UXN, AF, SH, nG bits set)."""
    return (extra & ~a.PTE_ATTRINDX_MASK) | (idx << a.PTE_ATTRINDX_SHIFT)


def test_attrindx_bits():
    assert a.PTE_ATTRINDX_SHIFT == 2 and a.PTE_ATTRINDX_MASK == 0x1c
    v = np.array([_pgprot(i) for i in range(8)], dtype=np.uint64)
    assert list(a.attrindx(v)) == list(range(8))


@pytest.mark.parametrize("ver", ["6.1.0-56-arm64", "6.12.118", "6.17.13", "7.3.4+deb13-arm64"])
def test_attrindx_current_layout(ver):
    got = a.attrindx_memtype([_pgprot(i) for i in range(5)], ver)
    assert list(got) == ["Normal", "Normal-Tagged", "Normal-NC", "Device-nGnRnE",
                         "Device-nGnRE"]


def test_attrindx_5_10_to_5_13_layout():
    got = a.attrindx_memtype([_pgprot(i) for i in range(7)], "5.10.0")
    assert list(got) == ["Normal", "Normal-Tagged", "Normal-NC", "Normal-WT",
                         "Device-nGnRnE", "Device-nGnRE", "Device-GRE"]
    assert a.attrindx_memtype([_pgprot(3)], "5.13")[0] == "Normal-WT"


def test_attrindx_pre_5_10_device_first():
    got = a.attrindx_memtype([_pgprot(i) for i in range(6)], "5.4.0")
    assert list(got) == ["Device-nGnRnE", "Device-nGnRE", "Device-GRE", "Normal-NC",
                         "Normal", "Normal-WT"]


def test_pgprot_helpers_of_the_kernel():
    # arch/arm64/include/asm/pgtable.h (7.3.4): pgprot_noncached = Device-nGnRnE,
    # pgprot_device = Device-nGnRE, pgprot_writecombine = Normal-NC.
    base = 0x0040000000000fc3      # PROT_NORMAL-like user page, AttrIndx 0
    names = a.attrindx_memtype([base | (3 << 2), base | (4 << 2), base | (2 << 2), base],
                               "7.3.4")
    assert list(names) == ["Device-nGnRnE", "Device-nGnRE", "Normal-NC", "Normal"]


def test_names_are_known_to_cacheable_table():
    for t in a.MAIR_TABLES:
        for n in t.names:
            if n.startswith("unused"):
                assert a.memtype_cacheable(n) is None
            else:
                assert a.memtype_cacheable(n) is not None, n
    for n in ("Normal", "Normal-Tagged", "Normal-NC", "Device-nGnRnE", "Device-nGnRE",
              "Device"):
        assert n in CACHEABLE
    assert a.memtype_cacheable("Normal-WT") is True
    assert a.memtype_cacheable("Device-GRE") is False


def test_kvm_vma_is_cacheable_mirrors_kernel():
    # kvm_vma_is_cacheable(): false only for MT_NORMAL_NC, MT_DEVICE_nGnRnE, MT_DEVICE_nGnRE
    assert a.kvm_vma_is_cacheable("Normal")
    assert a.kvm_vma_is_cacheable("Normal-Tagged")
    assert a.kvm_vma_is_cacheable("unused(5)")
    for n in ("Normal-NC", "Device-nGnRnE", "Device-nGnRE"):
        assert not a.kvm_vma_is_cacheable(n)


# ---------------------------------------------------------------- vm_flags

def test_vm_flag_bits_per_version():
    b61 = a.vm_flag_bits("6.1.0-56-arm64")
    assert b61["VM_PFNMAP"] == 0x400 and b61["VM_IO"] == 0x4000
    assert b61["VM_MIXEDMAP"] == 0x10000000
    assert b61["VM_MTE"] == 1 << 32 and b61["VM_MTE_ALLOWED"] == 1 << 33
    assert "VM_ALLOW_ANY_UNCACHED" not in b61
    b612 = a.vm_flag_bits("6.12.118")
    assert b612["VM_MTE"] == 1 << 36 and b612["VM_MTE_ALLOWED"] == 1 << 37
    assert b612["VM_ALLOW_ANY_UNCACHED"] == 1 << 39
    b73 = a.vm_flag_bits("7.3.4")
    assert b73["VM_MTE_ALLOWED"] == 1 << 37 and b73["VM_ALLOW_ANY_UNCACHED"] == 1 << 39
    assert a.vm_flag_bits("6.9")["VM_ALLOW_ANY_UNCACHED"] == 1 << 39
    assert "VM_ALLOW_ANY_UNCACHED" not in a.vm_flag_bits("6.8")


def test_vm_flags_decode_vectorised():
    # [vvar]-like VM_PFNMAP|VM_IO flags as measured on x86 (0x4044411), vfio, plain anon
    d = a.vm_flags_decode([0x4044411, VFIO_FLAGS, 0x100073], "7.3.4")
    assert list(d["VM_PFNMAP"]) == [True, True, False]
    assert list(d["VM_IO"]) == [True, True, False]
    assert list(d["VM_ALLOW_ANY_UNCACHED"]) == [False, True, False]


# ---------------------------------------------------------------- stage-2 prot

def test_decode_measured_61_with_btf_enum():
    d = a.stage2_prot_decode(np.array([0x6, 0x7, 0xe]), ENUM_61)
    assert list(d.memtype) == ["Normal", "Normal", "Device"]
    assert list(d.r) == [True, True, True]
    assert list(d.w) == [True, True, True]
    assert list(d.x) == [False, True, False]
    assert d.px is None and d.ux is None
    assert d.valid.all()
    assert d.enum_source.startswith("BTF")


def test_decode_measured_734_with_btf_enum():
    d = a.stage2_prot_decode([0xf, 0x1c], ENUM_73)
    assert list(d.memtype) == ["Normal", "Device"]
    assert list(d.r) == [True, True] and list(d.w) == [True, True]
    assert list(d.x) == [True, False]
    assert list(d.px) == [True, False] and list(d.ux) == [True, False]


def test_same_value_means_different_things_per_enum():
    # 0xe is DEVICE|R|W on 6.1 but R|W|UX (Normal) on 7.3.4: the enum must come
    # from the recording, not from a guess.
    assert a.stage2_prot_decode([0xe], ENUM_61).memtype[0] == "Device"
    d = a.stage2_prot_decode([0xe], ENUM_73)
    assert d.memtype[0] == "Normal" and d.ux[0] and not d.px[0]


def test_short_enum_names_accepted():
    d = a.stage2_prot_decode([0x1c], {"R": 8, "W": 4, "PX": 1, "UX": 2, "DEVICE": 16,
                                     "NORMAL_NC": 32})
    assert d.memtype[0] == "Device" and not d.x[0]


@pytest.mark.parametrize("ver,vals,want", [
    ("6.1.0-56-arm64", [0x6, 0x7, 0xe], ["Normal", "Normal", "Device"]),
    ("6.12.118", [0x16, 0xe, 0x6], ["Normal-NC", "Device", "Normal"]),
    ("6.17.13", [0x16], ["Normal-NC"]),
    ("6.19.14", [0xf, 0x1c, 0x2c], ["Normal", "Device", "Normal-NC"]),
    ("7.3.4+deb13-arm64", [0xf, 0x1c], ["Normal", "Device"]),
])
def test_fallback_tables(ver, vals, want):
    d = a.stage2_prot_decode(vals, None, ver)
    assert list(d.memtype) == want
    assert d.enum_source.startswith("table")


def test_fallback_tables_match_btf_measurements():
    assert {f"KVM_PGTABLE_PROT_{k}": v for k, v in a.prot_table("6.1").values.items()} == ENUM_61
    assert {f"KVM_PGTABLE_PROT_{k}": v for k, v in a.prot_table("7.3").values.items()} == ENUM_73


def test_enum_dict_wins_over_version():
    # A recording's BTF enum is used even if the version's table disagrees
    # (e.g. an Android kernel with its own bits).
    d = a.stage2_prot_decode([0x1c], ENUM_73, "6.1")
    assert d.memtype[0] == "Device"


def test_decode_needs_enum_or_version():
    with pytest.raises(ValueError):
        a.stage2_prot_decode([0x6])
    with pytest.raises(ValueError):
        a.stage2_prot_decode([0x6], {}, "4.19")


def test_invalid_combinations_flagged():
    # stage2_set_prot_attr(): DEVICE|NORMAL_NC and X with DEVICE/NC are -EINVAL
    d = a.stage2_prot_decode([0x3c, 0x1f, 0x2b, 0x0c], ENUM_73)
    assert list(d.memtype) == ["invalid", "Device", "Normal-NC", "Normal"]
    assert list(d.valid) == [False, False, False, True]


def test_sw_bits_ignored():
    d = a.stage2_prot_decode([0x6 | (1 << 55) | (1 << 58)], ENUM_61)
    assert d.memtype[0] == "Normal" and d.r[0] and d.w[0] and not d.x[0]


def test_cap_number():
    assert a.KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED == 243


# ---------------------------------------------------------------- fault rules

def test_61_bar_forced_to_device_even_write_combine():
    # host-facts: resource2 (uncached) and resource2_wc both map 0xe = DEVICE|R|W on 6.1
    for vma in ("Device-nGnRnE", "Normal-NC"):
        mt, err, words = a.expected_stage2("6.1.0-56-arm64", vma, SYSFS_BAR_FLAGS,
                                           False, True, False, False)
        assert (mt, err) == ("Device", 0)
        assert words.startswith("PFNMAP forced to Device: kernel before the cacheable-PFNMAP rules")
        assert vma in words
    assert a.stage2_prot_decode([0xe], ENUM_61).memtype[0] == mt


def test_61_cacheable_pfnmap_silently_downgraded():
    mt, err, _ = a.expected_stage2("6.1", "Normal", SYSFS_BAR_FLAGS, False, True, True, False)
    assert (mt, err) == ("Device", 0)
    assert a.memtype_cacheable("Normal") and not CACHEABLE[mt]


def test_pre_617_device_decision_ignores_vma_flags():
    # kvm_is_device_pfn() = !pfn_is_map_memory(): no VM_PFNMAP needed
    assert a.expected_stage2("6.12", "Normal", 0x100073, False, False, False, False)[0] == "Device"


def test_pre_617_ram_in_pfnmap_is_normal():
    # e.g. a dma-buf heap VM_PFNMAP over RAM: pfn_is_map_memory() true
    assert a.expected_stage2("6.1", "Normal", PFNMAP | IO, True, False, False, False)[:2] == \
        ("Normal", 0)


def test_612_vfio_normal_nc():
    mt, err, words = a.expected_stage2("6.12.118", "Device-nGnRnE", VFIO_FLAGS, False,
                                       False, False, False)
    assert (mt, err) == ("Normal-NC", 0) and "VM_ALLOW_ANY_UNCACHED" in words
    # before 6.9 the flag doesn't exist: Device
    assert a.expected_stage2("6.8", "Device-nGnRnE", VFIO_FLAGS, False, False, False,
                             False)[0] == "Device"


def test_pre_617_exec_on_device():
    mt, err, words = a.expected_stage2("6.1", "Device-nGnRnE", SYSFS_BAR_FLAGS, False, True,
                                       True, True)
    assert mt is None and err == errno.ENOEXEC and "prefetch abort" in words


def test_734_bar_non_cacheable_is_device():
    # host-facts: 7.3.4 maps resource2 and resource2_wc as Device (0x1c)
    for vma in ("Device-nGnRnE", "Device-nGnRE", "Normal-NC"):
        mt, err, words = a.expected_stage2("7.3.4+deb13-arm64", vma, SYSFS_BAR_FLAGS, False,
                                           True, False, False)
        assert (mt, err) == ("Device", 0) and "s2_force_noncacheable" in words
    assert a.stage2_prot_decode([0x1c], ENUM_73).memtype[0] == "Device"


def test_734_vfio_bar_normal_nc():
    mt, err, _ = a.expected_stage2("7.3.4", "Device-nGnRnE", VFIO_FLAGS, False, True, True,
                                   False)
    assert (mt, err) == ("Normal-NC", 0)


@pytest.mark.parametrize("fwb,dic", [(True, False), (False, True), (False, False)])
def test_cacheable_pfnmap_refused_without_fwb_and_dic(fwb, dic):
    mt, err, words = a.expected_stage2("6.17", "Normal", PFNMAP | IO, False, fwb, dic, False)
    assert mt is None and err == errno.EFAULT and "S2FWB" in words


def test_cacheable_pfnmap_mapped_with_fwb_and_dic():
    for flags in (PFNMAP | IO, MIXEDMAP):
        mt, err, words = a.expected_stage2("7.0.13", "Normal", flags, False, True, True, True)
        assert (mt, err) == ("Normal", 0) and "kvm_supports_cacheable_pfnmap" in words
    # Normal-Tagged counts as cacheable too
    assert a.expected_stage2("7.3", "Normal-Tagged", PFNMAP, False, True, True,
                             False)[0] == "Normal"


def test_617_exec_on_force_noncacheable():
    mt, err, words = a.expected_stage2("6.18", "Normal-NC", PFNMAP, False, True, True, True)
    assert mt is None and err == errno.ENOEXEC and "instruction abort" in words


def test_617_non_special_vma_is_ram_path():
    # no VM_PFNMAP/VM_MIXEDMAP: treated as struct-page memory even if not in the linear map
    assert a.expected_stage2("6.17", "Normal", 0x100073, False, False, False, False)[:2] == \
        ("Normal", 0)


def test_unknown_inputs():
    assert a.expected_stage2("7.3", None, PFNMAP, False, True, True, False)[:2] == (None, 0)
    assert a.expected_stage2("7.3", "Normal", PFNMAP, None, True, True, False)[:2] == (None, 0)
    mt, err, words = a.expected_stage2("7.3", "Normal", PFNMAP, False, None, True, False)
    assert (mt, err) == (None, 0) and words.startswith("unknown")


def test_ram_with_mte():
    anon = 0x100073
    # 6.1: VM_SHARED refused with MTE
    assert a.expected_stage2("6.1", "Normal", anon | SHARED, True, False, False, False,
                             mte_enabled=True)[1] == errno.EFAULT
    assert a.expected_stage2("6.1", "Normal", anon, True, False, False, False,
                             mte_enabled=True)[:2] == ("Normal", 0)
    # 6.12+: VM_MTE_ALLOWED required
    allowed = anon | a.vm_flag_bits("6.12")["VM_MTE_ALLOWED"]
    assert a.expected_stage2("6.12", "Normal", anon, True, False, False, False,
                             mte_enabled=True)[1] == errno.EFAULT
    assert a.expected_stage2("6.12", "Normal", allowed, True, False, False, False,
                             mte_enabled=True)[:2] == ("Normal", 0)
    # permission faults skip the check; device pfns too
    assert a.expected_stage2("6.12", "Normal", anon, True, False, False, False,
                             mte_enabled=True, perm_fault=True)[:2] == ("Normal", 0)
    assert a.expected_stage2("7.3", "Device-nGnRE", PFNMAP, False, False, False, False,
                             mte_enabled=True)[:2] == ("Device", 0)
    # a cacheable PFNMAP goes through the MTE check from 6.17
    assert a.expected_stage2("7.3", "Normal", PFNMAP, False, True, True, False,
                             mte_enabled=True)[1] == errno.EFAULT


# ---------------------------------------------------------------- memslot rules

def test_memslot_bar_accepted_both_kernels():
    # host-facts: KVM_SET_USER_MEMORY_REGION accepts resource2 / resource2_wc on 6.1 and 7.3.4
    for ver in ("6.1.0-56-arm64", "7.3.4+deb13-arm64"):
        for vma in ("Device-nGnRnE", "Normal-NC"):
            assert a.expected_memslot(ver, [(vma, SYSFS_BAR_FLAGS)], True, False)[0] == 0


def test_memslot_cacheable_pfnmap():
    err, words = a.expected_memslot("7.3.4", [("Normal", PFNMAP | IO)], True, False)
    assert err == errno.EINVAL and "S2FWB" in words
    assert a.expected_memslot("7.3.4", [("Normal", PFNMAP | IO)], True, True)[0] == 0
    assert a.expected_memslot("6.16", [("Normal", PFNMAP | IO)], False, False)[0] == 0
    # only VM_PFNMAP VMAs are checked at memslot time, not VM_MIXEDMAP
    assert a.expected_memslot("7.3.4", [("Normal", MIXEDMAP)], False, False)[0] == 0


def test_memslot_walks_vmas_in_order():
    vmas = [("Normal", 0x100073), ("Normal", PFNMAP | IO), ("Device-nGnRE", PFNMAP)]
    assert a.expected_memslot("6.17", vmas, False, False)[0] == errno.EINVAL


def test_memslot_dirty_log_and_mte_and_ipa():
    assert a.expected_memslot("6.1", [("Device-nGnRnE", PFNMAP)], False, False,
                              dirty_logging=True)[0] == errno.EINVAL
    assert a.expected_memslot("6.1", [("Normal", 0x100073 | SHARED)], False, False,
                              mte_enabled=True)[0] == errno.EINVAL
    assert a.expected_memslot("7.3", [("Normal", 0x100073)], False, False,
                              mte_enabled=True)[0] == errno.EINVAL
    assert a.expected_memslot("7.3", [], False, False, beyond_ipa=True)[0] == errno.EFAULT
    assert a.expected_memslot("7.3", [("Normal", PFNMAP)], None, None)[0] == 0


# ---------------------------------------------------------------- rule data

def test_rules_table_ranges():
    ids61 = {r["id"] for r in a.rules_table("6.1.0-56-arm64")}
    assert {"device_pfn_forced", "exec_on_device", "mte_shared_fault"} <= ids61
    assert "cacheable_pfnmap" not in ids61 and "device_pfn_normal_nc" not in ids61
    ids73 = {r["id"] for r in a.rules_table("7.3.4")}
    assert {"cacheable_pfnmap", "cacheable_pfnmap_refused", "force_noncacheable_nc",
            "memslot_cacheable_pfnmap", "mte_not_allowed_fault"} <= ids73
    assert "device_pfn_forced" not in ids73
    row = next(r for r in a.rules_table() if r["id"] == "cacheable_pfnmap_refused")
    assert row["errno"] == "EFAULT" and row["kernels"] == ">=6.17"


def test_every_rule_result_is_known_memtype():
    for r in a.RULES.values():
        assert r.stage2 is None or r.stage2 in CACHEABLE
        assert r.words
