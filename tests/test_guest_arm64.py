"""Tests of the arm64 side of testvmm, the test VMM.

Offline (any host): the A64 encoder against words checked with binutils
(aarch64-linux-gnu-as / objdump, 2.40), the generated program and vector
table, the KVM register ids, the measured stage-2 rule for 6.1 and 7.x on
the access sequences it was measured on, the arm64 scenarios, the BAR
backing over a fake sysfs device (regular files), and the tiny guest of the
testbed's smoke check (testvmm.tiny).

Live: only on aarch64 with /dev/kvm (e.g. inside testbed/arm64/run); skipped
elsewhere, and on aarch64 a missing /dev/kvm fails instead of skipping when
KVMTRACE_REQUIRE_LIVE=1. Where the kernel has a measured rule and tracefs
kprobes work (root), kvm_pgtable_stage2_map / _relax_perms calls and
kvm:kvm_guest_fault events are counted per slot as an independent witness.

    testbed/arm64/run --kernel 6.1 -- python3 -m pytest -q tests/test_guest_arm64.py
"""

import errno
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testvmm import arm64, backings, faults, scenario, tiny  # noqa: E402
from testvmm.scenario import Scenario, ScenarioError, Step  # noqa: E402

REQUIRE_LIVE = os.environ.get("KVMTRACE_REQUIRE_LIVE") == "1"
IS_ARM64 = platform.machine() in ("aarch64", "arm64")
# the testbed's host: THP always, shmem THP never (what the rule was measured with)
TESTBED_THP = {"enabled": "always", "shmem_enabled": "never"}


# ------------------------------------------------------------------ encoder

# (words from the encoder, objdump's disassembly of the same source line)
ENCODINGS = [
    (arm64.movz(8, 0x4B56, 48), 0xD2E96AC8),  # mov x8, #0x4b56000000000000
    (arm64.movk(8, 0x5400, 32), 0xF2CA8008),  # movk x8, #0x5400, lsl #32
    (arm64.movz(0, 0x100, 16), 0xD2A02000),  # mov x0, #0x1000000
    (arm64.movk(0, 0x1234), 0xF2824680),  # movk x0, #0x1234
    (arm64.movz(9, 0x40, 32), 0xD2C00809),  # mov x9, #0x4000000000
    (arm64.movz(2, 0), 0xD2800002),  # mov x2, #0x0
    (arm64.ldr(2, 0), 0xF9400002),  # ldr x2, [x0]
    (arm64.ldr(2, 0, 8), 0xF9400402),  # ldr x2, [x0, #8]
    (arm64.str_(2, 0), 0xF9000002),  # str x2, [x0]
    (arm64.str_(9, 10), 0xF9000149),  # str x9, [x10]
    (arm64.orr(2, 0, 8), 0xAA080002),  # orr x2, x0, x8
    (arm64.add_imm(3, 0, 0x800), 0x91200003),  # add x3, x0, #0x800
    (arm64.add_imm(0, 0, 1, shift12=True), 0x91400400),  # add x0, x0, #0x1, lsl #12
    (arm64.subs_imm(1, 1, 1), 0xF1000421),  # subs x1, x1, #0x1
    (arm64.blr(3), 0xD63F0060),  # blr x3
    (arm64.br(30), 0xD61F03C0),  # br x30
    (arm64.br(9), 0xD61F0120),  # br x9
    (arm64.ret(), 0xD65F03C0),  # ret
    (arm64.mrs_esr_el1(9), 0xD5385209),  # mrs x9, esr_el1
    (arm64.mrs(0, 3, 3, 0, 0, 1), 0xD53B0020),  # mrs x0, ctr_el0
    (arm64.mrs_ctr_el0(0), 0xD53B0020),  # mrs x0, ctr_el0
    (arm64.b(0), 0x14000000),  # b .
    (arm64.b(-12), 0x17FFFFFD),  # b .-12
    (arm64.b_cond("ne", -16), 0x54FFFF81),  # b.ne .-16
    (arm64.b_cond("ne", 8), 0x54000041),  # b.ne .+8
    (arm64.NOP, 0xD503201F),  # nop
]


@pytest.mark.parametrize("got,want", ENCODINGS, ids=["%08x" % w for _, w in ENCODINGS])
def test_encoder_matches_binutils(got, want):
    assert got == want


