"""A cache of compiled BPF programs, so that record starts without bcc's compiler.

bcc compiles a program with clang against kernel headers every time
(1.5 to 5 s here, most of record's start-up); loading and attaching what it
compiled takes about 10 ms. bcc 0.26 cannot load a compiled object, so the
cache keeps what kvmtrace needs to load the program itself, through the
bpf() syscall, the way host/bccload.py already loads the VMA-lookup program:

- every map: type, key and value size, entries, flags, name, and bcc's
  description of its key and value types (to read it from Python);
- every function: its instructions as bcc emitted them, with each map
  reference (an ld_imm64 of a map fd) turned into the index of its map;
- the license and kernel version bcc loads programs with.

On a hit the maps are created anew, the map references patched with their
fds, and the programs loaded and attached as bcc would (every
``tracepoint__CATEGORY__EVENT`` function attached to its tracepoint; others
when asked: ``attach_tracepoint``, ``attach_kprobe``, ``attach_kretprobe``
(through the kprobe PMU, as bcc's bpf_attach_kprobe), ``dump_func``).
``CachedBPF`` answers the part of bcc.BPF's interface kvmtrace uses (tables
by name, ``funcs``, ``tracepoint_fds``, ``dump_func``, the attach calls,
``cleanup``). Programs that bcc would attach by their name's prefix
(``kprobe__``, raw tracepoints, kfuncs) or that hold anything but map fds in
an ld_imm64 are not cached: they compile every time. kvmtrace's kprobe
programs are attached by name (probes/program.py attach_all), so they are.
Measured in the x86 testbed (7.3.4 under TCG, kprobes on
kvm_arch_prepare_memory_region and kvm_mmu_page_fault), the test VMM's demo
recorded twice: compiled in 114.7 s, then loaded from the cache in 3.8 s,
with the same events (237 fault-handler kprobe events, 12 prepare_region).

Key: a SHA-256 over everything the compiled code depends on: the program text
and compiler flags, the kernel (release, build, machine), its BTF (vmlinux
and the kvm module's), the tracefs format of every tracepoint the program
reads (bcc builds ``args`` from it), bcc's version and library, the kernel
headers bcc compiles with (the BCC_KERNEL_SOURCE environment and the -I
directories, by inode and modification time) and this cache's format. Any
change is a different key, so a miss: compiled again and stored.

Storage: one file per key in ``DIR`` (/var/cache/kvmtrace/bpf, or
$KVMTRACE_CACHE_DIR), JSON. The directories are created 0700; files are
written 0600 under a temporary name and renamed into place. Loading BPF
from a file as root is only safe if nobody else can write it: a directory
or file that is a symlink, not owned by the user, or writable by group or
others is not used (record compiles instead and says why), and files are
opened with O_NOFOLLOW. At most KEEP entries are kept (the oldest removed).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import os
import platform
import re
import stat
import struct

from . import tracefs

FORMAT = 1
DEFAULT_DIR = "/var/cache/kvmtrace/bpf"
DIR_ENV = "KVMTRACE_CACHE_DIR"
USE_ENV = "KVMTRACE_BPF_CACHE"  # =0: never use the cache (record --no-cache)
KEEP = 16
MAX_ENTRY = 16 << 20

BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_CALL = 1
BPF_CALL = 0x85
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_GET_NEXT_KEY = 0, 1, 2, 4
BPF_PROG_TYPE_KPROBE, BPF_PROG_TYPE_TRACEPOINT = 2, 5
PERCPU_TYPES = {5, 6, 10}  # percpu hash, percpu array, lru percpu hash
_AUTOLOAD_OTHER = (b"kprobe__", b"kretprobe__", b"raw_tracepoint__", b"kfunc__",
                   b"kretfunc__", b"lsm__")


class CacheError(Exception):
    """Why an entry was not used or not stored (one line)."""


def cache_dir() -> str:
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


# -- the key ------------------------------------------------------------------

_TP = re.compile(r"TRACEPOINT_PROBE\(\s*(\w+)\s*,\s*(\w+)\s*\)")
_ABS_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"(/[^"\n]+)"', re.M)


def _file_digest(h, path: str):
    try:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0")
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
            h.update(b"\0")
    except OSError as e:
        h.update(f"{path}: {e.errno}\0".encode())


def _stat_id(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{path}:{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"
    except OSError as e:
        return f"{path}:{e.errno}"


def key(text: str, cflags: list[str], bcc_version: str, bcc_library: str | None) -> str:
    """The cache key of ``text`` compiled with ``cflags`` on this host (hex)."""
    h = hashlib.sha256()
    u = os.uname()
    for part in (f"kvmtrace-bpf-cache {FORMAT}", u.release, u.version, u.machine,
                 bcc_version, _stat_id(bcc_library) if bcc_library else "-",
                 os.environ.get("BCC_KERNEL_SOURCE", ""),
                 _stat_id(os.environ["BCC_KERNEL_SOURCE"])
                 if os.environ.get("BCC_KERNEL_SOURCE") else "-",
                 _stat_id(f"/lib/modules/{u.release}/build")):
        h.update(part.encode() + b"\0")
    for flag in cflags:
        h.update(flag.encode() + b"\0")
        if flag.startswith("-I"):
            h.update(_stat_id(flag[2:]).encode() + b"\0")
    h.update(text.encode() + b"\0")
    # files the text includes by absolute path (probes/bpf/vma.h): their
    # contents, so a changed header is never served from an old compile
    for path in sorted(set(_ABS_INCLUDE.findall(text))):
        _file_digest(h, path)
    for name in ("vmlinux", "kvm"):
        _file_digest(h, f"/sys/kernel/btf/{name}")
    root = tracefs.find()
    for cat, ev in sorted(set(_TP.findall(text))):
        if root:
            _file_digest(h, os.path.join(root, "events", cat, ev, "format"))
        else:
            h.update(f"no tracefs {cat}:{ev}\0".encode())
    return h.hexdigest()


# -- safe storage ---------------------------------------------------------------

def _safe_dir(path: str, create: bool) -> bool:
    """Whether ``path`` is a directory only this user can write (made 0700 if
    missing and ``create``); CacheError for one that must not be used."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return False
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path} is not a directory (a symlink or a file): not used")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CacheError(f"{path} is writable by another user: not used")
    return True


