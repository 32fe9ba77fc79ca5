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

import errno as errno_mod
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import kvmapi
from ..memtype import CACHED, RANK
from ..memtype import x86 as x86mt
from ..recording.reader import Recording, read
from . import faults as faults_mod
from . import faultstats, windows
from . import identity, loss, memslots, pages, qemu, schema, stage2, vmas as vmas_mod

EXIT_REASONS = kvmapi.EXIT_REASONS
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
    lost: pd.DataFrame        # per event kind: events, lost (see loss.py)
    lost_where: pd.DataFrame  # per process, kind and 2 MiB region
    skipped: dict  # program -> runs the kernel skipped (loss.skipped)
    fault_stats: faultstats.FaultStats  # what the summaries read of the faults
    notes: list[str] = field(default_factory=list)
    # events per raw table as read (build(keep_raw=False) empties the fault tables)
    event_counts: dict[str, int] = field(default_factory=dict)

    @property
    def meta(self) -> dict:
        return self.recording.meta


def _x86_context(meta: dict):
    x = meta.get("x86") or {}
    pat = (x.get("pat") or {}).get("entries") or list(x86mt.LINUX_PAT)
    return pat, x.get("pat_memtype_list"), x.get("ram")


def _vma_memtypes(f: pd.DataFrame, slots: pd.DataFrame, meta: dict):
    """(memtype, source) of the host side for each fault (x86 rules, see vmas.py), as
    categoricals: decided per slot version, then taken by each fault's slot_row;
    only a VM_PFNMAP slot's faults are looked up per frame."""
    n = len(f)
    row = f["slot_row"].to_numpy()
    ns = len(slots)
    # per slot version, and a last entry for "outside every slot" (slot_row -1)
    mt = np.full(ns + 1, "unknown", dtype=object)
    src = np.full(ns + 1, "the fault is outside every recorded memslot", dtype=object)
    pm_slot = np.zeros(ns + 1, bool)
    if ns:
        observed = slots["vma_count"].to_numpy() > 0
        pfnmap = slots["pfnmap"].to_numpy().astype(bool)
        pg = slots["pgprot_memtype"].to_numpy(dtype=object)
        pgprot = pd.notna(pg)  # vm_page_prot captured at the ioctl: decoded (vmas.py)
        smt, ssrc = np.full(ns, "unknown", dtype=object), np.full(ns, None, dtype=object)
        smt[pgprot] = pg[pgprot]
        ssrc[pgprot] = slots["pgprot_memtype_source"].to_numpy(dtype=object)[pgprot]
        ssrc[~observed] = slots["vma_source"].to_numpy(dtype=object)[~observed]
        observed &= ~pgprot
        ordinary = observed & ~pfnmap
        smt[ordinary] = "WB"
        ssrc[ordinary] = "ordinary memory mapping (struct pages, default pgprot): write-back"
        # a slot none of these cases decides keeps "unknown" and the outside source,
        # as each of its faults did before (the per-fault rules, per slot)
        undecided = ~(pgprot | ~(slots["vma_count"].to_numpy() > 0) | ordinary)
        ssrc[undecided] = src[0]
        mt[:ns], src[:ns] = smt, ssrc
        pm_slot[:ns] = observed & pfnmap
    mcodes, mvals = pd.factorize(mt, use_na_sentinel=True)
    scodes, svals = pd.factorize(src, use_na_sentinel=True)
    mcodes, scodes = mcodes[row], scodes[row]  # row -1: the last entry
    pm = pm_slot[row] if n else np.zeros(0, bool)
    if pm.any():
        _, pat_list, ram = _x86_context(meta)
        t, s = x86mt.pfn_memtype(f.loc[pm, "pfn"].to_numpy(dtype="uint64", na_value=0),
                                 pat_list, ram, pages.page_size(meta))
        tc, tv = pd.factorize(np.asarray(t, dtype=object))
        sc, sv = pd.factorize(np.asarray(s, dtype=object))
        mcodes[pm] = tc + len(mvals)
        scodes[pm] = sc + len(svals)
        mvals = np.concatenate([np.asarray(mvals, dtype=object), np.asarray(tv, dtype=object)])
        svals = np.concatenate([np.asarray(svals, dtype=object),
                                ("VM_PFNMAP VMA: " + pd.Series(sv, dtype=object)).to_numpy()])
    return schema.categorical(mvals, mcodes), schema.categorical(svals, scodes)