def test_mov_imm_picks_halfwords():
    assert arm64.mov_imm(1, 16) == [0xD2800201]  # mov x1, #0x10
    assert arm64.mov_imm(0, 0) == [arm64.movz(0, 0)]
    assert arm64.mov_imm(8, arm64.WRITE_TAG) == [0xD2CA8008, 0xF2E96AC8]
    assert arm64.mov_imm(9, 0x1_0002_0003_0004) == [
        arm64.movz(9, 4), arm64.movk(9, 3, 16), arm64.movk(9, 2, 32), arm64.movk(9, 1, 48)]
    with pytest.raises(ValueError):
        arm64.ldr(32, 0)


def words(code):
    return [int.from_bytes(code[i:i + 4], "little") for i in range(0, len(code), 4)]


def test_tiny_guest_code():
    """testvmm.tiny's program, as it was hand-assembled (objdump -D -b binary -m aarch64)."""
    assert tiny.CODE == [
        0xD2A20020,  # movz x0, #0x1001, lsl #16      x0 = 0x10010000
        0xD2800201,  # movz x1, #16
        0xF9000001,  # loop: str x1, [x0]
        0x91400400,  # add  x0, x0, #0x1000
        0xF1000421,  # subs x1, x1, #1
        0x54FFFFA1,  # b.ne loop
        0xD2A60003,  # movz x3, #0x3000, lsl #16      BAR via resource2
        0xF9000061,  # str  x1, [x3]
        0xD2A60404,  # movz x4, #0x3020, lsl #16      BAR via resource2_wc
        0xF9000081,  # str  x1, [x4]
        0xD2A40002,  # movz x2, #0x2000, lsl #16      unmapped: KVM_EXIT_MMIO
        0xF9000041,  # str  x1, [x2]
        0x14000000,  # b .
    ]
    assert [tiny.region_of(a) for a in (0x10000000, 0x10010000, 0x3000_0000, 0x3020_0000,
                                        0x2000_0000)] == [
        "code page", "RAM data", "BAR resource2", "BAR resource2_wc", "ipa 0x20000000"]


def test_program_matches_disassembly():
    """gen_program for w x16, x x3, rw x2 (objdump -D -b binary -m aarch64)."""
    code = arm64.gen_program([(0x1000000, 16, "w"), (0x1200000, 3, "x"), (0x1400000, 2, "rw")],
                             done_value=1)
    assert words(code) == [
        0xD2CA8008, 0xF2E96AC8,  # x8 = WRITE_TAG
        0xD2A02000, 0xD2800201,  # x0 = 0x1000000, x1 = 16
        0xAA080002, 0xF9000002,  # orr x2, x0, x8; str x2, [x0]
        0x91400400, 0xF1000421, 0x54FFFF81,  # add x0, #4096; subs x1; b.ne 0x10
        0xD2A02400, 0xD2800061,  # x0 = 0x1200000, x1 = 3
        0x91200003, 0xD63F0060,  # add x3, x0, #0x800; blr x3
        0x91400400, 0xF1000421, 0x54FFFF81,  # b.ne 0x2c
        0xD2A02800, 0xD2800041,  # x0 = 0x1400000, x1 = 2
        0xF9400002, 0xAA080002, 0xF9000002,  # ldr; orr; str
        0x91400400, 0xF1000421, 0x54FFFF61,  # b.ne 0x48
        0xD2C00809, 0xD2800022, 0xF9000122,  # mov x9, EXIT_GPA; mov x2, #1; str x2, [x9]
        0x14000000,  # b .
    ]
    assert arm64.EXEC_STUB == (0xD65F03C0).to_bytes(4, "little")  # ret


def test_vector_table():
    table = arm64.gen_vectors()
    assert len(table) == 0x800
    for i in range(16):
        entry = words(table[0x80 * i:0x80 * (i + 1)])
        assert entry[0] == 0xD5385209  # mrs x9, esr_el1
        assert entry[1:3] == arm64.mov_imm(10, arm64.EXCEPTION_GPA + 8 * i)
        assert entry[3:5] == [0xF9000149, 0xD61F0120]  # str x9, [x10]; br x9
        assert set(entry[5:]) == {0x14000000}  # b .
    assert words(table[:20]) == [0xD5385209, 0xD280200A, 0xF2C0080A, 0xF9000149, 0xD61F0120]


