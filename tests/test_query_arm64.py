"""`kvmtrace query` on arm64, against a running VM of the test VMM.

Runs only on aarch64 with /dev/kvm, root and bcc: inside the emulated arm64
KVM host (testbed/arm64/run, on 6.1 and 7.x; see its README); skipped elsewhere, and
failing instead of skipping there when KVMTRACE_REQUIRE_LIVE=1.

    testbed/arm64/run --kernel 6.1 -- python3 -m pytest -q tests/test_query_arm64.py

One VM, the test VMM's ``bar`` scenario: RAM (anonymous and memfd slots) and
the testbed's ivshmem BAR through ``resource2`` (uncached mmap: Device) and
``resource2_wc`` (write-combine mmap: Normal-NC), each VM_PFNMAP|VM_IO. It is
launched by ``kvmtrace record`` (the recording of the same VM) and held at a
FIFO until ``kvmtrace query --window`` has attached, so the guest runs inside
query's window; while it holds (``--hold``), query is asked again without a
window. Every answer is checked against

- the VMM's own report (slots, their backing and what the guest touched);
- the kernel's own view: /proc/PID/maps and smaps (range, name, VmFlags);
  the stage-2 page-table dump is looked for (neither testbed kernel has it:
  6.1 predates it, Debian's 7.3.4 is built without
  CONFIG_PTDUMP_STAGE2_DEBUGFS), and query must say so;
- ``kvmtrace report`` of the recording: the same slots and VMAs, the same
  stage-2 types installed, the same rule and the same verdict.
"""

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, load_json, one_line_error, window_attached
from conftest import kvmtrace as run

IS_ARM64 = platform.machine() in ("aarch64", "arm64")
REQUIRE_LIVE = os.environ.get("KVMTRACE_REQUIRE_LIVE") == "1"
WINDOW = 60  # s: the guest runs in it (6-20 s under TCG on a busy host) after it attaches

pytestmark = pytest.mark.skipif(not IS_ARM64, reason="arm64 only (runs in testbed/arm64)")

# what each backing's VMA is on arm64 (pgprot_noncached / pgprot_writecombine /
# the default), and what KVM installs at stage 2 for it on each kernel
VMA_TYPE = {"anon": "Normal", "memfd": "Normal", "bar-uc": "Device-nGnRE",
            "bar-wc": "Normal-NC", "bar-cacheable": "Normal"}


def _pid_of(marker: str, seconds: float, proc) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kvmtrace record exited: {proc.stderr.read()[-2000:]}")
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


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


class Live:
    pass


