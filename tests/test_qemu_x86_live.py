"""QEMU's names for its memslots, asked of QEMU itself (record --qmp), live
on this x86 host (issue 7, items 1 and 4), checked against a second view of
QEMU's that the test takes on a QMP socket of its own.

QEMU serves one client per QMP socket, so each QEMU here has two: record
takes the first (--qmp auto, or --qmp PATH), the test the other (the
witness: `info mtree -f` at a moment it notes, memory hot-add, `quit`).

QEMU runs with -S (its vCPUs never start: on this KVM-PVM host SeaBIOS's
PAM programming came 2 to 8 s after start depending on the host's load, a
poor clock for a test). Its memory map then changes only when the test says:
`object-add` of a memory backend and `device_add pc-dimm` map new RAM (a new
memslot, named after the backend's id) within milliseconds.

- recorded: `record --qmp auto -- qemu-system-x86_64 -enable-kvm -S ...`
  with RAM from a memfd backend (id kt-ram: its VMA only says
  memfd:memory-backend-memfd); a DIMM (kt-dimm-a) is hot-added while
  recording. The memslots live when the witness looked are exactly the
  RAM/ROM ranges of QEMU's flat view (GPA, size), each with the name and kind
  of its QEMU region in the model, the JSON report and the text report; every
  name given is QEMU's for that range in an answer taken while the slot
  version was live.
- attached, two QEMUs at once: A and B run (not recorded); `record --pid A
  --qmp A's socket`; a DIMM is hot-added to each. A's slots set before
  recording (from the memslot iterator) and the DIMM's are named after A's
  regions; B appears nowhere in the recording (no row of any table, no VM,
  no answer of QEMU, not its socket).

Skipped without qemu-system-x86_64 or live capabilities; with
KVMTRACE_REQUIRE_LIVE=1 a missing QEMU on x86 fails instead.
With KVMTRACE_QEMU_KEEP=DIR the first test's recording and witness view are
copied to DIR (how tests/fixtures/qemu-x86/ was made).
"""

import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvmtrace
from kvmtrace import render
from kvmtrace.analysis.qemu import MEM_KINDS, flat_view, memory_kind
from kvmtrace.recording.reader import RecordingError, read

from conftest import ROOT, kvmtrace as run, skip_or_fail

QEMU = "qemu-system-x86_64"
IS_X86 = platform.machine() == "x86_64"
PAGE = os.sysconf("SC_PAGE_SIZE")
pytestmark = pytest.mark.usefixtures("live")


def _missing() -> str | None:
    if not IS_X86:
        return "needs an x86 host"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (Debian: apt-get install qemu-system-x86)"
    return None


@pytest.fixture(autouse=True)
def qemu_x86():
    skip_or_fail(_missing(), IS_X86, "QEMU live test")


def qemu_cmd(*sockets) -> list[str]:
    """QEMU with its RAM from a memfd backend named kt-ram, room for a DIMM,
    vCPUs stopped (-S), and one QMP socket per path."""
    cmd = [QEMU, "-enable-kvm", "-S", "-m", "64,slots=2,maxmem=1G",
           "-object", "memory-backend-memfd,id=kt-ram,size=64M", "-machine",
           "memory-backend=kt-ram", "-display", "none", "-nodefaults"]
    for s in sockets:
        cmd += ["-qmp", f"unix:{s},server=on,wait=off"]
    return cmd


