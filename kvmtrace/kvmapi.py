"""KVM's userspace ABI: ioctl numbers, structs, memslot flags, capabilities,
exit reasons and kvm_run offsets, defined once for the whole project.

Values are those of include/uapi/linux/kvm.h (Linux 6.8+ for the MEMORY2 /
guest_memfd parts; KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED from 6.17). The
probes filter on these ioctl numbers, the analysis decodes them, and the test
VMM (testvmm, the independent witness) issues them: one definition, so a
slip cannot make the tracer and its witness agree on a wrong number. Sizes are
asserted at import. Standard library only (ctypes): importable without pandas.
"""

import ctypes
import errno as _errno

# --------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h; x86 and arm64 share it)

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr):
    return _ioc(_IOC_NONE, nr, 0)


def _IOR(nr, struct_type):
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct_type))


def _IOW(nr, struct_type):
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct_type))


def _IOWR(nr, struct_type):
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct_type))


# --------------------------------------------------------------------------
# structs


class kvm_userspace_memory_region(ctypes.Structure):
    """Argument of KVM_SET_USER_MEMORY_REGION (32 bytes)."""

    _fields_ = [
        ("slot", ctypes.c_uint32),  # (as_id << 16) | slot id
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),  # 0 deletes the slot
        ("userspace_addr", ctypes.c_uint64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    """Argument of KVM_SET_USER_MEMORY_REGION2 (160 bytes, Linux 6.8+).

    The first 32 bytes are laid out as kvm_userspace_memory_region, so a
    tracer can decode slot/flags/gpa/size/hva from either ioctl alike.
    """

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    ]


class kvm_dirty_log(ctypes.Structure):
    """Argument of KVM_GET_DIRTY_LOG: the caller supplies the bitmap buffer."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("padding1", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),  # user pointer (union with padding2)
    ]


assert ctypes.sizeof(kvm_userspace_memory_region) == 32
assert ctypes.sizeof(kvm_userspace_memory_region2) == 160
assert ctypes.sizeof(kvm_dirty_log) == 16

# --------------------------------------------------------------------------
# ioctl numbers

# on /dev/kvm
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_CHECK_EXTENSION = _IO(0x03)  # also valid on a VM fd
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
# on a VM fd
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, kvm_userspace_memory_region)
KVM_SET_USER_MEMORY_REGION2 = _IOW(0x49, kvm_userspace_memory_region2)
# on a vCPU fd
KVM_RUN = _IO(0x80)

assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46
assert KVM_SET_USER_MEMORY_REGION2 == 0x40A0AE49
assert KVM_GET_DIRTY_LOG == 0x4010AE42

KVM_API_VERSION = 12

IOCTL_NAMES = {
    KVM_GET_API_VERSION: "KVM_GET_API_VERSION",
    KVM_CREATE_VM: "KVM_CREATE_VM",
    KVM_CHECK_EXTENSION: "KVM_CHECK_EXTENSION",
    KVM_GET_VCPU_MMAP_SIZE: "KVM_GET_VCPU_MMAP_SIZE",
    KVM_CREATE_VCPU: "KVM_CREATE_VCPU",
    KVM_GET_DIRTY_LOG: "KVM_GET_DIRTY_LOG",
    KVM_SET_USER_MEMORY_REGION: "KVM_SET_USER_MEMORY_REGION",
    KVM_SET_USER_MEMORY_REGION2: "KVM_SET_USER_MEMORY_REGION2",
    KVM_RUN: "KVM_RUN",
}

# --------------------------------------------------------------------------
# memslot flags (kvm_userspace_memory_region*.flags)

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

MEM_FLAG_NAMES = {
    KVM_MEM_LOG_DIRTY_PAGES: "LOG_DIRTY_PAGES",
    KVM_MEM_READONLY: "READONLY",
    KVM_MEM_GUEST_MEMFD: "GUEST_MEMFD",
}


def mem_flag_names(flags):
    """['LOG_DIRTY_PAGES', ...] for a memslot flags word (unknown bits as hex)."""
    names = [name for bit, name in MEM_FLAG_NAMES.items() if flags & bit]
    rest = flags & ~sum(MEM_FLAG_NAMES)
    if rest:
        names.append(f"0x{rest:x}")
    return names


def slot_id(as_id, slot):
    """The kernel's encoding of the `slot` field: address space in the top half."""
    return (as_id << 16) | slot


