"""`kvmtrace query` against a running VM of the test VMM, on this host's KVM.

The VM is started by `kvmtrace record -- python -m testvmm --scenario demo
--hold ...`, so the same VM is both queried live and recorded: its memslots
cover anonymous RAM, a memfd, a file and the process's [vvar] (VM_PFNMAP |
VM_IO), plus READONLY and dirty-logged slots, a slot moved and one deleted
after the run. While it holds, query reads it (CLI, JSON and text, and
kvmtrace.query() from Python); every answer is then checked against

- the VMM's own report of what it set up (the final state of each slot);
- the kernel's own view: /proc/PID/maps and smaps for each VMA, and, for
  the frames KVM mapped in a window, /proc/iomem and the PAT memtype list;
- the recording of the same VM: `kvmtrace report`'s slot table (latest
  version of each slot, the VMA captured in BPF at the ioctl) and its
  verdicts.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvmtrace
from kvmtrace.analysis import vmas as vmas_mod
from kvmtrace.host import procfs

from conftest import ROOT, kvmtrace as run, load_json, one_line_error, window_attached

pytestmark = pytest.mark.usefixtures("live")
# s: query's recording window; the guest (a few seconds, more on a busy host)
# starts once the window has attached and must end inside it
WINDOW = 20


def vmm_cmd(*args):
    pkg = "testvmm" if (ROOT / "testvmm").is_dir() else "kvmtrace.guest"
    return [sys.executable, "-m", pkg, *map(str, args)]


def _wait_for(path: Path, proc, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            try:
                return load_json(path)
            except ValueError:
                pass  # being written
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear in {seconds} s")


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


class Live:
    """Everything read while the VM held, then the recording of it."""


@pytest.fixture(scope="module")
def held(tmp_path_factory, request):
    why = __import__("conftest")._missing_live()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("query")
    rec, rep = d / "vm.kvt", d / "vmm.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(rec), "--",
         *vmm_cmd("--scenario", "demo", "-q", "--report", rep, "--hold", 120)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        L = Live()
        L.vmm = _wait_for(rep, proc, 90)
        L.pid = L.vmm["pid"]
        time.sleep(0.3)  # the report is written just before the hold begins
        L.maps = Path(f"/proc/{L.pid}/maps").read_text()
        L.smaps = procfs.read_smaps(L.pid)
        t0 = time.monotonic()
        L.cli = run("query", "--pid", L.pid, "--format", "json")
        L.cli_s = time.monotonic() - t0
        L.text = run("query", "--pid", L.pid)
        slot5 = next(s for s in L.vmm["slots"] if s["slot"] == 5)
        L.slot5 = slot5
        L.cli_gpa = run("query", "--pid", L.pid, "--gpa", f"{slot5['final']['gpa']:#x}+0x1000",
                        "--format", "json")
        slot3 = next(s for s in L.vmm["slots"] if s["slot"] == 3)
        L.slot3 = slot3
        L.cli_hva = run("query", "--pid", L.pid, "--hva", f"{slot3['hva'] + 0x1000:#x}+4K",
                        "--format", "json")
        L.cli_slot = run("query", "--pid", L.pid, "--slot", 4, "--format", "json")
        L.cli_hole = run("query", "--pid", L.pid, "--gpa", "0x7000000000")
        L.api = kvmtrace.query(L.pid, gpa=slot5["final"]["gpa"], size=0x1000)
        L.smaps_after = procfs.read_smaps(L.pid)
        L.stopped_err = _stop(proc)
        L.model = kvmtrace.load(str(rec))
        yield L
    finally:
        _stop(proc)


def _rows(p):
    assert "Traceback" not in p.stderr
    return json.loads(p.stdout)["rows"]


def _final_slots(vmm):
    return {s["slot"]: s for s in vmm["slots"] if s["status"] == "ok" and s["final"]["present"]}


def test_memslots_are_the_vmms_own(held):
    """Every slot the VMM left in place, with its final GPA, size, HVA and
    flags (after the run it moved slot 4, deleted 2, flagged 1); no other."""
    rows = _rows(held.cli)
    want = {n: (s["as_id"], s["final"]["gpa"], s["size"], s["hva"], s["final"]["flags"])
            for n, s in _final_slots(held.vmm).items()}
    got = {r["slot"]: (r["as_id"], r["gpa"], r["size_bytes"], r["hva"], r["flags"])
           for r in rows}
    assert got == want
    assert {r["vm_fd"] for r in rows} == {held.vmm["vm_fd"]}
    backings = {s["backing"] for s in _final_slots(held.vmm).values()}
    assert {"anon", "memfd", "file", "pfnmap"} <= backings
    assert all(r["range_gpa"] == r["gpa"] and r["range_size_bytes"] == r["size_bytes"]
               for r in rows)


def test_vmas_match_proc_maps_and_smaps(held):
    """Each slot's VMA as the kernel shows it in /proc/PID/maps (range, name)
    and smaps (VmFlags), read while the VM held."""
    rows = _rows(held.cli)
    assert held.smaps == held.smaps_after  # nothing moved while we looked
    for r in rows:
        vma = next(v for v in held.smaps if v["start"] <= r["hva"] < v["end"])
        assert (r["vma_start"], r["vma_end"]) == (vma["start"], vma["end"]), r["slot"]
        assert r["vma"] == vmas_mod.describe_path(vma["path"], vma["vmflags"])
        assert f"{vma['start']:x}-{vma['end']:x}" in held.maps
        assert r["vmflags"].split() == vma["vmflags"].split(), r["slot"]
        assert r["vma_covers"] is True and r["vma_count"] == 1
        assert r["pfnmap"] is vmas_mod.is_pfn_mapped(vma["vmflags"])
    by_slot = {r["slot"]: r for r in rows}
    vvar = by_slot[5]
    assert vvar["vma"] == "[vvar]" and {"pf", "io"} <= set(vvar["vmflags"].split())
    assert by_slot[3]["vma"].startswith("memfd:")
    assert by_slot[4]["vma"] == held.vmm["slots"][4]["path"]


def test_vma_memory_type_from_vm_page_prot(held):
    """The VMA's type comes from vm_page_prot read now; on x86 it agrees with
    the kernel's own rules: an ordinary VMA is write-back, and the [vvar]
    PFNMAP's PAT bits select entry 0 (write-back)."""
    for r in _rows(held.cli):
        assert r["vm_page_prot"] is not None
        prot = r["vm_page_prot"]
        assert prot & (0x8 | 0x10 | 0x80) == 0  # PWT, PCD, PAT
        assert r["vma_memtype"] == "WB"
        assert f"vm_page_prot {prot:#x} now" in r["vma_memtype_source"]
        assert r["vma_source"].startswith("BPF iterator (task_vma)")