class Qmp:
    """The test's own QMP client (one socket of the QEMU's)."""

    def __init__(self, path, timeout=120):
        end = time.monotonic() + timeout
        while True:
            self.s = socket.socket(socket.AF_UNIX)
            self.s.settimeout(timeout)
            try:
                self.s.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.s.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        assert "QMP" in json.loads(self.f.readline())
        self.execute("qmp_capabilities")

    def execute(self, cmd, **args):
        self.f.write(json.dumps({"execute": cmd, "arguments": args} if args else
                                {"execute": cmd}) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError(f"QEMU closed the socket during {cmd}")
            r = json.loads(line)
            if "return" in r or "error" in r:
                assert "error" not in r, r
                return r["return"]

    def mtree(self) -> tuple[str, int]:
        """(info mtree -f, the CLOCK_MONOTONIC ns it was taken at: mid-call)."""
        t0 = time.monotonic_ns()
        text = self.execute("human-monitor-command", **{"command-line": "info mtree -f"})
        return text, (t0 + time.monotonic_ns()) // 2

    def hotadd(self, name: str) -> int:
        """A 64 MiB DIMM from a RAM backend with id ``name``: one new memslot.
        The CLOCK_MONOTONIC ns before QEMU was asked."""
        t = time.monotonic_ns()
        self.execute("object-add", **{"qom-type": "memory-backend-ram", "id": name,
                                      "size": 64 << 20})
        self.execute("device_add", driver="pc-dimm", id=f"{name}-dev", memdev=name)
        return t

    def quit(self):
        try:
            self.execute("quit")
        except (EOFError, OSError):
            pass
        self.s.close()


def memory_ranges(mtree: str) -> dict[tuple[int, int], tuple[str, str]]:
    """{(gpa, size): (region, kind)} of AS "memory"'s RAM / ROM ranges, trimmed
    to pages as KVM gets them; and QEMU's own " KVM" marks agree."""
    view = flat_view(mtree)
    mem = [r for r in view if memory_kind(r["kind"])]
    assert [r for r in view if r["kvm"]] == mem
    out = {}
    for r in mem:
        lo = -(-r["gpa"] // PAGE) * PAGE
        hi = (r["gpa"] + r["size"]) // PAGE * PAGE
        out[(lo, hi - lo)] = (r["name"], memory_kind(r["kind"]))
    return out


def alive_at(m, pid: int, t: int):
    s = m.slots
    return s[(s["pid"] == pid) & (s["size_bytes"] > 0) & (s["start_ts"].astype("uint64") <= t)
             & (s["end_ts"].astype("uint64") > t)]


def check_named(m, slots_json, pid, mtree, t) -> set[str]:
    """The slots of ``pid`` live at ``t`` are QEMU's RAM/ROM ranges in the
    view ``mtree`` taken then, each named after its region (model and
    report). The names."""
    want = memory_ranges(mtree)
    alive = alive_at(m, pid, t)
    got = {(int(r.gpa), int(r.size_bytes)): (r.qemu_region, r.qemu_kind)
           for r in alive.itertuples()}
    assert got == want, (got, want)
    rep = {(x["gpa"], x["size_bytes"], x["version"]): (x["qemu_region"], x["qemu_kind"])
           for x in slots_json if x["pid"] == pid}
    for r in alive.itertuples():
        assert rep[(int(r.gpa), int(r.size_bytes), int(r.version))] == want[
            (int(r.gpa), int(r.size_bytes))]
    return {name for name, _ in want.values()}


def names_are_qemus(m, dumps):
    """Every name given is QEMU's for that very range in an answer of the
    slot's QEMU asked and answered while the slot version was live."""
    named = m.slots[m.slots["qemu_region"].notna()]
    assert set(named["qemu_kind"]) <= set(MEM_KINDS)
    for s in named.itertuples():
        seen = dumps[(dumps["pid"] == s.pid) & (dumps["request_ts"] >= s.start_ts)
                     & (dumps["ts"] <= s.end_ts)]
        assert any(memory_ranges(x).get((int(s.gpa), int(s.size_bytes)))
                   == (s.qemu_region, s.qemu_kind) for x in seen["text"]), s
    return named


def report_slots(path):
    p = run("report", "--format", "json", path, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["slots"]


def qmp_notes(rec) -> list[dict]:
    n = rec.tables["notes"]
    return [json.loads(v) for v in n.loc[n["key"] == "qmp", "value"]]


def _read(path):
    try:
        return read(str(path))
    except (RecordingError, FileNotFoundError):
        return None


def wait_answer(path, after_ns: int, rec, timeout=120):
    """Until the recording holds an answer of QEMU's asked after ``after_ns``
    (a handshake with record's collector, not a sleep)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = _read(path)
        if r is not None and (r.tables["qmp_mtree"]["request_ts"] > after_ns).any():
            return r
        if rec.poll() is not None:
            raise AssertionError(f"record exited: {rec.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no answer of QEMU asked after {after_ns} in {timeout} s")


def _stop(*procs):
    for p in procs:
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_record_qmp_auto_names_slots(tmp_path):
    t_start = time.monotonic()
    sock, witness, out = tmp_path / "qmp.sock", tmp_path / "witness.sock", tmp_path / "q.kvt"
    cmd = qemu_cmd(sock, witness)
    rec = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "record", "--qmp", "auto",
                            "--probes", "memslots", "-o", str(out), "--", *cmd], cwd=ROOT,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        w = Qmp(witness)  # the socket exists once record launched QEMU
        t_qemu = time.monotonic()
        wait_answer(out, 0, rec)  # record's collector is talking to QEMU
        t_added = w.hotadd("kt-dimm-a")
        wait_answer(out, t_added, rec)
        mtree, t = w.mtree()
        t_seen = time.monotonic()
        w.quit()
        _, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err
    finally:
        _stop(rec)
    t_done = time.monotonic()
    r = read(str(out))
    pid = int(r.last_note("command")["pid"])
    notes = qmp_notes(r)
    assert {"socket": str(sock), "pid": pid, "status": "connected", "qemu": notes[0]["qemu"]} \
        in notes, notes
    # ("busy" would be QEMU slower to greet than GREETING_S: a loaded host, not a fault)
    assert [x["status"] for x in notes if x["status"] != "busy"] == ["connected", "closed"], notes
    dumps = r.tables["qmp_mtree"]
    assert len(dumps) >= 2 and set(dumps["pid"]) == {pid} and set(dumps["socket"]) == {str(sock)}
    assert (dumps["request_ts"] <= dumps["ts"]).all()
    m = kvmtrace.load(str(out))
    assert not m.notes, m.notes
    names = check_named(m, report_slots(out), pid, mtree, t)
    assert names >= {"kt-ram", "kt-dimm-a", "pc.bios", "pc.rom"}, names
    named = names_are_qemus(m, dumps)
    # the DIMM's slot was set while recording; its VMA does not name it, QEMU does
    dimm = m.slots[m.slots["qemu_region"] == "kt-dimm-a"]
    assert len(dimm) == 1 and dimm["created_by"].iloc[0] == "create"
    ram = m.slots[m.slots["qemu_region"] == "kt-ram"]
    assert ram["vma"].str.startswith("memfd:memory-backend-memfd").all(), ram["vma"]
    # the text report shows them
    text = io.StringIO()
    render.to_text(m, render.make_console(file=text, width=220))
    assert "QEMU region" in text.getvalue() and "kt-dimm-a (ram)" in text.getvalue()
    print(f"\nrecord start to QEMU's socket {t_qemu - t_start:.1f} s, to the witness's view "
          f"after the hot-add {t_seen - t_qemu:.1f} s, to the end {t_done - t_seen:.1f} s; "
          f"{len(dumps)} answers, {len(named)} of {len(m.slots)} slot versions named")
    keep = os.environ.get("KVMTRACE_QEMU_KEEP")
    if keep:
        shutil.copyfile(out, Path(keep) / "qemu-x86.kvt")
        (Path(keep) / "qemu-x86.witness.json").write_text(json.dumps(
            {"monotonic_ns": t, "mtree": mtree, "command": cmd, "pid": pid,
             "kernel": platform.release()}, indent=1) + "\n")


def test_record_pid_names_one_qemu_of_two(tmp_path):
    t_start = time.monotonic()
    a_rec, a_ctl, b_ctl = (tmp_path / n for n in ("a-rec.sock", "a-ctl.sock", "b-ctl.sock"))
    out = tmp_path / "a.kvt"
    qa = subprocess.Popen(qemu_cmd(a_rec, a_ctl), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qb = subprocess.Popen(qemu_cmd(b_ctl), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rec = None
    try:
        a, b = Qmp(a_ctl), Qmp(b_ctl)
        before, t_before = a.mtree()  # A's memslots, all set before recording
        rec = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "record", "--pid",
                                str(qa.pid), "--qmp", str(a_rec), "--probes", "memslots",
                                "-o", str(out)], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_answer(out, 0, rec)  # attached: the memslot snapshot and QEMU's first answer
        t_attached = time.monotonic()
        b.hotadd("kt-dimm-b")  # B's memslots change too, unrecorded
        t_added = a.hotadd("kt-dimm-a")
        wait_answer(out, t_added, rec)
        mtree, t = a.mtree()
        a.quit()  # record --pid stops when A exits
        _, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err
        t_done = time.monotonic()
        b.quit()
    finally:
        _stop(rec, qa, qb)
    r = read(str(out))
    m = kvmtrace.load(str(out))
    slots_json = report_slots(out)
    # B nowhere: no row of any table, no answer of QEMU, no VM, not its socket
    for name, df in r.tables.items():
        if "pid" in df and len(df):
            assert qb.pid not in set(df["pid"].astype("int64")), name
    assert set(m.slots["pid"]) == {qa.pid} and {x["pid"] for x in slots_json} == {qa.pid}
    assert set(m.ops["pid"]) == {qa.pid}
    assert len(m.slots.groupby(["pid", "vm_fd"])) == 1
    assert [(n["pid"], n["status"]) for n in qmp_notes(r)] == [(qa.pid, "connected"),
                                                              (qa.pid, "closed")]  # greeted at once
    assert str(b_ctl) not in json.dumps(r.meta) + "".join(r.tables["notes"]["value"])
    assert not (r.tables["qmp_mtree"]["text"].str.contains("kt-dimm-b")).any()
    assert not m.notes, m.notes
    # A's slots set before recording (from the memslot iterator), named as QEMU named them
    first = m.slots[m.slots["created_by"] == "before recording"]
    assert len(first) == len(memory_ranges(before)) and first["qemu_region"].notna().all()
    check_named(m, slots_json, qa.pid, before, max(t_before, int(first["snapshot_ts"].max())))
    # the hot-add was recorded and its slot is named
    names = check_named(m, slots_json, qa.pid, mtree, t)
    assert names >= {"kt-ram", "kt-dimm-a", "pc.bios", "pc.rom"}, names
    assert "kt-dimm-b" not in names
    names_are_qemus(m, r.tables["qmp_mtree"])
    print(f"\nboth QEMUs up and record attached {t_attached - t_start:.1f} s, hot-add to "
          f"the end {t_done - t_attached:.1f} s; {len(m.ops)} memslot ioctls of A, "
          f"{len(r.tables['qmp_mtree'])} answers")


def test_record_qmp_busy_or_missing_socket_is_a_note(tmp_path):
    """QEMU serves one client per QMP socket: one the test holds, and one that
    does not exist, give notes (record and report), never a failed recording."""
    held, missing, out = tmp_path / "held.sock", tmp_path / "missing.sock", tmp_path / "b.kvt"
    q = subprocess.Popen(qemu_cmd(held), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        c = Qmp(held)
        p = run("record", "--pid", q.pid, "--qmp", held, "--qmp", missing, "--probes",
                "memslots", "--duration", "2", "-o", out, timeout=300)
        assert p.returncode == 0, p.stderr
        c.quit()
    finally:
        _stop(q)
    r = read(str(out))
    notes = {(n["socket"], n["status"]): n for n in qmp_notes(r)}
    # "busy" too when record ran past GREETING_S (a loaded host)
    assert set(notes) - {(str(held), "busy")} == {(str(held), "unavailable"),
                                                  (str(missing), "unavailable")}, notes
    assert "another client may hold" in notes[(str(held), "unavailable")]["reason"]
    assert notes[(str(held), "unavailable")]["pid"] == q.pid  # who listens, known anyway
    assert "No such file" in notes[(str(missing), "unavailable")]["reason"]
    assert not len(r.tables["qmp_mtree"])
    m = kvmtrace.load(str(out))
    assert len(m.slots) and m.slots["qemu_region"].isna().all()  # no answer: no names
    said = [n for n in m.notes if n.startswith("QMP socket")]
    assert len(said) == 2 and all("not named" in n for n in said), m.notes
