"""Host memory behind a memslot, by backing kind.

Why several kinds: what KVM does on a guest fault (and what the tracer has to
explain) depends on the VMA behind the slot: private anonymous memory, shared
memory, page cache, hugetlbfs, THP, or a VM_PFNMAP|VM_IO mapping that has no
struct pages at all. Each kind here produces one VMA that is easy to recognise
in /proc/PID/maps, and reports what the kernel says about it.

Kinds:
  anon         MAP_PRIVATE|MAP_ANONYMOUS, MADV_NOHUGEPAGE (each 4K page faults
               on its own)
  anon-shared  MAP_SHARED|MAP_ANONYMOUS (shmem; maps shows "/dev/zero (deleted)")
  memfd        memfd_create("kvmtrace-guest-slotN"), MAP_SHARED
  file         a temporary regular file, MAP_SHARED (page cache)
  hugetlb      MAP_HUGETLB, 2 MiB pages; "unavailable" unless
               /proc/sys/vm/nr_hugepages left enough free pages
  thp          private anonymous, 2 MiB aligned, MADV_HUGEPAGE
  pfnmap       the process's own [vvar] VMA (VM_PFNMAP|VM_IO in every Linux
               process up to 6.x; on x86 7.3.4 it is VM_MIXEDMAP over
               ordinary pages, see vvar_is_pfnmap()); read-only, not ours
               to write or unmap
  bar-uc       a PCI memory BAR through sysfs resourceN (mmap: uncached,
               VM_PFNMAP|VM_IO); read-write
  bar-wc       the same BAR through resourceN_wc (write-combine mmap)
               The BAR kinds need the ivshmem-plain device (1af4:1110, BAR 2)
               the arm64 testbed gives its host, or the device named by
               KVMTRACE_GUEST_BAR=<sysfs device dir>[:<bar>]; elsewhere they
               are "unavailable" with the reason, like hugetlb. Each BAR slot
               of a process maps its own part of the BAR (mmap offset, in slot
               order; smaps shows it as the VMA's offset), so two slots never
               alias a page. The first qword of every page mapped is zeroed
               (the BAR keeps its contents across runs).
  bar-cacheable
               the same BAR through /dev/kvmtrace_cbar, the arm64 testbed's
               test module (testbed/arm64/module): remap_pfn_range() with the
               VMA's default, Normal *cacheable* pgprot, so a cacheable
               VM_PFNMAP|VM_IO region that is not RAM (KVM's cacheable-PFNMAP
               rules). Without /dev/kvmtrace_cbar the module is built (make
               against /lib/modules/$(uname -r)/build, in a temporary copy)
               and insmod'ed, or the kind is "unavailable" with the reason.
               Shares the BAR with bar-uc / bar-wc slots (its own part).
  bar-vfio     the same BAR as QEMU maps it for device assignment: the device
               bound to vfio-pci, its IOMMU group attached to a type1
               container, the BAR region mmap'ed from the VFIO device fd
               (vfio.py). Needs an IOMMU (testbed run --iommu); "unavailable"
               with the reason otherwise. Shares the BAR with the other bar-*
               kinds (its own part).

KINDS are the kinds every Linux host can make (the demo covers them all);
BAR_KINDS need a PCI device; VFIO_KINDS a PCI device and an IOMMU;
ALL_KINDS is all of them.

Every mapping the module creates is 2 MiB aligned (so hva and gpa agree
modulo 2 MiB, as KVM needs for huge mappings) and sits between PROT_NONE guard
pages, so the kernel never merges it with a neighbouring anonymous VMA and its
maps line covers exactly the slot.
"""

import ctypes
import errno
import mmap
import os
import tempfile

PAGE_SIZE = 4096
HUGE_SIZE = 2 << 20

