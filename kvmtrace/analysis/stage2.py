"""arm64 faults: stage-2 aborts paired with the mappings KVM installed for them.

A fault is one kvm_handle_guest_abort call (kprobe entry to return: service
time and result). The kvm:kvm_guest_fault tracepoint inside it gives the IPA
and ESR_EL2 (access kind); the kvm_pgtable_stage2_map / relax_perms calls on
the same thread inside it are what it installed (the last one wins), their
prot decoded with the recording kernel's own enum kvm_pgtable_prot. Where
kprobes are missing the tracepoint alone gives the faults (no installs). The
output has the columns of the x86 fault table (analysis.faults), so every
report and diff works on both.
"""

from __future__ import annotations

import errno as errno_mod

import numpy as np
import pandas as pd

from .. import kvmapi
from ..memtype import arm64 as a64
from . import pages
from .faults import _asof, nullable

EC_IABT = (0x20, 0x21)
EC_DABT = (0x24, 0x25)
ESR_WNR = 1 << 6


def has_stage2(tables) -> bool:
    return any(len(tables[t]) for t in ("guest_abort", "guest_fault", "s2_map"))


def _access(esr: pd.Series) -> np.ndarray:
    e = esr.fillna(0).to_numpy(dtype="uint64").astype("int64")
    ec = (e >> 26) & 0x3F
    exec_ = np.isin(ec, EC_IABT)
    write = np.isin(ec, EC_DABT) & ((e & ESR_WNR) != 0)
    return np.where(exec_, "exec", np.where(write, "write", "read"))