def _verdict_codes(vma_mt: pd.Categorical, spte_mt: pd.Categorical, combines=None,
                   mmu: str = "") -> pd.Categorical:
    """compare_memtypes over each pair of distinct values, taken by index. x86:
    where ``combines`` (per fault) says the CPU combines the guest's PAT with
    the spte's type (NPT, EPT without IPAT), x86mt.combined_verdicts."""
    vc, sc = np.asarray(vma_mt.codes, np.int64), np.asarray(spte_mt.codes, np.int64)
    vcat = list(vma_mt.categories) + [None]
    scat = list(spte_mt.categories) + [None]
    grid_v = np.repeat(np.array(vcat, dtype=object), len(scat))
    grid_s = np.tile(np.array(scat, dtype=object), len(vcat))
    out = compare_memtypes(grid_v, grid_s)
    idx = vc * len(scat) + sc
    if combines is not None:
        both = x86mt.combined_verdicts(grid_v, grid_s, np.ones(len(out), bool), out, mmu)
        out = np.concatenate([out, both])
        idx = idx + len(grid_v) * np.asarray(combines, bool)
    codes, vals = pd.factorize(out)
    return schema.categorical(vals, codes[idx])


def _x86_rules(f: pd.DataFrame, mmu: str, pat, mtrr: list | None = None, page: int = 4096):
    """(rule, combines) per fault: the kernel rule behind its spte's memory type
    (x86mt.kvm_rules) as a categorical, and whether the CPU combines the guest's
    PAT with it. Decided once per distinct memory-type bits of the sptes.
    ``mtrr``: the host's variable MTRRs (meta x86.mtrr), where recorded: under
    NPT and shadow paging the CPU combines the entry's type with the MTRR of
    the frame, so each rule says what the MTRRs give that fault's frame (EPT's
    memory type takes the MTRRs' place)."""
    has = f["spte"].notna().to_numpy(dtype=bool)
    rule = np.zeros(len(f), np.int64)  # code 0: "" (nothing installed)
    combines = np.zeros(len(f), bool)
    vals = [""]
    if has.any():
        spte = f.loc[has, "spte"].astype("uint64").to_numpy()
        level = f.loc[has, "level"].to_numpy(dtype=np.int64)
        inv, first = faults_mod.distinct_sptes(spte, level)
        rules = x86mt.kvm_rules(spte[first], level[first], mmu, pat)
        rc, rv = pd.factorize(rules)
        rule[has] = rc[inv] + 1
        vals += list(rv)
        combines[has] = x86mt.guest_pat_combines(spte, mmu)
        if mtrr is not None and mmu != "ept" and "pfn" in f:
            frame = x86mt.mtrr_of_frames(f.loc[has, "pfn"].to_numpy(dtype="uint64", na_value=0),
                                         mtrr, page)
            fc, fv = pd.factorize(frame)
            pair = np.unique(rule[has] * len(fv) + fc)
            # each frame's words begin with MTRR_SEP[2:]: rule + "; " + words splits at MTRR_SEP
            texts = [f"{vals[int(p) // len(fv)]}; {fv[int(p) % len(fv)]}" for p in pair]
            rule[has] = np.searchsorted(pair, rule[has] * len(fv) + fc) + 1
            vals = [""] + texts
    return schema.categorical(vals, rule), combines


def compare_memtypes(vma_mt: np.ndarray, spte_mt: np.ndarray) -> np.ndarray:
    """consistent / downgraded / upgraded / unknown, one column operation each."""
    vr = pd.Series(vma_mt, dtype=object).map(RANK).to_numpy(dtype=float)
    sr = pd.Series(spte_mt, dtype=object).map(RANK).to_numpy(dtype=float)
    known = ~np.isnan(vr) & ~np.isnan(sr)
    out = np.full(len(vma_mt), "unknown", dtype=object)
    out[known] = "consistent"
    out[known & (vr > sr)] = "downgraded"
    out[known & (vr < CACHED) & (sr == CACHED)] = "upgraded"
    return out


