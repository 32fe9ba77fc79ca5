"""What KVM's own selftests do to memslots, read from their sources, and the
check that a kvmtrace report's memslot history says the same.

Shared by testbed/x86/guest/selftests.py (live, in the emulated AMD host) and
tests/test_selftests_x86.py (offline, on the committed recordings). Sources:
tools/testing/selftests/kvm of Debian's linux-source-6.1 (6.1.192-3) and
linux-source-7.3 (7.3.4-1~bpo13+1), the kernels testbed/x86 boots.

The truth is per VM *instance*: a KVM_CREATE_VM and the memslot ioctls on the
fd it returned until the next KVM_CREATE_VM returns the same fd (the tests
create and free VMs one after another in one process, so fd numbers are
reused). Per instance and slot id, the expected list of (op, gpa, flags)
(None: not checked) in the order the test issues them; what kvm_vm_free()
deletes at the end comes in hash order across slots, hence per slot.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pandas as pd

from kvmtrace.analysis.memslots import RECOVERED

KVM_CREATE_VM = 0xAE01
KVM_MEM_LOG_DIRTY_PAGES = 1
MiB = 1 << 20

# name -> arguments (bounded for a TCG-emulated host; see each expectation).
TESTS = {
    # argv[1]: loops of the MOVE and DELETE subtests (default 10)
    "set_memory_region_test": {"args": ["2"]},
    # -b: memory per vCPU (default 1G); -i: add/delete iterations (default 1000)
    "memslot_modification_stress_test": {"args": ["-b", "2M", "-i", "20"]},
    # -M dirty-log: KVM_GET_DIRTY_LOG only (all three modes, one VM each, ran
    # past 20 min on a loaded 2-core host: each VM's slot 1 is 1 GiB, fixed);
    # -i 3 (the minimum, > 2) iterations of -I 1 ms
    "dirty_log_test": {"args": ["-M", "dirty-log", "-i", "3", "-I", "1"]},
}


def _invalid_flags(gmem: bool) -> dict:
    """7.x test_invalid_memory_region_flags(): on one barebones VM, slot 0 of
    2 MiB at GPA 0 with each unsupported flag bit i, through
    KVM_SET_USER_MEMORY_REGION (bits 2..31: GUEST_MEMFD is REGION2 only) and
    then KVM_SET_USER_MEMORY_REGION2 (bits 3..31, and 2 when the host lacks
    guest_memfd); with guest_memfd, LOG_DIRTY|GUEST_MEMFD and
    READONLY|GUEST_MEMFD too. Every one refused (EINVAL)."""
    ops = []
    for i in range(2, 32):
        ops.append(("failed create", 0, 1 << i))
        if i > 2 or not gmem:
            ops.append(("failed create", 0, 1 << i))
    if gmem:
        ops += [("failed create", 0, 5), ("failed create", 0, 6)]
    return {0: ops}


def _smrt(run: dict, nr_memslots: int, kernel: str) -> list:
    """set_memory_region_test.c main(): test_zero_memory_regions (a VM
    without memslots); 7.x: test_mmio_during_vectoring (one
    vm_create_with_one_vcpu VM: slot 0, deleted at kvm_vm_free) and
    test_invalid_memory_region_flags (_invalid_flags); then
    test_add_max_memory_regions (slots 0..N-1 of 2 MiB at slot * 2 MiB, then
    slot N refused with EINVAL; N = KVM_CAP_NR_MEMSLOTS; never deleted: the
    library does not know them); 7.x: the guest_memfd tests when the host
    has KVM_X86_SW_PROTECTED_VM (the log says "Skipping" otherwise, and
    nothing else is expected here); then `loops` x test_move_memory_region
    (slot 10 at 0xc0000000 moved to 0xc0000000 - 4 KiB and back while the
    vCPU runs) and `loops` x test_delete_memory_region (slot 10 deleted,
    added back, deleted; then slot 0); 7.x runs both again with
    KVM_X86_QUIRK_SLOT_ZAP_ALL disabled where the host has that quirk (the
    log says "slot zap quirk disabled"). spawn_vm(): vm_create_with_one_vcpu
    (slot 0 at GPA 0) + slot 10 of 2 MiB THP at 0xc0000000. kvm_vm_free()
    deletes the slots left."""
    loops = int(run["args"][0]) if run["args"] else 10
    log = run.get("log", "")
    seven = not kernel.startswith("6.1")
    gpa10 = 0xC0000000
    vms = [{}]  # test_zero_memory_regions: no memslot ioctl
    if seven:
        vms.append({0: [("create", 0, 0), FREE]})
        vms.append((_invalid_flags(False), _invalid_flags(True)))
    mx = {s: [("create", s * 2 * MiB, 0)] for s in range(nr_memslots)}
    mx[nr_memslots] = [("failed create", nr_memslots * 2 * MiB, 0)]
    vms.append(mx)
    if seven and "Skipping tests for KVM_MEM_GUEST_MEMFD" not in log:
        raise ValueError("set_memory_region_test ran the guest_memfd tests: not transcribed")
    move = {0: [("create", 0, 0), FREE],
            10: [("create", gpa10, 0), ("move", gpa10 - 4096, 0), ("move", gpa10, 0), FREE]}
    delete = {0: [("create", 0, 0), ("delete", None, None)],
              10: [("create", gpa10, 0), ("delete", None, None), ("create", gpa10, 0),
                   ("delete", None, None)]}
    rounds = 2 if seven and "slot zap quirk disabled" in log else 1
    for _ in range(rounds):
        vms += [move] * loops + [delete] * loops
    return _freed(vms, kernel)


def _mmst(run: dict, nr_memslots: int, kernel: str) -> list:
    """memslot_modification_stress_test.c: one VM (perf_test / memstress:
    slot 0 at GPA 0, slot 1 the vCPUs' memory at the top of the guest's
    physical space), then slot 7 of one page just below slot 1 added and
    deleted `-i` times while the vCPU runs; 6.1's kvm_vm_free() deletes 0 and 1."""
    args = run["args"]
    n = int(args[args.index("-i") + 1]) if "-i" in args else 1000
    return _freed([{0: [("create", 0, 0), FREE], 1: [("create", None, 0), FREE],
                    7: [("create", None, 0), ("delete", None, None)] * n}], kernel)


