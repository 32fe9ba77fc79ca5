"""Every event kvmtrace records, declared once.

Each :class:`Event` lists its fields (name, C type, meaning) and, for events
that copy a tracepoint, the C expression that fills each field. From this one
declaration :mod:`kvmtrace.probes.codegen` makes both the C struct handed to
bcc and the numpy dtype that decodes the ring buffer, and
:mod:`kvmtrace.recording.format` makes the Arrow schema of the recording. The
BPF side and the Python side therefore cannot disagree about a layout.

Kernel pointers are never recorded (e.g. kvm_mmu_set_spte's ``sptep`` and
fast_page_fault's ``sptep`` are left out on purpose). Sptes and pfns are
kept: they hold host physical frame numbers, which the memory-type analysis
needs (the PAT memtype list is keyed by physical address).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import kvmapi

# C type -> numpy type string. Only fixed-width types, so sizes never depend on
# the compiler.
CTYPES = {
    "u8": "u1", "s8": "i1", "u16": "u2", "s16": "i2",
    "u32": "u4", "s32": "i4", "u64": "u8", "s64": "i8",
}
# Text the kernel holds (a file name): ``char[N]``, NUL-padded in the event,
# a string column in the recording (numpy "S<N>" on the way). N is a multiple
# of 8 and the field starts at a multiple of 8 in its event (the ring decoder
# reads events in 8-byte words: collectors/ringbuf.py).
_CHARS = re.compile(r"char\[([1-9][0-9]{0,3})\]")


def chars_len(ctype: str) -> int | None:
    """N of a ``char[N]`` field type, None for a number type."""
    m = _CHARS.fullmatch(ctype)
    return int(m.group(1)) if m else None


def numpy_type(ctype: str) -> str:
    """The numpy type string of a field type (``char[N]``: ``S<N>``)."""
    n = chars_len(ctype)
    return f"S{n}" if n else CTYPES[ctype]


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str
    doc: str
    src: str | None = None  # C expression that fills it in a generated probe
    # Read a kernel struct member: ``src`` is then the struct's address and the
    # offset of (struct, member path) comes from the running kernel's BTF.
    btf: tuple[str, str] | None = None
    at_return: bool = False  # filled in the return probe (entry/return pairs)

    def __post_init__(self):
        if self.ctype not in CTYPES and chars_len(self.ctype) is None:
            raise ValueError(f"{self.name}: unsupported C type {self.ctype}")


@dataclass(frozen=True)
class Event:
    """One kind of record: one ring buffer in BPF, one table in a recording."""

    name: str
    doc: str
    fields: tuple[Field, ...]
    tracepoint: str | None = None  # "category:name" when a generated probe copies it
    kprobe: str | None = None  # kernel function a generated kprobe reads
    # Emit only while this other event's entry/return pair is in flight on the
    # same thread (e.g. VMA lookups made by kvm_arch_prepare_memory_region).
    inside: str | None = None
    on_return: bool = False  # a return probe alone fills it (e.g. a returned pointer)
    # Events per second this kind can sustain on a busy host: its ring buffer
    # is sized to hold what arrives while the collector is not reading
    # (codegen.ring_pages; what was measured: next to FAULT_RATE below).
    rate: int = 2_000
    # Wake the collector at once (rare events that trigger work such as a
    # smaps snapshot); others are polled, which is cheaper per event.
    wakeup: bool = False
    # The field giving the guest-physical page an event concerns, and its unit
    # ("gfn", or "byte" for a guest-physical address): a lost event is then
    # counted per 2 MiB region, so the report can say which memslots lost events.
    where: tuple[str, str] | None = None

    def __post_init__(self):
        if (self.tracepoint or self.kprobe) and any(chars_len(f.ctype) for f in self.fields):
            raise ValueError(f"{self.name}: a generated probe copies numbers only")

    @property
    def all_fields(self) -> tuple[Field, ...]:
        return HEADER + self.fields

    @property
    def has_return(self) -> bool:
        return any(f.at_return for f in self.fields)

    @property
    def btf_members(self) -> list[tuple[str, str]]:
        return [f.btf for f in self.fields if f.btf]


# Filled for every event by KVMTRACE_HEADER(e) in the BPF program.
HEADER = (
    Field("ts", "u64", "CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns)"),
    Field("pid", "u32", "process id (tgid) of the VMM"),
    Field("tid", "u32", "thread id (vCPU thread for fault events)"),
    Field("vcpu_fd", "s32", "fd of the vCPU this thread last ran (KVM_RUN), -1 if none seen"),
    Field("cpu", "u32", "host CPU"),
)


# Expected peak rates (events/s, sustained over a quarter second), from
# measurements on the development host: a test-VMM guest faults up to about
# 220,000 pages/s untraced (one pt_walk, spte_requested and set_spte each per
# fault; bench/fault_overhead.py); a QEMU start (bench/qemu_burst.py) makes
# 20,520 kvm_mmio events in its busiest quarter second (82,000/s; 1.2 M/s
# within 1 ms), up to 6,600 userspace exits/s, 1,100 invalidations/s and 84
# memslot ioctls/s. Declared with headroom.
FAULT_RATE = 250_000   # one event per fault, per kind
MMIO_RATE = 250_000
EXIT_RATE = 100_000
INVALIDATION_RATE = 20_000
RARE_RATE = 2_000      # VM ioctls, process exits
# Memslot changes come in bursts: KVM's set_memory_region_test adds 32,764
# slots back to back, and with 128 KiB rings (780 memslot events) 2,005 memslot
# and 1,120 prepare_region events were lost even under TCG in the x86 testbed.
MEMSLOT_RATE = 25_000


def _tp(name, tracepoint, doc, fields, rate=RARE_RATE, where=None):
    """An event that copies a tracepoint's arguments field for field."""
    return Event(
        name=name, doc=doc, tracepoint=tracepoint, rate=rate, where=where,
        fields=tuple(Field(n, t, d, src or f"args->{n}") for n, t, d, src in fields),
    )


