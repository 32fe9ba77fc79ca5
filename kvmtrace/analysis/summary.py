"""Per-slot summary: the memslot table joined with its activity and verdict.

This is the table ``kvmtrace report`` leads with and ``--format csv`` prints;
every column is a column operation over the model's tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .model import Model
from .vmas import vmflag_words


def _rel(model: Model, ts) -> pd.Series:
    base = (model.meta.get("clock") or {}).get("monotonic_ns", 0)
    return (pd.to_numeric(ts, errors="coerce") - base) / 1e9


def _per_slot(df: pd.DataFrame, col: str, name: str) -> pd.Series:
    d = df[df["slot_row"] >= 0]
    return d.groupby("slot_row")[col].size().rename(name) if len(d) else pd.Series(name=name,
                                                                                     dtype="int64")


def slot_summary(model: Model, pid: int | None = None, slot: int | None = None) -> pd.DataFrame:
    s = model.slots.copy()
    s["slot_row"] = np.arange(len(s))
    f = model.faults[model.faults["slot_row"] >= 0]
    if len(f):
        acc = pd.crosstab(f["slot_row"], f["access"])
        lvl = pd.crosstab(f["slot_row"], f["size"])
        svc = f.groupby("slot_row")["service_ns"].median().rename("service_p50_us") / 1e3
        mts = f[f["spte_memtype"] != ""].groupby("slot_row")["spte_memtype"] \
            .agg(lambda x: "/".join(sorted(set(x)))).rename("spte_memtype")
        extra = pd.concat([f.groupby("slot_row").size().rename("faults"), acc, lvl, svc, mts],
                          axis=1)
    else:
        extra = pd.DataFrame(index=pd.Index([], name="slot_row"))
    pf = model.prefetch
    lost_req = pf["request_lost"] if "request_lost" in pf else pd.Series(False, index=pf.index)
    extra = pd.concat([extra,
                       _per_slot(pf[~lost_req], "gfn", "prefetched"),
                       _per_slot(pf[lost_req], "gfn", "unpaired_installs"),
                       _per_slot(model.invalidations, "start", "invalidations"),
                       _per_slot(model.exits, "gpa", "mmio_exits")], axis=1)
    s = s.merge(extra, left_on="slot_row", right_index=True, how="left")
    for c in ("faults", "read", "write", "exec", "4K", "2M", "1G", "prefetched",
              "unpaired_installs", "invalidations", "mmio_exits"):
        s[c] = s[c].fillna(0).astype("int64") if c in s else 0
    if "spte_memtype" not in s:
        s["spte_memtype"] = ""
    if "service_p50_us" not in s:
        s["service_p50_us"] = np.nan
    s["spte_memtype"] = s["spte_memtype"].fillna("")
    v = model.verdicts[model.verdicts["version"] >= 0]
    key = ["pid", "proc", "vm_fd", "as_id", "slot", "version"]
    s = s.merge(v[key + ["lost", "verdict", "vma_memtype", "reason"]], on=key, how="left")
    s["lost"] = s["lost"].fillna(0).astype("int64")
    s["gpa_end"] = s["gpa"] + s["size"]
    # the VMA's type even without faults: known for ordinary memory, else from faults
    s["slot_vma_memtype"] = np.where(
        s["vma_count"] == 0, "unknown",
        np.where(~s["pfnmap"].astype(bool), "WB",
                 s["vma_memtype"].fillna("").replace("", "unknown")))
    # decoded from vm_page_prot where the VMA was captured at the ioctl (vmas.py)
    s["slot_vma_memtype"] = s["pgprot_memtype"].where(s["pgprot_memtype"].notna(),
                                                      s["slot_vma_memtype"])
    s["vm_flags"] = s["vmflags"].map(vmflag_words)
    s["t_start_s"] = _rel(model, s["t_start"])
    s["t_end_s"] = _rel(model, s["t_end"].where(s["t_end"] < np.iinfo(np.uint64).max))
    if pid is not None:
        s = s[s["pid"] == pid]
    if slot is not None:
        s = s[s["slot"] == slot]
    cols = ["pid", "proc", "vm_fd", "as_id", "slot", "version", "gpa", "gpa_end", "size",
            "flag_names", "hva", "ioctl_name", "vma", "vm_flags", "vmflags", "created_by",
            "t_start_s", "ended_by", "t_end_s", "faults", "read", "write", "exec", "4K", "2M",
            "1G", "prefetched", "unpaired_installs", "invalidations", "mmio_exits",
            "service_p50_us", "lost", "vma_memtype", "spte_memtype", "slot_vma_memtype",
            "verdict", "reason", "vma_source"]
    return s[cols].sort_values(["pid", "proc", "vm_fd", "as_id", "slot", "version"]) \
        .reset_index(drop=True)


def ops_table(model: Model, pid: int | None = None, slot: int | None = None) -> pd.DataFrame:
    o = model.ops.copy()
    o["t_s"] = _rel(model, o["ts"])
    if pid is not None:
        o = o[o["pid"] == pid]
    if slot is not None:
        o = o[o["slot_id"] == slot]
    return o[["t_s", "pid", "proc", "vm_fd", "ioctl_name", "as_id", "slot_id", "op", "flag_names",
              "gpa", "size", "hva", "ret", "errno", "reason", "latency_ns"]].reset_index(drop=True)


def filter_rows(df: pd.DataFrame, pid=None, slot=None) -> pd.DataFrame:
    if pid is not None and "pid" in df:
        df = df[df["pid"] == pid]
    if slot is not None and "slot" in df:
        df = df[df["slot"] == slot]
    return df.reset_index(drop=True)
