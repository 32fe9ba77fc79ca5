"""The emulated KVM hosts' end to ends run beside the rest of the suite.

testbed/arm64/e2e and testbed/x86/e2e boot TCG virtual machines and take most
of the suite's time (2026-12-02, busy host: arm64 1,039 s, x86 124 s of a
2,471 s run) while the x86 suite itself leaves most of the second core idle.
When tests/test_testbeds.py is among the collected tests, conftest starts
each selected end to end here as soon as collection ends, and the test waits
for its result instead of running it then. Nothing about the checks changes:
the same scripts, the same verdicts; only when they run.

A run started here that is still going when the session ends (pytest -x,
Ctrl-C) is killed with its process group.
"""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_testbeds.py::test_end_to_end_on_both_kernels"
TIMEOUT = 3 * 3600


def kernels(arch: str) -> str:
    """The kernels an arch's end to end boots (KVMTRACE_X86_KERNELS for x86)."""
    return (os.environ.get("KVMTRACE_X86_KERNELS") if arch == "x86" else None) or "6.1 7.x"


class Run:
    """One e2e script in its own process group, waited for by a thread."""

    def __init__(self, arch: str):
        self.arch, self.result, self.seconds = arch, None, None
        self.proc = subprocess.Popen(
            [str(ROOT / f"testbed/{arch}/e2e")], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=dict(os.environ, KERNELS=kernels(arch)))
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self):
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            err += f"\n{self.arch} end to end killed after {TIMEOUT} s"
        self.seconds = time.monotonic() - self._t0
        self.result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def wait(self) -> subprocess.CompletedProcess:
        self._thread.join()
        return self.result

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)


RUNS: dict[str, Run] = {}


def start(items, can_run) -> None:
    """Start the end to end of every arch whose test was collected, unless
    KVMTRACE_<ARCH>=0 or the live capability is missing (the test then says
    why, through its `live` fixture)."""
    if not can_run():
        return
    for item in items:
        if item.nodeid.startswith(TEST) and hasattr(item, "callspec"):
            arch, env = item.callspec.params["arch"], item.callspec.params["env"]
            if os.environ.get(env) != "0" and arch not in RUNS:
                RUNS[arch] = Run(arch)


def summary() -> list[str]:
    return [f"{r.arch} end to end (beside the suite): "
            + (f"exit {r.result.returncode} in {r.seconds:.0f} s" if r.result else "not finished")
            for r in RUNS.values()]


def stop() -> None:
    for r in RUNS.values():
        r.kill()