VMA_NAME_LEN = 64  # bytes of vma_name, its NUL included

MEMSLOT = Event(
    "memslot",
    "KVM_SET_USER_MEMORY_REGION(2) as issued and answered: the struct read from "
    "user memory at syscall entry, the result at exit",
    (
        Field("vm_fd", "s32", "the VM file descriptor the ioctl was issued on"),
        Field("ioctl", "u32", "1 = KVM_SET_USER_MEMORY_REGION, 2 = ..._REGION2"),
        Field("slot", "u32", "slot id; bits 16+ are the address space id"),
        Field("flags", "u32", "KVM_MEM_* flags"),
        Field("gpa", "u64", "guest_phys_addr"),
        Field("size", "u64", "memory_size (0 deletes the slot)"),
        Field("hva", "u64", "userspace_addr"),
        Field("gmem_offset", "u64", "guest_memfd_offset (REGION2 only)"),
        Field("gmem_fd", "u32", "guest_memfd (REGION2 only)"),
        Field("read_ok", "u32", "1 when the struct was read from user memory"),
        Field("ret", "s64", "ioctl return value (-errno on failure)"),
        Field("enter_ts", "u64", "CLOCK_MONOTONIC ns at syscall entry"),
        # The VMA containing hva, looked up in BPF at syscall entry (bpf_find_vma,
        # Linux 5.17+; bpf/vma.h): known even if the VMM exits or remaps at once.
        Field("vma_status", "u8", "VMA lookup at the ioctl (VMA_STATUS): 0 unavailable, "
              "1 found, 2 no VMA contains hva, 3 lookup failed (vma_err), 4 not looked up"),
        Field("vma_has_file", "u8", "1 when the VMA has a file (vm_file != NULL)"),
        Field("vma_covers", "u8", "1 when adjacent VMAs from hva cover [hva, hva+size)"),
        Field("vma_count", "u8", "VMAs walked from hva over the slot (adjacent; at most 8)"),
        Field("vma_err", "s32", "bpf_find_vma's result for hva (-ENOENT, -EBUSY: mmap "
              "lock contended)"),
        Field("vma_dev", "u32", "device of the VMA's file, kernel dev_t (major << 20 | minor)"),
        Field("vma_start", "u64", "vm_start of the VMA containing hva"),
        Field("vma_end", "u64", "vm_end of that VMA"),
        Field("vm_flags", "u64", "its vm_flags (VM_PFNMAP 0x400, VM_IO 0x4000, ...)"),
        Field("vm_page_prot", "u64", "its vm_page_prot (x86: PWT/PCD/PAT bits 3/4/7; "
              "arm64: AttrIndx in [4:2])"),
        Field("vm_pgoff", "u64", "its vm_pgoff (offset into the file or device, in pages)"),
        Field("vma_ino", "u64", "inode number of its file (vm_file->f_inode->i_ino)"),
        # Its name as the kernel stores it, so a slot's VMA is named even when
        # the VMM exits or unmaps before /proc/PID/smaps is read (version 6)
        Field("vma_name", f"char[{VMA_NAME_LEN}]", "its name as stored (bpf/vma_name.h): "
              "its file's dentry d_name (the last path component; memfd:NAME for a memfd; "
              "[vfio-device] for an anon_inode file), else a special mapping's own "
              "([vvar], [vdso]); cut to fit; empty when it has none"),
        Field("vma_fs_magic", "u32", "s_magic of its file's file system (anon_inodefs "
              "0x09041934, tmpfs 0x01021994, hugetlbfs 0x958458f6, sysfs 0x62656572 ...)"),
    ),
    wakeup=True, rate=MEMSLOT_RATE,
)

