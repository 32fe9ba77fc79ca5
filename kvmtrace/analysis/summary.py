"""Per-slot summary: the memslot table joined with its activity and verdict,
and the one filter every table goes through.

The summary is the table ``kvmtrace report`` leads with and ``--format csv``
prints; every column is a column operation over the model's tables. Its
columns are declared in schema.SUMMARY.

``select`` applies --pid and --slot the same way to every table (report,
JSON, CSV, HTML): by the table's own pid / slot columns, else through the slot
version a row belongs to (``slot_row``), else, for the host's VMA snapshots,
by overlap with the selected slots' host address ranges.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import faultstats, pages, schema
from .model import Model
from ..memtype import arm64 as a64
from .vmas import vmflag_words

LEVELS = ("level1", "level2", "level3")  # mappings per level: 4K / 2M / 1G on x86


def _rel(model: Model, ts) -> pd.Series:
    base = (model.meta.get("clock") or {}).get("monotonic_ns", 0)
    return (pd.to_numeric(ts, errors="coerce") - base) / 1e9


def _per_slot(df: pd.DataFrame, col: str, name: str) -> pd.Series:
    d = df[df["slot_row"] >= 0]
    return d.groupby("slot_row")[col].size().rename(name) if len(d) else pd.Series(name=name,
                                                                                     dtype="int64")


def level_labels(model: Model) -> dict[str, str]:
    """{'level1': '4K', ...}: the summary's level columns as sizes on this
    recording's host (analysis/pages.py)."""
    names = pages.level_names(pages.page_size(model.meta))
    return {c: names[i + 1] for i, c in enumerate(LEVELS)}


