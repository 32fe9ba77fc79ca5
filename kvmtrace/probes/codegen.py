"""C text and numpy dtypes generated from :mod:`kvmtrace.probes.events`.

The struct emitted for bcc and the numpy dtype used to decode it both follow
the C rules for naturally aligned fixed-width fields (numpy's ``align=True``
is defined to match them), and the generated C asserts the size, so a
mismatch fails at compile time instead of silently shifting columns.

The C text needs only the sizes, computed here without numpy (event_size):
record imports numpy (0.1 to 0.2 s) after its probes are attached, so that
it does not delay the first event recorded.
"""

from __future__ import annotations

import os

from typing import TYPE_CHECKING

from .events import CTYPES, Event, chars_len, numpy_type

if TYPE_CHECKING:
    import numpy as np

# Every BPF ring buffer record starts with an 8-byte header (u32 len with the
# BUSY / DISCARD bits, u32 page offset) and is padded to 8 bytes
# (kernel/bpf/ringbuf.c, BPF_RINGBUF_HDR_SZ; unchanged since 5.8).
RINGBUF_HDR = 8


def struct_name(ev: Event) -> str:
    return f"kvmtrace_{ev.name}"


def ring_name(ev: Event) -> str:
    return f"rb_{ev.name}"


def event_size(ev: Event) -> int:
    """sizeof(struct kvmtrace_<event>): each field at the next multiple of its
    own size, the whole a multiple of its largest field (event_dtype's layout)."""
    off, align = 0, 1
    for f in ev.all_fields:
        size = chars_len(f.ctype)
        n = 1 if size else int(CTYPES[f.ctype][1:])  # a char array aligns as a char
        off = (off + n - 1) // n * n + (size or n)
        align = max(align, n)
    return (off + align - 1) // align * align


def record_size(ev: Event) -> int:
    """Bytes of one ring-buffer record of ``ev``: header, event, padding to 8."""
    return (RINGBUF_HDR + event_size(ev) + 7) & ~7


def event_dtype(ev: Event) -> np.dtype:
    import numpy as np

    return np.dtype([(f.name, numpy_type(f.ctype)) for f in ev.all_fields], align=True)


def text_column(values) -> "np.ndarray":
    """A char-array field (numpy ``S<N>``, NUL-padded as the kernel wrote it)
    as text: cut at the first NUL, bytes that are not UTF-8 escaped."""
    import numpy as np

    raw = np.ascontiguousarray(values)
    width = raw.dtype.itemsize
    m = raw.view(np.uint8).reshape(len(raw), width).copy()
    m[np.cumsum(m == 0, axis=1) > 0] = 0  # everything from the first NUL on
    head = m.view(f"S{width}")[:, 0]  # (numpy drops trailing NULs)
    return np.char.decode(head, "utf-8", "backslashreplace")


def record_dtype(ev: Event) -> np.dtype:
    """The dtype of one ring-buffer record: header, then the event, padded to 8."""
    import numpy as np

    body = event_dtype(ev)
    size = record_size(ev)
    return np.dtype({
        "names": ["_len", "_pg_off", "body"],
        "formats": ["u4", "u4", body],
        "offsets": [0, 4, RINGBUF_HDR],
        "itemsize": size,
    })


