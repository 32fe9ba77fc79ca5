"""The smallest arm64 guest: a few stores, for the arm64 testbed's smoke check.

testbed/arm64/guest/smoke.py runs it inside the emulated arm64 host while a
bcc kprobe on kvm_pgtable_stage2_map watches, to show that stage-2 maps of
RAM and of a PCI BAR can be seen at all, before any of kvmtrace runs. The
full test VMM (vmm.py, scenario "bar") does the same and much more; this one
stays a dozen instructions so a failure is easy to read.

The vCPU starts at EL1 with the MMU off and stores to each of 16 RAM pages,
once to the ivshmem BAR through a memslot backed by resource2 (uncached
mmap) and once through resource2_wc (write-combine mmap), then to an
unmapped IPA, which exits to userspace as KVM_EXIT_MMIO. Each first touch is
a stage-2 fault: 19 stage-2 maps (the code page, 16 RAM pages, one per BAR
mapping) and a 20th fault for the MMIO store.

    python -m testvmm.tiny            # prints run()'s result as JSON (arm64 only)
"""

import ctypes
import json
import mmap
import os
import struct
import sys

from kvmtrace import kvmapi

from . import arm64
from .backings import MADV_NOHUGEPAGE, find_bar
from .kvmcall import ioctl, open_kvm

RAM_IPA, RAM_SIZE = 0x10000000, 0x20000  # code page + 16 data pages
DATA_IPA = RAM_IPA + 0x10000
DATA_PAGES = 16
BAR_UC_IPA, BAR_WC_IPA = 0x30000000, 0x30200000
BAR_SPAN = 0x200000  # IPA space given to each BAR mapping
MMIO_IPA = 0x20000000  # no memslot: KVM_EXIT_MMIO
MAX_RUNS = 8

# x0 = page, x1 = pages left (also the value stored), x2/x3/x4 = other addresses
_LOOP = [arm64.str_(1, 0), arm64.add_imm(0, 0, arm64.PAGE_SIZE >> 12, shift12=True),
         arm64.subs_imm(1, 1, 1)]
CODE = (arm64.mov_imm(0, DATA_IPA) + arm64.mov_imm(1, DATA_PAGES)
        + _LOOP + [arm64.b_cond("ne", -4 * len(_LOOP))]
        + arm64.mov_imm(3, BAR_UC_IPA) + [arm64.str_(1, 3)]  # the BAR via resource2
        + arm64.mov_imm(4, BAR_WC_IPA) + [arm64.str_(1, 4)]  # the BAR via resource2_wc
        + arm64.mov_imm(2, MMIO_IPA) + [arm64.str_(1, 2)]  # unmapped: KVM_EXIT_MMIO
        + [arm64.b(0)])

_libc = ctypes.CDLL(None, use_errno=True)


def region_of(ipa):
    """Which part of the guest an IPA is in (for naming stage-2 maps)."""
    if RAM_IPA <= ipa < DATA_IPA:
        return "code page"
    if DATA_IPA <= ipa < RAM_IPA + RAM_SIZE:
        return "RAM data"
    if BAR_UC_IPA <= ipa < BAR_WC_IPA:
        return "BAR resource2"
    if BAR_WC_IPA <= ipa < BAR_WC_IPA + BAR_SPAN:
        return "BAR resource2_wc"
    return f"ipa {ipa:#x}"


def _addr(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _set_slot(vm, slot, ipa, size, hva):
    region = kvmapi.kvm_userspace_memory_region(slot, 0, ipa, size, hva)
    ioctl(vm, kvmapi.KVM_SET_USER_MEMORY_REGION, region)


def _cap(fd, cap):
    """KVM_CHECK_EXTENSION's answer as text, "-1 (reason)" when it fails."""
    try:
        return str(ioctl(fd, kvmapi.KVM_CHECK_EXTENSION, cap))
    except OSError as e:
        return f"-1 ({os.strerror(e.errno)})"


def run(bar_dev=None):
    """Run the guest once; bar_dev: the ivshmem device's sysfs directory, or
    None for RAM only. Returns {"cap243": KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED
    on the VM fd, "exit": the last exit's name, "mmio_addr": its IPA if MMIO,
    "ram_pages_written": data pages holding the stored value}."""
    kvm = open_kvm()
    vm = ioctl(kvm, kvmapi.KVM_CREATE_VM, 0)
    keep = []  # the mappings stay until the process ends (KVM uses them)
    try:
        cap = _cap(vm, kvmapi.KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED)
        ram = mmap.mmap(-1, RAM_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        keep.append(ram)
        _libc.madvise(ctypes.c_void_p(_addr(ram)), ctypes.c_size_t(RAM_SIZE), MADV_NOHUGEPAGE)
        ram[0:4 * len(CODE)] = arm64.words(CODE)
        _set_slot(vm, 0, RAM_IPA, RAM_SIZE, _addr(ram))
        if bar_dev:
            for slot, (res, ipa) in enumerate((("resource2", BAR_UC_IPA),
                                               ("resource2_wc", BAR_WC_IPA)), 1):
                fd = os.open(f"{bar_dev}/{res}", os.O_RDWR)
                size = os.fstat(fd).st_size
                m = mmap.mmap(fd, size)
                keep.append(m)
                os.close(fd)
                _set_slot(vm, slot, ipa, size, _addr(m))
        vcpu = ioctl(vm, kvmapi.KVM_CREATE_VCPU, 0)
        arm64.init_vcpu(vm, vcpu)
        arm64.set_reg(vcpu, arm64.REG_PC, RAM_IPA)
        kr = mmap.mmap(vcpu, ioctl(kvm, kvmapi.KVM_GET_VCPU_MMAP_SIZE, 0))
        keep.append(kr)
        res = {"cap243": cap}
        for _ in range(MAX_RUNS):
            ioctl(vcpu, kvmapi.KVM_RUN, 0)
            reason = struct.unpack_from("<I", kr, kvmapi.RUN_EXIT_REASON)[0]
            res["exit"] = kvmapi.exit_reason_name(reason)
            if reason == kvmapi.KVM_EXIT_MMIO:
                res["mmio_addr"] = struct.unpack_from("<Q", kr, kvmapi.RUN_UNION)[0]
                break
            if reason != 0:  # KVM_EXIT_UNKNOWN: run again
                break
        base = DATA_IPA - RAM_IPA
        res["ram_pages_written"] = sum(
            1 for i in range(DATA_PAGES)
            if struct.unpack_from("<Q", ram, base + arm64.PAGE_SIZE * i)[0])
        os.close(vcpu)
        return res
    finally:
        os.close(vm)
        os.close(kvm)


if __name__ == "__main__":
    dev, _ = find_bar()
    json.dump(run(dev), sys.stdout, indent=1)
    print()