def test_uapi_ids():
    assert arm64.KVM_ARM_VCPU_INIT == 0x4020AEAE
    assert arm64.KVM_ARM_PREFERRED_TARGET == 0x8020AEAF
    assert arm64.KVM_SET_ONE_REG == 0x4010AEAC and arm64.KVM_GET_ONE_REG == 0x4010AEAB
    assert arm64.REG_PC == 0x6030000000100040
    assert arm64.REG_PSTATE == 0x6030000000100042
    assert arm64.REG_X[30] == 0x603000000010003C and arm64.REG_X[0] == 0x6030000000100000
    assert arm64.REG_SP_EL1 == 0x6030000000100044 and arm64.REG_ELR_EL1 == 0x6030000000100046
    assert arm64.REG_VBAR_EL1 == 0x603000000013C600
    assert arm64.REG_ESR_EL1 == 0x603000000013C290 and arm64.REG_FAR_EL1 == 0x603000000013C300
    assert arm64.PSTATE_EL1H_MASKED == 0x3C5


def test_exits_and_esr():
    a = arm64.Arm64Arch()
    assert a.is_done("mmio", arm64.EXIT_GPA, True)
    assert not a.is_done("mmio", arm64.EXIT_GPA, False) and not a.is_done("io", 0x10, True)
    # the instruction abort KVM injected, as the guest stored it (sign-extended, 6.1 + 7.3.4)
    exc = a.exception_exit(arm64.EXCEPTION_GPA + 8 * 4, True, 0xFFFFFFFF86000010)
    assert exc["vector"] == 4 and exc["vector_name"] == "current EL SPx sync"
    assert (exc["esr"], exc["ec"], exc["ec_name"], exc["fsc"]) == (
        0x86000010, 0x21, "instruction abort", 0x10)
    assert a.exception_exit(arm64.EXIT_GPA, True, 0) is None
    assert a.exception_exit(arm64.EXCEPTION_GPA, False, 0) is None


# --------------------------------------------------------------- fault rule


def rule(kind, touched, kernel, flags=0, host_written=None, fs=None):
    r = faults.arm64_expected_faults(kind, flags, touched, kernel, host_written,
                                     fs=fs, thp=TESTBED_THP)
    return (r["faults"], r["map_prots"], r["relax_perms"], r["levels"])


def pages(accesses, start=0):
    return [(start + i, a) for i, a in enumerate(accesses)]


def test_arm64_rule_versions():
    assert faults.arm64_rule("6.1.0-56-arm64") == "6.1"
    assert faults.arm64_rule("7.3.4+deb13-arm64") == "7.x"
    assert faults.arm64_rule("7.2.13-arm64") == "7.x"
    assert faults.arm64_rule("6.12.48+deb13-arm64") is None
    assert faults.arm64_prot_value("R|W|X", "6.1") == 0x7
    assert faults.arm64_prot_value("R|W|DEVICE", "6.1") == 0xE
    assert faults.arm64_prot_value("R|W|X", "7.x") == 0xF
    assert faults.arm64_prot_value("R|W|DEVICE", "7.x") == 0x1C
    r = faults.arm64_expected_faults("anon", 0, [(0, "r")], None)
    assert r["total"] is None and r["rule"].startswith("not measured")


@pytest.mark.parametrize("kernel", ["6.1", "7.x"])
def test_arm64_rule_first_touch(kernel):
    """One fault and one map per page; the matrix's r / w / x rows (4 pages)."""
    r4 = [(p, "r") for p in range(4)]
    assert rule("anon", r4, kernel) == (4, {"R": 4}, 0, {1: 4})
    assert rule("memfd", r4, kernel) == (4, {"R|W": 4}, 0, {1: 4})
    assert rule("anon-shared", r4, kernel) == (4, {"R|W": 4}, 0, {1: 4})
    assert rule("file", r4, kernel) == (4, {"R": 4}, 0, {1: 4})
    assert rule("file", r4, kernel, fs="tmpfs") == (4, {"R|W": 4}, 0, {1: 4})  # shmem
    assert rule("anon", [(p, "w") for p in range(4)], kernel) == (4, {"R|W": 4}, 0, {1: 4})
    assert rule("anon", [(p, "x") for p in range(4)], kernel) == (4, {"R|W|X": 4}, 0, {1: 4})
    assert rule("thp", r4, kernel) == (1, {"R": 1}, 0, {2: 1})
    assert rule("hugetlb", [(p, "w") for p in range(4)], kernel) == (1, {"R|W": 1}, 0, {2: 1})
    for kind in ("bar-uc", "bar-wc"):
        assert rule(kind, [(0, "r"), (0, "w"), (1, "w"), (2, "rw")], kernel) == (
            3, {"R|W|DEVICE": 3}, 0, {1: 3})
    system = faults.arm64_expected_faults("anon", 0, [(0, "x"), (1, "x")], kernel,
                                          thp=TESTBED_THP)
    assert (system["faults"], system["map_prots"]) == (2, {"R|W|X": 2})


