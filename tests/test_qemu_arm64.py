"""QEMU recorded end to end on arm64 (issue 7, item 1), checked against QEMU's
own view of guest memory rather than ours.

Live (inside the emulated arm64 KVM host, testbed/arm64/run; testbed/arm64/e2e
runs it on 6.1 and 7.x): `kvmtrace record -- qemu-system-aarch64 -accel kvm`
running a bare-metal payload (testbed/arm64/payload/qemu-payload.S, built here
with the root's gcc) that writes PAYLOAD_PAGES pages of RAM, assigns the
ivshmem-plain device's BAR2 through ECAM and writes BAR_PAGES pages of it, says
READY in the BAR and waits for GO, then powers off through PSCI. While it
waits, QEMU's flat view (`info mtree -f`, through QMP's human-monitor-command)
is taken; then:

- the memslots live at that moment (from the report's slot history) are
  exactly the RAM/ROM/ROMD/RAM-device ranges of the flat view of AS "memory"
  (GPA and size), and each is named after its QEMU region;
- every fault in a slot has its IPA inside that slot; the RAM slot took at
  least one fault on each of the payload's PAYLOAD_PAGES pages, the BAR slot
  on each of its BAR_PAGES pages; faults outside every memslot lie in the
  flat view's I/O ranges (ECAM, emulated MMIO), never in RAM;
- the slot's VMA names the backend: the BAR's is the ivshmem backend's file.

Skipped where there is no qemu-system-aarch64 or no arm64 KVM; with
KVMTRACE_REQUIRE_LIVE=1 (testbed/arm64/e2e) a missing piece fails instead.
With KVMTRACE_QEMU_KEEP=DIR the recording and the flat view are copied to DIR
(how tests/fixtures/qemu-arm64/ was made; see its README).

With VFIO (issue 7, item 2; the testbed booted with --iommu, an SMMUv3):
the outer machine's own ivshmem device is bound to vfio-pci and the inner
QEMU gets it with `-device vfio-pci,host=<BDF>,addr=1` in place of
ivshmem-plain, so the payload (unchanged: same ids at 00:01.0) writes the
real device's BAR through QEMU's RAM-device region ("ramd" in the flat view,
mmapped from the VFIO device fd). QEMU holds the VFIO group (one opener at a
time) and IO_STRICT_DEVMEM keeps sysfs resource2 from mapping a BAR a driver
claimed, so READY and GO go through QEMU's own VFIO device fd, duplicated
with pidfd_getfd. Checked as above, plus: the BAR slot's VMA is vfio-pci's
(anon_inode:[vfio-device], VM_PFNMAP|VM_IO, and VM_ALLOW_ANY_UNCACHED from
6.9), and the stage-2 type KVM installed for it is Device on 6.1
(device_pfn_forced) and Normal-NC on 7.x (force_noncacheable_nc), with that
rule named on every BAR fault and in the slot's verdict. Skipped (with the
reason) without an IOMMU group; with KVMTRACE_REQUIRE_LIVE=1 and
KVMTRACE_TESTBED_IOMMU=1 (booted with --iommu) that fails instead.
KVMTRACE_QEMU_KEEP=DIR keeps qemu-vfio-<k>.kvt / .mtree.json.

Offline (any host): the committed fixtures in tests/fixtures/qemu-arm64/ pass
the same checks through `kvmtrace report --format json`.
"""

import ctypes
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kvmtrace
from kvmtrace.analysis import qemu as qemu_view

from conftest import kvmtrace as run, skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD_SRC = ROOT / "testbed" / "arm64" / "payload" / "qemu-payload.S"
FIXTURES = ROOT / "tests" / "fixtures" / "qemu-arm64"
QEMU = "qemu-system-aarch64"
IS_ARM64 = platform.machine() in ("aarch64", "arm64")
PAGE = 4096
# QEMU's region names in the command below (the backends' ids)
RAM_ID, SHM_ID = "kt-ram", "kt-shm"
MEM_KINDS = ("ram", "rom", "romd", "ramd")  # flat-view kinds KVM gets a memslot for
VFIO_VMA = "anon_inode:[vfio-device]"  # /proc/PID/maps name of a VFIO device fd's mmap


