"""x86 memory-type decoding (kvmtrace.memtype.x86) and its use by the model.

Real values: the sptes KVM-PVM installed (tests/fixtures/raw-x86-pvm ring
records and tests/fixtures/x86-pvm-demo.kvt: all host PAT entry 0), the host
PAT, PAT memtype list and System RAM ranges recorded on the development
host (x86-pvm-demo.kvt meta). Bit layouts: arch/x86/include/asm/pgtable_types.h
(_PAGE_PWT bit 3, _PAGE_PCD bit 4, _PAGE_PAT bit 7, _PAGE_PAT_LARGE bit 12,
_PAGE_NX bit 63), arch/x86/include/asm/vmx.h (VMX_EPT_MT_EPTE_SHIFT 3,
VMX_EPT_IPAT_BIT bit 6), KVM's choices in arch/x86/kvm/vmx/vmx.c
vmx_get_mt_mask() and arch/x86/kvm/mmu/spte.c make_spte() (see the module
docstring of kvmtrace/memtype/x86.py for the versions).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kvmtrace.analysis import model
from kvmtrace.memtype import CACHEABLE
from kvmtrace.memtype import x86
from kvmtrace.recording.reader import read

from conftest import FIXTURES

X86 = FIXTURES / "x86-pvm-demo.kvt"
RAW = FIXTURES / "raw-x86-pvm"

PWT, PCD, PAT4K, PS, PAT2M, NX = 1 << 3, 1 << 4, 1 << 7, 1 << 7, 1 << 12, 1 << 63
# A real KVM-PVM leaf spte of the demo run (set_spte row of a read fault):
# present, user, accessed, software bits 9 and 11, pfn 0x1d301d;
# PAT:PCD:PWT = 0, NX clear (the guest executes from its pages).
REAL_SPTE = 0x1d301da25
EPT_RWX, EPT_A, EPT_D, EPT_SVE = 0x7, 1 << 8, 1 << 9, 1 << 63
# Xen's PAT for PV guests (arch/x86/xen: WB WT UC- UC WC WP UC UC) and the
# layout Linux uses on CPUs with the PAT errata (pat_init(): slots 4-7 copy 0-3).
XEN_PAT = ("WB", "WT", "UC-", "UC", "WC", "WP", "UC", "UC")
ERRATA_PAT = ("WB", "WC", "UC-", "UC", "WB", "WC", "UC-", "UC")


def u64(*v) -> np.ndarray:
    return np.array(v, dtype=np.uint64)


def names(spte, level, fmt="legacy", pat=x86.LINUX_PAT) -> list[str]:
    return list(x86.spte_memtype(spte, level, fmt, pat))


# ---------------------------------------------------------------- legacy format

def test_recorded_host_pat_is_linuxs_layout():
    """The development host's boot log (recorded in the meta) shows the PAT
    Linux programs since 4.2: the table the decoder assumes by default."""
    meta = read(X86).meta
    assert tuple(meta["x86"]["pat"]["entries"]) == x86.LINUX_PAT
    assert meta["x86"]["pat"]["source"] == "dmesg"
    assert x86.LINUX_PAT == ("WB", "WC", "UC-", "UC", "WB", "WP", "UC-", "WT")


@pytest.mark.parametrize("bits,want", [
    (0, "WB"), (PWT, "WC"), (PCD, "UC-"), (PCD | PWT, "UC"),
    (PAT4K, "WB"), (PAT4K | PWT, "WP"), (PAT4K | PCD, "UC-"), (PAT4K | PCD | PWT, "WT"),
])
def test_legacy_4k_pat_index(bits, want):
    spte = u64(REAL_SPTE | bits, REAL_SPTE | bits | NX)
    assert names(spte, 1) == [want, want]
    idx = (bits >> 3 & 1) | (bits >> 4 & 1) << 1 | (bits >> 7 & 1) << 2
    assert list(x86.legacy_pat_index(spte, 1)) == [idx, idx]


@pytest.mark.parametrize("level", [2, 3])
def test_legacy_large_pages_take_pat_from_bit_12(level):
    """In a 2M / 1G entry bit 7 is PS and the PAT bit is bit 12: PS|PWT is
    WC (index 1), not WP (index 5); bit 12 with PWT is WP."""
    base = (0x40000 << 12) | 0x67 | PS
    assert names(u64(base | PWT, base | PAT2M | PWT, base | PAT2M | PCD | PWT,
                     base | PCD | PWT | NX), level) == ["WC", "WP", "WT", "UC"]
    # at 4K, bit 12 is part of the pfn, not the PAT bit
    assert names(u64(0x1000 | PWT, PAT4K | PWT), 1) == ["WC", "WP"]


def test_level_is_per_spte():
    s = u64(PS | PWT, PS | PWT, PAT2M | PCD)
    assert names(s, np.array([1, 2, 2], dtype=np.uint8)) == ["WP", "WC", "UC-"]


@pytest.mark.parametrize("as_", ["uint64", "list", "int64", "object", "UInt64"])
def test_nx_pcd_pwt_is_uc(as_):
    """NX (bit 63) | PCD | PWT: UC. Bit 63 makes the word >= 2**63, which
    float64 cannot hold with its low bits (float64(2**63 | 0x18) == 2**63):
    decoded from a float it would read as WB. Every exact integer form of
    the word decodes as UC, including the signed int64 view of it."""
    word = REAL_SPTE | NX | PCD | PWT
    vals = {"uint64": u64(word, REAL_SPTE),
            "list": [word, REAL_SPTE],
            "int64": u64(word, REAL_SPTE).view(np.int64),
            "object": np.array([word, REAL_SPTE], dtype=object),
            "UInt64": pd.Series([word, REAL_SPTE], dtype="UInt64")}[as_]
    assert names(vals, 1) == ["UC", "WB"]
    assert list(x86.legacy_pat_index(vals, 1)) == [3, 0]
    # what the float64 route does: the word rounds to a multiple of 2**11,
    # PCD and PWT are gone, and the result reads as WB
    lost = np.array([word], dtype=np.uint64).astype(np.float64).astype(np.uint64)
    assert int(lost[0]) & 0x7ff == 0 and names(lost, 1) == ["WB"]


def test_python_ints_past_2_63():
    """A Python int (or a list of them) is taken exactly: analysis/vmas.py
    decodes a VMA's vm_page_prot as legacy_pat_index([prot], [1]), and a
    user PTE's pgprot has NX set (the README's 0x8000000000000025: WB)."""
    assert list(x86.legacy_pat_index([0x8000000000000025], [1])) == [0]
    assert list(x86.legacy_pat_index([NX | 0x25 | PCD | PWT], [1])) == [3]
    assert list(x86.legacy_pat_index((NX | PAT4K | PWT,), 1)) == [5]
    assert x86.spte_memtype(NX | PCD, 1, "legacy") == "UC-"


def test_float_sptes_past_2_53_are_refused():
    """A float64 spte past 2**53 has already lost its low bits: refused,
    not decoded as WB. Small integral floats are exact and still decode."""
    with pytest.raises(TypeError, match="float64"):
        x86.spte_memtype(np.array([float(REAL_SPTE | NX | PCD | PWT)]), 1, "legacy")
    with pytest.raises(TypeError, match="float64"):
        x86.spte_memtype(pd.Series([REAL_SPTE | NX, None], dtype="UInt64"), 1, "ept")
    with pytest.raises(TypeError):
        x86.legacy_pat_index(np.array([np.nan]), 1)
    assert names(np.array([float(REAL_SPTE | PCD)]), 1) == ["UC-"]


def test_host_pat_from_the_recording_is_used():
    """A host whose PAT is not Linux's (Xen PV, PAT errata): the same bits
    name other types; a PAT of other than 8 entries is an error."""
    s = u64(0, PWT, PCD | PWT, PAT4K, PAT4K | PWT, PAT4K | PCD | PWT | NX)
    assert names(s, 1, pat=XEN_PAT) == ["WB", "WT", "UC", "WC", "WP", "UC"]
    assert names(s, 1, pat=list(ERRATA_PAT)) == ["WB", "WC", "UC", "WB", "WC", "UC"]
    with pytest.raises(ValueError):
        x86.spte_memtype(s, 1, "legacy", ("WB", "WC"))


def test_real_pvm_sptes_are_wb():
    """Every spte KVM-PVM installed in both real runs has PAT:PCD:PWT = 0:
    host PAT entry 0, WB (the ring records as written, and the recording)."""
    from kvmtrace.collectors.ringbuf import decode
    from kvmtrace.probes import codegen
    from kvmtrace.probes.events import EVENTS

    body, _ = decode(np.frombuffer((RAW / "set_spte.bin").read_bytes(), dtype=np.uint8),
                     codegen.record_dtype(EVENTS["set_spte"]))
    assert len(body) == 17 and body["spte"].dtype == np.uint64
    assert set(x86.spte_memtype(body["spte"], body["level"], "legacy")) == {"WB"}
    rec = read(X86).tables["set_spte"]
    sptes = rec["spte"].to_numpy(dtype=np.uint64)
    assert len(sptes) == 229 and REAL_SPTE in set(int(v) for v in sptes)
    assert set(x86.spte_memtype(sptes, rec["level"].to_numpy(), "legacy")) == {"WB"}
    assert not (sptes & np.uint64(PWT | PCD | PAT4K)).any()


def test_npt_sptes_are_legacy_format():
    """AMD NPT (legacy or TDP MMU) uses the legacy format; KVM leaves
    PAT:PCD:PWT at 0 (no get_mt_mask on SVM), so its sptes are WB in the
    host PAT, which the CPU combines with the guest's PAT. NX is bit 63."""
    npt = (0x123456 << 12) | 0x867 | NX  # present, W, U, A, D, host-writable, NX
    assert names(u64(npt, npt | PS), [1, 2]) == ["WB", "WB"]
    assert names(u64(npt | PCD), 1) == ["UC-"]


