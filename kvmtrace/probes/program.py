"""Assemble the bcc program for a set of probes.

Structs and ring buffers for the selected events are generated from
events.py; the ioctl state machine is hand-written C (bpf/ioctl.c) whose
emit blocks are generated too, so it still fills the declared layout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import codegen
from ..host import bccload, tracefs
from ..host import btf as btf_mod
from .events import EVENTS, KVM_IOCTLS, MEMSLOT, PROC_EXIT, VMA_STATUS, VM_IOCTL, Event

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
    enter_ioctl: bool = False  # bpf/ioctl.c is in: attach_all attaches its entry program
    # The in-BPF VMA lookup at memslot ioctls: compiled / available (after
    # attach_all) / reason when not, load_ms; recorded in the recording's meta.
    vma_lookup: dict = field(default_factory=dict)

    def attach_all(self, b):
        """Attach the kprobes and the ioctl entry program of a loaded bcc.BPF
        (the other tracepoint programs attach themselves)."""
        if self.enter_ioctl:
            self._attach_enter_ioctl(b)
        for kind, func, fn_name in self.attach:
            if kind == "kprobe":
                b.attach_kprobe(event=func, fn_name=fn_name)
            else:
                b.attach_kretprobe(event=func, fn_name=fn_name)

    def _attach_enter_ioctl(self, b):
        """The entry program with the VMA lookup, linked with its callback by
        kvmtrace (bcc cannot load it); where the kernel refuses it, the one
        without, and the reason is kept."""
        why = self.vma_lookup.get("reason", "")
        if self.vma_lookup.get("compiled"):
            t0 = time.perf_counter()
            try:
                bccload.load_with_callback(b, ENTER_IOCTL, VMA_CALLBACK, ENTER_TRACEPOINT)
                self.vma_lookup.update(available=True, reason="",
                                       load_ms=round((time.perf_counter() - t0) * 1e3, 2))
                return
            except bccload.LinkError as e:
                why = f"bcc's output could not be linked with its callback: {e}"
            except bccload.BPFLoadError as e:
                why = vma_refusal(str(e))
            except Exception as e:  # never lose the recording over the lookup
                why = f"loading the VMA lookup failed: {type(e).__name__}: {e}"
        b.attach_tracepoint(tp=ENTER_TRACEPOINT, fn_name=ENTER_IOCTL_NOVMA)
        self.vma_lookup.update(available=False, reason=why)


ENTER_TRACEPOINT = "syscalls:sys_enter_ioctl"
ENTER_IOCTL = "kvmtrace_enter_ioctl"              # with the VMA lookup (bpf/vma.h)
ENTER_IOCTL_NOVMA = "kvmtrace_enter_ioctl_novma"  # without
VMA_CALLBACK = "kvmtrace_vma_cb"
NO_VMA_LOOKUP_ENV = "KVMTRACE_NO_VMA_LOOKUP"      # =1: build without it (tests, comparisons)


def vma_refusal(msg: str) -> str:
    """Why the kernel refused the VMA lookup, in words."""
    if "#180" in msg or "find_vma" in msg:
        return f"this kernel offers no bpf_find_vma to tracepoint programs (Linux 5.17+): {msg}"
    if "#158" in msg or "task_btf" in msg:
        return ("this kernel offers no bpf_get_current_task_btf (Linux 5.11+, needs "
                f"CONFIG_DEBUG_INFO_BTF): {msg}")
    return f"the kernel refused the program with the VMA lookup: {msg}"


def _vma_lookup_setup(offsets: dict) -> tuple[str, list[str], dict]:
    """(C defines, cflags, status) for bpf/vma.h: the lookup is compiled when
    the kernel's BTF gives every member it reads."""
    text = "".join(f"#define KVMTRACE_VMA_{k} {v}\n" for k, v in VMA_STATUS.items())
    text += "".join(codegen.include_line(os.path.join(_HERE, h))
                    for h in ("vma_name.h", "vma.h"))
    if os.environ.get(NO_VMA_LOOKUP_ENV) == "1":
        return text, [], {"compiled": False, "available": False,
                          "reason": f"turned off ({NO_VMA_LOOKUP_ENV}=1)"}
    need = btf_mod.VMA_LOOKUP_MEMBERS
    have = {m: offsets[m] for m in need if m in offsets}
    if len(have) < len(need):
        try:
            have = btf_mod.vma_lookup_offsets()
        except btf_mod.BTFError as e:
            return text, [], {"compiled": False, "available": False,
                              "reason": f"no struct offsets for the VMA lookup: {e}"}
    cflags = [f"-D{codegen.btf_define(m)}={have[m]}" for m in need]
    return "#define KVMTRACE_VMA_LOOKUP 1\n" + text, cflags, {"compiled": True}


