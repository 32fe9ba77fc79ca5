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

Offline (any host): the committed fixtures in tests/fixtures/qemu-arm64/ pass
the same checks through `kvmtrace report --format json`.
"""

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

from conftest import REQUIRE_LIVE, kvmtrace as run

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD_SRC = ROOT / "testbed" / "arm64" / "payload" / "qemu-payload.S"
FIXTURES = ROOT / "tests" / "fixtures" / "qemu-arm64"
QEMU = "qemu-system-aarch64"
IS_ARM64 = platform.machine() in ("aarch64", "arm64")
PAGE = 4096
# QEMU's region names in the command below (the backends' ids)
RAM_ID, SHM_ID = "kt-ram", "kt-shm"
MEM_KINDS = ("ram", "rom", "romd", "ramd")  # flat-view kinds KVM gets a memslot for


def payload_defines(text: str | None = None) -> dict:
    """The payload's #define'd integers (one source of truth for the numbers)."""
    text = PAYLOAD_SRC.read_text() if text is None else text
    out = {}
    for name, val in re.findall(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text, re.M):
        out[name] = int(val, 0)
    return out


def qemu_command(payload: str, shm: str, sock: str) -> list[str]:
    return [QEMU, "-M", "virt,gic-version=3,highmem=off", "-cpu", "host", "-accel", "kvm",
            "-m", "64", "-nodefaults", "-display", "none", "-no-reboot",
            "-object", f"memory-backend-memfd,id={RAM_ID},size=64M",
            "-M", f"memory-backend={RAM_ID}",
            "-object", f"memory-backend-file,id={SHM_ID},size=1M,mem-path={shm},share=on",
            "-device", f"ivshmem-plain,memdev={SHM_ID},addr=1",
            "-kernel", payload, "-qmp", f"unix:{sock},server=on,wait=off"]


# ------------------------------------------------------------- QEMU's view

FLAT_LINE = re.compile(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z/]+)[^)]*\): (\S+)(.*)$")


def flat_view(mtree: str, address_space: str = "memory") -> list[dict]:
    """The ranges of `info mtree -f`'s flat view of one address space:
    [{gpa, size, kind, name, kvm}], kind as QEMU prints it (ram, rom, romd, ramd,
    i/o); kvm: QEMU marks the range " KVM" (its accelerator has a memslot there)."""
    out, mine = [], False
    for line in mtree.splitlines():
        if line.startswith("FlatView #"):
            mine = False
        elif line.startswith(" AS ") and f'AS "{address_space}",' in line:
            mine = True
        elif mine and (m := FLAT_LINE.match(line)):
            lo, hi = int(m[1], 16), int(m[2], 16)
            out.append({"gpa": lo, "size": hi - lo + 1, "kind": m[3], "name": m[4],
                        "kvm": "KVM" in m[5].split()})
    return out


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

def check_against_qemu(m, slots_json: list, doc: dict, d: dict) -> dict:
    """The recording `m` (kvmtrace.load) and its report's slot table against
    QEMU's flat view `doc["mtree"]` taken at CLOCK_MONOTONIC `doc["monotonic_ns"]`.
    Returns {QEMU region name: slot id}."""
    regions = [r for r in flat_view(doc["mtree"]) if r["kind"] in MEM_KINDS]
    io = [r for r in flat_view(doc["mtree"]) if r["kind"] == "i/o"]
    assert {r["name"] for r in regions} >= {RAM_ID, SHM_ID}, regions
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
    # the BAR's VMA is the ivshmem backend's file
    bar = alive[alive["slot"] == names[SHM_ID]].iloc[0]
    assert Path(doc["shm"]).name in str(bar["vma"]), bar["vma"]
    # faults: in their slot's range; the payload's pages all faulted
    f = m.faults
    inside = f[f["slot_row"] >= 0]
    lo = s.loc[inside["slot_row"], "gpa"].to_numpy(np.uint64)
    hi = lo + s.loc[inside["slot_row"], "size_bytes"].to_numpy(np.uint64)
    ipa = inside["ipa"].to_numpy(np.uint64)
    assert ((ipa >= lo) & (ipa < hi)).all()
    ram_rows = s.index[(s["slot"] == names[RAM_ID]) & (s["gpa"] == 0x40000000)]
    bar_rows = s.index[(s["slot"] == names[SHM_ID]) & (s["gpa"] == d["BAR_GPA"])]
    ram_pages = set(inside.loc[inside["slot_row"].isin(ram_rows), "ipa"].to_numpy(np.uint64)
                    // PAGE)
    want = set(range(d["DATA_BASE"] // PAGE, d["DATA_BASE"] // PAGE + d["PAYLOAD_PAGES"]))
    assert want <= ram_pages, sorted(want - ram_pages)[:8]
    bar_pages = set(inside.loc[inside["slot_row"].isin(bar_rows), "ipa"].to_numpy(np.uint64)
                    // PAGE)
    want = set(range(d["BAR_GPA"] // PAGE, d["BAR_GPA"] // PAGE + d["BAR_PAGES"]))
    assert want <= bar_pages, sorted(want - bar_pages)
    # outside every memslot: QEMU's I/O ranges (ECAM, UART, GIC ...), never RAM
    outside = f.loc[f["slot_row"] < 0, "ipa"].to_numpy(np.uint64)
    if len(outside) and io:
        io_lo = np.array([r["gpa"] for r in io], dtype=np.uint64)
        io_hi = io_lo + np.array([r["size"] for r in io], dtype=np.uint64)
        hit = ((outside[:, None] >= io_lo) & (outside[:, None] < io_hi)).any(axis=1)
        assert hit.all(), [hex(int(x)) for x in outside[~hit][:8]]
    return names


def report_slots(path) -> list:
    p = run("report", "--format", "json", path, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["slots"]


# ------------------------------------------------------------------ offline

FIXTURE_KERNELS = sorted(p.name[len("qemu-"):-len(".kvt")] for p in FIXTURES.glob("qemu-*.kvt"))


@pytest.mark.parametrize("k", FIXTURE_KERNELS)
def test_fixture_memslots_equal_qemu_flat_view(k):
    doc = json.loads((FIXTURES / f"qemu-{k}.mtree.json").read_text())
    path = FIXTURES / f"qemu-{k}.kvt"
    names = check_against_qemu(kvmtrace.load(str(path)), report_slots(path), doc,
                               payload_defines(doc["payload_source"]))
    assert set(names) >= {RAM_ID, SHM_ID, "virt.flash0", "virt.flash1"}


def test_flat_view_parser():
    text = ('FlatView #2\n AS "memory", root: system\n Root memory region: system\n'
            '  0000000000000000-0000000003ffffff (prio 0, romd): virt.flash0 KVM\n'
            '  000000003f000000-000000003fffffff (prio 0, i/o): pcie-mmcfg-mmio\n'
            '  0000000040000000-0000000043ffffff (prio 0, ram): kt-ram KVM\n'
            'FlatView #3\n AS "I/O", root: io\n'
            '  0000000000000000-000000000000ffff (prio 0, i/o): io\n')
    assert flat_view(text) == [
        {"gpa": 0, "size": 64 << 20, "kind": "romd", "name": "virt.flash0", "kvm": True},
        {"gpa": 0x3f000000, "size": 16 << 20, "kind": "i/o", "name": "pcie-mmcfg-mmio",
         "kvm": False},
        {"gpa": 0x40000000, "size": 64 << 20, "kind": "ram", "name": "kt-ram", "kvm": True}]


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
    why = _missing()
    if why:
        if REQUIRE_LIVE and IS_ARM64:
            pytest.fail(f"QEMU live test cannot run ({why}) and KVMTRACE_REQUIRE_LIVE=1")
        pytest.skip(why)


def _wait_ready(shm: Path, rec: subprocess.Popen, d: dict, timeout: float) -> None:
    ready = d["READY_WORD"].to_bytes(8, "little")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if shm.read_bytes()[:8] == ready:
            return
        if rec.poll() is not None:
            pytest.fail(f"record ended before the payload was ready: {rec.returncode}\n"
                        + rec.stderr.read())
        time.sleep(0.2)
    pytest.fail(f"payload not READY after {timeout} s")


def test_qemu_recorded_end_to_end(tmp_path, qemu_live):
    d = payload_defines()
    payload = tmp_path / "payload.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-Wl,-Ttext=0x40200000",
                    "-Wl,--build-id=none", "-o", str(payload), str(PAYLOAD_SRC)],
                   check=True, timeout=300)
    shm = Path(f"/dev/shm/kvmtrace-qemu-ivshmem-{os.getpid()}")
    fd = os.open(shm, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        os.close(fd)
        sock, out = str(tmp_path / "qmp.sock"), tmp_path / "qemu.kvt"
        cmd = qemu_command(str(payload), str(shm), sock)
        rec = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(out),
                                "--", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            _wait_ready(shm, rec, d, timeout=900)
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
    keep = os.environ.get("KVMTRACE_QEMU_KEEP")
    if keep:
        k = "7.x" if tuple(int(x) for x in platform.release().split(".")[:2]) >= (6, 17) else "6.1"
        shutil.copyfile(out, Path(keep) / f"qemu-{k}.kvt")
        (Path(keep) / f"qemu-{k}.mtree.json").write_text(json.dumps(doc, indent=1) + "\n")