def _installs(tables) -> pd.DataFrame:
    cols = ["ts", "pid", "tid", "vcpu_fd", "ipa", "prot", "ret"]
    m = nullable(tables["s2_map"][cols + ["size", "phys"]]).astype(
        {"ts": "uint64", "tid": "int64"}).assign(kind="map")
    r = tables["s2_relax"][cols].assign(kind="relax")
    if len(r) and len(m):
        # a relax keeps the mapping's size: the last map of the same 2M region
        mm = m.assign(blk=m["ipa"].astype("int64") // (1 << 21)).sort_values("ts")
        rr = r.assign(blk=r["ipa"].astype("int64") // (1 << 21)).sort_values("ts")
        mm = mm[["ts", "blk"]].join(nullable(mm[["size", "phys"]]))
        rr = pd.merge_asof(rr, mm, on="ts", by="blk", direction="backward")
        r = rr.drop(columns="blk")
    ins = pd.concat([m, r], ignore_index=True)
    return ins.astype({"ts": "int64", "tid": "int64"}).sort_values("ts").reset_index(drop=True)


def pair(tables, meta) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(faults, installs outside any fault) with the x86 fault-table columns."""
    page = pages.page_size(meta)
    ab = tables["guest_abort"]
    gf = tables["guest_fault"][["ts", "tid", "ipa", "esr"]].astype({"ts": "int64",
                                                                   "tid": "int64"})
    if len(ab):
        f = ab[["ts", "pid", "tid", "vcpu_fd", "cpu", "ret", "exit_ts"]].rename(
            columns={"ret": "handler_ret", "exit_ts": "handler_exit_ts"})
        f = nullable(f.astype({"ts": "int64", "tid": "int64", "handler_exit_ts": "int64"})) \
            .astype({"ts": "int64", "tid": "int64"}).sort_values("ts")
        f = _asof(f, gf, "ts", "tp_ts", "forward", {"ts": "tp_ts"})
        bad = (f["tp_ts"].isna() | (f["tp_ts"] > f["handler_exit_ts"])).fillna(True)
        f.loc[bad.astype(bool), ["ipa", "esr"]] = pd.NA
        start_kind = "kvm_handle_guest_abort entry/return"
    else:
        f = nullable(tables["guest_fault"][["ts", "pid", "tid", "vcpu_fd", "cpu", "ipa", "esr"]]
                     .astype({"ts": "int64", "tid": "int64"})) \
            .astype({"ts": "int64", "tid": "int64"}).sort_values("ts")
        f["handler_exit_ts"] = pd.array([pd.NA] * len(f), dtype="Int64")
        f["handler_ret"] = pd.array([pd.NA] * len(f), dtype="Int64")
        start_kind = "kvm:kvm_guest_fault"
    f = f.reset_index(drop=True)
    f["fault_id"] = np.arange(len(f))

    ins = _installs(tables)
    ins["install_row"] = np.arange(len(ins))
    inside = pd.Series(pd.NA, index=ins.index, dtype="Int64")
    if len(ins) and len(f) and len(ab):
        j = pd.merge_asof(ins[["ts", "tid", "install_row"]],
                          f[["ts", "tid", "fault_id", "handler_exit_ts"]].rename(
                              columns={"ts": "fault_ts"}),
                          left_on="ts", right_on="fault_ts", by="tid", direction="backward")
        ok = (j["fault_id"].notna() & (j["ts"] <= j["handler_exit_ts"])).fillna(False)
        inside = j["fault_id"].where(ok.astype(bool)).astype("Int64") \
            .set_axis(j["install_row"].to_numpy())
        inside = inside.reindex(ins["install_row"]).set_axis(ins.index)
    ins["fault_id"] = inside
    own = ins[ins["fault_id"].notna()]
    last = own.groupby("fault_id").last()
    counts = own.groupby("fault_id").size()
    last = nullable(last[["ts", "ipa", "size", "phys", "prot", "kind", "ret"]].rename(columns={
        "ts": "install_ts", "ipa": "install_ipa", "size": "map_size_bytes", "phys": "phys",
        "prot": "spte", "kind": "install_kind", "ret": "install_ret"}))
    last.index = last.index.astype("int64")
    f = f.join(last, on="fault_id")
    f["installs"] = f["fault_id"].map(counts).fillna(0).astype("int64")
    f["ipa"] = f["ipa"].astype("UInt64").fillna(f["install_ipa"].astype("UInt64"))
    f["gfn"] = f["ipa"] // page
    f["pfn"] = f["phys"].astype("UInt64") // page
    lvl = pages.level_of_size(f["map_size_bytes"].fillna(0).to_numpy(dtype="uint64"), page)
    f["level"] = np.where(lvl > 0, lvl, 1)
    f["error_code"] = f["esr"].astype("UInt64")
    f["access"] = _access(f["esr"])
    f["start_ts"] = f["ts"]
    f["start_kind"] = start_kind
    f["service_ns"] = f["handler_exit_ts"] - f["ts"]
    f = f[f["gfn"].notna().to_numpy(dtype=bool)].copy()
    f["gfn"] = f["gfn"].astype("uint64")
    other = ins[ins["fault_id"].isna()].reset_index(drop=True).rename(
        columns={"size": "size_bytes"})
    other["gfn"] = other["ipa"].astype("uint64") // page
    return f.reset_index(drop=True), other


def spte_memtypes(f: pd.DataFrame, meta: dict) -> np.ndarray:
    out = np.full(len(f), "", dtype=object)
    has = f["spte"].notna().to_numpy()
    if has.any():
        enum = ((meta.get("btf") or {}).get("enums") or {}).get("kvm_pgtable_prot")
        dec = a64.stage2_prot_decode(f.loc[has, "spte"].astype("uint64").to_numpy(), enum,
                                     meta.get("kernel"))
        out[has] = dec.memtype
    return out


def slot_vma_types(slots: pd.DataFrame, prepare_vma: pd.DataFrame, kernel: str) -> pd.DataFrame:
    """Per slot version, the VMA KVM itself looked up when the slot was set
    (kvm_arch_prepare_memory_region -> find_vma_intersection): vm_flags and the
    AttrIndx memory type of vm_page_prot. Few slots: a loop over slots."""
    rows = []
    pv = prepare_vma
    for i, s in slots.iterrows():
        hit = pv[(pv["pid"] == s.pid) & (pv["ts"] <= s.start_ts)
                 & (pv["vm_start"] < s.hva + s.size_bytes) & (pv["vm_end"] > s.hva)] \
            if len(pv) else pv
        if not len(hit):
            rows.append({"kvm_vma_memtype": None, "kvm_vm_flags": None, "kvm_pgprot": None})
            continue
        h = hit.sort_values("ts").tail(1)  # a frame row, not a Series: keeps u64 exact
        prot, flags = int(h["vm_page_prot"].iloc[0]), int(h["vm_flags"].iloc[0])
        rows.append({"kvm_vma_memtype": str(a64.attrindx_memtype([prot], kernel)[0]),
                     "kvm_vm_flags": flags, "kvm_pgprot": prot})
    return pd.DataFrame(rows, columns=["kvm_vma_memtype", "kvm_vm_flags", "kvm_pgprot"],
                        index=slots.index).astype({"kvm_vm_flags": "UInt64",
                                                   "kvm_pgprot": "UInt64"})


def pfn_is_ram(pfn: pd.Series, ram, page: int) -> np.ndarray:
    known = pfn.notna().to_numpy(dtype=bool)
    pa = pfn.fillna(0).to_numpy(dtype="uint64") * np.uint64(page)
    out = np.zeros(len(pa), bool)
    for r in ram or []:
        out |= (pa >= np.uint64(r["start"])) & (pa < np.uint64(r["end"]))
    return out & known


def expected(f: pd.DataFrame, slots: pd.DataFrame, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(expected stage-2 type, rule words) per fault from the kernel's rules,
    evaluated once per (slot, exec, pfn is RAM) group."""
    cpu = meta.get("arm64") or {}
    kernel = meta.get("kernel")
    exp = np.full(len(f), None, dtype=object)
    words = np.full(len(f), "", dtype=object)
    if not len(f) or not len(slots):
        return exp, words
    known = f["pfn"].notna().to_numpy() & (meta.get("ram") is not None)
    ram = pfn_is_ram(f["pfn"], meta.get("ram"), pages.page_size(meta))
    # a refused fault installs nothing, so has no pfn: its slot's other faults tell
    by_slot = pd.Series(ram[known]).groupby(f["slot_row"].to_numpy()[known]).mean()
    fill = ~known & f["slot_row"].isin(by_slot.index).to_numpy()
    ram[fill] = f["slot_row"][fill].map(by_slot).to_numpy() >= 0.5
    known = known | fill
    key = pd.DataFrame({"slot_row": f["slot_row"].to_numpy(), "exec": (f["access"] == "exec")
                        .to_numpy(), "ram": ram, "known": known})
    for (row, ex, r, known), idx in key.groupby(["slot_row", "exec", "ram", "known"]).groups.items():
        if row < 0:
            continue
        s = slots.loc[row]
        flags = s.get("kvm_vm_flags")
        mt, err, w = a64.expected_stage2(
            kernel, s.get("vma_memtype_arm64"), 0 if pd.isna(flags) else int(flags),
            bool(r) if known else None, cpu.get("fwb"), cpu.get("dic"), bool(ex))
        pos = key.index.get_indexer(idx)
        exp[pos] = mt
        words[pos] = w + (f" [{errno_mod.errorcode.get(err, err)}]" if err else "")
    return exp, words


def memslot_reasons(ops: pd.DataFrame, tables, meta: dict) -> pd.Series:
    """For refused memslot ioctls, the arm64 rule that refused it, from the
    VMAs kvm_arch_prepare_memory_region looked up during that very ioctl
    (same thread, between syscall entry and exit). Memslot ioctls are rare:
    a loop over the refused ones."""
    reasons = ops["reason"].copy()
    pv, pr = tables["prepare_vma"], tables["prepare_region"]
    cpu = meta.get("arm64") or {}
    kernel = meta.get("kernel")
    for i, r in ops[ops["ret"] < 0].iterrows():
        win = lambda df: df[(df["tid"] == r.tid) & (df["ts"] >= r.enter_ts) & (df["ts"] <= r.ts)]  # noqa: E731
        prep = win(pr)
        if not len(prep) or int(prep["ret"].iloc[-1]) >= 0:
            continue  # refused before the arch hook, by generic KVM code
        vmas = win(pv).sort_values("vm_start")
        types = a64.attrindx_memtype(vmas["vm_page_prot"].to_numpy(dtype="uint64"), kernel) \
            if len(vmas) else []
        err, words = a64.expected_memslot(
            kernel, list(zip(types, vmas["vm_flags"].astype("int64"))), cpu.get("fwb"),
            cpu.get("dic"), dirty_logging=bool(int(r["flags"]) & kvmapi.KVM_MEM_LOG_DIRTY_PAGES))
        name = errno_mod.errorcode.get(-int(r.ret), str(-int(r.ret)))
        if err == -int(r.ret):
            reasons[i] = f"{name}: kvm_arch_prepare_memory_region refused: {words}"
        else:
            reasons[i] = f"{name}: kvm_arch_prepare_memory_region refused it (no known rule)"
    return reasons
