"""record's options and what it refuses: one line, exit 2, nothing created,
before the seconds of BPF compile; and the pieces behind its stop paths
(exit status, command checks, host load) without a live recording."""

import json
import os
import resource
import signal
import stat
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from kvmtrace import cli
from kvmtrace.collectors import child
from kvmtrace.analysis.hostload import host_load
from kvmtrace.collectors.hostload import HostLoad
from kvmtrace.collectors.session import Stats
from kvmtrace.recording.reader import read

from conftest import REQUIRE_LIVE, guest_cmd, kvmtrace, one_line_error

# CPU seconds of the refusing kvmtrace: refused before the BPF compile (a
# compile costs 3-5 CPU s here; CPU time, not wall time, so a busy host gives
# the same verdict). Compile cache off: a cached load would be cheap too.
FAST = 2.5


@pytest.fixture
def root():
    if os.geteuid() != 0:
        if REQUIRE_LIVE:
            pytest.fail("record option checks need root and KVMTRACE_REQUIRE_LIVE=1")
        pytest.skip("not root (record refuses first)")


def refused(*args, contains=None, code=2):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = kvmtrace("record", "--no-cache", *args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    took = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    line = one_line_error(p)
    assert p.returncode == code, (p.returncode, p.stderr)
    if contains:
        assert contains in line, line
    return line, took


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf", "abc", ""])
def test_duration_must_be_positive_and_finite(tmp_path, value):
    line, _ = refused("-o", tmp_path / "x.kvt", "--duration", value, contains="--duration")
    assert not (tmp_path / "x.kvt").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "0.01", "3601", "x"])
def test_flush_interval_bounds(tmp_path, value):
    line, _ = refused("-o", tmp_path / "x.kvt", "--flush-interval", value,
                      contains="--flush-interval")
    assert "0.05" in line and "3600" in line
    assert not (tmp_path / "x.kvt").exists()


def test_bounds_themselves_are_accepted(tmp_path, root):
    """0.05 and 3600 pass the option check (and the run stops at the next one,
    a pid that does not exist, before any BPF work)."""
    for v in ("0.05", "3600"):
        refused("-o", tmp_path / "x.kvt", "--flush-interval", v, "--pid", "999999999",
                contains="no process with pid 999999999")


@pytest.mark.parametrize("value", ["abc", "0", "-3", "99999999999"])
def test_pid_must_be_a_pid(tmp_path, value):
    refused("-o", tmp_path / "x.kvt", "--pid", value, contains="--pid")


def test_empty_names(tmp_path, root):
    refused("-o", "", "--duration", "1", contains="empty")
    refused("-o", tmp_path / "x.kvt", "--", "", contains="empty")


def test_leave_running_needs_a_command(tmp_path):
    refused("-o", tmp_path / "x.kvt", "--leave-running", contains="--leave-running")


def test_command_not_found_creates_no_file(tmp_path, root):
    out = tmp_path / "x.kvt"
    line, took = refused("-o", out, "--", "/no/such/command", contains="No such file")
    assert not out.exists() and took < FAST
    line, took = refused("-o", out, "--", "no-such-command-kvmtrace",
                         contains="command not found")
    assert not out.exists() and took < FAST


def test_command_not_executable_creates_no_file(tmp_path, root):
    out = tmp_path / "x.kvt"
    plain = tmp_path / "plain.sh"
    plain.write_text("#!/bin/sh\nexit 0\n")
    plain.chmod(0o644)
    line, took = refused("-o", out, "--", plain, contains="Permission denied")
    assert took < FAST
    line, _ = refused("-o", out, "--", tmp_path, contains="Is a directory")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/no/such/interpreter\n")
    bad.chmod(0o755)
    refused("-o", out, "--", bad, contains="bad interpreter /no/such/interpreter")
    assert not out.exists()


def test_exec_format_error_creates_no_file(tmp_path, live):
    """Not caught by the check before the compile (executable, no #!, not
    ELF): exec fails, record says so in one line and removes the file it made."""
    out = tmp_path / "x.kvt"
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01 not a program\n")
    junk.chmod(0o755)
    refused("-o", out, "--", junk, contains="Exec format error")
    assert not out.exists()


def test_fifo_output_is_refused_fast(tmp_path, root):
    fifo = tmp_path / "fifo.kvt"
    os.mkfifo(fifo)
    for extra in ((), ("--force",)):
        line, took = refused("-o", fifo, *extra, "--duration", "1",
                             contains="not a regular file")
        assert took < FAST, took
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_output_checks_before_any_work(tmp_path, root):
    existing = tmp_path / "old.kvt"
    existing.write_bytes(b"keep")
    _, took = refused("-o", existing, "--duration", "1", contains="--force")
    assert existing.read_bytes() == b"keep" and took < FAST
    _, took = refused("-o", tmp_path / "no" / "dir" / "x.kvt", "--duration", "1",
                      contains="no such directory")
    assert took < FAST
    _, took = refused("-o", tmp_path, "--duration", "1")
    assert took < FAST


def test_no_such_pid(tmp_path, root):
    _, took = refused("-o", tmp_path / "x.kvt", "--pid", "999999999",
                      contains="no process with pid")
    assert took < FAST and not (tmp_path / "x.kvt").exists()