def payload_defines(text: str | None = None) -> dict:
    """The payload's #define'd integers (one source of truth for the numbers)."""
    text = PAYLOAD_SRC.read_text() if text is None else text
    out = {}
    for name, val in re.findall(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text, re.M):
        out[name] = int(val, 0)
    return out


def qemu_command(payload: str, shm: str | None, sock: str, *,
                 vfio: str | None = None) -> list[str]:
    """The QEMU command line: the device at 00:01.0 is ivshmem-plain over the
    file `shm`, or with vfio=BDF the host's PCI device BDF through vfio-pci."""
    dev = (["-device", f"vfio-pci,host={vfio},addr=1"] if vfio else
           ["-object", f"memory-backend-file,id={SHM_ID},size=1M,mem-path={shm},share=on",
            "-device", f"ivshmem-plain,memdev={SHM_ID},addr=1"])
    return [QEMU, "-M", "virt,gic-version=3,highmem=off", "-cpu", "host", "-accel", "kvm",
            "-m", "64", "-nodefaults", "-display", "none", "-no-reboot",
            "-object", f"memory-backend-memfd,id={RAM_ID},size=64M",
            "-M", f"memory-backend={RAM_ID}", *dev,
            "-kernel", payload, "-qmp", f"unix:{sock},server=on,wait=off"]


# ------------------------------------------------------------- QEMU's view

# QEMU's flat view parser is kvmtrace's own (record --qmp names slots with it)
flat_view = qemu_view.flat_view


