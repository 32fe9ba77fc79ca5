"""Where loss starts: kvmtrace's ring buffers against perf's default buffers.

Both tools trace the same three kvmmmu tracepoints of a faulting test-VMM
guest (one event each per fault), system-wide, with their default buffer
sizes (kvmtrace: --probes faults, rings sized by codegen.ring_pages, 4 MiB
per kind; perf record -a: perf_event_mlock_kb, 516 KiB per CPU here).
Events of the guest's own pid are counted against its report.

1. Stall: the tool is stopped (SIGSTOP) just before the guest starts and let
   go (SIGCONT) after --stalls seconds, while the guest faults at its full
   rate. What was lost, against how many of the guest's events arrived
   while the tool was stopped: loss starts between the largest backlog kept
   whole and the smallest one that lost events, i.e. at the buffer's real
   capacity, and at the guest's rate that is a stall of so many seconds.
2. Rate: the tool runs normally; the guest faults at rates set with a busy
   loop between pages (--spins; the rate is measured from the guest's
   report). Loss at a rate means the tool cannot keep up with it.

Runs interleave the tools. --pages sets the guest's size (it must fault for
longer than the longest stall). "tool says lost" is each tool's own count,
for every process it traced (both trace the whole host).

    .venv/bin/python bench/loss_onset.py [--pages 131072] [--stalls 0.03,0.1,0.3,1,3]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._common import (FAULT_TPS, KVMTRACE, ROOT, bench_env, footer,  # noqa: E402
                           guest_args, guest_report, have, header, need_root, run, scratch)

KINDS = {"spte_requested": "kvmmmu:kvm_mmu_spte_requested",
         "set_spte": "kvmmmu:kvm_mmu_set_spte"}


class Tool:
    def __init__(self, name, d):
        self.name, self.d = name, d

    def start(self):
        if self.name == "kvmtrace":
            self.out = self.d / "loss.kvt"
            cmd = KVMTRACE + ["record", "-o", str(self.out), "--force", "--probes", "faults"]
        else:
            # started disabled (-D -1) and enabled through its control fifo, which
            # answers once the events are on: perf -a first describes every
            # process on the host, which takes seconds on a busy one
            self.out = self.d / "loss.data"
            ctl, ack = self.d / "perf.ctl", self.d / "perf.ack"
            for f in (ctl, ack):
                if f.exists():
                    f.unlink()
                os.mkfifo(f)
            cmd = ["perf", "record", "-q", "-a", "-e", ",".join(FAULT_TPS), "-o", str(self.out),
                   "-D", "-1", "--control", f"fifo:{ctl},{ack}"]
        if self.out.exists():
            self.out.unlink()
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, env=bench_env(),
                                  stderr=subprocess.PIPE, text=True)
        if self.name == "perf":
            with open(ctl, "w") as c, open(ack) as a:
                c.write("enable\n")
                c.flush()
                if not a.readline().startswith("ack"):
                    raise RuntimeError("perf did not acknowledge enable")
            return self
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # ready: the file exists once probes are attached
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.p.communicate()[1][-400:]}")
            if self.out.exists() and self.out.stat().st_size > 0:
                break
            time.sleep(0.05)
        time.sleep(0.1)
        return self

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        _, err = self.p.communicate(timeout=300)
        if self.p.returncode not in (0, -2, 130):
            raise RuntimeError(f"{self.name} failed ({self.p.returncode}): {err[-400:]}")

    def kept(self, pid: int) -> dict:
        """Events of ``pid`` kept, per kind; and the tool's own lost count."""
        if self.name == "kvmtrace":
            from kvmtrace.recording.reader import read
            rec = read(self.out)
            kept = {k: int((rec[k]["pid"] == pid).sum()) for k in KINDS}
            end = [json.loads(v) for k, v in zip(rec["notes"]["key"], rec["notes"]["value"])
                   if k == "end"]
            lost = sum(end[-1]["lost"].values()) if end else None
            return {"kept": kept, "lost_said": lost}
        # every sample's pid and event, and perf's LOST records (which carry no
        # pid: a --pid filter would hide them)
        p = run(["perf", "script", "-i", self.out, "-F", "pid,event", "--show-lost-events"],
                timeout=600)
        kept = {k: 0 for k in KINDS}
        lost = 0
        for line in p.stdout.splitlines():
            s = line.split()
            if "PERF_RECORD_LOST" in line:  # "PID PERF_RECORD_LOST lost N"
                try:
                    lost += int(line.rsplit("lost", 1)[1].split()[0], 0)
                except (ValueError, IndexError):
                    pass
            elif len(s) >= 2 and s[0] == str(pid):
                for k, tp in KINDS.items():
                    if s[1].startswith(tp):
                        kept[k] += 1
        return {"kept": kept, "lost_said": lost}


def one(tool_name, d, pages, stall=None, spin=0, retry=True):
    """One traced guest run; a run in which the tool kept none of the guest's
    events and reports no loss (seen once with perf on a busy host: its
    recording had not started) is run again, once."""
    r = _one(tool_name, d, pages, stall, spin)
    if retry and r["missing"] == r["events"] and not r["lost_said"]:
        print(f"# {tool_name}: kept nothing of the guest and says nothing was lost; again",
              flush=True)
        r = _one(tool_name, d, pages, stall, spin)
    return r


