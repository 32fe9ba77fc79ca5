#!/usr/bin/env python3
"""x86 end to end inside the emulated AMD KVM host (testbed/x86/run).

Records the test VMM (testvmm, from the checkout in /src) with every x86 probe
kvmtrace has, then checks, per guest run (one testvmm process each):

- the guest ran and its own report says how many faults to expect (the
  measured TDP rule, testvmm/faults.py tdp_expected_faults);
- the report's faults per slot and in all equal the guest's own expected
  counts, every fault lies in a slot, and each has a kvm_mmu_page_fault
  entry/return (kprobes: service time);
- bpftrace, started before and independently of kvmtrace, counted as many
  kvmmmu:kvm_mmu_spte_requested (faults) and kvm:kvm_page_fault for the
  guest's vCPU threads as the recording holds;
- kvm_arch_prepare_memory_region (kprobe) fired once per memslot change KVM
  accepted, with the slot the guest set; the VMA of every slot was captured
  at the memslot ioctl (bpf_find_vma); no events were lost.

    python3 /kt/e2e.py [--out DIR] [--scenario NAME]... [--keep]

Writes DIR/e2e.kvt, DIR/<run>.guest.json, DIR/bpftrace.txt. Exit status 0
when every check passed. Used by testbed/x86/e2e.
"""

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

# name -> testvmm arguments. Scenarios are the built-in ones whose fault
# count the TDP rule knows (dirty-off / dirty-on read a THP frame first or
# log it dirty: not measured), plus targeted slots for the host page states.
RUNS = {
    "demo": ["--scenario", "demo"],
    "minimal": ["--scenario", "minimal"],
    "smp": ["--scenario", "smp"],
    "huge-base": ["--scenario", "huge-base"],
    "huge-4k": ["--scenario", "huge-4k"],
    "ram": ["--scenario", "ram"],
    "pfnmap": ["--scenario", "pfnmap"],
    "pages-2x": ["--scenario", "pages-2x"],
    "shared-rw": ["--slot", "anon-shared:8:r+w", "--slot", "file:8:r+w",
                  "--slot", "memfd:8:r+w:dirty", "--slot", "anon:8:r+w:dirty"],
    # RAM and the ivshmem BAR through resource2 (UC-) and resource2_wc (WC)
    "x86-bar": ["--scenario", "x86-bar"],
}

# x86-bar, per slot backing: the host VMA's type and the verdict on NPT (KVM
# sets no memory type: RAM consistent, the BAR unknown: the guest's PAT and
# the host MTRRs decide; tests/test_report_x86_tdp.py checks the same offline).
BAR_VERDICTS = {"anon": ("WB", "consistent"), "bar-uc": ("UC-", "unknown"),
                "bar-wc": ("WC", "unknown")}

BPFTRACE = r"""
BEGIN { printf("ready\n"); }
tracepoint:kvmmmu:kvm_mmu_spte_requested /strncmp(comm, "kvmtrace-vcpu", 13) == 0/ {
    @req[pid, args->level] = count();
}
tracepoint:kvm:kvm_page_fault /strncmp(comm, "kvmtrace-vcpu", 13) == 0/ {
    @pf[pid] = count();
}
"""

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