@pytest.mark.parametrize("kernel", ["6.1", "7.x"])
def test_arm64_rule_permission_faults(kernel):
    r_then_x = [(0, "r"), (0, "x")]  # the VMM wrote a stub into page 0
    assert rule("anon", r_then_x, kernel) == (2, {"R|W": 1}, 1, {1: 1})
    assert rule("file", [(0, "rw")], kernel) == (2, {"R": 1}, 1, {1: 1})
    assert rule("hugetlb", [(0, "rw")], kernel) == (2, {"R": 1}, 1, {2: 1})
    assert rule("memfd", [(0, "rw")], kernel, flags=1) == (2, {"R": 1}, 1, {1: 1})
    ro = faults.arm64_expected_faults("anon", 2, [(0, "w"), (0, "r"), (1, "x"), (1, "w")],
                                      kernel, thp=TESTBED_THP)
    assert (ro["faults"], ro["map_prots"], ro["mmio_exits"]) == (4, {"R": 1, "R|X": 1}, 2)
    log = faults.arm64_expected_faults("anon", 1, [(0, "x"), (0, "w"), (1, "w"), (2, "r")],
                                       kernel, thp=TESTBED_THP)
    assert (log["faults"], log["map_prots"], log["relax_prots"]) == (
        4, {"R|X": 1, "R|W": 1, "R": 1}, {"R|W": 1})
    assert log["dirty_pages"] == [0, 1]
    bar_x = faults.arm64_expected_faults("bar-uc", 0, [(0, "x")], kernel, thp=TESTBED_THP)
    assert (bar_x["faults"], bar_x["set_spte"], bar_x["refused"]) == (1, 0, 1)
    vvar = faults.arm64_expected_faults("pfnmap", 0, [(0, "r"), (0, "w"), (0, "rw")], kernel,
                                        thp=TESTBED_THP)
    assert (vvar["faults"], vvar["map_prots"], vvar["refused"]) == (3, {"R": 1}, 2)


def test_arm64_rule_copy_on_write_differs():
    """Write after read of a zero page: 6.1's change_pte map vs 7.x's retry."""
    # the matrix's anon rows r, w, rw (pages 0-3, 4-7, 8-11)
    rows = ([(p, "r") for p in range(4)] + [(p, "w") for p in range(4, 8)]
            + [(p, "rw") for p in range(8, 12)])
    assert rule("anon", rows, "6.1") == (20, {"R": 12, "R|W": 4}, 4, {1: 16})
    assert rule("anon", rows, "7.x") == (20, {"R": 8, "R|W": 8}, 0, {1: 16})
    r = faults.arm64_expected_faults("anon", 0, rows, "6.1", thp=TESTBED_THP)
    assert r["retries"] == 4 and r["relax_prots"] == {"R|W": 4}
    # 6.1, a page alone in its 2 MiB region: the unmap frees the 4 KiB table, so
    # change_pte's map fails and the retried fault maps R|W (the live "cow" run checks it)
    assert rule("anon", [(0, "rw")], "6.1") == (3, {"R": 2, "R|W": 1}, 0, {1: 3})
    # thp: 6.1 splits the huge zero page (the matrix's frame: rw on 4 pages)
    rw = [(p, "rw") for p in range(4)]
    assert rule("thp", rw, "6.1") == (12, {"R": 8, "R|W": 1}, 3, {2: 1, 1: 8})
    assert rule("thp", rw, "7.x") == (3, {"R": 1, "R|W": 1}, 0, {2: 2})
    r_then_w = [(p, "r") for p in range(4)] + [(p, "w") for p in range(4)]
    assert rule("thp", r_then_w, "6.1") == (9, {"R": 5, "R|W": 1}, 3, {2: 1, 1: 5})
    assert rule("thp", r_then_w, "7.x") == (3, {"R": 1, "R|W": 1}, 0, {2: 2})


