"""Every way `record -- CMD` can stop, on this machine's real KVM and BPF.

For each stop path: what record exits with, whether the recording reads back
(complete, with an end note naming the cause, or up to the last flush after
SIGKILL), and that the launched command is gone afterwards (or, with
--leave-running, still there). The launched command is the built-in guest
holding its VM open (--hold), i.e. a running VMM.
"""

import fcntl
import json
import os
import pty
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from kvmtrace.analysis.hostload import host_load
from kvmtrace.recording.reader import read

from conftest import ROOT, guest_cmd, kvmtrace as run, load_json
from test_record_live import record_cmd, start_recorder as _start_recorder, wait_for

pytestmark = pytest.mark.usefixtures("live")

_started = []


def start_recorder(out, *args):
    p = _start_recorder(out, *args)
    _started.append(p)
    return p


@pytest.fixture(autouse=True)
def no_recorder_left():
    """A failed test leaves no recorder (and so, by PDEATHSIG, no command) behind."""
    yield
    while _started:
        p = _started.pop()
        if p.poll() is None:
            p.kill()
            p.wait()

BOUND = 10  # s: the command must be gone this long after record is (grace is 3 s)


def proc_start(pid):
    """(state, starttime) of a process, None once it is gone (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def gone(pid, start, timeout=BOUND):
    """True once pid no longer runs (or is another process): seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc_start(pid) != start:
            return True
        time.sleep(0.02)
    return False


def end_note(r):
    n = r["notes"]
    return json.loads(n[n["key"] == "end"]["value"].iloc[-1])


def vmm(tmp_path, hold=120):
    rep = tmp_path / "guest.json"
    return rep, guest_cmd("--scenario", "minimal", "-q", "--hold", hold, "--report", rep)


def wait_guest(rep, rec):
    """The guest's report (written once its VM ran, before it holds): its pid."""
    def ready():
        assert rec.poll() is None, rec.communicate()
        try:
            return load_json(rep)
        except (OSError, ValueError):
            return None
    wait_for(lambda: ready() is not None, timeout=60, what="guest report")
    g = load_json(rep)
    return g, g["pid"], proc_start(g["pid"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT],
                         ids=lambda s: s.name)
def test_stop_signal_ends_command_and_closes_file(tmp_path, sig):
    out = tmp_path / "s.kvt"
    rep, cmd = vmm(tmp_path)
    rec = start_recorder(out, "--flush-interval", "0.2", "--", *cmd)
    guest, pid, start = wait_guest(rep, rec)
    assert proc_start(pid) is not None
    rec.send_signal(sig)
    _, err = rec.communicate(timeout=30)
    assert rec.returncode == 0, err
    assert f"stopped ({sig.name})" in err and "Traceback" not in err
    assert gone(pid, start, timeout=1), "command still running after record exited"
    r = read(str(out))
    assert r.complete and not r.problems
    end = end_note(r)
    assert end["stopped_by"] == sig.name and end["signal"] == sig.name
    assert end["exit_code"] == 0 and end["command_pid"] == pid
    # the guest exits 128+15 from its SIGTERM handler, within the grace period
    # (past it, the end note would say SIGKILL; how long the stop took in wall
    # time is the host's load, 6.5 to 10 s in a fresh CI run)
    assert end["command_stop"] == "SIGTERM" and end["command_status"] == 143, end
    ms = r["memslot"]
    assert (ms["pid"] == pid).sum() == len(guest["memslot_ioctls"])
    load = host_load(r)
    assert load["complete"] and 0 <= load["busy_pct"]["run"] <= 100


def test_sigkill_of_record_kills_command(tmp_path):
    """PR_SET_PDEATHSIG: record dies, the kernel kills the command at once;
    the file reads back up to the last flush."""
    out = tmp_path / "k.kvt"
    rep, cmd = vmm(tmp_path)
    rec = start_recorder(out, "--flush-interval", "0.2", "--", *cmd)
    guest, pid, start = wait_guest(rep, rec)
    time.sleep(0.8)  # flushes after the guest's memslots
    rec.kill()
    rec.communicate(timeout=10)
    t0 = time.monotonic()
    assert gone(pid, start), "command outlived record's SIGKILL"
    print(f"command gone {1000 * (time.monotonic() - t0):.1f} ms after record was reaped")
    r = read(str(out))
    assert not r.complete and r.problems
    assert (r["memslot"]["pid"] == pid).sum() == len(guest["memslot_ioctls"])
    load = host_load(r)
    assert load is not None and not load["complete"] and load["start"]["load1"] >= 0


