"""arm64 specifics of the test VMM: vCPU setup, guest code, exits.

How the guest runs: at EL1 (EL1h, DAIF masked) with the stage-1 MMU off.
Why not stage-1 identity tables: with the MMU off every stage-2 fault comes
from the guest's own accesses (a stage-1 table walk would add stage-2 faults
on the table pages, one more thing for the fault rule), there is no
TCR/MAIR/SCTLR set-up that could go wrong under nested TCG, and stage-2 is
what the tracer records anyway. The cost: with the MMU off, guest data
accesses are Device-nGnRnE at stage 1 and instruction fetches Normal
Non-cacheable, so the attributes the guest finally gets are the combination
of those with KVM's stage-2 choice (Device wins); the stage-2 attributes,
which kvmtrace records, are KVM's alone. The guest only makes aligned 8-byte
accesses (Device memory faults on unaligned ones). KVM cleans the data cache
to the PoC when it maps a page cacheable at stage 2, so code and execute
stubs the VMM wrote through its cacheable mapping reach the non-cacheable
guest fetches.

Exits: the guest stores to IPAs outside every memslot, which KVM turns into
KVM_EXIT_MMIO (only plain `str Xt, [Xn]` is used: no writeback, so the abort
syndrome is valid and KVM can emulate it).
  EXIT_GPA            the guest is done (the stored value is the vCPU index),
                      the counterpart of x86's `out` to the done port;
  EXIT_GPA + 0x100 + 8*i   the guest took exception vector i (VBAR_EL1 = 0,
                      the vectors live in page 0 of the system slot); the
                      stored value is ESR_EL1. The VMM resumes the vCPU only
                      for an abort on a step marked expect="refused" (e.g.
                      the instruction abort 6.1 injects for an execute from
                      a PCI BAR), after setting x9 to where the step goes on;
                      the vector then returns with `br x9`.

Refusals that fail KVM_RUN instead (e.g. EFAULT for a guest write to the
read-only [vvar]) are moved past the same way: `refusal()` works out which
access it was from the registers (pc == x3: the fetch of an execute stub,
go on at x30, the return address of the step's `blr`; else the data access
at x0, go on after the faulting instruction).

Execute steps: `add x3, x0, #EXEC_STUB_OFFSET; blr x3` into the page, whose
stub is `ret`.

The interface vmm.py uses is the class at the bottom (`Arm64Arch`), the
counterpart of x86.X86Arch.
"""

import ctypes
import ctypes.util
import mmap
import platform
import struct

from kvmtrace.kvmapi import _IOR, _IOW

from .kvmcall import ioctl

ARCH = "aarch64"
PAGE_SIZE = 4096

# --------------------------------------------------------------------------
# KVM uAPI (arch/arm64/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h): the
# arm64-only ioctls and register ids only the test VMM issues (the shared ABI
# is kvmtrace.kvmapi)


class kvm_vcpu_init(ctypes.Structure):
    _fields_ = [("target", ctypes.c_uint32), ("features", ctypes.c_uint32 * 7)]


