"""Regression analysis between two recordings of the same workload.

Slots are matched by what the guest sees, (address space, GPA, size), not by
slot id: two VMMs (or two runs) may number slots differently. A matched slot
whose backing or flags differ keeps its match, and the difference is named as
the likely cause of what changed. Several VMs with the same layout pool
their faults per slot.

Per slot the metrics are fault count, distinct pages faulted, mapping levels
(share of 2M / 1G), installed memory types, invalidations, MMIO exits and the
fault service time distribution (kvmtrace.analysis.stats for the effect
sizes). A metric is a regression when it moves past its threshold in the bad
direction; service time only when the whole 95% interval of the median ratio
is past it.

Everything a program needs is data: each finding names its slot by address
space, GPA, size and slot ids (``findings_table``, schema.DIFF_FINDINGS), its
values before and after, and the likely causes (each a dict with a
``message``); the prose of a finding is its ``message``, and ``label`` makes
the human name of its slot for the text views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import kvmapi
from ..memtype import CACHEABLE
from . import hostload, pages, schema, stats
from .model import Model

KEY = ["as_id", "gpa", "size_bytes"]  # a slot as the guest sees it
PROFILE_DTYPES = {"as_id": "int64", "gpa": "uint64", "size_bytes": "uint64", "faults": "Int64",
                  "pages": "Int64", "invalidations": "Int64", "mmio_exits": "Int64",
                  "huge_share": "float64", "cacheable_share": "float64"}

DEFAULT_THRESHOLDS = {
    "latency": 0.25,        # median service time ratio - 1; CI low must exceed it
    "faults": 0.10,         # relative increase in faults
    "levels": 0.10,         # absolute drop in the share of 2M/1G mappings
    "memtype": 0.01,        # absolute drop in the share of cacheable mappings
    "invalidations": 0.25,  # relative increase
    "exits": 0.25,          # relative increase in MMIO exits
}
MIN_COUNT_CHANGE = 8        # ignore count changes smaller than this (noise, tiny slots)
MIN_SAMPLES = 20            # service-time comparison needs this many faults per side
METRICS = ("latency", "faults", "levels", "memtype", "invalidations", "exits", "errors",
           "backing")


def backing_class(vma: str, vmflags: str, anonhuge_kb: int = 0) -> str:
    """A short name for what backs a slot, for matching and for causes."""
    flags = (vmflags or "").split()
    thp = " (THP)" if anonhuge_kb else " (THP advised)" if "hg" in flags else ""
    if "pf" in flags:
        return f"PFNMAP {vma}"
    if "mm" in flags:
        return f"MIXEDMAP {vma}"
    if "ht" in flags:
        return "hugetlb"
    if vma.startswith("memfd:"):
        return "memfd"
    if vma == "[anon]":
        return "anon (no THP)" if "nh" in flags else "anon" + thp
    if vma.startswith("/dev/zero"):
        return "shared anon"
    if vma.startswith("/"):
        return "file"
    return vma


def slot_profile(model: Model) -> pd.DataFrame:
    """One row per (as_id, gpa, size) with the slot's activity, all VMs pooled."""
    s = model.slots.copy()
    if not len(s):
        return pd.DataFrame(columns=KEY + ["slot", "backing", "flags", "dirty_logging",
                                           "faults", "pages",
                                           "huge_share", "cacheable_share", "memtypes",
                                           "invalidations", "mmio_exits", "service_ns",
                                           "levels"]).astype(PROFILE_DTYPES)
    s["slot_row"] = np.arange(len(s))
    s["backing"] = [backing_class(v, f, h) for v, f, h in
                    zip(s["vma"], s["vmflags"], s["anonhuge_kb"].fillna(0))]
    keys = s[["slot_row"] + KEY]

    def in_slots(df, cols=()):
        return df.loc[df["slot_row"] >= 0, ["slot_row", *cols]].merge(keys, on="slot_row")

    f = in_slots(model.faults, ("gfn", "level", "mapping_size_bytes", "spte_memtype",
                                "service_ns"))
    inv = in_slots(model.invalidations)
    ex = in_slots(model.exits)
    rows = []
    fg = {k: g for k, g in f.groupby(KEY)} if len(f) else {}
    ig = inv.groupby(KEY).size().to_dict() if len(inv) else {}
    eg = ex.groupby(KEY).size().to_dict() if len(ex) else {}
    for key, g in s.groupby(KEY):
        faults = fg.get(key, f.iloc[0:0])
        n = len(faults)
        mts = faults["spte_memtype"].astype(object)  # text: value_counts as for any column
        mts = mts[mts != ""]
        cache = mts.map(CACHEABLE).fillna(False).to_numpy(dtype=bool)
        rows.append({
            **dict(zip(KEY, key)),
            "slot": sorted({int(x) for x in g["slot"]}),
            "backing": "/".join(dict.fromkeys(g["backing"])),
            "flags": list(dict.fromkeys(g["flag_names"])),
            "dirty_logging": bool((g["flags"] & kvmapi.KVM_MEM_LOG_DIRTY_PAGES).any()),
            "faults": n,
            "pages": faults["gfn"].nunique() if n else 0,
            "huge_share": float((faults["level"] > 1).mean()) if n else np.nan,
            "levels": _level_counts(faults["mapping_size_bytes"]) if n else {},
            "cacheable_share": float(cache.mean()) if len(cache) else np.nan,
            "memtypes": mts.value_counts(normalize=True).round(4).to_dict(),
            "invalidations": ig.get(key, 0),
            "mmio_exits": eg.get(key, 0),
            "service_ns": faults["service_ns"].to_numpy(dtype=float, na_value=np.nan),
        })
    return pd.DataFrame(rows).astype(PROFILE_DTYPES)