# --------------------------------------------------------------------------
# capabilities (KVM_CHECK_EXTENSION arguments)

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_SYNC_MMU = 16
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED = 243  # 6.17+

CAPS = {
    "USER_MEMORY": KVM_CAP_USER_MEMORY,
    "NR_VCPUS": KVM_CAP_NR_VCPUS,
    "NR_MEMSLOTS": KVM_CAP_NR_MEMSLOTS,
    "SYNC_MMU": KVM_CAP_SYNC_MMU,
    "MAX_VCPUS": KVM_CAP_MAX_VCPUS,
    "READONLY_MEM": KVM_CAP_READONLY_MEM,
    "MULTI_ADDRESS_SPACE": KVM_CAP_MULTI_ADDRESS_SPACE,
    "MANUAL_DIRTY_LOG_PROTECT2": KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    "DIRTY_LOG_RING": KVM_CAP_DIRTY_LOG_RING,
    "USER_MEMORY2": KVM_CAP_USER_MEMORY2,
    "MEMORY_FAULT_INFO": KVM_CAP_MEMORY_FAULT_INFO,
    "MEMORY_ATTRIBUTES": KVM_CAP_MEMORY_ATTRIBUTES,
    "GUEST_MEMFD": KVM_CAP_GUEST_MEMFD,
    "VM_TYPES": KVM_CAP_VM_TYPES,
    "PRE_FAULT_MEMORY": KVM_CAP_PRE_FAULT_MEMORY,
    "ARM_CACHEABLE_PFNMAP_SUPPORTED": KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED,
}

# --------------------------------------------------------------------------
# struct kvm_run: the mmap()ed vCPU page. Only the fields the VMM reads.

RUN_EXIT_REASON = 8  # __u32 exit_reason
RUN_IMMEDIATE_EXIT = 1  # __u8 immediate_exit
RUN_UNION = 32  # start of the exit-reason union
# KVM_EXIT_IO: __u8 direction, __u8 size, __u16 port, __u32 count, __u64 data_offset
RUN_IO_FMT = "<BBHIQ"
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
# KVM_EXIT_MMIO: __u64 phys_addr, __u8 data[8], __u32 len, __u8 is_write
RUN_MMIO_FMT = "<Q8sIB"
RUN_MMIO_DATA = RUN_UNION + 8
# KVM_EXIT_FAIL_ENTRY: __u64 hardware_entry_failure_reason, __u32 cpu
# KVM_EXIT_INTERNAL_ERROR: __u32 suberror, __u32 ndata, __u64 data[16]
# KVM_EXIT_MEMORY_FAULT: __u64 flags, __u64 gpa, __u64 size

EXIT_REASONS = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    11: "SET_TPR",
    12: "TPR_ACCESS",
    17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
    29: "X86_RDMSR",
    30: "X86_WRMSR",
    39: "MEMORY_FAULT",
}
KVM_EXIT_IO = 2
KVM_EXIT_MMIO = 6
KVM_EXIT_INTR = 10


def exit_reason_name(reason):
    return EXIT_REASONS.get(reason, "EXIT_%d" % reason)


def errno_name(err: int) -> str:
    """'EINVAL' for errno 22; '' for 0."""
    if not err:
        return ""
    return _errno.errorcode.get(int(err), f"errno {int(err)}")


def ret_errno(ret: int) -> str:
    """The errno name of a kernel return value: 'EINVAL' for -22, '' for ret >= 0."""
    return errno_name(-int(ret)) if ret < 0 else ""