# MEMSLOT.vma_status values (the BPF side gets them as KVMTRACE_VMA_* defines).
VMA_STATUS = {"UNAVAILABLE": 0, "FOUND": 1, "NONE": 2, "FAILED": 3, "SKIPPED": 4}

VM_IOCTL = Event(
    "vm_ioctl",
    "KVM_CREATE_VM and KVM_CREATE_VCPU: which fds are VMs and vCPUs of which VM",
    (
        Field("cmd", "u32", "ioctl command"),
        Field("fd", "s32", "fd the ioctl was issued on (/dev/kvm or the VM)"),
        Field("arg", "u64", "ioctl argument (VM type, vCPU id)"),
        Field("ret", "s64", "new fd, or -errno"),
    ),
    wakeup=True,
)

PROC_EXIT = Event(
    "proc_exit",
    "a VMM process ended (sched:sched_process_exit of the last thread, or of the "
    "leader on kernels whose tracepoint has no group_dead): a later process with the "
    "same pid is another VMM",
    (Field("group_dead", "u8", "1 = the whole thread group is dead (tracepoint's "
           "group_dead); 2 = the leader thread exited (older kernels)"),),
)

PT_WALK = _tp(
    "pt_walk", "kvmmmu:kvm_mmu_pagetable_walk",
    "KVM walks the guest's page tables for a fault (shadow paging): fault start",
    [("addr", "u64", "guest virtual (or nested guest physical) address", None),
     ("pferr", "u32", "page-fault error code: P=1 W=2 U=4 RSVD=8 F(etch)=16", None)],
    rate=FAULT_RATE,
)

SPTE_REQUESTED = _tp(
    "spte_requested", "kvmmmu:kvm_mmu_spte_requested",
    "a fault reached the map stage: the gfn, pfn and level KVM will install",
    [("gfn", "u64", "guest frame number", None),
     ("pfn", "u64", "host physical frame number", None),
     ("level", "u8", "1 = 4K, 2 = 2M, 3 = 1G", None)],
    rate=FAULT_RATE,
    where=("gfn", "gfn"),
)

SET_SPTE = _tp(
    "set_spte", "kvmmmu:kvm_mmu_set_spte",
    "an spte was written (shadow / legacy MMU): faults and prefetches",
    [("gfn", "u64", "guest frame number", None),
     ("spte", "u64", "the new spte value", None),
     ("level", "u8", "1 = 4K, 2 = 2M, 3 = 1G", None),
     ("r", "u8", "readable", None),
     ("x", "u8", "executable", None),
     ("u", "s8", "user accessible (-1 when not applicable)", None)],
    rate=FAULT_RATE,
    where=("gfn", "gfn"),
)

TDP_SPTE_CHANGED = _tp(
    "tdp_spte_changed", "kvmmmu:kvm_tdp_mmu_spte_changed",
    "the TDP MMU changed an spte (EPT / NPT hosts)",
    [("gfn", "u64", "guest frame number", None),
     ("old_spte", "u64", "previous spte", None),
     ("new_spte", "u64", "new spte", None),
     ("level", "u8", "1 = 4K, 2 = 2M, 3 = 1G", None),
     ("as_id", "u8", "address space", None)],
    rate=FAULT_RATE,
    where=("gfn", "gfn"),
)

FAST_PAGE_FAULT = _tp(
    "fast_page_fault", "kvmmmu:fast_page_fault",
    "a fault fixed locklessly (access / write-protection tracking)",
    [("vcpu_id", "s32", "vCPU id", None),
     ("gpa", "u64", "faulting address", "args->cr2_or_gpa"),
     ("error_code", "u64", "page-fault error code", None),
     ("old_spte", "u64", "spte before", None),
     ("new_spte", "u64", "spte after", None),
     ("ret", "s32", "RET_PF_* (5 fixed, 6 spurious)", None)],
    rate=FAULT_RATE // 5,
)

PAGE_FAULT = _tp(
    "page_fault", "kvm:kvm_page_fault",
    "an EPT/NPT violation or #PF exit reached KVM's fault handler: fault start",
    [("vcpu_id", "u32", "vCPU id", None),
     ("guest_rip", "u64", "guest instruction pointer", None),
     ("fault_address", "u64", "faulting address (GPA for TDP)", None),
     ("error_code", "u64", "error code / exit qualification", None)],
    rate=FAULT_RATE,
)