def test_arm64_rule_not_measured():
    for kind, flags in (("thp", 1), ("hugetlb", 2), ("bar-uc", 2)):
        r = faults.arm64_expected_faults(kind, flags, [(0, "r")], "6.1", thp=TESTBED_THP)
        assert r["total"] is None and "not measured" in r["rule"]
    r = faults.arm64_expected_faults("thp", 0, [(0, "r")], "7.x",
                                     thp={"enabled": "never", "shmem_enabled": "never"})
    assert r["total"] is None
    r = faults.arm64_expected_faults("memfd", 0, [(0, "r")], "7.x",
                                     thp={"enabled": "always", "shmem_enabled": "always"})
    assert r["total"] is None
    assert faults.expected_dirty_pages("anon", 1, [(0, "r"), (1, "w"), (2, "rw")], gpage2m=True,
                                       mmu="arm64-stage2") == [1, 2]


# --------------------------------------------------------------- scenarios


def test_arm64_scenarios():
    bar = scenario.builtin("bar").validate().layout()
    kinds = [s.backing for s in bar.slots]
    assert kinds == ["anon", "memfd", "bar-uc", "bar-wc"]
    refused = [st for st in bar.steps if st.expect == "refused"]
    assert {(bar.slot(st.slot).backing, st.access) for st in refused} == {
        ("bar-uc", "x"), ("bar-wc", "x")}
    assert Scenario.from_dict(json.loads(json.dumps(bar.to_dict()))) == bar

    demo = scenario.demo(machine="aarch64").validate().layout()
    assert {s.backing for s in demo.slots} == set(backings.KINDS + backings.BAR_KINDS)
    vvar = [s for s in demo.slots if s.backing == "pfnmap"][0]
    assert [(st.access, st.expect) for st in demo.steps if st.slot == vvar.slot] == [
        ("r", "ok"), ("w", "refused")]
    # cbar: the cacheable BAR slot, per kernel (faults.arm64_memslot_errno)
    cb61 = scenario.cbar("6.1").validate().layout()
    assert [(s.backing, s.expect_errno) for s in cb61.slots] == [
        ("anon", 0), ("bar-cacheable", 0)]
    assert any(st.slot == 2 for st in cb61.steps)
    cb7 = scenario.cbar("7.x", dic=False).validate().layout()
    assert [(s.backing, s.expect_errno) for s in cb7.slots] == [
        ("anon", 0), ("bar-cacheable", errno.EINVAL)]
    assert not any(st.slot == 2 for st in cb7.steps)
    assert Scenario.from_dict(json.loads(json.dumps(cb7.to_dict()))) == cb7
    assert faults.arm64_memslot_errno("bar-cacheable", rule="7.x", dic=True) is None
    assert faults.arm64_memslot_errno("bar-uc", rule="7.x", dic=False) == 0
    cb_rule = faults.arm64_expected_faults("bar-cacheable", 0, [(0, "r"), (1, "w")], "6.1",
                                           thp=TESTBED_THP)
    assert cb_rule["total"] == 2 and cb_rule["map_prots"] == {"R|W|DEVICE": 2}
    x86_demo = scenario.demo(machine="x86_64")
    assert {s.backing for s in x86_demo.slots} == set(backings.KINDS)
    assert all(st.expect == "ok" for st in x86_demo.steps)


def test_expect_spec_and_checks():
    sc = Scenario("t")
    scenario.add_slot_spec(sc, "bar-uc:8:r")
    scenario.add_access_spec(sc, "1:2:1:x:0:refused")
    scenario.add_access_spec(sc, "1:3:1:w::refused")
    sc.validate()
    assert [(st.access, st.vcpu, st.expect) for st in sc.steps] == [
        ("r", 0, "ok"), ("x", 0, "refused"), ("w", 0, "refused")]
    with pytest.raises(ScenarioError):
        Scenario("t", slots=sc.slots, steps=[Step(1, 0, 1, "r", expect="maybe")]).validate()
    sc2 = Scenario("t")
    scenario.add_slot_spec(sc2, "bar-wc:512:w:gpage2m")
    with pytest.raises(ScenarioError, match="BAR"):
        sc2.validate()


# ------------------------------------------------------- BAR backing (fake sysfs)