def _arm64_slot_types(slots, prepare_vma, kernel):
    """The VMA memory type KVM saw (kprobe on its VMA lookup), else smaps: an
    ordinary VMA (not pf / mm) has the default Normal pgprot on arm64."""
    if not len(slots):
        return slots.assign(kvm_vma_memtype=[], kvm_vm_flags=[], kvm_pgprot=[],
                            vma_memtype_arm64=[])
    slots = pd.concat([slots, stage2.slot_vma_types(slots, prepare_vma, kernel)], axis=1)
    # without the kprobe on KVM's own lookup: the VMA captured at the ioctl (vmas.py)
    bpf = slots["kvm_vma_memtype"].isna() & slots["pgprot_memtype"].notna()
    if bpf.any():
        slots.loc[bpf, "kvm_vma_memtype"] = slots.loc[bpf, "pgprot_memtype"]
        for kvm_col, col in (("kvm_vm_flags", "vm_flags"), ("kvm_pgprot", "vm_page_prot")):
            slots[kvm_col] = slots[kvm_col].astype("UInt64")  # u64 exact, null where unknown
            slots.loc[bpf, kvm_col] = slots.loc[bpf, col].astype("UInt64")
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


# the raw tables pairing reads and nothing after it (x86): build(keep_raw=False) lets them go
FAULT_EVENT_TABLES = ("spte_requested", "set_spte", "pt_walk", "page_fault", "tdp_spte_changed",
                      "fault_handler")


def _snapshot_notes(notes: pd.DataFrame) -> list[str]:
    """What the report must say when record could not read the memslots a
    VMM had before recording began (collectors/session.py notes)."""
    out = []
    for v in notes.loc[notes["key"] == "memslot_snapshot_unavailable", "value"]:
        try:
            d = json.loads(v)
            pid, why = int(d["pid"]), str(d["reason"])
        except (ValueError, KeyError, TypeError):
            continue
        out.append(f"the memslots VMM {pid} had before recording began could not be read "
                   f"({why}): they are known only from ioctls made while recording, and "
                   "faults in the others are counted outside every recorded memslot")
    return out


