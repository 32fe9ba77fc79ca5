"""The PCI BAR through VFIO, live: device assignment as QEMU does it, recorded.

Runs where the host has the ivshmem BAR and an IOMMU (the testbeds booted
with ``--iommu``), as root with /dev/kvm and bcc:

    testbed/arm64/run --kernel 6.1|7.x --iommu -- python3 -m pytest -q tests/test_vfio_live.py
    testbed/x86/run   --kernel 6.1|7.x --iommu -- python3 -m pytest -q tests/test_vfio_live.py

The test VMM's ``vfio`` scenario binds the device to vfio-pci, attaches its
IOMMU group to a type1 container, mmaps BAR 2 from the VFIO device fd and
registers it as a memslot (testvmm/vfio.py), next to RAM. Checked against
the kernel: the BAR slot's VMA is vfio-pci's (VM_PFNMAP|VM_IO, and
VM_ALLOW_ANY_UNCACHED from 6.9), every fault the guest took is in its
slot, and on arm64 the stage-2 type KVM installed is Device (6.1: every
non-RAM pfn) or Normal-NC (7.x: VM_ALLOW_ANY_UNCACHED), with the rule
named; on x86 NPT KVM sets no type (write-back bits) and the verdict names
the NPT rule. ``kvmtrace query --slot`` on the held VMM says the same.
Skipped (with the reason) without the BAR or an IOMMU; under
KVMTRACE_REQUIRE_LIVE=1 a missing IOMMU fails only where the testbed was
booted with one (KVMTRACE_TESTBED_IOMMU=1).
"""

import json
import os
import platform
import subprocess
import sys
import time

import pytest

from conftest import REQUIRE_LIVE, ROOT, guest_cmd, load_json, window_attached
from conftest import kvmtrace as run

pytestmark = pytest.mark.usefixtures("live")

IS_ARM64 = platform.machine() in ("aarch64", "arm64")
VM_IO, VM_PFNMAP = 1 << 14, 1 << 10
VM_ALLOW_ANY_UNCACHED = 1 << 39  # include/linux/mm.h, 64-bit, from 6.9
WINDOW = 90  # s: query's recording window; the guest runs inside it


def _kernel():
    return tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])


@pytest.fixture(scope="module")
def vfio_bar():
    """(device dir, BAR index) of a BAR vfio-pci can take, or skip/fail why not."""
    from testvmm import backings, vfio
    dev, index = backings.find_bar()
    why = None if dev else index
    if dev and vfio.driver_of(dev) != "vfio-pci" and vfio.iommu_group(dev) is None:
        why = f"{dev} has no IOMMU group: the host has no IOMMU (testbed run --iommu)"
    if why:
        if REQUIRE_LIVE and os.environ.get("KVMTRACE_TESTBED_IOMMU") == "1":
            pytest.fail(f"booted with an IOMMU but vfio cannot take the BAR: {why}")
        pytest.skip(why)
    return dev, index


def _arm64_rule() -> str:
    """The rule KVM applies to the vfio BAR on this kernel (memtype/arm64.py)."""
    from kvmtrace.memtype import arm64 as a64
    return ("device_pfn_forced" if _kernel() < (6, 9) else "device_pfn_normal_nc"
            if _kernel() < a64.CACHEABLE_PFNMAP_FIRST else "force_noncacheable_nc")


def _slots(g):
    return {s["backing"]: s for s in g["slots"] if s["role"] == "data"}


