"""Shared test helpers.

Live tests need root, bcc, tracefs and /dev/kvm. They are skipped only when
one of those is truly absent; with KVMTRACE_REQUIRE_LIVE=1 (set by .ci/run)
a missing capability fails the test instead, so CI cannot pass by skipping.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
REQUIRE_LIVE = os.environ.get("KVMTRACE_REQUIRE_LIVE") == "1"


def _missing_live() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc not importable"
    return None


def pytest_collection_finish(session):
    """Start the emulated hosts' end to ends beside the suite (testbeds_beside)."""
    import testbeds_beside
    testbeds_beside.start(session.items, lambda: _missing_live() is None)


def pytest_terminal_summary(terminalreporter):
    import testbeds_beside
    for line in testbeds_beside.summary():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session):
    import testbeds_beside
    testbeds_beside.stop()


def skip_or_fail(why: str | None, required: bool = True, what: str = "live test"):
    """Skip a test whose capability is missing (``why``); fail instead under
    KVMTRACE_REQUIRE_LIVE=1 where the capability must be there (``required``:
    e.g. only on the architecture it is for)."""
    if why:
        if REQUIRE_LIVE and required:
            pytest.fail(f"{what} cannot run ({why}) and KVMTRACE_REQUIRE_LIVE=1")
        pytest.skip(why)


@pytest.fixture
def live():
    skip_or_fail(_missing_live())


def kvmtrace(*args, timeout=120, **kw):
    """Run the kvmtrace CLI as a user would; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "kvmtrace.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kw)


def guest_cmd(*args):
    return [sys.executable, "-m", "testvmm", *map(str, args)]


def load_json(path):
    return json.loads(Path(path).read_text())


def one_line_error(proc):
    """A user error: non-zero exit, exactly one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


class SpteCounter:
    """bpftrace counting kvm_mmu_set_spte by (pid, gfn) and (pid, level)."""

    PROGRAM = r"""
    BEGIN { printf("ready\n"); }
    tracepoint:kvmmmu:kvm_mmu_set_spte /strncmp(comm, "kvmtrace-vcpu", 13) == 0/ {
        @spte[pid, args->gfn] = count();
        @level[pid, args->level] = count();
    }
    """

    def __init__(self):
        self.proc = subprocess.Popen(["bpftrace", "-e", self.PROGRAM], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300  # (attaching: as slow as stopping, loaded)
        self.head = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.head.append(line)
            if line.strip() == "ready":
                return
        self.proc.kill()
        raise RuntimeError("bpftrace did not start: " + "".join(self.head))

    def stop(self):
        """{pid: {gfn: count}}, {pid: {level: count}}"""
        self.proc.send_signal(signal.SIGINT)
        # (detaching and printing its maps took over 20 s with the CI's
        # testbeds and a second suite on the two cores, load 8: the verdict
        # must not depend on that)
        out, _ = self.proc.communicate(timeout=300)
        sptes, levels = {}, {}
        for line in out.splitlines():
            for name, table in (("@spte[", sptes), ("@level[", levels)):
                if line.startswith(name):
                    key, value = line[len(name):].split("]:")
                    pid, k = (int(x) for x in key.split(","))
                    table.setdefault(pid, {})[k] = int(value)
        return sptes, levels


def window_attached(pid: int, q, seconds: float = 900) -> None:
    """Wait until ``kvmtrace query --window``'s recording of ``pid`` has attached
    every probe: its ``record --pid`` creates its output file only then. (A BPF
    program fd appears earlier: the memslot iterator, loaded before the probes
    compile; waiting for that one let the guest run before the window's probes
    were attached, and the window saw nothing installed.) ``q``: the query."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if q.poll() is not None:
            raise AssertionError(f"kvmtrace query exited: {q.stderr.read()[-2000:]}")
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().decode().split("\0")
                if "record" not in argv or "--pid" not in argv \
                        or argv[argv.index("--pid") + 1] != str(pid):
                    continue
                out = argv[argv.index("-o") + 1]
            except (OSError, UnicodeDecodeError, IndexError, ValueError):
                continue
            if os.path.exists(out):
                return
        time.sleep(0.2)
    raise AssertionError(f"query's recording window for {pid} did not attach in {seconds} s")
