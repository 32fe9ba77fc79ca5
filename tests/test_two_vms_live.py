"""One process with two VMs at once (live): attribution per VM.

tests/helpers/two_vms.py creates two VMs in one process (both alive, each with
its slots at the same guest addresses and its own vCPU) and runs one guest
after the other. The recording must keep them apart by VM fd: each VM's
slots are its own, and each VM's faults equal what that guest says it did,
in its own slots.
"""

import json
import sys

import pytest

import kvmtrace

from conftest import ROOT, kvmtrace as run

pytestmark = pytest.mark.usefixtures("live")


def test_one_process_two_vms(tmp_path):
    out = tmp_path / "two.kvt"
    p = run("record", "-o", out, "--", sys.executable, ROOT / "tests/helpers/two_vms.py",
            "pages-2x", "minimal", timeout=300)
    assert p.returncode == 0, p.stderr
    vms = json.loads(p.stdout.strip().splitlines()[-1])
    fds = [v["vm_fd"] for v in vms]
    assert len(set(fds)) == 2
    pid = vms[0]["report"]["pid"]
    m = kvmtrace.load(str(out))
    assert set(m.slots["pid"]) == {pid}
    assert set(m.slots["vm_fd"]) == set(fds)
    for v in vms:
        g, fd = v["report"], v["vm_fd"]
        ops = m.ops[m.ops["vm_fd"] == fd]
        assert len(ops) == len(g["memslot_ioctls"])
        assert "no-op" not in set(ops["op"]) and "move" not in set(ops["op"])
        f = m.faults[m.faults["vm_fd"] == fd]
        assert len(f) == g["expected_faults_total"], fd
        assert (f["slot_row"] >= 0).all()
        assert set(m.slots.loc[f["slot_row"].unique(), "vm_fd"]) == {fd}
        per_slot = f.groupby(m.slots.loc[f["slot_row"], "slot"].to_numpy()).size().to_dict()
        want = {s["slot"]: s["expected_faults"] for s in g["slots"] if s["expected_faults"]}
        assert per_slot == want, (fd, per_slot, want)