def build(path_or_recording, keep_raw: bool = True, lean: bool = False) -> Model:
    """The model of a recording. ``keep_raw=False``: the raw x86 fault events
    are emptied from ``model.recording`` once paired, to bound memory; their
    counts stay in ``event_counts``. ``lean=True`` (kvmtrace report's text,
    JSON, CSV and TSV summaries): the x86 fault events are read and paired
    window by window (windows.py) into ``fault_stats``, and ``faults`` is
    left empty: memory is bounded by the window, not the recording."""
    if isinstance(path_or_recording, Recording):
        rec = path_or_recording
    else:
        rec = read(path_or_recording, defer=FAULT_EVENT_TABLES if lean else ())
    t, meta = rec.tables, rec.meta
    event_counts = {k: len(v) for k, v in t.items()}
    event_counts.update(rec.deferred)
    kvm = meta.get("kvm") or {}
    spte_format = kvm.get("spte_format", "legacy")
    pat, _, _ = _x86_context(meta)

    exits_ = t["proc_exit"]
    page = pages.page_size(meta)
    arm = stage2.has_stage2(t)
    ops, slots, vm_ioctl, snap, recovered_notes = memslots.history(t, meta, page)
    sv = vmas_mod.slot_vmas(slots, t["vmas"], t["memslot"], meta, t["notes"], snap)
    slots = pd.concat([slots, sv.drop(columns="slot_row")], axis=1) if len(slots) else \
        schema.SLOTS.empty().drop(columns=[c.name for c in schema.SLOTS.columns if c.optional])
    if len(slots) and len(t.get("qmp_mtree", ())):  # QEMU's names (record --qmp)
        slots = pd.concat([slots, qemu.slot_regions(slots, t["qmp_mtree"], page)], axis=1)

    vcpus = memslots.vcpu_to_vm(vm_ioctl)
    ex = t["userspace_exit"].copy()
    ex["proc"] = identity.generations(ex, exits_)
    ex["reason_name"] = ex["reason"].map(EXIT_REASONS).fillna(ex["reason"].astype(str))
    failures = ex.loc[failed_runs(ex), ["tid", "ts"]].reset_index(drop=True)
    ctx = _FaultContext(meta, kvm, spte_format, pat, page, exits_, vcpus, arm)
    if arm:
        ops["reason"] = stage2.memslot_reasons(ops, t, meta)
        slots = _arm64_slot_types(slots, t["prepare_vma"], meta.get("kernel"))
    if arm:
        f, prefetch = stage2.pair(t, meta)
    elif rec.deferred:  # lean: window by window, nothing per fault kept
        f, prefetch, stats = _windowed(rec, ctx, slots, failures)
    elif keep_raw:
        f, prefetch = faults_mod.pair(t, spte_format)
    else:  # the raw fault events leave the recording, and pairing lets go of each in turn
        ev = {k: t[k] for k in FAULT_EVENT_TABLES if k in t}
        for k in ev:
            t[k] = t[k].iloc[:0]
        f, prefetch = faults_mod.pair(ev, spte_format, consume=True)
        del ev
    if arm or not rec.deferred:
        f = _fault_columns(f, ctx, slots)
        stats = faultstats.of_faults(f, failures)
    notes = (list(rec.problems) + _snapshot_notes(t["notes"]) + qemu.notes(t["notes"])
             + recovered_notes)

    prefetch = prefetch.reset_index(drop=True)
    prefetch["proc"] = identity.generations(prefetch, exits_)
    prefetch["vm_fd"] = faults_mod.attach_vm(prefetch, vcpus, slots)
    prefetch["slot_row"] = faults_mod.attribute(prefetch, slots, "gfn")

    inv = t["unmap_hva_range"].rename(columns={"start": "hva_start", "end": "hva_end"})
    inv["proc"] = identity.generations(inv, exits_)
    inv["vm_fd"] = faults_mod.attach_vm(inv, vcpus, slots)
    inv["hva"] = inv["hva_start"]
    inv["slot_row"] = faults_mod.attribute(inv, slots, "hva")

    exits = t["mmio"].rename(columns={"len": "len_bytes"})
    exits["proc"] = identity.generations(exits, exits_)
    exits["vm_fd"] = faults_mod.attach_vm(exits, vcpus, slots)
    exits["gfn"] = exits["gpa"] // page
    exits["slot_row"] = faults_mod.attribute(exits, slots, "gfn")

    errors = _errors(ops, ex, failures, stats, slots, vcpus, page)
    lost_kinds = loss.per_kind(rec)
    lost_where = loss.where(rec, exits_)
    slot_lost = loss.per_slot(lost_where, slots)
    unplaced = loss.unplaced(lost_kinds, lost_where)
    prefetch["request_lost"] = loss.request_lost(prefetch, lost_where)
    recorded = set((meta.get("probes") or {}).get("events") or [])
    # the event that carries this MMU's installs: stage-2 maps, legacy sptes, TDP sptes
    install = {"s2_map"} if arm else {"set_spte"} if spte_format == "legacy" else \
        {"tdp_spte_changed", "set_spte"}
    installs_recorded = bool(recorded & install) or not recorded
    verdicts, ranges = _verdicts(slots, stats, ops, slot_lost, unplaced, installs_recorded)
    notes += _loss_notes(lost_kinds, unplaced)
    skips = loss.skipped(rec)
    if skips:
        notes.append(loss.skipped_note(skips))
    if spte_format == "legacy" and kvm.get("vendor") in ("amd", "intel"):
        notes.append("legacy-format sptes: the CPU combines the spte's PAT type with the "
                     "MTRRs (and on NPT with the guest's PAT); kvmtrace shows the spte's part")
    S = schema
    return Model(rec, S.OPS.conform(ops), S.SLOTS.conform(slots),
                 S.FAULTS.conform(f, drop=faults_mod.WORKING_COLUMNS),
                 S.PREFETCH.conform(prefetch, drop=PREFETCH_WORKING),
                 S.INVALIDATIONS.conform(inv, drop=("vcpu_fd", "cpu", "hva")),
                 S.EXITS.conform(exits, drop=("cpu",)), S.ERRORS.conform(errors),
                 S.VERDICTS.conform(verdicts), S.RANGES.conform(ranges),
                 S.LOST.conform(lost_kinds), S.LOST_WHERE.conform(lost_where), skips, stats,
                 notes,
                 event_counts)


