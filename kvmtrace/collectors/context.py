"""What a recording carries so it can be interpreted anywhere (perf's habit):
host, kernel, KVM flavour, clock base, and the decode context of memory types
(PAT configuration, PAT memtype list, RAM ranges), taken at record time."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import time

from .. import __version__
from ..host import arm64, kvm, procfs


def clock_base() -> dict:
    """Pairs CLOCK_MONOTONIC (bpf_ktime_get_ns) with wall time."""
    mono = time.monotonic_ns()
    real = time.time_ns()
    return {"monotonic_ns": mono, "realtime_ns": real}


def pat_config() -> dict:
    """x86 PAT entries as Linux programmed them, from the boot log when readable."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    m = re.search(r"x86/PAT: Configuration \[0-7\]:\s+((?:\S+\s*){8})", out)
    if m:
        return {"entries": m[1].split(), "source": "dmesg"}
    from ..memtype import x86 as x86mt  # numpy: imported only when needed (start-up)

    return {"entries": list(x86mt.LINUX_PAT), "source": x86mt.LINUX_PAT_SOURCE}


def host_context() -> dict:
    machine = platform.machine()
    ctx = {
        "kvmtrace_version": __version__,
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "arch": machine,
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "kvm": kvm.flavour(),
        "clock": clock_base(),
    }
    iomem = procfs.read_text("/proc/iomem")
    ctx["ram"] = procfs.parse_iomem_ram(iomem) if iomem else None
    if machine == "x86_64":
        pat = procfs.read_text("/sys/kernel/debug/x86/pat_memtype_list")
        ctx["x86"] = {
            "pat": pat_config(),
            "pat_memtype_list": procfs.parse_pat_memtype_list(pat) if pat else None,
            "pat_memtype_list_source": "debugfs" if pat else
            "unavailable (mount debugfs: mount -t debugfs debugfs /sys/kernel/debug)",
            "ram": ctx["ram"],
        }
        # the host MTRRs combine with the PAT type of every mapping (NPT, shadow, EPT
        # without IPAT): recorded as /proc/mtrr shows them (variable ranges only)
        mtrr = procfs.read_text("/proc/mtrr")
        ctx["x86"]["mtrr"] = procfs.parse_mtrr(mtrr) if mtrr else None
        ctx["x86"]["mtrr_source"] = "/proc/mtrr (variable ranges)" if mtrr else \
            "unavailable (no /proc/mtrr: a host without MTRRs, or CONFIG_MTRR off)"
    elif machine == "aarch64":
        ctx["arm64"] = arm64.cpu_facts()
    return ctx


def vmm_pids() -> list[int]:
    """Processes that hold a KVM VM fd right now (anon_inode:kvm-vm)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{d}/fd/{fd}") == "anon_inode:kvm-vm":
                    pids.append(int(d))
                    break
            except OSError:
                continue
    return pids
