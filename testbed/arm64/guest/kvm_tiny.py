"""A tiny KVM guest for the emulated arm64 host, from Python ioctls only.

The vCPU starts at EL1 with the MMU off and runs a few hand-assembled
instructions: one store to each of 16 RAM pages, one store to the ivshmem BAR
through a memslot backed by resource2 (uncached mmap) and one through
resource2_wc (write-combine mmap), then a store to an unmapped IPA, which
exits to userspace as KVM_EXIT_MMIO. Each first touch is a stage-2 fault.
"""
import ctypes
import fcntl
import mmap
import os
import struct

KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CREATE_VCPU = 0xAE41
KVM_RUN = 0xAE80
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_ARM_PREFERRED_TARGET = 0x8020AEAF
KVM_ARM_VCPU_INIT = 0x4020AEAE
KVM_SET_ONE_REG = 0x4010AEAC
REG_PC = 0x6030000000100040      # KVM_REG_ARM64 | SIZE_U64 | ARM_CORE | regs.pc/4
KVM_EXIT_MMIO = 6
EXITS = {0: "UNKNOWN", 2: "IO", 6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY",
         17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT"}

RAM_IPA, RAM_SIZE = 0x10000000, 0x20000         # code page + 16 data pages
DATA_IPA = 0x10010000
BAR_UC_IPA, BAR_WC_IPA = 0x30000000, 0x30200000
MMIO_IPA = 0x20000000

CODE = [
    0xD2A20020,  # movz x0, #0x1001, lsl #16      x0 = 0x10010000
    0xD2800201,  # movz x1, #16
    0xF9000001,  # loop: str x1, [x0]
    0x91400400,  # add  x0, x0, #0x1000
    0xF1000421,  # subs x1, x1, #1
    0x54FFFFA1,  # b.ne loop
    0xD2A60003,  # movz x3, #0x3000, lsl #16      BAR via resource2
    0xF9000061,  # str  x1, [x3]
    0xD2A60404,  # movz x4, #0x3020, lsl #16      BAR via resource2_wc
    0xF9000081,  # str  x1, [x4]
    0xD2A40002,  # movz x2, #0x2000, lsl #16      unmapped: KVM_EXIT_MMIO
    0xF9000041,  # str  x1, [x2]
    0x14000000,  # b .
]

MADV_NOHUGEPAGE = 15
libc = ctypes.CDLL(None, use_errno=True)


def region_of(ipa):
    if RAM_IPA <= ipa < DATA_IPA:
        return "code page"
    if DATA_IPA <= ipa < RAM_IPA + RAM_SIZE:
        return "RAM data"
    if BAR_UC_IPA <= ipa < BAR_WC_IPA:
        return "BAR resource2"
    if BAR_WC_IPA <= ipa < BAR_WC_IPA + 0x200000:
        return "BAR resource2_wc"
    return f"ipa {ipa:#x}"


def _addr(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _slot(vm, slot, ipa, size, hva):
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", slot, 0, ipa, size, hva))


def run(bar_dev=None):
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    keep = []
    try:
        try:
            cap = str(fcntl.ioctl(vm, KVM_CHECK_EXTENSION, 243))
        except OSError as e:
            cap = f"-1 ({os.strerror(e.errno)})"
        ram = mmap.mmap(-1, RAM_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        keep.append(ram)
        libc.madvise(ctypes.c_void_p(_addr(ram)), ctypes.c_size_t(RAM_SIZE), MADV_NOHUGEPAGE)
        ram[0:4 * len(CODE)] = struct.pack(f"<{len(CODE)}I", *CODE)
        _slot(vm, 0, RAM_IPA, RAM_SIZE, _addr(ram))
        if bar_dev:
            for n, (res, ipa) in enumerate((("resource2", BAR_UC_IPA), ("resource2_wc", BAR_WC_IPA))):
                fd = os.open(f"{bar_dev}/{res}", os.O_RDWR)
                size = os.fstat(fd).st_size
                m = mmap.mmap(fd, size)
                keep.append(m)
                os.close(fd)
                _slot(vm, 1 + n, ipa, size, _addr(m))
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        init = bytearray(32)
        fcntl.ioctl(vm, KVM_ARM_PREFERRED_TARGET, init)
        fcntl.ioctl(vcpu, KVM_ARM_VCPU_INIT, bytes(init))
        pc = ctypes.c_uint64(RAM_IPA)
        fcntl.ioctl(vcpu, KVM_SET_ONE_REG, struct.pack("<QQ", REG_PC, ctypes.addressof(pc)))
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        kr = mmap.mmap(vcpu, run_size)
        keep.append(kr)
        res = {"cap243": cap}
        for _ in range(8):
            fcntl.ioctl(vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("<I", kr, 8)[0]
            res["exit"] = EXITS.get(reason, str(reason))
            if reason == KVM_EXIT_MMIO:
                res["mmio_addr"] = struct.unpack_from("<Q", kr, 32)[0]
                break
            if reason not in (0,):
                break
        written = sum(1 for i in range(16) if struct.unpack_from("<Q", ram, 0x10000 + 4096 * i)[0])
        res["ram_pages_written"] = written
        os.close(vcpu)
        return res
    finally:
        os.close(vm)
        os.close(kvm)
