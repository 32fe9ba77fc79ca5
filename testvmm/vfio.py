"""The PCI BAR through VFIO, as QEMU maps it for device assignment.

Why: the case kvmtrace exists for is a device BAR passed to a guest through
vfio-pci. QEMU does not mmap sysfs resourceN: it opens the device's IOMMU
group, attaches it to a type1 container, gets a device fd and mmaps the BAR
region from that fd (vfio_pci_core_mmap). The VMA is then vfio-pci's
(VM_PFNMAP|VM_IO, plus VM_ALLOW_ANY_UNCACHED on kernels whose vfio-pci sets
it, 6.9+), and KVM's stage-2 / NPT type follows from that VMA. This module
does the same steps with plain ioctls so the test VMM's guest can read and
write a memslot over it (the bar-vfio backing in backings.py).

Steps: bind the device to vfio-pci if it is not (driver_override, then
drivers_probe; needs an IOMMU group, i.e. the host has an IOMMU), open
/dev/vfio/vfio (VFIO_GET_API_VERSION, VFIO_CHECK_EXTENSION(TYPE1v2)),
/dev/vfio/<group> (VFIO_GROUP_GET_STATUS: viable), VFIO_GROUP_SET_CONTAINER,
VFIO_SET_IOMMU(TYPE1v2), VFIO_GROUP_GET_DEVICE_FD(BDF),
VFIO_DEVICE_GET_REGION_INFO for the BAR (must be MMAP-able) and for config
space, where the command register's Memory Space bit is set (vfio-pci
refuses BAR faults with SIGBUS while memory decoding is off). The numbers are
include/uapi/linux/vfio.h's.

Only the legacy group/container interface is used: the testbed kernels
(6.1 and 7.3.4) offer /dev/vfio/<group>, and 7.3.4 has no /dev/vfio/devices
(VFIO_DEVICE_CDEV off), so the iommufd cdev path would not run there.
"""

import ctypes
import errno
import os
import time

VFIO_API_VERSION = 0
_VFIO_TYPE = ord(";")
_VFIO_BASE = 100


def _vfio_io(nr):
    """_IO(VFIO_TYPE, VFIO_BASE + nr): VFIO's ioctls carry no size/direction."""
    return (_VFIO_TYPE << 8) | (_VFIO_BASE + nr)


VFIO_GET_API_VERSION = _vfio_io(0)
VFIO_CHECK_EXTENSION = _vfio_io(1)
VFIO_SET_IOMMU = _vfio_io(2)
VFIO_GROUP_GET_STATUS = _vfio_io(3)
VFIO_GROUP_SET_CONTAINER = _vfio_io(4)
VFIO_GROUP_UNSET_CONTAINER = _vfio_io(5)
VFIO_GROUP_GET_DEVICE_FD = _vfio_io(6)
VFIO_DEVICE_GET_INFO = _vfio_io(7)
VFIO_DEVICE_GET_REGION_INFO = _vfio_io(8)
assert VFIO_GROUP_GET_DEVICE_FD == 0x3B6A and VFIO_DEVICE_GET_REGION_INFO == 0x3B6C

VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_PCI_CONFIG_REGION_INDEX = 7
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


class VfioUnavailable(Exception):
    """VFIO cannot give this BAR on this host (the reason says why)."""


