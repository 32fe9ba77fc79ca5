"""Can this kernel run kprobes, and is a function really there to probe?

A function missing from /proc/kallsyms is inlined (e.g. arm64's
user_mem_abort up to 7.0 in Debian's builds) or absent; a kprobe on it can't
attach. Checked before a program is built, so record says which probe is
missing and why instead of failing at attach time.
"""

from __future__ import annotations

import os
from functools import lru_cache

from . import tracefs


def available() -> bool:
    return (os.path.exists("/sys/bus/event_source/devices/kprobe/type")
            or os.path.exists(os.path.join(tracefs.find() or "/nonexistent", "kprobe_events")))


UNAVAILABLE = "the kernel has no kprobes (no kprobe PMU, no kprobe_events in tracefs: " \
              "CONFIG_KPROBES is off)"


@lru_cache(maxsize=1)
def kallsyms() -> frozenset:
    """Names of text symbols (functions) the kernel exports in /proc/kallsyms."""
    try:
        with open("/proc/kallsyms") as f:
            return frozenset(p[2] for p in (line.split() for line in f)
                             if len(p) >= 3 and p[1] in "tTwW")
    except OSError:
        return frozenset()
