"""Create three VMs one after another in one process, each on the fd number
the previous one had (closed first), and give each a memslot 0: what KVM's own
selftests do between tests. Prints one JSON line: the VM fds and slots set.

    python tests/helpers/vm_fd_reuse.py
"""

import ctypes
import fcntl
import json
import mmap
import os

from kvmtrace import kvmapi

SIZE = 1 << 20


def main():
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    mem = mmap.mmap(-1, SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    hva = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    done = []
    # the second VM's slot 0 is at another GPA (not a move of the first's), the
    # third's where the first's was (not a no-op)
    for gpa in (0, 0x100000, 0):
        vm = fcntl.ioctl(kvm, kvmapi.KVM_CREATE_VM, 0)
        region = kvmapi.kvm_userspace_memory_region(slot=0, flags=0, guest_phys_addr=gpa,
                                                    memory_size=SIZE, userspace_addr=hva)
        fcntl.ioctl(vm, kvmapi.KVM_SET_USER_MEMORY_REGION, region)
        done.append({"vm_fd": vm, "gpa": gpa, "size": SIZE, "hva": hva})
        os.close(vm)
    print(json.dumps({"pid": os.getpid(), "vms": done}))


if __name__ == "__main__":
    main()
