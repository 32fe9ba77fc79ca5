"""Reports of real recordings from an x86 host with nested paging (the
emulated AMD host of testbed/x86, Debian 6.1 and 7.3.4; see
tests/fixtures/x86-tdp/README.md for the command that made them): the TDP
MMU's pairing, the kprobe-bounded service times and the faults per slot,
offline, against the test VMM's own account of each run."""

import json

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