def _dlt(run: dict, nr_memslots: int, kernel: str) -> list:
    """dirty_log_test.c run_test(), once per log mode (-M all: dirty-log,
    clear-log, dirty-ring; one guest mode on x86): __vm_create (slot 0 at GPA
    0), slot 1 (TEST_MEM_SLOT_INDEX) of 1 GiB + 3 pages with
    KVM_MEM_LOG_DIRTY_PAGES near the top of the guest's physical space; the
    flags never change; 6.1's kvm_vm_free() deletes both. A mode the host lacks is
    skipped before its VM is made."""
    modes = 3 if "all" in run["args"] else 1  # (-M all on a host with all three)
    return _freed([{0: [("create", 0, 0), FREE],
                    1: [("create", None, KVM_MEM_LOG_DIRTY_PAGES), FREE]}
                   for _ in range(modes)], kernel)


def _freed(vms: list, kernel: str) -> list:
    """kvm_vm_free() deletes every slot the library knows through the ioctl
    on 6.1 (__vm_mem_region_delete sets memory_size 0); 7.3's
    __vm_mem_region_delete only unmaps and frees (closing the VM fd frees
    its memslots in KVM): drop the ("delete", None, None) marked FREE."""
    if kernel.startswith("6.1"):
        return [v if isinstance(v, tuple) else {s: [o[:3] for o in ops] for s, ops in v.items()}
                for v in vms]
    return [v if isinstance(v, tuple) else
            {s: [o[:3] for o in ops if len(o) < 4] for s, ops in v.items()} for v in vms]


FREE = ("delete", None, None, "kvm_vm_free")

EXPECT = {"set_memory_region_test": _smrt, "memslot_modification_stress_test": _mmst,
          "dirty_log_test": _dlt}