def _level_counts(sizes: pd.Series) -> dict:
    """{'4K': n, '2M': m}: faults per mapping size (analysis/pages.py names)."""
    return {pages.size_name(int(k)): int(n) for k, n in sizes.dropna().value_counts().items()}


@dataclass
class Finding:
    """One change diff found. The slot it is about is data (``as_id``, ``gpa``,
    ``size_bytes``, the slot ids on each side; all None for a finding about
    every slot); ``base`` / ``new`` are the metric's values; ``message`` is the
    change in words for people; ``causes`` the slot's likely causes."""
    metric: str
    base: object
    new: object
    message: str
    regression: bool
    detail: dict = field(default_factory=dict)
    as_id: int | None = None
    gpa: int | None = None
    size_bytes: int | None = None
    slot_base: list[int] | None = None
    slot_new: list[int] | None = None
    causes: list[dict] = field(default_factory=list)

    @property
    def key(self) -> tuple | None:
        """(as_id, gpa, size_bytes): the slot as the guest sees it; None for all slots."""
        return None if self.as_id is None else (self.as_id, self.gpa, self.size_bytes)


@dataclass
class Comparison:
    findings: list[Finding]
    slots: pd.DataFrame          # matched slot table, side by side
    latency: pd.DataFrame        # service-time quantiles per slot / memory type / level
    totals: pd.DataFrame         # per recording and VM
    method: str
    causes: dict                 # (as_id, gpa, size_bytes) -> [cause dict, ...]
    notes: list[str] = field(default_factory=list)  # host load, loss: context to read it in

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regression]


def _ids(ids) -> str:
    return "/".join(str(x) for x in ids) if isinstance(ids, list) else ""


def label(f: Finding) -> str:
    """The human name of a finding's slot: 'slot 1 (GPA 0x1000000+256 KiB)',
    'slot 2->5 (...)' when the sides number it differently, 'all slots'."""
    if f.as_id is None:
        return "all slots"
    if f.slot_base is None or f.slot_new is None:
        return f"slot {_ids(f.slot_base or f.slot_new)} (GPA {f.gpa:#x})"
    return f"slot {_ids(f.slot_base)}" + (
        f"->{_ids(f.slot_new)}" if f.slot_new != f.slot_base else "") + \
        f" (GPA {f.gpa:#x}+{f.size_bytes // 1024} KiB)"


def findings_table(c: Comparison) -> pd.DataFrame:
    """The findings as the declared table schema.DIFF_FINDINGS."""
    names = schema.DIFF_FINDINGS.names
    rows = [{k: getattr(f, k) for k in names} for f in c.findings]
    df = pd.DataFrame(rows, columns=names, dtype=object)
    return schema.DIFF_FINDINGS.conform(df)


