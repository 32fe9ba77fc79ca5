"""Loading programs through bcc with errors a user can read.

bcc prints compiler and verifier output on fd 2 and raises a bare Exception;
this keeps fd 2 clean and turns a failure into one line naming the first
real error (record and doctor both load through here).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile

BCC_HINT = ("the bcc Python module is not importable: install Debian's python3-bpfcc and "
            "run kvmtrace from a Python that sees it (make setup makes such a virtual "
            "environment)")


class BPFLoadError(RuntimeError):
    pass


def import_bcc():
    try:
        import bcc
    except ImportError:
        raise BPFLoadError(BCC_HINT) from None
    return bcc


@contextlib.contextmanager
def captured_stderr():
    """Redirect fd 2 into a temporary file for the duration (yields the file)."""
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield f
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def first_error(exc: Exception, captured) -> str:
    captured.seek(0)
    lines = [ln.strip() for ln in captured.read().splitlines() if ln.strip()]
    interesting = [ln for ln in lines if any(w in ln.lower() for w in
                                             ("error", "denied", "invalid", "not", "fail"))]
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg + (f" ({interesting[0][:160]})" if interesting else "")


def load(text: str, cflags: list[str], after=None, cache: bool = False):
    """Compile and load ``text``; ``after(b)`` runs inside the capture (attach calls).

    ``cache``: load the program from the compile cache (host/bpfcache.py)
    when it holds this program for this host, else compile it and store it
    there. ``b.kvmtrace_cache`` says what happened: {"status": "hit" | "miss"
    | "off" | "unused", "reason": why not used or stored, "ms": time to
    load (hit) or compile (miss)}."""
    import time

    status = {"status": "off", "reason": "", "ms": None}
    k = None
    if cache:  # a hit never imports bcc (its import costs 0.04 to 0.1 s and ~70 MB)
        from . import bpfcache

        t0 = time.perf_counter()
        try:
            k = bpfcache.key(text, cflags, _bcc_version(), _bcc_library())
            entry = bpfcache.lookup(k)
        except (bpfcache.CacheError, OSError) as e:
            entry, status = None, {"status": "unused", "reason": str(e), "ms": None}
        if entry is not None:
            with captured_stderr() as err:
                b = None
                try:
                    b = bpfcache.CachedBPF(entry)
                    if after:
                        after(b)
                    status = {"status": "hit", "reason": "",
                              "ms": round((time.perf_counter() - t0) * 1e3, 1)}
                    b.kvmtrace_cache = status
                    return b
                except Exception as e:  # noqa: BLE001 - compile instead, and say why
                    if b is not None:
                        b.cleanup()
                    status = {"status": "unused", "reason": "the cached program did not "
                              f"load ({first_error(e, err)}); compiled", "ms": None}
        elif status["status"] == "off":
            status = {"status": "miss", "reason": "", "ms": None}
    bcc = import_bcc()
    with captured_stderr() as err:
        try:
            t0 = time.perf_counter()
            b = bcc.BPF(text=text, cflags=cflags)
            compiled_ms = round((time.perf_counter() - t0) * 1e3, 1)
            entry = None
            if k is not None:
                from . import bpfcache
                try:
                    entry = bpfcache.capture(b)
                except (bpfcache.CacheError, OSError) as e:
                    status = {"status": "unused", "reason": f"not cacheable: {e}", "ms": None}
            if after:
                after(b)
        except Exception as e:  # bcc raises bare Exception on compile/load/attach errors
            raise BPFLoadError(first_error(e, err)) from None
    if entry is not None:
        try:
            bpfcache.store(k, entry)
        except (bpfcache.CacheError, OSError) as e:
            status = {"status": "unused", "reason": f"not stored: {e}", "ms": None}
    if status["status"] in ("miss", "off") or status["ms"] is None:
        status["ms"] = compiled_ms
    b.kvmtrace_cache = status
    return b


def _bcc_version() -> str:
    """bcc's version, read from its package without importing it."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("bcc")
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
        return m.group(1) if m else "?"
    except (AttributeError, ImportError, OSError, TypeError, ValueError):
        raise BPFLoadError(BCC_HINT) from None


