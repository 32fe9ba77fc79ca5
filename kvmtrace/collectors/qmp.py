"""QEMU's own view of guest memory while recording (record --qmp SOCKET).

The names QEMU gives guest memory (pc.ram, pc.bios, kt-ram, virt.flash0)
are not in anything the kernel sees: a memfd backend is named after its
type, ROMs are anonymous memory. They can only come from QEMU. For each
QMP socket given, a thread connects, and QEMU is asked
``human-monitor-command "info mtree -f"`` (its flat views: every guest
range, the memory region behind it, and whether KVM has a memslot there):

- once connected (the memslots a running QEMU set before recording);
- after each burst of memslot changes of that QEMU: DEBOUNCE_S after its
  last memslot ioctl, and no later than MAX_DELAY_S after the first one not
  yet answered (a QEMU whose memslots keep changing is still asked);
- once more when recording stops, if QEMU is still there (before record
  stops a launched command).

Why after changes and not periodically: a flat view can only differ from
the last one after QEMU changed its memory map, and every change of the map
that touches a memslot is an ioctl record already sees; an idle VM is never
asked, and a slot version gets a view taken while it was live. A version
that lives shorter than DEBOUNCE_S (QEMU's machine setup replaces slots
within milliseconds) gets no view, so no name: never a guessed one.

Each answer becomes a row of the recording's ``qmp_mtree`` table (when the
command was sent and when the answer was read, CLOCK_MONOTONIC, and the QEMU
process: SO_PEERCRED of the socket, QEMU's pid when it listened); what
happened to each socket is a ``qmp`` note. The recording never fails because
of QMP: QEMU serves one client per monitor, so a socket another client holds
accepts the connection and says nothing (noted after GREETING_S; the thread
keeps waiting, in case the other client leaves), a full backlog refuses it
(retried), a QEMU that is gone or a socket that is not QMP is noted and left.

The recording loop never waits for QEMU: the threads only talk to QEMU, and
the loop moves their answers into the recording (``take``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
import time

COMMAND = "info mtree -f"
DEBOUNCE_S = 0.2   # quiet time after a memslot change of the QEMU before asking
MAX_DELAY_S = 1.0  # the longest an unanswered change waits while changes keep coming
GREETING_S = 5.0   # no greeting this long after connecting: noted (another client?)
REPLY_S = 10.0     # an answer this late: the socket is given up (noted)
RETRY_S = 0.1      # between connection attempts while the socket is not there yet
FINAL_S = 3.0      # at the end: how long record waits for QEMU's last answer
MAX_LINE = 16 << 20  # a QMP message longer than this is not QEMU's


class QmpError(ValueError):
    """A --qmp value that cannot be used (one line, a usage error)."""


# -- --qmp auto: the sockets named in QEMU's command line ---------------------

def _opts(text: str) -> tuple[str, dict]:
    """QEMU's ``kind:value,key=val,flag`` option text: (first item, {key: val}).
    (QEMU escapes a comma in a value as ',,': handled.)"""
    items, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "," and text[i + 1:i + 2] == ",":
            cur += ","
            i += 2
            continue
        if text[i] == ",":
            items.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    items.append(cur)
    keys = {}
    for it in items[1:]:
        k, _, v = it.partition("=")
        keys[k] = v
    return items[0], keys


def sockets_from_argv(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The QMP unix sockets a QEMU command line serves: ``-qmp unix:PATH[,...]``
    (also -qmp-pretty, --qmp) and ``-chardev socket,id=ID,path=PATH,server=on``
    with ``-mon chardev=ID,mode=control``. Relative paths are QEMU's: relative
    to the directory it starts in (record's). Empty: none found."""
    pairs, out = [], []
    args = list(argv)
    for i, a in enumerate(args[:-1]):
        opt = a[1:] if a.startswith("--") else a
        if opt.startswith("-") and "=" not in opt:
            pairs.append((opt, args[i + 1]))
    chardevs = {}
    for opt, val in pairs:
        if opt in ("-qmp", "-qmp-pretty") and val.startswith("unix:"):
            path, _ = _opts(val[len("unix:"):])
            out.append(path)
        elif opt == "-chardev":
            kind, keys = _opts(val)
            if kind == "socket" and keys.get("path") and keys.get("id"):
                chardevs[keys["id"]] = keys["path"]
    for opt, val in pairs:
        if opt == "-mon":
            first, keys = _opts(val)
            if first.startswith("chardev="):
                keys["chardev"] = first[len("chardev="):]
            if keys.get("mode") == "control" and keys.get("chardev") in chardevs:
                out.append(chardevs[keys["chardev"]])
    return [os.path.abspath(p) for p in dict.fromkeys(out)]


