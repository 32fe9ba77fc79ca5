"""How many times the kernel skipped each loaded BPF program, copied into the
recording as a ``bpf_misses`` note.

A kprobe or tracepoint program that fires while another tracing program runs
on the same CPU is not run at all (kernel/trace/bpf_trace.c trace_call_bpf:
the per-CPU bpf_prog_active; for trampolines and raw tracepoints the
program's own ``active`` counter): its event is neither emitted nor counted
lost by the program itself. The kernel counts these skips per program
(``bpf_prog_info.recursion_misses``, Linux 5.12+), so the recording can say
that events may be missing even when no ring buffer was ever full.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

BPF_OBJ_GET_INFO_BY_FD = 15
_NR_BPF = {"x86_64": 321, "aarch64": 280}
# struct bpf_prog_info (include/uapi/linux/bpf.h): recursion_misses is the u64
# at byte 208 (after run_time_ns at 192 and run_cnt at 200); the kernel fills
# as much of the struct as info_len asks for and it knows.
INFO_LEN = 216
RECURSION_MISSES = 208


def _prog_info(fd: int) -> bytes | None:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        return None
    info = ctypes.create_string_buffer(INFO_LEN)
    attr = bytearray(struct.pack("<IIQ", fd, INFO_LEN, ctypes.addressof(info)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    if libc.syscall(ctypes.c_long(nr), ctypes.c_long(BPF_OBJ_GET_INFO_BY_FD), buf,
                    ctypes.c_long(len(attr))) < 0:
        return None
    got = struct.unpack_from("<I", attr, 4)[0]  # what the kernel filled
    return info.raw[:got]


def recursion_misses(b) -> dict[str, int]:
    """{program name: times the kernel skipped it} for every program of ``b``
    (bcc.BPF or host.bpfcache.CachedBPF: ``funcs`` of objects with ``fd``)
    whose kernel reports it; programs never skipped are left out."""
    out = {}
    for name, fn in list(getattr(b, "funcs", {}).items()):
        fd = getattr(fn, "fd", None)
        if not isinstance(fd, int) or fd < 0:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue
        raw = _prog_info(fd)
        if raw is None or len(raw) < RECURSION_MISSES + 8:
            continue
        n = struct.unpack_from("<Q", raw, RECURSION_MISSES)[0]
        if n:
            out[name.decode() if isinstance(name, bytes) else str(name)] = int(n)
    return out
