"""C text and numpy dtypes generated from :mod:`kvmtrace.probes.events`.

The struct emitted for bcc and the numpy dtype used to decode it both follow
the C rules for naturally aligned fixed-width fields (numpy's ``align=True``
is defined to match them), and the generated C asserts the size, so a
mismatch fails at compile time instead of silently shifting columns.
"""

from __future__ import annotations

import numpy as np

from .events import CTYPES, Event

# Every BPF ring buffer record starts with an 8-byte header (u32 len with the
# BUSY / DISCARD bits, u32 page offset) and is padded to 8 bytes
# (kernel/bpf/ringbuf.c, BPF_RINGBUF_HDR_SZ; unchanged since 5.8).
RINGBUF_HDR = 8


def struct_name(ev: Event) -> str:
    return f"kvmtrace_{ev.name}"


def ring_name(ev: Event) -> str:
    return f"rb_{ev.name}"


def event_dtype(ev: Event) -> np.dtype:
    return np.dtype([(f.name, CTYPES[f.ctype]) for f in ev.all_fields], align=True)


def record_dtype(ev: Event) -> np.dtype:
    """The dtype of one ring-buffer record: header, then the event, padded to 8."""
    body = event_dtype(ev)
    size = (RINGBUF_HDR + body.itemsize + 7) & ~7
    return np.dtype({
        "names": ["_len", "_pg_off", "body"],
        "formats": ["u4", "u4", body],
        "offsets": [0, 4, RINGBUF_HDR],
        "itemsize": size,
    })


# Rings at least this large (pages) carry the fault path's high-rate events;
# --buffer-size resizes them (perf's -m habit), the rare kinds keep theirs.
HIGH_RATE_PAGES = 256


def ring_pages(ev: Event, buffer_pages: int | None = None) -> int:
    """Pages of ``ev``'s ring: its declared size, or ``buffer_pages`` for the
    high-rate kinds when the user chose a size."""
    if buffer_pages is None or ev.ring_pages < HIGH_RATE_PAGES:
        return ev.ring_pages
    return buffer_pages


def c_struct(ev: Event, buffer_pages: int | None = None) -> str:
    members = "\n".join(f"    {f.ctype} {f.name}; /* {f.doc} */" for f in ev.all_fields)
    size = event_dtype(ev).itemsize
    return (
        f"struct {struct_name(ev)} {{\n{members}\n}};\n"
        f"_Static_assert(sizeof(struct {struct_name(ev)}) == {size}, "
        f"\"{ev.name}: layout differs from the Python declaration\");\n"
        f"BPF_RINGBUF_OUTPUT({ring_name(ev)}, {ring_pages(ev, buffer_pages)});\n"
    )


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