@dataclass
class _FaultContext:
    """What deriving the per-fault columns needs besides the faults and slots."""
    meta: dict
    kvm: dict
    spte_format: str
    pat: list
    page: int
    exits: pd.DataFrame
    vcpus: pd.DataFrame
    arm: bool


def _windowed(rec: Recording, ctx: _FaultContext, slots: pd.DataFrame,
              failures: pd.DataFrame):
    """(empty faults, prefetch, FaultStats) from the deferred x86 fault events,
    paired window by window (windows.py) and aggregated (faultstats.py)."""
    empty = {k: rec.tables[k] for k in FAULT_EVENT_TABLES}
    w = windows.Windows(ctx.spte_format, rec.deferred, empty)
    parts, prefetch = [], []

    def take(done):
        for f, p in done:
            parts.append(faultstats.of_faults(_fault_columns(f, ctx, slots), failures))
            prefetch.append(p)

    for batch in rec.stream(windows.stream_columns()):
        take(w.add(batch))
    take(w.finish())
    stats = faultstats.merge(parts) if parts else \
        faultstats.of_faults(_fault_columns(schema.FAULTS.empty(), ctx, slots), failures)
    pf = pd.concat(prefetch, ignore_index=True) if prefetch else empty["set_spte"]
    return schema.FAULTS.empty(), pf, stats


def _fault_columns(f: pd.DataFrame, ctx: _FaultContext, slots: pd.DataFrame) -> pd.DataFrame:
    """The per-fault columns derived from paired faults: process generation,
    VM, slot, both memory types, the kernel rule and the verdict. Each row on
    its own (a window of faults gives the rows the whole would)."""
    f["proc"] = identity.generations(f, ctx.exits)
    f["vm_fd"] = faults_mod.attach_vm(f, ctx.vcpus, slots)
    f["slot_row"] = faults_mod.attribute(f, slots, "gfn")
    kvm, meta = ctx.kvm, ctx.meta
    if ctx.arm:
        f["spte_memtype"] = stage2.spte_memtypes(f, meta)
        f["vma_memtype"], f["vma_memtype_source"] = _arm64_vma_memtypes(f, slots)
        f["expected_memtype"], f["rule"] = stage2.expected(f, slots, meta)
    else:
        f["spte_memtype"] = faults_mod.spte_memtypes(f, ctx.spte_format, ctx.pat)
        f["vma_memtype"], f["vma_memtype_source"] = _vma_memtypes(f, slots, meta)
        f["expected_memtype"] = schema.categorical([], np.full(len(f), -1))
        f["rule"], combines = _x86_rules(f, x86mt.mmu_kind(kvm), ctx.pat,
                                         (meta.get("x86") or {}).get("mtrr"), ctx.page)
    # per-fault text as categoricals: every rule below runs once per distinct value
    for c in ("spte_memtype", "vma_memtype", "vma_memtype_source", "expected_memtype",
              "rule", "access", "start_kind"):
        if not isinstance(f[c].dtype, pd.CategoricalDtype):
            f[c] = schema.categorical(f[c].to_numpy(dtype=object))
    verdict = _verdict_codes(f["vma_memtype"].array, f["spte_memtype"].array,
                             None if ctx.arm else combines, x86mt.mmu_kind(kvm))
    vcodes = np.asarray(verdict.codes, np.int64)
    vals = list(verdict.categories) + ["", "rejected"]
    scats = f["spte_memtype"].cat.categories
    none = np.isin(f["spte_memtype"].cat.codes.to_numpy(), np.flatnonzero(scats == ""))
    rcats = f["rule"].cat.categories
    refused_rule = np.flatnonzero(pd.Series(rcats, dtype=object).astype(str)
                                  .str.contains(r"\[E").to_numpy(dtype=bool))
    refused = none & np.isin(f["rule"].cat.codes.to_numpy(), refused_rule)
    # nothing installed and nothing refused: a retried or spurious fault (e.g. a
    # COW break makes 7.x retry); it says nothing about memory types
    vcodes[none] = len(vals) - 2
    vcodes[refused] = len(vals) - 1
    f["verdict"] = schema.categorical(vals, vcodes)
    f["mapping_size_bytes"] = pages.mapping_bytes(f["level"], ctx.page)
    f["slot"] = pd.array(np.where(f["slot_row"] >= 0, slots["slot"].to_numpy()[
        f["slot_row"].clip(lower=0)] if len(slots) else -1, -1), dtype="Int64")
    f.loc[f["slot_row"] < 0, "slot"] = pd.NA
    return f