@pytest.fixture
def fake_bar(tmp_path, monkeypatch):
    """A sysfs-like device dir: resource2 / resource2_wc are 64 KiB regular files."""
    dev = tmp_path / "0000:00:02.0"
    dev.mkdir()
    (dev / "enable").write_text("0")
    for name in ("resource2", "resource2_wc"):
        (dev / name).write_bytes(b"\xff" * (64 << 10))
    monkeypatch.setenv(backings.BAR_ENV, str(dev))
    return dev


def test_bar_backing_allocates_disjoint_parts(fake_bar):
    uc = backings.allocate("bar-uc", 8 * 4096, 1)
    wc = backings.allocate("bar-wc", 4 * 4096, 2)
    try:
        assert (uc.status, wc.status) == ("ok", "ok")
        assert (fake_bar / "enable").read_text() == "1"
        assert uc.path.endswith("resource2") and wc.path.endswith("resource2_wc")
        assert (uc.vma["offset"], wc.vma["offset"]) == (0, 8 * 4096)  # no aliasing
        assert uc.vma["name"] == uc.path and uc.size == 8 * 4096
        buf = uc.buffer()
        assert all(buf[p * 4096:p * 4096 + 8] == bytes(8) for p in range(8))  # zeroed
        uc.write_bytes(0x800, arm64.EXEC_STUB)
        assert buf[0x800:0x804] == arm64.EXEC_STUB
        big = backings.allocate("bar-uc", 64 << 10, 3)  # only 52 KiB left
        assert big.status == "unavailable" and "left" in big.reason
    finally:
        uc.close()
        wc.close()
    again = backings.allocate("bar-wc", 64 << 10, 4)  # released: the whole BAR again
    assert again.status == "ok" and again.size == 64 << 10
    again.close()


def test_bar_backing_unavailable(tmp_path, monkeypatch):
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "enable").write_text("0")
    (dev / "resource2").write_bytes(bytes(8192))
    monkeypatch.setenv(backings.BAR_ENV, str(dev) + ":2")
    b = backings.allocate("bar-wc", 4096, 1)
    assert b.status == "unavailable" and "resource2_wc" in b.reason
    monkeypatch.setenv(backings.BAR_ENV, str(tmp_path / "nope"))
    b = backings.allocate("bar-uc", 4096, 1)
    assert b.status == "unavailable" and "no such device" in b.reason
    monkeypatch.delenv(backings.BAR_ENV)
    assert backings.find_bar({"PATH": ""})[0] is None or IS_ARM64


# --------------------------------------------------------------------- live


def require_arm64_kvm():
    if not IS_ARM64:
        pytest.skip("arm64 only (this is %s)" % platform.machine())
    if not os.path.exists("/dev/kvm"):
        if REQUIRE_LIVE:
            pytest.fail("/dev/kvm is absent and KVMTRACE_REQUIRE_LIVE=1")
        pytest.skip("no /dev/kvm on this machine")


