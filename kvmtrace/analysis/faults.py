"""Faults: tracepoint events paired into one row per fault, attributed to a slot.

x86 tracepoint-only pairing (shadow paging, TDP MMU):
- the fault's *request* is kvmmmu:kvm_mmu_spte_requested (one per fault that
  reached the map stage: gfn, pfn, level);
- its *start* is the last kvm:kvm_page_fault (TDP hosts) or
  kvmmmu:kvm_mmu_pagetable_walk (shadow) on the same thread since the previous
  request: it carries the error code (access kind);
- its *install* is the first kvm_mmu_set_spte (legacy MMU) or
  kvm_tdp_mmu_spte_changed (TDP MMU) on the same thread at or after the
  request, for the same gfn (aligned to the level), before the next request.
  Other set_spte rows are prefetches (KVM filling neighbours ahead of time).
Service time = install - start: from the first to the last tracepoint of
the fault on the vCPU thread; the exit into KVM and the re-entry are outside it.
Where kprobes recorded the fault handler's entry and return (kvm_mmu_page_fault
on x86), those bound the fault instead and service time is return - entry.
All joins are merge_asof / vectorised masks, never a loop over faults.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..memtype import x86 as x86mt
from . import schema

# Page-fault error code bits (arch/x86/include/asm/kvm_host.h PFERR_*).
PFERR_WRITE, PFERR_FETCH = 1 << 1, 1 << 4
# Intel EPT violation exit qualification (older kernels trace it raw).
EPT_QUAL_WRITE, EPT_QUAL_FETCH = 1 << 1, 1 << 2
# columns pairing leaves behind that are not part of the faults table
WORKING_COLUMNS = ("prev_req_ts", "next_req_ts", "install_row")


def nullable(df: pd.DataFrame) -> pd.DataFrame:
    """Integer columns as nullable integers (Int64 / UInt64), so a join that
    finds no match leaves null instead of turning the column into float64
    (an spte with bit 63 set, or a timestamp past 2**53 ns, is not a float)."""
    conv = {c: ("UInt64" if df[c].dtype.kind == "u" else "Int64")
            for c in df.columns if df[c].dtype.kind in "iu"}
    return df.astype(conv)


def _asof(left, right, on_left, on_right, direction, suffix_cols):
    """merge_asof by tid, bringing right's columns renamed (``suffix_cols``)
    as nullable integers; the join key itself is a private int64 copy."""
    r = nullable(right.rename(columns=suffix_cols)).assign(
        _key=right[[k for k, v in suffix_cols.items() if v == on_right][0]].astype("int64"))
    r = r.astype({"tid": left["tid"].dtype})
    m = pd.merge_asof(left.sort_values(on_left), r.sort_values("_key"),
                      left_on=on_left, right_on="_key", by="tid",
                      direction=direction, allow_exact_matches=True)
    return m.drop(columns="_key")


def pair(tables: dict, spte_format: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(faults, prefetches): one row per fault with start / install joined."""
    req = tables["spte_requested"]  # its needed columns only are copied
    cols = ["ts", "pid", "tid", "vcpu_fd", "cpu", "gfn", "pfn", "level"]
    if not len(req):
        return schema.FAULTS.empty(), tables["set_spte"].copy()
    req = req[cols].astype({"ts": "int64", "tid": "int64"}).sort_values("ts") \
        .reset_index(drop=True)
    req["fault_id"] = np.arange(len(req))
    req["prev_req_ts"] = req.groupby("tid")["ts"].shift(1).fillna(-1).astype("int64")
    req["next_req_ts"] = req.groupby("tid")["ts"].shift(-1).fillna(2**62) \
        .astype("int64")

    # start: the fault handler's entry where kprobes recorded it (its return
    # then ends the fault), else kvm_page_fault, else the shadow page-table walk
    handler = tables.get("fault_handler")
    if handler is not None and len(handler):
        st = handler[["ts", "tid", "error_code", "exit_ts", "ret"]].astype(
            {"exit_ts": "int64", "ret": "int64"}).rename(
            columns={"exit_ts": "handler_exit_ts", "ret": "handler_ret"})
        start_kind = "kvm_mmu_page_fault entry/return"
    elif len(tables["page_fault"]):
        st = tables["page_fault"][["ts", "tid", "error_code"]].copy()
        start_kind = "kvm_page_fault"
    else:
        st = tables["pt_walk"][["ts", "tid", "pferr"]].rename(columns={"pferr": "error_code"})
        start_kind = "kvm_mmu_pagetable_walk"
    st = st.astype({"ts": "int64", "error_code": "int64"})
    f = _asof(req, st, "ts", "start_ts", "backward", {"ts": "start_ts"})
    stale = f["start_ts"].isna() | (f["start_ts"] <= f["prev_req_ts"])
    if "handler_exit_ts" in f:  # the request must lie inside the handler call
        stale |= f["handler_exit_ts"] < f["ts"]
    f.loc[stale, [c for c in ("start_ts", "error_code", "handler_exit_ts", "handler_ret")
                  if c in f]] = pd.NA

    # install: the first spte write for this gfn after the request
    if spte_format != "legacy" and len(tables["tdp_spte_changed"]):
        src = tdp_leaf_installs(tables["tdp_spte_changed"].rename(columns={"new_spte": "spte"}))
    else:
        src = tables["set_spte"]
    src = src.reset_index(drop=True)
    ins = src[["ts", "tid", "gfn", "spte", "level"]].astype({"ts": "int64"})
    ins["install_row"] = np.arange(len(ins))
    f = _asof(f, ins, "ts", "install_ts",
              "forward", {"ts": "install_ts", "gfn": "install_gfn", "level": "install_level"})
    pages = np.left_shift(np.uint64(1), np.uint64(9) * (f["level"].to_numpy(dtype="uint64")
                                                         - np.uint64(1)))
    mask = ~(pages - np.uint64(1))
    has = f["install_ts"].notna().to_numpy(dtype=bool)
    ok = (has & (f["install_ts"].fillna(0).to_numpy(dtype="int64")
                 < f["next_req_ts"].to_numpy(dtype="int64"))
          & ((f["install_gfn"].fillna(0).to_numpy(dtype="uint64") & mask)
             == (f["gfn"].to_numpy(dtype="uint64") & mask)))
    f.loc[~ok, ["install_ts", "spte", "install_row", "install_gfn", "install_level"]] = pd.NA
    prefetch = src[~np.isin(np.arange(len(src)), f.loc[ok, "install_row"].astype("int64"))]

    ec = f["error_code"].fillna(0).astype("uint64").astype("int64")
    if start_kind == "kvm_page_fault" and spte_format == "ept":
        write, fetch = (ec & EPT_QUAL_WRITE) != 0, (ec & EPT_QUAL_FETCH) != 0
    else:
        write, fetch = (ec & PFERR_WRITE) != 0, (ec & PFERR_FETCH) != 0
    access = np.where(fetch, "exec", np.where(write, "write", "read"))
    # Without a start event, the installed spte tells read vs write.
    no_start = f["start_ts"].isna()
    spte_w = (f["spte"].fillna(0).to_numpy(dtype="uint64") & np.uint64(2)) != 0
    access = np.where(no_start.to_numpy(dtype=bool), np.where(spte_w, "write", "read"), access)
    f["access"] = access
    f["start_kind"] = np.where(no_start.to_numpy(dtype=bool), "", start_kind)
    if "handler_exit_ts" in f:
        f["service_ns"] = f["handler_exit_ts"] - f["start_ts"]
    else:
        f["service_ns"] = f["install_ts"] - f["start_ts"]
    return f.sort_values("fault_id").reset_index(drop=True), prefetch


