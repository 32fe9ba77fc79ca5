"""The command `record -- CMD` launches, held before exec until traced.

A plain fork/exec: subprocess.Popen waits for the exec to happen, which would
deadlock with a child that waits for the tracer to put its pid in the filter.

The child never outlives record unless asked to (``leave_running``):

- between fork and exec it sets PR_SET_PDEATHSIG(SIGKILL), then checks that
  record is still its parent (record may have died before the prctl). If
  record dies in any way, SIGKILL included, the kernel kills the command.
  SIGKILL rather than SIGTERM: a command that ignores or handles SIGTERM
  slowly must not survive; record's own stops (SIGINT, SIGTERM, SIGHUP,
  SIGQUIT, --duration) send SIGTERM first and wait a grace period. Limits:
  the signal fires when the *thread* that forked exits (record forks from
  its main thread, which lives as long as the process), it is cleared when
  the command execs a set-uid / set-gid / file-capability binary that changes
  its credentials (``sudo -u``), and it reaches the command only: what a
  wrapper script started is stopped with it on record's own stops (its
  process group, below) but outlives a SIGKILL of record.
- it waits for record's "go" byte and exits without running anything when
  record went away first (EOF instead of the byte);
- exec errors come back through a close-on-exec pipe, so ``spawn`` raises
  SpawnError (one line) instead of leaving a child that printed something;
- process group: when record runs in the foreground of a terminal the
  command stays in record's group, as it would without kvmtrace: Ctrl-C and
  a terminal hangup reach it directly, and it can use the terminal (qemu
  -nographic). Anywhere else (scripts, CI, services, background jobs) it gets
  its own process group and stops signal the whole group, so a wrapper
  script's children are stopped with it.
- signals: the command starts with the dispositions record started with
  (SIGHUP ignored under nohup stays ignored), SIGPIPE and SIGXFSZ at their
  defaults (Python ignores them) and nothing blocked.
- ``leave_running``: no PDEATHSIG, its own session (setsid): neither the
  terminal's Ctrl-C / hangup nor record's stop reach it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import time

PR_SET_PDEATHSIG = 1
PDEATHSIG = signal.SIGKILL
# the signals record handles itself; the child gets back the dispositions
# record started with
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

_libc = None


def _prctl():
    global _libc
    if _libc is None:  # loaded in the parent: no dlopen between fork and exec
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl


class SpawnError(Exception):
    """The command cannot be run (one line)."""


def _interpreter(path: str) -> str | None:
    """The interpreter of a ``#!`` script, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip()
    return os.fsdecode(line.split()[0]) if line else None