def _one(tool_name, d, pages, stall=None, spin=0):
    tool = Tool(tool_name, d).start()
    rep = d / "guest.json"
    if rep.exists():
        rep.unlink()
    try:
        if stall:
            os.kill(tool.p.pid, signal.SIGSTOP)
        g = subprocess.Popen(guest_args(pages, spin=spin, report=rep), cwd=ROOT,
                             env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        cont_ns = None
        if stall:
            t_end = time.monotonic() + 30
            while not rep.exists() and time.monotonic() < t_end:  # guest set up: faulting
                # run_start_ns is in the report; SIGCONT comes at run start + stall,
                # estimated from when the guest's vCPU starts: poll its threads
                if _vcpu_running(g.pid):
                    break
                time.sleep(0.002)
            time.sleep(stall)
            cont_ns = time.monotonic_ns()
            os.kill(tool.p.pid, signal.SIGCONT)
        _, gerr = g.communicate(timeout=600)
        if g.returncode != 0:
            raise RuntimeError(f"guest failed: {gerr[-400:]}")
    finally:
        try:
            os.kill(tool.p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        time.sleep(0.3)
        tool.stop()
    gr = guest_report(rep)
    raw = json.loads(rep.read_text())
    start, end = raw["run_start_ns"], raw["run_end_ns"]
    expect = {"spte_requested": gr["faults"], "set_spte": gr["set_spte"]}
    k = tool.kept(gr["pid"])
    missing = sum(max(0, expect[x] - k["kept"][x]) for x in KINDS)
    rate = gr["faults"] / (gr["run_ns"] / 1e9)
    out = {"rate": rate, "missing": missing, "lost_said": k["lost_said"],
           "events": sum(expect.values())}
    if cont_ns is not None:
        stalled = max(0, min(cont_ns, end) - start) / 1e9
        out["stalled_s"] = stalled
        out["backlog"] = int(sum(expect.values()) * min(1.0, stalled * 1e9 / max(1, end - start)))
    return out


def capacity_kvmtrace() -> int:
    from kvmtrace.probes import codegen
    from kvmtrace.probes.events import EVENTS
    ev = EVENTS["set_spte"]
    return codegen.ring_pages(ev) * codegen.PAGE_SIZE // codegen.record_dtype(ev).itemsize


def capacity_perf() -> int:
    try:
        with open("/proc/sys/kernel/perf_event_mlock_kb") as f:
            return int(f.read()) * 1024  # perf record's default -m for root
    except OSError:
        return 0


def _vcpu_running(pid: int) -> bool:
    """Whether the guest's vCPU thread exists yet (the test VMM names it kvmtrace-vcpuN)."""
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                if f.read().startswith("kvmtrace-vcpu"):
                    return True
    except OSError:
        return False
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=131072)
    ap.add_argument("--stalls", default="0.03,0.1,0.3,1.0,3.0")
    ap.add_argument("--spins", default="0,20000")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    need_root()
    t0 = header("loss onset: kvmtrace rings vs perf default buffers", a)
    d = scratch()
    tools = ["kvmtrace"] + (["perf"] if have("perf") else [])
    print("\n1. reader stopped for a while as the guest faults "
          "(events of the 2 kinds counted: spte_requested + set_spte)")
    print(f"  {'tool':9s} {'stop s':>7s} {'stalled s':>9s} {'backlog':>9s} {'missing':>8s} "
          f"{'tool says lost':>14s} {'faults/s':>9s}")
    onset = {t: [None, None] for t in tools}  # largest backlog kept whole, smallest that lost
    for _ in range(a.repeats):
        for stall in [float(x) for x in a.stalls.split(",") if x]:
            for t in tools:
                r = one(t, d, a.pages, stall=stall)
                print(f"  {t:9s} {stall:7.2f} {r['stalled_s']:9.3f} {r['backlog']:9,d} "
                      f"{r['missing']:8,d} {r['lost_said']!s:>14s} {r['rate']:9,.0f}",
                      flush=True)
                o = onset[t]
                if r["missing"] == 0:
                    o[0] = max(o[0] or 0, r["backlog"])
                elif o[1] is None or r["backlog"] < o[1]:
                    o[1] = r["backlog"]
    for t, (kept, lost) in onset.items():
        print(f"  {t}: backlog kept whole up to {kept if kept is not None else 'n/a'}"
              f"{'' if kept is None else ' events'}; first loss at a backlog of "
              f"{lost if lost is not None else '(none seen)'}")
    print(f"  capacity: kvmtrace {capacity_kvmtrace():,} events per kind (its own ring each); "
          f"perf {capacity_perf():,} bytes per CPU for all three (about 100 bytes a sample)")
    print("\n2. reader running, the guest's fault rate varied")
    print(f"  {'tool':9s} {'spin':>7s} {'faults/s':>9s} {'events/s':>9s} {'missing':>8s} "
          f"{'tool says lost':>14s}")
    for _ in range(a.repeats):
        for spin in [int(x) for x in a.spins.split(",") if x]:
            for t in tools:
                r = one(t, d, a.pages, spin=spin)
                print(f"  {t:9s} {spin:7d} {r['rate']:9,.0f} {3 * r['rate']:9,.0f} "
                      f"{r['missing']:8,d} {r['lost_said']!s:>14s}", flush=True)
    footer(t0)


if __name__ == "__main__":
    main()
