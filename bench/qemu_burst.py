"""A real QEMU's start-up burst: rates per event kind, and loss with the ring
sizes before and after they were chosen from the expected rates.

QEMU (Debian's qemu-system-x86_64, -enable-kvm) starts a 512 MiB guest for
--seconds; on KVM-PVM the guest itself never runs, but QEMU's memslots,
ioctls, MMIO/PIO exits and invalidations are real. kvmtrace records it
(--probes all), and the recorder is stopped (SIGSTOP) for --stall seconds in
every --every seconds from QEMU's start (its MMIO burst comes 1 to 6 s in,
depending on load), as a busy collector would be: measured while recording
QEMU on a loaded host, gaps between two reads of the rings of up to 0.5 s,
smaps snapshots of QEMU of 65 to 85 ms each. Side by side, interleaved:

- rings as now (codegen.ring_pages: from each kind's expected rate);
- rings as before (16 pages for memslot and VM ioctls, 256 for kvm_mmio and
  userspace exits, 64 for invalidations, 1024 for the fault path).

Printed: per kind, events recorded and lost (median over --repeats), and the
peak rate of each kind in 1 ms, 10 ms and 250 ms windows (from the
recordings with no loss), which is what Event.rate is declared from.

    .venv/bin/python bench/qemu_burst.py [--seconds 8] [--stall 0.5] [--every 1] [--repeats 3]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from bench._common import (PY, ROOT, bench_env, footer, have, header, median,  # noqa: E402
                           need_root, scratch)

QEMU = ["qemu-system-x86_64", "-enable-kvm", "-m", "512", "-nographic", "-display", "none",
        "-no-reboot", "-serial", "none", "-monitor", "none"]
BEFORE = {"memslot": 16, "vm_ioctl": 16, "proc_exit": 16, "mmio": 256, "userspace_exit": 256,
          "unmap_hva_range": 64, "fast_page_fault": 256, "mmio_page_fault": 256}
KINDS = ("memslot", "vm_ioctl", "mmio", "userspace_exit", "unmap_hva_range")

RUNNER = """
import json, sys
from kvmtrace.collectors.session import Options, Session
out, seconds, pages = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
st = Session(Options(output=out, duration=seconds, command=tuple(sys.argv[4:]),
                     buffer_pages=pages or None)).run()
"""


def one(d, seconds, stall, every, pages):
    out = d / "qemu.kvt"
    if out.exists():
        out.unlink()
    p = subprocess.Popen([PY, "-c", RUNNER, str(out), str(seconds), json.dumps(pages)] + QEMU,
                         cwd=ROOT, env=bench_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if stall:
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and p.poll() is None:  # wait for QEMU's launch
            if _child_named(p.pid, "qemu-system"):
                break
            time.sleep(0.002)
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end and p.poll() is None:  # stalls until QEMU is stopped
            os.kill(p.pid, signal.SIGSTOP)
            time.sleep(stall)
            os.kill(p.pid, signal.SIGCONT)
            time.sleep(max(0.0, every - stall))
    _, err = p.communicate(timeout=seconds + 300)
    if p.returncode != 0:
        raise RuntimeError(f"record failed ({p.returncode}): {err[-500:]}")
    from kvmtrace.recording.reader import read
    rec = read(out)
    end = [json.loads(v) for k, v in zip(rec["notes"]["key"], rec["notes"]["value"])
           if k == "end"][-1]
    ts = {k: np.sort(rec[k]["ts"].to_numpy().astype(np.int64)) for k in KINDS}
    return end["events"], end["lost"], ts, rec.meta.get("ring_pages", {})


def _child_named(pid, prefix):
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        return any(open(f"/proc/{k}/comm").read().startswith(prefix[:15]) for k in kids)
    except OSError:
        return False


def peak(ts, window_s):
    if len(ts) == 0:
        return 0
    w = int(window_s * 1e9)
    return int((np.searchsorted(ts, ts + w) - np.arange(len(ts))).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--stall", type=float, default=0.5)
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    need_root()
    if not have(QEMU[0]):
        sys.exit(f"{QEMU[0]} is not installed (Debian: apt-get install qemu-system-x86)")
    t0 = header("QEMU start-up burst: events and loss per kind, ring sizes now vs before", a)
    d = scratch()
    res = {"now": [], "before": []}
    peaks = {k: {w: [] for w in (0.001, 0.01, 0.25)} for k in KINDS}
    sizes = {}
    for i in range(a.repeats):
        for label, pages in (("now", {}), ("before", BEFORE)):
            ev, lost, ts, ring = one(d, a.seconds, a.stall, a.every, pages)
            res[label].append((ev, lost))
            sizes[label] = ring
            if not any(lost.values()):
                for k in KINDS:
                    for w in peaks[k]:
                        peaks[k][w].append(peak(ts[k], w))
        print(f"# repeat {i + 1}/{a.repeats} done", flush=True)
    print(f"\nrecorder stopped {a.stall} s in every {a.every} s from QEMU's start; "
          f"events / lost per kind "
          f"(median of {a.repeats}); ring pages now | before")
    for k in KINDS:
        row = []
        for label in ("now", "before"):
            e = median([r[0].get(k, 0) for r in res[label]])
            n = median([r[1].get(k, 0) for r in res[label]])
            row.append(f"{e:8,.0f} / {n:6,.0f}")
        print(f"  {k:16s} now {row[0]}   before {row[1]}   "
              f"pages {sizes['now'].get(k, '-')} | {sizes['before'].get(k, '-')}")
    tot = {label: (median([sum(r[0].values()) for r in res[label]]),
                   median([sum(r[1].values()) for r in res[label]])) for label in res}
    for label, (e, n) in tot.items():
        print(f"  all kinds, {label:6s}: {e:,.0f} events, {n:,.0f} lost")
    print("\npeak events per window (max over the runs without loss) and as a rate")
    for k in KINDS:
        cells = []
        for w, v in peaks[k].items():
            m = max(v) if v else 0
            cells.append(f"{w * 1e3:5.0f} ms: {m:6,d} ({m / w:10,.0f}/s)")
        print(f"  {k:16s} " + "  ".join(cells))
    footer(t0)


if __name__ == "__main__":
    main()
