"""Struct offsets and enum values of the *running* kernel, from its BTF.

bcc does no CO-RE relocation and distro headers rarely match the running
kernel, so every kernel struct field a probe reads is read at an offset taken
here (passed to the BPF program as a -D define), and every enum a decoder
needs (e.g. arm64's ``enum kvm_pgtable_prot``, whose bits moved between 6.1
and 7.x) is taken here and stored in the recording.

BTF is parsed by libbpf (libbpf.so.1, Debian's libbpf1, which bcc and
bpftrace already pull in) through ctypes; only the uAPI ``struct btf_type``
records it returns are decoded here (include/uapi/linux/btf.h, stable since
5.2; ENUM64 since 6.0). KVM built as a module has its types in
/sys/kernel/btf/kvm, split BTF on top of vmlinux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_TYPE_TAG, KIND_ENUM64 = 18, 19
MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BTFError(RuntimeError):
    pass


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32),
                ("size_or_type", ctypes.c_uint32)]


class _Member(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("offset", ctypes.c_uint32)]


class _Enum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class _Enum64(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("lo32", ctypes.c_uint32),
                ("hi32", ctypes.c_uint32)]


@lru_cache(maxsize=1)
def _libbpf():
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise BTFError("libbpf is not installed (Debian: apt-get install libbpf1)") from None
    lib.btf__parse.restype = ctypes.c_void_p
    lib.btf__parse.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.btf__parse_split.restype = ctypes.c_void_p
    lib.btf__parse_split.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.btf__find_by_name_kind.restype = ctypes.c_int32
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__type_by_id.restype = ctypes.POINTER(_BtfType)
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__free.argtypes = [ctypes.c_void_p]
    return lib


class BTF:
    """The kernel's types: vmlinux, plus a module's split BTF when asked."""

    def __init__(self, module: str | None = None, root: str = "/sys/kernel/btf"):
        lib = _libbpf()
        vmlinux = os.path.join(root, "vmlinux")
        if not os.path.exists(vmlinux):
            raise BTFError(f"{vmlinux} is missing: the kernel has no BTF "
                           "(CONFIG_DEBUG_INFO_BTF)")
        self._base = lib.btf__parse(vmlinux.encode(), None)
        if not self._base:
            raise BTFError(f"libbpf could not parse {vmlinux}")
        self._btf = self._base
        self.source = vmlinux
        if module and os.path.exists(os.path.join(root, module)):
            split = lib.btf__parse_split(os.path.join(root, module).encode(), self._base)
            if split:
                self._btf = split
                self.source += f" + {module}"

    def close(self):
        lib = _libbpf()
        if self._btf and self._btf != self._base:
            lib.btf__free(self._btf)
        if self._base:
            lib.btf__free(self._base)
        self._btf = self._base = None

    # -- raw access -----------------------------------------------------------
    def _type(self, tid: int):
        t = _libbpf().btf__type_by_id(self._btf, tid)
        if not t:
            raise BTFError(f"no BTF type {tid}")
        return t

    def _name(self, off: int) -> str:
        n = _libbpf().btf__name_by_offset(self._btf, off)
        return n.decode() if n else ""

    @staticmethod
    def _kind(t) -> int:
        return (t.contents.info >> 24) & 0x1F

    @staticmethod
    def _vlen(t) -> int:
        return t.contents.info & 0xFFFF

    def _find(self, name: str, kind: int) -> int:
        tid = _libbpf().btf__find_by_name_kind(self._btf, name.encode(), kind)
        return tid if tid > 0 else 0

    def _resolve(self, tid: int) -> int:
        while True:
            t = self._type(tid)
            if self._kind(t) not in MODIFIERS:
                return tid
            tid = t.contents.size_or_type

    # -- what probes and decoders need ---------------------------------------
    def has_struct(self, name: str) -> bool:
        return bool(self._find(name, KIND_STRUCT))

    def member_offset(self, struct: str, path: str) -> int:
        """Byte offset of ``a.b.c`` inside ``struct``, looking through anonymous
        unions and structs (e.g. vm_flags moved into one in 6.3)."""
        tid = self._find(struct, KIND_STRUCT) or self._find(struct, KIND_UNION)
        if not tid:
            raise BTFError(f"struct {struct} not in {self.source}")
        total = 0
        for part in path.split("."):
            found = self._member(tid, part)
            if found is None:
                raise BTFError(f"struct {struct} has no member {path}")
            off, tid = found
            total += off
        return total

    def _member(self, tid: int, name: str):
        """(byte offset, type id) of member ``name`` in struct/union ``tid``."""
        t = self._type(self._resolve(tid))
        kind = self._kind(t)
        if kind not in (KIND_STRUCT, KIND_UNION):
            return None
        kind_flag = (t.contents.info >> 31) & 1
        members = ctypes.cast(ctypes.addressof(t.contents) + ctypes.sizeof(_BtfType),
                              ctypes.POINTER(_Member))
        for i in range(self._vlen(t)):
            m = members[i]
            bits = m.offset & 0xFFFFFF if kind_flag else m.offset
            mname = self._name(m.name_off)
            if mname == name:
                return bits // 8, m.type
            if not mname:  # anonymous struct / union: look inside
                inner = self._member(m.type, name)
                if inner is not None:
                    return bits // 8 + inner[0], inner[1]
        return None

    def enum(self, name: str) -> dict[str, int]:
        """Enumerator name -> value of ``enum name`` (ENUM or ENUM64)."""
        for kind in (KIND_ENUM, KIND_ENUM64):
            tid = self._find(name, kind)
            if tid:
                break
        else:
            raise BTFError(f"enum {name} not in {self.source}")
        t = self._type(tid)
        base = ctypes.addressof(t.contents) + ctypes.sizeof(_BtfType)
        out = {}
        if self._kind(t) == KIND_ENUM:
            vals = ctypes.cast(base, ctypes.POINTER(_Enum))
            for i in range(self._vlen(t)):
                out[self._name(vals[i].name_off)] = vals[i].val
        else:
            vals = ctypes.cast(base, ctypes.POINTER(_Enum64))
            for i in range(self._vlen(t)):
                out[self._name(vals[i].name_off)] = (vals[i].hi32 << 32) | vals[i].lo32
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Enums decoders need, stored in every recording made where they exist.
RECORDED_ENUMS = ("kvm_pgtable_prot", "kvm_mr_change")


# Members the in-BPF VMA lookup at the memslot ioctl reads (probes/bpf/vma.h).
# All are in vmlinux BTF from 5.x to 7.x; vm_flags sits in an anonymous union
# from 6.3 (member_offset looks through it).
VMA_LOOKUP_MEMBERS = (
    ("vm_area_struct", "vm_start"), ("vm_area_struct", "vm_end"),
    ("vm_area_struct", "vm_flags"), ("vm_area_struct", "vm_page_prot"),
    ("vm_area_struct", "vm_pgoff"), ("vm_area_struct", "vm_file"),
    ("file", "f_inode"), ("inode", "i_ino"), ("inode", "i_sb"), ("super_block", "s_dev"),
    ("super_block", "s_magic"), ("file", "f_path.dentry"), ("dentry", "d_name.name"),
    ("vm_area_struct", "vm_ops"), ("vm_area_struct", "vm_private_data"),
    ("vm_operations_struct", "name"), ("vm_special_mapping", "name"),
)


@lru_cache(maxsize=4)
def vma_lookup_offsets(root: str = "/sys/kernel/btf") -> dict:
    """(struct, member) -> offset for VMA_LOOKUP_MEMBERS; BTFError says why not."""
    with BTF(root=root) as b:
        return {m: b.member_offset(*m) for m in VMA_LOOKUP_MEMBERS}


def open_kernel() -> BTF | None:
    """vmlinux + kvm module BTF, or None where the kernel has none."""
    try:
        return BTF("kvm")
    except BTFError:
        return None


def context(b: BTF | None, defines: list[str]) -> dict:
    """What a recording keeps of the BTF it was made with."""
    if b is None:
        return {"source": None}
    enums = {}
    for name in RECORDED_ENUMS:
        try:
            enums[name] = b.enum(name)
        except BTFError:
            pass
    return {"source": b.source, "offsets": [d[2:] for d in defines], "enums": enums}