KINDS = ("anon", "anon-shared", "memfd", "file", "hugetlb", "thp", "pfnmap")
BAR_KINDS = ("bar-uc", "bar-wc")
# kinds that need the arm64 testbed's test module (not in the demo)
MODULE_KINDS = ("bar-cacheable",)
# the BAR through vfio-pci (needs an IOMMU; not in the demo)
VFIO_KINDS = ("bar-vfio",)
ALL_KINDS = KINDS + BAR_KINDS + MODULE_KINDS + VFIO_KINDS
# every kind over a PCI BAR
ANY_BAR_KINDS = BAR_KINDS + MODULE_KINDS + VFIO_KINDS
# VM_PFNMAP backings: no struct pages behind them
PFNMAP_KINDS = ("pfnmap",) + ANY_BAR_KINDS
# kinds whose host memory the VMM may write (guest code stubs, checks)
WRITABLE_KINDS = ("anon", "anon-shared", "memfd", "file", "hugetlb", "thp") + ANY_BAR_KINDS

# the PCI BAR behind the bar-* kinds: QEMU's ivshmem-plain device, BAR 2
BAR_PCI_ID = (0x1AF4, 0x1110)
BAR_INDEX = 2
BAR_ENV = "KVMTRACE_GUEST_BAR"
# bar-cacheable: the test module's device, module name and source directory
CBAR_DEV = "/dev/kvmtrace_cbar"
CBAR_MODULE = "kvmtrace_cbar"
CBAR_SRC = os.path.join("testbed", "arm64", "module")  # relative to the checkout

PROT_NONE = 0
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MFD_CLOEXEC = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.memfd_create.argtypes = [ctypes.c_char_p, ctypes.c_uint]
_MAP_FAILED = ctypes.c_void_p(-1).value


class Unavailable(Exception):
    """This backing cannot be made on this host (reported, not fatal)."""


def _check(ret, what):
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _mmap(addr, length, prot, flags, fd=-1, offset=0):
    p = _libc.mmap(addr, length, prot, flags, fd, offset)
    if p is None or p == _MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, "mmap: " + os.strerror(e))
    return p


def round_up(value, align):
    return (value + align - 1) // align * align


class Backing:
    """One slot's host memory: where it is, what it is, how to release it."""

    def __init__(self, kind, slot):
        self.kind = kind
        self.slot = slot
        self.hva = 0
        self.size = 0
        self.status = "unavailable"
        self.reason = ""
        self.path = None  # backing file, for kinds that have one
        self.fs = None  # filesystem of the file kind ("tmpfs", "ramfs", or a magic in hex)
        self.vma = None  # filled by describe()
        self.readable_pages = None  # None: all (only pfnmap has holes)
        self._fd = -1
        self._reservation = None  # (addr, length) to munmap, guard pages included
        self._owns_file = False
        self._bar_range = None  # (BAR key, offset, size) held in _BAR_IN_USE
        self._vfio = None  # bar-vfio: the open VFIO device (vfio.VfioDevice)

    # -- release ----------------------------------------------------------
    def close(self):
        if self._bar_range:
            _BAR_IN_USE.discard(self._bar_range)
            self._bar_range = None
        if self._reservation:
            _libc.munmap(*self._reservation)
            self._reservation = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._vfio is not None:
            self._vfio.close()
            self._vfio = None
        if self._owns_file and self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._owns_file = False

    # -- host access ------------------------------------------------------
    @property
    def writable(self):
        return self.status == "ok" and self.kind in WRITABLE_KINDS

    def buffer(self):
        """A ctypes byte array over the mapping (host view of guest memory)."""
        return (ctypes.c_char * self.size).from_address(self.hva)

    def write_bytes(self, offset, data):
        """Write `data` at `offset` into the mapping.

        A BAR mapping may be Device memory, where unaligned or DC ZVA stores
        (which memcpy may use) fault: write it with aligned 32-bit stores.
        """
        addr = self.hva + offset
        if self.kind in ANY_BAR_KINDS and addr % 4 == 0 and len(data) % 4 == 0:
            for i in range(0, len(data), 4):
                ctypes.c_uint32.from_address(addr + i).value = int.from_bytes(
                    data[i:i + 4], "little")
        else:
            ctypes.memmove(addr, bytes(data), len(data))

    def describe(self):
        """Look the VMA up in /proc/self/maps (+ smaps VmFlags); cache it."""
        if self.status == "ok":
            self.vma = find_vma(self.hva)
        return self.vma

    def to_dict(self):
        return {
            "kind": self.kind,
            "status": self.status,
            "reason": self.reason,
            "hva": self.hva,
            "size": self.size,
            "path": self.path,
            "fs": self.fs,
            "vma": self.vma,
            "readable_pages": self.readable_pages,
        }


