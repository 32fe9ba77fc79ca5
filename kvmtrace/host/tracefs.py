"""tracefs: where tracepoint formats live. bcc reads them to build ``args``.

On a freshly booted machine tracefs may not be mounted at all (seen on the
development host), and bcc then fails with an obscure error; kvmtrace mounts it
or says exactly what to do.
"""

from __future__ import annotations

import os
import subprocess

CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


class TracefsError(RuntimeError):
    pass


def find() -> str | None:
    for root in CANDIDATES:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    return None


def ensure_mounted() -> str:
    """Return the tracefs root, mounting it at /sys/kernel/tracing if needed."""
    root = find()
    if root:
        return root
    target = CANDIDATES[0]
    try:
        r = subprocess.run(["mount", "-t", "tracefs", "tracefs", target],
                           capture_output=True, text=True, timeout=30)
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    except (OSError, subprocess.SubprocessError) as e:  # no mount(8), a hung mount
        why = getattr(e, "strerror", None) or str(e)
    root = find()
    if root:
        return root
    raise TracefsError(
        f"tracefs is not mounted and mounting it failed ({why}); "
        f"run: mount -t tracefs tracefs {target}")


def tracepoint_exists(tracepoint: str, root: str | None = None) -> bool:
    root = root or find()
    if not root:
        return False
    category, name = tracepoint.split(":")
    return os.path.isfile(os.path.join(root, "events", category, name, "format"))


def category_events(category: str, root: str | None = None) -> list[str]:
    root = root or find()
    path = os.path.join(root or "", "events", category)
    if not root or not os.path.isdir(path):
        return []
    return sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))


def tracepoint_fields(tracepoint: str, root: str | None = None) -> set[str]:
    """Field names in a tracepoint's format file (they change between kernels:
    sched_process_exit has group_dead on newer kernels, not on 6.1)."""
    root = root or find()
    category, name = tracepoint.split(":")
    try:
        with open(os.path.join(root or "", "events", category, name, "format")) as f:
            text = f.read()
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            decl = line[len("field:"):].split(";", 1)[0]
            out.add(decl.split("[", 1)[0].split()[-1])
    return out