def _bcc_library() -> str | None:
    """The libbcc.so.0 the bcc module loads (its identity goes in the cache key)."""
    import glob

    for pattern in ("/usr/lib/*/libbcc.so.0", "/usr/lib64/libbcc.so.0", "/usr/lib/libbcc.so.0",
                    "/usr/local/lib*/libbcc.so.0"):
        found = sorted(glob.glob(pattern))
        if found:
            return os.path.realpath(found[0])
    return None


# -- programs with a callback ------------------------------------------------
# bcc 0.26 compiles a program that passes a callback to a helper (bpf_find_vma)
# but cannot load it: it leaves the ld_imm64 of the callback's address
# unrelocated (src_reg 0, value 0) and the verifier refuses it ("R3
# type=scalar expected=func"). kvmtrace links such a program itself: the
# callback's instructions (a separate function of the bcc module, see
# probes/bpf/vma.h) are appended to the program's, each load of its address
# becomes a BPF_PSEUDO_FUNC ld_imm64 whose imm is the callback's start
# relative to the next instruction, and the pair is loaded with BTF func_info,
# which the verifier requires for a callback (without it: "missing btf
# func_info"; the callback's FUNC must be static: "callback function not
# static"). Map references were already made fd-relative by bcc. Everything
# used is uAPI (instruction encoding, union bpf_attr, the BTF format), the
# same from 5.17 (bpf_find_vma) to 7.x.

BPF_LD_IMM64, BPF_CALL, BPF_EXIT = 0x18, 0x85, 0x95
BPF_JA, BPF_JA32 = 0x05, 0x06  # BPF_JMP | BPF_JA; BPF_JMP32 | BPF_JA ("gotol")
BPF_PSEUDO_CALL, BPF_PSEUDO_FUNC = 1, 4
BPF_FUNC_FIND_VMA = 180
INSN = struct.Struct("<BBhi")  # code, dst:4 | src:4, off, imm


class LinkError(BPFLoadError):
    """bcc's output does not have the shape the linker handles."""


def _insn(raw: bytes, i: int):
    code, regs, off, imm = INSN.unpack_from(raw, i * 8)
    return code, regs & 0xF, regs >> 4, off, imm


def _writes_dst(code: int) -> bool:
    """LD, LDX, ALU and ALU64 instructions write their dst register."""
    return code & 0x07 in (0x00, 0x01, 0x04, 0x07)


def callback_loads(main: bytes, helper: int = BPF_FUNC_FIND_VMA) -> list[int]:
    """Indexes of the unrelocated ld_imm64 that load a callback's address in
    ``main``, each checked to reach r3 (callback_fn) of a call to ``helper``
    within its basic block; LinkError otherwise."""
    if len(main) % 8:
        raise LinkError(f"program size {len(main)} is not a whole number of instructions")
    n, sites, i = len(main) // 8, [], 0
    while i < n:
        code, dst, src, _, imm = _insn(main, i)
        if code == BPF_CALL and src == BPF_PSEUDO_CALL:
            raise LinkError(f"insn {i}: a BPF-to-BPF call (not linked here)")
        if code == BPF_LD_IMM64:
            if i + 1 >= n:
                raise LinkError(f"insn {i}: ld_imm64 cut short")
            if src == 0 and imm == 0 and _insn(main, i + 1)[4] == 0:
                sites.append(i)
            i += 2
            continue
        i += 1
    for site in sites:
        holders, j = {_insn(main, site)[1]}, site + 2
        while True:
            if j >= n:
                raise LinkError(f"insn {site}: the loaded address reaches no helper call")
            code, dst, src, _, imm = _insn(main, j)
            if code == BPF_CALL:
                if imm == helper and src == 0 and 3 in holders:
                    break
                if imm == helper or not holders - {0, 1, 2, 3, 4, 5}:
                    raise LinkError(f"insn {site}: the loaded address is not r3 of call "
                                    f"#{helper} (insn {j})")
                holders -= {0, 1, 2, 3, 4, 5}  # a call clobbers r0-r5
            elif code & 0x07 in (0x05, 0x06):  # a jump or exit ends the basic block
                raise LinkError(f"insn {site}: a jump (insn {j}) before the helper call")
            elif code == 0xBF and src in holders:  # mov64 dst, src
                holders.add(dst)
            elif _writes_dst(code):
                holders.discard(dst)
            j += 2 if code == BPF_LD_IMM64 else 1
    return sites