def test_command_exit_status_is_propagated(tmp_path):
    p = run("record", "-o", tmp_path / "a.kvt", "--", "sh", "-c", "exit 7")
    assert p.returncode == 7, p.stderr
    assert "stopped (command exited)" in p.stderr
    end = end_note(read(str(tmp_path / "a.kvt")))
    assert end["command_status"] == 7 and end["exit_code"] == 7
    # killed by a signal: 128+N, as a shell reports it
    p = run("record", "-o", tmp_path / "b.kvt", "--", "sh", "-c", "kill -USR1 $$")
    assert p.returncode == 128 + signal.SIGUSR1, p.stderr
    end = end_note(read(str(tmp_path / "b.kvt")))
    assert end["command_status"] == -signal.SIGUSR1 and end["exit_code"] == 138
    # a guest that exits by itself, successfully
    rep = tmp_path / "g.json"
    p = run("record", "-o", tmp_path / "c.kvt", "--",
            *guest_cmd("--scenario", "minimal", "-q", "--report", rep))
    assert p.returncode == 0 and read(str(tmp_path / "c.kvt")).complete


def start_detached(out, log, *args):
    """record with its output in a file: a command left running keeps record's
    stdout / stderr open, so a pipe would never reach EOF."""
    with open(log, "w") as f:
        p = subprocess.Popen(record_cmd(out, *args), cwd=ROOT, stdout=f, stderr=f)
    wait_for(lambda: os.path.exists(out) and os.path.getsize(out) > 0 or p.poll() is not None,
             what="recorder start")
    assert p.poll() is None, open(log).read()
    return p


def test_leave_running(tmp_path):
    out, log = tmp_path / "l.kvt", tmp_path / "log"
    rep, cmd = vmm(tmp_path)
    rec = start_detached(out, log, "--flush-interval", "0.2", "--leave-running", "--", *cmd)
    guest, pid, start = wait_guest(rep, rec)
    try:
        rec.send_signal(signal.SIGINT)
        assert rec.wait(timeout=30) == 0, log.read_text()
        time.sleep(1)
        assert proc_start(pid) == start, "--leave-running: the command was stopped"
        r = read(str(out))
        assert r.complete and end_note(r)["command_stop"] == "left running"
        assert end_note(r)["command_status"] is None
        # nor does a SIGKILL of record take it along (no PDEATHSIG)
        out2, rep2 = tmp_path / "l2.kvt", tmp_path / "g2.json"
        rec2 = start_detached(out2, tmp_path / "log2", "--leave-running", "--",
                              *guest_cmd("--scenario", "minimal", "-q", "--hold", 120,
                                         "--report", rep2))
        _, pid2, start2 = wait_guest(rep2, rec2)
        rec2.kill()
        rec2.wait(timeout=10)
        time.sleep(1)
        assert proc_start(pid2) == start2
    finally:
        for p, s in ((pid, start), (locals().get("pid2"), locals().get("start2"))):
            if p and proc_start(p) == s:
                os.kill(p, signal.SIGKILL)