MMIO_PAGE_FAULT = _tp(
    "mmio_page_fault", "kvmmmu:handle_mmio_page_fault",
    "a fault on an MMIO spte (no memslot, or a memslot KVM treats as MMIO)",
    [("addr", "u64", "faulting address", None),
     ("gfn", "u64", "guest frame number", None),
     ("access", "u32", "access bits", None)],
    rate=FAULT_RATE // 5,
    where=("gfn", "gfn"),
)

UNMAP_HVA_RANGE = _tp(
    "unmap_hva_range", "kvm:kvm_unmap_hva_range",
    "mmu-notifier invalidation of a host virtual range (COW break, munmap, ...)",
    [("start", "u64", "host virtual start", None),
     ("end", "u64", "host virtual end", None)],
    rate=INVALIDATION_RATE,
)

MMIO = _tp(
    "mmio", "kvm:kvm_mmio",
    "an MMIO access KVM could not satisfy from a memslot",
    [("type", "u32", "0 unsatisfied-read, 1 read, 2 write", None),
     ("len", "u32", "access length", None),
     ("gpa", "u64", "guest physical address", None),
     ("val", "u64", "value", None)],
    rate=MMIO_RATE,
    where=("gpa", "byte"),
)

USERSPACE_EXIT = _tp(
    "userspace_exit", "kvm:kvm_userspace_exit",
    "KVM_RUN returned to the VMM: exit reason, or errno",
    [("reason", "u32", "KVM_EXIT_* reason", None),
     ("errno", "s32", "negative errno when KVM_RUN failed", None)],
    rate=EXIT_RATE,
)

def _slot(name, member, doc, ctype="u64", arg="PT_REGS_PARM3(ctx)"):
    """A field read from the struct kvm_memory_slot a probe's argument points to."""
    return Field(name, ctype, doc, arg, btf=("kvm_memory_slot", member))


def _vma(name, member, doc):
    """A field of the struct vm_area_struct a function returned."""
    return Field(name, "u64", doc, "PT_REGS_RC(ctx)", btf=("vm_area_struct", member))


# Every function kvmtrace return-probes returns int: the upper half of the
# return register is not part of the value, so sign-extend the low 32 bits.
RET = Field("ret", "s64", "return value (-errno on failure)", "(s64)(s32)PT_REGS_RC(ctx)",
            at_return=True)
EXIT_TS = Field("exit_ts", "u64", "CLOCK_MONOTONIC ns at return", "bpf_ktime_get_ns()",
                at_return=True)

# kvm_arch_prepare_memory_region's slot: ``new``, or ``old`` for a delete (new is
# NULL then, 5.17+: a delete's row used to read as zeros)
_PREP_SLOT = "(PT_REGS_PARM3(ctx) ? PT_REGS_PARM3(ctx) : PT_REGS_PARM2(ctx))"

PREPARE_REGION = Event(
    "prepare_region",
    "kvm_arch_prepare_memory_region (5.17+ signature: kvm, old, new, change): the "
    "slot KVM is about to install (the one it deletes, for a delete), the change, and "
    "the arch's verdict",
    (
        Field("change", "u32", "enum kvm_mr_change: 0 create, 1 delete, 2 move, 3 flags-only",
              "PT_REGS_PARM4(ctx)"),
        _slot("base_gfn", "base_gfn", "first guest frame of the slot", arg=_PREP_SLOT),
        _slot("npages", "npages", "pages in the slot", arg=_PREP_SLOT),
        _slot("hva", "userspace_addr", "userspace address of the slot", arg=_PREP_SLOT),
        _slot("flags", "flags", "KVM_MEM_* flags of the slot", ctype="u32", arg=_PREP_SLOT),
        _slot("slot_id", "id", "slot id", ctype="s16", arg=_PREP_SLOT),
        _slot("as_id", "as_id", "address space id", ctype="u16", arg=_PREP_SLOT),
        RET, EXIT_TS,
    ),
    kprobe="kvm_arch_prepare_memory_region", wakeup=True, rate=MEMSLOT_RATE,
)