class GroupStatus(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class RegionInfo(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("index", ctypes.c_uint32), ("cap_offset", ctypes.c_uint32),
                ("size", ctypes.c_uint64), ("offset", ctypes.c_uint64)]


assert ctypes.sizeof(RegionInfo) == 32


def _ioctl(fd, request, arg=0):
    """ioctl through libc (VFIO_GROUP_GET_DEVICE_FD takes a char *)."""
    if isinstance(arg, int):
        ret = _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_long(arg))
    elif isinstance(arg, bytes):
        ret = _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_char_p(arg))
    else:
        ret = _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def driver_of(dev):
    """Name of the driver bound to the PCI device dir `dev`, or None."""
    link = os.path.join(dev, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def iommu_group(dev):
    """The device's IOMMU group number (a string), or None without an IOMMU."""
    link = os.path.join(dev, "iommu_group")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def bind_vfio_pci(dev):
    """Bind the PCI device dir `dev` to vfio-pci unless it already is.

    Returns the driver it had before ("" for none) when it bound it, None
    when vfio-pci already had it. Raises VfioUnavailable with the reason:
    no IOMMU group (the host has no IOMMU; vfio-pci's probe then fails with
    -EINVAL), modprobe or the probe failed."""
    if driver_of(dev) == "vfio-pci":
        return None
    bdf = os.path.basename(os.path.realpath(dev))
    if iommu_group(dev) is None:
        raise VfioUnavailable(f"{bdf} has no IOMMU group (the host has no IOMMU, "
                              f"/sys/kernel/iommu_groups is empty): vfio-pci cannot take it")
    if not os.path.isdir("/sys/bus/pci/drivers/vfio-pci"):
        import subprocess
        try:
            p = subprocess.run(["modprobe", "vfio-pci"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise VfioUnavailable(f"modprobe vfio-pci: {e}") from None
        if p.returncode:
            raise VfioUnavailable(f"modprobe vfio-pci failed: {p.stdout.strip()}")
    try:
        current = driver_of(dev)
        if current:
            with open(os.path.join(dev, "driver", "unbind"), "w") as f:
                f.write(bdf)
        with open(os.path.join(dev, "driver_override"), "w") as f:
            f.write("vfio-pci")
        with open("/sys/bus/pci/drivers_probe", "w") as f:
            f.write(bdf)
    except OSError as e:
        raise VfioUnavailable(f"binding {bdf} to vfio-pci: {e.strerror}") from None
    for _ in range(50):  # udev-less hosts: devtmpfs makes /dev/vfio/N shortly
        if driver_of(dev) == "vfio-pci" and os.path.exists(f"/dev/vfio/{iommu_group(dev)}"):
            return current or ""
        time.sleep(0.1)
    raise VfioUnavailable(f"{bdf}: vfio-pci did not bind (driver: {driver_of(dev)}; see dmesg)")


class VfioDevice:
    """An open VFIO device (container, group and device fds) and one BAR's
    region: `bar_size`, `bar_offset` (the mmap offset of the region in the
    device fd), `bar_flags`, and `how` (the interface used, for reports)."""

    def __init__(self, dev, bar_index):
        self.dev = dev
        self.previous_driver = None  # set when this object bound vfio-pci
        self.bdf = os.path.basename(os.path.realpath(dev))
        self.group = None
        self.container_fd = self.group_fd = self.device_fd = -1
        self.bar_index = bar_index
        self.bar_size = self.bar_offset = self.bar_flags = 0
        self.how = ""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self):
        self.previous_driver = bind_vfio_pci(self.dev)
        self.group = iommu_group(self.dev)
        try:
            self.container_fd = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VfioUnavailable(f"open /dev/vfio/vfio: {e.strerror}") from None
        version = _ioctl(self.container_fd, VFIO_GET_API_VERSION)
        if version != VFIO_API_VERSION:
            raise VfioUnavailable(f"VFIO API version {version}, expected {VFIO_API_VERSION}")
        if not _ioctl(self.container_fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU):
            raise VfioUnavailable("the VFIO container offers no TYPE1v2 IOMMU")
        path = f"/dev/vfio/{self.group}"
        try:
            self.group_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VfioUnavailable(f"open {path}: {e.strerror}") from None
        status = GroupStatus(ctypes.sizeof(GroupStatus), 0)
        _ioctl(self.group_fd, VFIO_GROUP_GET_STATUS, status)
        if not status.flags & VFIO_GROUP_FLAGS_VIABLE:
            raise VfioUnavailable(f"IOMMU group {self.group} is not viable (another device "
                                  f"in it is bound to a host driver)")
        _ioctl(self.group_fd, VFIO_GROUP_SET_CONTAINER, ctypes.c_int(self.container_fd))
        try:
            _ioctl(self.container_fd, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)
        except OSError as e:
            why = (": the IOMMU has no interrupt remapping and vfio_iommu_type1's "
                   "allow_unsafe_interrupts is off"
                   if e.errno == errno.EPERM else "")
            raise VfioUnavailable(f"VFIO_SET_IOMMU(TYPE1v2): {e.strerror}{why}") from None
        try:
            self.device_fd = _ioctl(self.group_fd, VFIO_GROUP_GET_DEVICE_FD,
                                    self.bdf.encode())
        except OSError as e:
            raise VfioUnavailable(f"VFIO_GROUP_GET_DEVICE_FD {self.bdf}: {e.strerror}") from None
        bar = self.region_info(self.bar_index)
        if not bar.flags & VFIO_REGION_INFO_FLAG_MMAP or not bar.size:
            raise VfioUnavailable(f"{self.bdf} BAR {self.bar_index}: region size {bar.size}, "
                                  f"flags {bar.flags:#x} (not mmap-able)")
        self.bar_size, self.bar_offset, self.bar_flags = bar.size, bar.offset, bar.flags
        self._enable_memory()
        self.how = (f"vfio group /dev/vfio/{self.group}, type1v2 container, device "
                    f"{self.bdf} region {self.bar_index}")

    def region_info(self, index):
        info = RegionInfo(ctypes.sizeof(RegionInfo), 0, index, 0, 0, 0)
        _ioctl(self.device_fd, VFIO_DEVICE_GET_REGION_INFO, info)
        return info

    def _enable_memory(self):
        """Set PCI_COMMAND_MEMORY through the config region (as a guest's
        driver would): vfio-pci's BAR fault handler gives SIGBUS otherwise."""
        cfg = self.region_info(VFIO_PCI_CONFIG_REGION_INDEX)
        at = cfg.offset + PCI_COMMAND
        cmd = int.from_bytes(os.pread(self.device_fd, 2, at), "little")
        if not cmd & PCI_COMMAND_MEMORY:
            os.pwrite(self.device_fd, (cmd | PCI_COMMAND_MEMORY).to_bytes(2, "little"), at)

    def close(self):
        for name in ("device_fd", "group_fd", "container_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)
        if self.previous_driver is not None:
            self._unbind()

    def _unbind(self):
        """Give the device back as it was before bind_vfio_pci (no driver
        override; the previous driver, if any, probes it again), so other
        users of the BAR in this boot (sysfs resource2, whose enable file is
        EBUSY while vfio-pci is bound) find it as before."""
        previous, self.previous_driver = self.previous_driver, None
        try:
            with open(os.path.join(self.dev, "driver_override"), "w") as f:
                f.write("\n")
            if driver_of(self.dev) == "vfio-pci":
                with open("/sys/bus/pci/drivers/vfio-pci/unbind", "w") as f:
                    f.write(self.bdf)
            if previous:
                with open("/sys/bus/pci/drivers_probe", "w") as f:
                    f.write(self.bdf)
        except OSError:
            pass  # best effort: the device stays with vfio-pci