def _check_tree(d: str, create: bool) -> bool:
    """The cache directory and its parent (kvmtrace's own two levels, made
    0700) are safe to load programs from; what is above them is the system's
    (made as usual if missing, 0755)."""
    d = os.path.abspath(d)
    parent = os.path.dirname(d)
    if create:
        os.makedirs(os.path.dirname(parent), exist_ok=True)
    if not _safe_dir(parent, create):
        return False
    return _safe_dir(d, create)


def lookup(k: str, d: str | None = None) -> dict | None:
    """The entry stored under key ``k``, None on a miss; CacheError for an
    entry or directory that must not be used."""
    d = d or cache_dir()
    if not _check_tree(d, create=False):
        return None
    path = os.path.join(d, k + ".json")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CacheError(f"{path} is a symlink: not used") from None
        raise CacheError(f"{path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise CacheError(f"{path} is not a 0600 file of this user: not used")
        if st.st_size > MAX_ENTRY:
            raise CacheError(f"{path} is too large: not used")
        raw = f.read(MAX_ENTRY + 1)
    try:
        entry = json.loads(raw)
    except ValueError:
        raise CacheError(f"{path} is not a cache entry (corrupt): not used") from None
    if not isinstance(entry, dict) or entry.get("key") != k or entry.get("format") != FORMAT:
        raise CacheError(f"{path} is not the entry for its key: not used")
    return entry


def store(k: str, entry: dict, d: str | None = None) -> str:
    """Write ``entry`` under key ``k`` (atomically); the path."""
    d = d or cache_dir()
    _check_tree(d, create=True)
    data = json.dumps(dict(entry, key=k, format=FORMAT)).encode()
    path = os.path.join(d, k + ".json")
    tmp = os.path.join(d, f".{k}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    _prune(d, keep=path)
    return path


def _prune(d: str, keep: str):
    try:
        names = [n for n in os.listdir(d) if n.endswith(".json")]
    except OSError:
        return
    entries = []
    for n in names:
        p = os.path.join(d, n)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and p != keep:
            entries.append((st.st_mtime_ns, p))
    for _, p in sorted(entries)[:max(0, len(entries) - (KEEP - 1))]:
        try:
            os.unlink(p)
        except OSError:
            pass


# -- capture: from a compiled bcc module -------------------------------------------

def _ld_imm64(insns: bytes):
    """(index, src_reg, imm) of every ld_imm64 in ``insns``."""
    i, n = 0, len(insns) // 8
    while i < n:
        code, regs, _, imm = struct.unpack_from("<BBhi", insns, i * 8)
        if code == BPF_LD_IMM64:
            yield i, regs >> 4, imm
            i += 2
            continue
        if code == BPF_CALL and regs >> 4 == BPF_PSEUDO_CALL:
            raise CacheError("a BPF-to-BPF call (not cached)")
        i += 1


def _lib():
    """libbcc with the prototypes of the table queries bcc's Python module
    does not declare (bcc_common.h)."""
    import bcc

    lib, c = bcc.lib, ctypes
    for name, res, args in (
            ("bpf_num_tables", c.c_size_t, [c.c_void_p]),
            ("bpf_table_name", c.c_char_p, [c.c_void_p, c.c_size_t]),
            ("bpf_table_fd_id", c.c_int, [c.c_void_p, c.c_size_t]),
            ("bpf_table_type_id", c.c_int, [c.c_void_p, c.c_size_t]),
            ("bpf_table_max_entries_id", c.c_size_t, [c.c_void_p, c.c_size_t]),
            ("bpf_table_flags_id", c.c_int, [c.c_void_p, c.c_size_t]),
            ("bpf_table_key_desc_id", c.c_char_p, [c.c_void_p, c.c_size_t]),
            ("bpf_table_leaf_desc_id", c.c_char_p, [c.c_void_p, c.c_size_t]),
            ("bpf_table_key_size_id", c.c_size_t, [c.c_void_p, c.c_size_t]),
            ("bpf_table_leaf_size_id", c.c_size_t, [c.c_void_p, c.c_size_t])):
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


def capture(b) -> dict:
    """What the cache keeps of a compiled bcc.BPF (before anything else is
    loaded from it); CacheError for a program this cache cannot reproduce."""
    lib, mod = _lib(), b.module
    maps, by_fd = [], {}
    for i in range(lib.bpf_num_tables(mod)):
        name = lib.bpf_table_name(mod, i)
        fd = lib.bpf_table_fd_id(mod, i)
        key_desc = lib.bpf_table_key_desc_id(mod, i)
        leaf_desc = lib.bpf_table_leaf_desc_id(mod, i)
        if fd < 0 or name is None:
            raise CacheError(f"table {i} has no map (not cached)")
        by_fd[fd] = len(maps)
        maps.append({"name": name.decode(), "type": lib.bpf_table_type_id(mod, i),
                     "key_size": lib.bpf_table_key_size_id(mod, i),
                     "value_size": lib.bpf_table_leaf_size_id(mod, i),
                     "max_entries": lib.bpf_table_max_entries_id(mod, i),
                     "flags": lib.bpf_table_flags_id(mod, i),
                     "key_desc": (key_desc or b"").decode(),
                     "leaf_desc": (leaf_desc or b"").decode()})
    funcs = {}
    for i in range(lib.bpf_num_functions(mod)):
        name = lib.bpf_function_name(mod, i)
        if name.startswith(_AUTOLOAD_OTHER):
            raise CacheError(f"{name.decode()} is attached by bcc in a way not cached")
        insns = b.dump_func(name)
        refs = []
        for at, src, imm in _ld_imm64(insns):
            if src == BPF_PSEUDO_MAP_FD:
                if imm not in by_fd:
                    raise CacheError(f"{name.decode()}: a map fd bcc does not list")
                refs.append([at, by_fd[imm]])
            elif src != 0:
                raise CacheError(f"{name.decode()}: ld_imm64 of kind {src} (not cached)")
        funcs[name.decode()] = {"insns": base64.b64encode(insns).decode(), "maps": refs}
    return {"maps": maps, "funcs": funcs,
            "license": (lib.bpf_module_license(mod) or b"GPL").decode(),
            "kern_version": lib.bpf_module_kern_version(mod)}


# -- load: a program from an entry --------------------------------------------------

def _bpf(cmd: int, attr: bytearray) -> int:
    from .bccload import _bpf as sys_bpf  # the raw syscall, shared with the callback loader
    return sys_bpf(cmd, attr)


def _possible_cpus() -> int:
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        n += int(b or a) - int(a) + 1
    return n


_CTYPES = {
    "_Bool": ctypes.c_bool, "char": ctypes.c_char, "wchar_t": ctypes.c_wchar,
    "unsigned char": ctypes.c_ubyte, "signed char": ctypes.c_byte, "short": ctypes.c_short,
    "unsigned short": ctypes.c_ushort, "int": ctypes.c_int, "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long, "unsigned long": ctypes.c_ulong, "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong, "float": ctypes.c_float,
    "double": ctypes.c_double, "long double": ctypes.c_longdouble,
    "__int128": ctypes.c_int64 * 2, "unsigned __int128": ctypes.c_uint64 * 2,
}


def ctype(desc):
    """The ctypes type of a bcc table key / value description (the JSON bcc's
    module gives for it; bcc.BPF._decode_table_type's rules, without bcc)."""
    if isinstance(desc, str):
        if desc not in _CTYPES:
            raise CacheError(f"unknown C type {desc!r} in a table description")
        return _CTYPES[desc]
    if not (isinstance(desc, list) and len(desc) >= 2 and isinstance(desc[1], list)):
        raise CacheError("malformed table description")
    anon, fields = [], []
    for t in desc[1]:
        if len(t) == 2:
            fields.append((t[0], ctype(t[1])))
        elif len(t) == 3 and isinstance(t[2], list):
            fields.append((t[0], ctype(t[1]) * t[2][0]))
        elif len(t) == 3 and isinstance(t[2], int):
            fields.append((t[0], ctype(t[1]), t[2]))
        elif len(t) == 3 and t[2] in ("union", "struct", "struct_packed"):
            name = t[0] or f"__anon{len(anon)}"
            if not t[0]:
                anon.append(name)
            fields.append((name, ctype(t)))
        else:
            raise CacheError("malformed table description")
    kind = desc[2] if len(desc) > 2 else "struct"
    base = ctypes.Union if kind == "union" else ctypes.Structure
    attrs = {"_anonymous_": anon, "_fields_": fields}
    if kind == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(desc[0]), (base,), attrs)


# -- attaching to a tracepoint without bcc (what bcc's bpf_attach_tracepoint does) --

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
PERF_TYPE_TRACEPOINT, PERF_SAMPLE_RAW, PERF_FLAG_FD_CLOEXEC = 2, 1 << 10, 1 << 3
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_DISABLE, PERF_EVENT_IOC_SET_BPF = 0x2400, 0x2401, 0x40042408


def attach_tracepoint(prog_fd: int, category: str, event: str) -> int:
    """Attach a loaded tracepoint program to ``category:event``; the perf
    event fd (closing it detaches). OSError when the kernel refuses."""
    root = tracefs.find()
    if root is None:
        raise OSError(errno.ENOENT, "tracefs is not mounted")
    with open(os.path.join(root, "events", category, event, "id")) as f:
        tp_id = int(f.read())
    attr = bytearray(128)  # struct perf_event_attr (PERF_ATTR_SIZE_VER0 = 64 used)
    struct.pack_into("<IIQQQ", attr, 0, PERF_TYPE_TRACEPOINT, 64, tp_id, 1, PERF_SAMPLE_RAW)
    return _perf_attach(attr, prog_fd, f"{category}:{event}")


_PMU = "/sys/bus/event_source/devices/kprobe"


def attach_kprobe(prog_fd: int, func: str, ret: bool = False) -> int:
    """Attach a loaded kprobe program to the entry (``ret``: the return) of
    kernel function ``func`` through the kprobe PMU, as bcc's
    bpf_attach_kprobe does (perf_event_open with the PMU's type, the
    function's name in config1, the retprobe bit of the PMU's format in
    config); the perf event fd (closing it detaches)."""
    with open(os.path.join(_PMU, "type")) as f:
        pmu = int(f.read())
    config = 0
    if ret:
        with open(os.path.join(_PMU, "format", "retprobe")) as f:  # "config:0"
            config = 1 << int(f.read().split(":")[1])
    name = ctypes.create_string_buffer(func.encode())
    attr = bytearray(128)  # PERF_ATTR_SIZE_VER1 = 72: config1 (kprobe_func), config2 (offset)
    struct.pack_into("<IIQQQ", attr, 0, pmu, 72, config, 1, 0)
    struct.pack_into("<QQ", attr, 56, ctypes.addressof(name), 0)
    return _perf_attach(attr, prog_fd, ("kretprobe " if ret else "kprobe ") + func)


def _perf_attach(attr: bytearray, prog_fd: int, what: str) -> int:
    """perf_event_open(attr) on CPU 0 for every process, then the program
    attached and the event enabled: the fd."""
    import fcntl

    struct.pack_into("<I", attr, 48, 1)  # wakeup_events
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    fd = libc.syscall(ctypes.c_long(_NR_PERF_EVENT_OPEN[platform.machine()]), buf,
                      ctypes.c_int(-1), ctypes.c_int(0), ctypes.c_int(-1),
                      ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open {what}: {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def detach(perf_fd: int):
    import fcntl

    try:
        fcntl.ioctl(perf_fd, PERF_EVENT_IOC_DISABLE, 0)
    except OSError:
        pass
    try:
        os.close(perf_fd)
    except OSError:
        pass


class CachedTable:
    """One map of a CachedBPF: what kvmtrace reads and writes of bcc's tables."""

    def __init__(self, name: str, fd: int, spec: dict, key_type, leaf_type):
        self.name, self.map_fd = name, fd
        self.map_type = spec["type"]
        self.max_entries = spec["max_entries"]
        self.Key, self.Leaf = key_type, leaf_type
        self._percpu = self.map_type in PERCPU_TYPES
        self._ncpu = _possible_cpus() if self._percpu else 1
        self._stride = (spec["value_size"] + 7) & ~7 if self._percpu else spec["value_size"]

    def _attr(self, key, value=None, flags=0) -> bytearray:
        attr = bytearray(32)
        struct.pack_into("<I4xQQQ", attr, 0, self.map_fd, ctypes.addressof(key),
                         ctypes.addressof(value) if value is not None else 0, flags)
        return attr

    def _key(self, k):
        return k if isinstance(k, self.Key) else self.Key(k)

    def __setitem__(self, k, v):
        k = self._key(k)
        if self._percpu:
            raise TypeError("writing per-CPU maps is not supported")
        v = v if isinstance(v, self.Leaf) else self.Leaf(v)
        _bpf(BPF_MAP_UPDATE_ELEM, self._attr(k, v))

    def __getitem__(self, k):
        k = self._key(k)
        buf = ctypes.create_string_buffer(self._stride * self._ncpu)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, self._attr(k, buf))
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(k) from None
            raise
        if self._percpu:
            return [self.Leaf.from_buffer_copy(buf.raw, c * self._stride)
                    if issubclass(self.Leaf, ctypes.Structure) else
                    self.Leaf.from_buffer_copy(buf.raw, c * self._stride).value
                    for c in range(self._ncpu)]
        return self.Leaf.from_buffer_copy(buf.raw)

    def keys(self):
        out, prev = [], None
        nxt = self.Key()
        while True:
            attr = bytearray(32)
            struct.pack_into("<I4xQQ", attr, 0, self.map_fd,
                             ctypes.addressof(prev) if prev is not None else 0,
                             ctypes.addressof(nxt))
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt)
            prev, nxt = nxt, self.Key()
            if len(out) > self.max_entries:  # a map changing under the walk
                return out

    def items(self):
        out = []
        for k in self.keys():
            try:
                out.append((k, self[k]))
            except KeyError:  # deleted meanwhile
                continue
        return out


class _Function:
    def __init__(self, name: bytes, fd: int):
        self.name, self.fd = name, fd


class CachedBPF:
    """A program loaded from a cache entry, with the bits of bcc.BPF's
    interface kvmtrace uses. bcc is not imported (0.04 to 0.1 s and about
    70 MB of memory: its clang is what the cache avoids)."""

    def __init__(self, entry: dict):
        self.funcs: dict[bytes, object] = {}
        self.tracepoint_fds: dict[bytes, int] = {}
        self.kprobe_fds: dict[str, int] = {}
        self._fds: list[int] = []
        self._entry = entry
        self.tables: dict[str, CachedTable] = {}
        try:
            for spec in entry["maps"]:
                fd = self._create_map(spec)
                self._fds.append(fd)
                self.tables[spec["name"]] = CachedTable(
                    spec["name"], fd, spec, self._ctype(spec["key_desc"]),
                    self._ctype(spec["leaf_desc"]))
            self._map_fds = list(self._fds)  # index in the entry's maps -> fd
            for name in entry["funcs"]:
                if name.startswith("tracepoint__"):
                    tp = name[len("tracepoint__"):].replace("__", ":")
                    self.attach_tracepoint(tp=tp, fn_name=name)
        except BaseException:
            self.cleanup()
            raise

    @staticmethod
    def _ctype(desc: str):
        if not desc:
            return ctypes.c_uint8
        return ctype(json.loads(desc))

    @staticmethod
    def _create_map(spec: dict) -> int:
        attr = bytearray(72)
        struct.pack_into("<IIIII", attr, 0, spec["type"], spec["key_size"],
                         spec["value_size"], spec["max_entries"], spec["flags"])
        attr[28:44] = spec["name"].encode()[:15].ljust(16, b"\0")  # map_name
        try:
            return _bpf(BPF_MAP_CREATE, attr)
        except OSError as e:
            from .bccload import BPFLoadError
            raise BPFLoadError(f"creating map {spec['name']}: {e.strerror}") from None

    def __getitem__(self, name):
        name = name.decode() if isinstance(name, bytes) else name
        return self.tables[name]

    def dump_func(self, name) -> bytes:
        """``name``'s instructions with this program's map fds in them."""
        name = name.decode() if isinstance(name, bytes) else name
        f = self._entry["funcs"].get(name)
        if f is None:
            raise CacheError(f"no function {name} in the cached program")
        insns = bytearray(base64.b64decode(f["insns"]))
        for at, m in f["maps"]:
            struct.pack_into("<i", insns, at * 8 + 4, self._map_fds[m])
        return bytes(insns)

    def load_func(self, name, prog_type: int = BPF_PROG_TYPE_TRACEPOINT):
        key = name.encode() if isinstance(name, str) else name
        if key in self.funcs:
            return self.funcs[key]
        from .bccload import prog_load

        fd = prog_load(self.dump_func(key), key.decode(), 0, [], prog_type=prog_type,
                       license=self._entry.get("license", "GPL"))
        self.funcs[key] = _Function(key, fd)
        return self.funcs[key]

    def attach_tracepoint(self, tp=b"", fn_name=b""):
        tp = tp.encode() if isinstance(tp, str) else tp
        fn = self.load_func(fn_name, BPF_PROG_TYPE_TRACEPOINT)
        self.attach_fd(fn.fd, tp.decode())
        return self

    def attach_kprobe(self, event=b"", fn_name=b""):
        return self._kprobe(event, fn_name, False)

    def attach_kretprobe(self, event=b"", fn_name=b""):
        return self._kprobe(event, fn_name, True)

    def _kprobe(self, event, fn_name, ret: bool):
        event = event.decode() if isinstance(event, bytes) else event
        fn = self.load_func(fn_name, BPF_PROG_TYPE_KPROBE)
        try:
            fd = attach_kprobe(fn.fd, event, ret)
        except OSError as e:
            from .bccload import BPFLoadError
            raise BPFLoadError(f"attaching to {event} failed: {e.strerror}") from None
        self.kprobe_fds[("kretprobe:" if ret else "kprobe:") + event] = fd
        return self

    def attach_fd(self, prog_fd: int, tp: str) -> int:
        """Attach a loaded program to tracepoint ``tp`` ("category:event")."""
        category, event = tp.split(":")
        try:
            fd = attach_tracepoint(prog_fd, category, event)
        except OSError as e:
            from .bccload import BPFLoadError
            raise BPFLoadError(f"attaching to {tp} failed: {e.strerror}") from None
        self.tracepoint_fds[tp.encode()] = fd
        return fd

    def function(self, name: str, fd: int):
        """Record a program loaded for this object (bccload.load_with_callback)."""
        self.funcs[name.encode()] = _Function(name.encode(), fd)

    def cleanup(self):
        for fds in (self.tracepoint_fds, self.kprobe_fds):
            for k, fd in list(fds.items()):
                detach(fd)
                del fds[k]
        for name, fn in list(self.funcs.items()):
            try:
                os.close(fn.fd)
            except OSError:
                pass
            del self.funcs[name]
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