def test_second_signal_skips_the_grace(tmp_path):
    """A command ignoring SIGTERM is killed after the grace period (3 s), or at
    once on a second stop signal."""
    cmd = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"]
    out = tmp_path / "g.kvt"
    rec = start_recorder(out, "--", *cmd)
    time.sleep(0.5)
    t0 = time.monotonic()
    rec.send_signal(signal.SIGTERM)
    _, err = rec.communicate(timeout=30)
    waited = time.monotonic() - t0
    assert rec.returncode == 0, err
    end = end_note(read(str(out)))
    assert end["command_stop"].startswith("SIGKILL (still running 3 s"), end
    assert waited > 2.9, waited  # the grace is waited out (no upper bound: load)
    out = tmp_path / "h.kvt"
    rec = start_recorder(out, "--", *cmd)
    time.sleep(0.5)
    rec.send_signal(signal.SIGINT)
    time.sleep(0.3)
    rec.send_signal(signal.SIGINT)
    _, err = rec.communicate(timeout=30)
    assert rec.returncode == 0, err
    end = end_note(read(str(out)))
    # the end note says the second signal, not the grace, ended it
    assert end["stopped_by"] == "SIGINT" and end["command_stop"].startswith("SIGKILL (second")


def test_wrapper_script_children_are_stopped_too(tmp_path):
    """Not in a terminal, the command has its own process group: a stop reaches
    what a wrapper script started."""
    out = tmp_path / "w.kvt"
    rec = start_recorder(out, "--", "sh", "-c", "sleep 300 & sleep 301 & wait")
    children = []

    def find():
        sh = [p for p in _pids() if _ppid(p) == rec.pid]
        children[:] = [p for p in _pids() if sh and _ppid(p) == sh[0]
                       and _cmdline(p) in ("sleep\x00300\x00", "sleep\x00301\x00")]
        return len(children) == 2
    wait_for(find, what="the script's children")
    assert all(os.getpgid(p) == sh for p in children for sh in [os.getpgid(children[0])])
    assert os.getpgid(children[0]) != os.getpgid(rec.pid)
    starts = {p: proc_start(p) for p in children}
    rec.send_signal(signal.SIGTERM)
    _, err = rec.communicate(timeout=30)
    assert rec.returncode == 0, err
    for p, s in starts.items():
        assert gone(p, s, timeout=1), f"the script's child {p} outlived record"


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


@pytest.mark.parametrize("how", ["ctrl-c", "hangup"])
def test_in_a_terminal(tmp_path, how):
    """record in the foreground of a terminal (the command shares its process
    group there). Ctrl-C typed: the terminal sends SIGINT to both. The terminal
    closed: the kernel sends SIGHUP to both, and every later write to it fails
    (EIO). Either way the file is closed with its end marker, exit 0, and the
    live table showed a path with rich markup in it as typed."""
    (tmp_path / "t[").mkdir()
    out = tmp_path / "t[/]y.kvt"
    rep, cmd = vmm(tmp_path)
    master, slave = pty.openpty()

    def ctty():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    rec = subprocess.Popen(record_cmd(out, "--flush-interval", "0.2", "--", *cmd), cwd=ROOT,
                           stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                           preexec_fn=ctty)
    _started.append(rec)
    os.close(slave)
    screen = bytearray()

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            screen.extend(data)
    threading.Thread(target=drain, daemon=True).start()
    try:
        guest, pid, start = wait_guest(rep, rec)
        assert os.getpgid(pid) == os.getpgid(rec.pid)  # the terminal's foreground group
        end = time.monotonic() + 60  # the live table's first draw: waited for, not timed
        while not (b"kvmtrace record:" in screen and b"t[/]y.kvt" in screen) \
                and time.monotonic() < end:
            time.sleep(0.1)
        assert b"kvmtrace record:" in screen and b"t[/]y.kvt" in screen, screen[-400:]
        if how == "ctrl-c":
            os.write(master, b"\x03")
            assert rec.wait(timeout=30) == 0
    finally:
        os.close(master)  # hangup
    assert rec.wait(timeout=30) == 0
    assert gone(pid, start, timeout=1)
    r = read(str(out))
    assert r.complete
    end = end_note(r)
    assert end["stopped_by"] == {"ctrl-c": "SIGINT", "hangup": "SIGHUP"}[how], end
    assert (r["memslot"]["pid"] == pid).sum() == len(guest["memslot_ioctls"])


def _sigign(pid):
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(ln for ln in f if ln.startswith("SigIgn:")).split()[1], 16)
    return {signal.Signals(n) for n in range(1, 65) if mask >> (n - 1) & 1
            and n in signal.valid_signals()}