def test_without_a_window_it_cannot_tell_and_says_why(held):
    body = json.loads(held.cli.stdout)
    assert held.cli.returncode == 2
    line = one_line_error(held.cli)
    assert line.startswith("kvmtrace: cannot tell:") and "page-table dump" in line
    assert body["exit_code"] == 2 and body["window_s"] == 0
    assert body["memslots_source"].startswith("BPF iterator (task_file)")
    assert "KVM-PVM" in body["decided_by"] or "EPT" in body["decided_by"] \
        or "NPT" in body["decided_by"] or "shadow" in body["decided_by"]
    assert all(r["verdict"] == "unknown" and r["installed_pages"] is None
               for r in body["rows"])


def test_text_format(held):
    t = held.text
    assert t.returncode == 2 and "Traceback" not in t.stderr
    assert f"process {held.pid} " in t.stdout
    for n in _final_slots(held.vmm):
        assert f"slot {n} (as 0, VM fd {held.vmm['vm_fd']})" in t.stdout
    assert "[vvar]" in t.stdout and "VM_PFNMAP|VM_IO" in t.stdout


def test_ranges_select_the_slot_and_the_part_asked(held):
    (g,) = _rows(held.cli_gpa)
    assert (g["slot"], g["range_gpa"], g["range_size_bytes"]) == \
        (5, held.slot5["final"]["gpa"], 0x1000)
    assert g["range_hva"] == held.slot5["hva"]
    (h,) = _rows(held.cli_hva)
    assert h["slot"] == 3 and h["range_hva"] == held.slot3["hva"] + 0x1000
    assert h["range_gpa"] == held.slot3["final"]["gpa"] + 0x1000 and \
        h["range_size_bytes"] == 0x1000
    (s,) = _rows(held.cli_slot)
    assert s["slot"] == 4 and s["gpa"] == held.vmm["slots"][4]["final"]["gpa"]
    assert held.cli_hole.returncode == 2
    assert "no memslot of process" in one_line_error(held.cli_hole)