# working columns of the install tables that are not part of the prefetch table
PREFETCH_WORKING = ("cpu", "r", "x", "u", "prot", "ret", "install_row", "fault_id")


def _loss_notes(kinds: pd.DataFrame, unplaced: int) -> list[str]:
    out = []
    lost = kinds[kinds["lost"] > 0]
    if len(lost):
        out.append("events lost (ring buffer full): " + ", ".join(
            f"{r.kind} {r.lost:,} of {r.events + r.lost:,}" for r in lost.itertuples()))
    if int(kinds.loc[kinds["kind"] == "memslot", "lost"].sum()):
        out.append("memslot ioctls were lost: the memslot table is incomplete")
    if unplaced:
        out.append(f"{unplaced:,} lost fault events cannot be placed in a slot")
    starts = kinds[kinds["kind"].isin(["pt_walk", "page_fault", "fault_handler"])
                   & (kinds["lost"] > 0)]
    if len(starts):
        out.append("fault starts were lost: some faults have no access kind or service time")
    return out


def failed_runs(ex: pd.DataFrame) -> pd.Series:
    """The KVM_RUN calls that failed. Not EINTR: KVM returns it when a signal
    is pending (KVM_EXIT_INTR), which is how VMMs kick a vCPU out of the guest
    to pause it, run work on it or stop it (QEMU's SIG_IPI): every QEMU run
    has some, and none is a fault."""
    return (ex["errno"] < 0) & (ex["errno"] != -errno_mod.EINTR)


def _errors(ops, ex, failures, stats: faultstats.FaultStats, slots, vcpus,
            page: int) -> pd.DataFrame:
    rows = []
    for r in ops[ops["ret"] < 0].itertuples(index=False):
        rows.append({"ts": int(r.ts), "pid": int(r.pid), "proc": int(r.proc), "vm_fd": int(r.vm_fd), "what": r.ioctl_name,
                     "slot": int(r.slot_id), "errno": r.errno, "detail": r.reason})
    for r in stats.rejected.itertuples(index=False):
        rows.append({"ts": int(r.ts), "pid": int(r.pid), "proc": int(r.proc), "vm_fd": int(r.vm_fd),
                     "what": f"{r.access} fault at IPA {int(r.gfn) * page:#x}",
                     "slot": int(slots.loc[r.slot_row, "slot"]) if r.slot_row >= 0 else None,
                     "errno": r.rule.rsplit("[", 1)[-1].rstrip("]"), "detail": r.rule})
    bad = ex[failed_runs(ex)]
    if len(bad):
        bad = bad.assign(vm_fd=faults_mod.attach_vm(bad, vcpus, slots))
        # the last fault on that thread before the failure names the page
        prior = {int(p.failure): p for p in stats.before_failure.itertuples(index=False)}
        for i, r in enumerate(bad.itertuples(index=False)):
            p = prior.get(i)
            where = "" if p is None else f" after a fault at gfn {int(p.gfn):#x}" + (
                f" (slot {int(slots.loc[p.slot_row, 'slot'])})" if p.slot_row >= 0 else "")
            rows.append({"ts": int(r.ts), "pid": int(r.pid), "proc": int(r.proc), "vm_fd": int(r.vm_fd),
                         "what": "KVM_RUN", "slot": None,
                         "errno": kvmapi.ret_errno(int(r.errno)),
                         "detail": f"KVM_RUN failed with {kvmapi.ret_errno(int(r.errno))}{where}"})
    return schema.ERRORS.conform(pd.DataFrame(rows, columns=schema.ERRORS.names, dtype=object))