def resolve(values: tuple[str, ...], command: tuple[str, ...]) -> list[str]:
    """The sockets of record's --qmp values, absolute. "auto": the first QMP
    socket of COMMAND (sockets_from_argv) and only that one, since QEMU serves
    one client per socket: its others stay free for the user's own tools.
    Raises QmpError (a usage error) for what cannot work."""
    out = []
    for v in values:
        if v == "auto":
            if not command:
                raise QmpError("--qmp auto takes the socket from COMMAND's -qmp unix:PATH, "
                               "and there is no COMMAND (after --)")
            found = sockets_from_argv(command)
            if not found:
                raise QmpError("--qmp auto: COMMAND has no QMP unix socket (-qmp unix:PATH,"
                               "server=on,wait=off, or -chardev socket,path=PATH with -mon "
                               "mode=control); give --qmp PATH")
            out.append(found[0])
        elif not v:
            raise QmpError("--qmp: an empty path")
        else:
            out.append(os.path.abspath(v))
    return list(dict.fromkeys(out))


# -- one QMP conversation --------------------------------------------------------

class _Gone(Exception):
    """The conversation cannot go on (why, in words); ``closed``: QEMU closed
    it (it quit or was stopped: the usual end, not a problem)."""

    def __init__(self, why: str, closed: bool = False):
        super().__init__(why)
        self.closed = closed


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def send(self, obj: dict):
        try:
            self.sock.sendall(json.dumps(obj).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            raise _Gone("QEMU closed the connection", closed=True) from None
        except OSError as e:
            raise _Gone(f"connection lost ({e.strerror or e})") from None

    def message(self, deadline: float, stopping) -> dict | None:
        """The next JSON message; None when ``deadline`` passed or ``stopping()``."""
        while b"\n" not in self.buf:
            now = time.monotonic()
            if now >= deadline or stopping():
                return None
            self.sock.settimeout(min(0.1, deadline - now))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                raise _Gone("QEMU closed the connection", closed=True) from None
            except OSError as e:
                raise _Gone(f"connection lost ({e.strerror or e})") from None
            if not data:
                raise _Gone("QEMU closed the connection", closed=True)
            self.buf += data
            if len(self.buf) > MAX_LINE:
                raise _Gone("not a QMP socket (a message longer than 16 MiB)")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise _Gone("not a QMP socket (a message that is not JSON)") from None
        if not isinstance(msg, dict):
            raise _Gone("not a QMP socket (a message that is not a JSON object)")
        return msg

    def execute(self, cmd: dict, stopping) -> dict:
        """The answer to ``cmd`` (events QEMU sends meanwhile are skipped)."""
        self.send(cmd)
        deadline = time.monotonic() + REPLY_S
        while True:
            msg = self.message(deadline, stopping)
            if msg is None:
                raise _Gone("stopped" if stopping() else f"QEMU did not answer "
                            f"{cmd['execute']} within {REPLY_S:g} s")
            if "return" in msg or "error" in msg:
                if "error" in msg:
                    e = msg["error"]
                    raise _Gone(f"QEMU refused {cmd['execute']}: "
                                f"{e.get('desc', e) if isinstance(e, dict) else e}")
                return msg


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process that listens on a connected unix socket (0: unknown)."""
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
        return max(pid, 0)
    except OSError:
        return 0


class Monitor(threading.Thread):
    """One QMP socket: connect, then answer ``want`` (a dump is due) until stopped."""

    def __init__(self, path: str, out: "Collector"):
        super().__init__(name=f"kvmtrace-qmp {path}", daemon=True)
        self.path, self.out = path, out
        self.pid = 0            # QEMU's, once connected
        self.connected = False  # greeted and capabilities negotiated
        self.first_change = None  # monotonic s of the first change not yet asked about
        self.last_change = None
        self.final = False        # a last dump is asked for (record is stopping)
        self.stop = False
        self.dumps = 0
        self.last_error = "the socket was never there"
        self._sock: socket.socket | None = None

    # called by the recording loop (under out.cond)
    def changed(self, now: float):
        if self.first_change is None:
            self.first_change = now
        self.last_change = now

    def _stopping(self) -> bool:
        return self.stop

    def _note(self, status: str, **kw):
        self.out.add_note({"socket": self.path, "pid": self.pid or None, "status": status, **kw})

    def run(self):
        try:
            conn = self._connect()
            if conn is None:
                return
            self._serve(conn)
        except _Gone as e:
            if not self.connected:
                self.last_error = str(e)  # said by Collector.finish
            elif not self.stop and not e.closed:
                self._note("lost", reason=str(e), dumps=self.dumps)
        except Exception as e:  # noqa: BLE001 - never the recording's failure
            self._note("lost", reason=f"{type(e).__name__}: {e}", dumps=self.dumps)
        finally:
            if self._sock is not None:
                self._sock.close()  # the monitor is free for QEMU's next client
            with self.out.cond:
                self.stop = True
                self.out.cond.notify_all()

    def _connect(self) -> _Conn | None:
        """Connected and greeted, or None once stopped (noted)."""
        noted_busy = False
        while not self.stop:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.settimeout(1.0)
            try:
                s.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()  # not there yet (QEMU starting), or a stale socket
                self.last_error = e.strerror or str(e)
                time.sleep(RETRY_S)
                continue
            except (BlockingIOError, TimeoutError):
                s.close()
                self.last_error = "busy: its backlog is full (another client holds the monitor)"
                if not noted_busy:
                    self._note("busy", reason=self.last_error)
                    noted_busy = True
                time.sleep(RETRY_S * 5)
                continue
            except OSError as e:
                s.close()  # noted by Collector.finish
                self.last_error = f"cannot connect: {e.strerror or e}"
                return None
            self._sock = s
            self.pid = peer_pid(s)
            self.last_error = ("connected, but no QMP greeting: QEMU serves one client per "
                               "monitor and another client may hold this one, or QEMU is "
                               "still starting")
            conn = _Conn(s)
            greeted_by = time.monotonic() + GREETING_S
            msg = conn.message(greeted_by, self._stopping)
            if msg is None and not self.stop:
                self._note("busy", reason=f"{self.last_error} (nothing within {GREETING_S:g} s; "
                           "still waiting)")
                noted_busy = True
                msg = conn.message(float("inf"), self._stopping)  # it may leave
            if msg is None:
                s.close()
                return None
            if "QMP" not in msg:
                s.close()
                raise _Gone("not a QMP socket (no QMP greeting)")
            conn.execute({"execute": "qmp_capabilities"}, self._stopping)
            v = ((msg.get("QMP") or {}).get("version") or {}).get("qemu") or {}
            self.connected = True
            self._note("connected", qemu=".".join(str(v.get(k, "?")) for k in
                                                  ("major", "minor", "micro")))
            return conn
        return None

    def _due(self, now: float) -> float | None:
        """Seconds until a dump is due (0: now), None: none wanted."""
        if self.final:
            return 0.0
        if self.first_change is None:
            return None
        return max(0.0, min(self.last_change + DEBOUNCE_S, self.first_change + MAX_DELAY_S)
                   - now)

    def _serve(self, conn: _Conn):
        self._dump(conn)  # what QEMU has now: slots set before recording, or at its start
        cond = self.out.cond
        while True:
            with cond:
                while not self.stop:
                    due = self._due(time.monotonic())
                    if due == 0.0:
                        break
                    cond.wait(0.5 if due is None else due)
                if self.stop:
                    return
                final = self.final
                self.first_change = self.last_change = None
            self._dump(conn)
            if final:
                with cond:
                    self.final = False
                    self.out.finals_done += 1
                    cond.notify_all()
                return

    def _dump(self, conn: _Conn):
        t0 = time.monotonic_ns()
        msg = conn.execute({"execute": "human-monitor-command",
                            "arguments": {"command-line": COMMAND}}, self._stopping)
        t1 = time.monotonic_ns()
        text = msg.get("return")
        if not isinstance(text, str):
            raise _Gone(f"QEMU's answer to {COMMAND!r} is not text")
        self.dumps += 1
        self.out.add_row({"ts": t1, "request_ts": t0, "pid": self.pid, "socket": self.path,
                          "command": COMMAND, "text": text})


class Collector:
    """Every --qmp socket of one recording. The recording loop calls
    ``changed`` with the pids whose memslots changed and ``take`` to move
    the answers into the recording; ``finish`` asks for the last answers."""

    def __init__(self, paths: list[str]):
        self.cond = threading.Condition()
        self.rows: list[dict] = []
        self.notes: list[tuple[int, dict]] = []
        self.finals_done = 0
        self.monitors = [Monitor(p, self) for p in paths]

    def start(self):
        for m in self.monitors:
            m.start()

    def add_row(self, row: dict):
        with self.cond:
            self.rows.append(row)

    def add_note(self, value: dict):
        with self.cond:
            self.notes.append((time.monotonic_ns(), value))

    def changed(self, pids):
        """Memslots of ``pids`` changed just now (a QEMU not yet connected is
        asked once connected anyway)."""
        if not pids:
            return
        now = time.monotonic()
        with self.cond:
            for m in self.monitors:
                if m.connected and m.pid in pids:
                    m.changed(now)
            self.cond.notify_all()

    def take(self) -> tuple[list[dict], list[tuple[int, dict]]]:
        """The answers and notes since the last call."""
        with self.cond:
            rows, notes = self.rows, self.notes
            self.rows, self.notes = [], []
        return rows, notes

    def finish(self, timeout: float = FINAL_S):
        """A last answer from every connected QEMU (at most ``timeout`` s),
        then every thread stopped; each socket's end is noted."""
        end = time.monotonic() + timeout
        with self.cond:
            asked = [m for m in self.monitors if m.connected and not m.stop]
            for m in asked:
                m.final = True
            self.cond.notify_all()
            while self.finals_done < len(asked) and time.monotonic() < end \
                    and any(not m.stop for m in asked):
                self.cond.wait(0.05)
            for m in self.monitors:
                m.stop = True
            self.cond.notify_all()
        for m in self.monitors:
            m.join(max(0.0, end - time.monotonic()) + 1.0)
        for m in self.monitors:
            if not m.connected:
                self.add_note({"socket": m.path, "pid": m.pid or None, "status": "unavailable",
                               "reason": f"never connected: {m.last_error}", "dumps": 0})
            else:
                self.add_note({"socket": m.path, "pid": m.pid or None, "status": "closed",
                               "dumps": m.dumps})