def test_python_api_returns_the_same_rows(held):
    (cli,) = _rows(held.cli_gpa)
    df = held.api
    assert len(df) == 1 and df.attrs["exit_code"] == 2
    from kvmtrace.analysis.query import to_records
    assert to_records(df)[0] == cli


def test_same_as_the_recording_of_the_same_vm(held):
    """kvmtrace report of the recording: the latest version of each slot has
    the GPA, size, HVA and flags query read live, and the VMA captured in BPF
    at the memslot ioctl is the one query read now (range, flags,
    vm_page_prot, memory type)."""
    m = held.model
    rows = _rows(held.cli)
    slots = m.slots[m.slots["pid"] == held.pid]
    for r in rows:
        v = slots[slots["slot"] == r["slot"]].sort_values("start_ts").iloc[-1]
        assert (int(v["gpa"]), int(v["size_bytes"]), int(v["hva"]), int(v["flags"])) == \
            (r["gpa"], r["size_bytes"], r["hva"], r["flags"]), r["slot"]
        assert (int(v["vma_start"]), int(v["vma_end"])) == (r["vma_start"], r["vma_end"])
        assert int(v["vm_flags"]) == r["vm_flags"]
        assert int(v["vm_page_prot"]) == r["vm_page_prot"]
        assert v["pgprot_memtype"] == r["vma_memtype"]
        assert v["vma"] == r["vma"]
    # the report's verdict for the slots as they were when the guest ran
    verdicts = m.verdicts[(m.verdicts["pid"] == held.pid) & (m.verdicts["faults"] > 0)]
    assert set(verdicts["verdict"]) == {"consistent"}
    assert set(verdicts["vma_memtype"]) == {"WB"}


def test_query_is_quick(held):
    """Compile + load + read, measured: printed for the README."""
    print(f"query --format json took {held.cli_s:.2f} s")
    assert held.cli_s < 60


# -- a recording window ----------------------------------------------------------

