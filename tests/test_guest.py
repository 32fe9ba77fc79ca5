"""Tests of kvmtrace.guest, the built-in guest.

The live tests run real guests on this machine's /dev/kvm; they are skipped
only when /dev/kvm is absent, and fail instead when KVMTRACE_REQUIRE_LIVE=1.
Where bpftrace is installed, kvmmmu:kvm_mmu_set_spte is counted per gfn by
bpftrace as an independent witness and compared with each slot's
expected_faults (gfn -> slot through the report's GPA ranges).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvmtrace.guest import faults, kvmapi, scenario, x86  # noqa: E402
from kvmtrace.guest.scenario import Scenario, ScenarioError, Step  # noqa: E402

from conftest import SpteCounter  # noqa: E402

REQUIRE_LIVE = os.environ.get("KVMTRACE_REQUIRE_LIVE") == "1"
TRACEPOINT = "/sys/kernel/tracing/events/kvmmmu/kvm_mmu_set_spte"


def guest(*args, timeout=60):
    """Run `python -m kvmtrace.guest ARGS`; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "kvmtrace.guest", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def require_kvm():
    if not os.path.exists("/dev/kvm"):
        if REQUIRE_LIVE:
            pytest.fail("/dev/kvm is absent and KVMTRACE_REQUIRE_LIVE=1")
        pytest.skip("no /dev/kvm on this machine")


def run_guest_json(tmp_path, *args):
    out = tmp_path / "report.json"
    proc = guest("--report", str(out), *args)
    assert out.exists(), proc.stderr
    return proc, json.loads(out.read_text())


