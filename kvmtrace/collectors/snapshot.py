"""The live state of a running VM: its memslots and its VMAs, read now.

Sources, best first:

- memslots: BPF iterator on the process's open files (iter/task_file, Linux
  5.8+; the kvm_memslots id_hash walk needs 5.17+): for each "kvm-vm" file,
  ``struct kvm`` -> ``memslots[as_id]`` -> every ``struct kvm_memory_slot``
  (probes/bpf/iter_kvm.c). No kprobe and no fentry: iterators load on hosts
  where fentry is refused (measured on the KVM-PVM host: fentry EPERM,
  iter/task_file and iter/task_vma load, attach and read). There is no other
  source: KVM's debugfs directory (/sys/kernel/debug/kvm/PID-FD/) has
  statistics only, and /proc/PID/fdinfo of the VM fd has pos, flags, mnt_id
  and ino.
- VMAs: BPF iterator on the process's VMAs (iter/task_vma, Linux 5.12+):
  vm_flags and vm_page_prot as the kernel holds them; else /proc/PID/smaps
  (no page protection: a VMA that is neither VM_PFNMAP nor VM_MIXEDMAP is
  write-back by construction on x86, see analysis/vmas.py).

Every struct member is read at an offset from the running kernel's BTF. The
record layouts are declared once below (``SLOT_FIELDS``, ``VMA_FIELDS``);
the C structs handed to bcc and the numpy dtypes that decode the iterator's
output are both generated from them. bcc compiles the program; it is loaded
here as BPF_PROG_TYPE_TRACING with expected_attach_type BPF_TRACE_ITER
(bcc 0.26 has no iterator attach), linked with BPF_LINK_CREATE and read
through BPF_ITER_CREATE's fd (all uAPI, include/uapi/linux/bpf.h).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a table is made: record --pid reads the
    import pandas as pd  # memslots before its probes attach, and pandas takes 0.34 s to import

from ..host import bccload, bpfcache
from ..host import btf as btf_mod
from ..host import headers as bcc_headers
from ..host import procfs
from ..probes import codegen
from ..probes.events import VMA_NAME_LEN, numpy_type

_HERE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "probes", "bpf")

# -- record layouts, declared once ------------------------------------------
REC_HEADER, REC_SLOT, REC_TRAILER = 1, 2, 3
TRAILER_OK, HEADER_NO_SLOTS, TRAILER_CUT = 0, 1, 2

SLOT_FIELDS = (  # (name, type, meaning)
    ("kind", "u32", "1 header (one per address space), 2 slot, 3 trailer"),
    ("fd", "u32", "the VM's fd in the VMM"),
    ("tgid", "u32", "the VMM process"),
    ("as_id", "u32", "address space walked"),
    ("slot", "u32", "kvm_memory_slot.id (slot number within its address space)"),
    ("slot_as_id", "u32", "kvm_memory_slot.as_id"),
    ("flags", "u32", "kvm_memory_slot.flags (KVM_MEM_*)"),
    ("status", "u32", "header: 1 no kvm_memslots; trailer: 2 the walk was cut short"),
    ("count", "u32", "trailer: slots seen in this address space"),
    ("pad", "u32", ""),
    ("kvm", "u64", "struct kvm * (identifies the VM)"),
    ("generation", "u64", "kvm_memslots.generation (header: before, trailer: after)"),
    ("base_gfn", "u64", "first guest frame"),
    ("npages", "u64", "pages"),
    ("hva", "u64", "userspace_addr"),
    ("gmem_pgoff", "u64", "guest_memfd offset (pages), where the kernel has guest_memfd"),
    ("gmem_file", "u64", "guest_memfd file (non-zero: the slot has one)"),
)

VMA_FIELDS = (
    ("start", "u64", "vm_start"), ("end", "u64", "vm_end"), ("vm_flags", "u64", "vm_flags"),
    ("vm_page_prot", "u64", "vm_page_prot"), ("vm_pgoff", "u64", "vm_pgoff"),
    ("ino", "u64", "vm_file->f_inode->i_ino"),
    ("dev", "u32", "vm_file->f_inode->i_sb->s_dev"), ("has_file", "u32", "vm_file != NULL"),
    ("tgid", "u32", "the process"), ("magic", "u32", "vm_file->f_inode->i_sb->s_magic"),
    (  # its name as stored, as the memslot event has it (probes/bpf/vma_name.h)
        "name", f"char[{VMA_NAME_LEN}]", "its file's dentry name, or a special mapping's"),
)

# KVM's frame numbers count the host's pages (PAGE_SHIFT: 12, 14 or 16 on arm64)
PAGE_SHIFT = os.sysconf("SC_PAGE_SIZE").bit_length() - 1
SLOT_DTYPE = np.dtype([(n, numpy_type(t)) for n, t, _ in SLOT_FIELDS])
VMA_DTYPE = np.dtype([(n, numpy_type(t)) for n, t, _ in VMA_FIELDS])

# Members read (struct, member path); an optional one may be missing (-1).
MEMBERS = (
    ("task_struct", "tgid"), ("file", "f_path.dentry"), ("file", "private_data"),
    ("dentry", "d_name.name"), ("bpf_iter__task_file", "meta"),
    ("bpf_iter__task_file", "task"), ("bpf_iter__task_file", "fd"),
    ("bpf_iter__task_file", "file"), ("bpf_iter__task_vma", "meta"),
    ("bpf_iter__task_vma", "task"), ("bpf_iter__task_vma", "vma"),
    ("kvm", "memslots"), ("kvm_memslots", "generation"), ("kvm_memslots", "id_hash"),
    ("kvm_memslots", "node_idx"), ("hlist_node", "next"),
    ("kvm_memory_slot", "id"), ("kvm_memory_slot", "as_id"), ("kvm_memory_slot", "flags"),
    ("kvm_memory_slot", "base_gfn"), ("kvm_memory_slot", "npages"),
    ("kvm_memory_slot", "userspace_addr"),
)
MEMBERS = tuple(dict.fromkeys(MEMBERS + btf_mod.VMA_LOOKUP_MEMBERS))  # each define once
OPTIONAL = (("kvm_memory_slot", "gmem.file"), ("kvm_memory_slot", "gmem.pgoff"))

SEQ_BUFFER = 8 * 4096  # a BPF iterator's seq buffer per object (kernel/bpf/bpf_iter.c)
MAX_SLOTS = SEQ_BUFFER // SLOT_DTYPE.itemsize - 8  # records per VM that fit, with frames
GEN_UPDATE_IN_PROGRESS = 1 << 63  # KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS (virt/kvm/kvm_main.c)
RETRIES = 5
# More than any process can produce: 65,530 VMAs (vm.max_map_count's default)
# of 64 bytes is 4 MiB; one VM's memslot records fit one 32 KiB buffer.
MAX_ITER_BYTES = 64 << 20
# The longest a recording window's recorder may take to compile and attach
# (bcc under TCG on a busy 2-core host took 427 s) before query gives up.
WINDOW_START_LIMIT = 3600

# uAPI numbers (include/uapi/linux/bpf.h)
BPF_PROG_LOAD, BPF_LINK_CREATE, BPF_ITER_CREATE = 5, 28, 33
BPF_PROG_TYPE_TRACING, BPF_TRACE_ITER = 26, 28
BTF_KIND_FUNC = 12
_NR_BPF = {"x86_64": 321, "aarch64": 280}


class SnapshotError(RuntimeError):
    """A source could not be used; the message says why, in one line."""


def _c_struct(name: str, fields) -> str:
    body = "".join(f"    {codegen.c_decl(t, n)};\n" for n, t, _ in fields)
    return f"struct {name} {{\n{body}}};\n"


def _c_assert(name: str, dtype: np.dtype) -> str:
    return (f"_Static_assert(sizeof(struct {name}) == {dtype.itemsize}, "
            f"\"{name} differs from its Python layout\");\n")


# -- BTF facts ----------------------------------------------------------------
def _array_len(b: btf_mod.BTF, struct_name: str, member: str) -> int:
    """Number of elements of an array member (BTF_KIND_ARRAY's nelems)."""
    tid = b._find(struct_name, btf_mod.KIND_STRUCT)
    found = b._member(tid, member) if tid else None
    if not found:
        raise btf_mod.BTFError(f"struct {struct_name} has no member {member}")
    t = b._type(b._resolve(found[1]))
    if b._kind(t) != btf_mod.KIND_ARRAY:
        raise btf_mod.BTFError(f"{struct_name}.{member} is not an array")
    arr = ctypes.cast(ctypes.addressof(t.contents) + ctypes.sizeof(btf_mod._BtfType),
                      ctypes.POINTER(ctypes.c_uint32))
    return int(arr[2])  # struct btf_array { type, index_type, nelems }


def _struct_size(b: btf_mod.BTF, name: str) -> int:
    tid = b._find(name, btf_mod.KIND_STRUCT)
    if not tid:
        raise btf_mod.BTFError(f"struct {name} not in {b.source}")
    return int(b._type(tid).contents.size_or_type)


def kernel_layout() -> dict:
    """Offsets and sizes the iterator program needs, from the running kernel's
    BTF; SnapshotError says which one is missing."""
    try:
        b = btf_mod.BTF("kvm")
    except btf_mod.BTFError as e:
        raise SnapshotError(str(e)) from None
    try:
        out = {"offsets": {}, "source": b.source}
        for m in MEMBERS:
            out["offsets"][m] = b.member_offset(*m)
        for m in OPTIONAL:
            try:
                out["offsets"][m] = b.member_offset(*m)
            except btf_mod.BTFError:
                out["offsets"][m] = -1
        out["nr_address_spaces"] = _array_len(b, "kvm", "memslots")
        out["id_hash_buckets"] = _array_len(b, "kvm_memslots", "id_hash")
        out["hlist_node_size"] = _struct_size(b, "hlist_node")
        out["iter_btf_ids"] = {t: b._find(f"bpf_iter_{t}", BTF_KIND_FUNC)
                               for t in ("task_file", "task_vma")}
        return out
    except btf_mod.BTFError as e:
        raise SnapshotError(f"the kernel's BTF lacks what the memslot walk reads: {e} "
                            "(struct kvm_memslots with id_hash: Linux 5.17+)") from None
    finally:
        b.close()


def program_text(layout: dict) -> tuple[str, list[str]]:
    """(C text, -D cflags) of probes/bpf/iter_kvm.c for this kernel."""
    defs = [f"-D{'KT_OFF_' + s + '__' + p.replace('.', '__')}={v}"
            for (s, p), v in layout["offsets"].items()]
    n_as, buckets = layout["nr_address_spaces"], layout["id_hash_buckets"]
    defs += [f"-DKT_NR_ADDRESS_SPACES={n_as}", f"-DKT_ID_HASH_BUCKETS={buckets}",
             f"-DKT_SIZE_hlist_node={layout['hlist_node_size']}",
             f"-DKT_MAX_SLOTS={MAX_SLOTS}",
             # every bucket of every address space, plus up to MAX_SLOTS nodes
             f"-DKT_MAX_STEPS={n_as * (buckets + 1) + MAX_SLOTS + 1}",
             f"-DKT_REC_HEADER={REC_HEADER}", f"-DKT_REC_SLOT={REC_SLOT}",
             f"-DKT_REC_TRAILER={REC_TRAILER}"]
    with open(os.path.join(_HERE, "iter_kvm.c")) as f:
        body = f.read()
    text = (_c_struct("kvmtrace_slot_rec", SLOT_FIELDS) + _c_assert("kvmtrace_slot_rec", SLOT_DTYPE)
            + _c_struct("kvmtrace_vma_rec", VMA_FIELDS) + _c_assert("kvmtrace_vma_rec", VMA_DTYPE)
            + codegen.KREAD_MACRO + codegen.include_line(os.path.join(_HERE, "vma_name.h"))
            + body)
    return text, defs


# -- raw bpf() ------------------------------------------------------------------
def _bpf(cmd: int, attr: bytearray) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise SnapshotError(f"bpf() syscall number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), buf, ctypes.c_long(len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def _verifier_reason(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not (ln.startswith(("processed ", "verification time", "stack depth", ";"))
                or ln[:1].isdigit() or ln.startswith(("R0", "R1", "R2", "from "))):
            return ln[:200]
    return lines[-1][:200] if lines else ""


def load_iter_prog(insns: bytes, name: str, attach_btf_id: int) -> int:
    """BPF_PROG_LOAD as BPF_PROG_TYPE_TRACING / BPF_TRACE_ITER for the
    iterator target whose ``bpf_iter_<target>`` FUNC is ``attach_btf_id``."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")

    def attempt(log):
        attr = bytearray(144)
        struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_TRACING, len(insns) // 8,
                         ctypes.addressof(code), ctypes.addressof(lic), 1 if log else 0,
                         len(log) if log else 0, ctypes.addressof(log) if log else 0)
        attr[48:64] = name.encode()[:15].ljust(16, b"\0")  # prog_name
        struct.pack_into("<I", attr, 68, BPF_TRACE_ITER)      # expected_attach_type
        struct.pack_into("<I", attr, 108, attach_btf_id)      # attach_btf_id (vmlinux)
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return attempt(None)
    except OSError:
        pass
    log = ctypes.create_string_buffer(4 << 20)
    try:
        return attempt(log)
    except OSError as e:
        why = _verifier_reason(log.value.decode(errors="replace"))
        raise SnapshotError(f"BPF iterator program {name} refused: {e.strerror}"
                            + (f" ({why})" if why else "")) from None


def link_iter(prog_fd: int, pid: int | None) -> int:
    """BPF_LINK_CREATE for an iterator; with the kernel's own task filter
    (union bpf_iter_link_info.task.pid, Linux 6.1+) when it takes one."""
    if pid:
        # .task.pid (the process), not .task.tid: on the 6.18 development host
        # a task_vma iterator filtered by tid never ends once its output needs
        # a second read (measured: the last 34 VMAs of a 545-VMA process came
        # back on every read, 283 MB in 3 s); by pid it ends.
        info = ctypes.create_string_buffer(struct.pack("<III", 0, pid, 0), 16)
        attr = bytearray(64)
        struct.pack_into("<IIII", attr, 0, prog_fd, 0, BPF_TRACE_ITER, 0)
        struct.pack_into("<QI", attr, 16, ctypes.addressof(info), 16)
        try:
            return _bpf(BPF_LINK_CREATE, attr)
        except OSError:
            pass  # an older kernel: no task filter; the program filters by tgid itself
    attr = bytearray(64)
    struct.pack_into("<IIII", attr, 0, prog_fd, 0, BPF_TRACE_ITER, 0)
    try:
        return _bpf(BPF_LINK_CREATE, attr)
    except OSError as e:
        raise SnapshotError(f"attaching the BPF iterator failed: {e.strerror}") from None


def read_iter(link_fd: int) -> bytes:
    attr = bytearray(8)
    struct.pack_into("<I", attr, 0, link_fd)
    try:
        fd = _bpf(BPF_ITER_CREATE, attr)
    except OSError as e:
        raise SnapshotError(f"creating the BPF iterator failed: {e.strerror}") from None
    chunks, total = [], 0
    try:
        while True:
            if total > MAX_ITER_BYTES:
                raise SnapshotError(f"the BPF iterator did not end after {total:,} bytes "
                                    "(a kernel iterator bug?)")
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError as e:
                raise SnapshotError(f"reading the BPF iterator failed: {e.strerror}"
                                    + (" (one VM's records overflowed the iterator's buffer)"
                                       if e.errno == 7 else "")) from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)


# -- the reader ---------------------------------------------------------------
class IteratorReader:
    """The iterator programs, compiled and loaded once, read as often as asked.

    ``IteratorReader()`` raises SnapshotError (one line) when this host cannot
    run them; ``memslots(pid)`` / ``vmas(pid)`` read the live state. ``cache``
    (as record's): load the compiled program from the BPF compile cache
    (host/bpfcache.py) when it holds it; default unless $KVMTRACE_BPF_CACHE=0.
    bcc's compile is most of a query's time (seconds here, minutes under TCG)."""

    def __init__(self, cache: bool | None = None):
        self.b = None
        self.fds: list[int] = []
        self._tgid = None  # what kvmtrace_iter_tgid holds
        self.layout = kernel_layout()
        ids = self.layout["iter_btf_ids"]
        for target, tid in ids.items():
            if not tid:
                raise SnapshotError(f"this kernel has no BPF iterator target {target} "
                                    "(bpf_iter_" + target + " not in BTF)")
        hdr = bcc_headers.find()
        if hdr is None:
            raise SnapshotError(bcc_headers.missing_hint())
        cflags = bcc_headers.apply(hdr)
        text, defs = program_text(self.layout)
        if cache is None:
            cache = os.environ.get(bpfcache.USE_ENV) != "0"
        t0 = time.perf_counter()
        try:
            self.b = bccload.load(text, cflags + defs, cache=cache)
        except bccload.BPFLoadError as e:
            raise SnapshotError(f"the iterator program did not compile: {e}") from None
        self.cache = self.b.kvmtrace_cache  # hit / miss / off / unused, and why
        self.compile_ms = (time.perf_counter() - t0) * 1e3
        try:
            self.prog = {}
            for fn, target in (("kvmtrace_iter_memslots", "task_file"),
                               ("kvmtrace_iter_vmas", "task_vma")):
                fd = load_iter_prog(self.b.dump_func(fn), fn, ids[target])
                self.fds.append(fd)
                self.prog[target] = fd
        except Exception:
            self.close()
            raise
        self.load_ms = (time.perf_counter() - t0) * 1e3 - self.compile_ms

    def close(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        if self.b is not None:
            self.b.cleanup()
            self.b = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self, target: str, pid: int) -> bytes:
        # Written only when it changes: a map update from user space holds the
        # CPU's bpf_prog_active (kernel/bpf/syscall.c bpf_disable_instrumentation)
        # and, on a preemptible kernel (7.x's PREEMPT_LAZY), whatever runs on that
        # CPU while this task is preempted there has its kprobe and tracepoint
        # programs skipped: events missing with no ring ever full (progstats.py).
        if self._tgid != pid:
            self.b["kvmtrace_iter_tgid"][ctypes.c_int(0)] = ctypes.c_uint32(pid)
            self._tgid = pid
        link = link_iter(self.prog[target], pid)
        try:
            return read_iter(link)
        finally:
            os.close(link)

    def memslots(self, pid: int) -> tuple[pd.DataFrame, list[dict]]:
        """(one row per memslot of every VM of ``pid``, one dict per VM fd with
        generation, slot count and whether the read was complete)."""
        import pandas as pd

        last_why = ""
        for _ in range(RETRIES):
            raw = np.frombuffer(self._run("task_file", pid), dtype=SLOT_DTYPE)
            slots, vms, why = _decode_slots(raw)
            if not why:
                return slots, vms
            last_why = why
            time.sleep(0.01)
        raise SnapshotError(f"the memslots changed during each of {RETRIES} reads ({last_why})")

    def vmas(self, pid: int) -> pd.DataFrame:
        import pandas as pd

        raw = np.frombuffer(self._run("task_vma", pid), dtype=VMA_DTYPE)
        df = pd.DataFrame({n: codegen.text_column(raw[n]) if n == "name" else raw[n]
                           for n in VMA_DTYPE.names})
        # one task's VMAs (the kernel's tid filter); without it (before 6.1) every
        # thread of the process walks the same mm: keep each VMA once
        df = df[df["tgid"] == pid].drop(columns="tgid").drop_duplicates()
        for c in ("start", "end", "vm_flags", "vm_page_prot", "vm_pgoff", "ino"):
            df[c] = pd.array([int(x) for x in df[c]], dtype="UInt64")  # exact (bit 63)
        return df.sort_values("start").reset_index(drop=True)


def _decode_slots(raw: np.ndarray) -> tuple[pd.DataFrame, list[dict], str]:
    """Rows, per-VM summaries, and why the read must be retried ('' if not)."""
    import pandas as pd

    vms, rows, why = {}, [], ""
    skip = False
    for r in raw:
        key = (int(r["fd"]), int(r["kvm"]))
        if int(r["kind"]) == REC_HEADER and int(r["as_id"]) == 0:
            # a visit of a VM file begins: a VM seen already is another thread
            # sharing the file table showing it again
            skip = key in vms
        if skip:
            continue
        vm = vms.setdefault(key, {"vm_fd": key[0], "kvm": key[1], "address_spaces": [],
                                  "slots": 0, "complete": True})
        kind, as_id = int(r["kind"]), int(r["as_id"])
        gen = int(r["generation"])
        if kind == REC_HEADER:
            vm["address_spaces"].append({"as_id": as_id, "generation": gen,
                                         "present": int(r["status"]) != HEADER_NO_SLOTS})
        elif kind == REC_TRAILER:
            a = next((x for x in vm["address_spaces"] if x["as_id"] == as_id), None)
            if a is None or a["generation"] != gen or gen & GEN_UPDATE_IN_PROGRESS:
                why = f"VM fd {key[0]} address space {as_id}: generation moved during the walk"
            if int(r["status"]) == TRAILER_CUT or int(r["count"]) > MAX_SLOTS:
                vm["complete"] = False
            if a is not None:
                a["slots"] = int(r["count"])
        elif kind == REC_SLOT:
            vm["slots"] += 1
            rows.append({"vm_fd": key[0], "as_id": int(r["slot_as_id"]), "slot": int(r["slot"]),
                         "gpa": int(r["base_gfn"]) << PAGE_SHIFT,
                         "size": int(r["npages"]) << PAGE_SHIFT,
                         "hva": int(r["hva"]), "flags": int(r["flags"]),
                         "gmem": bool(r["gmem_file"]), "gmem_offset": int(r["gmem_pgoff"]) << PAGE_SHIFT,
                         "generation": gen})
    cols = ["vm_fd", "as_id", "slot", "gpa", "size", "hva", "flags", "gmem", "gmem_offset",
            "generation"]
    df = pd.DataFrame(rows, columns=cols)
    if len(df):
        df = df.sort_values(["vm_fd", "as_id", "gpa"]).reset_index(drop=True)
        for c in ("gpa", "size", "hva", "gmem_offset", "generation"):
            df[c] = pd.array([int(x) for x in df[c]], dtype="UInt64")
    return df, list(vms.values()), why


def recorded_memslots(reader: IteratorReader, pid: int, ts: int) -> list[dict]:
    """The rows of a recording's ``memslot_snapshot`` table for ``pid`` now:
    every memslot of its VMs, each with the VMA that holds its first byte
    (vm_flags, vm_page_prot as the kernel has them). Raises SnapshotError."""
    slots, _ = reader.memslots(pid)
    try:
        vmas = reader.vmas(pid)
    except SnapshotError:
        vmas = None
    rows = []
    for r in slots.itertuples(index=False):  # a VM has a few slots, at most a few hundred
        row = {"ts": ts, "pid": pid, "vm_fd": r.vm_fd, "as_id": r.as_id, "slot": r.slot,
               "flags": r.flags, "gpa": int(r.gpa), "size": int(r.size), "hva": int(r.hva),
               "generation": int(r.generation), "gmem": bool(r.gmem),
               "gmem_offset": int(r.gmem_offset), "vma_found": False, "vma_start": 0,
               "vma_end": 0, "vm_flags": 0, "vm_page_prot": 0, "vm_pgoff": 0,
               "vma_has_file": False, "vma_ino": 0, "vma_dev": 0, "vma_fs_magic": 0,
               "vma_name": ""}
        if vmas is not None and len(vmas):
            hit = vmas[(vmas["start"] <= int(r.hva)) & (vmas["end"] > int(r.hva))]
            if len(hit):
                v = hit.iloc[0]
                row.update(vma_found=True, vma_start=int(v["start"]), vma_end=int(v["end"]),
                           vm_flags=int(v["vm_flags"]), vm_page_prot=int(v["vm_page_prot"]),
                           vm_pgoff=int(v["vm_pgoff"]), vma_has_file=bool(v["has_file"]),
                           vma_ino=int(v["ino"]), vma_dev=int(v["dev"]),
                           vma_fs_magic=int(v["magic"]), vma_name=str(v["name"]))
        rows.append(row)
    return rows


# -- the snapshot ------------------------------------------------------------
@dataclass
class Snapshot:
    """What a query sees of one process now."""
    pid: int
    comm: str
    vm_fds: list[int]                 # "anon_inode:kvm-vm" fds in /proc/PID/fd
    memslots: pd.DataFrame | None     # None: not readable here (memslots_source says why)
    memslots_source: str
    vms: list[dict]
    vmas: pd.DataFrame | None         # BPF task_vma rows, None when unavailable
    vmas_source: str
    smaps: list[dict]                 # /proc/PID/smaps (names, VmFlags, page sizes)
    context: dict                     # host context (arch, kvm flavour, PAT, PAT list, RAM)
    taken_ns: int = 0
    timings_ms: dict = field(default_factory=dict)


def vm_fds(pid: int) -> list[int]:
    out = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        raise SnapshotError(f"no process {pid}") from None
    except PermissionError:
        raise SnapshotError(f"cannot read /proc/{pid}/fd (needs root)") from None
    for fd in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:kvm-vm":
                out.append(int(fd))
        except OSError:
            continue
    return sorted(out)


def take(pid: int, reader: IteratorReader | None = None) -> Snapshot:
    """Read the memslots and VMAs of ``pid`` now (root). With no ``reader``
    one is made and closed here; a failing iterator leaves the matching field
    None with the reason in ``*_source``."""
    from . import context

    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except FileNotFoundError:
        raise SnapshotError(f"no process {pid}") from None
    fds = vm_fds(pid)
    own = reader is None
    why = ""
    timings = {}
    if own:
        try:
            reader = IteratorReader()
        except SnapshotError as e:
            reader, why = None, str(e)
    try:
        memslots, vms, vmas = None, [], None
        ms_src = vma_src = why
        if reader is not None:
            timings = {"compile": round(reader.compile_ms, 1), "load": round(reader.load_ms, 1)}
            t0 = time.perf_counter()
            try:
                memslots, vms = reader.memslots(pid)
                ms_src = "BPF iterator (task_file): struct kvm -> memslots, read now"
                cut = [str(v["vm_fd"]) for v in vms if not v["complete"]]
                if cut:
                    ms_src += (f" (VM fd {', '.join(cut)}: only the first {MAX_SLOTS} slots fit "
                               "the iterator's buffer; the rest are not shown)")
            except SnapshotError as e:
                ms_src = str(e)
            t1 = time.perf_counter()
            try:
                vmas = reader.vmas(pid)
                vma_src = "BPF iterator (task_vma): vm_flags and vm_page_prot, read now"
            except SnapshotError as e:
                vma_src = str(e)
            timings.update(memslots=round((t1 - t0) * 1e3, 2),
                           vmas=round((time.perf_counter() - t1) * 1e3, 2))
        smaps = procfs.read_smaps(pid)
        if smaps is None:
            raise SnapshotError(f"process {pid} exited while it was read")
        ctx = context.host_context()
        if ctx.get("arch") == "aarch64":
            ctx["stage2_dump"] = stage2_dump(pid, fds)
        return Snapshot(pid=pid, comm=comm, vm_fds=fds, memslots=memslots,
                        memslots_source=ms_src, vms=vms, vmas=vmas, vmas_source=vma_src,
                        smaps=smaps, context=ctx,
                        taken_ns=time.monotonic_ns(), timings_ms=timings)
    finally:
        if own and reader is not None:
            reader.close()


DEBUGFS_KVM = "/sys/kernel/debug/kvm"


def stage2_dump(pid: int, fds, debugfs_kvm: str = DEBUGFS_KVM) -> dict:
    """arm64: KVM's stage-2 page-table dump per VM (arch/arm64/kvm/ptdump.c,
    6.15+ built with CONFIG_PTDUMP_STAGE2_DEBUGFS):
    /sys/kernel/debug/kvm/PID-FD/stage2_page_tables. {"paths": [...]} when
    present, else {"paths": [], "why": ...}."""
    if not os.path.isdir(debugfs_kvm):
        return {"paths": [], "why": f"no stage-2 page-table dump: {debugfs_kvm} is absent "
                                    "(debugfs not mounted?)"}
    paths = [p for p in (f"{debugfs_kvm}/{pid}-{fd}/stage2_page_tables" for fd in fds)
             if os.path.exists(p)]
    if paths:
        return {"paths": paths}
    return {"paths": [], "why": "this kernel has no stage-2 page-table dump (no "
                                f"{debugfs_kvm}/{pid}-FD/stage2_page_tables: "
                                "CONFIG_PTDUMP_STAGE2_DEBUGFS, 6.15+, not built in)"}


def sources() -> dict:
    """What this host offers for a live query (for doctor): each source, ok or why not."""
    out = {}
    try:
        with IteratorReader() as r:
            out["memslots"] = (True, f"BPF iterator task_file loaded ({r.load_ms:.0f} ms after "
                                     f"a {r.compile_ms:.0f} ms compile)")
            out["vmas"] = (True, "BPF iterator task_vma loaded")
    except SnapshotError as e:
        out["memslots"] = (False, str(e))
        out["vmas"] = (False, f"{e}; /proc/PID/smaps only (no vm_page_prot)")
    return out


# -- a live recording window ---------------------------------------------------
def record_window(pid: int, seconds: float, workdir: str | None = None) -> tuple[str, str]:
    """Record ``pid`` for ``seconds`` with ``kvmtrace record`` (a subprocess:
    its own signal handling and file writing); (recording path, its stderr).

    The probe set is ``faults`` (memslots, faults, invalidations: what query
    reads), the same program a ``record --probes faults`` compiled before, so
    the compile cache usually has it. ``--duration`` counts from the probes'
    attach; compiling them first can take minutes on a slow or busy host, so
    the only limit here is a generous one against a recorder that hangs."""
    d = tempfile.mkdtemp(prefix="kvmtrace-query-", dir=workdir)
    path = os.path.join(d, "window.kvt")
    cmd = [sys.executable, "-m", "kvmtrace.cli", "record", "-o", path, "--pid", str(pid),
           "--probes", "faults", "--duration", f"{seconds:g}"]
    limit = seconds + WINDOW_START_LIMIT
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise SnapshotError(f"the recording window did not end {limit:g} s after it was asked "
                            f"for ({seconds:g} s window)") from None
    if p.returncode != 0 or not os.path.exists(path):
        last = [ln for ln in p.stderr.splitlines() if ln.strip()]
        raise SnapshotError("the recording window failed: "
                            + (last[-1] if last else f"exit status {p.returncode}"))
    return path, p.stderr
