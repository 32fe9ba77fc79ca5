"""Reports of real recordings from an x86 host with nested paging (the
emulated AMD host of testbed/x86, Debian 6.1 and 7.3.4; see
tests/fixtures/x86-tdp/README.md for the command that made them): the TDP
MMU's pairing, the kprobe-bounded service times and the faults per slot,
offline, against the test VMM's own account of each run."""

import json

import numpy as np

import pytest

import kvmtrace

from conftest import FIXTURES, kvmtrace as run

TDP = FIXTURES / "x86-tdp"


@pytest.mark.parametrize("kernel", ["6.1", "7.x"])
def test_faults_per_slot_equal_the_guests(kernel):
    g = json.loads((TDP / f"demo-{kernel}.guest.json").read_text())
    m = kvmtrace.load(str(TDP / f"demo-{kernel}.kvt"))
    assert m.meta["kvm"]["mmu"] == "npt" and m.meta["kvm"]["tdp_mmu"]  # AMD NPT, TDP MMU
    f = m.faults[m.faults["pid"] == g["pid"]]
    assert len(f) == sum(s["expected_faults"] or 0 for s in g["slots"])
    assert (f["slot_row"] >= 0).all()
    per_slot = f.groupby(m.slots.loc[f["slot_row"], "slot"].to_numpy()).size().to_dict()
    assert per_slot == {s["slot"]: s["expected_faults"] for s in g["slots"]
                        if s["expected_faults"]}
    # every fault bounded by kvm_mmu_page_fault's entry and return (kprobes)
    assert (f["start_kind"] == "kvm_mmu_page_fault entry/return").all()
    assert (f["service_ns"] > 0).all()
    # the TDP MMU installs every fault's leaf; on NPT they are write-back RAM
    assert f["spte"].notna().all()


@pytest.mark.parametrize("kernel", ["6.1", "7.x"])
def test_report_runs(kernel):
    r = run("report", TDP / f"demo-{kernel}.kvt", "--width", "120")
    assert r.returncode == 0, r.stderr
    assert "kvm_mmu_page_fault" in r.stdout


# ------------------------------------------------ memory types on NPT (issue 8 item 3)

def _bar(kernel):
    g = json.loads((TDP / f"bar-{kernel}.guest.json").read_text())
    return g, kvmtrace.load(str(TDP / f"bar-{kernel}.kvt"))