def _pct(a, b) -> str:
    if not a:
        return "new" if b else "0%"
    return f"{(b - a) / a * 100:+.0f}%"


def _share(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x * 100:.0f}%"


def _slot_fields(row) -> dict:
    """The Finding fields naming the slot of a merged profile row."""
    ids = {side: row[f"slot_{side}"] if isinstance(row[f"slot_{side}"], list) else None
           for side in ("base", "new")}
    return {"as_id": int(row["as_id"]), "gpa": int(row["gpa"]),
            "size_bytes": int(row["size_bytes"]), "slot_base": ids["base"],
            "slot_new": ids["new"]}


def _count_finding(where, metric, a, b, thr, name) -> Finding | None:
    if a == b:
        return None
    rel = (b - a) / a if a else np.inf
    reg = b > a and rel > thr and (b - a) >= MIN_COUNT_CHANGE
    if not reg and abs(b - a) < MIN_COUNT_CHANGE:
        return None
    return Finding(metric, a, b, f"{name} {a} -> {b} ({_pct(a, b)})", reg, **where)


def _flags(names: list) -> str:
    return " -> ".join(x or "-" for x in names)


def _causes(r) -> list[dict]:
    """The likely causes of a matched slot's changes: each {"cause", "base",
    "new", "message"}."""
    out = []

    def cause(what, base, new, message):
        out.append({"cause": what, "base": base, "new": new, "message": message})
    if r["backing_base"] != r["backing_new"]:
        cause("backing", r["backing_base"], r["backing_new"],
              f"backing {r['backing_base']} -> {r['backing_new']}")
    if r["flags_base"] != r["flags_new"]:
        db, dn = bool(r["dirty_logging_base"]), bool(r["dirty_logging_new"])
        if db != dn:
            cause("dirty_logging", db, dn, f"dirty logging turned {'on' if dn else 'off'}")
        else:
            cause("flags", r["flags_base"], r["flags_new"],
                  f"flags {_flags(r['flags_base'])} -> {_flags(r['flags_new'])}")
    same_levels = r["huge_share_base"] == r["huge_share_new"]
    if same_levels and r["pages_base"] and r["pages_new"] and r["pages_new"] != r["pages_base"]:
        # distinct guest pages faulted; only a cause when the mapping sizes are alike
        cause("pages", int(r["pages_base"]), int(r["pages_new"]),
              f"pages touched {r['pages_base']} -> {r['pages_new']} "
              f"(x{r['pages_new'] / r['pages_base']:.2g})")
    return out


