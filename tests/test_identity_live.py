"""Two VMMs with the same pid in one recording stay two VMMs (live).

A VMM that exits and another that the kernel gives the same pid are told
apart by the recorded process exit (sched:sched_process_exit of the first
one): each gets its own VM, slots and faults, equal to what each guest says
it did. Before, their faults were summed and the second's slots appeared as
no-op changes of the first's.
"""

import sys

import pytest

import kvmtrace

from conftest import ROOT, kvmtrace as run, load_json

pytestmark = pytest.mark.usefixtures("live")


def test_pid_reused_within_one_recording(tmp_path):
    out, ra, rb = tmp_path / "reuse.kvt", tmp_path / "a.json", tmp_path / "b.json"
    p = run("record", "-o", out, "--", sys.executable,
            ROOT / "tests/helpers/same_pid_twice.py", ra, rb, "pages-2x", "minimal", timeout=180)
    assert p.returncode == 0, p.stderr
    a, b = load_json(ra), load_json(rb)
    assert a["pid"] == b["pid"]
    m = kvmtrace.load(str(out))
    ex = m.recording["proc_exit"]
    assert (ex["pid"] == a["pid"]).sum() >= 1
    ops = m.ops[m.ops["pid"] == a["pid"]]
    assert list(ops.groupby("proc").size().index) == [0, 1]
    for proc, guest in ((0, a), (1, b)):
        mine = ops[ops["proc"] == proc]
        assert len(mine) == len(guest["memslot_ioctls"])
        # the second VMM's slots are created, not no-op changes of the first's
        assert "no-op" not in set(mine["op"])
        f = m.faults[(m.faults["pid"] == a["pid"]) & (m.faults["proc"] == proc)]
        assert len(f) == guest["expected_faults_total"], proc
        assert (f["slot_row"] >= 0).all()
        slots = m.slots.loc[f["slot_row"].unique()]
        assert set(slots["proc"]) == {proc}
    # the report names them apart
    j = run("report", out, "--format", "csv", "--table", "slots")
    assert j.returncode == 0, j.stderr
    assert j.stdout.splitlines()[0].startswith("pid,proc,")