@pytest.mark.parametrize("kernel", ["6.1", "7.x"])
def test_bar_memtypes_on_npt(kernel):
    """The test VMM's x86-bar scenario: a RAM slot and the ivshmem BAR through
    resource2 and resource2_wc. The VMA types come from vm_page_prot at the
    ioctl (PCD: UC-, PWT: WC, as the PAT memtype list showed for the BAR's
    two halves); every NPT leaf KVM installed has PAT:PCD:PWT = 0 (host PAT
    entry 0, WB: KVM sets no type); the verdict for the BAR is unknown (the
    guest's PAT and the host MTRRs decide), not "upgraded", and names the rule."""
    from kvmtrace.memtype import x86

    g, m = _bar(kernel)
    assert m.meta["kvm"]["mmu"] == "npt" and m.meta["kvm"]["vendor"] == "amd"
    slots = m.slots[m.slots["pid"] == g["pid"]].set_index("slot")
    kinds = {s["slot"]: s["backing"] for s in g["slots"]}
    assert [kinds[i] for i in (1, 2, 3)] == ["anon", "bar-uc", "bar-wc"]
    want_vma = {0: "WB", 1: "WB", 2: "UC-", 3: "WC"}
    assert slots["pgprot_memtype"].to_dict() == want_vma
    assert slots.loc[2, "vma"].endswith("/resource2")
    assert slots.loc[3, "vma"].endswith("/resource2_wc")
    for s in (2, 3):
        assert int(slots.loc[s, "vm_flags"]) & (1 << 10 | 1 << 14) == 1 << 10 | 1 << 14
    prot = {s: int(slots.loc[s, "vm_page_prot"]) & 0x98 for s in (1, 2, 3)}
    assert prot == {1: 0, 2: x86.PCD, 3: x86.PWT}

    f = m.faults[m.faults["pid"] == g["pid"]]
    per_slot = f.groupby("slot").size().to_dict()
    assert per_slot == {s["slot"]: s["expected_faults"] for s in g["slots"]}
    assert f["spte"].notna().all()
    sptes = f["spte"].astype("uint64").to_numpy()
    assert not (sptes & np.uint64(x86.PWT | x86.PCD | x86.PAT_4K)).any()
    # the BAR's frames, as KVM requested them: outside RAM, at the BAR
    bar = f[f["slot"].isin([2, 3])]
    assert (bar["pfn"].astype("int64") >= 0xfe800).all()
    assert (bar["pfn"].astype("int64") < 0xfe800 + 512).all()
    assert set(f["spte_memtype"].astype(str)) == {"WB"}
    # the rule, and what the host MTRRs (recorded with it) give each frame:
    # the BAR in the testbed's UC range, RAM in none
    uc = x86.NPT_RULE + x86.MTRR_SEP + "UC (0xc0000000-0x100000000 UC)"
    assert set(f.loc[f["slot"].isin([2, 3]), "rule"].astype(str)) == {uc}
    assert set(f.loc[f["slot"].isin([0, 1]), "rule"].astype(str)) == {
        x86.NPT_RULE + x86.MTRR_SEP + "no variable range covers it (the MTRR default type, "
        "which /proc/mtrr does not show)"}

    v = m.verdicts[m.verdicts["pid"] == g["pid"]].set_index("slot")
    assert v["verdict"].to_dict() == {0: "consistent", 1: "consistent", 2: "unknown",
                                      3: "unknown"}
    assert v["vma_memtype"].to_dict() == want_vma
    assert set(v["spte_memtype"]) == {"WB"}
    for s in v.index:
        assert "kernel rule: " + x86.NPT_RULE in v.loc[s, "reason"]
    assert "PAT index 2 (PCD) -> UC-" in v.loc[2, "reason"]
    assert "PAT index 1 (PWT) -> WC" in v.loc[3, "reason"]
    r = m.ranges[m.ranges["slot"].isin([2, 3])]
    assert set(r["verdict"]) == {"unknown"}
    assert not (m.verdicts["verdict"] == "upgraded").any()


@pytest.mark.parametrize("kernel", ["6.1", "7.x"])
def test_bar_host_side_recorded_with_the_fixture(kernel):
    """The host side kept next to the recording (bar-K.host.txt): the
    MTRRs make the BAR's range UC, and while the VMM held the BAR the PAT
    memtype list had its resource2 part uncached-minus and its resource2_wc
    part write-combining; SVM has no get_mt_mask in kallsyms."""
    text = (TDP / f"bar-{kernel}.host.txt").read_text()
    assert "reg00: base=0x0c0000000 ( 3072MB), size= 1024MB, count=1: uncachable" in text
    during = text.split("## pat_memtype_list while the VMM holds the BAR")[1]
    assert "[mem 0x00000000fe800000-0x00000000fe818000] uncached-minus" in during
    assert "[mem 0x00000000fe818000-0x00000000fe830000] write-combining" in during
    before = text.split("## pat_memtype_list before the VMM")[1].split("##")[0]
    assert "0x00000000fe8" not in before
    assert "Region 2: Memory at fe800000 (64-bit, prefetchable) [size=2M]" in text


@pytest.mark.parametrize("kernel", ["6.1", "7.x"])
def test_bar_report_text(kernel):
    r = run("report", TDP / f"bar-{kernel}.kvt", "--format", "tsv", "--table", "verdicts")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    head = rows[0]
    by_slot = {row[head.index("slot")]: row for row in rows[1:]}
    assert by_slot["2"][head.index("verdict")] == "unknown"
    assert "KVM sets no memory type in NPT entries" in by_slot["2"][head.index("reason")]