def compare(base: Model, new: Model, thresholds: dict | None = None,
            metrics=METRICS) -> Comparison:
    thr = dict(DEFAULT_THRESHOLDS, **(thresholds or {}))
    pb, pn = slot_profile(base), slot_profile(new)
    m = pb.merge(pn, on=KEY, how="outer", suffixes=("_base", "_new"), indicator=True)
    findings: list[Finding] = []
    causes = {}
    for _, r in m.iterrows():
        where = _slot_fields(r)
        if r["_merge"] != "both":
            side = "BASE" if r["_merge"] == "left_only" else "NEW"
            findings.append(Finding("slots", side == "BASE", side == "NEW", f"only in {side}",
                                    False, **where))
            continue
        cause = _causes(r)
        causes[(where["as_id"], where["gpa"], where["size_bytes"])] = cause
        found: list[Finding] = []
        if "backing" in metrics and r["backing_base"] != r["backing_new"]:
            risky = r["backing_new"].startswith(("PFNMAP", "MIXEDMAP"))
            found.append(Finding("backing", r["backing_base"], r["backing_new"],
                                 f"backing {r['backing_base']} -> {r['backing_new']}", risky,
                                 **where))
        if "faults" in metrics:
            f = _count_finding(where, "faults", int(r["faults_base"]), int(r["faults_new"]),
                               thr["faults"], "faults")
            found += [f] if f else []
        if "levels" in metrics:
            hb, hn = r["huge_share_base"], r["huge_share_new"]
            if np.isfinite(hb) and np.isfinite(hn) and abs(hn - hb) > 1e-9:
                found.append(Finding("levels", hb, hn,
                                     f"2M/1G mappings {_share(hb)} -> {_share(hn)}",
                                     hb - hn > thr["levels"],
                                     {"base": r["levels_base"], "new": r["levels_new"]},
                                     **where))
        if "memtype" in metrics:
            cb, cn = r["cacheable_share_base"], r["cacheable_share_new"]
            if r["memtypes_base"] != r["memtypes_new"] and np.isfinite(cb) and np.isfinite(cn):
                found.append(Finding(
                    "memtype", r["memtypes_base"], r["memtypes_new"],
                    f"memory types {_mix(r['memtypes_base'])} -> {_mix(r['memtypes_new'])}",
                    cb - cn > thr["memtype"], **where))
        for metric, col, name in (("invalidations", "invalidations", "invalidations"),
                                  ("exits", "mmio_exits", "MMIO exits")):
            if metric in metrics:
                f = _count_finding(where, metric, int(r[f"{col}_base"]), int(r[f"{col}_new"]),
                                   thr[metric], name)
                found += [f] if f else []
        if "latency" in metrics:
            sb, sn = r["service_ns_base"], r["service_ns_new"]
            if len(sb) >= MIN_SAMPLES and len(sn) >= MIN_SAMPLES:
                e = stats.median_ratio(sb, sn)
                reg = e.ci_low > 1 + thr["latency"]
                better = e.ci_high < 1 - thr["latency"]
                if reg or better:
                    found.append(Finding(
                        "latency", e.median_base, e.median_new,
                        f"p50 fault time {(e.ratio - 1) * 100:+.0f}% "
                        f"[95% CI {(e.ci_low - 1) * 100:+.0f}%..{(e.ci_high - 1) * 100:+.0f}%, "
                        f"Cliff's d {e.cliffs_delta:+.2f} {e.magnitude}]", reg, e.__dict__,
                        **where))
        for f in found:
            f.causes = cause
        findings += found
    if "errors" in metrics:
        findings += _error_findings(base, new)
    totals = pd.concat([_totals(base, "base"), _totals(new, "new")], ignore_index=True)
    return Comparison(findings, _side_by_side(m), _latency_table(base, new, pb, pn), totals,
                      _method(base, new), causes, _context_notes(base, new))


def _context_notes(base: Model, new: Model) -> list[str]:
    """What makes the two recordings less comparable than their numbers look:
    different host load, events lost on either side."""
    out = []
    load = hostload.load_difference(hostload.host_load(base.recording),
                                    hostload.host_load(new.recording))
    if load:
        out.append(load)
    for side, m in (("BASE", base), ("NEW", new)):
        lost = int(m.lost["lost"].sum()) if len(m.lost) else 0
        if lost:
            out.append(f"{side} lost {lost:,} events (ring buffer full): its counts are lower "
                       "bounds and slots that lost events are compared on what was seen")
    return out


def _mix(d: dict) -> str:
    return "/".join(f"{k} {v * 100:.0f}%" for k, v in sorted(d.items())) or "none"


def _error_findings(base: Model, new: Model) -> list[Finding]:
    out = []
    key = ["what", "errno"]
    eb = base.errors.groupby(key).size() if len(base.errors) else pd.Series(dtype=int)
    en = new.errors.groupby(key).size() if len(new.errors) else pd.Series(dtype=int)
    for k in sorted(set(eb.index) | set(en.index)):
        a, b = int(eb.get(k, 0)), int(en.get(k, 0))
        if b != a:
            out.append(Finding("errors", a, b, f"{k[0]} {k[1]}: {a} -> {b}", b > a,
                               {"what": k[0], "errno": k[1]}))
    return out


def _side_by_side(m: pd.DataFrame) -> pd.DataFrame:
    cols = []
    for c in ("slot", "backing", "flags", "faults", "pages", "huge_share", "levels",
              "cacheable_share", "invalidations", "mmio_exits"):
        cols += [f"{c}_base", f"{c}_new"]
    out = m[KEY + cols].copy()
    for c in ("slot_base", "slot_new", "flags_base", "flags_new"):  # a side without it: null
        out[c] = pd.Series([x if isinstance(x, list) else None for x in out[c]],
                           index=out.index, dtype=object)
    for side in ("base", "new"):
        out[f"p50_us_{side}"] = [np.nanmedian(x) / 1e3 if isinstance(x, np.ndarray)
                                 and np.isfinite(x).any() else np.nan
                                 for x in m[f"service_ns_{side}"]]
    return schema.DIFF_SLOTS.conform(out)