class kvm_one_reg(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


assert ctypes.sizeof(kvm_vcpu_init) == 32
assert ctypes.sizeof(kvm_one_reg) == 16

KVM_GET_ONE_REG = _IOW(0xAB, kvm_one_reg)
KVM_SET_ONE_REG = _IOW(0xAC, kvm_one_reg)
KVM_ARM_VCPU_INIT = _IOW(0xAE, kvm_vcpu_init)
KVM_ARM_PREFERRED_TARGET = _IOR(0xAF, kvm_vcpu_init)

assert KVM_SET_ONE_REG == 0x4010AEAC and KVM_GET_ONE_REG == 0x4010AEAB
assert KVM_ARM_VCPU_INIT == 0x4020AEAE and KVM_ARM_PREFERRED_TARGET == 0x8020AEAF

KVM_REG_ARM64 = 0x6000000000000000
KVM_REG_SIZE_U64 = 0x0030000000000000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16


def core_reg(byte_offset):
    """Register id of a 64-bit field of struct kvm_regs (offset in bytes)."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (byte_offset // 4)


def sys_reg(op0, op1, crn, crm, op2):
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
            | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2)


# struct kvm_regs: user_pt_regs {regs[31], sp, pc, pstate}, sp_el1, elr_el1, ...
REG_X = [core_reg(8 * n) for n in range(31)]
REG_SP = core_reg(248)
REG_PC = core_reg(256)
REG_PSTATE = core_reg(264)
REG_SP_EL1 = core_reg(272)
REG_ELR_EL1 = core_reg(280)
REG_VBAR_EL1 = sys_reg(3, 0, 12, 0, 0)
REG_ESR_EL1 = sys_reg(3, 0, 5, 2, 0)
REG_FAR_EL1 = sys_reg(3, 0, 6, 0, 0)
assert REG_PC == 0x6030000000100040 and REG_PSTATE == 0x6030000000100042
assert REG_VBAR_EL1 == 0x603000000013C600

PSR_MODE_EL1H = 0x5
PSR_DAIF = 0xF << 6
PSTATE_EL1H_MASKED = PSR_DAIF | PSR_MODE_EL1H  # 0x3c5, KVM's reset value too

# --------------------------------------------------------------------------
# a tiny A64 encoder (hand-encoded words; tests hold them against binutils)

XZR = 31
COND = {"eq": 0, "ne": 1, "hs": 2, "lo": 3, "mi": 4, "pl": 5, "hi": 8, "ls": 9,
        "ge": 10, "lt": 11, "gt": 12, "le": 13, "al": 14}


def _reg(r):
    if not 0 <= r <= 31:
        raise ValueError(f"register x{r}")
    return r


def movz(rd, imm16, shift=0):
    """MOVZ Xd, #imm16, LSL #shift (shift 0/16/32/48)."""
    assert 0 <= imm16 <= 0xFFFF and shift in (0, 16, 32, 48)
    return 0xD2800000 | (shift // 16) << 21 | imm16 << 5 | _reg(rd)


def movk(rd, imm16, shift=0):
    """MOVK Xd, #imm16, LSL #shift."""
    assert 0 <= imm16 <= 0xFFFF and shift in (0, 16, 32, 48)
    return 0xF2800000 | (shift // 16) << 21 | imm16 << 5 | _reg(rd)


def mov_imm(rd, value):
    """Words loading a 64-bit constant: MOVZ for the lowest non-zero halfword, MOVK after."""
    value &= (1 << 64) - 1
    parts = [(value >> s & 0xFFFF, s) for s in (0, 16, 32, 48) if value >> s & 0xFFFF]
    if not parts:
        return [movz(rd, 0)]
    return [movz(rd, *parts[0])] + [movk(rd, *p) for p in parts[1:]]


def ldr(rt, rn, offset=0):
    """LDR Xt, [Xn, #offset] (unsigned offset, a multiple of 8)."""
    assert offset % 8 == 0 and 0 <= offset // 8 < 4096
    return 0xF9400000 | (offset // 8) << 10 | _reg(rn) << 5 | _reg(rt)


def str_(rt, rn, offset=0):
    """STR Xt, [Xn, #offset] (unsigned offset, a multiple of 8)."""
    assert offset % 8 == 0 and 0 <= offset // 8 < 4096
    return 0xF9000000 | (offset // 8) << 10 | _reg(rn) << 5 | _reg(rt)


def add_imm(rd, rn, imm12, shift12=False):
    """ADD Xd, Xn, #imm12 [, LSL #12]."""
    assert 0 <= imm12 < 4096
    return 0x91000000 | (1 << 22 if shift12 else 0) | imm12 << 10 | _reg(rn) << 5 | _reg(rd)


def subs_imm(rd, rn, imm12):
    """SUBS Xd, Xn, #imm12."""
    assert 0 <= imm12 < 4096
    return 0xF1000000 | imm12 << 10 | _reg(rn) << 5 | _reg(rd)


def orr(rd, rn, rm):
    """ORR Xd, Xn, Xm."""
    return 0xAA000000 | _reg(rm) << 16 | _reg(rn) << 5 | _reg(rd)


def b(offset):
    """B to pc + offset (bytes)."""
    assert offset % 4 == 0 and -(1 << 27) <= offset < (1 << 27)
    return 0x14000000 | (offset // 4) & 0x3FFFFFF


def b_cond(cond, offset):
    """B.cond to pc + offset (bytes)."""
    assert offset % 4 == 0 and -(1 << 20) <= offset < (1 << 20)
    return 0x54000000 | ((offset // 4) & 0x7FFFF) << 5 | COND[cond]


def br(rn):
    return 0xD61F0000 | _reg(rn) << 5


def blr(rn):
    return 0xD63F0000 | _reg(rn) << 5


def ret(rn=30):
    return 0xD65F0000 | _reg(rn) << 5


def mrs(rt, op0, op1, crn, crm, op2):
    """MRS Xt, S<op0>_<op1>_C<crn>_C<crm>_<op2>."""
    return (0xD5200000 | (op0 & 3) << 19 | op1 << 16 | crn << 12 | crm << 8 | op2 << 5
            | _reg(rt))


def mrs_esr_el1(rt):
    return mrs(rt, 3, 0, 5, 2, 0)


def mrs_ctr_el0(rt):
    return mrs(rt, 3, 3, 0, 0, 1)


NOP = 0xD503201F


def words(ws):
    return struct.pack(f"<{len(ws)}I", *ws)


# --------------------------------------------------------------------------
# guest code
#
# Register use: x0 = current page, x1 = pages left, x2 = scratch,
# x3 = execute stub address, x8 = write tag, x30 = return address of a stub,
# x9/x10 = exit address and value.

DATA_OFFSET = 0  # where in a page reads and writes land
EXEC_STUB_OFFSET = 0x800  # where an execute stub sits in its page
EXEC_STUB = words([ret()])  # back to the loop (x30 from the step's blr)
WRITE_TAG = 0x4B56_5400_0000_0000  # "KVT" in the top bytes; the written value is TAG | gpa
EXIT_GPA = 0x40_0000_0000  # 256 GiB: no memslot there (the VM's IPA space is 40 bits)
EXCEPTION_GPA = EXIT_GPA + 0x100  # + 8 * vector index
VECTOR_NAMES = [
    f"{src} {kind}"
    for src in ("current EL SP0", "current EL SPx", "lower EL AArch64", "lower EL AArch32")
    for kind in ("sync", "irq", "fiq", "serror")]
ESR_EC_NAMES = {0x00: "unknown", 0x01: "wfi/wfe", 0x0E: "illegal execution state",
                0x15: "svc", 0x18: "msr/mrs trap", 0x20: "instruction abort (lower EL)",
                0x21: "instruction abort", 0x22: "pc alignment", 0x24: "data abort (lower EL)",
                0x25: "data abort", 0x26: "sp alignment", 0x2F: "serror", 0x3C: "brk"}


def written_value(gpa):
    """The qword the guest stores at DATA_OFFSET of a page it writes."""
    return WRITE_TAG | gpa


ACCESS_BODIES = {
    "r": [ldr(2, 0, DATA_OFFSET)],
    "w": [orr(2, 0, 8), str_(2, 0, DATA_OFFSET)],
    "rw": [ldr(2, 0, DATA_OFFSET), orr(2, 0, 8), str_(2, 0, DATA_OFFSET)],
    "x": [add_imm(3, 0, EXEC_STUB_OFFSET), blr(3)],
}


def gen_program(steps, done_value=0):
    """Position-independent code doing `steps`, then a store to EXIT_GPA.

    steps: iterable of (gpa of first page, npages, access) with access one
    of r / w / rw / x; each page is touched once per step, in order.
    """
    code = mov_imm(8, WRITE_TAG)
    for gpa, npages, access in steps:
        if npages <= 0:
            continue
        code += mov_imm(0, gpa) + mov_imm(1, npages)
        top = len(code)
        code += ACCESS_BODIES[access]
        code.append(add_imm(0, 0, PAGE_SIZE >> 12, shift12=True))  # next page
        code.append(subs_imm(1, 1, 1))
        code.append(b_cond("ne", 4 * (top - len(code))))
    code += mov_imm(9, EXIT_GPA) + mov_imm(2, done_value) + [str_(2, 9), b(0)]
    return words(code)


def gen_vectors():
    """The exception vector table (16 entries of 0x80 bytes) for VBAR_EL1 = 0.

    Each entry reports ESR_EL1 by a store to EXCEPTION_GPA + 8 * index, then
    branches to x9, which the VMM sets before resuming (if it does).
    """
    table = bytearray()
    for i in range(16):
        entry = [mrs_esr_el1(9)] + mov_imm(10, EXCEPTION_GPA + 8 * i) + [str_(9, 10), br(9)]
        table += words(entry + [b(0)] * (32 - len(entry)))
    assert len(table) == 0x800
    return bytes(table)


def decode_esr(esr):
    """ESR_EL1 as the guest stored it. Only bits [31:0] are decoded: the
    injected aborts arrived sign-extended (0xffffffff86000010) on 6.1 under
    nested TCG, and ISS2 in [55:32] means nothing for these aborts."""
    low = esr & 0xFFFFFFFF
    ec = low >> 26 & 0x3F
    return {"esr": low, "esr_raw": esr, "ec": ec,
            "ec_name": ESR_EC_NAMES.get(ec, f"ec {ec:#x}"), "iss": low & 0x1FFFFFF,
            "fsc": low & 0x3F}


# --------------------------------------------------------------------------
# vCPU state


def get_reg(vcpu_fd, reg_id):
    val = ctypes.c_uint64()
    ioctl(vcpu_fd, KVM_GET_ONE_REG, kvm_one_reg(reg_id, ctypes.addressof(val)))
    return val.value


def set_reg(vcpu_fd, reg_id, value):
    val = ctypes.c_uint64(value)
    ioctl(vcpu_fd, KVM_SET_ONE_REG, kvm_one_reg(reg_id, ctypes.addressof(val)))


def preferred_target(vm_fd):
    init = kvm_vcpu_init()
    ioctl(vm_fd, KVM_ARM_PREFERRED_TARGET, init)
    return init.target


def init_vcpu(vm_fd, vcpu_fd, target=None):
    """KVM_ARM_VCPU_INIT with the VM's preferred target (or `target`)."""
    if target is None:
        target = preferred_target(vm_fd)
    ioctl(vcpu_fd, KVM_ARM_VCPU_INIT, kvm_vcpu_init(target))


def setup_vcpu(vcpu_fd, target, pc, sp):
    """KVM_ARM_VCPU_INIT, then EL1h with DAIF masked at `pc`, VBAR_EL1 = 0."""
    ioctl(vcpu_fd, KVM_ARM_VCPU_INIT, kvm_vcpu_init(target))
    set_reg(vcpu_fd, REG_PSTATE, PSTATE_EL1H_MASKED)
    set_reg(vcpu_fd, REG_SP_EL1, sp)
    set_reg(vcpu_fd, REG_VBAR_EL1, 0)
    set_reg(vcpu_fd, REG_PC, pc)


def get_pc(vcpu_fd):
    return get_reg(vcpu_fd, REG_PC)


# --------------------------------------------------------------------------
# the host CPU


def read_sysreg_el0(insn):
    """Run `<insn>; ret` (insn: an `mrs x0, <reg>`) from an executable page
    and return x0, or None off arm64. Linux traps and emulates EL0 reads of
    the ID registers (sanitised values) and may trap CTR_EL0."""
    if platform.machine() not in ("aarch64", "arm64"):
        return None
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None
    buf.write(words([insn, ret()]))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:  # written as data: make the instruction fetch see it
        libgcc = ctypes.CDLL(ctypes.util.find_library("gcc_s") or "libgcc_s.so.1")
        libgcc.__clear_cache(ctypes.c_void_p(addr), ctypes.c_void_p(addr + 8))
    except (OSError, AttributeError):
        pass
    return int(ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)())


def read_ctr_el0():
    """CTR_EL0 as EL0 reads it (DIC is bit 29), or None off arm64."""
    return read_sysreg_el0(mrs_ctr_el0(0))


# --------------------------------------------------------------------------
# the interface the VMM uses


class Arm64Arch:
    """What vmm.py needs from an architecture (see x86.X86Arch)."""

    name = ARCH
    page_size = PAGE_SIZE
    exec_stub = EXEC_STUB
    exec_stub_offset = EXEC_STUB_OFFSET
    data_offset = DATA_OFFSET
    exit_gpa = EXIT_GPA
    # no guest page tables: the MMU is off
    has_page_tables = False

    get_pc = staticmethod(get_pc)
    written_value = staticmethod(written_value)

    def __init__(self):
        self.target = None

    def vm_created(self, kvm_fd, vm_fd):
        """Called once after KVM_CREATE_VM: the vCPU target for KVM_ARM_VCPU_INIT."""
        self.target = preferred_target(vm_fd)

    @staticmethod
    def page_table_pages(gpa_pages, huge_frames=()):
        return 0

    @staticmethod
    def build_page_tables(memory, base_gpa, table_gpas, gpa_pages, huge_frames=()):
        return 0, []

    def page0(self):
        """Contents of system-slot page 0 (GPA 0): the exception vectors."""
        return gen_vectors()

    def setup_vcpu(self, vcpu_fd, cr3, pc, sp):
        setup_vcpu(vcpu_fd, self.target, pc, sp)

    def gen_program(self, steps, vcpu_index):
        return gen_program(steps, vcpu_index)

    def is_done(self, kind, addr, write):
        """Is this exit (kind "io" or "mmio", port or GPA) the guest saying done?"""
        return kind == "mmio" and addr == EXIT_GPA and write

    def exception_exit(self, gpa, write, data):
        """The guest's exception report if this MMIO exit is one, else None."""
        if not (write and EXCEPTION_GPA <= gpa < EXCEPTION_GPA + 16 * 8 and gpa % 8 == 0):
            return None
        vector = (gpa - EXCEPTION_GPA) // 8
        d = {"vector": vector, "vector_name": VECTOR_NAMES[vector]}
        d.update(decode_esr(data))
        return d

    def refusal(self, vcpu_fd, how, exc=None):
        """What KVM refused and where the guest can go on.

        how "kvm_run" (KVM_RUN failed; pc is the faulting instruction) or
        "guest_exception" (exc: exception_exit()'s dict; ELR_EL1 / FAR_EL1
        say where). Returns {"access": "x" or "data", "gpa", "pc", "resume"}
        (addresses are GPAs: the MMU is off), or None when it is neither.
        """
        x30 = get_reg(vcpu_fd, REG_X[30])
        if how == "kvm_run":
            pc, x3 = get_reg(vcpu_fd, REG_PC), get_reg(vcpu_fd, REG_X[3])
            if pc == x3:  # the fetch of an execute stub
                return {"access": "x", "gpa": pc, "pc": pc, "resume": x30}
            return {"access": "data", "gpa": get_reg(vcpu_fd, REG_X[0]) + DATA_OFFSET,
                    "pc": pc, "resume": pc + 4}
        elr, far = get_reg(vcpu_fd, REG_ELR_EL1), get_reg(vcpu_fd, REG_FAR_EL1)
        exc.update(elr=elr, far=far)
        if exc["ec"] in (0x20, 0x21):  # instruction abort: in the stub at elr
            return {"access": "x", "gpa": elr, "pc": elr, "resume": x30}
        if exc["ec"] in (0x24, 0x25):  # data abort at far
            return {"access": "data", "gpa": far, "pc": elr, "resume": elr + 4}
        return None

    def resume(self, vcpu_fd, how, target):
        """Go on at `target` after a refusal (see refusal())."""
        set_reg(vcpu_fd, REG_PC if how == "kvm_run" else REG_X[9], target)
