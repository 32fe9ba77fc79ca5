"""The host VMA behind each memslot, from the recorded smaps snapshots, and
the memory type it gives on x86.

smaps shows VmFlags but not vm_page_prot, so on x86 the VMA's memory type is
derived: a VMA that is neither VM_PFNMAP ('pf') nor VM_MIXEDMAP ('mm') maps
struct pages with the default protection, which is write-back (PAT entry 0)
for anonymous, file, shmem/memfd and hugetlb memory. For 'pf' / 'mm' VMAs the
driver chose the protection; kvmtrace then looks up the physical frames KVM
mapped in the PAT memtype list and System RAM ranges recorded at start
(kvmtrace.memtype.x86.pfn_memtype).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

VMFLAG_NAMES = {"pf": "VM_PFNMAP", "io": "VM_IO", "mm": "VM_MIXEDMAP", "ht": "hugetlb",
                "hg": "THP advised", "nh": "no THP", "dd": "no dump", "sh": "shared"}


def describe_path(path: str, vmflags: str) -> str:
    if not path:
        return "[anon]"
    if path.startswith("/memfd:"):
        return "memfd:" + path[len("/memfd:"):].replace(" (deleted)", "")
    return path


def is_pfn_mapped(vmflags: str) -> bool:
    flags = vmflags.split()
    return "pf" in flags or "mm" in flags


def slot_vmas(slots: pd.DataFrame, vmas: pd.DataFrame) -> pd.DataFrame:
    """One row per slot version: the VMA(s) its hva range covers in the first
    snapshot taken after the slot was set (else the last before)."""
    rows = []
    by_pid = {pid: g for pid, g in vmas.groupby("pid")} if len(vmas) else {}
    for i, s in slots.iterrows():
        g = by_pid.get(s.pid)
        hit = None
        if g is not None:
            lo, hi = s.hva, s.hva + s["size"]
            ov = g[(g["start"] < hi) & (g["end"] > lo)]
            if len(ov):
                after = ov[ov["ts"] >= s.t_start]
                snap_ts = after["ts"].min() if len(after) else ov["ts"].max()
                hit = ov[ov["ts"] == snap_ts].sort_values("start")
        if hit is None or not len(hit):
            rows.append({"slot_row": i, "vma": "not observed", "vmflags": "", "pfnmap": False,
                         "vma_count": 0, "kernelpagesize_kb": np.nan, "anonhuge_kb": 0,
                         "snapshot_delay_ms": np.nan, "vma_covers": False})
            continue
        first = hit.iloc[0]
        covers = hit["start"].min() <= s.hva and hit["end"].max() >= s.hva + s["size"]
        flags = " ".join(dict.fromkeys(" ".join(hit["vmflags"]).split()))
        rows.append({
            "slot_row": i,
            "vma": describe_path(first.path, first.vmflags) + ("" if len(hit) == 1 else f" (+{len(hit) - 1} more)"),
            "vmflags": flags,
            "pfnmap": bool(hit["vmflags"].map(is_pfn_mapped).any()),
            "vma_count": len(hit),
            "kernelpagesize_kb": float(first.kernelpagesize_kb),
            "anonhuge_kb": int(hit["anonhugepages_kb"].sum()),
            "snapshot_delay_ms": (int(first.ts) - int(s.t_start)) / 1e6,
            "vma_covers": bool(covers),
        })
    return pd.DataFrame(rows, columns=["slot_row", "vma", "vmflags", "pfnmap", "vma_count",
                                       "kernelpagesize_kb", "anonhuge_kb", "snapshot_delay_ms",
                                       "vma_covers"])


def vmflag_words(vmflags: str) -> str:
    """The smaps VmFlags that matter for memory types, spelled out."""
    words = [VMFLAG_NAMES[f] for f in vmflags.split() if f in ("pf", "io", "mm", "ht")]
    return "|".join(words) or "-"
