"""Which KVM this host runs, and so which spte format its mappings use.

The spte format decides how a memory type is read out of an spte
(kvmtrace.memtype.x86): EPT sptes keep it in bits 5:3, legacy (shadow / NPT)
sptes in PAT/PCD/PWT. Read from /sys/module, which every KVM build has.
"""

from __future__ import annotations

import os
import platform


def _param(module: str, name: str) -> str | None:
    try:
        with open(f"/sys/module/{module}/parameters/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def _yes(v: str | None) -> bool:
    return v is not None and v[:1] in ("Y", "y", "1")


def flavour() -> dict:
    """{'vendor': 'intel'|'amd'|'pvm'|'arm64'|None, 'mmu': 'ept'|'npt'|'shadow'|'stage2',
    'spte_format': 'ept'|'legacy'|'arm64', 'tdp_mmu': bool|None, 'dev_kvm': bool}"""
    machine = platform.machine()
    out = {"dev_kvm": os.path.exists("/dev/kvm"), "tdp_mmu": None}
    if machine == "aarch64":
        out.update(vendor="arm64", mmu="stage2", spte_format="arm64")
        return out
    out["tdp_mmu"] = _yes(_param("kvm", "tdp_mmu")) if _param("kvm", "tdp_mmu") else None
    if os.path.isdir("/sys/module/kvm_intel"):
        ept = _yes(_param("kvm_intel", "ept"))
        out.update(vendor="intel", mmu="ept" if ept else "shadow",
                   spte_format="ept" if ept else "legacy")
    elif os.path.isdir("/sys/module/kvm_amd"):
        npt = _yes(_param("kvm_amd", "npt"))
        out.update(vendor="amd", mmu="npt" if npt else "shadow", spte_format="legacy")
    elif os.path.isdir("/sys/module/kvm_pvm"):
        out.update(vendor="pvm", mmu="shadow", spte_format="legacy")
    else:
        out.update(vendor=None, mmu=None, spte_format="legacy")
    return out
