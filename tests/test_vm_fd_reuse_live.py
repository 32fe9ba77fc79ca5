"""A process that closes a VM and creates another on the same fd number (KVM's
own selftests do it between tests) has two VMs, not one whose slots moved.

Found by recording KVM's set_memory_region_test in the x86 testbed: the next
VM's first memslot was reported as a "move" or a "no-op" of the previous VM's
slot. The recorded KVM_CREATE_VM now ends the previous VM's slots ("VM
replaced"), so each VM starts with none.
"""

import json
import sys

import pytest

import kvmtrace
from conftest import ROOT, kvmtrace as run

pytestmark = pytest.mark.usefixtures("live")


def test_a_new_vm_on_a_reused_fd_starts_with_no_slots(tmp_path):
    out = tmp_path / "reuse.kvt"
    p = run("record", "-o", out, "--probes", "memslots", "--", sys.executable,
            ROOT / "tests/helpers/vm_fd_reuse.py", timeout=300)
    assert p.returncode == 0, p.stderr
    done = json.loads(p.stdout.strip().splitlines()[-1])
    assert len({v["vm_fd"] for v in done["vms"]}) == 1  # the kernel gave the same fd each time
    m = kvmtrace.load(str(out))
    ops = m.ops[m.ops["pid"] == done["pid"]]
    assert list(ops["op"]) == ["create"] * 3, ops[["op", "gpa", "reason"]]
    s = m.slots[m.slots["pid"] == done["pid"]].sort_values("start_ts")
    assert [(int(r.gpa), int(r.size_bytes), int(r.hva)) for r in s.itertuples()] == \
        [(v["gpa"], v["size"], v["hva"]) for v in done["vms"]]
    assert list(s["created_by"]) == ["create"] * 3
    assert list(s["ended_by"]) == ["VM replaced", "VM replaced", ""]
    # each version ends when the next VM was created, before its own slot was set
    assert (s["end_ts"].iloc[:2].to_numpy() <= s["start_ts"].iloc[1:].to_numpy()).all()
    # and the report names them apart: VM 1, 2 and 3 on that fd number
    assert list(s["vm_instance"]) == [0, 1, 2]
    text = run("report", out, "--table", "slots", "--width", "200").stdout
    fd = done["vms"][0]["vm_fd"]
    for i in (1, 2, 3):
        assert f"vm fd {fd} (VM {i} on this fd number)" in text, text[:2000]
