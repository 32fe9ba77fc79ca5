"""arm64 CPU and KVM facts the stage-2 rules depend on, taken at record time.

Since 6.17 KVM maps a cacheable VM_PFNMAP region cacheable only when the CPU
has both FEAT_S2FWB and CTR_EL0.DIC (kvm_supports_cacheable_pfnmap), and says
so through KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED on a VM fd. CTR_EL0 is
readable at EL0 (Linux may trap and sanitise it); FWB is hidden from EL0
(ID_AA64MMFR2_EL1 reads 0 there), so it comes from the boot log's CPU
features line "Stage-2 Force Write-Back".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import platform
import struct
import subprocess

from ..kvmapi import (KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED, KVM_CHECK_EXTENSION,
                      KVM_CREATE_VM)

MRS_X0_CTR_EL0, RET = 0xD53B0020, 0xD65F03C0


def read_ctr_el0() -> int | None:
    """CTR_EL0 by running `mrs x0, ctr_el0; ret` from an executable page."""
    if platform.machine() != "aarch64":
        return None
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None
    buf.write(struct.pack("<II", MRS_X0_CTR_EL0, RET))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:  # the page was written as data: make the instruction fetch see it
        libgcc = ctypes.CDLL(ctypes.util.find_library("gcc_s") or "libgcc_s.so.1")
        libgcc.__clear_cache(ctypes.c_void_p(addr), ctypes.c_void_p(addr + 8))
    except (OSError, AttributeError):
        pass
    return int(ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)())


def fwb_from_dmesg() -> bool | None:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "CPU features: detected" not in out:
        return None  # boot log rotated away or unreadable
    return "Stage-2 Force Write-Back" in out


def check_extension(fd: int, cap: int) -> int:
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)
    except OSError as e:
        return -e.errno


def cacheable_pfnmap_cap() -> dict:
    """KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED on /dev/kvm and on a scratch VM fd."""
    out = {"dev_kvm": None, "vm": None}
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return out
    try:
        out["dev_kvm"] = check_extension(kvm, KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED)
        try:
            vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        except OSError:
            return out
        try:
            out["vm"] = check_extension(vm, KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED)
        finally:
            os.close(vm)
    finally:
        os.close(kvm)
    return out


def cpu_facts() -> dict:
    ctr = read_ctr_el0()
    return {
        "ctr_el0": ctr,
        "dic": None if ctr is None else bool(ctr >> 29 & 1),
        "idc": None if ctr is None else bool(ctr >> 28 & 1),
        "fwb": fwb_from_dmesg(),
        "fwb_source": "dmesg CPU features",
        "cap_cacheable_pfnmap": cacheable_pfnmap_cap(),
    }