def start_bpftrace(path):
    out = open(path, "w")
    p = subprocess.Popen(["bpftrace", "-e", BPFTRACE], stdout=out, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        with open(path) as f:
            if "ready" in f.read():
                return p, time.monotonic() - t0
        if p.poll() is not None:
            break
        time.sleep(0.2)
    p.kill()
    raise SystemExit("bpftrace did not start: " + open(path).read())


def parse_bpftrace(path):
    req, pf = collections.defaultdict(collections.Counter), collections.Counter()
    for line in open(path):
        m = re.match(r"@req\[(\d+), (\d+)\]: (\d+)", line)
        if m:
            req[int(m[1])][int(m[2])] += int(m[3])
        m = re.match(r"@pf\[(\d+)\]: (\d+)", line)
        if m:
            pf[int(m[1])] += int(m[2])
    return req, pf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/e2e")
    ap.add_argument("--run", action="append", choices=sorted(RUNS),
                    help="guest runs to record (default: all)")
    args = ap.parse_args()
    runs = args.run or list(RUNS)
    os.makedirs(args.out, exist_ok=True)
    kvt = os.path.join(args.out, "e2e.kvt")
    mmu = open("/sys/module/kvm_amd/parameters/npt").read().strip()
    print(f"kernel {os.uname().release}, kvm_amd npt={mmu}, runs: {' '.join(runs)}", flush=True)

    bt_path = os.path.join(args.out, "bpftrace.txt")
    bt, bt_s = start_bpftrace(bt_path)
    print(f"bpftrace witness attached in {bt_s:.1f} s", flush=True)
    script = "set -e\n" + "".join(
        f"python3 -m testvmm {' '.join(RUNS[r])} -q --report {args.out}/{r}.guest.json\n"
        for r in runs)
    t0 = time.monotonic()
    rec = subprocess.run([sys.executable, "-m", "kvmtrace.cli", "record", "-o", kvt, "--force",
                          "--", "sh", "-c", script], text=True, stderr=subprocess.PIPE)
    sys.stderr.write(rec.stderr)
    print(f"record: exit {rec.returncode} in {time.monotonic() - t0:.1f} s", flush=True)
    time.sleep(1)
    bt.send_signal(signal.SIGINT)
    bt.wait(timeout=60)
    check(rec.returncode == 0, "kvmtrace record and every guest run exited 0")
    if rec.returncode:
        return 1
    req, pf = parse_bpftrace(bt_path)

    import kvmtrace
    t0 = time.monotonic()
    model = kvmtrace.load(kvt)
    print(f"kvmtrace.load: {time.monotonic() - t0:.1f} s", flush=True)
    r = model.recording
    check(model.recording.complete and not model.recording.problems, "recording complete")
    end = json.loads(r["notes"].query("key == 'end'")["value"].iloc[0])
    check(sum(end["lost"].values()) == 0, f"no lost events ({end['lost']})")
    attached = model.meta["probes"]["attached"]
    for probe in ("memslot-ioctls", "kvm:kvm_page_fault", "kvmmmu:kvm_mmu_spte_requested",
                  "kvmmmu:kvm_tdp_mmu_spte_changed", "kvmmmu:kvm_mmu_set_spte",
                  "kvm_arch_prepare_memory_region", "kvm_mmu_page_fault"):
        check(probe in attached, f"probe {probe} attached")
    faults, slots = model.faults, model.slots
    total = 0
    for name in runs:
        g = json.load(open(os.path.join(args.out, f"{name}.guest.json")))
        pid = g["pid"]
        mine = faults[faults["pid"] == pid]
        check(g["ok"], f"{name}: guest ok {g['errors'] or ''}")
        unmeasured = [s["slot"] for s in g["slots"]
                      if s["status"] == "ok" and s["expected_faults"] is None]
        check(not unmeasured, f"{name}: guest knows the expected faults of every slot "
              f"(mmu {g['mmu']}; not measured: {unmeasured})")
        # per slot, as in tests/test_report_fixture.check_against_guest
        per_row = mine[mine["slot_row"] >= 0].groupby("slot_row").size()
        bad = []
        for s in g["slots"]:
            if s["status"] != "ok":
                continue
            idx = slots.index[(slots["pid"] == pid) & (slots["slot"] == s["slot"])
                              & (slots["version"] == 0)]
            got = int(per_row.get(idx[0], 0)) if len(idx) else None
            if got != s["expected_faults"]:
                bad.append(f"slot {s['slot']} {s['backing']}: report {got}, "
                           f"guest {s['expected_faults']}")
        exp = g["expected_faults_total"]
        check(not bad, f"{name}: report's faults per slot equal the guest's "
              f"({len(mine)} in all, guest {exp}) {'; '.join(bad)}")
        check(len(mine) == exp and (mine["slot_row"] >= 0).all(),
              f"{name}: {len(mine)} faults, all in slots, guest expects {exp}")
        levels = {int(k): int(v) for k, v in mine["level"].value_counts().items()}
        check(levels == {int(k): v for k, v in g["expected_levels_total"].items()},
              f"{name}: levels {levels} == guest's {g['expected_levels_total']}")
        bt_req = sum(req[pid].values())
        bt_levels = dict(req[pid])
        check(bt_req == len(mine) and bt_levels == levels,
              f"{name}: bpftrace witness: {bt_req} spte_requested {bt_levels}, "
              f"report {len(mine)}")
        n_pf = int((r["page_fault"]["pid"] == pid).sum())
        check(pf[pid] == n_pf, f"{name}: bpftrace {pf[pid]} kvm_page_fault, recording {n_pf}")
        handled = mine["start_kind"] == "kvm_mmu_page_fault entry/return"
        svc = mine["service_ns"]
        check(bool(handled.all()) and bool((svc > 0).all()),
              f"{name}: every fault bounded by the kvm_mmu_page_fault kprobes "
              f"(p50 service {svc.median() / 1000:.1f} us)")
        # kvm_arch_prepare_memory_region: one per change KVM accepted
        ok_ioctls = [m for m in g["memslot_ioctls"] if not m["errno"]]
        prep = r["prepare_region"][r["prepare_region"]["pid"] == pid]
        check(len(prep) == len(ok_ioctls) and (prep["ret"] == 0).all(),
              f"{name}: kvm_arch_prepare_memory_region {len(prep)} calls, "
              f"{len(ok_ioctls)} accepted memslot ioctls")
        created = prep[prep["change"] == 0]
        want = sorted((m["slot"], m["gpa"] >> 12, m["size"] >> 12, m["hva"]) for m in ok_ioctls
                      if m["phase"] != "change")
        got = sorted(zip(created["slot_id"].astype(int), created["base_gfn"].astype(int),
                         created["npages"].astype(int), created["hva"].astype(int)))
        check(got == want, f"{name}: prepare_region's new slots equal the guest's")
        if name == "x86-bar":
            from kvmtrace.memtype import x86 as x86mt
            v = model.verdicts[model.verdicts["pid"] == pid].set_index("slot")
            got_v = {s["slot"]: (str(v.loc[s["slot"], "vma_memtype"]),
                                 str(v.loc[s["slot"], "verdict"])) for s in g["slots"]
                     if s["slot"] in v.index}
            want_v = {s["slot"]: BAR_VERDICTS[s["backing"]] for s in g["slots"]}
            # the rule, whatever the host MTRRs give each frame (after MTRR_SEP)
            rules = {r.split(x86mt.MTRR_SEP)[0] for r in mine["rule"].astype(str)}
            check(got_v == want_v and rules == {x86mt.NPT_RULE}
                  and set(mine["spte_memtype"].astype(str)) == {"WB"},
                  f"{name}: (VMA type, verdict) per slot {got_v}, expected {want_v}; "
                  f"every NPT entry PAT:PCD:PWT 0 under the NPT rule ({len(rules)} rule(s))")
        ms = r["memslot"][r["memslot"]["pid"] == pid]
        check((ms[ms["size"] > 0]["vma_status"] == 1).all(),
              f"{name}: VMA found in BPF at every memslot ioctl")
        total += len(mine)
    print(f"faults checked: {total}; failures: {len(failures)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