def bpftrace_usable():
    return shutil.which("bpftrace") and os.path.isdir(TRACEPOINT) and os.geteuid() == 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo scenario, run once (under bpftrace when it can be)."""
    require_kvm()
    tmp = tmp_path_factory.mktemp("demo")
    counter = SpteCounter() if bpftrace_usable() else None
    try:
        proc, report = run_guest_json(tmp, "--scenario", "demo")
    finally:
        counts = counter.stop() if counter else None
    return proc, report, counts


# ----------------------------------------------------------------- no KVM needed


def test_uapi_layouts():
    assert kvmapi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvmapi.KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
    assert kvmapi.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert kvmapi.KVM_CHECK_EXTENSION == 0xAE03
    assert kvmapi.KVM_CREATE_VM == 0xAE01 and kvmapi.KVM_RUN == 0xAE80
    assert x86.KVM_SET_SREGS == 0x4138AE84 and x86.KVM_SET_REGS == 0x4090AE82
    assert (kvmapi.KVM_MEM_LOG_DIRTY_PAGES, kvmapi.KVM_MEM_READONLY,
            kvmapi.KVM_MEM_GUEST_MEMFD) == (1, 2, 4)
    assert kvmapi.KVM_CAP_USER_MEMORY2 == 231
    assert kvmapi.mem_flag_names(3) == ["LOG_DIRTY_PAGES", "READONLY"]


def test_builtin_scenarios_validate_and_lay_out():
    for name in scenario.BUILTIN:
        sc = scenario.builtin(name).validate().layout()
        ranges = sorted((s.gpa, s.gpa + s.size()) for s in sc.slots)
        assert all(gpa % (2 << 20) == 0 for gpa, _ in ranges)
        assert all(a_end <= b for (_, a_end), (b, _) in zip(ranges, ranges[1:]))
        assert ranges[0][0] >= scenario.DATA_BASE_GPA
        assert Scenario.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
    demo_sc = scenario.demo()
    assert {s.backing for s in demo_sc.slots} == set(scenario.KINDS)
    assert {st.access for st in demo_sc.steps} == set(scenario.ACCESSES)
    assert {c.kind for c in demo_sc.changes} == set(scenario.CHANGE_KINDS)


def test_cli_specs():
    sc = Scenario("t")
    scenario.add_slot_spec(sc, "anon:64:rw")
    scenario.add_slot_spec(sc, "memfd:32:r+w:region2")
    scenario.add_slot_spec(sc, "anon:16::ro,dirty")
    scenario.add_access_spec(sc, "3:2:4:x")
    scenario.add_change_spec(sc, "move:2:recreate")
    sc.validate().layout()
    assert [(s.backing, s.npages, s.readonly, s.log_dirty, s.region2) for s in sc.slots] == [
        ("anon", 64, False, False, False), ("memfd", 32, False, False, True),
        ("anon", 16, True, True, False)]
    assert [(st.slot, st.first, st.npages, st.access) for st in sc.steps] == [
        (1, 0, 64, "rw"), (2, 0, 32, "r"), (2, 0, 32, "w"), (3, 2, 4, "x")]
    assert sc.changes[0].gpa > max(s.gpa for s in sc.slots)
    for bad in ("anon", "anon:x", "anon:4:q", "anon:4:r:bogus", "nope:4"):
        sc2 = Scenario("t")
        with pytest.raises(ScenarioError):
            scenario.add_slot_spec(sc2, bad)
            sc2.validate()


@pytest.mark.parametrize("mutate", [
    lambda sc: sc.steps.append(Step(1, 10, 10, "r")),  # beyond the slot
    lambda sc: sc.steps.append(Step(9, 0, 1, "r")),  # no such slot
    lambda sc: sc.steps.append(Step(1, 0, 1, "q")),  # no such access
    lambda sc: setattr(sc, "vcpus", 0),
])
def test_scenario_rejects(mutate):
    sc = Scenario("t")
    sc.add_slot("anon", 16)
    mutate(sc)
    with pytest.raises(ScenarioError):
        sc.validate()


def test_two_vcpus_may_not_share_a_page():
    sc = Scenario("t", vcpus=2)
    sc.add_slot("anon", 4)
    sc.steps += [Step(1, 0, 2, "w", vcpu=0), Step(1, 1, 2, "w", vcpu=1)]
    with pytest.raises(ScenarioError, match="two vCPUs"):
        sc.validate()


def test_fault_rule():
    """The measured rule, on hand-made access sequences (see faults.py)."""
    def total(kind, flags, touched):
        return faults.expected_faults(kind, flags, touched, "pvm-shadow")["total"]

    assert total("anon", 0, [(0, "r"), (1, "w"), (2, "rw"), (3, "x")]) == 5
    assert total("anon", 0, [(0, "r"), (0, "w")]) == 2  # upgrade fault
    assert total("anon", 0, [(0, "w"), (0, "r"), (0, "x")]) == 1
    assert total("anon", 0, [(0, "x"), (0, "rw")]) == 2
    assert total("anon", kvmapi.KVM_MEM_LOG_DIRTY_PAGES, [(0, "w"), (1, "r")]) == 2
    ro = faults.expected_faults("anon", kvmapi.KVM_MEM_READONLY,
                                [(0, "w"), (0, "r"), (1, "rw"), (2, "x")], "pvm-shadow")
    assert (ro["total"], ro["mmio_exits"]) == (3, 2)
    assert total("pfnmap", 0, [(0, "r"), (0, "w")]) == 1
    assert faults.expected_faults("anon", 0, [(0, "r")], "tdp")["total"] is None
    assert faults.expected_dirty_pages("anon", 1, [(0, "r"), (1, "w"), (2, "rw")]) == [1, 2]


def test_codegen_program_shape():
    code = x86.gen_program([(0x1000000, 4, "w"), (0x2000000, 1, "x")], done_port=0x10)
    assert code.startswith(b"\x49\xb8")  # mov r8, tag
    assert code.endswith(b"\xb0\x00\xe6\x10\xeb\xfe")  # mov al,0; out 0x10,al; jmp $
    assert (0x1000000).to_bytes(8, "little") in code


def test_bad_scenario_is_one_line_error():
    proc = guest("--slot", "anon:4:q")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_missing_kvm_is_one_line_error():
    proc = guest("--scenario", "minimal", "--device", "/nonexistent/kvm")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_list_scenarios():
    proc = guest("--list")
    assert proc.returncode == 0
    assert set(json.loads(proc.stdout)) == set(scenario.BUILTIN)


# ------------------------------------------------------------------------ live


def test_demo_runs_to_done(demo):
    proc, report, _ = demo
    assert proc.returncode == 0, proc.stderr
    assert report["ok"] and report["errors"] == []
    assert [v["done"] for v in report["vcpus"]] == [True]
    assert report["vcpus"][0]["tid"] and report["vcpus"][0]["tid"] != report["pid"]
    io = report["exits"]["io"]
    assert io[-1]["port"] == x86.X86Arch.done_port and io[-1]["out"]
    assert report["kvm_fd"] >= 0 and report["vm_fd"] >= 0


def test_demo_slots_match_scenario(demo):
    _, report, _ = demo
    sc = Scenario.from_dict(report["scenario"])
    data = {s["slot"]: s for s in report["slots"] if s["role"] == "data"}
    assert sorted(data) == sorted(s.slot for s in sc.slots)
    for spec in sc.slots:
        s = data[spec.slot]
        assert s["backing"] == spec.backing and s["gpa"] == spec.gpa
        if s["status"] == "unavailable":
            assert spec.backing == "hugetlb" and s["unavailable_reason"]
            continue
        assert s["status"] == "ok" and s["hva"] and s["size"]
        assert s["size"] == spec.size() or spec.backing == "pfnmap"
        assert bool(s["flags"] & 2) == spec.readonly and bool(s["flags"] & 1) == spec.log_dirty
        vma = s["vma"]
        assert vma["start"] <= s["hva"] and s["hva"] + s["size"] <= vma["end"]
        if spec.backing == "pfnmap":
            assert vma["name"] == "[vvar]" and {"pf", "io"} <= set(vma["vm_flags"])
        elif spec.backing == "memfd":
            assert vma["name"].startswith("/memfd:kvmtrace-guest-slot%d" % spec.slot)
        elif spec.backing == "file":
            assert vma["name"] == s["path"] and "sh" in vma["vm_flags"]
        elif spec.backing in ("anon", "thp"):
            assert vma["name"] == "" and (vma["start"], vma["end"]) == (s["hva"], s["hva"] + s["size"])
        touched = sum(s["touched_counts"].values()) + len(s["skipped"])
        assert touched == sum(st.npages for st in sc.steps if st.slot == spec.slot)
    # memslot ioctls: the setup ones created every available slot; one used MEMORY2
    ioctls = report["memslot_ioctls"]
    setup = [i for i in ioctls if i["phase"] == "setup"]
    assert [i["slot"] for i in setup] == [0] + [k for k in sorted(data)
                                               if data[k]["status"] == "ok"]
    if report["caps"]["USER_MEMORY2"]:
        assert "KVM_SET_USER_MEMORY_REGION2" in {i["ioctl"] for i in setup}
    assert all(i["errno"] == i["expected_errno"] for i in ioctls)
    changes = {i["change"]: i for i in ioctls if i["phase"] == "change"}
    assert changes["fail-overlap"]["errno"] == errno.EEXIST
    assert changes["fail-misaligned"]["errno"] == errno.EINVAL
    assert changes["delete"]["size"] == 0
    assert changes["flags"]["flags"] & kvmapi.KVM_MEM_LOG_DIRTY_PAGES


def test_demo_guest_writes_visible_in_host_memory(demo):
    _, report, _ = demo
    checked = [s for s in report["slots"] if s["write_check"]]
    assert len(checked) >= 5
    for s in checked:
        assert s["write_check"]["ok"], s
    by_kind = {(s["backing"], bool(s["flags"] & 2)): s["write_check"] for s in checked}
    assert by_kind[("memfd", False)]["expect_in_host_memory"]
    assert not by_kind[("anon", True)]["expect_in_host_memory"]  # read-only slot


def test_demo_exits_and_dirty_log(demo):
    _, report, _ = demo
    mmio = sum(s["expected_faults_detail"]["mmio_exits"] for s in report["slots"])
    assert report["exits"]["counts"].get("MMIO", 0) == mmio > 0
    assert all(m["write"] for m in report["exits"]["mmio"])
    dirty = [s for s in report["slots"] if s["dirty_pages"] is not None]
    assert dirty and all(s["dirty_pages"] == s["expected_dirty_pages"] for s in dirty)
    assert any(s["dirty_pages"] for s in dirty)


def test_demo_faults_counted_by_bpftrace(demo):
    _, report, counts = demo
    if counts is None:
        pytest.skip("bpftrace or the kvmmmu tracepoints are not available")
    if report["mmu"] not in faults.MEASURED_MMUS:
        pytest.skip("no measured fault rule for MMU %r" % report["mmu"])
    sptes, levels = counts
    per_gfn = sptes.get(report["pid"], {})
    got = {s["slot"]: 0 for s in report["slots"]}
    stray = 0
    for gfn, n in per_gfn.items():
        gpa = gfn << 12
        for s in report["slots"]:
            if s["status"] == "ok" and s["gpa"] <= gpa < s["gpa"] + s["size"]:
                got[s["slot"]] += n
                break
        else:
            stray += n
    want = {s["slot"]: s["expected_faults"] for s in report["slots"]}
    assert got == want and stray == 0
    assert levels.get(report["pid"]) == {1: report["expected_faults_total"]}


def test_minimal_custom_and_smp(tmp_path):
    require_kvm()
    proc, report = run_guest_json(tmp_path, "--slot", "anon:8:rw", "--slot", "memfd:4:r:ro",
                                  "--change", "move:1:recreate", "--change", "delete:2")
    assert proc.returncode == 0, proc.stderr
    ops = [(i["change"], i["size"] > 0) for i in report["memslot_ioctls"] if i["change"]]
    assert ops == [("move", False), ("move", True), ("delete", False)]
    slot1 = report["slots"][1]
    assert slot1["final"]["gpa"] != slot1["gpa"] and slot1["final"]["present"]
    assert not report["slots"][2]["final"]["present"]

    proc, report = run_guest_json(tmp_path, "--scenario", "smp")
    assert proc.returncode == 0, proc.stderr
    tids = {v["tid"] for v in report["vcpus"]}
    assert len(tids) == 2 and all(v["done"] for v in report["vcpus"])
    system = report["slots"][0]
    assert system["expected_faults"] == len(system["code"]) == 2


def test_hold_keeps_mappings_alive(tmp_path):
    require_kvm()
    out = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, "-m", "kvmtrace.guest", "--scenario", "minimal",
                          "--report", str(out), "--hold", "2", "-q"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        report = json.loads(out.read_text())
        maps = Path("/proc/%d/maps" % report["pid"]).read_text()
        slot = report["slots"][1]
        assert "%x-" % slot["hva"] in maps
        assert p.wait(timeout=15) == 0
    finally:
        p.kill()