def _latency_table(base, new, pb, pn) -> pd.DataFrame:
    """Service-time quantiles by slot, memory type and level, both sides."""
    rows = []
    for side, model in (("base", base), ("new", new)):
        f = model.faults
        if not len(f):
            continue
        secs = recorded_seconds(model)
        s = model.slots
        f = f.assign(gpa=np.where(f["slot_row"] >= 0,
                                  s["gpa"].reindex(f["slot_row"]).to_numpy(), -1))
        for by in ("gpa", "spte_memtype", "mapping_size_bytes"):
            for k, g in f.groupby(by):
                q = stats.quantiles(g["service_ns"].to_numpy(dtype=float, na_value=np.nan) / 1e3)
                rows.append({"side": side, "by": {"gpa": "slot GPA", "spte_memtype": "memtype",
                                                  "mapping_size_bytes": "level"}[by],
                             "key": f"{int(k):#x}" if by == "gpa" else
                             pages.size_name(int(k)) if by == "mapping_size_bytes" else str(k),
                             "count": q["count"],
                             **{f"{p}_us": q[p] for p in ("p50", "p90", "p99", "max")},
                             "faults_per_s": q["count"] / secs if secs else np.nan})
    return schema.DIFF_LATENCY.conform(pd.DataFrame(rows, columns=schema.DIFF_LATENCY.names))


def recorded_seconds(model: Model) -> float | None:
    """How long the recording ran (from its end note; None if it was cut off)."""
    end = model.recording["notes"]
    end = end[end["key"] == "end"]
    return json.loads(end["value"].iloc[-1]).get("elapsed_s") if len(end) else None


def _totals(model: Model, side: str) -> pd.DataFrame:
    elapsed = recorded_seconds(model)
    ex = model.recording["userspace_exit"]
    rows = []
    vms = model.slots[["pid", "proc", "vm_fd"]].drop_duplicates() if len(model.slots) else \
        pd.DataFrame({"pid": [], "proc": [], "vm_fd": []})
    for r in vms.itertuples(index=False):
        f = model.faults[(model.faults["pid"] == r.pid) & (model.faults["proc"] == r.proc)
                         & (model.faults["vm_fd"] == r.vm_fd)]
        e = ex[ex["pid"] == r.pid]
        rows.append({"side": side, "pid": int(r.pid), "proc": int(r.proc), "vm_fd": int(r.vm_fd),
                     "faults": len(f), "huge_share": float((f["level"] > 1).mean()) if len(f)
                     else np.nan, "p50_us": _p50_us(f["service_ns"]), "userspace_exits": len(e),
                     "exits": e["reason"].astype(int).value_counts().to_dict(),
                     "errors": int((model.errors["pid"] == r.pid).sum()),
                     "recorded_s": elapsed})
    return schema.DIFF_VMS.conform(pd.DataFrame(rows, columns=schema.DIFF_VMS.names))


def _p50_us(service_ns: pd.Series) -> float:
    """Median service time in us; NaN when no fault has one."""
    med = service_ns.median() if len(service_ns) else pd.NA
    return float(med) / 1e3 if pd.notna(med) else np.nan


def _method(base: Model, new: Model) -> str:
    kinds = set(base.faults.get("start_kind", pd.Series(dtype=str)).dropna()) | \
        set(new.faults.get("start_kind", pd.Series(dtype=str)).dropna())
    kinds.discard("")
    if any("entry/return" in k for k in kinds):
        return ("fault service time from the fault handler's entry and return (kprobes): "
                + " / ".join(sorted(kinds)))
    start = " / ".join(sorted(kinds)) or "the fault's first tracepoint"
    return ("fault service time from tracepoint pairing on the vCPU thread: "
            f"{start} -> the spte install (kvm_mmu_set_spte / kvm_tdp_mmu_spte_changed); "
            "exit and re-entry are not included")