def link_callback(main: bytes, callback: bytes,
                  helper: int = BPF_FUNC_FIND_VMA) -> tuple[bytes, int]:
    """(main followed by callback with every load of the callback's address
    made a BPF_PSEUDO_FUNC, the callback's first instruction index)."""
    sites = callback_loads(main, helper)
    if not sites:
        raise LinkError(f"no load of a callback address for call #{helper} in the program")
    if not callback or len(callback) % 8:
        raise LinkError(f"callback size {len(callback)} is not a whole number of instructions")
    # its last instruction must not fall through into whatever follows: an
    # exit, or an unconditional jump back (clang 14 ends the callback with
    # "ja" to its exit when a branch is laid out after it)
    if _insn(callback, len(callback) // 8 - 1)[0] not in (BPF_EXIT, BPF_JA, BPF_JA32):
        raise LinkError("the callback does not end with exit or an unconditional jump")
    m = len(callback) // 8
    for k in range(m):
        code, _, src, _, imm = _insn(callback, k)
        if code == BPF_CALL and src == BPF_PSEUDO_CALL:
            raise LinkError(f"callback insn {k}: a BPF-to-BPF call (not linked here)")
        if code == BPF_LD_IMM64 and src == 0 and imm == 0 and k + 1 < m \
                and _insn(callback, k + 1)[4] == 0:
            raise LinkError(f"callback insn {k}: an unrelocated ld_imm64")
    start = len(main) // 8
    out = bytearray(main + callback)
    for i in sites:
        out[i * 8 + 1] = (out[i * 8 + 1] & 0x0F) | (BPF_PSEUDO_FUNC << 4)
        struct.pack_into("<i", out, i * 8 + 4, start - (i + 1))
    return bytes(out), start


def func_btf(funcs: list[tuple[str, bool, int]]) -> tuple[bytes, list[int]]:
    """A BTF blob (include/uapi/linux/btf.h) with one FUNC per (name, global,
    number of void * parameters), returning long; and their type ids."""
    strs, types = bytearray(b"\0"), bytearray()

    def name(s: str) -> int:
        off = len(strs)
        strs.extend(s.encode() + b"\0")
        return off

    def add(name_off, kind, vlen, size_or_type, tail=b""):
        types.extend(struct.pack("<III", name_off, (kind << 24) | vlen, size_or_type) + tail)

    add(name("long"), 1, 0, 8, struct.pack("<I", (1 << 24) | 64))  # 1: INT, signed, 64 bits
    add(0, 2, 0, 0)                                                # 2: PTR to void
    tid, ids = 2, []
    for fname, is_global, nargs in funcs:
        params = b"".join(struct.pack("<II", name(f"arg{k}"), 2) for k in range(nargs))
        add(0, 13, nargs, 1, params)                  # FUNC_PROTO returning long
        add(name(fname), 12, 1 if is_global else 0, tid + 1)  # FUNC, linkage in vlen
        tid += 2
        ids.append(tid)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    return bytes(header + types + strs), ids


_NR_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD, BPF_BTF_LOAD = 5, 18
BPF_PROG_TYPE_TRACEPOINT = 5
_ATTR_SIZE = 144  # covers every field used here; the kernel checks the rest is zero


def _bpf(cmd: int, attr: bytearray) -> int:
    import ctypes
    import platform

    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BPFLoadError(f"bpf() syscall number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), buf, ctypes.c_long(len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _verifier_summary(log: str) -> str:
    """The verifier's reason: its last line that is not a statistic or state dump."""
    import re

    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not (ln.startswith(("processed ", "verification time", "stack depth", ";"))
                or ln[:1].isdigit() or re.match(r"R\d+(_\w)?=|from \d+ to \d+", ln)):
            return ln[:200]
    return lines[-1][:200] if lines else ""


def load_btf(blob: bytes) -> int:
    import ctypes

    data = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(1 << 16)
    attr = bytearray(32)
    struct.pack_into("<QQIII", attr, 0, ctypes.addressof(data), ctypes.addressof(log),
                     len(blob), len(log), 1)
    try:
        return _bpf(BPF_BTF_LOAD, attr)
    except OSError as e:
        raise BPFLoadError(f"BTF load: {e.strerror} "
                           f"({_verifier_summary(log.value.decode(errors='replace'))})") from None


def prog_load(insns: bytes, name: str, btf_fd: int, func_info: list[tuple[int, int]],
              prog_type: int = BPF_PROG_TYPE_TRACEPOINT, license: str = "GPL") -> int:
    """BPF_PROG_LOAD, with BTF func_info when ``btf_fd`` is one (> 0); on
    failure the verifier's reason."""
    import ctypes

    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    fi = b"".join(struct.pack("<II", off, tid) for off, tid in func_info)
    fib = ctypes.create_string_buffer(fi, len(fi))

    def attempt(log_level, log):
        attr = bytearray(_ATTR_SIZE)
        struct.pack_into("<IIQQIIQ", attr, 0, prog_type, len(insns) // 8,
                         ctypes.addressof(code), ctypes.addressof(lic), log_level,
                         len(log) if log is not None else 0,
                         ctypes.addressof(log) if log is not None else 0)
        attr[48:64] = name.encode()[:15].ljust(16, b"\0")          # prog_name
        if btf_fd > 0:
            struct.pack_into("<IIQI", attr, 72, btf_fd, 8, ctypes.addressof(fib),
                             len(func_info))
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return attempt(0, None)
    except OSError:
        pass
    log = ctypes.create_string_buffer(4 << 20)  # again, for the verifier's words
    try:
        return attempt(1, log)
    except OSError as e:
        why = _verifier_summary(log.value.decode(errors="replace"))
        raise BPFLoadError(f"{e.strerror}" + (f" ({why})" if why else "")) from None


def load_with_callback(b, fn_name: str, callback: str, tracepoint: str,
                       helper: int = BPF_FUNC_FIND_VMA) -> int:
    """Link ``fn_name`` of a compiled bcc.BPF with ``callback``, load it as a
    tracepoint program and attach it to ``tracepoint`` ("category:name").
    The program and its attachment belong to ``b`` afterwards (b.cleanup()
    detaches and closes them). Returns the program fd. ``b`` is a bcc.BPF or
    a program from the compile cache (host/bpfcache.CachedBPF, no bcc)."""
    try:
        main, cb = b.dump_func(fn_name), b.dump_func(callback)
    except Exception as e:  # bcc raises a bare Exception for an unknown function
        raise LinkError(f"bcc has no function to link: {e}") from None
    insns, start = link_callback(main, cb, helper)
    blob, (main_id, cb_id) = func_btf([(fn_name, True, 1), (callback, False, 3)])
    btf_fd = load_btf(blob)
    try:
        prog_fd = prog_load(insns, fn_name, btf_fd, [(0, main_id), (start, cb_id)])
    finally:
        os.close(btf_fd)  # the program holds its own reference
    if hasattr(b, "attach_fd"):  # from the compile cache: no bcc
        try:
            b.attach_fd(prog_fd, tracepoint)
        except BPFLoadError:
            os.close(prog_fd)
            raise
        b.function(fn_name, prog_fd)
        return prog_fd
    bcc = import_bcc()
    category, event = tracepoint.encode().split(b":")
    perf_fd = bcc.lib.bpf_attach_tracepoint(prog_fd, category, event)
    if perf_fd < 0:
        os.close(prog_fd)
        raise BPFLoadError(f"attaching {fn_name} to {tracepoint} failed")
    b.funcs[fn_name.encode()] = bcc.BPF.Function(b, fn_name.encode(), prog_fd)
    b.tracepoint_fds[tracepoint.encode()] = perf_fd
    return prog_fd