@pytest.mark.parametrize("nohup", [False, True], ids=["plain", "nohup"])
def test_command_signal_dispositions(tmp_path, nohup):
    """The command starts with the dispositions record started with: SIGPIPE
    not ignored (Python ignores it), SIGHUP ignored under nohup, and then
    record does not stop on SIGHUP either."""
    out = tmp_path / "n.kvt"

    def pre():
        # a known start, whatever this test's parent ignores (a shell's
        # background job starts with SIGINT and SIGQUIT ignored)
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        if nohup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
    rec = subprocess.Popen(record_cmd(out, "--", "sleep", "300"), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=pre)
    _started.append(rec)
    wait_for(lambda: [p for p in _pids() if _ppid(p) == rec.pid and
                      _cmdline(p) == "sleep\x00300\x00"], what="the command")
    cmd = next(p for p in _pids() if _ppid(p) == rec.pid and _cmdline(p) == "sleep\x00300\x00")
    ign = _sigign(cmd)
    assert signal.SIGPIPE not in ign and signal.SIGINT not in ign
    # none of record's own descriptors (BPF maps and programs, perf events, the
    # recording) leaked into the command: they would outlive record with it
    links = [os.readlink(f"/proc/{cmd}/fd/{fd}") for fd in os.listdir(f"/proc/{cmd}/fd")]
    assert not [ln for ln in links if "bpf" in ln or "perf_event" in ln or ln == str(out)
                or "eventpoll" in ln], links
    assert (signal.SIGHUP in ign) == nohup
    rec.send_signal(signal.SIGHUP)
    time.sleep(1)
    if nohup:
        assert rec.poll() is None
        rec.send_signal(signal.SIGINT)
    _, err = rec.communicate(timeout=30)
    assert rec.returncode == 0, err
    assert end_note(read(str(out)))["stopped_by"] == ("SIGINT" if nohup else "SIGHUP")


def test_stderr_closed_does_not_stop_recording(tmp_path):
    """Progress output that cannot be written (a closed pipe) is dropped; the
    recording goes on and closes normally."""
    out = tmp_path / "p.kvt"
    rec = subprocess.Popen(record_cmd(out, "--flush-interval", "0.1"), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rec.stderr.close()  # record's first line hits EPIPE
    wait_for(lambda: os.path.exists(out) and os.path.getsize(out) > 0, what="recording")
    time.sleep(0.5)
    assert rec.poll() is None
    rec.send_signal(signal.SIGINT)
    assert rec.wait(timeout=30) == 0
    r = read(str(out))
    assert r.complete and end_note(r)["stopped_by"] == "SIGINT"


def test_signal_before_recording_begins(tmp_path):
    """Ctrl-C during the BPF compile: one line, 128+2, no file. (--no-cache: a
    program from the compile cache loads in a tenth of a second.)"""
    out = tmp_path / "early.kvt"
    rec = subprocess.Popen(record_cmd(out, "--no-cache", "--", "sleep", "100"), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # imports done (0.7 s), compiling (5 to 9 s on the loaded host)
    assert not out.exists()
    rec.send_signal(signal.SIGINT)
    _, err = rec.communicate(timeout=30)
    assert rec.returncode == 128 + signal.SIGINT, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "before recording began" in lines[0], err
    assert not out.exists()
    assert not any(_cmdline(p) == "sleep\x00100\x00" for p in os.listdir("/proc")
                   if p.isdigit())


def test_host_load_recorded(tmp_path):
    out = tmp_path / "d.kvt"
    p = run("record", "-o", out, "--duration", "3.2", "--flush-interval", "0.2")
    assert p.returncode == 0, p.stderr
    load = host_load(read(str(out)))
    assert load["complete"] and load["cpus"] == os.cpu_count()
    assert 2 <= load["intervals"] <= 4, load  # about 1 s each, however often it flushed
    for k in ("steal_pct", "iowait_pct", "busy_pct"):
        assert 0 <= load[k]["min"] <= load[k]["run"] <= load[k]["max"] <= 100, load
    assert load["load1"]["min"] <= load["load1"]["max"]
    assert 3.0 < load["seconds"] < 5


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