def _check_file(path: str) -> str | None:
    """Why ``path`` cannot be exec'd, as execve would say it, or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "No such file or directory"
    except OSError as e:
        return e.strerror
    if os.path.isdir(path):
        return "Is a directory"
    if not os.path.isfile(path):
        return "not a regular file"
    if not os.access(path, os.X_OK) or not st.st_mode & 0o111:
        return "Permission denied (not executable, or on a noexec mount)"
    interp = _interpreter(path)
    if interp is not None:
        why = _check_file(interp) if os.path.isabs(interp) else "not an absolute path"
        if why:
            return f"bad interpreter {interp}: {why}"
    return None


def check_runnable(cmd: list[str]) -> str:
    """The file ``cmd[0]`` resolves to (execvp's PATH search), or SpawnError.

    Catches what can be known without running it: not found, a directory, not
    executable, a script whose interpreter is missing. Anything else (an ELF
    for another architecture, a missing dynamic loader) is caught at exec."""
    name = cmd[0]
    if not name:
        raise SpawnError("cannot run '': empty command name")
    if "/" in name:
        why = _check_file(name)
        if why == "No such file or directory":
            why = f"command not found ({why})"
        if why:
            raise SpawnError(f"cannot run {name}: {why}")
        return name
    first_problem = None
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        if not os.path.exists(path):
            continue
        why = _check_file(path)
        if why is None:
            return path
        first_problem = first_problem or f"cannot run {name} ({path}): {why}"
    raise SpawnError(first_problem or f"cannot run {name}: command not found")


def in_terminal_foreground() -> bool:
    """record is the foreground process group of the terminal on fd 0, 1 or 2."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
    return False


def exit_status(code: int | None) -> int | None:
    """A returncode as a shell reports it: N, or 128+N for death by signal N."""
    if code is None:
        return None
    return code if code >= 0 else 128 - code


def _running_in_group(pid: int, pgid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")


class Child:
    """The launched command: poll / wait / terminate, as subprocess.Popen offers."""

    def __init__(self, pid: int, own_group: bool = False, leave_running: bool = False):
        self.pid = pid
        self.own_group = own_group
        self.leave_running = leave_running
        self.returncode: int | None = None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it is gone, status unknown
                self.returncode = -255
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None, until=None):
        """The returncode, or None after ``timeout`` s or once ``until()`` is true."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() >= end or until is not None and until():
                return None
            time.sleep(0.01)
        return self.returncode

    def signal(self, sig: int):
        """To the command (and its process group when it has its own)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(self.pid, sig)
            elif self.returncode is None:
                os.kill(self.pid, sig)

    def terminate(self):
        self.signal(signal.SIGTERM)

    def kill(self):
        self.signal(signal.SIGKILL)

    def group_alive(self) -> bool:
        """Some process of its own group still runs (always False without one)."""
        if not self.own_group:
            return False
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return any(_running_in_group(int(d), self.pid) for d in os.listdir("/proc")
                   if d.isdigit())  # zombies waiting for their reaper do not count

    def stop(self, grace: float, hurry=None) -> str:
        """SIGTERM, then SIGKILL after ``grace`` s (or at once when ``hurry()``
        turns true); the same for what is left of its process group. Returns
        how it ended, for the recording."""
        if self.leave_running:
            return "left running" if self.poll() is None else "exited"
        how = "exited"
        end = time.monotonic() + grace
        if self.poll() is None:
            self.terminate()
            how = "SIGTERM"
            left = max(end - time.monotonic(), 0)
            if self.wait(left, until=hurry) is None:
                self.kill()
                self.wait()
                how = f"SIGKILL (still running {grace:g} s after SIGTERM)" \
                    if not (hurry and hurry()) else "SIGKILL (second stop signal)"
        elif self.group_alive():  # it exited; what it started in its group is left
            self.terminate()
        while self.group_alive() and time.monotonic() < end and not (hurry and hurry()):
            time.sleep(0.01)
        if self.group_alive():
            self.kill()
            how += "; SIGKILL to what was left of its process group"
        return how


def spawn(cmd: list[str], before_exec, own_group: bool = False, leave_running: bool = False,
          dispositions: dict | None = None) -> Child:
    """Fork, call ``before_exec(pid)`` in the parent, then let the child exec.

    Raises SpawnError when the exec fails (the child is reaped), and re-raises
    what ``before_exec`` raised after making sure the child never runs."""
    prctl = _prctl()
    dispositions = dispositions or {}
    parent = os.getpid()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()  # close-on-exec: EOF means the exec happened
    pid = os.fork()
    if pid == 0:  # child: no exceptions may escape from here
        try:
            for s in STOP_SIGNALS:
                d = dispositions.get(s, signal.SIG_DFL)
                signal.signal(s, d if d in (signal.SIG_IGN, signal.SIG_DFL) else signal.SIG_DFL)
            for s in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(s, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.close(go_w)
            os.close(err_r)
            if leave_running:
                os.setsid()
            else:
                if own_group:
                    os.setpgid(0, 0)
                prctl(PR_SET_PDEATHSIG, int(PDEATHSIG), 0, 0, 0)
                if os.getppid() != parent:  # record died before the prctl
                    os._exit(127)
            if os.read(go_r, 1) != b"g":  # record gave up (or died): run nothing
                os._exit(127)
            os.close(go_r)
            os.execvp(cmd[0], cmd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.write(err_w, f"{e.errno}".encode())
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            pass
        os._exit(127)
    os.close(go_r)
    os.close(err_w)
    if own_group and not leave_running:
        with contextlib.suppress(OSError):  # both sides set it: no race with killpg
            os.setpgid(pid, pid)
    proc = Child(pid, own_group=own_group and not leave_running, leave_running=leave_running)
    try:
        before_exec(pid)
    except BaseException:
        os.close(go_w)  # EOF: the child exits without exec
        os.close(err_r)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    os.write(go_w, b"g")
    os.close(go_w)
    with os.fdopen(err_r, "rb") as f:
        data = f.read()
    if data:
        proc.wait()
        try:
            err = int(data)
            why = os.strerror(err)
        except ValueError:
            err, why = 0, "failed"
        hint = " (an executable for another architecture, or a script without #!)" \
            if err == errno.ENOEXEC else ""
        raise SpawnError(f"cannot run {cmd[0]}: {why}{hint}")
    return proc