# ---------------------------------------------------------------- EPT format

def ept(mt: int, ipat: bool = True, extra: int = 0) -> int:
    return (0x2a1b3 << 12) | EPT_RWX | EPT_A | EPT_D | (mt << 3) | (ipat << 6) | extra


@pytest.mark.parametrize("mt,want", [(0, "UC"), (1, "WC"), (4, "WT"), (5, "WP"), (6, "WB"),
                                     (2, "reserved(2)"), (3, "reserved(3)"),
                                     (7, "reserved(7)")])
def test_ept_memtype_bits_5_to_3(mt, want):
    for level in (1, 2, 3):
        assert names(u64(ept(mt), ept(mt, False), ept(mt, extra=EPT_SVE)), level, "ept") == \
            [want] * 3


def test_ept_values_kvm_writes():
    """vmx_get_mt_mask(): WB | IPAT (0x70) for RAM without non-coherent DMA;
    UC (0) without IPAT for an MMIO pfn; WB without IPAT (0x30) where the
    guest's PAT decides. With suppress-#VE (bit 63) as well."""
    s = u64(ept(6), ept(0, False), ept(6, False), ept(6, extra=EPT_SVE),
            ept(0, False, EPT_SVE))
    assert [int(v) & 0x78 for v in s] == [0x70, 0, 0x30, 0x70, 0]
    assert names(s, 1, "ept") == ["WB", "UC", "WB", "WB", "UC"]
    assert list(x86.ept_ipat(s)) == [True, False, False, True, False]


