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
ACCESS = ("exec", "read", "write")  # the access kinds, as codes 0, 1, 2
NO_NEXT_REQUEST = 2**62  # next_req_ts of a thread's last request: no install is too late


def nullable(df: pd.DataFrame) -> pd.DataFrame:
    """Integer columns as nullable integers (Int64 / UInt64), so a join that
    finds no match leaves null instead of turning the column into float64
    (an spte with bit 63 set, or a timestamp past 2**53 ns, is not a float)."""
    conv = {c: ("UInt64" if df[c].dtype.kind == "u" else "Int64")
            for c in df.columns if df[c].dtype.kind in "iu"}
    return df.astype(conv)


def _sorted(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """``df`` sorted by ``col``; as it is when already in order (no copy: a
    merge_asof matches each left row on its own, so the order of ties is moot)."""
    return df if df[col].is_monotonic_increasing else df.sort_values(col)


def _asof(left, right, on_left, on_right, direction, suffix_cols):
    """merge_asof by tid (arm64 pairing, stage2.py), bringing right's columns renamed (``suffix_cols``)
    as nullable integers; the join key itself is a private int64 copy."""
    key = right[[k for k, v in suffix_cols.items() if v == on_right][0]].to_numpy(
        dtype="int64")
    if len(key) > 1 and (key[1:] < key[:-1]).any():  # sorted as sort_values sorts (quicksort)
        order = np.argsort(key)
        right, key = right.take(order), key[order]  # plain columns: cheaper than nullable ones
    r = nullable(right.rename(columns=suffix_cols)).assign(_key=key)
    r = r.astype({"tid": left["tid"].dtype})
    m = pd.merge_asof(_sorted(left, on_left), r,
                      left_on=on_left, right_on="_key", by="tid",
                      direction=direction, allow_exact_matches=True)
    return m.drop(columns="_key")


def _by_thread(codes: np.ndarray, k: int):
    """(order, bounds): row indices grouped by thread code (time order kept
    within one), and where each code's rows start and end in it."""
    small = codes.astype(np.int16 if k < (1 << 15) else np.int32)  # radix-sorted
    order = np.argsort(small, kind="stable")
    return order, np.searchsorted(small[order], np.arange(k + 1))


def asof_index(ltid: np.ndarray, lts: np.ndarray, rtid: np.ndarray, rts: np.ndarray,
               forward: bool) -> np.ndarray:
    """For each left row, the index of the right row of the same thread with the
    last time at or before its time (backward) or the first at or after it
    (forward); -1 where there is none: merge_asof(by="tid",
    allow_exact_matches=True) on int64 columns, as one binary search per
    thread (a loop over threads, of which a VM has a few per vCPU)."""
    n, m = len(lts), len(rts)
    out = np.full(n, -1, dtype=np.int64)
    if not n or not m:
        return out
    codes, uniq = pd.factorize(np.concatenate([ltid, rtid]))
    k = len(uniq)
    lo, lb = _by_thread(codes[:n], k)
    ro, rb = _by_thread(codes[n:], k)
    for g in range(k):
        L, R = lo[lb[g]:lb[g + 1]], ro[rb[g]:rb[g + 1]]
        if not len(L) or not len(R):
            continue
        rt = rts[R]
        if len(rt) > 1 and (rt[1:] < rt[:-1]).any():
            s = np.argsort(rt, kind="stable")
            R, rt = R[s], rt[s]
        if forward:
            i = np.searchsorted(rt, lts[L], side="left")
            ok = i < len(R)
        else:
            i = np.searchsorted(rt, lts[L], side="right") - 1
            ok = i >= 0
        out[L[ok]] = R[i[ok]]
    return out


def _masked(values: np.ndarray, idx: np.ndarray, dtype: str) -> pd.api.extensions.ExtensionArray:
    """values[idx] as a nullable integer array, null where idx is -1."""
    miss = idx < 0
    v = values[np.where(miss, 0, idx)] if len(values) else np.zeros(len(idx), values.dtype)
    np_dtype = np.uint64 if dtype == "UInt64" else np.int64
    return pd.arrays.IntegerArray(np.where(miss, 0, v).astype(np_dtype), miss.copy())


def _col(df: pd.DataFrame, name: str, dtype=np.int64) -> np.ndarray:
    return df[name].to_numpy(dtype=dtype)


def pair(tables: dict, spte_format: str, consume: bool = False) \
        -> tuple[pd.DataFrame, pd.DataFrame]:
    """(faults, prefetches): one row per fault with start / install joined.
    ``consume``: ``tables`` is the caller's to give up; each raw table leaves
    it once its columns are taken, so memory holds one copy of the events."""
    let_go = (lambda *names: [tables.pop(n, None) for n in names]) if consume else \
        (lambda *names: None)
    req = tables["spte_requested"]  # its needed columns only are copied
    cols = ["ts", "pid", "tid", "vcpu_fd", "cpu", "gfn", "pfn", "level"]
    bounded = "next_req_ts" in req  # given by the caller (windows.py: a window of requests)
    if not len(req):
        return schema.FAULTS.empty(), tables["set_spte"].copy()
    ts0 = _col(req, "ts")
    order = np.argsort(ts0, kind="stable")
    f = pd.DataFrame({c: req[c].to_numpy()[order] for c in cols
                      + (["prev_req_ts", "next_req_ts"] if bounded else [])})
    f["ts"] = ts0[order]
    f["tid"] = f["tid"].astype(np.int64)
    f["fault_id"] = np.arange(len(f))
    let_go("spte_requested")
    ts, tid = f["ts"].to_numpy(), f["tid"].to_numpy()
    if not bounded:
        prev, has_prev, nxt, has_next = thread_neighbours(tid, ts)
        f["prev_req_ts"] = np.where(has_prev, prev, -1)
        f["next_req_ts"] = np.where(has_next, nxt, NO_NEXT_REQUEST)

    # start: the fault handler's entry where kprobes recorded it (its return
    # then ends the fault), else kvm_page_fault, else the shadow page-table walk
    handler = tables.get("fault_handler")
    if handler is not None and len(handler):
        st, code, start_kind = handler, "error_code", "kvm_mmu_page_fault entry/return"
    elif len(tables["page_fault"]):
        st, code, start_kind = tables["page_fault"], "error_code", "kvm_page_fault"
    else:
        st, code, start_kind = tables["pt_walk"], "pferr", "kvm_mmu_pagetable_walk"
    st_ts, st_tid = _col(st, "ts"), _col(st, "tid")
    si = asof_index(tid, ts, st_tid, st_ts, forward=False)
    start_ts = np.where(si >= 0, st_ts[np.maximum(si, 0)] if len(st_ts) else 0, 0)
    stale = (si < 0) | (start_ts <= f["prev_req_ts"].to_numpy())
    handled = st is handler
    if handled:
        exit_ts = _col(st, "exit_ts")
        stale |= exit_ts[np.maximum(si, 0)] < ts
    si = np.where(stale, -1, si)
    f["start_ts"] = _masked(st_ts, si, "Int64")
    f["error_code"] = _masked(st[code].to_numpy(dtype=np.uint64).astype(np.int64), si, "Int64")
    if handled:
        f["handler_exit_ts"] = _masked(exit_ts, si, "Int64")
        f["handler_ret"] = _masked(_col(st, "ret"), si, "Int64")
    del st
    let_go("fault_handler", "page_fault", "pt_walk")

    # install: the first spte write for this gfn after the request
    if spte_format != "legacy" and len(tables["tdp_spte_changed"]):
        src = tdp_leaf_installs(tables["tdp_spte_changed"].rename(columns={"new_spte": "spte"}))
    else:
        src = tables["set_spte"]
    src = src.reset_index(drop=True)
    in_ts, in_gfn = _col(src, "ts"), _col(src, "gfn", np.uint64)
    ii = asof_index(tid, ts, _col(src, "tid"), in_ts, forward=True)
    j = np.maximum(ii, 0)
    level = f["level"].to_numpy(dtype=np.uint64)
    mask = ~((np.uint64(1) << (np.uint64(9) * (level - np.uint64(1)))) - np.uint64(1))
    ok = (ii >= 0)
    if len(in_ts):
        ok &= (in_ts[j] < f["next_req_ts"].to_numpy()) & \
            ((in_gfn[j] & mask) == (f["gfn"].to_numpy(dtype=np.uint64) & mask))
    ii = np.where(ok, ii, -1)
    spte = src["spte"].to_numpy(dtype=np.uint64)
    f["install_ts"] = _masked(in_ts, ii, "Int64")
    f["spte"] = _masked(spte, ii, "UInt64")
    f["install_row"] = _masked(np.arange(len(src), dtype=np.int64), ii, "Int64")
    f["install_gfn"] = _masked(in_gfn, ii, "UInt64")
    f["install_level"] = _masked(_col(src, "level"), ii, "Int64")
    taken = np.zeros(len(src), dtype=bool)
    taken[ii[ii >= 0]] = True
    prefetch = src[~taken]

    ec = f["error_code"].to_numpy(dtype=np.int64, na_value=0)
    if start_kind == "kvm_page_fault" and spte_format == "ept":
        write, fetch = (ec & EPT_QUAL_WRITE) != 0, (ec & EPT_QUAL_FETCH) != 0
    else:
        write, fetch = (ec & PFERR_WRITE) != 0, (ec & PFERR_FETCH) != 0
    # access and start_kind as categorical codes (ACCESS / "" or start_kind), never text per fault
    access = np.where(fetch, 0, np.where(write, 2, 1))
    # Without a start event, the installed spte tells read vs write.
    no_start = si < 0
    spte_w = (np.where(ii >= 0, spte[j] if len(spte) else 0, 0).astype(np.uint64)
              & np.uint64(2)) != 0
    access = np.where(no_start, np.where(spte_w, 2, 1), access)
    f["access"] = schema.categorical(ACCESS, access)
    f["start_kind"] = schema.categorical(["", start_kind], (~no_start).astype(np.int64))
    end = f["handler_exit_ts"] if handled else f["install_ts"]
    f["service_ns"] = end - f["start_ts"]
    return f, prefetch


def thread_neighbours(tid: np.ndarray, ts: np.ndarray):
    """(prev, has_prev, next, has_next): each row's previous and next time on
    its thread, for rows in time order; integers throughout (a groupby shift
    would pass through float64, inexact past 2^53 ns = 104 days of uptime)."""
    codes, uniq = pd.factorize(tid)
    order, _ = _by_thread(codes, len(uniq))  # by thread, time order kept within one
    t, v = codes[order], ts[order]
    same = np.zeros(len(t), dtype=bool)
    same[1:] = t[1:] == t[:-1]
    prev, nxt = np.zeros(len(t), np.int64), np.zeros(len(t), np.int64)
    prev[1:], nxt[:-1] = v[:-1], v[1:]
    has_next = np.zeros(len(t), dtype=bool)
    has_next[:-1] = same[1:]
    out = [np.empty_like(a) for a in (prev, same, nxt, has_next)]
    for o, a in zip(out, (prev, same, nxt, has_next)):
        o[order] = a
    return tuple(out)


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


# the spte bits an x86 memory type or KVM's rule for it depends on (with the level)
MEMTYPE_BITS = np.uint64(x86mt.EPT_IPAT | x86mt.EPT_MT_MASK << x86mt.EPT_MT_SHIFT | x86mt.PWT
                         | x86mt.PCD | x86mt.PAT_4K | x86mt.PAT_LARGE)


def distinct_sptes(spte: np.ndarray, level: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, first): each spte's index among the distinct (memory-type bits,
    large page) pairs, and the first row holding each; a rule over sptes runs
    once per pair and is taken by code (hashing: one pass, no sort)."""
    key = (np.asarray(spte, dtype=np.uint64) & MEMTYPE_BITS) * np.uint64(2) \
        + (np.asarray(level) > 1).astype(np.uint64)
    codes, uniq = pd.factorize(key)
    first = np.full(len(uniq), len(key), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(key), dtype=np.int64))
    return codes.astype(np.int64), first


def spte_memtypes(f: pd.DataFrame, spte_format: str, pat) -> pd.Categorical:
    """The installed memory type of each fault ('' where nothing was installed)."""
    has = f["spte"].notna().to_numpy(dtype=bool)
    codes = np.zeros(len(f), dtype=np.int64)  # code 0: ""
    vals = [""]
    if has.any():
        spte = f.loc[has, "spte"].astype("uint64").to_numpy()
        level = f.loc[has, "level"].to_numpy()
        c, first = distinct_sptes(spte, level)
        vals += list(x86mt.spte_memtype(spte[first], level[first], spte_format, pat))
        codes[has] = c + 1
    return schema.categorical(vals, codes)


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
