"""x86-64 specifics of the test VMM: registers, page tables, guest code.

Why the guest runs the way it does: on a KVM-PVM host (shadow paging), guest
code at CPL0 or in real mode is executed by KVM's instruction emulator and
never takes a shadow page fault. 64-bit code at CPL3 runs natively, so each
first touch of a guest page is a real shadow page fault, which is what the
tracer is meant to see. So the vCPU starts directly in 64-bit long mode at
CPL3 (CS 0x33 / data 0x2b, DPL 3) with host-built 4-level identity page tables
(VA == GPA, 4 KiB PTEs, or 2 MiB PDEs for a slot asked to use them, U/S
set on every level) and RFLAGS.IOPL=3 so `out`
reaches the VMM as KVM_EXIT_IO. No GDT/IDT exist in guest memory: the hidden
segment state comes from KVM_SET_SREGS, and nothing may raise an exception
(`hlt` at CPL3 would #GP and triple-fault without an IDT).

On a VMX/SVM host the same guest also runs (natively or under EPT/NPT); only
the number of faults differs, which faults.expected_faults describes. Measured
on an SVM + NPT host (testbed/x86: QEMU TCG, -cpu EPYC,+svm,+npt, kvm_amd
npt=Y, TDP MMU), 6.1 and 7.3: this CPL3 guest runs unchanged, and every
guest-physical page it reaches takes a real NPT fault, the page-table pages
of its walks included (walked_tables()).

arm64.py is the arm64 counterpart; everything else (scenario, backings,
VMM loop, report) is shared through the small interface at the bottom
(`X86Arch`, `arm64.Arm64Arch`).
"""

import ctypes
import os
import struct

from kvmtrace.kvmapi import _IOR, _IOW, _IOWR

from .kvmcall import ioctl, open_kvm

ARCH = "x86_64"
PAGE_SIZE = 4096