def _reason(vma_mt, vma_src, spte_mts, verdict, rules=()) -> str:
    spte = "/".join(sorted(spte_mts)) or "none installed"
    base = f"host VMA {vma_mt} ({vma_src}); {x86mt.installed_words(spte, rules)}"
    if verdict == "consistent":
        return base
    if verdict == "downgraded":
        return base + ": the guest gets a stricter type than the VMA (slower: loses " + (
            "caching)" if vma_mt in ("WB", "Normal", "Normal-Tagged") else "write-combining)")
    if verdict == "upgraded":
        return base + ": non-cacheable memory mapped cacheable in the guest (mismatched attributes)"
    return base


def _no_install_reason(n: int, lost: int, installs_recorded: bool) -> str:
    why = (f"{lost} fault events of this slot were lost (ring buffer full)" if lost else
           "the install tracepoints (kvm_mmu_set_spte / kvm_tdp_mmu_spte_changed / "
           "kvm_pgtable_stage2_map) were not recorded" if not installs_recorded else
           "KVM retried them or found them spurious (nothing was installed)")
    return f"{n} faults seen but no installed entry for them: {why}"


def _slot_verdict(g: dict | None, lost: int, installs_recorded: bool):
    """(verdict, vma_memtype, spte_memtype, reason) of one slot version's faults,
    from their grouped counts (``_fault_groups``): never a loop over faults."""
    if g is None or not g["n"]:
        if lost:
            return ("unknown", "", "", f"unknown: {lost} events lost in this slot (ring buffer "
                    "full); none of its faults was seen, so no memory type to compare")
        return ("unknown", "", "", "no faults observed in this slot during the recording: "
                "nothing was mapped, so no memory type to compare")
    counts = g["counts"]  # verdict -> faults, as value_counts orders them
    spte_mts = g["spte_mts"]
    vma_mts = "/".join(sorted(g["vma_mts"]))
    n = g["n"]
    if not len(counts):
        return "unknown", vma_mts, "", _no_install_reason(n, lost, installs_recorded)
    verdict = next(v for v in VERDICT_ORDER if v in counts.index)
    worst = g["first"][verdict]  # the slot's first fault with that verdict
    rules = [r for r in g["rules"] if r]
    reason = _reason(worst["vma_memtype"], worst["vma_memtype_source"], spte_mts, verdict, rules)
    if rules:  # the frames' MTRRs are said once, by _reason
        reason += "; kernel rule: " + " / ".join(
            dict.fromkeys(str(r).split(x86mt.MTRR_SEP, 1)[0] for r in rules))
    if verdict == "unknown" and worst["vma_memtype"] == "unknown":
        reason = f"host memory type not observable: {worst['vma_memtype_source']}"
    if verdict == "rejected":
        reason = "KVM refused the fault: " + worst["rule"]
    if len(counts) > 1:
        reason += " [" + ", ".join(f"{v}: {n}" for v, n in counts.items()) + " faults]"
    # A mismatch or a refusal seen stays a fact however many events were lost;
    # "consistent" is only a verdict on what was seen, so loss makes it unknown.
    if lost and verdict in ("consistent", "unknown"):
        verdict = "unknown"
        reason = (f"unknown: {lost} events lost in this slot (ring buffer full); the "
                  f"{n} faults seen say: {reason}")
    return verdict, vma_mts, "/".join(sorted(spte_mts)), reason