def test_ept_ignores_the_legacy_pat():
    """An EPT entry names its type itself; the host PAT plays no part."""
    s = u64(ept(6), ept(1))
    assert names(s, 1, "ept", XEN_PAT) == names(s, 1, "ept") == ["WB", "WC"]


# ---------------------------------------------------------------- host frames

def _host():
    x = read(X86).meta["x86"]
    return x["pat_memtype_list"], x["ram"]


def test_pfn_memtype_on_the_recorded_host():
    """The development host's PAT memtype list and System RAM: the RAM page
    behind a guest page is WB, a BAR page in the list is UC-, the list's
    write-back range inside RAM wins over RAM, and the APIC page (in
    neither) is unknown. Ranges end exclusive."""
    pat_list, ram = _host()
    uc = next(r for r in pat_list if r["memtype"] == "uncached-minus")
    wb = next(r for r in pat_list if r["memtype"] == "write-back")
    pfns = u64(0x3b34, uc["start"] >> 12, (uc["end"] >> 12) - 1, uc["end"] >> 12,
               wb["start"] >> 12, 0xfee00)
    types, src = x86.pfn_memtype(pfns, pat_list, ram)
    assert list(types[:3]) == ["WB", "UC-", "UC-"]
    assert types[3] == "unknown"  # just past the BAR: neither RAM nor listed
    assert types[4] == "WB" and src[4] == "PAT memtype list: write-back"
    assert types[5] == "unknown"
    assert src[0] == "PFN is System RAM (write-back)"
    assert src[1] == "PAT memtype list: uncached-minus"
    assert src[5] == "PFN is neither in System RAM nor in the PAT memtype list"


