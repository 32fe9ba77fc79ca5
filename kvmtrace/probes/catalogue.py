"""Probe points kvmtrace knows, and which of them this host can attach.

A probe is usable when every tracepoint it needs has a format file in tracefs
(a tracepoint that exists may still never fire on some hosts, e.g.
kvm:kvm_page_fault on KVM-PVM: that is reported by the recording's per-probe
counts, not guessed here).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..host import tracefs
from .events import EVENTS

GROUPS = {
    "memslots": "KVM ioctls: VM and vCPU creation, memslot changes",
    "faults": "stage-2 / shadow MMU faults and the sptes they install",
    "invalidations": "mmu-notifier invalidations of guest memory",
    "exits": "exits to the VMM: MMIO, KVM_RUN returns",
}

SETS = {
    "all": tuple(GROUPS),
    "default": tuple(GROUPS),
    "memslots": ("memslots",),
    "faults": ("memslots", "faults", "invalidations"),
}


@dataclass(frozen=True)
class Probe:
    name: str
    group: str
    events: tuple[str, ...]
    needs: tuple[str, ...]  # tracepoints, "category:name"
    doc: str
    kfuncs: tuple[str, ...] = ()  # kernel functions it kprobes (must be in kallsyms)
    arch: tuple[str, ...] = ()    # machines it is for (empty: all)
    requires: str | None = None   # another probe it only makes sense with


def _tp_probe(event: str, group: str) -> Probe:
    ev = EVENTS[event]
    return Probe(ev.tracepoint, group, (event,), (ev.tracepoint,), ev.doc)


PROBES: tuple[Probe, ...] = (
    Probe("memslot-ioctls", "memslots", ("memslot", "vm_ioctl"),
          ("syscalls:sys_enter_ioctl", "syscalls:sys_exit_ioctl"),
          "KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_SET_USER_MEMORY_REGION(2), KVM_RUN "
          "(vCPU per thread) from the ioctl syscall tracepoints"),
    Probe("process-exits", "memslots", ("proc_exit",), ("sched:sched_process_exit",),
          EVENTS["proc_exit"].doc),
    _tp_probe("page_fault", "faults"),
    _tp_probe("pt_walk", "faults"),
    _tp_probe("spte_requested", "faults"),
    _tp_probe("set_spte", "faults"),
    _tp_probe("tdp_spte_changed", "faults"),
    _tp_probe("fast_page_fault", "faults"),
    _tp_probe("mmio_page_fault", "faults"),
    Probe("kvm_arch_prepare_memory_region", "memslots", ("prepare_region",), (),
          EVENTS["prepare_region"].doc, kfuncs=("kvm_arch_prepare_memory_region",)),
    # arm64's kvm_arch_prepare_memory_region walks the slot's VMAs; x86's
    # never looks one up (6.1 and 7.3.4: it only checks the GPA range and
    # allocates metadata; measured: 0 events in the x86 testbed), so there
    # the VMA comes from the memslot ioctl's own lookup (bpf/vma.h).
    Probe("prepare-vma", "memslots", ("prepare_vma",), (), EVENTS["prepare_vma"].doc,
          kfuncs=("find_vma_intersection",), arch=("aarch64",),
          requires="kvm_arch_prepare_memory_region"),
    Probe("kvm_mmu_page_fault", "faults", ("fault_handler",), (), EVENTS["fault_handler"].doc,
          kfuncs=("kvm_mmu_page_fault",), arch=("x86_64",)),
    _tp_probe("guest_fault", "faults"),
    Probe("kvm_handle_guest_abort", "faults", ("guest_abort",), (), EVENTS["guest_abort"].doc,
          kfuncs=("kvm_handle_guest_abort",), arch=("aarch64",)),
    Probe("user_mem_abort", "faults", ("user_mem_abort",), (), EVENTS["user_mem_abort"].doc,
          kfuncs=("user_mem_abort",), arch=("aarch64",)),
    Probe("kvm_pgtable_stage2_map", "faults", ("s2_map",), (), EVENTS["s2_map"].doc,
          kfuncs=("kvm_pgtable_stage2_map",), arch=("aarch64",)),
    Probe("kvm_pgtable_stage2_relax_perms", "faults", ("s2_relax",), (),
          EVENTS["s2_relax"].doc, kfuncs=("kvm_pgtable_stage2_relax_perms",),
          arch=("aarch64",)),
    _tp_probe("unmap_hva_range", "invalidations"),
    _tp_probe("mmio", "exits"),
    _tp_probe("userspace_exit", "exits"),
)


class SelectionError(ValueError):
    pass


def parse_selection(spec: str) -> list[Probe]:
    """'all', a set name, group names, probe names or event names, comma separated."""
    chosen: list[Probe] = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        if word in SETS:
            matched = [p for p in PROBES if p.group in SETS[word]]
        elif word in GROUPS:
            matched = [p for p in PROBES if p.group == word]
        else:
            matched = [p for p in PROBES
                       if word in (p.name, p.name.split(":")[-1]) or word in p.events]
        if not matched:
            names = ", ".join(list(SETS) + list(GROUPS))
            raise SelectionError(f"unknown probe or set '{word}' (sets and groups: {names}; "
                                 f"or a probe name from 'kvmtrace probes')")
        chosen += [p for p in matched if p not in chosen]
    return chosen


def availability(probes, root: str | None = None, btf=None,
                 machine: str | None = None) -> dict[str, str | None]:
    """probe name -> None when attachable, else why not.

    ``btf`` (kvmtrace.host.btf.BTF) resolves the struct members kprobes read;
    without it, kprobe probes that read structs are unavailable."""
    import platform

    from ..host import kprobes
    from ..host.btf import BTFError

    machine = machine or platform.machine()
    out = {}
    for p in probes:
        why = None
        missing = [t for t in p.needs if not tracefs.tracepoint_exists(t, root)]
        if p.arch and machine not in p.arch:
            why = f"only on {', '.join(p.arch)}"
        elif missing:
            why = f"tracepoint {', '.join(missing)} not in tracefs"
        elif p.kfuncs and not kprobes.available():
            why = kprobes.UNAVAILABLE
        elif p.kfuncs and not set(p.kfuncs) <= kprobes.kallsyms():
            gone = sorted(set(p.kfuncs) - kprobes.kallsyms())
            why = f"{', '.join(gone)} not in /proc/kallsyms (inlined or absent)"
        else:
            members = [m for e in p.events for m in EVENTS[e].btf_members]
            if members and btf is None:
                why = "needs the kernel's BTF for struct offsets"
            for m in members if btf is not None else ():
                try:
                    btf.member_offset(*m)
                except BTFError as e:
                    why = str(e)
                    break
        out[p.name] = why
    for p in probes:  # a probe whose partner can't attach can't either
        if p.requires and out.get(p.name) is None and out.get(p.requires, "absent"):
            out[p.name] = f"needs {p.requires}, which is " + (
                "not selected" if p.requires not in out else "unavailable")
    return out


def offsets(probes, btf) -> dict:
    """(struct, member) -> byte offset, for every member the probes' events read."""
    return {m: btf.member_offset(*m) for p in probes for e in p.events
            for m in EVENTS[e].btf_members}
