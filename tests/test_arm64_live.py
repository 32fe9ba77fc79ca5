"""arm64 end to end on a real arm64 KVM host: record the built-in guest's
'bar' scenario with real kprobes and check the report against what the guest
did and against the running kernel's rules. Runs inside the emulated arm64
host (testbed/arm64/e2e runs it on 6.1 and 7.x; CI runs that through
tests/test_testbeds.py). Skipped on other architectures."""

import platform

import pytest

import kvmtrace
from kvmtrace.probes.events import VMA_STATUS

from conftest import guest_cmd, kvmtrace as run, load_json
from test_report_arm64 import check_bar_verdicts, check_slots_and_faults

pytestmark = pytest.mark.skipif(platform.machine() != "aarch64",
                                reason="needs an arm64 KVM host (see testbed/arm64)")


def kernel_label():
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return "7.x" if (major, minor) >= (6, 17) else "6.1"


def test_bar_end_to_end(tmp_path, live):
    out, rep = tmp_path / "bar.kvt", tmp_path / "bar.json"
    p = run("record", "-o", out, "--", *guest_cmd("--scenario", "bar", "-q", "--report", rep),
            timeout=600)
    assert p.returncode == 0, p.stderr
    m, g = kvmtrace.load(str(out)), load_json(rep)
    attached = m.meta["probes"]["attached"]
    for probe in ("kvm_pgtable_stage2_map", "kvm_handle_guest_abort",
                  "kvm_arch_prepare_memory_region", "prepare-vma", "kvm:kvm_guest_fault"):
        assert probe in attached
    check_slots_and_faults(m, g)
    check_bar_verdicts(m, g, kernel_label())
    # the VMA behind each memslot was looked up in BPF at the ioctl (no kprobe needed)
    assert m.meta["vma_lookup"]["available"], m.meta["vma_lookup"]
    ms = m.recording["memslot"]
    ok = ms[(ms["ret"] == 0) & (ms["size"] > 0)]
    assert (ok["vma_status"] == VMA_STATUS["FOUND"]).all()
    for s in g["slots"]:
        if s["status"] == "ok" and s.get("vma"):
            row = ok[ok["slot"] == s["slot"]].iloc[0]
            assert (row["vma_start"], row["vma_end"]) == (s["vma"]["start"], s["vma"]["end"])


def test_doctor_reports_cpu_and_kprobes(live):
    import json
    body = json.loads(run("doctor", "--format", "json", timeout=900).stdout)
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["attach kprobe"]["ok"] is True
    assert "DIC" in checks["arm64 CPU"]["detail"]


def test_cacheable_pfnmap_end_to_end(tmp_path, live):
    """The seed's case live: forced Device before 6.17, refused after (this CPU
    has no CTR_EL0.DIC)."""
    out, rep = tmp_path / "cbar.kvt", tmp_path / "cbar.json"
    p = run("record", "-o", out, "--", *guest_cmd("--scenario", "cbar", "-q", "--report", rep),
            timeout=900)
    assert p.returncode == 0, p.stderr
    m, g = kvmtrace.load(str(out)), load_json(rep)
    check_slots_and_faults(m, g)
    slot = next(s["slot"] for s in g["slots"] if s["backing"] == "bar-cacheable")
    v = m.verdicts.set_index("slot")
    if kernel_label() == "6.1":
        assert v.loc[slot, "verdict"] == "downgraded"
        assert "PFNMAP forced to Device" in v.loc[slot, "reason"]
    else:
        assert v.loc[slot, "verdict"] == "rejected"
        assert "kvm_arch_prepare_memory_region refused" in v.loc[slot, "reason"]
