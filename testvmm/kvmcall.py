"""Calling KVM: ioctl() with ctypes structs, /dev/kvm, capabilities.

The numbers and structs these calls take are KVM's ABI, defined once in
kvmtrace.kvmapi (the tracer decodes the very same ones from its captures);
this module only issues them. Architecture-specific ioctls live in x86.py
(regs / sregs) and arm64.py (vcpu_init, one_reg).
"""

import errno
import fcntl
import os

from kvmtrace.kvmapi import KVM_API_VERSION, KVM_CHECK_EXTENSION, KVM_GET_API_VERSION


def ioctl(fd, request, arg=0):
    """ioctl() returning the kernel's int result; raises OSError(errno).

    A ctypes struct is passed by address and updated in place (mutable
    buffer), an int is passed as is.
    """
    if isinstance(arg, int):
        return fcntl.ioctl(fd, request, arg)
    return fcntl.ioctl(fd, request, arg, True)


def ioctl_errno(fd, request, arg=0):
    """(result, errno): like ioctl() but a failure is a value, not an exception.

    Used for the memslot ioctls, whose failures are part of a scenario.
    """
    try:
        return ioctl(fd, request, arg), 0
    except OSError as e:
        return -1, e.errno or errno.EIO


def open_kvm(path="/dev/kvm"):
    """Open /dev/kvm and check the (ancient, fixed) API version."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    version = ioctl(fd, KVM_GET_API_VERSION)
    if version != KVM_API_VERSION:
        os.close(fd)
        raise OSError(errno.EINVAL, f"KVM API version {version}, expected {KVM_API_VERSION}")
    return fd


def check_extension(fd, cap):
    """KVM_CHECK_EXTENSION; an error (some caps answer -EINVAL) reads as 0."""
    try:
        return ioctl(fd, KVM_CHECK_EXTENSION, cap)
    except OSError:
        return 0