def qmp(sock: str, command_line: str, timeout: float = 120) -> str:
    """One HMP command through QMP's human-monitor-command."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        f = s.makefile("rw")
        json.loads(f.readline())  # greeting
        reply = None
        for cmd in ({"execute": "qmp_capabilities"},
                    {"execute": "human-monitor-command",
                     "arguments": {"command-line": command_line}}):
            f.write(json.dumps(cmd) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
            assert "error" not in reply, reply
        return reply["return"]


# ----------------------------------------------------------------- checks

def faulted_pages(faults, first_gpa: int, n: int) -> np.ndarray:
    """Which of the n pages from first_gpa a fault in `faults` mapped: each
    fault covers the stage-2 mapping it installed (mapping_size_bytes, aligned
    down), or its own page when it installed nothing. Why not one fault per
    page: 7.3.4 with QEMU 10.0 mapped the 2 MiB vfio BAR as one 2 MiB block
    on the payload's first BAR write (6.1 with QEMU 7.2: one 4 KiB page per
    fault)."""
    size = faults["mapping_size_bytes"].astype("Int64").fillna(PAGE).to_numpy(np.uint64)
    size[size == 0] = PAGE
    lo = faults["ipa"].to_numpy(np.uint64) // size * size
    pages = np.uint64(first_gpa) + np.arange(n, dtype=np.uint64) * np.uint64(PAGE)
    return ((pages[:, None] >= lo) & (pages[:, None] < lo + size)).any(axis=1)


def check_against_qemu(m, slots_json: list, doc: dict, d: dict) -> dict:
    """The recording `m` (kvmtrace.load) and its report's slot table against
    QEMU's flat view `doc["mtree"]` taken at CLOCK_MONOTONIC `doc["monotonic_ns"]`.
    The BAR is QEMU's region `doc["bar_region"]` (default: the ivshmem
    backend, SHM_ID) and its slot's VMA is named `doc["bar_vma"]` (default:
    the backend's file `doc["shm"]`). Returns {QEMU region name: slot id}."""
    regions = [r for r in flat_view(doc["mtree"]) if r["kind"] in MEM_KINDS]
    io = [r for r in flat_view(doc["mtree"]) if r["kind"] == "i/o"]
    bar_id = doc.get("bar_region", SHM_ID)
    assert {r["name"] for r in regions} >= {RAM_ID, bar_id}, regions
    # QEMU's own word on which ranges KVM has a memslot for agrees with the kinds
    assert [r for r in flat_view(doc["mtree"]) if r["kvm"]] == regions
    s = m.slots
    t = int(doc["monotonic_ns"])
    alive = s[(s["size_bytes"] > 0) & (s["start_ts"].astype("uint64") <= t)
              & (s["end_ts"].astype("uint64") > t)]
    got = sorted((int(r.gpa), int(r.size_bytes)) for r in alive.itertuples())
    assert got == sorted((r["gpa"], r["size"]) for r in regions), (got, regions)
    # the report says the same (its slot table, every version)
    rep = {(x["gpa"], x["size_bytes"]) for x in slots_json}
    assert set(got) <= rep
    names = {}
    for r in regions:
        row = alive[(alive["gpa"] == r["gpa"]) & (alive["size_bytes"] == r["size"])].iloc[0]
        names[r["name"]] = int(row["slot"])
        if r["kind"] in ("rom", "romd"):  # QEMU maps ROM and ROM devices read-only
            assert "READONLY" in row["flag_names"], (r, row["flag_names"])
    # the BAR's VMA: the ivshmem backend's file, or the VFIO device's mmap
    bar = alive[alive["slot"] == names[bar_id]].iloc[0]
    want_vma = doc.get("bar_vma") or Path(doc["shm"]).name
    assert want_vma in str(bar["vma"]), bar["vma"]
    # faults: in their slot's range; the payload's pages all faulted
    f = m.faults
    inside = f[f["slot_row"] >= 0]
    lo = s.loc[inside["slot_row"], "gpa"].to_numpy(np.uint64)
    hi = lo + s.loc[inside["slot_row"], "size_bytes"].to_numpy(np.uint64)
    ipa = inside["ipa"].to_numpy(np.uint64)
    assert ((ipa >= lo) & (ipa < hi)).all()
    ram_rows = s.index[(s["slot"] == names[RAM_ID]) & (s["gpa"] == 0x40000000)]
    bar_rows = s.index[(s["slot"] == names[bar_id]) & (s["gpa"] == d["BAR_GPA"])]
    for rows, first, n in ((ram_rows, d["DATA_BASE"], d["PAYLOAD_PAGES"]),
                           (bar_rows, d["BAR_GPA"], d["BAR_PAGES"])):
        hit = faulted_pages(inside[inside["slot_row"].isin(rows)], first, n)
        assert hit.all(), [hex(first + i * PAGE) for i in np.flatnonzero(~hit)[:8]]
    # outside every memslot: QEMU's I/O ranges (ECAM, UART, GIC ...), never RAM
    outside = f.loc[f["slot_row"] < 0, "ipa"].to_numpy(np.uint64)
    if len(outside) and io:
        io_lo = np.array([r["gpa"] for r in io], dtype=np.uint64)
        io_hi = io_lo + np.array([r["size"] for r in io], dtype=np.uint64)
        hit = ((outside[:, None] >= io_lo) & (outside[:, None] < io_hi)).any(axis=1)
        assert hit.all(), [hex(int(x)) for x in outside[~hit][:8]]
    return names


def kernel_key(release: str) -> str:
    """The fixtures' name for a kernel: "7.x" from 6.17 (the cacheable-PFNMAP
    rules), else "6.1"."""
    return "7.x" if kernel_mm(release) >= (6, 17) else "6.1"


def kernel_mm(release: str) -> tuple[int, int]:
    """'7.3.4+deb13-arm64' -> (7, 3)."""
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", release).groups())