def tdp_leaf_installs(changed: pd.DataFrame) -> pd.DataFrame:
    """The TDP MMU's spte changes that install a leaf mapping.

    kvm_tdp_mmu_map() (arch/x86/kvm/mmu/tdp_mmu.c, 5.10-6.18) links each
    missing page table on the way down (a non-leaf change, traced too) before
    it sets the leaf; zaps trace a non-present new spte. A leaf is level 1 or
    a large page (bit 7, PT_PAGE_SIZE_MASK, on EPT and NPT alike), and present
    (EPT: any of R/W/X, bits 0-2; NPT: the present bit 0)."""
    spte = changed["spte"].to_numpy(dtype="uint64")
    level = changed["level"].to_numpy(dtype="int64")
    present = (spte & np.uint64(0x7)) != 0
    leaf = (level == 1) | ((spte >> np.uint64(7)) & np.uint64(1) == 1)
    return changed[present & leaf]


def spte_memtypes(f: pd.DataFrame, spte_format: str, pat) -> np.ndarray:
    has = f["spte"].notna()
    out = np.full(len(f), "", dtype=object)
    if has.any():
        out[has.to_numpy()] = x86mt.spte_memtype(
            f.loc[has, "spte"].astype("uint64").to_numpy(),
            f.loc[has, "level"].to_numpy(), spte_format, pat)
    return out