def test_pfn_memtype_of_the_real_pfnmap_slot():
    """Slot 5 of the demo run maps the VMM's [vvar] (a VM_PFNMAP|VM_IO VMA):
    its frames, as KVM-PVM requested them, are System RAM: WB."""
    t = read(X86).tables["spte_requested"]
    pfn = t.loc[t["gfn"].astype("int64").between(0x2000, 0x2003), "pfn"]
    assert len(pfn) == 2
    types, src = x86.pfn_memtype(pfn.to_numpy(dtype=np.uint64), *_host())
    assert list(types) == ["WB", "WB"]


def test_pfn_memtype_names_every_cache_mode_and_what_was_missing():
    pat_list = [{"start": (i + 1) << 20, "end": (i + 2) << 20, "memtype": m}
                for i, m in enumerate(list(x86.PAT_LIST_NAMES) + ["broken"])]
    pfns = u64(*[((i + 1) << 20) >> 12 for i in range(len(pat_list))])
    types, _ = x86.pfn_memtype(pfns, pat_list, [])
    assert list(types) == ["WB", "WC", "UC-", "UC", "WT", "WP", "broken"]
    assert all(CACHEABLE[t] == (t in ("WB", "WT", "WP")) for t in types[:-1])

    far = u64(0xfee00)
    t, s = x86.pfn_memtype(far, None, [{"start": 0, "end": 1 << 30}])
    assert t[0] == "unknown" and "PAT memtype list not readable" in s[0]
    t, s = x86.pfn_memtype(far, [], None)
    assert t[0] == "unknown" and "System RAM ranges were not recorded" in s[0]
    t, s = x86.pfn_memtype(far, None, None)
    assert t[0] == "unknown" and "neither System RAM ranges nor the PAT memtype list" in s[0]


def test_pfn_memtype_uses_the_page_size():
    ram = [{"start": 1 << 30, "end": 2 << 30}]
    assert list(x86.pfn_memtype(u64(1 << 16), None, ram, page_size=16384)[0]) == ["WB"]
    assert list(x86.pfn_memtype(u64(1 << 16), None, ram)[0]) == ["unknown"]


# ---------------------------------------------------------------- in the model

def _model_with_spte(tmp_path, bits: int, k: int = 40):
    """The real x86 recording with fault k's installed spte (a kvm_mmu_set_spte
    row of slot 1, anon memory) given ``bits`` on top of its real value."""
    from test_unit_compare import rewrite

    def edit(tables):
        row = sorted(tables["set_spte"], key=lambda r: r["ts"])[k]
        row["spte"] |= bits
        edit.ts, edit.spte = row["ts"], row["spte"]
    m = model.build(rewrite(X86, tmp_path / "spte.kvt", edit))
    f = m.faults
    hit = f[f["install_ts"].notna() & (f["install_ts"].astype("Int64") == edit.ts)]
    assert len(hit) == 1
    return m, hit.iloc[0], edit.spte


def test_model_pcd_pwt_spte_is_uc(tmp_path):
    """PCD|PWT on one real install: that fault is UC, its slot's VMA WB, so
    the fault is downgraded; the other faults stay WB."""
    m, r, spte = _model_with_spte(tmp_path, PCD | PWT)
    assert spte < 2**53
    assert r["spte_memtype"] == "UC" and r["vma_memtype"] == "WB"
    assert r["verdict"] == "downgraded"
    assert (m.faults["spte_memtype"] == "WB").sum() == len(m.faults) - 1


