"""The VMA behind each memslot, captured in BPF at the memslot ioctl itself.

bcc 0.26 cannot load a program passing a callback to bpf_find_vma; kvmtrace
links bcc's output itself (kvmtrace.host.bccload.link_callback). The linker
is tested offline on real bytes: tests/fixtures/vma-link/*.bin are the
instructions bcc produced on the KVM-PVM x86 host (6.18, bcc 0.26) for the
memslot entry program and its callback, saved by

    .venv/bin/python tests/test_vma_capture_live.py --capture tests/fixtures/vma-link

The live tests record real VMMs on this host's KVM and check every slot's
captured VMA against the VMM's own view of its mappings and, independently,
/proc/PID/maps read while the VMM is alive; a VMM that unmaps or exits right
after the ioctl still has its VMA; without the lookup, recording still works
and says why the VMA is missing.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import kvmtrace
from kvmtrace.analysis import vmas as vmas_mod
from kvmtrace.host import bccload
from kvmtrace.probes import program

from conftest import FIXTURES, ROOT, guest_cmd, kvmtrace as run, load_json

LINK = FIXTURES / "vma-link"
VM_READ, VM_WRITE, VM_EXEC, VM_MAYSHARE = 0x1, 0x2, 0x4, 0x80


def insns(raw: bytes):
    return [struct.unpack_from("<BBhi", raw, i) for i in range(0, len(raw), 8)]


# -- the linker, offline on real bytes -------------------------------------------

def test_link_callback_on_bcc_output():
    main, cb = (LINK / "enter.bin").read_bytes(), (LINK / "callback.bin").read_bytes()
    sites = bccload.callback_loads(main)
    calls = [i for i, (code, regs, off, imm) in enumerate(insns(main))
             if code == bccload.BPF_CALL and imm == bccload.BPF_FUNC_FIND_VMA]
    # one load of the callback's address per bpf_find_vma call (the walk is unrolled)
    assert len(sites) == len(calls) >= 2
    linked, start = bccload.link_callback(main, cb)
    assert start == len(main) // 8 and linked[len(main):] == cb
    before, after = insns(main), insns(linked)
    for i, (b, a) in enumerate(zip(before, after)):
        if i in sites:
            code, regs, off, imm = a
            assert code == bccload.BPF_LD_IMM64 and regs >> 4 == bccload.BPF_PSEUDO_FUNC
            assert regs & 0xF == b[1] & 0xF          # same destination register
            assert i + 1 + imm == start               # the callback's first instruction
            assert after[i + 1] == before[i + 1]      # upper half untouched (zero)
        else:
            assert a == b, i                          # nothing else changes
    # bcc had left every one of them unrelocated: src_reg 0, value 0
    assert all(before[i][1] >> 4 == 0 and before[i][3] == 0 for i in sites)


def test_link_refuses_what_it_does_not_understand():
    main, cb = (LINK / "enter.bin").read_bytes(), (LINK / "callback.bin").read_bytes()
    with pytest.raises(bccload.LinkError, match="not end with exit"):
        bccload.link_callback(main, cb[:-8])
    # ending with an unconditional jump back to its exit (clang's layout when a
    # branch comes after it) cannot fall through: accepted
    ja_back = struct.pack("<BBhi", 0x05, 0, 0, -(len(cb) // 8))
    insns, start = bccload.link_callback(main, cb + ja_back)
    assert insns[start * 8:] == cb + ja_back
    with pytest.raises(bccload.LinkError, match="no load of a callback"):
        bccload.link_callback(cb, cb)
    # r3 = 0 (unrelocated) then a jump before the helper call: refused, not guessed
    ld = struct.pack("<BBhi", 0x18, 3, 0, 0) + struct.pack("<BBhi", 0, 0, 0, 0)
    ja = struct.pack("<BBhi", 0x05, 0, 0, 0)
    call = struct.pack("<BBhi", 0x85, 0, 0, bccload.BPF_FUNC_FIND_VMA)
    exit_ = struct.pack("<BBhi", 0x95, 0, 0, 0)
    with pytest.raises(bccload.LinkError, match="jump"):
        bccload.callback_loads(ld + ja + call + exit_)
    # the address in r4, not r3: refused
    ld4 = struct.pack("<BBhi", 0x18, 4, 0, 0) + struct.pack("<BBhi", 0, 0, 0, 0)
    with pytest.raises(bccload.LinkError, match="not r3"):
        bccload.callback_loads(ld4 + call + exit_)
    # moved to r3 through r6 across another helper call: followed
    mov63 = struct.pack("<BBhi", 0xBF, 0x6 | 0x4 << 4, 0, 0)  # r6 = r4
    mov36 = struct.pack("<BBhi", 0xBF, 0x3 | 0x6 << 4, 0, 0)  # r3 = r6
    other = struct.pack("<BBhi", 0x85, 0, 0, 14)               # get_current_pid_tgid
    assert bccload.callback_loads(ld4 + mov63 + other + mov36 + call + exit_) == [0]
    # a BPF-to-BPF call needs relocation the linker does not do
    pcall = struct.pack("<BBhi", 0x85, bccload.BPF_PSEUDO_CALL << 4, 0, 1)
    with pytest.raises(bccload.LinkError, match="BPF-to-BPF"):
        bccload.link_callback(ld + call + exit_, pcall + exit_)


def test_func_btf_blob():
    blob, ids = bccload.func_btf([("main_prog", True, 1), ("the_cb", False, 3)])
    magic, version, flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from("<HBBIIIII", blob)
    assert (magic, version, hdr_len) == (0xEB9F, 1, 24)
    assert len(blob) == 24 + str_off + str_len and type_len == str_off
    types, strs = blob[24:24 + type_len], blob[24 + str_off:]
    # walk the type section: INT, PTR, then FUNC_PROTO + FUNC per function
    tid, pos, funcs = 0, 0, {}
    while pos < len(types):
        name_off, info, size_type = struct.unpack_from("<III", types, pos)
        kind, vlen = info >> 24 & 0x1F, info & 0xFFFF
        pos += 12 + (4 if kind == 1 else 8 * vlen if kind == 13 else 0)
        tid += 1
        if kind == 12:
            name = strs[name_off:strs.index(b"\0", name_off)].decode()
            funcs[name] = (tid, vlen)  # vlen of a FUNC is its linkage
    assert funcs == {"main_prog": (ids[0], 1), "the_cb": (ids[1], 0)}  # global, static


def test_raw_memslot_records_carry_the_vma():
    """Ring records captured on the development host (tests/fixtures/raw-x86-pvm,
    made by tests/fixtures/capture_raw.py): each memslot record holds the VMA
    the guest itself saw behind that slot."""
    import numpy as np

    from kvmtrace.collectors.ringbuf import decode
    from kvmtrace.probes import codegen
    from kvmtrace.probes.events import EVENTS, VMA_STATUS

    raw = FIXTURES / "raw-x86-pvm"
    guest = load_json(raw / "guest.json")
    bodies, _ = decode(np.frombuffer((raw / "memslot.bin").read_bytes(), dtype=np.uint8),
                       codegen.record_dtype(EVENTS["memslot"]))
    by_slot = {s["slot"]: s["vma"] for s in guest["slots"] if s["status"] == "ok"}
    assert len(bodies) == len(by_slot)
    for b in bodies:
        g = by_slot[int(b["slot"])]
        assert int(b["vma_status"]) == VMA_STATUS["FOUND"] and int(b["vma_err"]) == 0
        assert (int(b["vma_start"]), int(b["vma_end"])) == (g["start"], g["end"])
        assert vmas_mod.vm_flags_mnemonics(int(b["vm_flags"])).split() == g["vm_flags"]
        assert int(b["vma_count"]) == 1 and int(b["vma_covers"]) == 1
        assert int(b["vma_has_file"]) == 0 and g["inode"] == 0


def test_verifier_summary_names_the_reason():
    log = ("0: R1=ctx() R10=fp0\n24: (18) r3 = 0xf\nmissing btf func_info\n"
           "processed 25 insns (limit 1000000) max_states_per_insn 0\n")
    assert bccload._verifier_summary(log) == "missing btf func_info"
    assert "5.17" in program.vma_refusal("Invalid argument (invalid func unknown#180)")


# -- live -------------------------------------------------------------------------

# A VMM that sets one memslot over fresh memory (anonymous, a named memfd, or
# a file on /dev/shm), says what its own /proc/self/maps showed for it, then
# unmaps it (or exits) at once.
QUICK_VMM = r"""
import ctypes, json, mmap, os, sys, time
from kvmtrace import kvmapi
from testvmm.kvmcall import ioctl, open_kvm
mode, backing = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None)
kvm = open_kvm()
vm = ioctl(kvm, kvmapi.KVM_CREATE_VM, 0)
size = 256 << 10
if backing == "vvar":  # the kernel's own special mapping (VM_PFNMAP, no file)
    line = next(l for l in open("/proc/self/maps") if l.split()[-1] == "[vvar]")
    addr, end = (int(x, 16) for x in line.split()[0].split("-"))
    size = end - addr