# --------------------------------------------------------------------------
# KVM uAPI: x86 registers (arch/x86/include/uapi/asm/kvm.h), which only the
# test VMM uses (the shared ABI is kvmtrace.kvmapi)


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags").split()]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16)] + [
        (name, ctypes.c_uint8)
        for name in "type present dpl db s l g avl unusable padding".split()]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = (
        [(name, kvm_segment) for name in "cs ds es fs gs ss tr ldt".split()]
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + [(name, ctypes.c_uint64) for name in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
        + [("interrupt_bitmap", ctypes.c_uint64 * 4)]
    )


assert ctypes.sizeof(kvm_regs) == 144
assert ctypes.sizeof(kvm_sregs) == 312

class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                "function index flags eax ebx ecx edx".split()] + [
        ("padding", ctypes.c_uint32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    """The header; the entries follow it (cpuid_buffer())."""
    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


assert ctypes.sizeof(kvm_cpuid_entry2) == 40

KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, kvm_cpuid2)
KVM_SET_CPUID2 = _IOW(0x90, kvm_cpuid2)
KVM_GET_REGS = _IOR(0x81, kvm_regs)
KVM_SET_REGS = _IOW(0x82, kvm_regs)
KVM_GET_SREGS = _IOR(0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(0x84, kvm_sregs)

# control registers for 64-bit paging
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 31)
CR0_LONG = CR0_PG | CR0_AM | CR0_WP | CR0_NE | CR0_ET | CR0_MP | CR0_PE  # 0x80050033
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_FIXED = 1 << 1
RFLAGS_IOPL3 = 3 << 12

USER_CS = 0x30 | 3  # selector index 6, RPL 3
USER_DS = 0x28 | 3  # selector index 5, RPL 3

# --------------------------------------------------------------------------
# page tables

PTE_P, PTE_W, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
PTE_FLAGS = PTE_P | PTE_W | PTE_US  # A/D left clear: KVM sets them (and traps the first write)


def page_table_pages(gpa_pages, huge_frames=()):
    """How many 4 KiB table pages identity-mapping the given GPA pages need.

    gpa_pages: 4 KiB pages (GPA >> 12) mapped by PTEs; huge_frames: 2 MiB
    frames (GPA >> 21) mapped by PDEs with PS=1 (no page table below them).
    """
    pages = set(gpa_pages)
    frames = set(huge_frames)
    return (1 + len({p >> 27 for p in pages} | {f >> 18 for f in frames})
            + len({p >> 18 for p in pages} | {f >> 9 for f in frames})
            + len({p >> 9 for p in pages}))


def build_page_tables(memory, base_gpa, table_gpas, gpa_pages, huge_frames=()):
    """Write 4-level identity tables for `gpa_pages` (GPA >> 12) into memory.

    huge_frames (GPA >> 21) are mapped by 2 MiB PDEs (PS=1), A/D clear like
    the PTEs; none of them may hold a page of gpa_pages.
    memory: writable buffer holding guest memory from base_gpa on;
    table_gpas: iterator of free page GPAs in that buffer for the tables.
    Returns (cr3, [GPA of each table page]).
    """
    tables = {}  # (level, index) -> table page GPA
    used = []

    def table(level, index):
        if (level, index) not in tables:
            gpa = next(table_gpas)
            off = gpa - base_gpa
            memory[off:off + PAGE_SIZE] = bytes(PAGE_SIZE)
            tables[level, index] = gpa
            used.append(gpa)
        return tables[level, index]

    def set_entry(table_gpa, slot, value):
        struct.pack_into("<Q", memory, table_gpa - base_gpa + 8 * slot, value)

    pml4 = table(4, 0)
    for page in sorted(set(gpa_pages)):
        pdpt = table(3, page >> 27)
        pd = table(2, page >> 18)
        pt = table(1, page >> 9)
        set_entry(pml4, (page >> 27) & 511, pdpt | PTE_FLAGS)
        set_entry(pdpt, (page >> 18) & 511, pd | PTE_FLAGS)
        set_entry(pd, (page >> 9) & 511, pt | PTE_FLAGS)
        set_entry(pt, page & 511, (page << 12) | PTE_FLAGS)
    small_frames = {page >> 9 for page in gpa_pages}
    for frame in sorted(set(huge_frames)):
        if frame in small_frames:
            raise ValueError(f"2 MiB frame {frame << 21:#x} is also mapped with 4 KiB pages")
        pdpt = table(3, frame >> 18)
        pd = table(2, frame >> 9)
        set_entry(pml4, (frame >> 18) & 511, pdpt | PTE_FLAGS)
        set_entry(pdpt, (frame >> 9) & 511, pd | PTE_FLAGS)
        set_entry(pd, frame & 511, (frame << 21) | PTE_FLAGS | PTE_PS)
    return pml4, used


def walked_tables(tables, gpa_pages, huge_frames, accessed_pages, accessed_frames=()):
    """The table pages the CPU walks to reach the accessed pages (GPA >> 12 each).

    tables: build_page_tables()'s list of table GPAs (in the order it created
    them), for the same gpa_pages and huge_frames; accessed_pages: 4 KiB pages
    (GPA >> 12) the guest touches through PTEs; accessed_frames: 2 MiB frames
    (GPA >> 21) it touches through PDEs. On a TDP host (NPT / EPT) every table
    page on such a walk is itself a guest-physical access (the walker reads it
    and sets its Accessed bits), so it takes a fault of its own.
    """
    order = [(4, 0)]
    for page in sorted(set(gpa_pages)):
        for key in ((3, page >> 27), (2, page >> 18), (1, page >> 9)):
            if key not in order:
                order.append(key)
    small_frames = {page >> 9 for page in gpa_pages}
    for frame in sorted(set(huge_frames) - small_frames):
        for key in ((3, frame >> 18), (2, frame >> 9)):
            if key not in order:
                order.append(key)
    gpa = dict(zip(order, tables))
    walked = {(4, 0)} if accessed_pages or accessed_frames else set()
    for page in accessed_pages:
        walked |= {(3, page >> 27), (2, page >> 18), (1, page >> 9)}
    for frame in accessed_frames:
        walked |= {(3, frame >> 18), (2, frame >> 9)}
    return sorted(gpa[k] // PAGE_SIZE for k in walked)


# --------------------------------------------------------------------------
# guest code generation
#
# Register use: rdi = current page, rcx = pages left, rax = scratch,
# r8 = write tag, r11 = return address of an execute stub.

DATA_OFFSET = 0  # where in a page reads and writes land
EXEC_STUB_OFFSET = 0x800  # where an execute stub sits in its page
EXEC_STUB = b"\x41\xff\xe3"  # jmp r11: back to the loop, no stack used
WRITE_TAG = 0x4B56_5400_0000_0000  # "KVT" in the top bytes; the written value is TAG | gpa


def written_value(gpa):
    """The qword the guest stores at DATA_OFFSET of a page it writes."""
    return WRITE_TAG | gpa


def _mov_rdi(imm):
    return b"\x48\xbf" + struct.pack("<Q", imm)


def _mov_rcx(imm):
    return b"\x48\xb9" + struct.pack("<Q", imm)


_LOAD = b"\x48\x8b\x87" + struct.pack("<i", DATA_OFFSET)  # mov rax, [rdi+DATA_OFFSET]
_STORE = (b"\x48\x89\xf8"  # mov rax, rdi
          + b"\x4c\x09\xc0"  # or rax, r8
          + b"\x48\x89\x87" + struct.pack("<i", DATA_OFFSET))  # mov [rdi+DATA_OFFSET], rax
_EXEC = (b"\x4c\x8d\x1d\x09\x00\x00\x00"  # lea r11, [rip+9]   (-> after jmp rax)
         + b"\x48\x8d\x87" + struct.pack("<i", EXEC_STUB_OFFSET)  # lea rax, [rdi+STUB]
         + b"\xff\xe0")  # jmp rax  -> stub: jmp r11
assert len(_EXEC) == 7 + 9

ACCESS_BODIES = {"r": _LOAD, "w": _STORE, "rw": _LOAD + _STORE, "x": _EXEC}


def gen_program(steps, done_port, done_value=0):
    """Position-independent code doing `steps`, then `out done_port`.

    steps: iterable of (gpa of first page, npages, access) with access one
    of r / w / rw / x; each page is touched once per step, in order.
    """
    code = bytearray(b"\x49\xb8" + struct.pack("<Q", WRITE_TAG))  # mov r8, WRITE_TAG
    for gpa, npages, access in steps:
        if npages <= 0:
            continue
        code += _mov_rdi(gpa) + _mov_rcx(npages)
        top = len(code)
        code += ACCESS_BODIES[access]
        code += b"\x48\x81\xc7" + struct.pack("<i", PAGE_SIZE)  # add rdi, 4096
        code += b"\x48\xff\xc9"  # dec rcx
        code += b"\x0f\x85" + struct.pack("<i", top - (len(code) + 6))  # jnz top
    # `out imm8, al`: the form PVM's emulator turns into KVM_EXIT_IO (the
    # `out dx, al` form ended in a triple fault on the PVM host)
    assert 0 <= done_port < 256
    code += b"\xb0" + bytes([done_value & 0xFF])  # mov al, value
    code += b"\xe6" + bytes([done_port])  # out done_port, al
    code += b"\xeb\xfe"  # jmp $ (never resumed)
    return bytes(code)


# --------------------------------------------------------------------------
# vCPU state


def _user_segment(seg, selector, type_, long_mode):
    seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
    seg.type, seg.present, seg.dpl, seg.s, seg.g = type_, 1, 3, 1, 1
    seg.l, seg.db = (1, 0) if long_mode else (0, 1)
    seg.avl = seg.unusable = 0


def cpuid_buffer(nent):
    class buf(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", kvm_cpuid_entry2 * nent)]
    b = buf()
    b.nent = nent
    return b


_supported_cpuid = []


def supported_cpuid():
    """KVM_GET_SUPPORTED_CPUID of /dev/kvm (read once per process)."""
    if not _supported_cpuid:
        fd = open_kvm()
        try:
            b = cpuid_buffer(256)
            ioctl(fd, KVM_GET_SUPPORTED_CPUID, b)
            _supported_cpuid.append(b)
        finally:
            os.close(fd)
    return _supported_cpuid[0]


def set_cpuid(vcpu_fd):
    """Give the vCPU the CPUID KVM supports, as every VMM does.

    Needed for long mode on newer kernels: 7.3.4 checks KVM_SET_SREGS'
    CR4.PAE and EFER.LME/LMA against the vCPU's CPUID and refuses them
    (EINVAL) on a vCPU with none; 6.1 did not check.
    """
    ioctl(vcpu_fd, KVM_SET_CPUID2, supported_cpuid())


def setup_vcpu(vcpu_fd, cr3, rip, rsp):
    """Put a fresh vCPU in 64-bit long mode at CPL3 with paging on.

    Order matters on PVM: sregs (CS.DPL=3) go in before the first KVM_RUN so
    the vCPU starts in user mode. CPUID goes in before the sregs.
    """
    set_cpuid(vcpu_fd)
    sregs = kvm_sregs()
    ioctl(vcpu_fd, KVM_GET_SREGS, sregs)
    _user_segment(sregs.cs, USER_CS, 0xB, True)  # execute/read, accessed
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _user_segment(seg, USER_DS, 0x3, False)  # read/write, accessed
    sregs.cr0 = CR0_LONG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    ioctl(vcpu_fd, KVM_SET_SREGS, sregs)
    regs = kvm_regs()
    regs.rip, regs.rsp, regs.rflags = rip, rsp, RFLAGS_FIXED | RFLAGS_IOPL3
    ioctl(vcpu_fd, KVM_SET_REGS, regs)


def get_rip(vcpu_fd):
    regs = kvm_regs()
    ioctl(vcpu_fd, KVM_GET_REGS, regs)
    return regs.rip


# the loads and stores of ACCESS_BODIES: mov rax, [rdi+disp32] / mov [rdi+disp32], rax
_DATA_INSNS = (_LOAD, _STORE[-7:])


def refusal(vcpu_fd, how, exc=None):
    """What KVM refused and where the guest can go on (KVM_RUN failed).

    The vCPU stopped at the faulting instruction: the fetch of an execute
    stub (rip == rdi + EXEC_STUB_OFFSET; go on at r11, as the stub would) or
    a load / store of DATA_OFFSET in rdi's page (7 bytes; go on after it).
    Returns {"access", "gpa", "pc", "resume"} (VA == GPA), or None.
    """
    if how != "kvm_run":
        return None
    regs = kvm_regs()
    ioctl(vcpu_fd, KVM_GET_REGS, regs)
    if regs.rip == regs.rdi + EXEC_STUB_OFFSET:
        return {"access": "x", "gpa": regs.rip, "pc": regs.rip, "resume": regs.r11}
    return {"access": "data", "gpa": regs.rdi + DATA_OFFSET, "pc": regs.rip,
            "resume": regs.rip + len(_DATA_INSNS[0])}


def resume(vcpu_fd, how, target):
    """Go on at `target` after a refusal (see refusal())."""
    regs = kvm_regs()
    ioctl(vcpu_fd, KVM_GET_REGS, regs)
    regs.rip = target
    ioctl(vcpu_fd, KVM_SET_REGS, regs)


# --------------------------------------------------------------------------
# the interface the VMM uses


class X86Arch:
    """What vmm.py needs from an architecture."""

    name = ARCH
    page_size = PAGE_SIZE
    exec_stub = EXEC_STUB
    exec_stub_offset = EXEC_STUB_OFFSET
    data_offset = DATA_OFFSET
    done_port = 0x10  # `out` here -> KVM_EXIT_IO -> the run is complete

    page_table_pages = staticmethod(page_table_pages)
    build_page_tables = staticmethod(build_page_tables)
    walked_tables = staticmethod(walked_tables)
    setup_vcpu = staticmethod(setup_vcpu)
    get_pc = staticmethod(get_rip)
    refusal = staticmethod(refusal)
    resume = staticmethod(resume)
    written_value = staticmethod(written_value)

    def gen_program(self, steps, vcpu_index):
        return gen_program(steps, self.done_port, vcpu_index)

    def is_done(self, kind, addr, write):
        """Is this exit (kind "io" or "mmio", port or GPA) the guest saying done?"""
        return kind == "io" and addr == self.done_port and write
