"""Assemble the bcc program for a set of probes.

Structs and ring buffers for the selected events are generated from
events.py; the ioctl state machine is hand-written C (bpf/ioctl.c) whose
emit blocks are generated too, so it still fills the declared layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import codegen
from .events import EVENTS, KVM_IOCTLS, Event, MEMSLOT, VM_IOCTL

_HERE = os.path.join(os.path.dirname(__file__), "bpf")


def _read(name: str) -> str:
    with open(os.path.join(_HERE, name)) as f:
        return f.read()


@dataclass
class Program:
    text: str
    cflags: list[str]
    events: list[Event]  # index = kind number used by the lost counters


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


def build(probes, filter_pids: bool) -> Program:
    names: list[str] = []
    for p in probes:
        names += [e for e in p.events if e not in names]
    events = [EVENTS[n] for n in names]
    index = {e.name: i for i, e in enumerate(events)}

    # Tracepoint formats name KVM's own types, which no generic header defines.
    parts = ["#include <linux/sched.h>\n", "typedef u64 gpa_t;\ntypedef u64 gfn_t;\n"]
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
    for e in events:
        if e.tracepoint:
            parts.append(codegen.c_tracepoint_probe(e, index[e.name]))
    return Program("".join(parts), [], events)
