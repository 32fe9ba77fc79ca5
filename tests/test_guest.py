"""Tests of testvmm, the test VMM (the built-in guest kvmtrace is checked against).

The live tests run real guests on this machine's /dev/kvm; they are skipped
only when /dev/kvm is absent, and fail instead when KVMTRACE_REQUIRE_LIVE=1.
Where bpftrace is installed, kvmmmu:kvm_mmu_set_spte is counted per gfn by
bpftrace as an independent witness and compared with each slot's
expected_faults (gfn -> slot through the report's GPA ranges).
"""

import errno
import functools
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

from kvmtrace import kvmapi  # noqa: E402
from testvmm import faults, scenario, x86  # noqa: E402
from testvmm.scenario import Scenario, ScenarioError, Step  # noqa: E402

from conftest import SpteCounter  # noqa: E402

REQUIRE_LIVE = os.environ.get("KVMTRACE_REQUIRE_LIVE") == "1"
TRACEPOINT = "/sys/kernel/tracing/events/kvmmmu/kvm_mmu_set_spte"


def guest(*args, timeout=60):
    """Run `python -m testvmm ARGS`; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "testvmm", *args], cwd=ROOT,
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
    assert faults.expected_faults("anon", 0, [(0, "r")], "shadow")["total"] is None
    # TDP (measured in testbed/x86): no guest-page-table effects in data slots;
    # shared memory read first maps writable; a THP frame read first: not measured
    tdp = functools.partial(faults.expected_faults, mmu="tdp")
    assert tdp("anon", 0, [(0, "r"), (0, "w"), (1, "rw"), (2, "x")])["total"] == 5
    assert tdp("memfd", 0, [(0, "r"), (0, "w"), (1, "rw")])["total"] == 2
    assert tdp("thp", 0, [(0, "w"), (1, "r")])["levels"] == {2: 1}
    assert tdp("thp", 0, [(0, "r"), (1, "w")])["total"] is None
    sys_ = tdp("anon", 0, [(13, "x")], role="system", extra={"page_tables_walked": [1, 2, 3, 4]})
    assert sys_["total"] == 5
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


def test_cli_usage(capsys):
    from testvmm.__main__ import main

    assert main(["--help"]) == 0
    assert "--scenario" in capsys.readouterr().out
    assert main(["--no-such-option"]) == 2
    assert main(["--scenario", "no-such-scenario"]) == 2
    assert main(["--slot", "anon:4:q"]) == 2
    assert "bad scenario" in capsys.readouterr().err


def test_witness_shares_only_the_kvm_abi():
    """testvmm imports the standard library and kvmtrace.kvmapi only (click for
    its command line), and defines no name kvmtrace.kvmapi defines: KVM's ABI
    is written down once, so the tracer and its witness cannot agree on a
    wrong number."""
    import ast
    import types

    abi = {n for n, v in vars(kvmapi).items()
           if not n.startswith("__") and not isinstance(v, types.ModuleType)}
    for path in sorted((ROOT / "testvmm").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [(node.module, a.name) for a in node.names]
            else:
                continue
            for mod, name in mods:
                top = mod.split(".")[0]
                assert (top in sys.stdlib_module_names or mod == "kvmtrace.kvmapi"
                        or (mod, name) == ("kvmtrace", "kvmapi")
                        or (top == "click" and path.name == "__main__.py")), (path.name, mod)
        defined = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        defined.add(n.id)
        assert not defined & abi, (path.name, sorted(defined & abi))


def test_not_in_the_wheel():
    """pyproject packages kvmtrace* only: the test VMM runs from a checkout."""
    import tomllib

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]
    assert find["include"] == ["kvmtrace*"] and "testvmm*" in find.get("exclude", [])


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
    want = {s["slot"]: s["expected_set_spte"] for s in report["slots"]}
    assert got == want and stray == 0
    assert levels.get(report["pid"]) == {1: report["expected_set_spte_total"]}
    assert report["expected_set_spte_total"] == report["expected_faults_total"]  # no prefetch


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


def _vcpu_thread_running(pid):
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith("kvmtrace-vcpu"):
                    return True
    except OSError:
        pass
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_signal_mid_run_ends_cleanly(sig):
    """A stop signal while the vCPU thread runs (kvmtrace record's stop paths
    send SIGTERM): exit 128 + signal, one line, no traceback from the vCPU
    thread (it used to die on its closed kvm_run mapping)."""
    require_kvm()
    for _ in range(5 if sig == signal.SIGTERM else 2):
        # a read-only slot written page by page: one MMIO exit per page, so the
        # vCPU thread is busy in Python when the signal comes
        p = subprocess.Popen([sys.executable, "-m", "testvmm", "--slot", "anon:65536:w:ro"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        deadline = time.monotonic() + 20
        while not _vcpu_thread_running(p.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 128 + sig, err
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == f"testvmm: stopped by {sig.name}", err


def test_timeout_ends_a_running_guest(tmp_path):
    require_kvm()
    proc, report = run_guest_json(tmp_path, "--slot", "anon:65536:w:ro", "--timeout", "0.2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert report["vcpus"][0]["error"].startswith("timed out after 0.2 s"), report["errors"]


def test_hold_keeps_mappings_alive(tmp_path):
    require_kvm()
    out = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, "-m", "testvmm", "--scenario", "minimal",
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


# --------------------------------------------------- 2 MiB guest pages, diff pairs


class FaultCounter(SpteCounter):
    """bpftrace counting kvm_mmu_set_spte and kvm_mmu_spte_requested by (pid, gfn, level)."""

    PROGRAM = r"""
    BEGIN { printf("ready\n"); }
    tracepoint:kvmmmu:kvm_mmu_set_spte /strncmp(comm, "kvmtrace-vcpu", 13) == 0/ {
        @set[pid, args->gfn, args->level] = count();
    }
    tracepoint:kvmmmu:kvm_mmu_spte_requested /strncmp(comm, "kvmtrace-vcpu", 13) == 0/ {
        @req[pid, args->gfn, args->level] = count();
    }
    """

    def stop(self):
        """{"set" / "req": {pid: [(gfn, level, count)]}}"""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=20)
        tables = {"set": {}, "req": {}}
        for line in out.splitlines():
            for name, table in tables.items():
                if line.startswith("@%s[" % name):
                    key, value = line[len(name) + 2:].split("]:")
                    pid, gfn, level = (int(x) for x in key.split(","))
                    table.setdefault(pid, []).append((gfn, level, int(value)))
        return tables


def per_slot_levels(report, rows):
    """{slot: {level: count}} for (gfn, level, count) rows of one pid; stray under None."""
    got = {}
    for gfn, level, n in rows:
        slot = next((s["slot"] for s in report["slots"] if s["status"] == "ok"
                     and s["gpa"] <= gfn << 12 < s["gpa"] + s["size"]), None)
        levels = got.setdefault(slot, {})
        levels[level] = levels.get(level, 0) + n
    return got


def int_keys(d):
    return {int(k): v for k, v in d.items()}


def test_gpage2m_spec_and_checks():
    sc = Scenario("t")
    scenario.add_slot_spec(sc, "thp:1024:w:gpage2m")
    scenario.add_slot_spec(sc, "anon:512:r:gpage2m,dirty")
    sc.validate().layout()
    assert [(s.backing, s.gpage2m, s.log_dirty) for s in sc.slots] == [
        ("thp", True, False), ("anon", True, True)]
    assert Scenario.from_dict(json.loads(json.dumps(sc.to_dict()))) == sc
    for bad in ("anon:1000:w:gpage2m", "pfnmap:512:r:gpage2m", "anon:512:r:gpage3m"):
        sc2 = Scenario("t")
        with pytest.raises(ScenarioError):
            scenario.add_slot_spec(sc2, bad)
            sc2.validate()


def test_page_tables_with_2m_pages():
    mem = bytearray(32 * 4096)
    pages, frames = list(range(16)), [8, 9]  # 4 KiB pages below 64 KiB; 16 and 18 MiB
    assert x86.page_table_pages(pages, frames) == 4  # PML4, PDPT, one PD, one PT
    cr3, tables = x86.build_page_tables(mem, 0, iter(range(16 * 4096, 32 * 4096, 4096)),
                                        pages, frames)
    assert len(tables) == 4

    def entry(table, index):
        return int.from_bytes(mem[table + 8 * index:table + 8 * index + 8], "little")

    pd = entry(entry(cr3, 0) & ~0xFFF, 0) & ~0xFFF
    flags = x86.PTE_P | x86.PTE_W | x86.PTE_US
    assert entry(pd, 8) == (8 << 21) | flags | x86.PTE_PS
    assert entry(pd, 9) == (9 << 21) | flags | x86.PTE_PS
    assert not entry(pd, 0) & x86.PTE_PS  # the 4 KiB pages go through a page table
    assert entry(entry(pd, 0) & ~0xFFF, 5) == (5 << 12) | flags
    with pytest.raises(ValueError):
        x86.build_page_tables(bytearray(32 * 4096), 0, iter(range(16 * 4096, 32 * 4096, 4096)),
                              pages, [0])


def test_fault_rule_2m_guest_pages():
    """The measured 2 MiB rules on the measured access sequences (see faults.py)."""
    def rule(kind, flags, touched):
        d = faults.expected_faults(kind, flags, touched, "pvm-shadow", gpage2m=True)
        return d["total"], d["levels"], d["set_spte"]

    def two_frames(access):
        return [(p, access) for p in (0, 1, 2, 3, 512, 513, 514, 515)]

    # 2 MiB host pages: one level-2 fault per frame and access kind
    assert rule("thp", 0, two_frames("w")) == (2, {2: 2}, 2)
    assert rule("hugetlb", 0, two_frames("r") + two_frames("w")) == (4, {2: 4}, 4)
    assert rule("thp", 0, two_frames("rw")) == (4, {2: 4}, 4)
    assert rule("thp", 0, two_frames("w") + two_frames("r")) == (2, {2: 2}, 2)
    # dirty logging or 4 KiB host pages: 4 KiB sptes
    assert rule("thp", kvmapi.KVM_MEM_LOG_DIRTY_PAGES, two_frames("w")) == (8, {1: 8}, 8)
    assert rule("anon", 0, two_frames("rw")) == (16, {1: 16}, 16)
    assert rule("memfd", 0, two_frames("rw")) == (10, {1: 10}, 10)  # reads map writable
    seq = [(p, "r") for p in range(8)] + [(0, "w")] + [(p, "r") for p in range(1, 8)]
    assert rule("anon", 0, seq) == (16, {1: 16}, 16)  # the write drops the read sptes
    assert rule("memfd", 0, seq) == (9, {1: 9}, 16)  # ... and prefetches 1-7 writable
    assert rule("thp", 0, seq) == (2, {2: 2}, 2)
    assert rule("memfd", kvmapi.KVM_MEM_LOG_DIRTY_PAGES, seq) == (16, {1: 16}, 16)
    stubs = [(0, "r"), (1, "x"), (2, "x"), (3, "x"), (5, "x")]  # VMM wrote 1, 2, 3, 5
    assert rule("anon", 0, stubs) == (2, {1: 2}, 5)
    assert rule("thp", kvmapi.KVM_MEM_LOG_DIRTY_PAGES, stubs) == (1, {1: 1}, 8)
    assert faults.expected_dirty_pages("memfd", 1, seq, gpage2m=True) == list(range(8))
    assert faults.expected_dirty_pages("anon", 1, seq, gpage2m=True) == [0]
    ro = faults.expected_faults("anon", kvmapi.KVM_MEM_READONLY, [(0, "r")], "pvm-shadow",
                                gpage2m=True)
    assert ro["total"] is None and ro["rule"].startswith("not measured")


def test_diff_pairs_share_gpa_ranges():
    assert {n for pair in scenario.DIFF_PAIRS for n in pair} <= set(scenario.BUILTIN)
    for a, b in scenario.DIFF_PAIRS:
        sa, sb = (scenario.builtin(n).validate().layout() for n in (a, b))
        assert [(s.gpa, s.size()) for s in sa.slots] == [(s.gpa, s.size()) for s in sb.slots]


# what each pair must differ in (expected faults by level of slot 1, dirty pages)
PAIR_EXPECT = {
    "huge-base": {2: 2}, "huge-4k": {1: 64},
    "dirty-off": {2: 4}, "dirty-on": {1: 64},
    "ram": {1: 2}, "pfnmap": {1: 2},
    "pages-1x": {1: 32}, "pages-2x": {1: 64},
}
CUSTOM_RUNS = {
    # prefetch into a writable direct shadow page, writable-on-read under dirty logging
    "memfd-seq": ["--slot", "memfd:512:-:gpage2m", "--access", "1:0:8:r", "--access",
                  "1:0:1:w", "--access", "1:1:7:r", "--slot", "memfd:512:-:gpage2m,dirty",
                  "--access", "2:0:8:r", "--access", "2:0:1:w", "--access", "2:1:7:r"],
    "stubs": ["--slot", "anon:512:r:gpage2m", "--slot", "thp:512:-:gpage2m,dirty",
              "--access", "2:0:1:r", "--access", "2:1:3:x", "--access", "2:5:1:x",
              "--slot", "hugetlb:512:r+w:gpage2m"],  # hugetlb: only with reserved pages
}


@pytest.fixture(scope="module")
def pair_runs(tmp_path_factory):
    """Every diff-pair scenario and the custom 2 MiB runs, under one bpftrace."""
    require_kvm()
    tmp = tmp_path_factory.mktemp("pairs")
    counter = FaultCounter() if bpftrace_usable() else None
    runs = {}
    try:
        for name in PAIR_EXPECT:
            runs[name] = run_guest_json(tmp, "--scenario", name, "-q")
        for name, args in CUSTOM_RUNS.items():
            runs[name] = run_guest_json(tmp, "-q", *args)
    finally:
        counts = counter.stop() if counter else None
    return runs, counts


def test_pair_scenarios_run_as_expected(pair_runs):
    runs, _ = pair_runs
    for name, (proc, report) in runs.items():
        assert proc.returncode == 0 and report["ok"], (name, proc.stderr, report["errors"])
        if name in PAIR_EXPECT:
            data = [s for s in report["slots"] if s["role"] == "data"]
            assert len(data) == 1 and data[0]["gpa"] == scenario.PAIR_GPA
            assert int_keys(data[0]["expected_levels"]) == PAIR_EXPECT[name], name
    slot = {n: runs[n][1]["slots"][1] for n in PAIR_EXPECT}
    assert slot["huge-base"]["host_pages"]["ok"] and slot["dirty-on"]["host_pages"]["ok"]
    assert slot["huge-base"]["guest_page_size"] == 2 << 20
    assert slot["huge-4k"]["vma"]["anon_huge_kb"] == 0
    dirty = slot["dirty-on"]
    assert dirty["dirty_pages"] == dirty["expected_dirty_pages"] and len(dirty["dirty_pages"]) == 32
    assert slot["dirty-off"]["dirty_pages"] is None
    assert {"pf", "io"} <= set(slot["pfnmap"]["vma"]["vm_flags"])
    assert not {"pf", "io"} & set(slot["ram"]["vma"]["vm_flags"])
    assert slot["ram"]["touched"] == slot["pfnmap"]["touched"] == {"r": [0, 2]}
    seq = runs["memfd-seq"][1]["slots"]
    assert seq[2]["dirty_pages"] == seq[2]["expected_dirty_pages"] == list(range(8))
    assert (seq[1]["expected_faults"], seq[1]["expected_set_spte"]) == (9, 16)


def test_pair_faults_counted_by_bpftrace(pair_runs):
    runs, counts = pair_runs
    if counts is None:
        pytest.skip("bpftrace or the kvmmmu tracepoints are not available")
    for name, (_, report) in runs.items():
        if report["mmu"] not in faults.MEASURED_MMUS:
            pytest.skip("no measured fault rule for MMU %r" % report["mmu"])
        got_set = per_slot_levels(report, counts["set"].get(report["pid"], []))
        got_req = per_slot_levels(report, counts["req"].get(report["pid"], []))
        assert None not in got_set and None not in got_req, name
        for s in report["slots"]:
            d = s["expected_faults_detail"]
            assert got_req.get(s["slot"], {}) == int_keys(d["levels"]), (name, s["slot"])
            assert got_set.get(s["slot"], {}) == int_keys(d["set_spte_levels"]), (name, s["slot"])
