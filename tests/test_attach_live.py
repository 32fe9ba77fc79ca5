"""Attaching to a VMM that is already running (live): `record --pid P` of a
VM whose memslots were set before recording began.

The test VMM sets up its memslots and vCPUs, says so, and waits for a gate
file; record attaches by pid, and the gate opens once the recording holds
the memslots read at its start (a handshake, not a sleep). Every slot the
guest set must be in the report from the start, with its VMA, and every
fault the guest took must land in its slot, as many as the guest counts.
"""

import subprocess
import sys
import time

import pytest

import kvmtrace
from kvmtrace.analysis.memslots import BEFORE_RECORDING
from kvmtrace.analysis.vmas import kernel_file_name
from kvmtrace.recording.reader import RecordingError, read

from conftest import ROOT, guest_cmd, kvmtrace as run, load_json

pytestmark = pytest.mark.usefixtures("live")


def _wait(cond, what, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _snapshot_noted(path, pid):
    try:
        notes = read(str(path)).tables["notes"]
    except (RecordingError, FileNotFoundError):
        return False
    return bool(((notes["key"] == "memslot_snapshot")
                 & notes["value"].str.contains(f'"pid": {pid},')).any())


@pytest.mark.parametrize("scenario", ["demo", "pages-2x"])
def test_record_pid_of_running_vm(tmp_path, scenario):
    gate, rep, out = tmp_path / "gate", tmp_path / "guest.json", tmp_path / "a.kvt"
    guest = subprocess.Popen(guest_cmd("--scenario", scenario, "--gate", gate, "--report", rep,
                                       "-q"), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    rec = None
    try:
        line = guest.stderr.readline()
        assert "set up, waiting for" in line, line + guest.stderr.read()
        rec = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "record",
                                "-p", str(guest.pid), "-o", str(out)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        _wait(lambda: _snapshot_noted(out, guest.pid), "the memslots read at the start")
        gate.touch()
        assert guest.wait(timeout=120) == 0, guest.stderr.read()
        _, err = rec.communicate(timeout=120)  # record -p stops when its VMM exits
        assert rec.returncode == 0, err
    finally:
        for p in (guest, rec):
            if p is not None and p.poll() is None:
                p.kill()
    g = load_json(rep)
    m = kvmtrace.load(str(out))
    slots = m.slots[m.slots["pid"] == g["pid"]]
    first = slots[slots["created_by"] == BEFORE_RECORDING]
    # every slot the guest created before the run is there from the start
    live = {}  # the guest's own account of its setup, replayed
    for o in g["memslot_ioctls"]:
        if o["phase"] != "setup" or o["errno"]:
            continue
        if o["size"]:
            live[(o["as_id"], o["slot"])] = (o["slot"], o["gpa"], o["size"])
        else:
            live.pop((o["as_id"], o["slot"]), None)
    created = set(live.values())
    assert created, g["memslot_ioctls"][:3]
    assert {(int(r.slot), int(r.gpa), int(r.size_bytes)) for r in first.itertuples()} == created
    assert (first["start_ts"] == 0).all() and first["snapshot_ts"].notna().all()
    assert first["vma_source"].str.startswith("read by a BPF iterator").all(), \
        first["vma_source"].tolist()
    # the iterator read each file's own name: smaps shows the same (memfd:NAME),
    # or a path ending in it (a shared anonymous mapping: /dev/zero (deleted))
    snap = m.recording["memslot_snapshot"]
    files = snap[(snap["pid"] == g["pid"]) & snap["vma_has_file"]]
    assert len(files) or scenario != "demo"  # the demo has a memfd slot
    for r in files.itertuples():
        (vma,) = first.loc[first["slot"] == r.slot, "vma"]
        name = kernel_file_name(r.vma_name, r.vma_fs_magic, r.vma_ino, r.vma_dev)
        assert name == vma or vma.removesuffix(" (deleted)").endswith("/" + r.vma_name), \
            (name, vma)
    # the faults land in their slots, as many as the guest counts
    f = m.faults[m.faults["pid"] == g["pid"]]
    assert len(f) == g["expected_faults_total"]
    assert (f["slot_row"] >= 0).all(), "faults outside every memslot"
    per_slot = f.groupby(m.slots.loc[f["slot_row"], "slot"].to_numpy()).size().to_dict()
    want = {s["slot"]: s["expected_faults"] for s in g["slots"] if s["expected_faults"]}
    assert per_slot == want
    # and the report says where they came from
    t = run("report", out, "--width", "200")
    assert t.returncode == 0, t.stderr
    assert BEFORE_RECORDING in t.stdout and "faults outside every" not in t.stdout