# --------------------------------------------------------------------------
# allocation


def _reserve_and_map(b, size, prot, flags, fd=-1, align=HUGE_SIZE, offset=0):
    """Map `size` bytes at an `align`ed address between PROT_NONE guards."""
    total = size + 2 * align
    base = _mmap(None, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
    b._reservation = (base, total)
    target = round_up(base + PAGE_SIZE, align)
    b.hva = _mmap(target, size, prot, flags | MAP_FIXED, fd, offset)
    b.size = size


def hugetlb_free_bytes():
    """Free 2 MiB hugetlb memory (HugePages_Free × Hugepagesize), 0 if none."""
    free = pagesize = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    free = int(line.split()[1])
                elif line.startswith("Hugepagesize:"):
                    pagesize = int(line.split()[1]) * 1024
    except OSError:
        return 0
    return free * pagesize if pagesize == HUGE_SIZE else 0


def find_special_vma(name):
    """(start, end) of a named VMA of this process, e.g. "[vvar]", or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == name:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                return start, end
    return None


def vvar_is_pfnmap():
    """Is this process's [vvar] VMA VM_PFNMAP (smaps VmFlags "pf")?

    It was on every kernel measured up to 6.18 (x86 and arm64); on x86
    7.3.4 it is VM_MIXEDMAP ("mm") over ordinary pages, and KVM then treats
    a guest write to it like one to any read-only VMA: KVM_RUN fails with
    EFAULT instead of the KVM_EXIT_MMIO a VM_PFNMAP page gives.
    None when there is no [vvar].
    """
    vma = find_special_vma("[vvar]")
    if vma is None:
        return None
    found = find_vma(vma[0])
    return "pf" in (found or {}).get("vm_flags", [])


def allocate(kind, size, slot):
    """Host memory of `kind` for memslot `slot`, at least `size` bytes.

    Returns a Backing whose status is "ok", or "unavailable" with a reason
    (hugetlb without reserved pages, no [vvar], no PCI BAR); other failures
    raise OSError. hugetlb and thp round the size up to 2 MiB; pfnmap's size
    is the [vvar] VMA's, a BAR kind's at most the BAR's (the request is only
    an upper bound there).
    """
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown backing {kind!r} (one of {', '.join(ALL_KINDS)})")
    b = Backing(kind, slot)
    try:
        _allocate(b, kind, size, slot)
    except Unavailable as e:
        b.close()
        b.status, b.reason, b.hva, b.size = "unavailable", str(e), 0, 0
        return b
    except BaseException:
        b.close()
        raise
    b.status = "ok"
    b.describe()
    return b


def _allocate(b, kind, size, slot):
    size = round_up(size, PAGE_SIZE)
    if kind == "anon":
        _reserve_and_map(b, size, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS)
        _check(_libc.madvise(b.hva, size, MADV_NOHUGEPAGE), "madvise(NOHUGEPAGE)")
    elif kind == "anon-shared":
        _reserve_and_map(b, size, PROT_RW, MAP_SHARED | MAP_ANONYMOUS)
    elif kind == "memfd":
        name = f"kvmtrace-guest-slot{slot}".encode()
        b._fd = _check(_libc.memfd_create(name, MFD_CLOEXEC), "memfd_create")
        os.ftruncate(b._fd, size)
        _reserve_and_map(b, size, PROT_RW, MAP_SHARED, b._fd)
        b.path = "/memfd:" + name.decode()
    elif kind == "file":
        b._fd, b.path = tempfile.mkstemp(prefix=f"kvmtrace-guest-slot{slot}-")
        b._owns_file = True
        b.fs = fs_type(b.path)
        os.ftruncate(b._fd, size)
        _reserve_and_map(b, size, PROT_RW, MAP_SHARED, b._fd)
    elif kind == "hugetlb":
        size = round_up(size, HUGE_SIZE)
        free = hugetlb_free_bytes()
        if free < size:
            raise Unavailable(f"hugetlb: {free >> 10} KiB free 2 MiB pages, {size >> 10} KiB "
                              f"needed (see /proc/sys/vm/nr_hugepages)")
        try:
            _reserve_and_map(b, size, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB)
        except OSError as e:
            if e.errno in (errno.ENOMEM, errno.EINVAL):
                raise Unavailable(f"hugetlb: mmap(MAP_HUGETLB): {e.strerror}") from None
            raise
    elif kind == "thp":
        size = round_up(size, HUGE_SIZE)
        _reserve_and_map(b, size, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS)
        _check(_libc.madvise(b.hva, size, MADV_HUGEPAGE), "madvise(HUGEPAGE)")
    elif kind == "pfnmap":
        vvar = find_special_vma("[vvar]")
        if vvar is None:
            raise Unavailable("pfnmap: no [vvar] VMA in /proc/self/maps")
        b.hva = vvar[0]
        b.size = min(size, vvar[1] - vvar[0]) if size else vvar[1] - vvar[0]
        b.path = "[vvar]"
        b.readable_pages = probe_readable(b.hva, b.size // PAGE_SIZE)
    elif kind in BAR_KINDS:
        _map_bar(b, kind, size)
    elif kind == "bar-cacheable":
        _map_cacheable_bar(b, kind, size)
    elif kind == "bar-vfio":
        _map_vfio_bar(b, kind, size)


def find_bar(environ=None):
    """(sysfs device dir, BAR index) of the PCI BAR behind the bar-* kinds, or
    (None, reason). KVMTRACE_GUEST_BAR=<device dir>[:<bar>] names another
    device; by default the first ivshmem-plain (1af4:1110), BAR 2."""
    env = (os.environ if environ is None else environ).get(BAR_ENV)
    if env:
        dev, index = env, ""
        head, _, tail = env.rpartition(":")
        if tail.isdigit():  # "...:2" (a PCI address ends "...:02.0", not digits only)
            dev, index = head, tail
        if not os.path.isdir(dev):
            return None, f"{BAR_ENV}={env}: no such device directory"
        return dev, int(index) if index else BAR_INDEX
    root = "/sys/bus/pci/devices"
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return None, f"no {root} (no PCI bus)"
    for name in devices:
        dev = os.path.join(root, name)
        try:
            with open(os.path.join(dev, "vendor")) as f:
                vendor = int(f.read(), 16)
            with open(os.path.join(dev, "device")) as f:
                device = int(f.read(), 16)
        except (OSError, ValueError):
            continue
        if (vendor, device) == BAR_PCI_ID:
            return dev, BAR_INDEX
    vendor, device = BAR_PCI_ID
    return None, (f"no ivshmem-plain PCI device ({vendor:04x}:{device:04x}) in {root} (QEMU: "
                  f"-device ivshmem-plain,memdev=...; or set {BAR_ENV})")


_BAR_IN_USE = set()  # (BAR key, offset, size) mapped by open Backings of this process


def _bar_offset(key, size, bar_size):
    """The lowest page offset in the BAR where `size` bytes are not in use."""
    used = sorted((off, off + n) for k, off, n in _BAR_IN_USE if k == key)
    offset = 0
    for start, end in used:
        if offset + size <= start:
            break
        offset = max(offset, end)
    return offset if offset + size <= bar_size else None


def _map_bar(b, kind, size):
    dev, index = find_bar()
    if dev is None:
        raise Unavailable(f"{kind}: {index}")
    path = os.path.join(dev, f"resource{index}{'_wc' if kind == 'bar-wc' else ''}")
    if not os.path.exists(path):
        why = ("the BAR is not prefetchable, so no write-combine mapping" if kind == "bar-wc"
               else f"BAR {index} is not a memory BAR")
        raise Unavailable(f"{kind}: no {path} ({why})")
    try:
        with open(os.path.join(dev, "enable"), "w") as f:
            f.write("1")
    except OSError as e:
        # a bound driver makes the write EBUSY (e.g. vfio-pci, while a
        # bar-vfio slot of this run holds the device): fine if it is enabled
        if e.errno != errno.EBUSY or _read_text(os.path.join(dev, "enable")) != "1":
            raise Unavailable(f"{kind}: cannot enable {dev}: {e.strerror}") from None
    bar_size = os.path.getsize(path)
    if bar_size < PAGE_SIZE:
        raise Unavailable(f"{kind}: {path} is {bar_size} bytes")
    _map_bar_range(b, kind, (os.path.realpath(dev), index), path, size, bar_size)


def _map_bar_range(b, kind, key, path, size, bar_size, fd=None, region_offset=0):
    """Map a part of the BAR no other slot of this run holds, through ``path``
    (a sysfs resource file, or the test module's device over the same BAR),
    or through an open `fd` whose BAR region starts at `region_offset` (a
    VFIO device fd; `path` then only names it)."""
    size = min(size or bar_size, bar_size)
    offset = _bar_offset(key, size, bar_size)
    if offset is None:
        raise Unavailable(f"{kind}: no {size >> 10} KiB of the {bar_size >> 10} KiB BAR left "
                          f"(other BAR slots hold the rest)")
    if fd is None:
        try:
            fd = b._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise Unavailable(f"{kind}: open {path}: {e.strerror}") from None
    try:
        _reserve_and_map(b, size, PROT_RW, MAP_SHARED, fd, offset=region_offset + offset)
    except OSError as e:
        if e.errno != errno.EINVAL or path.startswith("vfio:"):
            raise
        # pci_mmap_resource refuses a region a driver has claimed
        # (iomem_is_exclusive), e.g. vfio-pci while a bar-vfio slot holds it
        raise Unavailable(f"{kind}: mmap {path}: {e.strerror} (the kernel refuses it while "
                          f"a driver has claimed the BAR, e.g. vfio-pci: see /proc/iomem)") \
            from None
    b._bar_range = (key, offset, size)
    _BAR_IN_USE.add(b._bar_range)
    b.path = path
    for page in range(size // PAGE_SIZE):  # aligned 64-bit stores (Device memory)
        ctypes.c_uint64.from_address(b.hva + page * PAGE_SIZE).value = 0


def checkout_dir():
    """The kvmtrace checkout this module runs from ($KVMTRACE_SRC if set)."""
    return os.environ.get("KVMTRACE_SRC") or os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))


def load_cbar_module(timeout=600):
    """Make /dev/kvmtrace_cbar exist: build the test module from the checkout's
    testbed/arm64/module in a temporary copy and insmod it. Raises Unavailable
    with the reason (no source, no kernel build dir, make or insmod failed)."""
    import shutil
    import subprocess
    import time
    src = os.path.join(checkout_dir(), CBAR_SRC)
    if not os.path.exists(os.path.join(src, CBAR_MODULE + ".c")):
        raise Unavailable(f"bar-cacheable: no {CBAR_DEV} and no module source in {src}")
    kdir = f"/lib/modules/{os.uname().release}/build"
    if not os.path.isdir(kdir):
        raise Unavailable(f"bar-cacheable: no {CBAR_DEV} and no {kdir} (linux-headers) to "
                          f"build {CBAR_MODULE}")
    work = tempfile.mkdtemp(prefix="kvmtrace-cbar-")
    try:
        for name in (CBAR_MODULE + ".c", "Makefile"):
            shutil.copy(os.path.join(src, name), work)
        for cmd in (["make", "-C", kdir, "M=" + work, "modules"],
                    ["insmod", os.path.join(work, CBAR_MODULE + ".ko")]):
            try:
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   timeout=timeout, text=True)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise Unavailable(f"bar-cacheable: {cmd[0]}: {e}") from None
            if p.returncode:
                tail = " | ".join(p.stdout.strip().splitlines()[-3:])
                raise Unavailable(f"bar-cacheable: {cmd[0]} failed (exit {p.returncode}): "
                                  f"{tail}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for _ in range(50):  # devtmpfs creates the node asynchronously
        if os.path.exists(CBAR_DEV):
            return
        time.sleep(0.1)
    raise Unavailable(f"bar-cacheable: {CBAR_MODULE} loaded but no {CBAR_DEV}")


def _map_cacheable_bar(b, kind, size):
    dev, index = find_bar()
    if dev is None:
        raise Unavailable(f"{kind}: {index}")
    path = os.path.join(dev, f"resource{index}")
    if not os.path.exists(path):
        raise Unavailable(f"{kind}: no {path} (BAR {index} is not a memory BAR)")
    if not os.path.exists(CBAR_DEV):
        load_cbar_module()
    bar_size = os.path.getsize(path)
    # the module maps this same BAR: share the range bookkeeping
    _map_bar_range(b, kind, (os.path.realpath(dev), index), CBAR_DEV, size, bar_size)


def _read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _map_vfio_bar(b, kind, size):
    from . import vfio
    dev, index = find_bar()
    if dev is None:
        raise Unavailable(f"{kind}: {index}")
    try:
        b._vfio = vfio.VfioDevice(dev, index)
    except vfio.VfioUnavailable as e:
        raise Unavailable(f"{kind}: {e}") from None
    except OSError as e:
        raise Unavailable(f"{kind}: VFIO setup of {dev}: {e.strerror or e}") from None
    v = b._vfio
    _map_bar_range(b, kind, (os.path.realpath(dev), index), f"vfio:{v.bdf}:{index}", size,
                   v.bar_size, fd=v.device_fd, region_offset=v.bar_offset)
    b.reason = v.how


_FS_MAGIC = {0x01021994: "tmpfs", 0x858458F6: "ramfs", 0xEF53: "ext4", 0x58465342: "xfs",
             0x9123683E: "btrfs", 0x794C7630: "overlayfs"}


def fs_type(path):
    """The filesystem `path` is on, by statfs f_type: a name from _FS_MAGIC or
    the magic in hex; None if statfs fails. A file on tmpfs is shmem (no
    write-notify: read faults map it writable), elsewhere page cache."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first long
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return None
    magic = ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
    return _FS_MAGIC.get(magic, f"{magic:#x}")


def probe_readable(hva, npages):
    """Indexes of the pages at hva that can be read without SIGBUS.

    Some [vvar] pages have no page behind them (on 6.18: the time-namespace
    page and the arch page); a guest read of such a page makes KVM_RUN fail
    with EFAULT, so the VMM must know. Reading one is fatal, hence a forked
    child per page (fork before any vCPU thread exists).
    """
    readable = []
    for page in range(npages):
        pid = os.fork()
        if pid == 0:  # child: touch the page, report by exit status
            try:
                ctypes.string_at(hva + page * PAGE_SIZE, 1)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            readable.append(page)
    return readable


# --------------------------------------------------------------------------
# /proc/self/maps


_SMAPS_KB = {"KernelPageSize": "kernel_page_size_kb", "Rss": "rss_kb",
             "AnonHugePages": "anon_huge_kb", "Private_Hugetlb": "private_hugetlb_kb",
             "Shared_Hugetlb": "shared_hugetlb_kb"}


def find_vma(addr, pid="self"):
    """The VMA containing `addr` as /proc/PID/maps and smaps show it.

    Returns {start, end, perms, offset, dev, inode, name, vm_flags,
    kernel_page_size_kb, rss_kb, anon_huge_kb, private_hugetlb_kb,
    shared_hugetlb_kb} (name is the maps path column: "" for anonymous
    memory, "[vvar]", "/memfd:NAME (deleted)", a file path), or None.
    """
    vma = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                if vma is not None:
                    break
                start, end = (int(x, 16) for x in head[0].split("-"))
                if start <= addr < end:
                    vma = {
                        "start": start,
                        "end": end,
                        "perms": head[1],
                        "offset": int(head[2], 16),
                        "dev": head[3],
                        "inode": int(head[4]),
                        "name": head[5].strip() if len(head) > 5 else "",
                        "vm_flags": [],
                    }
            elif vma is not None:
                key = line.split(":", 1)[0]
                if key == "VmFlags":
                    vma["vm_flags"] = line.split()[1:]
                elif key in _SMAPS_KB:
                    vma[_SMAPS_KB[key]] = int(line.split()[1])
    return vma