def _scenario(path: Path):
    """The ``bar`` scenario plus a slot over the cacheable-PFNMAP test module's
    mapping of the BAR (bar-cacheable: kvmtrace_cbar, built and insmod'ed by
    the test VMM when /dev/kvmtrace_cbar is missing). 6.1 accepts that slot
    (its pages get mapped Device); 7.x refuses it (EINVAL: no CTR_EL0.DIC on
    this CPU), so it is created with that errno expected and not touched."""
    from testvmm import faults
    from testvmm import scenario as sc_mod
    from testvmm.scenario import Step
    sc = sc_mod.bar()
    err = faults.arm64_memslot_errno("bar-cacheable") or 0
    cb = sc.add_slot("bar-cacheable", 8, expect_errno=err)
    if not err:
        sc.steps += [Step(cb.slot, 0, 2, "r"), Step(cb.slot, 2, 2, "w"), Step(cb.slot, 4, 2, "rw")]
    sc.validate()
    path.write_text(json.dumps(sc.to_dict()))
    return {"cbar_slot": cb.slot, "cbar_errno": err}


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    conftest = __import__("conftest")
    conftest.skip_or_fail(conftest._missing_live())
    import kvmtrace
    from kvmtrace.host import procfs
    d = tmp_path_factory.mktemp("qa64")
    rec, rep, fifo = d / "vm.kvt", d / "vmm.json", d / "go"
    os.mkfifo(fifo)
    L = Live()
    L.scenario = _scenario(d / "scenario.json")
    from testvmm import backings
    if not os.path.exists(backings.CBAR_DEV):  # build + insmod now, not inside the window
        backings.load_cbar_module()
    vmm = (f"{sys.executable} -m testvmm --scenario-file {d / 'scenario.json'} -q "
           f"--report {rep} --hold 600")
    t00 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(rec), "--probes",
         "faults", "--",  # query's window records this set: its compile is cached then
         "sh", "-c", f"read go < {fifo}; exec {vmm}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    q = None
    t = {}
    try:
        L.pid = _pid_of(str(fifo), 900, proc)
        t["record_attach_s"] = round(time.monotonic() - t00, 1)
        print(f"query arm64: {t}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        q = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "query", "--pid",
                              str(L.pid), "--window", str(WINDOW), "--format", "json"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        window_attached(L.pid, q)
        t["window_attach_s"] = round(time.monotonic() - t0, 1)
        print(f"query arm64: {t}", file=sys.stderr, flush=True)
        time.sleep(1)
        Path(fifo).write_text("go\n")
        deadline = time.monotonic() + WINDOW - 2
        while not (rep.exists() and rep.stat().st_size):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the guest did not finish inside the window"
            time.sleep(0.2)
        t["guest_s"] = round(time.monotonic() - deadline + WINDOW - 2, 1)
        print(f"query arm64: {t}", file=sys.stderr, flush=True)
        time.sleep(0.5)
        L.vmm = load_json(rep)
        assert L.vmm["pid"] == L.pid and L.vmm["ok"], L.vmm.get("errors")
        L.maps = Path(f"/proc/{L.pid}/maps").read_text()
        L.smaps = procfs.read_smaps(L.pid)
        t1 = time.monotonic()
        L.now = run("query", "--pid", L.pid, "--format", "json", timeout=600)
        t["query_s"] = round(time.monotonic() - t1, 1)
        L.smaps_after = procfs.read_smaps(L.pid)
        out, err = q.communicate(timeout=WINDOW + 600)
        L.win = subprocess.CompletedProcess(q.args, q.returncode, out, err)
        t["window_query_s"] = round(time.monotonic() - t0, 1)
        t["fixture_s"] = round(time.monotonic() - t00, 1)
        _stop(proc)
        L.model = kvmtrace.load(str(rec))
        L.kernel = platform.release()
        L.times = t
        print(f"query arm64 timings: {t}", file=sys.stderr)
        yield L
    finally:
        if q is not None and q.poll() is None:
            q.kill()
            q.communicate()
        _stop(proc)


def _body(p):
    assert "Traceback" not in p.stderr, p.stderr
    return json.loads(p.stdout)


def _final(vmm):
    return {s["slot"]: s for s in vmm["slots"]
            if s["status"] == "ok" and s["final"]["present"] and s["role"] == "data"}


def _rows(p):
    return {r["slot"]: r for r in _body(p)["rows"]}


def test_iterators_load_and_read_the_vms_memslots(vm):
    """The task_file / task_vma iterators load on this arm64 kernel and the
    memslot walk finds every slot the VMM set up, as it set it up."""
    body = _body(vm.now)
    assert body["memslots_source"].startswith("BPF iterator (task_file)"), body["memslots_source"]
    assert body["vmas_source"].startswith("BPF iterator (task_vma)"), body["vmas_source"]
    rows = _rows(vm.now)
    for n, s in _final(vm.vmm).items():
        r = rows[n]
        assert (r["as_id"], r["gpa"], r["size_bytes"], r["hva"], r["flags"]) == \
            (s["as_id"], s["final"]["gpa"], s["size"], s["hva"], s["final"]["flags"]), n
    want = set(VMA_TYPE) - ({"bar-cacheable"} if vm.scenario["cbar_errno"] else set())
    assert {s["backing"] for s in _final(vm.vmm).values()} == want
    assert {r["vm_fd"] for r in rows.values()} == {vm.vmm["vm_fd"]}


def test_vmas_match_proc_maps_and_smaps(vm):
    def key(smaps):  # the slots' VMAs did not move while query read them (the heap may grow)
        return [(v["start"], v["end"], v["vmflags"]) for v in smaps
                if any(v["start"] <= r["hva"] < v["end"] for r in _rows(vm.now).values())]
    assert key(vm.smaps) == key(vm.smaps_after)
    for n, r in _rows(vm.now).items():
        v = next(v for v in vm.smaps if v["start"] <= r["hva"] < v["end"])
        assert (r["vma_start"], r["vma_end"]) == (v["start"], v["end"]), n
        assert f"{v['start']:x}-{v['end']:x}" in vm.maps
        assert r["vmflags"].split() == v["vmflags"].split(), n
        assert r["pfnmap"] is ("pf" in v["vmflags"].split()), n


def test_vma_memory_type_is_the_attrindx_of_vm_page_prot(vm):
    """RAM Normal; resource2 (pci_mmap_resource_range: pgprot_device) Device-nGnRE;
    resource2_wc (pgprot_writecombine) Normal-NC: the AttrIndx of vm_page_prot, read now."""
    rows = _rows(vm.now)
    for n, s in _final(vm.vmm).items():
        r = rows[n]
        want = VMA_TYPE.get(s["backing"])
        if want is None:
            continue
        assert r["vma_memtype"] == want, (n, s["backing"], r["vma_memtype_source"])
        idx = (r["vm_page_prot"] >> 2) & 7
        assert f"AttrIndx {idx} -> {want}" in r["vma_memtype_source"]
        if s["backing"].startswith("bar"):
            assert {"pf", "io"} <= set(r["vmflags"].split())
            assert s["path"].endswith({"bar-wc": "resource2_wc", "bar-uc": "resource2",
                                       "bar-cacheable": "kvmtrace_cbar"}[s["backing"]])


def test_without_a_window_it_says_what_it_cannot_see(vm):
    """No stage-2 dump on these kernels, no window: exit 2, and the reason
    names both; the VMA side and the rule are still there."""
    body = _body(vm.now)
    assert vm.now.returncode == 2 and body["exit_code"] == 2
    assert "stage-2 page-table dump" in body["installed_source"], body["installed_source"]
    assert "CONFIG_PTDUMP_STAGE2_DEBUGFS" in body["installed_source"]
    assert not list(Path("/sys/kernel/debug/kvm").glob(f"{vm.pid}-*/stage2_page_tables"))
    assert "FWB" in body["decided_by"] and "VM_ALLOW_ANY_UNCACHED" in body["decided_by"]
    assert one_line_error(vm.now).startswith("kvmtrace: cannot tell:")
    for r in body["rows"]:
        assert r["verdict"] == "unknown" and r["installed_pages"] is None
        assert r["rule"], r


def _stage2_type(backing, kernel):
    if backing in ("anon", "memfd"):
        return "Normal"
    return "Device"  # both kernels force the ivshmem BAR to Device (no VM_ALLOW_ANY_UNCACHED)


def test_window_sees_what_kvm_installed(vm):
    """The window (kvm_pgtable_stage2_map's prot): RAM Normal, both BAR
    mappings Device; RAM consistent, the write-combine BAR downgraded
    (Normal-NC -> Device), the uncached BAR consistent; exit 1 (a mismatch)."""
    body = _body(vm.win)
    assert "recording window" in body["installed_source"] and "kvm_pgtable_stage2_map" in \
        body["installed_source"], body["installed_source"]
    assert vm.win.returncode == 1, (vm.win.stderr, body["rows"])
    rows = _rows(vm.win)
    for n, s in _final(vm.vmm).items():
        r = rows[n]
        want = _stage2_type(s["backing"], vm.kernel)
        assert r["installed_pages"] and r["installed_memtype"] == want, (n, s["backing"], r)
        verdict = "downgraded" if s["backing"] in ("bar-wc", "bar-cacheable") else "consistent"
        assert r["verdict"] == verdict, (n, s["backing"], r["reason"])
        if s["backing"].startswith("bar"):
            assert "Device" in r["rule"] and "PFNMAP" in r["rule"] or \
                "force" in r["rule"], r["rule"]
        else:
            assert r["rule"] == "kernel memory (struct page in the linear map): mapped Normal " \
                                "cacheable", r["rule"]


def test_window_agrees_with_the_report_of_the_same_vm(vm):
    """The recording of the whole run (kvmtrace report's tables): per slot,
    the same VMA (range, flags, vm_page_prot, type), the same distinct pages
    installed with the same stage-2 type, the same rule and the same
    verdict as query's window."""
    m = vm.model
    rows = _rows(vm.win)
    now = _rows(vm.now)
    f = m.faults[m.faults["pid"] == vm.pid]
    for n, s in _final(vm.vmm).items():
        r = rows[n]
        v = m.slots[(m.slots["pid"] == vm.pid) & (m.slots["slot"] == n)] \
            .sort_values("start_ts")
        last = v.iloc[-1]
        assert (int(last["gpa"]), int(last["size_bytes"]), int(last["hva"])) == \
            (r["gpa"], r["size_bytes"], r["hva"]), n
        assert int(last["kvm_pgprot"]) == now[n]["vm_page_prot"], n
        assert int(last["kvm_vm_flags"]) == now[n]["vm_flags"], n
        assert last["vma_memtype_arm64"] == now[n]["vma_memtype"], n
        mine = f[(f["slot"] == n) & f["spte_memtype"].notna() & (f["spte_memtype"] != "")]
        assert r["installed_pages"] == mine["gfn"].nunique(), n
        assert set(mine["spte_memtype"]) == {r["installed_memtype"]}, n
        assert set(mine["verdict"]) == {r["verdict"]}, (n, set(mine["verdict"]))
        data = mine[mine["access"] != "exec"]
        assert set(data["rule"]) == {r["rule"]}, (n, set(data["rule"]), r["rule"])


def test_cacheable_pfnmap_slot(vm):
    """The cacheable-PFNMAP module's BAR mapping (VMA Normal, VM_PFNMAP):
    6.1 maps it Device (the rule "PFNMAP forced to Device", downgraded, in
    query and in the report alike); 7.x refused the memslot, so query has no
    slot there and the report says rejected by kvm_arch_prepare_memory_region."""
    n = vm.scenario["cbar_slot"]
    rows = _rows(vm.win)
    v = vm.model.verdicts
    v = v[(v["pid"] == vm.pid) & (v["slot"] == n)]
    if vm.scenario["cbar_errno"]:
        assert n not in rows and n not in _rows(vm.now)
        assert "rejected" in set(v["verdict"]), v
        assert any("kvm_arch_prepare_memory_region refused" in x for x in v["reason"])
        return
    r = rows[n]
    assert r["vma_memtype"] == "Normal" and r["pfnmap"] is True
    assert r["installed_memtype"] == "Device" and r["verdict"] == "downgraded"
    assert "PFNMAP forced to Device" in r["rule"], r["rule"]
    assert set(v["verdict"]) == {"downgraded"}, v
