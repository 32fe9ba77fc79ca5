#!/usr/bin/env python3
"""Smoke check of the emulated arm64 KVM host; runs inside the testbed as root.

    testbed/arm64/run --kernel 7.x -- python3 /kt/smoke.py

Prints one line per check ("ok", "FAIL" or "info") and exits 1 if a check
that must pass failed. "info" lines are measurements (symbols, enum values,
capabilities, CPU features), not pass/fail. KVM's ABI (kvmtrace.kvmapi) and
the tiny nested guest (testvmm.tiny) come from the checkout, which `run`
copies to /src and puts on PYTHONPATH.
"""
import ctypes
import ctypes.util
import fcntl
import glob
import mmap
import os
import re
import struct
import subprocess
import sys
import time

from kvmtrace import kvmapi

FAILED = []


def out(status, name, detail=""):
    print(f"{status:4} {name}: {detail}", flush=True)
    if status == "FAIL":
        FAILED.append(name)


def check(name, cond, detail=""):
    out("ok" if cond else "FAIL", name, detail)
    return cond


def run(*cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout, p.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, "", str(e)


# --------------------------------------------------------------------- kernel
uname = os.uname()
out("info", "kernel", f"{uname.release} {uname.machine} ({uname.version})")
rc, dmesg, _ = run("dmesg")
check("/dev/kvm", os.path.exists("/dev/kvm"),
      "char device" if os.path.exists("/dev/kvm") else "missing")
kvm_lines = [l.split("] ", 1)[-1] for l in dmesg.splitlines() if re.search(r"\bkvm \[\d+\]", l)]
init = [l for l in kvm_lines if "initialized" in l]
check("dmesg: KVM initialized", bool(init), "; ".join(init) or "no 'kvm [..]: ... initialized' line")
build = f"/lib/modules/{uname.release}/build"
check("linux-headers", os.path.isdir(build), os.path.realpath(build))

# ------------------------------------------------------------------- PCI BAR
bar_dev = None
for d in sorted(glob.glob("/sys/bus/pci/devices/*")):
    try:
        ven = open(f"{d}/vendor").read().strip()
        dev = open(f"{d}/device").read().strip()
    except OSError:
        continue
    if (ven, dev) == ("0x1af4", "0x1110"):
        bar_dev = d
        break
if check("ivshmem PCI device 1af4:1110", bar_dev is not None, bar_dev or "not found"):
    with open(f"{bar_dev}/enable", "w") as f:
        f.write("1")
    r2, r2wc = f"{bar_dev}/resource2", f"{bar_dev}/resource2_wc"
    res = open(f"{bar_dev}/resource").read().split("\n")[2].split()
    start, end = int(res[0], 16), int(res[1], 16)
    ok = os.path.exists(r2) and os.path.exists(r2wc)
    check("BAR2 resource2 + resource2_wc", ok,
          f"BAR2 {start:#x}-{end:#x} ({(end - start + 1) >> 10} KiB)")
    if ok:
        size = os.path.getsize(r2)
        with open(r2, "r+b") as f1, open(r2wc, "r+b") as f2:
            m1 = mmap.mmap(f1.fileno(), size)
            m2 = mmap.mmap(f2.fileno(), size)
            m1[0:8] = b"kvmtrace"
            m2[8:16] = b"testbed!"
            back = bytes(m2[0:8]) + bytes(m1[8:16])
            m1.close(), m2.close()
        check("BAR2 mmap read/write", back == b"kvmtracetestbed!", repr(back))

# ------------------------------------------------------------------ kallsyms
SYMS = ["user_mem_abort", "kvm_handle_guest_abort", "kvm_arch_prepare_memory_region",
        "kvm_pgtable_stage2_map", "kvm_pgtable_stage2_relax_perms", "__kvm_faultin_pfn"]
names = {}
with open("/proc/kallsyms") as f:
    for line in f:
        parts = line.split()
        if len(parts) >= 3:
            names.setdefault(parts[2], parts[1])
present = [s for s in SYMS if s in names]
absent = [s for s in SYMS if s not in names]
variants = sorted(n for n in names for s in absent if n.startswith(s + "."))
out("info", "kallsyms present", " ".join(present))
out("info", "kallsyms absent", " ".join(absent) + (f" (suffixed: {' '.join(variants)})" if variants else ""))
kprobe_ok = os.path.exists("/sys/kernel/tracing/available_filter_functions")
if kprobe_ok:
    with open("/sys/kernel/tracing/available_filter_functions") as f:
        traceable = {l.split()[0] for l in f if l.strip()}
    out("info", "probeable (available_filter_functions)",
        " ".join(s for s in present if s in traceable) or "none")

# ----------------------------------------------------------------------- BTF
BTF = "/sys/kernel/btf/vmlinux"
check("/sys/kernel/btf/vmlinux", os.path.exists(BTF),
      f"{os.path.getsize(BTF) if os.path.exists(BTF) else 0} bytes"
      + ("; /sys/kernel/btf/kvm exists (KVM is a module)" if os.path.exists("/sys/kernel/btf/kvm")
         else "; no /sys/kernel/btf/kvm (KVM built in)"))

# BTF kind -> bytes that follow the 12-byte common header (vlen = number of members)
_EXTRA = {1: lambda v: 4, 2: lambda v: 0, 3: lambda v: 12, 4: lambda v: 12 * v,
          5: lambda v: 12 * v, 6: lambda v: 8 * v, 7: lambda v: 0, 8: lambda v: 0,
          9: lambda v: 0, 10: lambda v: 0, 11: lambda v: 0, 12: lambda v: 0,
          13: lambda v: 8 * v, 14: lambda v: 4, 15: lambda v: 12 * v, 16: lambda v: 0,
          17: lambda v: 4, 18: lambda v: 0, 19: lambda v: 12 * v}


def btf_enum(path, wanted):
    """Values of enum `wanted` from a raw BTF blob (a minimal BTF reader)."""
    data = open(path, "rb").read()
    magic, ver, flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from("<HBBIIIII", data, 0)
    assert magic == 0xEB9F, hex(magic)
    strs = data[hdr_len + str_off: hdr_len + str_off + str_len]

    def name(off):
        return strs[off: strs.index(b"\0", off)].decode()

    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end:
        name_off, info, size = struct.unpack_from("<III", data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        body = pos + 12
        if kind in (6, 19) and name(name_off) == wanted:
            vals = {}
            for i in range(vlen):
                if kind == 6:
                    n, v = struct.unpack_from("<I" + ("I" if not kflag else "i"), data, body + 8 * i)
                else:
                    n, lo, hi = struct.unpack_from("<III", data, body + 12 * i)
                    v = (hi << 32) | lo
                vals[name(n)] = v
            return vals
        pos = body + _EXTRA[kind](vlen)
    return None


def fmt_enum(vals):
    return ", ".join(f"{k.replace('KVM_PGTABLE_PROT_', '')}={v:#x}" for k, v in vals.items())


t = time.time()
try:
    prot = btf_enum(BTF, "kvm_pgtable_prot")
    out("ok" if prot else "FAIL", "enum kvm_pgtable_prot (python BTF reader)",
        (fmt_enum(prot) if prot else "not found") + f" [{time.time() - t:.1f} s]")
except Exception as e:  # noqa: BLE001
    prot = None
    out("FAIL", "enum kvm_pgtable_prot (python BTF reader)", repr(e))

rc, txt, err = run("bpftool", "btf", "dump", "file", BTF, "format", "raw")
if rc == 0:
    m = re.search(r"^\[\d+\] ENUM(?:64)? 'kvm_pgtable_prot'[^\n]*\n((?:\s+'[^\n]*\n)+)", txt, re.M)
    vals = {a: int(b) for a, b in re.findall(r"'(\w+)' val=(-?\d+)", m.group(1))} if m else {}
    same = "same as the python reader" if vals == prot else "DIFFERS from the python reader"
    out("ok" if vals else "FAIL", "enum kvm_pgtable_prot (bpftool btf dump)",
        (fmt_enum(vals) + f"; {same}") if vals else "not found")
    out("info", "bpftool", run("bpftool", "version")[1].splitlines()[0])
else:
    out("info", "bpftool", f"not usable: {(err or txt).strip()[:200]}")

# --------------------------------------------------------- CPU: CTR_EL0, MMFR2
def read_sysreg(insn):
    """Run `mrs x0, <reg>; ret` from an executable page (EL0 access; Linux
    emulates the ID registers and may trap CTR_EL0, giving sanitised values)."""
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(struct.pack("<II", insn, 0xD65F03C0))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        libgcc = ctypes.CDLL(ctypes.util.find_library("gcc_s") or "libgcc_s.so.1")
        libgcc.__clear_cache(ctypes.c_void_p(addr), ctypes.c_void_p(addr + 8))
    except (OSError, AttributeError):
        pass
    return ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)()


ctr = read_sysreg(0xD53B0020)           # mrs x0, ctr_el0
out("info", "CTR_EL0 (mrs at EL0)",
    f"{ctr:#x}: DIC={ctr >> 29 & 1} IDC={ctr >> 28 & 1} DminLine={ctr >> 16 & 0xF} IminLine={ctr & 0xF}")
mmfr2 = read_sysreg(0xD5380740)         # mrs x0, id_aa64mmfr2_el1
out("info", "ID_AA64MMFR2_EL1 (mrs at EL0, as Linux exposes it)",
    f"{mmfr2:#x}: FWB={mmfr2 >> 40 & 0xF} (Linux hides FWB from EL0; see dmesg below)")
feats = [l.split("detected: ", 1)[1] for l in dmesg.splitlines() if "CPU features: detected:" in l]
fwb = any("Force Write-Back" in f for f in feats)
dic = any("Instruction cache invalidation not required" in f for f in feats)
idc = any("Data cache clean to the PoU not required" in f for f in feats)
out("info", "host CPU features (dmesg)", f"FWB={'yes' if fwb else 'no'} DIC={'yes' if dic else 'no'} "
    f"IDC={'yes' if idc else 'no'}; detected: {'; '.join(feats)}")
cpuinfo = open("/proc/cpuinfo").read()
m = re.search(r"^Features\s*:\s*(.*)$", cpuinfo, re.M)
out("info", "/proc/cpuinfo Features", m.group(1) if m else "?")

# ---------------------------------------------------------- KVM capabilities
CAP = kvmapi.KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED  # 243


def check_ext(fd, cap):
    try:
        return str(fcntl.ioctl(fd, kvmapi.KVM_CHECK_EXTENSION, cap))
    except OSError as e:
        return f"-1 ({os.strerror(e.errno)}, errno {e.errno})"


kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
vm = fcntl.ioctl(kvm, kvmapi.KVM_CREATE_VM, 0)
out("info", "KVM_CHECK_EXTENSION(243 CACHEABLE_PFNMAP_SUPPORTED)",
    f"/dev/kvm -> {check_ext(kvm, CAP)}; VM fd -> {check_ext(vm, CAP)}")
os.close(vm)
os.close(kvm)

# ---------------------------------------------------------------- bcc, probes
BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>
struct s2map { u64 addr; u64 size; u64 phys; u64 prot; };
BPF_RINGBUF_OUTPUT(events, 16);
BPF_ARRAY(faults, u64, 1);
int kprobe__kvm_pgtable_stage2_map(struct pt_regs *ctx)
{
    struct s2map e = {};
    e.addr = PT_REGS_PARM2(ctx);
    e.size = PT_REGS_PARM3(ctx);
    e.phys = PT_REGS_PARM4(ctx);
    e.prot = PT_REGS_PARM5(ctx);
    events.ringbuf_output(&e, sizeof(e), 0);
    return 0;
}
TRACEPOINT_PROBE(kvm, kvm_guest_fault)
{
    int zero = 0;
    u64 *n = faults.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""
bpf = None
try:
    t = time.time()
    import bcc
    t_imp = time.time() - t
    t = time.time()
    bpf = bcc.BPF(text=BPF_TEXT)
    n_kp = bpf.num_open_kprobes()
    n_tp = bpf.num_open_tracepoints()
    check("bcc kprobe kvm_pgtable_stage2_map + tracepoint kvm:kvm_guest_fault",
          n_kp == 1 and n_tp == 1,
          f"bcc {getattr(bcc, '__version__', '?')}: import {t_imp:.1f} s, compile+load+attach "
          f"{time.time() - t:.1f} s, {n_kp} kprobe, {n_tp} tracepoint")
except Exception as e:  # noqa: BLE001
    out("FAIL", "bcc kprobe kvm_pgtable_stage2_map + tracepoint kvm:kvm_guest_fault",
        f"{type(e).__name__}: {e}")

# A tiny nested guest (testvmm.tiny; MMU off at EL1): stores to 16 RAM pages, to
# the BAR through resource2 and resource2_wc memslots, then to an unmapped IPA
# (KVM_EXIT_MMIO).
if bpf is not None:
    from testvmm import tiny
    maps = []

    def on_map(ctx, data, size):
        e = ctypes.cast(data, ctypes.POINTER(ctypes.c_uint64 * 4)).contents
        maps.append(tuple(e))

    bpf["events"].open_ring_buffer(on_map)
    try:
        res = tiny.run(bar_dev)
        bpf.ring_buffer_consume()
        nfault = bpf["faults"][ctypes.c_int(0)].value
        names_by_val = {v: k.replace("KVM_PGTABLE_PROT_", "") for k, v in (prot or {}).items()}

        def decode(p):
            hit = {v: n for v, n in names_by_val.items() if v and p & v == v}
            # drop single bits that a matched composite (7.x: X = PX|UX) covers
            keep = [n for v, n in sorted(hit.items())
                    if not any(w != v and w & v == v for w in hit)]
            return "|".join(keep) or "0"
        summary = {}
        for addr, size, phys, p in maps:
            region = tiny.region_of(addr)
            key = (region, size, p)
            summary[key] = summary.get(key, 0) + 1
        desc = "; ".join(f"{r}: {n} x size={s:#x} prot={p:#x} ({decode(p)})"
                         for (r, s, p), n in sorted(summary.items()))
        check("nested guest ran to KVM_EXIT_MMIO", res["exit"] == "MMIO",
              f"exit={res['exit']} at {res.get('mmio_addr', 0):#x}; "
              f"cap 243 on this VM fd: {res['cap243']}")
        check("stage-2 maps seen by the kprobe", len(maps) > 0,
              f"{len(maps)} calls, {nfault} kvm_guest_fault events; {desc}")
    except Exception as e:  # noqa: BLE001
        out("FAIL", "nested guest", f"{type(e).__name__}: {e}")

# ------------------------------------------------ out-of-tree module toolchain
MOD_C = r"""
#include <linux/module.h>
#include <linux/init.h>
static int __init kt_init(void) { pr_info("kt_hello: loaded\n"); return 0; }
static void __exit kt_exit(void) { pr_info("kt_hello: unloaded\n"); }
module_init(kt_init);
module_exit(kt_exit);
MODULE_LICENSE("GPL");
"""
mdir = "/tmp/kt_hello"
os.makedirs(mdir, exist_ok=True)
open(f"{mdir}/kt_hello.c", "w").write(MOD_C)
open(f"{mdir}/Makefile", "w").write("obj-m := kt_hello.o\n")
t = time.time()
rc, txt, err = run("make", "-C", build, f"M={mdir}", "modules")
t_build = time.time() - t
if rc == 0:
    rc2, _, err2 = run("insmod", f"{mdir}/kt_hello.ko")
    loaded = rc2 == 0 and "kt_hello: loaded" in run("dmesg")[1]
    run("rmmod", "kt_hello")
    check("out-of-tree module builds and loads", loaded,
          f"make {t_build:.0f} s; insmod {'ok' if loaded else 'failed: ' + err2.strip()}")
else:
    out("FAIL", "out-of-tree module builds and loads", (err or txt).strip()[-300:])

# ------------------------------------------------------------ python packages
vers = []
for mod in ("numpy", "pandas", "pyarrow", "click", "rich"):
    try:
        m = __import__(mod)
        v = getattr(m, "__version__", None)
        if v is None:
            from importlib.metadata import version
            v = version(mod)
        vers.append(f"{mod} {v}")
    except Exception as e:  # noqa: BLE001
        vers.append(f"{mod} MISSING ({e})")
try:
    import pandas as pd
    import pyarrow.parquet as pq
    df = pd.DataFrame({"gfn": [1, 2, 3], "prot": [6, 7, 14]})
    df.to_parquet("/tmp/smoke.parquet")
    ok = pq.read_table("/tmp/smoke.parquet").to_pandas().equals(df)
except Exception as e:  # noqa: BLE001
    ok = False
    vers.append(f"parquet round trip: {e}")
check("python packages", ok and "MISSING" not in " ".join(vers),
      f"python {sys.version.split()[0]}: " + ", ".join(vers) + ("; parquet round trip ok" if ok else ""))
rc, txt, _ = run("bpftrace", "--version")
out("info", "bpftrace", txt.strip() if rc == 0 else "missing")

print(f"smoke: {len(FAILED)} failed" + (f" ({', '.join(FAILED)})" if FAILED else ""))
sys.exit(1 if FAILED else 0)