def slot_summary(model: Model, pid: int | None = None, slot: int | None = None) -> pd.DataFrame:
    s = model.slots.copy()
    s["slot_row"] = np.arange(len(s))
    fc = model.fault_stats.classes
    fc = fc[fc["slot_row"].to_numpy() >= 0]
    if len(fc):
        # from the counted classes of faults (faultstats.py): never a row per fault
        acc = fc.groupby(["slot_row", "access"])["faults"].sum().unstack(fill_value=0)
        acc.columns = [str(c) for c in acc.columns]
        lvl = fc.groupby(["slot_row", "level"])["faults"].sum().unstack(fill_value=0).rename(
            columns={i + 1: c for i, c in enumerate(LEVELS)})
        svc = faultstats.median_per_slot(model.fault_stats.service).rename("service_p50_us") / 1e3
        mt = fc.loc[fc["spte_memtype"].notna() & (fc["spte_memtype"] != ""),
                    ["slot_row", "spte_memtype"]]
        mts = mt.groupby("slot_row")["spte_memtype"].agg(lambda x: "/".join(sorted(set(x)))) \
            .rename("spte_memtype")
        extra = pd.concat([fc.groupby("slot_row")["faults"].sum().rename("faults"), acc, lvl,
                           svc, mts], axis=1)
    else:
        extra = pd.DataFrame(index=pd.Index([], name="slot_row"))
    pf = model.prefetch
    lost_req = pf["request_lost"] if "request_lost" in pf else pd.Series(False, index=pf.index)
    extra = pd.concat([extra,
                       _per_slot(pf[~lost_req], "gfn", "prefetched"),
                       _per_slot(pf[lost_req], "gfn", "unpaired_installs"),
                       _per_slot(model.invalidations, "hva_start", "invalidations"),
                       _per_slot(model.exits, "gpa", "mmio_exits")], axis=1)
    s = s.merge(extra, left_on="slot_row", right_index=True, how="left")
    for c in ("faults", "read", "write", "exec", *LEVELS, "prefetched",
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
    s["gpa_end"] = s["gpa"] + s["size_bytes"]
    # the VMA's type even without faults: known for ordinary memory, else from faults
    arm = "vma_memtype_arm64" in s and s["vma_memtype_arm64"].notna().any()
    s["slot_vma_memtype"] = np.where(
        s["vma_count"] == 0, "unknown",
        np.where(~s["pfnmap"].astype(bool), "Normal" if arm else "WB",
                 s["vma_memtype"].fillna("").replace("", "unknown")))
    # decoded from vm_page_prot where the VMA was captured at the ioctl (vmas.py)
    s["slot_vma_memtype"] = s["pgprot_memtype"].where(s["pgprot_memtype"].notna(),
                                                      s["slot_vma_memtype"])
    s["vm_flags"] = _flag_words(s, model.meta.get("kernel"))
    s["t_start_s"] = _rel(model, s["start_ts"].where(s["snapshot_ts"].isna()))  # null: before
    s["t_end_s"] = _rel(model, s["end_ts"].where(s["end_ts"] < np.iinfo(np.uint64).max))
    s = schema.SUMMARY.conform(s[schema.SUMMARY.names])
    s = s.sort_values(["pid", "proc", "vm_fd", "as_id", "slot", "version"]).reset_index(drop=True)
    return select(s, model, pid, slot)


def ops_table(model: Model, pid: int | None = None, slot: int | None = None) -> pd.DataFrame:
    o = model.ops.assign(t_s=_rel(model, model.ops["ts"]))
    return select(schema.OPS_VIEW.conform(o[schema.OPS_VIEW.names]), model, pid, slot)


def select(df: pd.DataFrame, model: Model, pid: int | None = None,
           slot: int | None = None) -> pd.DataFrame:
    """The rows of any table that belong to process ``pid`` and slot id
    ``slot`` (None: all). A row outside every slot (null slot) matches no
    --slot. Tables with neither column nor a way to place their rows (the
    per-kind loss counts: host-wide) are returned whole."""
    keep = np.ones(len(df), dtype=bool)
    if pid is None and slot is None:
        return df.reset_index(drop=True)
    slots = model.slots
    row = df["slot_row"].to_numpy() if "slot_row" in df else None
    if pid is not None:
        if "pid" in df:
            keep &= (df["pid"] == pid).to_numpy(dtype=bool)
        elif row is not None:
            keep &= (row >= 0) & (slots["pid"].to_numpy()[np.clip(row, 0, None)] == pid) \
                if len(slots) else False
    if slot is not None:
        col = "slot" if "slot" in df else "slot_id" if "slot_id" in df else None
        if col is not None:
            keep &= (df[col] == slot).fillna(False).to_numpy(dtype=bool)
        elif {"start", "end", "pid"} <= set(df.columns):  # VMA snapshots: overlap
            sel = slots[slots["slot"] == slot]
            hit = np.zeros(len(df), dtype=bool)
            for s in sel.itertuples(index=False):  # slot versions: few
                hit |= ((df["pid"] == s.pid) & (df["start"] < s.hva + s.size_bytes)
                        & (df["end"] > s.hva)).to_numpy(dtype=bool)
            keep &= hit
    return df[keep].reset_index(drop=True)


def _flag_words(s: pd.DataFrame, kernel) -> pd.Series:
    """The VmFlags that matter for memory types, spelled out: smaps' mnemonics,
    plus VM_ALLOW_ANY_UNCACHED (vfio-pci, 6.9+) from the captured vm_flags,
    which smaps has no mnemonic for (it prints '??')."""
    words = s["vmflags"].map(vmflag_words)
    mask = a64.vm_flag_bits(kernel or "0").get("VM_ALLOW_ANY_UNCACHED") if kernel else None
    if not mask or "vm_flags" not in s or not len(s):
        return words
    flags = s["vm_flags"].astype("UInt64")
    has = ((flags & np.uint64(mask)) != 0).fillna(False).to_numpy(dtype=bool)
    return pd.Series(np.where(has, np.where(words == "-", "VM_ALLOW_ANY_UNCACHED",
                                            words + "|VM_ALLOW_ANY_UNCACHED"), words),
                     index=s.index)


def outside_words(model: Model) -> str:
    """What the faults outside every recorded memslot are, as far as the
    recording tells ('' when there are none). KVM handles a guest access to
    an address no memslot covers as emulated MMIO (arm64 io_mem_abort, x86 an
    MMIO spte, then KVM_EXIT_MMIO to the VMM). Those are the only outside
    faults when every memslot the traced VMs had is known: created while
    recording, or read from the kernel when recording began. Only where that
    read failed (a note says so) can an outside fault be in a slot the
    recording does not know."""
    n = model.fault_stats.outside
    if not n:
        return ""
    unread = model.recording.tables["notes"]["key"].eq("memslot_snapshot_unavailable").any()
    ex = model.exits
    mmio = int((ex["slot_row"] < 0).sum()) if len(ex) else 0
    if unread:
        return (f"{n:,} faults outside every recorded memslot: emulated MMIO, or slots the "
                "VMM set before recording began, which could not be read (see the note)")
    return (f"{n:,} faults outside every memslot: guest accesses to addresses no memslot "
            f"covers, which KVM emulates as MMIO ({mmio:,} MMIO exit"
            f"{'s' if mmio != 1 else ''} to the VMM outside every memslot recorded)")
