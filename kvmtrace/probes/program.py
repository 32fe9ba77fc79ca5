"""Assemble the bcc program for a set of probes.

Structs and ring buffers for the selected events are generated from
events.py; the ioctl state machine is hand-written C (bpf/ioctl.c) whose
emit blocks are generated too, so it still fills the declared layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import codegen
from .events import EVENTS, KVM_IOCTLS, MEMSLOT, VM_IOCTL, Event

_HERE = os.path.join(os.path.dirname(__file__), "bpf")


def _read(name: str) -> str:
    with open(os.path.join(_HERE, name)) as f:
        return f.read()


@dataclass
class Program:
    text: str
    cflags: list[str]    # -D defines: BTF offsets of the struct members read
    events: list[Event]  # index = kind number used by the lost counters
    attach: list[tuple[str, str, str]]  # (kprobe | kretprobe, kernel function, BPF function)

    def attach_all(self, b):
        """Attach the kprobes of a loaded bcc.BPF (tracepoints attach themselves)."""
        for kind, func, fn_name in self.attach:
            if kind == "kprobe":
                b.attach_kprobe(event=func, fn_name=fn_name)
            else:
                b.attach_kretprobe(event=func, fn_name=fn_name)


def _memslot_assigns() -> str:
    return "".join(f"        e->{k} = {v};\n" for k, v in (
        ("vm_fd", "p->fd"),
        ("ioctl", "p->cmd == KVM_SET_USER_MEMORY_REGION2 ? 2 : 1"),
        ("slot", "p->r.slot"), ("flags", "p->r.flags"),
        ("gpa", "p->r.guest_phys_addr"), ("size", "p->r.memory_size"),
        ("hva", "p->r.userspace_addr"), ("gmem_offset", "p->r.guest_memfd_offset"),
        ("gmem_fd", "p->r.guest_memfd"), ("read_ok", "p->read_ok"),
        ("ret", "ret"), ("enter_ts", "p->ts"),
    ))


def _vm_ioctl_assigns() -> str:
    return "".join(f"        e->{k} = {v};\n" for k, v in (
        ("cmd", "p->cmd"), ("fd", "p->fd"), ("arg", "p->arg"), ("ret", "ret"),
    ))


def build(probes, filter_pids: bool, offsets: dict | None = None) -> Program:
    """The program for ``probes``; ``offsets`` maps (struct, member) to a byte
    offset from the running kernel's BTF for every member a kprobe reads."""
    names: list[str] = []
    for p in probes:
        names += [e for e in p.events if e not in names]
    events = [EVENTS[n] for n in names]
    index = {e.name: i for i, e in enumerate(events)}

    # Tracepoint formats name KVM's own types, which no generic header defines.
    parts = ["#include <uapi/linux/ptrace.h>\n#include <linux/sched.h>\n",
             "typedef u64 gpa_t;\ntypedef u64 gfn_t;\n", codegen.KREAD_MACRO]
    parts += [f"#define {k} 0x{v:x}U\n" for k, v in KVM_IOCTLS.items()]
    parts.append(f"#define KVMTRACE_NKINDS {max(len(events), 1)}\n")
    if filter_pids:
        parts.append("#define KVMTRACE_FILTER_PIDS 1\n")
    parts += [codegen.c_struct(e) for e in events]
    parts.append(_read("prelude.c"))
    if MEMSLOT.name in index or VM_IOCTL.name in index:
        ioctl = _read("ioctl.c")
        ms = (codegen.c_emit(MEMSLOT, index[MEMSLOT.name], _memslot_assigns())
              if MEMSLOT.name in index else "")
        vi = (codegen.c_emit(VM_IOCTL, index[VM_IOCTL.name], _vm_ioctl_assigns())
              if VM_IOCTL.name in index else "")
        parts.append(ioctl.replace("EMIT_MEMSLOT", ms).replace("EMIT_VM_IOCTL", vi))
    attach = []
    offsets = offsets or {}
    cflags = []
    for e in events:
        if e.tracepoint:
            parts.append(codegen.c_tracepoint_probe(e, index[e.name]))
    # entry/return events first: 'inside' guards refer to their stash maps
    for e in sorted((e for e in events if e.kprobe), key=lambda e: e.inside is not None):
        inside = EVENTS[e.inside] if e.inside else None
        if inside is not None and inside.name not in index:
            continue
        parts.append(codegen.c_kprobe(e, index[e.name], inside))
        for member in e.btf_members:
            if member not in offsets:
                raise KeyError(f"no BTF offset for {member[0]}.{member[1]}")
            define = f"-D{codegen.btf_define(member)}={offsets[member]}"
            if define not in cflags:
                cflags.append(define)
        if e.on_return:  # e.g. a VMA lookup: the value is known when the call returns
            attach.append(("kretprobe", e.kprobe, codegen.entry_fn(e)))
        else:
            attach.append(("kprobe", e.kprobe, codegen.entry_fn(e)))
            if e.has_return:
                attach.append(("kretprobe", e.kprobe, codegen.return_fn(e)))
    return Program("".join(parts), cflags, events, attach)