def vfio_bar_rule(release: str) -> str:
    """The rule (kvmtrace/memtype/arm64.py RULES id) by which KVM maps a
    vfio-pci BAR on this kernel, as tests/test_vfio_live.py::_arm64_rule has
    it: before 6.9 every pfn that is not kernel memory is Device; from 6.9
    vfio-pci's VM_ALLOW_ANY_UNCACHED gives Normal-NC, from 6.17 through
    s2_force_noncacheable."""
    from kvmtrace.memtype import arm64 as a64
    k = kernel_mm(release)
    return ("device_pfn_forced" if k < (6, 9) else "device_pfn_normal_nc"
            if k < a64.CACHEABLE_PFNMAP_FIRST else "force_noncacheable_nc")


def check_vfio_bar(m, doc: dict, d: dict) -> dict:
    """The BAR assigned through vfio-pci, against the kernel's rules: QEMU
    shows it as a RAM-device region of the host device's BAR; the slot over it
    is vfio-pci's mmap (VM_PFNMAP|VM_IO, VM_ALLOW_ANY_UNCACHED from 6.9);
    every payload BAR page was mapped by a fault in that slot, each with the
    stage-2 type and rule of vfio_bar_rule, and the slot's verdict names that
    rule. Returns what it found (for the test's log)."""
    from kvmtrace.memtype import arm64 as a64
    from test_vfio_live import VM_ALLOW_ANY_UNCACHED, VM_IO, VM_PFNMAP
    v = doc["vfio"]
    (region,) = [r for r in flat_view(doc["mtree"]) if r["name"] == doc["bar_region"]]
    assert region["kind"] == "ramd" and region["gpa"] == d["BAR_GPA"], region
    assert region["name"].startswith(f'{v["bdf"]} BAR {v["bar"]}'), region
    s, t = m.slots, int(doc["monotonic_ns"])
    live = s[(s["gpa"] == d["BAR_GPA"]) & (s["size_bytes"] == region["size"])
             & (s["start_ts"].astype("uint64") <= t) & (s["end_ts"].astype("uint64") > t)]
    assert len(live) == 1, live
    bar = live.iloc[0]
    assert bar["vma"] == VFIO_VMA, bar["vma"]
    flags = int(bar["vm_flags"])
    assert flags & (VM_IO | VM_PFNMAP) == VM_IO | VM_PFNMAP, hex(flags)
    assert bool(flags & VM_ALLOW_ANY_UNCACHED) == (kernel_mm(doc["kernel"]) >= (6, 9)), hex(flags)
    rows = s.index[(s["slot"] == bar["slot"]) & (s["gpa"] == d["BAR_GPA"])]
    f = m.faults[m.faults["slot_row"].isin(rows)]
    ok = f[f["spte_memtype"].notna() & (f["spte_memtype"].astype(str) != "")]
    rule = a64.RULES[vfio_bar_rule(doc["kernel"])]
    # (the kernel's skipped probe runs and the lost events, if any, say why not)
    assert len(ok), (f[["ts", "tid", "ipa", "installs", "spte_memtype"]], m.skipped,
                     m.lost[m.lost["lost"] > 0])
    assert set(ok["spte_memtype"].astype(str)) == {rule.stage2}, ok["spte_memtype"]
    assert ok["rule"].astype(str).str.startswith(rule.words).all(), set(ok["rule"])
    # every BAR page the payload wrote lies in a stage-2 mapping of that type
    hit = faulted_pages(ok, d["BAR_GPA"], d["BAR_PAGES"])
    assert hit.all(), [hex(d["BAR_GPA"] + i * PAGE) for i in np.flatnonzero(~hit)]
    size = ok["mapping_size_bytes"].astype("Int64").to_numpy(np.uint64)
    vd = m.verdicts
    (verdict,) = vd[(vd["slot"] == bar["slot"]) & (vd["gpa"] == d["BAR_GPA"])
                    & (vd["faults"] > 0)].itertuples()
    assert verdict.verdict == "consistent", verdict
    assert "kernel rule: " + rule.words in verdict.reason, verdict.reason
    return {"slot": int(bar["slot"]), "vm_flags": hex(flags), "faults": len(f),
            "installed": len(ok), "mapping_sizes": sorted(set(int(x) for x in size)),
            "stage2": rule.stage2, "rule": rule.id}