def attach_vm(df: pd.DataFrame, vcpus: pd.DataFrame, slots: pd.DataFrame) -> pd.Series:
    """vm_fd of each row: its thread's vCPU fd -> KVM_CREATE_VCPU's VM fd; when the
    vCPU was created before recording, the process's only VM if it has one.
    Rows and VMs are matched within one process (pid and ``proc``)."""
    key = ["pid", "proc"]
    vm = pd.Series(-1, index=df.index, dtype="int64")
    if len(df) and len(vcpus):
        m = df[key + ["vcpu_fd"]].reset_index().merge(
            vcpus.drop_duplicates(key + ["vcpu_fd"], keep="last")[key + ["vcpu_fd", "vm_fd"]],
            on=key + ["vcpu_fd"], how="left").set_index("index")["vm_fd"]
        vm = m.fillna(-1).astype("int64").reindex(df.index, fill_value=-1)
    if len(slots) and len(df):
        per = slots.groupby(key)["vm_fd"].agg(["nunique", "first"])
        single = per.loc[per["nunique"] == 1, "first"]
        idx = pd.MultiIndex.from_frame(df[key].astype("int64"))
        only = pd.Series(single.reindex(idx).to_numpy(), index=df.index)
        fill = (vm < 0) & only.notna()
        vm[fill] = only[fill].astype("int64")
    return vm


def attribute(df: pd.DataFrame, slots: pd.DataFrame, key: str, ts="ts") -> pd.Series:
    """Index into ``slots`` (a slot version) for each row, -1 when none.

    ``key`` is 'gfn' (guest frame) or 'hva' (host address); one vectorised mask
    per slot version, of which a VM has few."""
    out = np.full(len(df), -1, dtype=np.int64)
    if not len(df) or not len(slots):
        return pd.Series(out, index=df.index)
    t = df[ts].to_numpy(dtype=np.int64)
    pid, proc, vm = df["pid"].to_numpy(), df["proc"].to_numpy(), df["vm_fd"].to_numpy()
    addr = df[key].to_numpy(dtype=np.uint64)
    for i, s in slots.iterrows():
        lo, hi = (s.gfn_start, s.gfn_end) if key == "gfn" else \
            (s.hva, min(int(s.hva) + int(s.size_bytes), 2**64 - 1))  # never past 2^64
        t_end = s.end_ts if s.end_ts < np.iinfo(np.int64).max else np.iinfo(np.int64).max
        hit = ((pid == s.pid) & (proc == s.proc) & (vm == s.vm_fd) & (t >= s.start_ts)
               & (t < t_end)
               & (addr >= np.uint64(lo)) & (addr < np.uint64(hi)))
        out[hit] = i
    return pd.Series(out, index=df.index)