def _fault_groups(classes: pd.DataFrame) -> dict[int, dict]:
    """Per slot_row: what _slot_verdict needs of its faults, from the counted
    classes of faults (faultstats.py), first appearance kept."""
    c = classes[classes["slot_row"] >= 0].sort_values(["first_ts", "first_order"],
                                                      kind="stable")
    out: dict[int, dict] = {}
    for r, g in c.groupby("slot_row", sort=True):  # slot versions: few
        first = {}
        per = g.groupby("verdict", sort=False, dropna=False)
        for v, h in per:
            h0 = h.iloc[0]
            first[v] = {"vma_memtype": h0["vma_memtype"],
                        "vma_memtype_source": h0["vma_memtype_source"], "rule": h0["rule"]}
        counts = per["faults"].sum()
        counts = counts[counts.index.notna() & (counts.index != "")]
        rules = [x for x in pd.unique(g["rule"].to_numpy(dtype=object)) if x is not None]
        spte = g["spte_memtype"].to_numpy(dtype=object)
        out[int(r)] = {
            "n": int(g["faults"].sum()),
            # value_counts' order: by count, largest first; first appearance among equals
            "counts": counts.astype("int64").sort_values(ascending=False, kind="stable"),
            "spte_mts": {x for x in spte if x is not None and x != ""},
            "vma_mts": set(g["vma_memtype"].to_numpy(dtype=object)),
            "rules": rules, "first": first}
    return out


def _verdicts(slots, stats: faultstats.FaultStats, ops, slot_lost, unplaced_lost: int,
              installs_recorded: bool):
    rows = []
    groups = _fault_groups(stats.classes)
    for i, s in enumerate(slots.itertuples(index=False)):
        g = groups.get(i)
        verdict, vma_mt, spte_mt, reason = _slot_verdict(g, int(slot_lost[i]),
                                                         installs_recorded)
        if unplaced_lost and verdict in ("consistent", "unknown") and not slot_lost[i]:
            verdict = "unknown"
            reason += (f" (and {unplaced_lost} fault events were lost that cannot be placed "
                       "in a slot, so this slot's picture may be incomplete)")
        rows.append({"pid": s.pid, "proc": s.proc, "vm_fd": s.vm_fd, "as_id": s.as_id,
                     "slot": s.slot, "version": s.version, "gpa": s.gpa,
                     "size_bytes": s.size_bytes,
                     "faults": 0 if g is None else g["n"], "lost": int(slot_lost[i]),
                     "verdict": verdict, "vma_memtype": vma_mt, "spte_memtype": spte_mt,
                     "reason": reason})
    for r in ops[ops["ret"] < 0].itertuples(index=False):
        rows.append({"pid": r.pid, "proc": r.proc, "vm_fd": r.vm_fd, "as_id": r.as_id,
                     "slot": r.slot_id, "version": -1, "gpa": r.gpa,
                     "size_bytes": r.size_bytes,
                     "faults": 0, "lost": 0, "verdict": "rejected", "vma_memtype": "",
                     "spte_memtype": "", "reason": f"{r.ioctl_name} refused: {r.reason}"})
    v = schema.VERDICTS.conform(pd.DataFrame(rows, columns=schema.VERDICTS.names, dtype=object))
    return v, _ranges(stats.pages, slots)


def _ranges(fv: pd.DataFrame, slots: pd.DataFrame) -> pd.DataFrame:
    """Consecutive guest pages of one slot with the same level and memory types,
    from each page's last fault (faultstats.FaultStats.pages)."""
    if not len(fv):
        return schema.RANGES.empty()
    d = fv.sort_values(["slot_row", "gfn"])  # one row per page: its last fault
    key = [d["slot_row"].to_numpy(dtype=np.int64),
           d["mapping_size_bytes"].fillna(0).to_numpy(dtype=np.uint64)]
    key += [np.asarray(d[c].array.codes) for c in ("vma_memtype", "spte_memtype", "verdict")]
    gfn = d["gfn"].to_numpy(dtype=np.int64)
    brk = np.ones(len(d), dtype=bool)
    brk[1:] = (np.diff(gfn) != 1) | np.logical_or.reduce([k[1:] != k[:-1] for k in key])
    d = d.assign(run=brk.cumsum())
    out = d.groupby("run").agg(slot_row=("slot_row", "first"), gfn_first=("gfn", "min"),
                               gfn_last=("gfn", "max"), pages=("gfn", "size"),
                               mapping_size_bytes=("mapping_size_bytes", "first"),
                               vma_memtype=("vma_memtype", "first"),
                               spte_memtype=("spte_memtype", "first"),
                               verdict=("verdict", "first")).reset_index(drop=True)
    out["slot"] = slots.loc[out["slot_row"], "slot"].to_numpy()
    return out[schema.RANGES.names]