def report_slots(path) -> list:
    p = run("report", "--format", "json", path, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["slots"]


# ------------------------------------------------------------------ offline

FIXTURE_KERNELS = sorted(p.name[len("qemu-"):-len(".kvt")] for p in FIXTURES.glob("qemu-*.kvt")
                         if not p.name.startswith("qemu-vfio-"))
VFIO_FIXTURE_KERNELS = sorted(p.name[len("qemu-vfio-"):-len(".kvt")]
                              for p in FIXTURES.glob("qemu-vfio-*.kvt"))


@pytest.mark.parametrize("k", FIXTURE_KERNELS)
def test_fixture_memslots_equal_qemu_flat_view(k):
    doc = json.loads((FIXTURES / f"qemu-{k}.mtree.json").read_text())
    path = FIXTURES / f"qemu-{k}.kvt"
    names = check_against_qemu(kvmtrace.load(str(path)), report_slots(path), doc,
                               payload_defines(doc["payload_source"]))
    assert set(names) >= {RAM_ID, SHM_ID, "virt.flash0", "virt.flash1"}


@pytest.mark.parametrize("k", VFIO_FIXTURE_KERNELS)
def test_fixture_vfio_bar(k):
    """The VFIO recording (qemu-vfio-<k>.*): memslots equal QEMU's flat view,
    and the BAR slot's VMA and stage-2 type follow the kernel's rules."""
    doc = json.loads((FIXTURES / f"qemu-vfio-{k}.mtree.json").read_text())
    assert kernel_key(doc["kernel"]) == k
    path = FIXTURES / f"qemu-vfio-{k}.kvt"
    m, d = kvmtrace.load(str(path)), payload_defines(doc["payload_source"])
    names = check_against_qemu(m, report_slots(path), doc, d)
    assert set(names) >= {RAM_ID, doc["bar_region"], "virt.flash0", "virt.flash1"}
    check_vfio_bar(m, doc, d)


# --------------------------------------------------------------------- live

def _missing() -> str | None:
    if not IS_ARM64:
        return "needs an arm64 KVM host (see testbed/arm64)"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (testbed/arm64/build puts it in the roots)"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("gcc") is None:
        return "no gcc to build the payload"
    return None


@pytest.fixture
def qemu_live():
    skip_or_fail(_missing(), IS_ARM64, "QEMU live test")


def _wait_ready(read_bar, rec: subprocess.Popen, d: dict, timeout: float) -> None:
    """Until read_bar() (the BAR's first 8 bytes, or None while unreadable)
    is READY_WORD; fails if record ends first."""
    ready = d["READY_WORD"].to_bytes(8, "little")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if read_bar() == ready:
            return
        if rec.poll() is not None:
            pytest.fail(f"record ended before the payload was ready: {rec.returncode}\n"
                        + rec.stderr.read())
        time.sleep(0.2)
    pytest.fail(f"payload not READY after {timeout} s")


def _build_payload(tmp_path: Path) -> Path:
    payload = tmp_path / "payload.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-Wl,-Ttext=0x40200000",
                    "-Wl,--build-id=none", "-o", str(payload), str(PAYLOAD_SRC)],
                   check=True, timeout=300)
    return payload