# Ring sizes. Each kind's ring holds what arrives at its expected rate
# (Event.rate) while the collector is not reading, for STALL_S seconds: the
# longest gap between two reads of the rings measured while recording a QEMU
# boot on a loaded host (load average 6 on 2 cores) was 0.50 s, p99 0.13 s,
# mostly /proc/PID/smaps snapshots of QEMU (65 to 85 ms each) and fsync; the
# rates carry their own headroom. Rounded up to a power of two pages (as BPF
# requires) of the host's page size (bcc's BPF_RINGBUF_OUTPUT counts pages of
# it: 4 KiB on x86, 4, 16 or 64 KiB on arm64), between MIN_BYTES and
# MAX_BYTES by default, so a 64 KiB-page host gets rings of the same bytes.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
STALL_S = 0.25
MIN_BYTES, MAX_BYTES = 64 << 10, 4 << 20
MIN_PAGES = max(1, MIN_BYTES // PAGE_SIZE)
MAX_PAGES = max(MIN_PAGES, MAX_BYTES // PAGE_SIZE)
# Kinds expected at this many events/s or more are the high-rate ones (faults,
# MMIO, exits); --buffer-size resizes their rings (perf's -m habit). The rare
# kinds keep theirs, bursty memslot changes (big rings, low rate) included.
HIGH_RATE = 50_000


def declared_pages(ev: Event) -> int:
    """The ring size ``ev``'s expected rate calls for, in pages."""
    need = ev.rate * STALL_S * record_size(ev) / PAGE_SIZE
    pages = MIN_PAGES
    while pages < need and pages < MAX_PAGES:
        pages *= 2
    return pages


def ring_pages(ev: Event, buffer_pages: int | dict | None = None) -> int:
    """Pages of ``ev``'s ring: the size its rate calls for (declared_pages);
    ``buffer_pages`` an int: that size for the high-rate kinds instead; a
    dict: {event name: pages} for the kinds it names."""
    if isinstance(buffer_pages, dict):
        return buffer_pages.get(ev.name) or declared_pages(ev)
    declared = declared_pages(ev)
    if buffer_pages is None or ev.rate < HIGH_RATE:
        return declared
    return buffer_pages


def c_struct(ev: Event, buffer_pages: int | dict | None = None) -> str:
    members = "\n".join(f"    {c_member(f)}; /* {f.doc} */" for f in ev.all_fields)
    size = event_size(ev)
    return (
        f"struct {struct_name(ev)} {{\n{members}\n}};\n"
        f"_Static_assert(sizeof(struct {struct_name(ev)}) == {size}, "
        f"\"{ev.name}: layout differs from the Python declaration\");\n"
        f"BPF_RINGBUF_OUTPUT({ring_name(ev)}, {ring_pages(ev, buffer_pages)});\n"
    )


def c_member(f) -> str:
    """A field's C declaration: ``u64 ts``, ``char name[64]``."""
    return c_decl(f.ctype, f.name)


def c_decl(ctype: str, name: str) -> str:
    """The C declaration of ``name`` of a field type (``char[N]``: an array)."""
    n = chars_len(ctype)
    return f"char {name}[{n}]" if n else f"{ctype} {name}"


def include_line(path: str) -> str:
    """``#include "PATH"`` with PATH quoted for C: a header included by its
    absolute path (the compile cache hashes those, host/bpfcache.key)."""
    return '#include "{}"\n'.format(path.replace("\\", "\\\\").replace('"', '\\"'))


def c_lost(ev: Event, index: int, var=lambda name: f"v_{name}") -> str:
    """Count a lost event, with its guest frame when the event has one
    (``var`` names the C expression holding a field's value)."""
    if ev.where is None:
        return f"kvmtrace_lost({index})"
    field, unit = ev.where
    gfn = var(field) if unit == "gfn" else f"({var(field)} >> 12)"
    return f"kvmtrace_lost_at({index}, {gfn})"


def c_emit(ev: Event, index: int, assignments: str, lost: str | None = None) -> str:
    """Reserve, fill header and fields, submit: the body shared by all probes."""
    s, r = struct_name(ev), ring_name(ev)
    return (
        f"    struct {s} *e = {r}.ringbuf_reserve(sizeof(struct {s}));\n"
        f"    if (!e) {{ {lost or f'kvmtrace_lost({index})'}; return 0; }}\n"
        f"    KVMTRACE_HEADER(e);\n"
        f"{assignments}"
        f"    {r}.ringbuf_submit(e, {'0' if ev.wakeup else 'BPF_RB_NO_WAKEUP'});\n"
    )


def c_tracepoint_probe(ev: Event, index: int) -> str:
    """A TRACEPOINT_PROBE copying the tracepoint's args into the event.

    bcc builds ``args`` from the tracepoint's format file in tracefs, so the
    layout of the kernel side also comes from the running kernel itself.
    """
    category, name = ev.tracepoint.split(":")
    # ctx is read into locals first: the verifier refuses ctx reads through a
    # pointer the compiler has offset across helper calls.
    reads = "".join(f"    {f.ctype} v_{f.name} = {f.src};\n" for f in ev.fields)
    assigns = "".join(f"    e->{f.name} = v_{f.name};\n" for f in ev.fields)
    return (
        f"TRACEPOINT_PROBE({category}, {name}) {{\n"
        f"{reads}"
        f"    if (!kvmtrace_wanted()) return 0;\n"
        f"{c_emit(ev, index, assigns, c_lost(ev, index))}"
        f"    return 0;\n}}\n"
    )


# -- kprobes ----------------------------------------------------------------
# A kernel struct member is read at an offset taken from the running kernel's
# BTF, passed in as a -D define (bcc does no CO-RE relocation).

KREAD_MACRO = (
    "#define KVMTRACE_READ(type, base, off) ({ type __v = 0; u64 __b = (u64)(base); "
    "if (__b) bpf_probe_read_kernel(&__v, sizeof(__v), (void *)(__b + (off))); __v; })\n")


def btf_define(member: tuple[str, str]) -> str:
    struct, path = member
    return f"KT_OFF_{struct}__{path.replace('.', '__')}"


def _src(f) -> str:
    return f"KVMTRACE_READ({f.ctype}, {f.src}, {btf_define(f.btf)})" if f.btf else f.src


def stash_name(ev: Event) -> str:
    return f"kvmtrace_stash_{ev.name}"


def entry_fn(ev: Event) -> str:
    return f"kvmtrace_kp_{ev.name}"


def return_fn(ev: Event) -> str:
    return f"kvmtrace_kr_{ev.name}"


def c_kprobe(ev: Event, index: int, inside: Event | None) -> str:
    """Entry (and, for events with return fields, return) probe functions.

    Events without return fields are emitted at once. Entry/return events keep
    their entry half in a per-thread hash and are emitted at return, so a
    record is one call with its result and both timestamps.
    """
    entry = [f for f in ev.fields if not f.at_return]
    ret = [f for f in ev.fields if f.at_return]
    guard = ""
    if inside is not None:
        guard = (f"    {{ u32 __tid = (u32)bpf_get_current_pid_tgid();\n"
                 f"      if (!{stash_name(inside)}.lookup(&__tid)) return 0; }}\n")
    reads = "".join(f"    {f.ctype} v_{f.name} = {_src(f)};\n" for f in entry)
    if not ret:
        assigns = "".join(f"    e->{f.name} = v_{f.name};\n" for f in entry)
        return (f"int {entry_fn(ev)}(struct pt_regs *ctx) {{\n{guard}"
                f"    if (!kvmtrace_wanted()) return 0;\n{reads}"
                f"{c_emit(ev, index, assigns, c_lost(ev, index))}    return 0;\n}}\n")
    s = struct_name(ev)
    stash = stash_name(ev)
    assigns = "".join(f"    st.{f.name} = v_{f.name};\n" for f in entry)
    rets = "".join(f"    e->{f.name} = {_src(f)};\n" for f in ret)
    return (
        f"BPF_TABLE(\"lru_hash\", u32, struct {s}, {stash}, 4096);\n"
        f"int {entry_fn(ev)}(struct pt_regs *ctx) {{\n{guard}"
        f"    if (!kvmtrace_wanted()) return 0;\n{reads}"
        f"    struct {s} st = {{}};\n    KVMTRACE_HEADER(&st);\n{assigns}"
        f"    u32 tid = (u32)bpf_get_current_pid_tgid();\n"
        f"    {stash}.update(&tid, &st);\n    return 0;\n}}\n"
        f"int {return_fn(ev)}(struct pt_regs *ctx) {{\n"
        f"    u32 tid = (u32)bpf_get_current_pid_tgid();\n"
        f"    struct {s} *st = {stash}.lookup(&tid);\n    if (!st) return 0;\n"
        f"    struct {s} *e = {ring_name(ev)}.ringbuf_reserve(sizeof(struct {s}));\n"
        f"    if (!e) {{ {c_lost(ev, index, lambda n: f'st->{n}')}; {stash}.delete(&tid); "
        f"return 0; }}\n"
        f"    __builtin_memcpy(e, st, sizeof(struct {s}));\n{rets}"
        f"    {ring_name(ev)}.ringbuf_submit(e, {'0' if ev.wakeup else 'BPF_RB_NO_WAKEUP'});\n"
        f"    {stash}.delete(&tid);\n    return 0;\n}}\n"
    )
