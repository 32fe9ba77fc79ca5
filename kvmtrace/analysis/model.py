"""The tidy tables every report and diff is computed from (Perfetto's habit:
normalise once, query many times).

``build(path)`` returns a :class:`Model` with:

- ``ops``: every memslot ioctl, decoded, with KVM's classification
  (create / delete / move / flags / failed ...) and the reason of a failure;
- ``slots``: slot versions over time (one row per create / move / flags change)
  with their VMA and x86 memory types;
- ``faults``: one row per fault, paired from tracepoints, attributed to a slot,
  with access kind, level, service time, and both memory types and verdict;
- ``prefetch``, ``invalidations``, ``exits``: the other per-slot activity;
- ``errors``: failed memslot ioctls and failed KVM_RUNs;
- ``verdicts``: per slot version and per page range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..memtype import x86 as x86mt
from ..recording.reader import Recording, read
from . import faults as faults_mod
from . import memslots, stage2, vmas as vmas_mod

EXIT_REASONS = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
                6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
                17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT", 29: "X86_RDMSR", 30: "X86_WRMSR",
                39: "MEMORY_FAULT"}
VERDICT_ORDER = ["upgraded", "downgraded", "rejected", "unknown", "consistent"]


@dataclass
class Model:
    recording: Recording
    ops: pd.DataFrame
    slots: pd.DataFrame
    faults: pd.DataFrame
    prefetch: pd.DataFrame
    invalidations: pd.DataFrame
    exits: pd.DataFrame
    errors: pd.DataFrame
    verdicts: pd.DataFrame
    ranges: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def meta(self) -> dict:
        return self.recording.meta


def _x86_context(meta: dict):
    x = meta.get("x86") or {}
    pat = (x.get("pat") or {}).get("entries") or list(x86mt.LINUX_PAT)
    return pat, x.get("pat_memtype_list"), x.get("ram")


def _vma_memtypes(f: pd.DataFrame, slots: pd.DataFrame, meta: dict):
    """(memtype, source) of the host side for each fault (x86 rules, see vmas.py)."""
    n = len(f)
    mt = np.full(n, "unknown", dtype=object)
    src = np.full(n, "the fault is outside every recorded memslot", dtype=object)
    if not n:
        return mt, src
    row = f["slot_row"].to_numpy()
    in_slot = row >= 0
    observed = np.zeros(n, bool)
    pfnmap = np.zeros(n, bool)
    if len(slots):
        observed[in_slot] = slots["vma_count"].to_numpy()[row[in_slot]] > 0
        pfnmap[in_slot] = slots["pfnmap"].to_numpy()[row[in_slot]].astype(bool)
    src[in_slot & ~observed] = "the VMA was not observed (no smaps snapshot covered it)"
    ordinary = in_slot & observed & ~pfnmap
    mt[ordinary] = "WB"
    src[ordinary] = "ordinary memory mapping (struct pages, default pgprot): write-back"
    pm = in_slot & observed & pfnmap
    if pm.any():
        _, pat_list, ram = _x86_context(meta)
        t, s = x86mt.pfn_memtype(f.loc[pm, "pfn"].to_numpy(), pat_list, ram)
        mt[pm], src[pm] = t, ("VM_PFNMAP VMA: " + pd.Series(s, dtype=object)).to_numpy()
    return mt, src


# How relaxed a memory type is: cacheable > write-combining / Normal-NC >
# uncached / Device. Mapping a VMA at a lower rank loses performance.
RANK = {"WB": 3, "WT": 3, "WP": 3, "Normal": 3, "Normal-Tagged": 3, "Normal-WT": 3,
        "WC": 2, "Normal-NC": 2, "UC-": 1, "UC": 1, "Device": 1, "Device-nGnRE": 1,
        "Device-nGnRnE": 1, "Device-GRE": 1}


def _verdict(vma_mt: np.ndarray, spte_mt: np.ndarray) -> np.ndarray:
    """consistent / downgraded / upgraded / unknown, one column operation each."""
    vr = pd.Series(vma_mt, dtype=object).map(RANK).to_numpy(dtype=float)
    sr = pd.Series(spte_mt, dtype=object).map(RANK).to_numpy(dtype=float)
    known = ~np.isnan(vr) & ~np.isnan(sr)
    out = np.full(len(vma_mt), "unknown", dtype=object)
    out[known] = "consistent"
    out[known & (vr > sr)] = "downgraded"
    out[known & (vr < 3) & (sr == 3)] = "upgraded"
    return out


def _arm64_slot_types(slots, prepare_vma, kernel):
    """The VMA memory type KVM saw (kprobe on its VMA lookup), else smaps: an
    ordinary VMA (not pf / mm) has the default Normal pgprot on arm64."""
    if not len(slots):
        return slots.assign(kvm_vma_memtype=[], kvm_vm_flags=[], kvm_pgprot=[],
                            vma_memtype_arm64=[])
    slots = pd.concat([slots, stage2.slot_vma_types(slots, prepare_vma, kernel)], axis=1)
    ordinary = (slots["vma_count"] > 0) & ~slots["pfnmap"].astype(bool)
    slots["vma_memtype_arm64"] = slots["kvm_vma_memtype"].where(
        slots["kvm_vma_memtype"].notna(), np.where(ordinary, "Normal", None))
    return slots


def _arm64_vma_memtypes(f, slots):
    n = len(f)
    mt = np.full(n, "unknown", dtype=object)
    src = np.full(n, "the fault is outside every recorded memslot", dtype=object)
    row = f["slot_row"].to_numpy()
    ins = row >= 0
    if ins.any():
        s = slots.iloc[row[ins]]
        kv = s["kvm_vma_memtype"].to_numpy()
        fallback = s["vma_memtype_arm64"].to_numpy()
        mt[ins] = pd.Series(fallback, dtype=object).fillna("unknown").to_numpy()
        src[ins] = np.where(pd.notna(kv), "vm_page_prot AttrIndx as KVM looked it up",
                            np.where(pd.notna(fallback), "ordinary memory (default pgprot)",
                                     "VMA page protection not observed (no kprobe on the "
                                     "VMA lookup, and smaps has no pgprot)"))
    return mt, src


def build(path_or_recording) -> Model:
    rec = path_or_recording if isinstance(path_or_recording, Recording) else read(path_or_recording)
    t, meta = rec.tables, rec.meta
    kvm = meta.get("kvm") or {}
    spte_format = kvm.get("spte_format", "legacy")
    pat, _, _ = _x86_context(meta)
    notes = list(rec.problems)

    ops = memslots.decode_ops(t["memslot"])
    ops, slots = memslots.replay(ops)
    sv = vmas_mod.slot_vmas(slots, t["vmas"])
    slots = pd.concat([slots, sv.drop(columns="slot_row")], axis=1) if len(slots) else \
        slots.assign(**{c: [] for c in sv.columns if c != "slot_row"})

    vcpus = memslots.vcpu_to_vm(t["vm_ioctl"])
    arm = stage2.has_stage2(t)
    f, prefetch = stage2.pair(t, meta) if arm else faults_mod.pair(t, spte_format)
    f["vm_fd"] = faults_mod.attach_vm(f, vcpus, slots)
    f["slot_row"] = faults_mod.attribute(f, slots, "gfn")
    if arm:
        ops["reason"] = stage2.memslot_reasons(ops, t, meta)
        slots = _arm64_slot_types(slots, t["prepare_vma"], meta.get("kernel"))
        f["spte_memtype"] = stage2.spte_memtypes(f, meta)
        f["vma_memtype"], f["vma_memtype_source"] = _arm64_vma_memtypes(f, slots)
        f["expected_memtype"], f["rule"] = stage2.expected(f, slots, meta)
    else:
        f["spte_memtype"] = faults_mod.spte_memtypes(f, spte_format, pat)
        f["vma_memtype"], f["vma_memtype_source"] = _vma_memtypes(f, slots, meta)
        f["expected_memtype"], f["rule"] = None, ""
    f["verdict"] = _verdict(f["vma_memtype"].to_numpy(), f["spte_memtype"].to_numpy())
    none = (f["spte_memtype"] == "").to_numpy()
    refused = none & f["rule"].astype(str).str.contains(r"\[E").to_numpy()
    # nothing installed and nothing refused: a retried or spurious fault (e.g. a
    # COW break makes 7.x retry); it says nothing about memory types
    f.loc[none, "verdict"] = ""
    f.loc[refused, "verdict"] = "rejected"
    f["size"] = f["level"].map(faults_mod.LEVEL_SIZE)

    prefetch = prefetch.reset_index(drop=True)
    prefetch["vm_fd"] = faults_mod.attach_vm(prefetch, vcpus, slots)
    prefetch["slot_row"] = faults_mod.attribute(prefetch, slots, "gfn")

    inv = t["unmap_hva_range"].copy()
    inv["vm_fd"] = faults_mod.attach_vm(inv, vcpus, slots)
    inv["hva"] = inv["start"]
    inv["slot_row"] = faults_mod.attribute(inv, slots, "hva")

    ex = t["userspace_exit"].copy()
    ex["reason_name"] = ex["reason"].map(EXIT_REASONS).fillna(ex["reason"].astype(str))
    exits = t["mmio"].copy()
    exits["vm_fd"] = faults_mod.attach_vm(exits, vcpus, slots)
    exits["gfn"] = exits["gpa"] // 4096
    exits["slot_row"] = faults_mod.attribute(exits, slots, "gfn")

    errors = _errors(ops, ex, f, slots, vcpus)
    verdicts, ranges = _verdicts(slots, f, ops)
    if spte_format == "legacy" and kvm.get("vendor") in ("amd", "intel"):
        notes.append("legacy-format sptes: the CPU combines the spte's PAT type with the "
                     "MTRRs (and on NPT with the guest's PAT); kvmtrace shows the spte's part")
    return Model(rec, ops, slots, f, prefetch, inv, exits, errors, verdicts, ranges, notes)


def _errors(ops, ex, f, slots, vcpus) -> pd.DataFrame:
    rows = []
    for r in ops[ops["ret"] < 0].itertuples(index=False):
        rows.append({"ts": int(r.ts), "pid": int(r.pid), "vm_fd": int(r.vm_fd), "what": r.ioctl_name,
                     "slot": int(r.slot_id), "errno": r.errno, "detail": r.reason})
    if "verdict" in f:
        for r in f[f["verdict"] == "rejected"].itertuples(index=False):
            rows.append({"ts": int(r.ts), "pid": int(r.pid), "vm_fd": int(r.vm_fd),
                         "what": f"{r.access} fault at IPA {int(r.gfn) * 4096:#x}",
                         "slot": int(slots.loc[r.slot_row, "slot"]) if r.slot_row >= 0 else -1,
                         "errno": r.rule.rsplit("[", 1)[-1].rstrip("]"), "detail": r.rule})
    bad = ex[ex["errno"] < 0]
    if len(bad):
        bad = bad.assign(vm_fd=faults_mod.attach_vm(bad, vcpus, slots))
        for r in bad.itertuples(index=False):
            # the last fault on that thread before the failure names the page
            prior = f[(f["tid"] == r.tid) & (f["ts"] <= r.ts)]
            where = ""
            if len(prior):
                p = prior.iloc[-1]
                where = f" after a fault at gfn {int(p.gfn):#x}" + (
                    f" (slot {int(slots.loc[p.slot_row, 'slot'])})" if p.slot_row >= 0 else "")
            rows.append({"ts": int(r.ts), "pid": int(r.pid), "vm_fd": int(r.vm_fd),
                         "what": "KVM_RUN", "slot": -1,
                         "errno": memslots.errno_name(int(r.errno)),
                         "detail": f"KVM_RUN failed with {memslots.errno_name(int(r.errno))}{where}"})
    return pd.DataFrame(rows, columns=["ts", "pid", "vm_fd", "what", "slot", "errno", "detail"]) \
        .astype({"pid": "int64", "vm_fd": "int64", "slot": "int64"})


def _reason(vma_mt, vma_src, spte_mts, verdict) -> str:
    spte = "/".join(sorted(spte_mts)) or "none installed"
    base = f"host VMA {vma_mt} ({vma_src}); KVM installed {spte}"
    if verdict == "consistent":
        return base
    if verdict == "downgraded":
        return base + ": the guest gets a stricter type than the VMA (slower: loses " + (
            "caching)" if vma_mt in ("WB", "Normal", "Normal-Tagged") else "write-combining)")
    if verdict == "upgraded":
        return base + ": non-cacheable memory mapped cacheable in the guest (mismatched attributes)"
    return base


def _verdicts(slots, f, ops):
    rows = []
    fv = f[f["slot_row"] >= 0]
    groups = {k: g for k, g in fv.groupby("slot_row")}
    for i, s in slots.iterrows():
        g = groups.get(i)
        base = {"pid": s.pid, "vm_fd": s.vm_fd, "as_id": s.as_id, "slot": s.slot,
                "version": s.version, "gpa": s.gpa, "size": s["size"], "faults": 0}
        if g is None or not len(g):
            rows.append(dict(base, verdict="unknown", vma_memtype="", spte_memtype="",
                             reason="no faults observed in this slot during the recording: "
                                    "nothing was mapped, so no memory type to compare"))
            continue
        counts = g.loc[g["verdict"] != "", "verdict"].value_counts()
        if not len(counts):
            counts = pd.Series({"unknown": len(g)})
        verdict = next(v for v in VERDICT_ORDER if v in counts.index)
        worst = g[g["verdict"] == verdict].iloc[0]
        spte_mts = set(g.loc[g["spte_memtype"] != "", "spte_memtype"])
        reason = _reason(worst.vma_memtype, worst.vma_memtype_source, spte_mts, verdict)
        rules = [r for r in dict.fromkeys(g["rule"].dropna().astype(str)) if r]
        if rules:
            reason += "; kernel rule: " + " / ".join(rules)
        if verdict == "unknown" and worst.vma_memtype == "unknown":
            reason = f"host memory type not observable: {worst.vma_memtype_source}"
        if verdict == "rejected":
            reason = "KVM refused the fault: " + worst.rule
        if len(counts) > 1:
            reason += " [" + ", ".join(f"{v}: {n}" for v, n in counts.items()) + " faults]"
        rows.append(dict(base, verdict=verdict, faults=len(g),
                         vma_memtype="/".join(sorted(set(g["vma_memtype"]))),
                         spte_memtype="/".join(sorted(spte_mts)), reason=reason))
    for r in ops[ops["ret"] < 0].itertuples(index=False):
        rows.append({"pid": r.pid, "vm_fd": r.vm_fd, "as_id": r.as_id, "slot": r.slot_id,
                     "version": -1, "gpa": r.gpa, "size": r.size, "faults": 0,
                     "verdict": "rejected", "vma_memtype": "", "spte_memtype": "",
                     "reason": f"{r.ioctl_name} refused: {r.reason}"})
    cols = ["pid", "vm_fd", "as_id", "slot", "version", "gpa", "size", "faults", "verdict",
            "vma_memtype", "spte_memtype", "reason"]
    v = pd.DataFrame(rows, columns=cols).astype(
        {"pid": "int64", "vm_fd": "int64", "as_id": "int64", "slot": "int64", "version": "int64",
         "faults": "int64"})
    return v, _ranges(fv, slots)


def _ranges(fv: pd.DataFrame, slots: pd.DataFrame) -> pd.DataFrame:
    """Consecutive guest pages of one slot with the same level and memory types."""
    cols = ["slot_row", "slot", "gfn_first", "gfn_last", "pages", "size", "vma_memtype",
            "spte_memtype", "verdict"]
    if not len(fv):
        return pd.DataFrame(columns=cols)
    d = (fv.sort_values("ts").drop_duplicates(["slot_row", "gfn"], keep="last")
         .sort_values(["slot_row", "gfn"]))
    key = d[["slot_row", "size", "vma_memtype", "spte_memtype", "verdict"]]
    gfn = d["gfn"].astype("int64")
    brk = (gfn.diff() != 1) | (key != key.shift()).any(axis=1)
    d = d.assign(run=brk.cumsum())
    out = d.groupby("run").agg(slot_row=("slot_row", "first"), gfn_first=("gfn", "min"),
                               gfn_last=("gfn", "max"), pages=("gfn", "size"),
                               size=("size", "first"), vma_memtype=("vma_memtype", "first"),
                               spte_memtype=("spte_memtype", "first"),
                               verdict=("verdict", "first")).reset_index(drop=True)
    out["slot"] = slots.loc[out["slot_row"], "slot"].to_numpy()
    return out[cols]