def test_model_nx_pcd_pwt_spte_is_uc(tmp_path):
    """NX|PCD|PWT on one real install (bit 63 set, as NX is on every
    non-executable legacy spte of a host with NX): that fault must be UC and
    downgraded, with its spte kept exactly. Through float64 the low bits are
    lost and it reads as WB."""
    m, r, spte = _model_with_spte(tmp_path, NX | PCD | PWT)
    assert int(r["spte"]) == spte
    assert r["spte_memtype"] == "UC"
    assert r["verdict"] == "downgraded"
    assert (m.faults["spte_memtype"] == "WB").sum() == len(m.faults) - 1


# ---------------------------------------------------------------- who decides the type

@pytest.mark.parametrize("kernel,args,want,ipat", [
    # a PCI BAR (kvm_is_mmio_pfn): UC without IPAT, whatever else holds
    ("6.1", dict(is_mmio=True), "UC", False),
    ("6.1", dict(is_mmio=True, noncoherent_dma=True), "UC", False),
    ("7.x", dict(is_mmio=True), "UC", False),
    ("7.x", dict(is_mmio=True, noncoherent_dma=True, ignore_guest_pat=False), "UC", False),
    # RAM without non-coherent DMA: WB | IPAT (7.x: while the quirk is on)
    ("6.1", dict(is_mmio=False), "WB", True),
    ("7.x", dict(is_mmio=False), "WB", True),
    ("7.x", dict(is_mmio=False, ignore_guest_pat=False), "WB", False),
    # non-coherent DMA: 6.1 the guest's MTRR type (CR0.CD: WB|IPAT or UC|IPAT);
    # 7.x WB without IPAT (the guest's PAT decides)
    ("6.1", dict(is_mmio=False, noncoherent_dma=True, guest_mtrr="WC"), "WC", False),
    ("6.1", dict(is_mmio=False, noncoherent_dma=True, cr0_cd=True), "WB", True),
    ("6.1", dict(is_mmio=False, noncoherent_dma=True, cr0_cd=True, cd_nw_cleared=False),
     "UC", True),
    ("7.x", dict(is_mmio=False, noncoherent_dma=True), "WB", False),
])
def test_vmx_get_mt_mask_decoded(kernel, args, want, ipat):
    """vmx_get_mt_mask()'s branches as 6.1 and 7.x read, put in an EPT leaf
    and decoded back: memory type, IPAT, whether the guest's PAT combines,
    and the rule named for it."""
    bits = x86.vmx_get_mt_mask(kernel, **args)
    assert bits & ~0x78 == 0
    spte = u64((0x2a1b3 << 12) | EPT_RWX | EPT_A | EPT_D | bits | EPT_SVE)
    assert names(spte, 1, "ept") == [want]
    assert bool(x86.ept_ipat(spte)[0]) is ipat
    assert bool(x86.guest_pat_combines(spte, "ept")[0]) is not ipat
    rule = x86.kvm_rules(spte, 1, "ept")[0]
    assert rule.startswith("EPT: vmx_get_mt_mask()")
    if (want, ipat) == ("UC", False):
        assert "host MMIO pfn" in rule and "WC" in rule
    elif (want, ipat) == ("WB", True):
        assert "KVM forces write-back" in rule
    elif (want, ipat) == ("WB", False):
        assert "the guest's PAT decides" in rule
    elif want == "WC":
        assert rule == x86.EPT_GUEST_MTRR_RULE


def test_vmx_get_mt_mask_other_kernels_are_refused():
    with pytest.raises(ValueError):
        x86.vmx_get_mt_mask("5.4", False)


def test_mmu_kind():
    assert x86.mmu_kind({"mmu": "npt", "spte_format": "legacy", "vendor": "amd"}) == "npt"
    assert x86.mmu_kind({"mmu": "ept", "spte_format": "ept"}) == "ept"
    assert x86.mmu_kind({"spte_format": "legacy"}) == "shadow"
    assert x86.mmu_kind(None) == "shadow"