else:
    if backing == "anon":
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:
        fd = (os.memfd_create("kvmtrace-quick") if backing == "memfd" else
              os.open(sys.argv[3], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        if backing == "file":
            os.unlink(sys.argv[3])
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    line = next(l for l in open("/proc/self/maps") if int(l.split("-")[0], 16) <= addr
                < int(l.split("-")[1].split()[0], 16))
r = kvmapi.kvm_userspace_memory_region(slot=3, flags=0, guest_phys_addr=1 << 20,
                                       memory_size=size, userspace_addr=addr)
print(json.dumps({"pid": os.getpid(), "hva": addr, "maps": line}), flush=True)
ioctl(vm, kvmapi.KVM_SET_USER_MEMORY_REGION, r)
if mode == "exit":
    os._exit(0)
assert libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size)) == 0
print("unmapped", flush=True)
time.sleep(2)
"""

def parse_maps_line(line: str) -> dict:
    parts = line.split(None, 5)
    a, b = parts[0].split("-")
    return {"start": int(a, 16), "end": int(b, 16), "perms": parts[1],
            "offset": int(parts[2], 16), "dev": parts[3], "inode": int(parts[4]),
            "path": parts[5].strip() if len(parts) > 5 else ""}


def check_vma_against_maps(row, m: dict):
    """A slot's captured VMA equals a /proc/PID/maps line (read independently)."""
    assert (int(row.vma_start), int(row.vma_end)) == (m["start"], m["end"])
    flags = int(row.vm_flags)
    r, w, x, s = m["perms"]
    assert (r == "r", w == "w", x == "x", s == "s") == (
        bool(flags & VM_READ), bool(flags & VM_WRITE), bool(flags & VM_EXEC),
        bool(flags & VM_MAYSHARE))
    if m["inode"]:
        assert bool(row.vma_has_file) and int(row.vma_ino) == m["inode"]
        assert row.vma_dev == m["dev"]
        assert int(row.vm_pgoff) * 4096 == m["offset"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo guest recorded with --hold, its /proc/PID/maps read while it holds."""
    if os.geteuid() != 0 or not os.path.exists("/dev/kvm"):
        pytest.skip("needs root and /dev/kvm")
    tmp = tmp_path_factory.mktemp("vma")
    out, rep = tmp / "demo.kvt", tmp / "guest.json"
    rec = subprocess.Popen(
        [sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(out), "--",
         *guest_cmd("--scenario", "demo", "-q", "--report", rep, "--hold", 4)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not rep.exists() and time.monotonic() < end and rec.poll() is None:
        time.sleep(0.05)
    assert rep.exists(), rec.communicate()
    time.sleep(0.1)
    guest = load_json(rep)
    with open(f"/proc/{guest['pid']}/maps") as f:
        maps = [parse_maps_line(ln) for ln in f]
    _, err = rec.communicate(timeout=120)
    assert rec.returncode == 0, err
    return kvmtrace.load(str(out)), guest, maps


@pytest.mark.usefixtures("live")
def test_every_slot_vma_captured_at_the_ioctl(demo):
    model, guest, maps = demo
    assert model.meta["vma_lookup"]["available"] is True, model.meta["vma_lookup"]
    slots = model.slots
    assert len(slots) and (slots["vma_source"] == "captured in BPF at the ioctl").all(), \
        slots[["slot", "vma_source"]]
    known = set(vmas_mod.VM_FLAG_MNEMONICS.values())
    by_start = {m["start"]: m for m in maps}
    for s in guest["slots"]:
        if s["status"] != "ok":
            continue
        for _, row in slots[slots["slot"] == s["slot"]].iterrows():
            g = s["vma"]  # the guest's own view of the VMA behind its slot
            assert (int(row.vma_start), int(row.vma_end)) == (g["start"], g["end"]), s["slot"]
            assert set(row.vmflags.split()) == set(g["vm_flags"]) & known, s["slot"]
            assert (int(row.vma_ino) if row.vma_has_file else 0) == g["inode"]
            if g["inode"]:
                assert row.vma_dev == g["dev"]
            check_vma_against_maps(row, by_start[int(row.vma_start)])
            assert row.vma_count == 1 and row.vma_covers
            assert row.pgprot_memtype == "WB", row.pgprot_memtype_source


@pytest.mark.usefixtures("live")
def test_vvar_pfnmap_slot_has_flags_and_pgprot(demo):
    model, guest, _ = demo
    s = next(s for s in guest["slots"] if s["backing"] == "pfnmap" and s["status"] == "ok")
    row = model.slots[model.slots["slot"] == s["slot"]].iloc[0]
    flags = int(row.vm_flags)
    assert flags & vmas_mod.VM_PFNMAP and flags & vmas_mod.VM_IO and row.pfnmap
    assert row.vma == "[vvar]" and not row.vma_has_file  # name from smaps, matched by range
    prot = int(row.vm_page_prot)
    assert prot & 1  # _PAGE_PRESENT
    # PWT / PCD / PAT clear: PAT entry 0 of the recorded PAT configuration
    assert prot & (1 << 3 | 1 << 4 | 1 << 7) == 0
    pat0 = model.meta["x86"]["pat"]["entries"][0]
    assert row.pgprot_memtype == pat0 == "WB"
    assert f"{prot:#x}" in row.pgprot_memtype_source
    # the per-fault memory type now comes from vm_page_prot
    f = model.faults[model.faults["slot_row"] == row.name]
    assert len(f) and (f["vma_memtype"] == "WB").all()
    assert f["vma_memtype_source"].str.contains("vm_page_prot").all()


def _record_quick(tmp_path, mode, env=None, backing="anon"):
    """Record every VM on the host while a quick VMM runs. The recorder is
    stopped (SIGSTOP) from before the VMM's memslot ioctl until the VMM has
    unmapped the slot's memory or exited: its smaps snapshot then comes too
    late for certain, as on a loaded host. BPF events wait in the ring."""
    out = tmp_path / f"{mode}.kvt"
    rec = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(out)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, **(env or {})))
    end = time.monotonic() + 120  # the file exists once the probes are attached
    while not (out.exists() and out.stat().st_size) and rec.poll() is None \
            and time.monotonic() < end:
        time.sleep(0.05)
    assert rec.poll() is None, rec.communicate()
    rec.send_signal(signal.SIGSTOP)
    try:
        shm = f"/dev/shm/kvmtrace-quick-{os.getpid()}"  # tmpfs: a file with a name
        vmm = subprocess.Popen([sys.executable, "-c", QUICK_VMM, mode, backing, shm], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
        said = json.loads(vmm.stdout.readline())
        if mode == "exit":
            assert vmm.wait(timeout=60) == 0
        else:
            assert vmm.stdout.readline().strip() == "unmapped"
    finally:
        rec.send_signal(signal.SIGCONT)
    time.sleep(1)  # the collector drains the ring and takes its (late) snapshot
    rec.send_signal(signal.SIGINT)
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    vmm.wait(timeout=60)
    model = kvmtrace.load(str(out))
    rows = [r for _, r in model.slots.iterrows() if r.pid == said["pid"]]
    assert len(rows) == 1, model.slots
    return model, said, rows[0]


@pytest.mark.usefixtures("live")
@pytest.mark.parametrize("mode, backing", [("unmap", "anon"), ("exit", "anon"),
                                           ("exit", "memfd"), ("unmap", "file"),
                                           ("exit", "vvar")])
def test_vmm_that_unmaps_or_exits_at_once_keeps_its_vma(tmp_path, mode, backing):
    """The VMA, and its file's name (the dentry's, read in BPF at the ioctl),
    although no smaps snapshot ever showed it."""
    model, said, row = _record_quick(tmp_path, mode, backing=backing)
    assert int(row.hva) == said["hva"]
    assert row.vma_source == "captured in BPF at the ioctl"
    maps = parse_maps_line(said["maps"])
    check_vma_against_maps(row, maps)
    name = {"anon": "[anon]", "memfd": "memfd:kvmtrace-quick", "vvar": "[vvar]",
            "file": f".../{Path(maps['path'].removesuffix(' (deleted)')).name} "
                    f"(inode {maps['inode']} on {maps['dev']})"}
    assert row.vma == name[backing], (row.vma, maps)
    assert row.pfnmap == (backing == "vvar")
    if backing != "vvar":
        assert row.pgprot_memtype == "WB"
    # smaps, read after the munmap or the exit, could not have seen it
    snap = model.recording["vmas"]
    snap = snap[snap["pid"] == said["pid"]]
    assert not ((snap["start"] <= said["hva"]) & (snap["end"] > said["hva"])).any()


@pytest.mark.usefixtures("live")
@pytest.mark.parametrize("mode", ["unmap", "exit"])
def test_without_the_lookup_recording_works_and_says_why(tmp_path, mode):
    model, said, row = _record_quick(tmp_path, mode, {program.NO_VMA_LOOKUP_ENV: "1"})
    vl = model.meta["vma_lookup"]
    assert vl["available"] is False and program.NO_VMA_LOOKUP_ENV in vl["reason"]
    assert int(row.hva) == said["hva"] and row.vma == "not observed"
    smaps_why = ("the VMM had exited before the smaps snapshot" if mode == "exit" else
                 "no smaps snapshot showed a VMA at the slot's address")
    assert row.vma_source.startswith(f"VMA not captured: {smaps_why}"), row.vma_source
    assert row.vma_source.endswith(
        f"and this kernel's BPF VMA lookup is unavailable ({vl['reason']})")
    ev = model.recording["memslot"]
    assert (ev.loc[ev["pid"] == said["pid"], "vma_status"] == 0).all()
    # and the verdict of a fault there would say so: the slot's type is unknown
    assert pd.isna(model.slots.loc[row.name, "pgprot_memtype"])


@pytest.mark.usefixtures("live")
def test_kernel_refusal_falls_back_to_the_program_without(monkeypatch):
    """Where the kernel refuses the lookup (e.g. before 5.17), the entry
    program without it is attached and the reason kept."""
    from kvmtrace.host import headers, tracefs
    from kvmtrace.probes import catalogue

    def refuse(*a, **k):
        raise bccload.BPFLoadError("Invalid argument (invalid func unknown#180)")

    monkeypatch.setattr(bccload, "load_with_callback", refuse)
    tracefs.ensure_mounted()
    prog = program.build(catalogue.parse_selection("memslot-ioctls"), True)
    b = bccload.load(prog.text, headers.apply(headers.find()) + prog.cflags,
                     after=prog.attach_all)
    try:
        assert prog.vma_lookup["available"] is False
        assert "bpf_find_vma" in prog.vma_lookup["reason"] and "5.17" in prog.vma_lookup["reason"]
        assert program.ENTER_IOCTL_NOVMA.encode() in b.funcs
        assert b"syscalls:sys_enter_ioctl" in b.tracepoint_fds
    finally:
        b.cleanup()


@pytest.mark.usefixtures("live")
def test_doctor_reports_the_vma_lookup():
    p = run("doctor", "--format", "json", timeout=300)
    assert p.returncode == 0, p.stderr
    checks = {c["name"]: c for c in json.loads(p.stdout)["checks"]}
    c = checks["VMA lookup in BPF"]
    assert c["ok"] is True and "bpf_find_vma" in c["detail"], c


# -- the analysis, offline ---------------------------------------------------------

def test_slot_without_any_vma_says_why():
    import pandas as pd

    slots = pd.DataFrame([{"pid": 7, "vm_fd": 4, "as_id": 0, "slot": 1, "hva": 0x10000,
                           "size_bytes": 0x4000, "start_ts": 100}])
    empty_vmas = pd.DataFrame(columns=["ts", "pid", "start", "end", "inode", "path",
                                       "vmflags", "kernelpagesize_kb", "anonhugepages_kb"])
    memslot = pd.DataFrame([{"pid": 7, "vm_fd": 4, "slot": 1, "ts": 100, "vma_status": 0}])
    notes = pd.DataFrame([{"ts": 101, "key": "smaps_unavailable",
                           "value": json.dumps({"pid": 7, "reason": "memslot"})}])
    meta = {"vma_lookup": {"available": False, "reason": "no bpf_find_vma (Linux 5.17+)"}}
    out = vmas_mod.slot_vmas(slots, empty_vmas, memslot, meta, notes)
    assert out["vma"].tolist() == ["not observed"]
    assert out["vma_source"].iloc[0] == (
        "VMA not captured: the VMM had exited before the smaps snapshot, and this "
        "kernel's BPF VMA lookup is unavailable (no bpf_find_vma (Linux 5.17+))")
    # an older recording: no VMA fields at all, no vma_lookup in its meta
    old = vmas_mod.slot_vmas(slots, empty_vmas, memslot[["pid", "vm_fd", "slot", "ts"]], {},
                             None)
    assert old["vma_source"].iloc[0].endswith(
        "this recording has no BPF VMA lookup (made by a kvmtrace without it)")
    # the lookup ran but the mmap lock was contended
    busy = memslot.assign(vma_status=3, vma_err=-16)
    out = vmas_mod.slot_vmas(slots, empty_vmas, busy, meta, notes)
    assert "EBUSY: the mmap lock was contended" in out["vma_source"].iloc[0]


def test_vm_flags_and_dev_spelled_like_proc():
    assert vmas_mod.vm_flags_mnemonics(0x4044411) == "rd mr pf io de dd"  # [vvar] here
    assert vmas_mod.dev_name(0xFE00000) == "fe:00" and vmas_mod.dev_name(1) == "00:01"
    x86 = {"arch": "x86_64", "x86": {"pat": {"entries": ["WB", "WC", "UC-", "UC", "WB", "WP",
                                                         "UC-", "WT"]}}}
    assert vmas_mod.pgprot_memtype(0x8000000000000025, x86)[0] == "WB"
    assert vmas_mod.pgprot_memtype(0x8000000000000025 | 1 << 3, x86)[0] == "WC"  # PWT
    assert vmas_mod.pgprot_memtype(0x8000000000000025 | 1 << 4, x86)[0] == "UC-"  # PCD


# -- fixture capture ------------------------------------------------------------------

def capture(out_dir):
    """Save bcc's instructions for the entry program and its callback."""
    from kvmtrace.host import headers, tracefs
    from kvmtrace.probes import catalogue

    tracefs.ensure_mounted()
    prog = program.build(catalogue.parse_selection("memslot-ioctls"), True)
    bcc = bccload.import_bcc()
    b = bcc.BPF(text=prog.text, cflags=headers.apply(headers.find()) + prog.cflags)
    os.makedirs(out_dir, exist_ok=True)
    for name, fn in (("enter.bin", program.ENTER_IOCTL), ("callback.bin", program.VMA_CALLBACK)):
        raw = b.dump_func(fn)
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(raw)
        print(f"{name}: {len(raw) // 8} instructions")
    b.cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--capture"]:
        capture(sys.argv[2])
