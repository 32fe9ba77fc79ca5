"""record on this machine's real KVM, real BPF: end to end, signals, crash, filters.

These need root, bcc, tracefs and /dev/kvm; in CI (KVMTRACE_REQUIRE_LIVE=1)
they fail rather than skip when something is missing.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import kvmtrace
from kvmtrace.recording.reader import read

from conftest import ROOT, SpteCounter, guest_cmd, kvmtrace as run, load_json
from test_report_fixture import check_against_guest

pytestmark = pytest.mark.usefixtures("live")


def record_cmd(out, *args):
    return [sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(out), *map(str, args)]


def wait_for(pred, timeout=30, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_recorder(out, *args):
    p = subprocess.Popen(record_cmd(out, *args), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    # the file exists (with its schema) once the probes are attached
    wait_for(lambda: os.path.exists(out) and os.path.getsize(out) > 0 or p.poll() is not None,
             what="recorder start")
    assert p.poll() is None, p.communicate()
    return p


def test_demo_end_to_end(tmp_path):
    """The report's memslot table equals what the guest set up, and per-slot
    faults equal the pages touched; bpftrace counts the same sptes."""
    out, rep = tmp_path / "demo.kvt", tmp_path / "guest.json"
    counter = SpteCounter()
    try:
        p = run("record", "-o", out, "--", *guest_cmd("--scenario", "demo", "-q",
                                                          "--report", rep))
    finally:
        sptes, _ = counter.stop()
    assert p.returncode == 0, p.stderr
    assert "stopped (command exited)" in p.stderr
    guest = load_json(rep)
    model = kvmtrace.load(str(out))
    assert model.recording.complete and not model.recording.problems
    check_against_guest(model, guest)
    # independent witness: bpftrace saw as many kvm_mmu_set_spte for this guest
    ours = model.recording["set_spte"]
    assert len(ours[ours["pid"] == guest["pid"]]) == sum(sptes[guest["pid"]].values())
    end = json.loads(model.recording["notes"].query("key == 'end'")["value"].iloc[0])
    assert sum(end["lost"].values()) == 0
    assert "kvmmmu:kvm_mmu_set_spte" in model.meta["probes"]["attached"]
    # a smaps snapshot was taken after the memslot burst, or tried and found
    # the guest gone (a loaded host: the names then come from BPF)
    notes = model.recording["notes"]
    tried = notes[(notes["key"] == "smaps_unavailable")
                  & notes["value"].str.contains('"reason": "memslot"')]
    assert "memslot" in set(model.recording["vmas"]["reason"]) or len(tried)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_keeps_everything(tmp_path, sig):
    out, rep = tmp_path / "sig.kvt", tmp_path / "guest.json"
    rec = start_recorder(out)  # all VMs on the host
    g = subprocess.run(guest_cmd("--scenario", "minimal", "-q", "--report", rep), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert g.returncode == 0, g.stderr
    time.sleep(0.3)
    rec.send_signal(sig)
    _, err = rec.communicate(timeout=30)
    assert rec.returncode == 0, err
    assert f"stopped ({sig.name})" in err
    r = read(str(out))
    assert r.complete
    guest = load_json(rep)
    ms = r["memslot"]
    assert len(ms[ms["pid"] == guest["pid"]]) == len(guest["memslot_ioctls"])
    f = kvmtrace.load(str(out)).faults
    assert (f["pid"] == guest["pid"]).sum() == guest["expected_faults_total"]


def test_sigkill_reads_back_to_the_last_flush(tmp_path):
    out, rep = tmp_path / "killed.kvt", tmp_path / "guest.json"
    rec = start_recorder(out, "--flush-interval", "0.2")
    g = subprocess.run(guest_cmd("--scenario", "minimal", "-q", "--report", rep), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert g.returncode == 0, g.stderr
    time.sleep(1.0)  # several flushes
    rec.kill()
    rec.communicate(timeout=10)
    r = read(str(out))
    assert not r.complete and r.problems
    guest = load_json(rep)
    assert (r["memslot"]["pid"] == guest["pid"]).sum() == len(guest["memslot_ioctls"])
    p = run("report", out)
    assert p.returncode == 0 and "not closed" in p.stdout


def test_pid_filter_traces_only_that_vmm(tmp_path):
    out = tmp_path / "pid.kvt"
    rep_a, rep_b = tmp_path / "a.json", tmp_path / "b.json"
    # A waits (same pid, before exec) until the recorder is attached: no timing guess
    go = ("import os, sys; sys.stdin.read(1); "
          f"os.execv(sys.executable, {guest_cmd('--scenario', 'minimal', '-q', '--report', rep_a)!r})")
    a = subprocess.Popen([sys.executable, "-c", go], cwd=ROOT, stdin=subprocess.PIPE)
    rec = start_recorder(out, "--pid", a.pid)
    a.stdin.write(b"g")
    a.stdin.close()
    b = subprocess.run(guest_cmd("--scenario", "minimal", "-q", "--report", rep_b), cwd=ROOT,
                       timeout=60)
    assert a.wait(timeout=60) == 0 and b.returncode == 0
    time.sleep(0.3)
    rec.send_signal(signal.SIGINT)
    rec.communicate(timeout=30)
    r = read(str(out))
    pids = set(r["memslot"]["pid"]) | set(r["spte_requested"]["pid"])
    assert pids == {a.pid}
    assert len(r["spte_requested"]) == load_json(rep_a)["expected_faults_total"]


def test_duration_and_command_status(tmp_path):
    out = tmp_path / "d.kvt"
    t0 = time.monotonic()
    p = run("record", "-o", out, "--duration", "1")
    assert p.returncode == 0 and 0.9 < time.monotonic() - t0 < 30
    assert "stopped (duration)" in p.stderr
    assert read(str(out)).complete
    p = run("record", "-o", tmp_path / "f.kvt", "--", "false")
    assert p.returncode == 1 and read(str(tmp_path / "f.kvt")).complete
    p = run("record", "-o", tmp_path / "g.kvt", "--", "/no/such/command")
    assert p.returncode != 0 and "command not found" in p.stderr


def test_memslots_only_probe_set(tmp_path):
    out, rep = tmp_path / "m.kvt", tmp_path / "guest.json"
    p = run("record", "-o", out, "--probes", "memslots", "--",
            *guest_cmd("--scenario", "minimal", "-q", "--report", rep))
    assert p.returncode == 0, p.stderr
    r = read(str(out))
    assert r.meta["probes"]["attached"] == ["memslot-ioctls", "process-exits"]
    assert len(r["memslot"]) == len(load_json(rep)["memslot_ioctls"]) and not len(r["set_spte"])


def test_doctor_tells_the_truth():
    p = run("doctor", "--format", "json")
    body = json.loads(p.stdout)
    assert p.returncode == 0 and body["can_record"]
    checks = {c["name"]: c for c in body["checks"]}
    assert checks["attach tracepoint"]["ok"] is True
    kprobes = (os.path.exists("/sys/bus/event_source/devices/kprobe/type")
               or os.path.exists("/sys/kernel/tracing/kprobe_events"))
    if not kprobes:
        assert checks["attach kprobe"]["ok"] is False
        assert "CONFIG_KPROBES" in checks["attach kprobe"]["detail"]
    assert checks["record's program"]["ok"] is True
    assert checks["/dev/kvm"]["ok"] is True


def test_disk_full_stops_with_one_line_and_keeps_the_flushed_part(tmp_path):
    """A tmpfs too small for the recording: record stops with one clear line,
    and the file still reads back (everything up to the last flush)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "full.kvt"
        # the guest's own stderr is left out: stopped mid-run, the test VMM's
        # vCPU thread may print its own traceback; kvmtrace's must not
        guest = " ".join(guest_cmd("--scenario", "demo", "-q", "--hold", "0.5"))
        p = run("record", "-o", out, "--flush-interval", "0.05", "--",
                "sh", "-c", f"exec {guest} 2>/dev/null")
        assert p.returncode == 1 and "Traceback" not in p.stderr  # a failed recording
        assert "No space left on device" in p.stderr.splitlines()[-1]
        r = read(str(out))
        assert not r.complete
        assert run("report", out).returncode == 0
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