def test_npt_rules():
    """An NPT leaf as KVM makes it (PAT:PCD:PWT 0, 6.1 and 7.x: the BAR pages
    of tests/fixtures/x86-tdp/bar-*.kvt had low bits 0xe67): no type set, the
    guest's PAT combines; a leaf with PCD (not made by KVM) names its type."""
    leaf = (0xfe800 << 12) | 0xe67
    s = u64(leaf, leaf | PS, leaf | PCD)
    assert names(s, [1, 2, 1]) == ["WB", "WB", "UC-"]
    rules = list(x86.kvm_rules(s, [1, 2, 1], "npt"))
    assert rules[0] == rules[1] == x86.NPT_RULE
    assert "KVM sets no memory type" in x86.NPT_RULE and "get_mt_mask" in x86.NPT_RULE
    assert "MTRR" in x86.NPT_RULE and "guest's PAT" in x86.NPT_RULE
    assert rules[2] == x86.NPT_TYPED_RULE
    assert x86.guest_pat_combines(s, "npt").all()
    assert not x86.guest_pat_combines(s, "shadow").any()
    assert set(x86.kvm_rules(s, 1, "shadow")) == {x86.SHADOW_RULE}


@pytest.mark.parametrize("vma,spte,mmu,bare,want", [
    ("WB", "WB", "npt", "consistent", "consistent"),     # RAM
    ("UC-", "WB", "npt", "upgraded", "unknown"),         # resource2: guest PAT + MTRRs decide
    ("WC", "WB", "npt", "upgraded", "unknown"),          # resource2_wc
    ("WB", "UC-", "npt", "downgraded", "downgraded"),    # a stricter host type stays
    ("UC-", "UC", "ept", "consistent", "consistent"),    # BAR on EPT: UC, no IPAT
    ("WC", "UC", "ept", "downgraded", "unknown"),        # the guest may pick WC
    ("WC", "UC", "npt", "downgraded", "downgraded"),
    ("WB", "UC", "ept", "downgraded", "downgraded"),
])
def test_combined_verdicts(vma, spte, mmu, bare, want):
    from kvmtrace.analysis.model import compare_memtypes
    v = compare_memtypes(np.array([vma], dtype=object), np.array([spte], dtype=object))
    assert list(v) == [bare]
    assert list(x86.combined_verdicts([vma], [spte], [True], v, mmu)) == [want]
    # where the guest's PAT does not combine (EPT with IPAT, shadow paging):
    # the bare comparison holds, e.g. UC- forced WB with IPAT is upgraded
    assert list(x86.combined_verdicts([vma], [spte], [False], v, mmu)) == [bare]


def test_ept_ipat_wb_over_uc_vma_is_upgraded():
    """WB|IPAT over a UC- VMA (a host page KVM does not take for MMIO): the
    guest's PAT cannot help: upgraded, the rule names the forced WB."""
    from kvmtrace.analysis.model import _verdict_codes
    spte = u64((0x1234 << 12) | EPT_RWX | x86.vmx_get_mt_mask("7.x", False))
    smt = pd.Categorical(names(spte, 1, "ept"))
    v = _verdict_codes(pd.Categorical(["UC-"]), smt, x86.guest_pat_combines(spte, "ept"), "ept")
    assert list(v) == ["upgraded"]
    assert "forces write-back" in x86.kvm_rules(spte, 1, "ept")[0]


