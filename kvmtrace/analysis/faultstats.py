"""What the report needs of the faults, kept per slot instead of per fault.

The per-slot summary, the verdicts, the page ranges and the errors read the
faults only through these aggregates, so ``kvmtrace report`` can compute them
window by window over a recording of any length (model.build(lean=True)) and
merge them, exactly, in memory bounded by slots, distinct values and pages
touched, not by faults:

- ``classes``: faults counted per slot version and distinct (access, level,
  memory types, rule, verdict), with the time (and order) of the first;
- ``service``: the service times of the faults inside a slot, counted per
  distinct value (an exact median needs every value; service times repeat,
  so this is bounded by distinct values, not faults);
- ``pages``: per slot version and guest page, its last fault's mapping size,
  memory types and verdict (the ranges table);
- ``rejected``: the faults KVM refused (few: the errors table lists each);
- ``before_failure``: per failed KVM_RUN, the last fault on its thread before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

TEXT = ["access", "spte_memtype", "vma_memtype", "vma_memtype_source", "rule", "verdict"]
CLASS_KEYS = ["slot_row", "level"] + TEXT
PAGE_COLUMNS = ["slot_row", "gfn", "ts", "fault_id", "mapping_size_bytes", "vma_memtype",
                "spte_memtype", "verdict"]
REJECTED_COLUMNS = ["ts", "pid", "proc", "vm_fd", "access", "gfn", "slot_row", "rule"]


@dataclass
class FaultStats:
    classes: pd.DataFrame
    service: pd.DataFrame
    pages: pd.DataFrame
    rejected: pd.DataFrame
    before_failure: pd.DataFrame  # failure (index into the failures), ts, gfn, slot_row

    @property
    def outside(self) -> int:
        """Faults outside every recorded slot."""
        c = self.classes
        return int(c.loc[c["slot_row"] < 0, "faults"].sum())


def of_faults(f: pd.DataFrame, failures: pd.DataFrame) -> FaultStats:
    """The aggregates of a faults table (whole, or one window of it).
    ``failures``: the failed KVM_RUNs (tid, ts), in a fixed order."""
    f = f.reset_index(drop=True)  # in fault order: time order (faults.pair, windows.py)
    keys = {"slot_row": f["slot_row"].to_numpy(np.int64),
            "level": f["level"].to_numpy(np.int64)}
    cats = {}
    for c in TEXT:  # grouped by code, named after
        col = f[c].astype("category")
        keys[c] = col.cat.codes.to_numpy(np.int64)
        cats[c] = np.array(list(col.cat.categories) + [None], dtype=object)
    k = pd.DataFrame(keys)
    k["first_ts"] = f["ts"].to_numpy(np.int64)
    k["first_order"] = f["fault_id"].to_numpy(np.int64)
    classes = k.groupby(CLASS_KEYS, sort=False).agg(
        faults=("first_ts", "size"), first_ts=("first_ts", "first"),
        first_order=("first_order", "first")).reset_index()
    for c in TEXT:
        classes[c] = cats[c][classes[c].to_numpy(np.int64)]
    inside = keys["slot_row"] >= 0
    svc = f["service_ns"].to_numpy(dtype=np.int64, na_value=-1) if len(f) else \
        np.zeros(0, np.int64)
    has = inside & f["service_ns"].notna().to_numpy(dtype=bool)
    service = _counted(pd.DataFrame({"slot_row": keys["slot_row"][has], "service_ns": svc[has],
                                     "count": np.ones(int(has.sum()), dtype=np.int64)}))
    pages = _last_per_page(f.loc[inside, PAGE_COLUMNS])
    rej = (f["verdict"] == "rejected").to_numpy(dtype=bool)
    rejected = f.loc[rej, REJECTED_COLUMNS + ["fault_id"]].reset_index(drop=True)
    return FaultStats(classes, service, pages, rejected, _before(f, failures))


def _counted(sv: pd.DataFrame) -> pd.DataFrame:
    """(slot_row, service_ns, count) summed per distinct (slot_row, service_ns)."""
    return sv.groupby(["slot_row", "service_ns"], sort=True)["count"].sum().reset_index()


def median_per_slot(service: pd.DataFrame) -> pd.Series:
    """Per slot_row, the median service time (ns, float64: the mean of the two
    middle values for an even count, as pandas' median) from the counts."""
    if not len(service):
        return pd.Series(dtype="float64")
    sv = service.sort_values(["slot_row", "service_ns"], kind="stable")
    row = sv["slot_row"].to_numpy(np.int64)
    val = sv["service_ns"].to_numpy(np.int64)
    cum = np.cumsum(sv["count"].to_numpy(np.int64))
    rows, start = np.unique(row, return_index=True)
    end = np.r_[start[1:], len(row)]
    before = np.r_[0, cum[:-1]][start]  # faults of the earlier slots
    n = cum[end - 1] - before
    lo = before + (n - 1) // 2  # 0-based ranks of the middle value(s)
    hi = before + n // 2
    v_lo = val[np.searchsorted(cum, lo, side="right")]
    v_hi = val[np.searchsorted(cum, hi, side="right")]
    return pd.Series((v_lo.astype(np.float64) + v_hi.astype(np.float64)) / 2, index=rows)


def _last_per_page(p: pd.DataFrame) -> pd.DataFrame:
    """Per (slot_row, gfn) the last fault (by time, then fault order)."""
    if not len(p):
        return p.reset_index(drop=True)
    return p.sort_values(["ts", "fault_id"], kind="stable") \
        .drop_duplicates(["slot_row", "gfn"], keep="last").reset_index(drop=True)


def _before(f: pd.DataFrame, failures: pd.DataFrame) -> pd.DataFrame:
    """Per failed KVM_RUN, the last fault of its thread at or before it."""
    cols = ["failure", "ts", "fault_id", "gfn", "slot_row"]
    if not len(failures) or not len(f):
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in cols})
    fl = pd.DataFrame({"failure": np.arange(len(failures)),
                       "tid": failures["tid"].to_numpy(np.int64),
                       "at": failures["ts"].to_numpy(np.int64)}).sort_values("at", kind="stable")
    ff = pd.DataFrame({"tid": f["tid"].to_numpy(np.int64), "ts": f["ts"].to_numpy(np.int64),
                       "fault_id": f["fault_id"].to_numpy(np.int64),
                       "gfn": f["gfn"].to_numpy(np.int64),
                       "slot_row": f["slot_row"].to_numpy(np.int64)}) \
        .sort_values(["ts", "fault_id"], kind="stable")
    m = pd.merge_asof(fl, ff, left_on="at", right_on="ts", by="tid", direction="backward")
    m = m[m["ts"].notna()]
    return m[cols].astype("int64").reset_index(drop=True)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """pd.concat, categoricals with different categories kept categorical."""
    frames = [x for x in frames if len(x)] or frames[:1]
    if len(frames) == 1:
        return frames[0]
    out = {}
    for c in frames[0].columns:
        if isinstance(frames[0][c].dtype, pd.CategoricalDtype):
            out[c] = pd.Series(union_categoricals([x[c].astype("category") for x in frames]))
        else:
            out[c] = pd.concat([x[c] for x in frames], ignore_index=True)
    return pd.DataFrame(out)


def merge(parts: list[FaultStats]) -> FaultStats:
    """One FaultStats from those of consecutive windows (exact: sums, the
    earliest first, the latest last)."""
    if len(parts) == 1:
        return parts[0]
    c = pd.concat([p.classes for p in parts], ignore_index=True) \
        .sort_values(["first_ts", "first_order"], kind="stable")
    classes = c.groupby(CLASS_KEYS, sort=False, dropna=False).agg(
        faults=("faults", "sum"), first_ts=("first_ts", "first"),
        first_order=("first_order", "first")).reset_index()
    service = _counted(pd.concat([p.service for p in parts], ignore_index=True))
    pages = _last_per_page(_concat([p.pages for p in parts]))
    rejected = _concat([p.rejected for p in parts]).sort_values(["ts", "fault_id"],
                                                                 kind="stable")
    b = pd.concat([p.before_failure for p in parts], ignore_index=True) \
        .sort_values(["ts", "fault_id"], kind="stable").drop_duplicates("failure", keep="last")
    return FaultStats(classes, service, pages, rejected.reset_index(drop=True),
                      b.sort_values("failure").reset_index(drop=True))