PREPARE_VMA = Event(
    "prepare_vma",
    "each VMA kvm_arch_prepare_memory_region looked up (find_vma_intersection's "
    "result): flags and page protection as the kernel holds them",
    (
        _vma("vm_start", "vm_start", "VMA start"),
        _vma("vm_end", "vm_end", "VMA end"),
        _vma("vm_flags", "vm_flags", "vm_flags (VM_PFNMAP, VM_IO, ... per kernel version)"),
        _vma("vm_page_prot", "vm_page_prot", "pgprot bits (arm64 AttrIndx in [4:2]; x86 PAT)"),
    ),
    kprobe="find_vma_intersection", inside="prepare_region", on_return=True, rate=MEMSLOT_RATE,
)

FAULT_HANDLER_X86 = Event(
    "fault_handler",
    "the arch's page-fault handler, entry to return: service time and result",
    (Field("addr", "u64", "faulting address (x86: cr2_or_gpa)", "PT_REGS_PARM2(ctx)"),
     Field("error_code", "u64", "x86 error code", "PT_REGS_PARM3(ctx)"),
     RET, EXIT_TS),
    kprobe="kvm_mmu_page_fault", rate=FAULT_RATE,
)

# -- arm64 stage 2 (kprobes; docs/arm64-probe-points.md has the signatures) --

S2_MAP = Event(
    "s2_map",
    "kvm_pgtable_stage2_map(pgt, addr, size, phys, prot, ...): a stage-2 mapping "
    "installed, with its kvm_pgtable_prot (decoded with the running kernel's enum)",
    (Field("ipa", "u64", "guest physical address", "PT_REGS_PARM2(ctx)"),
     Field("size", "u64", "mapping size (4K, 2M block, ...)", "PT_REGS_PARM3(ctx)"),
     Field("phys", "u64", "host physical address", "PT_REGS_PARM4(ctx)"),
     Field("prot", "u64", "enum kvm_pgtable_prot bits", "PT_REGS_PARM5(ctx)"),
     RET, EXIT_TS),
    kprobe="kvm_pgtable_stage2_map", where=("ipa", "byte"), rate=FAULT_RATE,
)

S2_RELAX = Event(
    "s2_relax",
    "kvm_pgtable_stage2_relax_perms(pgt, addr, prot[, flags]): permissions of an "
    "existing mapping widened (memory type unchanged)",
    (Field("ipa", "u64", "guest physical address", "PT_REGS_PARM2(ctx)"),
     Field("prot", "u64", "enum kvm_pgtable_prot bits", "PT_REGS_PARM3(ctx)"),
     RET, EXIT_TS),
    kprobe="kvm_pgtable_stage2_relax_perms", where=("ipa", "byte"), rate=FAULT_RATE // 5,
)

GUEST_ABORT = Event(
    "guest_abort",
    "kvm_handle_guest_abort(vcpu), entry to return: the whole stage-2 abort's "
    "service time and result (1 = resume the guest, < 0 = KVM_RUN fails)",
    (RET, EXIT_TS),
    kprobe="kvm_handle_guest_abort", rate=FAULT_RATE,
)

USER_MEM_ABORT = Event(
    "user_mem_abort",
    "user_mem_abort, entry to return (an out-of-line symbol from 7.1): its errno "
    "names the rule that refused a fault (-EFAULT, -ENOEXEC)",
    (RET, EXIT_TS),
    kprobe="user_mem_abort", rate=FAULT_RATE // 5,
)

GUEST_FAULT = _tp(
    "guest_fault", "kvm:kvm_guest_fault",
    "arm64 stage-2 abort taken: the guest PC, ESR_EL2, FAR_EL2 and IPA",
    [("vcpu_pc", "u64", "guest PC", None),
     ("esr", "u64", "ESR_EL2 (syndrome)", "args->hsr"),
     ("far", "u64", "FAR_EL2", "args->hxfar"),
     ("ipa", "u64", "faulting IPA", None)],
    rate=FAULT_RATE,
    where=("ipa", "byte"),
)

EVENTS: dict[str, Event] = {e.name: e for e in (
    MEMSLOT, VM_IOCTL, PROC_EXIT, PT_WALK, SPTE_REQUESTED, SET_SPTE, TDP_SPTE_CHANGED,
    FAST_PAGE_FAULT, PAGE_FAULT, MMIO_PAGE_FAULT, UNMAP_HVA_RANGE, MMIO,
    USERSPACE_EXIT, PREPARE_REGION, PREPARE_VMA, FAULT_HANDLER_X86,
    S2_MAP, S2_RELAX, GUEST_ABORT, USER_MEM_ABORT, GUEST_FAULT,
)}

# ioctl numbers the BPF side filters on (their values: kvmtrace/kvmapi.py).
KVM_IOCTLS = {name: getattr(kvmapi, name) for name in (
    "KVM_CREATE_VM", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION",
    "KVM_SET_USER_MEMORY_REGION2", "KVM_RUN")}