def vm_instances(ops: pd.DataFrame, vm_ioctl: pd.DataFrame, pid: int) -> list:
    """The report's memslot ioctls of ``pid`` per VM instance (see the module
    docstring), in KVM_CREATE_VM order: [{slot: [(op, gpa, flags, errno)]}],
    instances without a memslot ioctl included (as {})."""
    cr = vm_ioctl[(vm_ioctl["pid"] == pid) & (vm_ioctl["cmd"] == KVM_CREATE_VM)
                  & (vm_ioctl["ret"] >= 0)].sort_values("ts", kind="stable")
    cr = pd.DataFrame({"ts": cr["ts"].astype("int64").to_numpy(),
                       "vm_fd": cr["ret"].astype("int64").to_numpy(),
                       "instance": np.arange(len(cr), dtype=np.int64)})
    mine = ops[ops["pid"] == pid].sort_values("ts", kind="stable")
    mine = mine.assign(ts=mine["ts"].astype("int64"), vm_fd=mine["vm_fd"].astype("int64"))
    m = pd.merge_asof(mine, cr, on="ts", by="vm_fd", direction="backward")
    out = [collections.defaultdict(list) for _ in range(len(cr))]
    for r in m.itertuples(index=False):
        if pd.isna(r.instance):
            continue
        out[int(r.instance)][int(r.slot_id)].append(
            (r.op, int(r.gpa), int(r.flags), r.errno))
    return [dict(d) for d in out]


def compare(expected: list, got: list) -> list:
    """Differences (text) between expected and reported VM instances; only
    instances with memslot ioctls are compared, in order."""
    exp = [e for e in expected if e]
    rep = [g for g in got if g]
    bad = []
    if len(exp) != len(rep):
        bad.append(f"{len(rep)} VMs with memslot ioctls in the report, {len(exp)} expected")
    for i, (e, g) in enumerate(zip(exp, rep)):
        if isinstance(e, tuple):  # alternatives (what the host supports): the one of g's size
            e = next((a for a in e if sorted(a) == sorted(g) and all(
                len(a[s]) == len(g[s]) for s in a)), e[0])
        if sorted(e) != sorted(g):
            bad.append(f"VM {i}: {len(g)} slots reported, {len(e)} expected; not reported: "
                       f"{sorted(set(e) - set(g))[:8]}, not expected: {sorted(set(g) - set(e))[:8]}")
            continue
        for s in e:
            if len(e[s]) != len(g[s]):
                bad.append(f"VM {i} slot {s}: {len(g[s])} ioctls reported, {len(e[s])} expected")
                continue
            for k, ((op, gpa, flags), (gop, ggpa, gflags, _)) in enumerate(zip(e[s], g[s])):
                if op != gop or (gpa is not None and gpa != ggpa) or \
                        (flags is not None and flags != gflags):
                    bad.append(f"VM {i} slot {s} ioctl {k}: report {gop} gpa {ggpa:#x} flags "
                               f"{gflags}, expected {op} gpa "
                               f"{'any' if gpa is None else hex(gpa)} flags {flags}")
                    break
    return bad


def memslot_model(path: str):
    """The report's memslot history of the recording at ``path``: its ``ops``
    and ``slots`` made by the functions kvmtrace.load() makes them with
    (memslots.history, as analysis/model.py build() does), without the fault path,
    which the check does not read (the full model of a 32k-slot recording
    takes minutes in the TCG guest); the fault tables are only counted. With
    the recording's tables, completeness and problems."""
    import types

    from kvmtrace.analysis import memslots, pages
    from kvmtrace.recording.reader import read

    rec = read(path, defer=FAULT_TABLES)
    t = rec.tables
    ops, slots, _, _, notes = memslots.history(t, rec.meta, pages.page_size(rec.meta))
    return types.SimpleNamespace(recording=t, ops=ops, slots=slots, meta=rec.meta,
                                 complete=rec.complete, problems=rec.problems, notes=notes)


# the event kinds the check reads (memslot history, VM instances,
# kvm_arch_prepare_memory_region counts, process generations)
CHECKED_KINDS = ("memslot", "vm_ioctl", "prepare_region", "proc_exit")

