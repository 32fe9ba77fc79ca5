"""Shared by the bench/ scripts: run tools side by side, summarise repeats.

Every figure is measured in one run with the variants interleaved (A B C A B
C ...), so a change in host load touches them all alike; each summary gives
the median and the spread (min to max) of the repeats, and the load average
(/proc/loadavg) before and after, since other work on the host moves every
number here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
KVMTRACE = [PY, "-m", "kvmtrace.cli"]
GUEST = [PY, str(ROOT / "bench" / "_guest.py")]  # the test VMM, with an optional spin
# The three tracepoints a shadow-paging fault fires once each (host-facts).
FAULT_TPS = ["kvmmmu:kvm_mmu_pagetable_walk", "kvmmmu:kvm_mmu_spte_requested",
             "kvmmmu:kvm_mmu_set_spte"]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def summary(values, scale=1.0, fmt="{:.2f}") -> str:
    """'median (min .. max, n=N)' of values * scale."""
    v = [x * scale for x in values if x is not None]
    if not v:
        return "n/a"
    return (f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))} .. "
            f"{fmt.format(max(v))}, n={len(v)})")


def median(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def header(title: str, args) -> float:
    print(f"# {title}")
    print(f"# host: {os.uname().nodename} {os.uname().release}, {os.cpu_count()} CPUs, "
          f"load average {loadavg()}")
    print(f"# options: {vars(args)}")
    sys.stdout.flush()
    return time.monotonic()


def footer(t0: float):
    print(f"# took {time.monotonic() - t0:.0f} s; load average now {loadavg()}")


def need_root():
    if os.geteuid() != 0:
        sys.exit("bench: needs root (BPF, perf, /dev/kvm)")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def scratch() -> Path:
    d = Path(os.environ.get("KVMTRACE_BENCH_DIR") or tempfile.mkdtemp(prefix="kvmtrace-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def guest_args(pages: int, spin: int = 0, report: Path | None = None) -> list[str]:
    a = GUEST + ([f"--spin={spin}"] if spin else []) + ["--slot", f"anon:{pages}:w", "-q"]
    return a + (["--report", str(report)] if report else [])


def guest_report(path: Path) -> dict:
    d = json.loads(Path(path).read_text())
    return {"run_ns": d["run_ns"], "faults": d["expected_faults_total"],
            "set_spte": d["expected_set_spte_total"], "pid": d["pid"], "ok": d["ok"]}


def bench_env(extra: dict | None = None) -> dict:
    """The environment tools run in: as installed, Python's bytecode cache on
    (an environment with PYTHONDONTWRITEBYTECODE=1 recompiles every kvmtrace
    module at each start, about 0.15 s here, which no installed copy does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(extra or {})
    return env


def run(cmd, timeout=600, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=bench_env(env), **kw)


def check(p: subprocess.CompletedProcess, what: str):
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}): {p.stderr.strip()[-600:]}")


def bpftrace_count_script(tps=FAULT_TPS) -> str:
    return ",".join(f"tracepoint:{t}" for t in tps) + " { @[probe] = count(); }"


def perf_stats(path: Path) -> dict:
    """SAMPLE events per tracepoint and LOST records of a perf.data file."""
    p = run(["perf", "report", "-i", path, "--stats"])
    out = {"lost_records": 0, "samples": {}}
    cur = None
    for line in p.stdout.splitlines():
        s = line.strip()
        if s.endswith(" stats:"):
            cur = None if s.startswith("Aggregated") else s[:-len(" stats:")]
        elif s.startswith("SAMPLE events:") and cur:
            out["samples"][cur] = int(s.split(":")[1].split()[0])
        elif s.startswith("LOST events:") and cur is None:
            out["lost_records"] = int(s.split(":")[1].split()[0])
        elif s.startswith("LOST_SAMPLES events:") and cur is None:
            out["lost_sample_records"] = int(s.split(":")[1].split()[0])
    return out


def perf_lost_samples(path: Path) -> int:
    """Samples perf says it lost (the sum over its LOST records)."""
    p = run(["perf", "report", "-i", path, "-D"], timeout=600)
    n = 0
    for line in p.stdout.splitlines():
        if "PERF_RECORD_LOST" in line and "lost" in line:
            # ... PERF_RECORD_LOST lost 1234 / PERF_RECORD_LOST_SAMPLES lost 12
            try:
                n += int(line.rsplit("lost", 1)[1].split()[0], 0)
            except (ValueError, IndexError):
                pass
    return n


class Stopper:
    """SIGSTOP a process for a while (a tracer that does not read), from a thread."""

    def __init__(self, pid: int, after: float, hold: float):
        import threading
        self.pid, self.after, self.hold = pid, after, hold
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        time.sleep(self.after)
        try:
            os.kill(self.pid, signal.SIGSTOP)
            time.sleep(self.hold)
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def start(self):
        self.t.start()
        return self

    def join(self):
        self.t.join()