def _memslot_assigns() -> str:
    return "".join(f"        e->{k} = {v};\n" for k, v in (
        ("vm_fd", "p->fd"),
        ("ioctl", "p->cmd == KVM_SET_USER_MEMORY_REGION2 ? 2 : 1"),
        ("slot", "p->r.slot"), ("flags", "p->r.flags"),
        ("gpa", "p->r.guest_phys_addr"), ("size", "p->r.memory_size"),
        ("hva", "p->r.userspace_addr"), ("gmem_offset", "p->r.guest_memfd_offset"),
        ("gmem_fd", "p->r.guest_memfd"), ("read_ok", "p->read_ok"),
        ("ret", "ret"), ("enter_ts", "p->ts"),
        ("vma_status", "p->vma_status"), ("vma_has_file", "p->vma.has_file"),
        ("vma_covers", "p->vma.count && p->vma.next >= p->r.userspace_addr + p->r.memory_size"),
        ("vma_count", "p->vma.count"), ("vma_err", "p->vma_err"), ("vma_dev", "p->vma.dev"),
        ("vma_start", "p->vma.start"), ("vma_end", "p->vma.end"),
        ("vm_flags", "p->vma.flags"), ("vm_page_prot", "p->vma.prot"),
        ("vm_pgoff", "p->vma.pgoff"), ("vma_ino", "p->vma.ino"),
        ("vma_fs_magic", "p->vma.magic"),
    )) + "        __builtin_memcpy(e->vma_name, p->vma.name, sizeof(e->vma_name));\n"


def _vm_ioctl_assigns() -> str:
    return "".join(f"        e->{k} = {v};\n" for k, v in (
        ("cmd", "p->cmd"), ("fd", "p->fd"), ("arg", "p->arg"), ("ret", "ret"),
    ))


def build(probes, filter_pids: bool, offsets: dict | None = None,
          buffer_pages: int | dict | None = None) -> Program:
    """The program for ``probes``; ``offsets`` maps (struct, member) to a byte
    offset from the running kernel's BTF for every member a kprobe reads;
    ``buffer_pages`` resizes the high-rate rings, or the kinds a dict names
    (codegen.ring_pages)."""
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
    parts += [codegen.c_struct(e, buffer_pages) for e in events]
    parts.append(_read("prelude.c"))
    offsets = offsets or {}
    cflags = []
    vma_lookup = {}
    if MEMSLOT.name in index or VM_IOCTL.name in index:
        vma_text, cflags, vma_lookup = _vma_lookup_setup(offsets)
        parts.append(vma_text)
        ioctl = _read("ioctl.c")
        parts += [f"#define KVMTRACE_IDX_{e.name.upper()} {index.get(e.name, -1)}\n"
                  for e in (MEMSLOT, VM_IOCTL)]
        ms = (codegen.c_emit(MEMSLOT, index[MEMSLOT.name], _memslot_assigns())
              if MEMSLOT.name in index else "")
        vi = (codegen.c_emit(VM_IOCTL, index[VM_IOCTL.name], _vm_ioctl_assigns())
              if VM_IOCTL.name in index else "")
        parts.append(ioctl.replace("EMIT_MEMSLOT", ms).replace("EMIT_VM_IOCTL", vi))
    if PROC_EXIT.name in index:
        if "group_dead" in tracefs.tracepoint_fields("sched:sched_process_exit"):
            parts.append("#define KVMTRACE_TP_GROUP_DEAD 1\n")
        parts.append(_read("proc.c").replace("EMIT_PROC_EXIT", codegen.c_emit(
            PROC_EXIT, index[PROC_EXIT.name], "        e->group_dead = dead;\n")))
    attach = []
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
    return Program("".join(parts), cflags, events, attach,
                   enter_ioctl=MEMSLOT.name in index or VM_IOCTL.name in index,
                   vma_lookup=vma_lookup)