# kvmtrace's programs on syscalls:sys_enter_ioctl / sys_exit_ioctl
# (kvmtrace/probes/program.py ENTER_IOCTL*, bcc's name for bpf/ioctl.c's
# TRACEPOINT_PROBE)
SYSCALL_PROGRAMS = ("kvmtrace_enter_ioctl", "kvmtrace_enter_ioctl_novma",
                    "tracepoint__syscalls__sys_exit_ioctl")

# the x86 fault path's tables (kvmtrace/analysis/model.py FAULT_EVENT_TABLES
# and the rest of the fault path): not read by the check
FAULT_TABLES = ("spte_requested", "set_spte", "pt_walk", "page_fault", "tdp_spte_changed",
                "fault_handler", "unmap_hva_range", "userspace_exit", "mmio")


def check_all(model, runs: dict, say=print) -> list:
    """Every test exited 0 and its memslot history in ``model`` (memslot_model)
    is what its source says. ``runs``: selftests.json. Returns the failures."""
    failures = []

    def check(ok, what):
        say(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    r = model.recording
    ops = model.ops
    end = r["notes"].query("key == 'end'")
    if not len(end):
        check(False, "the recording has its end note (lost-event counts)")
    else:
        lost = {k: v for k, v in json.loads(end["value"].iloc[0]).get("lost", {}).items() if v}
        mine = {k: v for k, v in lost.items() if k in CHECKED_KINDS}
        # a memslot ioctl whose sys_exit_ioctl run was skipped is counted lost;
        # its change is recovered from kvm_arch_prepare_memory_region
        # (memslots.recover_skipped): the histories below check the result
        recovered = int((ops["ioctl_name"] == RECOVERED).sum())
        if mine.get("memslot"):
            mine["memslot"] -= min(mine["memslot"], recovered)
            mine = {k: v for k, v in mine.items() if v}
        # The fault path's events (not read here) can overflow their rings in
        # a burst: 6.1's dirty_log_test write-protects its 1 GiB slot's 262k
        # SPTEs at once. The recording says so; the line shows them.
        check(not mine, f"no lost events of the kinds checked ({mine}; "
              f"others: { {k: v for k, v in lost.items() if k not in CHECKED_KINDS} })")
    # A program the kernel skipped (run while the CPU's bpf_prog_active was
    # held: kvmtrace/collectors/progstats.py) dropped its event without any
    # ring being full. The KVM kprobes and tracepoints run only for KVM's work:
    # none may be skipped. The ioctl syscall programs run for every ioctl of
    # every process (a shell's TCGETS too), so a skip there need not be a KVM
    # ioctl; a skipped KVM memslot or VM ioctl is what the histories and the
    # prepare_region counts below catch (a skipped sys_exit_ioctl is also
    # counted lost: probes/bpf/ioctl.c). Recordings before the note have none.
    misses = r["notes"].query("key == 'bpf_misses'")
    if len(misses):
        m = json.loads(misses["value"].iloc[-1])
        kvm = {p: n for p, n in m.items() if p not in SYSCALL_PROGRAMS}
        sys_ = {p: n for p, n in m.items() if p in SYSCALL_PROGRAMS}
        check(not kvm, f"no KVM probe program skipped by the kernel ({kvm}; "
              f"ioctl syscall programs: {sys_})")
    for name, run in runs["tests"].items():
        check(run["rc"] == 0, f"{name}: exited {run['rc']}")
        exp = EXPECT[name](run, runs["nr_memslots"], runs["kernel"])
        got = vm_instances(ops, r["vm_ioctl"], run["pid"])
        n_ops = sum(len(v) for g in got for v in g.values())
        bad = compare(exp, got)
        check(not bad, f"{name}: memslot history of {sum(1 for g in got if g)} VMs, {n_ops} "
              f"ioctls, as the test's source says" + ("" if not bad else ": " + "; ".join(bad[:6])))
        mine = ops[(ops["pid"] == run["pid"]) & (ops["ret"] == 0)]
        prep = r["prepare_region"][r["prepare_region"]["pid"] == run["pid"]]
        check(len(prep) == len(mine), f"{name}: kvm_arch_prepare_memory_region fired "
              f"{len(prep)} times for {len(mine)} accepted memslot ioctls")
    return failures
