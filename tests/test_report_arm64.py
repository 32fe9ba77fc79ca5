"""report on real arm64 recordings (emulated arm64 KVM host, 6.1 and 7.3.4;
tests/fixtures/arm64/README.md has the commands), offline on any machine.

Checks the slot table against the guest's own report, fault counts against
the guest's measured rule, the stage-2 memory types decoded with each
kernel's own enum kvm_pgtable_prot (the bits moved between 6.1 and 7.x), and
the verdicts with the kernel rule that applied.
"""

import pytest

import kvmtrace
from kvmtrace.memtype import arm64 as a64

from conftest import FIXTURES, kvmtrace as run, load_json

D = FIXTURES / "arm64"
KERNELS = ["6.1", "7.x"]


def load(sc, k):
    return kvmtrace.load(str(D / f"{sc}-{k}.kvt")), load_json(D / f"{sc}-{k}.guest.json")


def slot_rows(model, slot):
    s = model.slots
    return s.index[(s["slot"] == slot) & (s["version"] == 0)][0]


WC_RULE = {"6.1": "PFNMAP forced to Device: kernel before the cacheable-PFNMAP rules",
           "7.x": "s2_force_noncacheable"}


def check_slots_and_faults(m, g):
    """The slot table equals the guest's ioctls; faults per slot its measured rule."""
    got = [(int(r.slot_id), int(r.gpa), int(r.size_bytes), int(r.hva))
           for r in m.ops.itertuples()]
    want = [(x["slot"], x["gpa"], x["size"], x["hva"]) for x in g["memslot_ioctls"]]
    assert got == want
    per = m.faults[m.faults["slot_row"] >= 0].groupby("slot_row").size()
    live = set(m.slots.loc[m.slots["version"] == 0, "slot"])
    for s in g["slots"]:
        if s["status"] != "ok":
            continue
        if s["slot"] not in live:  # KVM refused the memslot: nothing can fault there
            assert not s["expected_faults"], s["slot"]
            continue
        assert per.get(slot_rows(m, s["slot"]), 0) == s["expected_faults"], s["slot"]


def check_bar_verdicts(m, g, k):
    """RAM consistent; the write-combine BAR downgraded to Device by the kernel's
    rule; execution from the BAR refused with ENOEXEC."""
    v = m.verdicts.set_index("slot")
    kinds = {s["slot"]: s["backing"] for s in g["slots"]}
    for slot, kind in kinds.items():
        if kind in ("anon", "memfd"):
            assert v.loc[slot, "verdict"] == "consistent"
            assert "Normal" in v.loc[slot, "reason"]
    wc = next(s for s, kd in kinds.items() if kd == "bar-wc")
    uc = next(s for s, kd in kinds.items() if kd == "bar-uc")
    assert v.loc[wc, "verdict"] == "downgraded"
    assert "host VMA Normal-NC" in v.loc[wc, "reason"] and WC_RULE[k] in v.loc[wc, "reason"]
    uc_faults = m.faults[m.faults["slot_row"] == slot_rows(m, uc)]
    assert set(uc_faults["vma_memtype"]) == {"Device-nGnRE"}
    assert set(m.errors["errno"]) == {"ENOEXEC"}
    assert set(m.errors["slot"]) == {uc, wc}
    assert v.loc[uc, "verdict"] == "rejected"


@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("sc", ["bar", "demo", "cbar"])
def test_slots_and_faults_match_the_guest(sc, k):
    check_slots_and_faults(*load(sc, k))


@pytest.mark.parametrize("k", KERNELS)
def test_prot_enum_comes_from_the_recording(k):
    m, _ = load("bar", k)
    enum = m.meta["btf"]["enums"]["kvm_pgtable_prot"]
    assert enum["KVM_PGTABLE_PROT_DEVICE"] == (8 if k == "6.1" else 0x10)
    bar = m.faults[m.faults["slot_row"] == slot_rows(m, 3)]
    assert set(bar["spte"].dropna().astype(int)) == ({0xe} if k == "6.1" else {0x1c})
    assert set(bar["spte_memtype"]) - {""} == {"Device"}


@pytest.mark.parametrize("k", KERNELS)
def test_verdicts_follow_each_kernels_rules(k):
    check_bar_verdicts(*load("bar", k), k)


def test_vma_types_come_from_the_kernels_own_lookup():
    m, _ = load("bar", "7.x")
    assert list(m.slots["kvm_vma_memtype"]) == ["Normal", "Normal", "Normal", "Device-nGnRE",
                                                "Normal-NC"]
    assert a64.vm_flags_decode(int(m.slots["kvm_vm_flags"].iloc[3]), "7.3.4")["VM_PFNMAP"]


def test_cpu_facts_recorded():
    for k in KERNELS:
        m, _ = load("bar", k)
        cpu = m.meta["arm64"]
        assert cpu["dic"] is False and cpu["fwb"] is True
        assert cpu["cap_cacheable_pfnmap"]["vm"] == 0


@pytest.mark.parametrize("k", KERNELS)
def test_text_report_and_diff_across_kernels(k):
    p = run("report", D / f"bar-{k}.kvt", "--fail-on", "mismatch")
    assert p.returncode == 1 and "downgraded" in p.stdout and "ENOEXEC" in p.stdout
    p = run("diff", D / "bar-6.1.kvt", D / "bar-7.x.kvt", "--format", "json")
    assert p.returncode == 0


@pytest.mark.parametrize("k,verdict,words", [
    # the seed's case: a cacheable VM_PFNMAP region that is not RAM (a test
    # module remap_pfn_range()s the BAR with the default, cacheable pgprot)
    ("6.1", "downgraded", "PFNMAP forced to Device: kernel before the cacheable-PFNMAP rules"),
    ("7.x", "rejected", "kvm_arch_prepare_memory_region refused"),
])
def test_cacheable_pfnmap_per_kernel(k, verdict, words):
    m, g = load("cbar", k)
    slot = next(s["slot"] for s in g["slots"] if s["backing"] == "bar-cacheable")
    v = m.verdicts.set_index("slot")
    assert v.loc[slot, "verdict"] == verdict
    assert words in v.loc[slot, "reason"]
    if k == "7.x":
        assert "S2FWB" in v.loc[slot, "reason"] or "DIC" in v.loc[slot, "reason"]
        assert list(m.errors["errno"]) == ["EINVAL"]
    else:
        assert "host VMA Normal " in v.loc[slot, "reason"]


def test_faults_outside_every_memslot_are_named_emulated_mmio():
    """QEMU's whole life recorded (tests/fixtures/qemu-arm64): its guest's
    accesses to addresses no memslot covers (ECAM, the UART, ...) are emulated
    MMIO, and the report says that, not a guess about unrecorded slots."""
    for k in ("6.1", "7.x"):
        p = run("report", FIXTURES / "qemu-arm64" / f"qemu-{k}.kvt", timeout=300)
        assert p.returncode == 0, p.stderr
        line = next(ln for ln in p.stdout.splitlines() if "faults outside every" in ln)
        assert "which KVM emulates as MMIO" in line and "before recording" not in line