def test_tracefs_error_is_one_line(tmp_path, root, monkeypatch):
    """tracefs not mounted and mount(8) missing: one line, exit 1, no file."""
    from kvmtrace.host import tracefs

    def no_mount(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", "mount")
    monkeypatch.setattr(tracefs, "find", lambda: None)
    monkeypatch.setattr(tracefs.subprocess, "run", no_mount)
    r = CliRunner().invoke(cli.main, ["record", "-o", str(tmp_path / "x.kvt"),
                                      "--duration", "1"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tracefs is not mounted" in lines[0], r.output
    assert "mount -t tracefs" in lines[0]
    assert not (tmp_path / "x.kvt").exists()


def test_markup_in_output_path(tmp_path, live):
    (tmp_path / "a[").mkdir()
    out = tmp_path / "a[/]b[bold].kvt"
    p = kvmtrace("record", "-o", out, "--duration", "0.3")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert str(out) in p.stderr
    assert read(str(out)).complete


def test_force_replaces_a_recording(tmp_path, live):
    out = tmp_path / "r.kvt"
    out.write_bytes(b"old")
    p = kvmtrace("record", "-o", out, "--force", "--", "true")
    assert p.returncode == 0, p.stderr
    assert read(str(out)).complete


# -- pieces, no recording -------------------------------------------------------

def test_exit_codes():
    assert child.exit_status(None) is None
    assert child.exit_status(0) == 0 and child.exit_status(7) == 7
    assert child.exit_status(-signal.SIGTERM) == 143
    for by, status, code in (("SIGINT", -15, 0), ("SIGTERM", 143, 0), ("SIGHUP", None, 0),
                             ("SIGQUIT", -9, 0), ("duration", -15, 0),
                             ("command exited", 0, 0), ("command exited", 3, 3),
                             ("command exited", -signal.SIGSEGV, 139)):
        assert Stats(stopped_by=by, command_status=status).exit_code == code


def test_check_runnable(tmp_path, monkeypatch):
    assert child.check_runnable(["sh"]).endswith("/sh")
    with pytest.raises(child.SpawnError, match="command not found"):
        child.check_runnable(["no-such-command-kvmtrace"])
    # PATH order: a non-executable file first is skipped, as execvp does
    d1, d2 = tmp_path / "1", tmp_path / "2"
    d1.mkdir(), d2.mkdir()
    (d1 / "tool").write_text("#!/bin/sh\n")
    (d2 / "tool").write_text("#!/bin/sh\n")
    (d2 / "tool").chmod(0o755)
    monkeypatch.setenv("PATH", f"{d1}:{d2}")
    assert child.check_runnable(["tool"]) == str(d2 / "tool")
    (d2 / "tool").chmod(0o644)
    with pytest.raises(child.SpawnError, match="Permission denied"):
        child.check_runnable(["tool"])


def test_spawn_reports_exec_errors(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01")
    junk.chmod(0o755)
    with pytest.raises(child.SpawnError, match="Exec format error"):
        child.spawn([str(junk)], lambda pid: None, own_group=True)
    seen = []
    p = child.spawn(["sh", "-c", "exit 5"], seen.append, own_group=True)
    assert seen == [p.pid] and p.wait(10) == 5


def test_spawn_child_never_runs_when_before_exec_fails(tmp_path):
    mark = tmp_path / "ran"

    def boom(pid):
        raise RuntimeError("no")
    with pytest.raises(RuntimeError):
        child.spawn(["touch", str(mark)], boom)
    time.sleep(0.2)
    assert not mark.exists()


def test_pdeathsig_is_set_in_the_child(tmp_path):
    """/proc does not show it; the child reports prctl(PR_GET_PDEATHSIG)."""
    out = tmp_path / "sig"
    code = ("import ctypes,sys; l=ctypes.CDLL(None); s=ctypes.c_int(); "
            "l.prctl(2, ctypes.byref(s)); open(sys.argv[1],'w').write(str(s.value))")
    p = child.spawn([guest_cmd()[0], "-c", code, str(out)], lambda pid: None)
    assert p.wait(30) == 0 and out.read_text() == str(int(signal.SIGKILL))
    p = child.spawn([guest_cmd()[0], "-c", code, str(out)], lambda pid: None,
                    leave_running=True)
    assert p.wait(30) == 0 and out.read_text() == "0"


def test_stop_escalates_and_sweeps_the_group():
    p = child.spawn(["sh", "-c", "trap '' TERM; sleep 30 & wait"], lambda pid: None,
                    own_group=True)
    time.sleep(0.3)
    t0 = time.monotonic()
    how = p.stop(0.5)
    assert how.startswith("SIGKILL") and time.monotonic() - t0 < 30  # (load: wall time)
    assert not p.group_alive()


def test_host_load_note_round_trip():
    h = HostLoad()
    time.sleep(0.1)
    h.sample()
    start, end = h.start_note(), h.end_note()
    notes = pd.DataFrame({"ts": [1, 2], "key": ["host_load", "host_load"],
                          "value": [json.dumps(start), json.dumps(end)]})
    got = host_load(notes)
    assert got["complete"] and got["cpus"] == os.cpu_count()
    assert got["intervals"] == 0  # 0.1 s: too short for an interval, only the whole run
    assert 0 <= got["busy_pct"]["run"] <= 100 and "min" not in got["busy_pct"]
    assert set(got["start"]) >= {"load1", "load5", "load15"}
    assert got["load1"]["min"] <= got["load1"]["max"]
    cut = host_load(notes.iloc[:1])
    assert not cut["complete"] and cut["end"] is None
    assert host_load(notes.iloc[:0]) is None