def test_proc_mtrr_parsed():
    """/proc/mtrr as arch/x86/kernel/cpu/mtrr/if.c mtrr_seq_show prints it
    ("reg%02i: base=0x%06lx000 (%5luMB), size=%5lu%cB, count=%d: %s"); this
    development host (KVM-PVM guest) has no /proc/mtrr, so the lines are made
    from that format, with a KB-sized range and a type the kernel hides ('?')."""
    from kvmtrace.host.procfs import parse_mtrr
    from kvmtrace.memtype import x86 as x86mt

    text = ("reg00: base=0x000000000 (    0MB), size= 2048MB, count=1: write-back\n"
            "reg01: base=0x0c0000000 ( 3072MB), size=  256MB, count=1: uncachable\n"
            "reg02: base=0x0fee00000 ( 4078MB), size=    4KB, count=1: write-combining\n"
            "reg03: base=0x000000000 (    0MB), size=    0MB, count=0: ?\n")
    got = parse_mtrr(text)
    assert got[:3] == [{"start": 0, "end": 2 << 30, "memtype": "WB"},
                       {"start": 3 << 30, "end": (3 << 30) + (256 << 20), "memtype": "UC"},
                       {"start": 0xFEE00000, "end": 0xFEE01000, "memtype": "WC"}]
    assert got[3]["memtype"] == "?"
    words = x86mt.mtrr_words({"mtrr": got[:2]})
    assert "0x0-0x80000000 WB" in words and "0xc0000000-0xd0000000 UC" in words
    assert "not recorded" in x86mt.mtrr_words({"mtrr": None, "mtrr_source": "unavailable"})


def test_mtrr_per_frame_on_the_testbeds_own_mtrrs():
    """The x86 testbed's own MTRRs, recorded with bar-7.x.kvt (meta x86.mtrr,
    from /proc/mtrr; bar-7.x.host.txt has the file: reg00 0xc0000000 + 1 GiB
    uncachable), over the host frames KVM mapped: the BAR's frames (slots 2
    and 3, resource2 and resource2_wc) lie in the UC range, RAM's in none.
    Each fault's rule says so, and each slot's reason once; without the MTRRs
    the rules are the bare NPT rule and the verdicts the same."""
    import re

    from kvmtrace.analysis import model as model_mod
    from kvmtrace.host.procfs import parse_mtrr
    from kvmtrace.memtype import x86 as x86mt
    from kvmtrace.recording.reader import read

    d = FIXTURES / "x86-tdp"
    host = (d / "bar-7.x.host.txt").read_text()
    mtrr = parse_mtrr(re.search(r"## /proc/mtrr\n(.*?)\n## ", host, re.S)[1])
    assert mtrr == [{"start": 0xC0000000, "end": 0x100000000, "memtype": "UC"}]
    rec = read(str(d / "bar-7.x.kvt"))
    assert rec.meta["x86"]["mtrr"] == mtrr
    m = model_mod.build(rec)
    rec = read(str(d / "bar-7.x.kvt"))
    rec.meta["x86"]["mtrr"] = None
    plain = model_mod.build(rec)
    f, f0 = m.faults, plain.faults
    slot = f["slot"].astype("Int64")
    bar = f[slot.isin([2, 3]) & (f["rule"] != "")]
    ram = f[(slot == 1) & (f["rule"] != "")]
    assert len(bar) and len(ram)
    assert (bar["pfn"].astype("uint64") >= 0xC0000).all()
    uc = x86mt.NPT_RULE + x86mt.MTRR_SEP + "UC (0xc0000000-0x100000000 UC)"
    assert set(bar["rule"].astype(str)) == {uc}
    assert set(ram["rule"].astype(str)) == {
        x86mt.NPT_RULE + x86mt.MTRR_SEP + "no variable range covers it (the MTRR default "
        "type, which /proc/mtrr does not show)"}
    # only the rule text grows: the verdicts are those without MTRRs
    assert f["verdict"].astype(str).tolist() == f0["verdict"].astype(str).tolist()
    assert set(f0.loc[f0["rule"] != "", "rule"].astype(str)) == {x86mt.NPT_RULE}
    # each slot's verdict says who decides: no type in the NPT entry, the frame's MTRR
    v = m.verdicts.set_index("slot")["reason"]
    for s_ in (2, 3):
        assert "the NPT entries carry no memory type" in v[s_]
        assert "; host MTRR of the frame: UC (0xc0000000-0x100000000 UC); kernel rule: NPT" \
            in v[s_] and v[s_].count("host MTRR of the frame") == 1
    assert "no variable range covers it" in v[1]
    assert "host MTRR of the frame" not in plain.verdicts.set_index("slot")["reason"][2]
