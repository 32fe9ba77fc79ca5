"""The command `record -- CMD` launches, held before exec until traced.

A plain fork/exec: subprocess.Popen waits for the exec to happen, which would
deadlock with a child that waits for the tracer to put its pid in the filter.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


class Child:
    """The launched command: poll / wait / terminate, as subprocess.Popen offers."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None):
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end:
                return None
            time.sleep(0.01)
        return self.returncode

    def terminate(self):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def kill(self):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def spawn(cmd: list[str], before_exec) -> Child:
    """Fork, call ``before_exec(pid)`` in the parent, then let the child exec."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(w)
            os.read(r, 1)
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.execvp(cmd[0], cmd)
        except OSError as e:
            os.write(2, f"kvmtrace: cannot run {cmd[0]}: {e.strerror}\n".encode())
        os._exit(127)
    os.close(r)
    try:
        before_exec(pid)
    finally:
        os.write(w, b"g")
        os.close(w)
    return Child(pid)