def _record(out: Path, cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(out),
                             "--", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _keep(out: Path, doc: dict, stem: str) -> None:
    """KVMTRACE_QEMU_KEEP=DIR: the recording and the flat view as
    DIR/<stem>-<k>.kvt / .mtree.json (k: kernel_key)."""
    keep = os.environ.get("KVMTRACE_QEMU_KEEP")
    if keep:
        k = kernel_key(platform.release())
        shutil.copyfile(out, Path(keep) / f"{stem}-{k}.kvt")
        (Path(keep) / f"{stem}-{k}.mtree.json").write_text(json.dumps(doc, indent=1) + "\n")


def test_qemu_recorded_end_to_end(tmp_path, qemu_live):
    d = payload_defines()
    payload = _build_payload(tmp_path)
    shm = Path(f"/dev/shm/kvmtrace-qemu-ivshmem-{os.getpid()}")
    fd = os.open(shm, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        os.close(fd)
        sock, out = str(tmp_path / "qmp.sock"), tmp_path / "qemu.kvt"
        cmd = qemu_command(str(payload), str(shm), sock)
        rec = _record(out, cmd)
        try:
            _wait_ready(lambda: shm.read_bytes()[:8], rec, d, timeout=900)
            t0 = time.monotonic_ns()
            mtree = qmp(sock, "info mtree -f")
            t1 = time.monotonic_ns()
            with open(shm, "r+b") as f:
                f.seek(8)
                f.write(d["GO_WORD"].to_bytes(8, "little"))
            _, err = rec.communicate(timeout=600)
        finally:
            if rec.poll() is None:
                rec.terminate()
                rec.wait(timeout=30)
        assert rec.returncode == 0, err
    finally:
        shm.unlink(missing_ok=True)
    doc = {"monotonic_ns": (t0 + t1) // 2, "query_ns": [t0, t1], "mtree": mtree,
           "shm": str(shm), "command": cmd, "kernel": platform.release(),
           "payload_source": PAYLOAD_SRC.read_text()}
    names = check_against_qemu(kvmtrace.load(str(out)), report_slots(out), doc, d)
    assert set(names) >= {RAM_ID, SHM_ID, "virt.flash0", "virt.flash1"}
    _keep(out, doc, "qemu")


# ----------------------------------------------------------------- live, VFIO

_SYS_PIDFD_GETFD = 438  # asm-generic unistd.h: the same number on arm64 and x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def _vfio_bar():
    """(device dir, BAR index) of the outer machine's ivshmem BAR, which
    vfio-pci can take; skip (or fail when the testbed was booted with an
    IOMMU and live tests are required) when it cannot."""
    from testvmm import backings, vfio
    dev, index = backings.find_bar()
    why = None if dev else index
    if dev and vfio.driver_of(dev) != "vfio-pci" and vfio.iommu_group(dev) is None:
        why = f"{dev} has no IOMMU group: the host has no IOMMU (testbed run --iommu)"
    if why:
        _vfio_unavailable(why)
    return dev, index


def _vfio_unavailable(why: str):
    skip_or_fail(why, os.environ.get("KVMTRACE_TESTBED_IOMMU") == "1",
                 "vfio-pci (the testbed was booted with an IOMMU)")


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate of process pid's fd in this process (pidfd_getfd(2), 5.6+)."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(ctypes.c_long(_SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                            ctypes.c_int(fd), ctypes.c_uint(0))
        if new < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pidfd_getfd({pid}, {fd}): {os.strerror(e)}")
        return new
    finally:
        os.close(pidfd)


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def _qemu_vfio_fd(rec: subprocess.Popen, timeout: float) -> tuple[int, int]:
    """(QEMU's pid, a duplicate of its VFIO device fd): record's child, once it
    has opened the device. QEMU holds the device's group, which has one opener
    at a time, so this is the host's one way to the BAR through VFIO."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for pid in _children(rec.pid):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link == VFIO_VMA:
                    return pid, _pidfd_getfd(pid, int(fd))
        if rec.poll() is not None:
            pytest.fail(f"record ended before QEMU opened the VFIO device: {rec.returncode}\n"
                        + rec.stderr.read())
        time.sleep(0.2)
    pytest.fail(f"QEMU had no VFIO device fd after {timeout} s")


def _region_offset(device_fd: int, index: int) -> int:
    """The BAR's offset in the VFIO device fd (VFIO_DEVICE_GET_REGION_INFO)."""
    from testvmm import vfio
    info = vfio.RegionInfo(ctypes.sizeof(vfio.RegionInfo), 0, index, 0, 0, 0)
    fcntl.ioctl(device_fd, vfio.VFIO_DEVICE_GET_REGION_INFO, info)
    return info.offset


def _pread_or_none(fd: int, n: int, at: int) -> bytes | None:
    """pread, or None while vfio-pci refuses it (EIO: the guest has not yet
    turned memory decoding on)."""
    try:
        return os.pread(fd, n, at)
    except OSError:
        return None


def test_qemu_with_vfio_pci(tmp_path, qemu_live):
    """QEMU with the outer machine's ivshmem device assigned through vfio-pci,
    recorded end to end (see the module's docstring)."""
    from testvmm import vfio
    dev, index = _vfio_bar()
    d = payload_defines()
    payload = _build_payload(tmp_path)
    try:
        v = vfio.VfioDevice(dev, index)  # binds vfio-pci, memory decoding on
    except vfio.VfioUnavailable as e:
        _vfio_unavailable(str(e))
    # keep vfio-pci bound while QEMU runs; give the device back afterwards
    previous, v.previous_driver = v.previous_driver, None
    try:
        # no READY/GO left in the BAR (its memory outlives every user of the device)
        os.pwrite(v.device_fd, bytes(16), v.bar_offset)
        bdf = v.bdf
        v.close()  # QEMU opens the group itself: one opener at a time
        sock, out = str(tmp_path / "qmp.sock"), tmp_path / "qemu-vfio.kvt"
        cmd = qemu_command(str(payload), None, sock, vfio=bdf)
        t_start = time.monotonic()
        rec = _record(out, cmd)
        fd = -1
        try:
            qemu_pid, fd = _qemu_vfio_fd(rec, timeout=900)
            bar = _region_offset(fd, index)
            _wait_ready(lambda: _pread_or_none(fd, 8, bar), rec, d, timeout=900)
            t_ready = time.monotonic()
            t0 = time.monotonic_ns()
            mtree = qmp(sock, "info mtree -f")
            t1 = time.monotonic_ns()
            os.pwrite(fd, d["GO_WORD"].to_bytes(8, "little"), bar + 8)
            _, err = rec.communicate(timeout=600)
        finally:
            if fd >= 0:
                os.close(fd)
            if rec.poll() is None:
                rec.terminate()
                rec.wait(timeout=30)
        assert rec.returncode == 0, err
    finally:
        v.previous_driver = previous
        v.close()
    print(f"vfio QEMU: READY after {t_ready - t_start:.1f} s, record ended after "
          f"{time.monotonic() - t_start:.1f} s", file=sys.stderr)
    regions = [r for r in flat_view(mtree) if r["gpa"] == d["BAR_GPA"]]
    assert len(regions) == 1, regions
    doc = {"monotonic_ns": (t0 + t1) // 2, "query_ns": [t0, t1], "mtree": mtree,
           "bar_region": regions[0]["name"], "bar_vma": VFIO_VMA,
           "vfio": {"bdf": bdf, "bar": index, "qemu_pid": qemu_pid,
                    "host_driver_before": previous or None},
           "command": cmd, "kernel": platform.release(),
           "payload_source": PAYLOAD_SRC.read_text()}
    _keep(out, doc, "qemu-vfio")  # before the checks: a failed one leaves it to look at
    m = kvmtrace.load(str(out))
    names = check_against_qemu(m, report_slots(out), doc, d)
    assert set(names) >= {RAM_ID, doc["bar_region"], "virt.flash0", "virt.flash1"}
    print(f"vfio BAR: {check_vfio_bar(m, doc, d)}", file=sys.stderr)