@pytest.fixture(scope="module")
def recorded(vfio_bar, tmp_path_factory):
    d = tmp_path_factory.mktemp("vfio")
    rec, rep = d / "vfio.kvt", d / "guest.json"
    t0 = time.monotonic()
    p = run("record", "-o", rec, "--", *guest_cmd("--scenario", "vfio", "-q", "--report", rep),
            timeout=1200)
    print(f"vfio record: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    assert p.returncode == 0, p.stderr[-3000:]
    import kvmtrace
    return kvmtrace.load(str(rec)), load_json(rep)


def test_the_vmm_maps_the_bar_through_vfio(recorded):
    _, g = recorded
    assert g["ok"], g["errors"]
    s = _slots(g)
    v = s["bar-vfio"]
    assert v["status"] == "ok", v.get("unavailable_reason")
    assert v["path"].startswith("vfio:") and v["vma"]["name"] == "anon_inode:[vfio-device]"
    assert {"pf", "io"} <= set(v["vma"]["vm_flags"])


def test_slot_vma_flags_and_faults(recorded):
    m, g = recorded
    slots = m.slots[m.slots["pid"] == g["pid"]].set_index("slot")
    n = _slots(g)["bar-vfio"]["slot"]
    flags = int(slots.loc[n, "vm_flags"])
    assert flags & (VM_IO | VM_PFNMAP) == VM_IO | VM_PFNMAP
    assert bool(flags & VM_ALLOW_ANY_UNCACHED) == (_kernel() >= (6, 9))
    assert slots.loc[n, "vma"] == "anon_inode:[vfio-device]"
    f = m.faults[m.faults["pid"] == g["pid"]]
    assert f.groupby("slot").size().to_dict() == {
        s["slot"]: s["expected_faults"] for s in g["slots"] if s["expected_faults"]}


def test_stage2_type_and_rule(recorded):
    """arm64: Device on 6.1 (device_pfn_forced), Normal-NC from 6.9 through
    VM_ALLOW_ANY_UNCACHED; x86 NPT: no type in the entry, the NPT rule."""
    m, g = recorded
    n = {k: s["slot"] for k, s in _slots(g).items()}
    f = m.faults[(m.faults["pid"] == g["pid"]) & (m.faults["slot"] == n["bar-vfio"])]
    ok = f[f["spte_memtype"].notna() & (f["spte_memtype"].astype(str) != "")]
    v = m.verdicts[m.verdicts["pid"] == g["pid"]].set_index("slot")
    if IS_ARM64:
        from kvmtrace.memtype import arm64 as a64
        rule = _arm64_rule()
        want = a64.RULES[rule].stage2
        assert set(ok["spte_memtype"].astype(str)) == {want}
        assert ok["rule"].astype(str).str.startswith(a64.RULES[rule].words).all()
        assert len(f) == len(ok) == 24
        assert v.loc[n["bar-vfio"], "verdict"] == "consistent"
        assert "kernel rule: " + a64.RULES[rule].words in v.loc[n["bar-vfio"], "reason"]
    else:
        from kvmtrace.memtype import x86
        assert set(ok["spte_memtype"].astype(str)) == {"WB"}
        assert set(f["rule"].astype(str)) == {x86.NPT_RULE}
        assert "kernel rule: " + x86.NPT_RULE in v.loc[n["bar-vfio"], "reason"]


def _log(t0: float, what: str) -> None:
    print(f"vfio query [{time.monotonic() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)


def test_query_slot_of_a_held_vmm(vfio_bar, tmp_path):
    """`kvmtrace query --pid P --slot N` on the vfio BAR slot of a VMM held
    after its run: with a window over the guest's run, then without.

    The VMM waits at its gate for as long as query's window takes to attach
    (testvmm's --gate-timeout, default 3600 s): under TCG that was 90 s and
    more, and with the guest's 30 s run limit as the gate's limit the VMM had
    exited before the window attached (the window then saw a zombie: comm
    readable, no fds, vm_fds [])."""
    gate, rep = tmp_path / "gate", tmp_path / "guest.json"
    t0 = time.monotonic()
    guest = subprocess.Popen(guest_cmd("--scenario", "vfio", "--gate", gate, "--report", rep,
                                       "--hold", "900", "-q"),
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
    q = None
    try:
        line = guest.stderr.readline()
        assert "set up, waiting for" in line, line + guest.stderr.read()
        _log(t0, f"VMM {guest.pid} set up")
        from testvmm import scenario
        sc = scenario.builtin("vfio")
        slot = next(s.slot for s in sc.slots if s.backing == "bar-vfio")
        q = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "query", "--pid",
                              str(guest.pid), "--slot", str(slot), "--window", str(WINDOW),
                              "--format", "json"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        window_attached(guest.pid, q)
        t_attach = time.monotonic()
        assert guest.poll() is None, f"the VMM exited at its gate: {guest.stderr.read()}"
        _log(t0, "window attached, gate opened")
        gate.touch()
        while not (rep.exists() and rep.stat().st_size):
            assert guest.poll() is None, f"the VMM exited: {guest.stderr.read()}"
            assert time.monotonic() < t_attach + WINDOW - 2, \
                "the guest did not finish inside the window"
            time.sleep(0.2)
        _log(t0, "the VMM reported")
        out, err = q.communicate(timeout=WINDOW + 900)
        _log(t0, f"window query exit {q.returncode}\n{out}{err}")
        assert q.returncode in (0, 1, 2) and "Traceback" not in err, err
        win = json.loads(out)
        now = run("query", "--pid", guest.pid, "--slot", slot, "--format", "json", timeout=900)
        _log(t0, f"query now exit {now.returncode}\n{now.stdout}{now.stderr}")
        assert "Traceback" not in now.stderr, now.stderr
        body = json.loads(now.stdout)
    finally:
        for p in (q, guest):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    g = load_json(rep)
    assert g["ok"], g["errors"]
    for b in (win, body):
        (row,) = [r for r in b["rows"] if r["slot"] == slot]
        assert row["vma"] == "anon_inode:[vfio-device]", row
        assert {"pf", "io"} <= set(row["vmflags"].split())
        assert bool(int(row["vm_flags"]) & VM_ALLOW_ANY_UNCACHED) == (_kernel() >= (6, 9))
    (row,) = [r for r in win["rows"] if r["slot"] == slot]
    if IS_ARM64:
        from kvmtrace.memtype import arm64 as a64
        assert row["installed_memtype"] == a64.RULES[_arm64_rule()].stage2, row
        assert row["installed_pages"] == 24, row
    else:
        assert row["installed_memtype"] == "WB", row