@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A VM that runs inside query's --window, recorded on its own too.

    The test VMM is held at a FIFO (``sh -c 'read < fifo; exec python -m
    testvmm ...'``: the same pid before and after exec) until query's window
    recording has attached; the outer recording attaches before it launches
    the command."""
    why = __import__("conftest")._missing_live()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("window")
    rec, rep, fifo = d / "vm.kvt", d / "vmm.json", d / "go"
    os.mkfifo(fifo)
    vmm = " ".join(vmm_cmd("--scenario", "demo", "-q", "--report", rep, "--hold", 30))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(rec), "--",
         "sh", "-c", f"read go < {fifo}; exec {vmm}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    q = None
    try:
        W = Live()
        W.pid = _pid_of_sh(str(fifo), 90)
        q = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "query", "--pid", str(W.pid),
                              "--window", str(WINDOW), "--format", "json"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        window_attached(W.pid, q)
        Path(fifo).write_text("go\n")
        out, err = q.communicate(timeout=600)
        W.q = subprocess.CompletedProcess(q.args, q.returncode, out, err)
        W.vmm = _wait_for(rep, proc, 60)
        assert W.vmm["pid"] == W.pid
        W.iomem = procfs.parse_iomem_ram(Path("/proc/iomem").read_text())
        pat = procfs.read_text("/sys/kernel/debug/x86/pat_memtype_list")
        W.pat = procfs.parse_pat_memtype_list(pat) if pat else None
        _stop(proc)
        W.model = kvmtrace.load(str(rec))
        yield W
    finally:
        if q is not None and q.poll() is None:
            q.kill()
            q.communicate()
        _stop(proc)


def _pid_of_sh(marker: str, seconds: float) -> int:
    """The `sh -c 'read go < FIFO; ...'` the recorder launched."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().decode().split("\0")
            except (OSError, UnicodeDecodeError):
                continue
            if argv[:2] == ["sh", "-c"] and marker in argv[2]:
                return int(d)
        time.sleep(0.1)
    raise AssertionError(f"no sh waiting on {marker}")


def test_window_sees_what_kvm_installed(windowed):
    """Every slot the guest touched after its last create / move: KVM's
    installs seen in the window, one per distinct page touched, write-back;
    consistent with the VMA. The moved slot (4) was touched before its move,
    and KVM zapped those mappings: nothing to compare, said so (exit 2)."""
    W = windowed
    assert W.q.returncode == 2, W.q.stderr
    body = json.loads(W.q.stdout)
    assert body["window_s"] == WINDOW and "recording window" in body["installed_source"]
    rows = {r["slot"]: r for r in body["rows"]}
    for n, s in _final_slots(W.vmm).items():
        touched = {p for pages in s.get("touched", {}).values() for p in pages}
        r = rows[n]
        if n == 4:
            assert r["installed_pages"] == 0 and r["verdict"] == "unknown"
            continue
        if s["final"]["flags"] & 2:  # READONLY: a write to a page never read exits (MMIO)
            assert 0 < r["installed_pages"] <= len(touched), n
        else:
            assert r["installed_pages"] == len(touched), n
        assert r["installed_memtype"] == "WB" and r["verdict"] == "consistent", r["reason"]
    line = one_line_error(W.q)
    assert line.startswith("kvmtrace: cannot tell:")


def test_window_frames_against_the_kernels_view(windowed):
    """The frames KVM mapped for the [vvar] slot: System RAM in /proc/iomem
    and absent from the PAT memtype list, i.e. write-back, as query says."""
    W = windowed
    r = next(r for r in json.loads(W.q.stdout)["rows"] if r["slot"] == 5)
    assert r["installed_pfns"]
    pfns = []
    for part in r["installed_pfns"].split(", "):
        a, _, b = part.partition("-")
        pfns += list(range(int(a, 16), int(b or a, 16) + 1))
    for pfn in pfns:
        pa = pfn * 4096
        assert any(x["start"] <= pa < x["end"] for x in W.iomem)
        if W.pat is not None:
            assert not any(x["start"] <= pa < x["end"] for x in W.pat)
    assert "System RAM" in r["pat_memtype_list"] and r["vma_memtype"] == "WB"


def test_window_agrees_with_the_report_of_the_same_vm(windowed):
    """The independent recording of the whole run: per slot version still
    current, the faults the report counts on distinct pages equal the pages
    query saw installed, and both verdicts are the same."""
    W = windowed
    m = W.model
    rows = {r["slot"]: r for r in json.loads(W.q.stdout)["rows"]}
    f = m.faults[m.faults["pid"] == W.pid]
    for n, r in rows.items():
        v = m.slots[(m.slots["pid"] == W.pid) & (m.slots["slot"] == n)].sort_values("start_ts")
        first_current = v[v["created_by"] != "flags"].iloc[-1]
        mine = f[(f["slot"] == n) & (f["ts"] >= int(first_current.start_ts))]
        assert r["installed_pages"] == mine["gfn"].nunique(), n
        if len(mine):
            assert set(mine["verdict"]) == {r["verdict"]} == {"consistent"}
            assert set(mine["spte_memtype"]) == {r["installed_memtype"]}


# -- bad input ------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--pid", "2147483646"], "no such process"),
    (["--pid", "1", "--gpa", "zz"], "expected a number"),
    (["--pid", "1", "--gpa", "0x1000+0"], "more than 0"),
    (["--pid", "1", "--gpa", "0x1000", "--slot", "2"], "one of --gpa, --hva, --slot"),
    (["--pid", "1", "--window", "-1"], "--window"),
    (["--pid", "0"], "--pid 0"),
])
def test_bad_input_is_one_line(args, words):
    line = one_line_error(run("query", *args))
    assert words in line


def test_a_process_without_a_vm():
    p = run("query", "--pid", os.getpid())
    assert p.returncode == 2
    assert "has no KVM VM open" in one_line_error(p)


def test_an_exited_process_is_said_exited():
    """A VMM that exited but is not reaped (a zombie) keeps its comm and
    /proc entry with no fds: query says it exited, not 'no KVM VM open'
    (a gated test VMM that gave up at its gate looked like this)."""
    z = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 20
        while Path(f"/proc/{z.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        p = run("query", "--pid", z.pid)
        assert p.returncode == 2 and "has exited" in one_line_error(p)
    finally:
        z.wait()