class Stage2Counter:
    """tracefs kprobes on kvm_pgtable_stage2_map / _relax_perms + kvm:kvm_guest_fault,
    in a private instance filtered to one process (set_event_pid, event-fork)."""

    T = "/sys/kernel/tracing"

    def __init__(self):
        self.group = "kvmtrace_t%d" % os.getpid()
        self.inst = "%s/instances/%s" % (self.T, self.group)
        self.probes = ["p:%s/s2map kvm_pgtable_stage2_map addr=%%x1 size=%%x2 prot=%%x4"
                       % self.group,
                       "p:%s/relax kvm_pgtable_stage2_relax_perms addr=%%x1 prot=%%x2"
                       % self.group]
        self.events = [self.group, "kvm/kvm_guest_fault"]

    @classmethod
    def usable(cls):
        return (os.geteuid() == 0 and os.path.exists(cls.T + "/kprobe_events")
                and os.path.isdir(cls.T + "/events/kvm/kvm_guest_fault"))

    def _write(self, path, text, append=False):
        # os.open: Python's append mode seeks, which tracefs refuses
        fd = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def __enter__(self):
        for p in self.probes:
            self._write(self.T + "/kprobe_events", p + "\n", append=True)
        os.mkdir(self.inst)
        self._write(self.inst + "/buffer_size_kb", "4096")
        self._write(self.inst + "/options/event-fork", "1")
        return self

    def __exit__(self, *exc):
        for ev in self.events:
            try:
                self._write("%s/events/%s/enable" % (self.inst, ev), "0")
            except OSError:
                pass
        os.rmdir(self.inst)
        for p in self.probes:
            self._write(self.T + "/kprobe_events", "-:" + p.split()[0][2:] + "\n", append=True)

    def run(self, argv, report_path):
        """Run the guest under the counter; (CompletedProcess-like, per-slot counts)."""
        self._write(self.inst + "/trace", "")
        for ev in self.events:
            self._write("%s/events/%s/enable" % (self.inst, ev), "1")
        proc = subprocess.Popen([sys.executable, "-m", "testvmm", "--report",
                                 str(report_path), "--delay", "0.3", "-q", *argv], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._write(self.inst + "/set_event_pid", str(proc.pid))
        out, err = proc.communicate(timeout=300)
        for ev in self.events:
            self._write("%s/events/%s/enable" % (self.inst, ev), "0")
        self._write(self.inst + "/set_event_pid", "")
        with open(self.inst + "/trace") as f:
            text = f.read()
        return proc.returncode, err, text

    @staticmethod
    def per_slot(report, text):
        """{slot: {"faults", "maps": {(level, prot)}, "relax"}}, stray events under None."""
        def slot_of(ipa):
            for s in report["slots"]:
                if s["status"] == "ok" and s["gpa"] <= ipa < s["gpa"] + s["size"]:
                    return s["slot"]
            return None

        got = {}
        for line in text.splitlines():
            m = re.search(r" (s2map|relax|kvm_guest_fault): (.*)$", line)
            if not m:
                continue
            ev, rest = m.groups()
            if ev == "kvm_guest_fault":
                ipa = re.search(r"ipa (0x[0-9a-f]+)", rest)
                if not ipa:
                    continue
                d = got.setdefault(slot_of(int(ipa.group(1), 16)), {})
                d["faults"] = d.get("faults", 0) + 1
                continue
            kv = dict(re.findall(r"(\w+)=(0x[0-9a-f]+)", rest))
            d = got.setdefault(slot_of(int(kv["addr"], 16)), {})
            if ev == "s2map":
                key = (2 if int(kv["size"], 16) == 0x200000 else 1, int(kv["prot"], 16))
                maps = d.setdefault("maps", {})
                maps[key] = maps.get(key, 0) + 1
            else:
                d["relax"] = d.get("relax", 0) + 1
        return got


LIVE_RUNS = {
    "minimal": ["--scenario", "minimal"],
    "demo": ["--scenario", "demo"],
    "bar": ["--scenario", "bar"],
    "smp": ["--scenario", "smp"],
    # the per-kernel differences: anon copy-on-write, thp huge zero page, write-notify
    # (slot 1: page 0 read then written alone in its 2 MiB region, then 1-3)
    "cow": ["--slot", "anon:8:-", "--access", "1:0:1:rw", "--access", "1:1:3:r",
            "--access", "1:1:3:w", "--slot", "thp:512:-", "--access", "2:0:4:r",
            "--access", "2:0:4:w", "--slot", "file:8:rw", "--slot", "memfd:8:rw:dirty",
            "--slot", "anon:8:x+w:ro", "--slot", "anon-shared:4:r+x"],
}


@pytest.fixture(scope="module")
def live_runs(tmp_path_factory):
    require_arm64_kvm()
    tmp = tmp_path_factory.mktemp("arm64")
    counter = Stage2Counter() if Stage2Counter.usable() else None
    runs = {}
    if counter:
        with counter:
            for name, argv in LIVE_RUNS.items():
                path = tmp / ("%s.json" % name)
                rc, err, text = counter.run(argv, path)
                report = json.loads(path.read_text()) if path.exists() else None
                runs[name] = (rc, err, report, text)
    else:
        for name, argv in LIVE_RUNS.items():
            path = tmp / ("%s.json" % name)
            p = subprocess.run([sys.executable, "-m", "testvmm", "--report", str(path),
                                "-q", *argv], cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
            report = json.loads(path.read_text()) if path.exists() else None
            runs[name] = (p.returncode, p.stderr, report, None)
    return runs


def test_live_runs_complete(live_runs):
    for name, (rc, err, report, _) in live_runs.items():
        assert report is not None, (name, err)
        assert rc == 0 and report["ok"], (name, err, report["errors"])
        assert report["arch"] == "aarch64" and report["mmu"] == "arm64-stage2"
        assert all(v["done"] for v in report["vcpus"]), name
        done = [m for m in report["exits"]["mmio"] if m["gpa"] == arm64.EXIT_GPA]
        assert len(done) == len(report["vcpus"]) and all(m["write"] for m in done)
        for s in report["slots"]:
            if s["write_check"]:
                assert s["write_check"]["ok"], (name, s["slot"], s["write_check"])
            if s["dirty_pages"] is not None:
                assert s["dirty_pages"] == s["expected_dirty_pages"], (name, s["slot"])
    smp = live_runs["smp"][2]
    assert len({v["tid"] for v in smp["vcpus"]}) == 2


def test_live_bar_and_refusals(live_runs):
    report = live_runs["bar"][2]
    bars = [s for s in report["slots"] if s["backing"] in backings.BAR_KINDS]
    if any(s["status"] != "ok" for s in bars):
        if REQUIRE_LIVE:
            pytest.fail("no PCI BAR: %s" % [s["unavailable_reason"] for s in bars])
        pytest.skip("no PCI BAR here: %s" % bars[0]["unavailable_reason"])
    assert [s["path"].rsplit("/", 1)[1] for s in bars] == ["resource2", "resource2_wc"]
    for s in bars:
        assert {"pf", "io"} <= set(s["vma"]["vm_flags"])
    assert bars[1]["vma"]["offset"] >= bars[0]["size"]  # each slot its own part of the BAR
    refusals = report["refusals"]
    assert [(r["slot"], r["access"], r["expected"]) for r in refusals] == [
        (s["slot"], "x", True) for s in bars]
    for r in refusals:  # measured on 6.1 and 7.3.4: an injected instruction abort
        if r["how"] == "guest_exception":
            assert r["ec_name"] == "instruction abort" and r["page"] == 24
        else:
            assert r["errno_name"], r
    system = report["slots"][0]
    assert 0 in system["touched"]["x"]  # the vectors page ran
    # demo: the [vvar] write is refused (KVM_RUN EFAULT) and the run goes on
    demo = live_runs["demo"][2]
    vvar = [r for r in demo["refusals"] if r["access"] == "data"]
    assert vvar and all(r["expected"] and r["how"] == "kvm_run" and r["errno_name"] == "EFAULT"
                        for r in vvar)


def test_live_stage2_counts_match_rule(live_runs):
    rule = faults.arm64_rule()
    if rule is None:
        pytest.skip("no measured arm64 rule for kernel %s" % os.uname().release)
    if any(text is None for *_, text in live_runs.values()):
        if REQUIRE_LIVE and os.geteuid() == 0:
            pytest.fail("tracefs kprobes not usable")
        pytest.skip("tracefs kprobes not usable (needs root)")
    bits = faults.ARM64_PROT_BITS[rule]

    def raw(name):
        return sum(bits[n] for n in name.split("|"))

    for name, (_, _, report, text) in live_runs.items():
        got = Stage2Counter.per_slot(report, text)
        for s in report["slots"]:
            d = s["expected_faults_detail"]
            if s["status"] != "ok" or d["total"] is None:
                continue
            g = got.get(s["slot"], {})
            maps = g.get("maps", {})
            assert g.get("faults", 0) == d["total"], (name, s["slot"], g, d)
            assert g.get("relax", 0) == d["relax_perms"], (name, s["slot"], g, d)
            by_prot = {}
            by_level = {}
            for (level, prot), n in maps.items():
                by_prot[prot] = by_prot.get(prot, 0) + n
                by_level[level] = by_level.get(level, 0) + n
            assert by_prot == {raw(k): v for k, v in d["map_prots"].items()}, (name, s["slot"])
            assert by_level == {int(k): v for k, v in d["levels"].items()}, (name, s["slot"])


def test_live_tiny_guest_runs_to_mmio_exit():
    """testvmm.tiny, the guest the testbed's smoke check watches: every RAM page
    written, then the store to the unmapped IPA exits as MMIO."""
    require_arm64_kvm()
    dev, _ = backings.find_bar()
    res = tiny.run(dev)
    assert res["exit"] == "MMIO" and res["mmio_addr"] == tiny.MMIO_IPA, res
    assert res["ram_pages_written"] == tiny.DATA_PAGES, res
