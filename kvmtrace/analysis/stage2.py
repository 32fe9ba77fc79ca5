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

from ..memtype import arm64 as a64

SIZE_LEVEL = {4096: 1, 2 << 20: 2, 1 << 30: 3}
EC_IABT = (0x20, 0x21)
EC_DABT = (0x24, 0x25)
ESR_WNR = 1 << 6


def has_stage2(tables) -> bool:
    return any(len(tables[t]) for t in ("guest_abort", "guest_fault", "s2_map"))


def _access(esr: pd.Series) -> np.ndarray:
    e = esr.fillna(0).astype("int64").to_numpy()
    ec = (e >> 26) & 0x3F
    exec_ = np.isin(ec, EC_IABT)
    write = np.isin(ec, EC_DABT) & ((e & ESR_WNR) != 0)
    return np.where(exec_, "exec", np.where(write, "write", "read"))


def _installs(tables) -> pd.DataFrame:
    cols = ["ts", "pid", "tid", "vcpu_fd", "ipa", "prot", "ret"]
    m = tables["s2_map"][cols + ["size", "phys"]].assign(kind="map")
    r = tables["s2_relax"][cols].assign(kind="relax")
    if len(r) and len(m):
        # a relax keeps the mapping's size: the last map of the same 2M region
        mm = m.assign(blk=m["ipa"].astype("int64") // (1 << 21)).sort_values("ts")
        rr = r.assign(blk=r["ipa"].astype("int64") // (1 << 21)).sort_values("ts")
        rr = pd.merge_asof(rr, mm[["ts", "blk", "size", "phys"]], on="ts", by="blk",
                           direction="backward")
        r = rr.drop(columns="blk")
    ins = pd.concat([m, r], ignore_index=True)
    return ins.astype({"ts": "int64"}).sort_values("ts").reset_index(drop=True)


def pair(tables, meta) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(faults, installs outside any fault) with the x86 fault-table columns."""
    ab = tables["guest_abort"]
    gf = tables["guest_fault"][["ts", "tid", "ipa", "esr"]].astype({"ts": "int64"})
    if len(ab):
        f = ab[["ts", "pid", "tid", "vcpu_fd", "cpu", "ret", "exit_ts"]].rename(
            columns={"ret": "handler_ret", "exit_ts": "handler_exit_ts"})
        f = f.astype({"ts": "int64", "handler_exit_ts": "int64"}).sort_values("ts")
        f = pd.merge_asof(f, gf.rename(columns={"ts": "tp_ts"}).sort_values("tp_ts"),
                          left_on="ts", right_on="tp_ts", by="tid", direction="forward")
        bad = f["tp_ts"].isna() | (f["tp_ts"] > f["handler_exit_ts"])
        f.loc[bad, ["ipa", "esr"]] = np.nan
        start_kind = "kvm_handle_guest_abort entry/return"
    else:
        f = tables["guest_fault"][["ts", "pid", "tid", "vcpu_fd", "cpu", "ipa", "esr"]] \
            .astype({"ts": "int64"}).sort_values("ts")
        f["handler_exit_ts"] = np.nan
        f["handler_ret"] = np.nan
        start_kind = "kvm:kvm_guest_fault"
    f = f.reset_index(drop=True)
    f["fault_id"] = np.arange(len(f))

    ins = _installs(tables)
    ins["install_row"] = np.arange(len(ins))
    inside = pd.Series(np.nan, index=ins.index)
    if len(ins) and len(f) and len(ab):
        j = pd.merge_asof(ins[["ts", "tid", "install_row"]],
                          f[["ts", "tid", "fault_id", "handler_exit_ts"]].rename(
                              columns={"ts": "fault_ts"}),
                          left_on="ts", right_on="fault_ts", by="tid", direction="backward")
        ok = j["fault_id"].notna() & (j["ts"] <= j["handler_exit_ts"])
        inside = j["fault_id"].where(ok).set_axis(j["install_row"].to_numpy())
        inside = inside.reindex(ins["install_row"]).set_axis(ins.index)
    ins["fault_id"] = inside
    own = ins[ins["fault_id"].notna()]
    last = own.groupby("fault_id").last()
    counts = own.groupby("fault_id").size()
    f = f.join(last[["ts", "ipa", "size", "phys", "prot", "kind", "ret"]].rename(columns={
        "ts": "install_ts", "ipa": "install_ipa", "size": "map_size", "phys": "phys",
        "prot": "spte", "kind": "install_kind", "ret": "install_ret"}), on="fault_id")
    f["installs"] = f["fault_id"].map(counts).fillna(0).astype("int64")
    f["ipa"] = f["ipa"].fillna(f["install_ipa"])
    f["gfn"] = (f["ipa"] // 4096).astype("Int64")
    f["pfn"] = (f["phys"] // 4096).astype("Int64")
    f["level"] = f["map_size"].map(SIZE_LEVEL).fillna(1).astype("int64")
    f["error_code"] = f["esr"]
    f["access"] = _access(f["esr"])
    f["start_ts"] = f["ts"]
    f["start_kind"] = start_kind
    f["service_ns"] = f["handler_exit_ts"] - f["ts"]
    f = f[f["gfn"].notna()].copy()
    f["gfn"] = f["gfn"].astype("int64")
    other = ins[ins["fault_id"].isna()].reset_index(drop=True)
    other["gfn"] = other["ipa"].astype("int64") // 4096
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
        hit = pv[(pv["pid"] == s.pid) & (pv["ts"] <= s.t_start)
                 & (pv["vm_start"] < s.hva + s["size"]) & (pv["vm_end"] > s.hva)] \
            if len(pv) else pv
        if not len(hit):
            rows.append({"kvm_vma_memtype": None, "kvm_vm_flags": np.nan, "kvm_pgprot": np.nan})
            continue
        h = hit.sort_values("ts").tail(1)  # a frame row, not a Series: keeps u64 exact
        prot, flags = int(h["vm_page_prot"].iloc[0]), int(h["vm_flags"].iloc[0])
        rows.append({"kvm_vma_memtype": str(a64.attrindx_memtype([prot], kernel)[0]),
                     "kvm_vm_flags": flags, "kvm_pgprot": prot})
    return pd.DataFrame(rows, columns=["kvm_vma_memtype", "kvm_vm_flags", "kvm_pgprot"],
                        index=slots.index)


def pfn_is_ram(pfn: pd.Series, ram) -> np.ndarray:
    pa = pfn.fillna(-1).astype("int64").to_numpy() * 4096
    out = np.zeros(len(pa), bool)
    for r in ram or []:
        out |= (pa >= r["start"]) & (pa < r["end"])
    return out


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
    ram = pfn_is_ram(f["pfn"], meta.get("ram"))
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
            cpu.get("dic"), dirty_logging=bool(int(r["flags"]) & 1))
        name = errno_mod.errorcode.get(-int(r.ret), str(-int(r.ret)))
        if err == -int(r.ret):
            reasons[i] = f"{name}: kvm_arch_prepare_memory_region refused: {words}"
        else:
            reasons[i] = f"{name}: kvm_arch_prepare_memory_region refused it (no known rule)"
    return reasons
