"""Events the ring buffers dropped: how many per kind, and which memslots they
concern, so no report presents an incomplete picture as a complete one.

Sources in the recording: the ``stats`` rows (cumulative events read and lost
per kind, written at each flush) and the last ``lost_where`` note (per
process, kind and 2 MiB guest-physical region, from the BPF side; see
collectors/loss.py). A lost event is *placed* in a slot when its region
overlaps the slot while the slot was live; lost events of kinds without a
guest address, or that the bounded BPF table could not keep, are *unplaced*.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from . import identity, schema

# Event kinds whose loss leaves a slot's memory-type evidence incomplete: the
# fault, its request and the entry that KVM installed.
FAULT_KINDS = ("spte_requested", "set_spte", "tdp_spte_changed", "s2_map", "s2_relax",
               "guest_fault", "guest_abort", "user_mem_abort", "page_fault", "pt_walk",
               "fault_handler", "fast_page_fault", "mmio_page_fault")
# Of those, the kinds that carry the memory-type evidence itself (the request
# and the installed entry): all have a guest address, so their loss is placed
# in slots unless the bounded BPF table overflowed. A lost fault start
# (pt_walk, page_fault) only leaves a fault's access kind and service time out.
EVIDENCE_KINDS = ("spte_requested", "set_spte", "tdp_spte_changed", "s2_map", "guest_fault")
# Kinds whose loss means an install may have lost the request it answers.
REQUEST_KINDS = ("spte_requested", "guest_fault")
REGION_PAGES = 512
WHERE_COLS = {"kind": "object", "pid": "int64", "gfn_start": "Int64", "count": "int64",
              "first_ts": "int64", "last_ts": "int64"}


def skipped(rec) -> dict[str, int]:
    """{program: runs the kernel skipped} from the last ``bpf_misses`` note
    (collectors/progstats.py): events missing though no ring was full."""
    d = rec.last_note("bpf_misses")
    if not isinstance(d, dict):
        return {}
    return {str(k): int(v) for k, v in d.items()
            if isinstance(v, int) and not isinstance(v, bool) and v > 0}


def skipped_note(skips: dict[str, int]) -> str:
    """The report's line for the programs the kernel skipped ('' if none)."""
    if not skips:
        return ""
    return (f"the kernel skipped kvmtrace's probe programs {sum(skips.values()):,} times "
            "(another BPF program held the CPU): their events are missing though no ring "
            "buffer was full (" + ", ".join(f"{k} {v:,}" for k, v in sorted(skips.items()))
            + ")")


def per_kind(rec) -> pd.DataFrame:
    """kind, events, lost (cumulative at the last flush) and lost_pct, for
    every kind recorded."""
    st = rec["stats"]
    if not len(st):
        return schema.LOST.empty()
    last = st.groupby("kind")[["events", "lost"]].max().astype("int64").reset_index()
    seen = last["events"] + last["lost"]
    last["lost_pct"] = (100.0 * last["lost"] / seen.where(seen > 0)).round(3).fillna(0.0)
    return last.sort_values("kind").reset_index(drop=True)


def where(rec, exits: pd.DataFrame) -> pd.DataFrame:
    """The last ``lost_where`` note as a table (kind, pid, proc, gfn_start/_end
    (null when unplaceable), count, first_ts, last_ts)."""
    notes = rec["notes"]
    rows = []
    w = notes[notes["key"] == "lost_where"]
    if len(w):
        try:
            rows = json.loads(w["value"].iloc[-1])
        except ValueError:
            rows = []
    rows = [r for r in rows if isinstance(r, list) and len(r) == 6]
    df = pd.DataFrame(rows, columns=list(WHERE_COLS))
    try:
        df = df.astype(WHERE_COLS)
    except (TypeError, ValueError, OverflowError):
        df = pd.DataFrame(columns=list(WHERE_COLS)).astype(WHERE_COLS)
    df["gfn_end"] = df["gfn_start"] + REGION_PAGES
    df["proc"] = identity.generations(df, exits, ts="first_ts")
    return df


def per_slot(lw: pd.DataFrame, slots: pd.DataFrame, kinds=FAULT_KINDS) -> np.ndarray:
    """Lost events of ``kinds`` placed in each slot version (index = slot row)."""
    out = np.zeros(len(slots), dtype=np.int64)
    d = lw[lw["kind"].isin(kinds) & lw["gfn_start"].notna()]
    if not len(d) or not len(slots):
        return out
    s = slots[["pid", "proc", "gfn_start", "gfn_end", "start_ts", "end_ts"]].astype("int64",
                                                                                    errors="ignore")
    s = s.assign(slot_row=np.arange(len(slots)))
    m = d.astype({"gfn_start": "int64", "gfn_end": "int64"}).merge(
        s, on=["pid", "proc"], suffixes=("", "_s"))
    t_end = pd.to_numeric(slots["end_ts"], errors="coerce").astype("float64").to_numpy()[
        m["slot_row"].to_numpy()]
    hit = ((m["gfn_start"] < m["gfn_end_s"]) & (m["gfn_start_s"] < m["gfn_end"])
           & (m["last_ts"] >= m["start_ts"]) & (m["first_ts"] < t_end))
    np.add.at(out, m.loc[hit, "slot_row"].to_numpy(), m.loc[hit, "count"].to_numpy())
    return out


def unplaced(kinds: pd.DataFrame, lw: pd.DataFrame, which=EVIDENCE_KINDS) -> int:
    """Lost events of ``which`` kinds that no slot can be charged with."""
    total = int(kinds.loc[kinds["kind"].isin(which), "lost"].sum())
    placed = int(lw.loc[lw["kind"].isin(which) & lw["gfn_start"].notna(), "count"].sum())
    return max(total - placed, 0)


def request_lost(rows: pd.DataFrame, lw: pd.DataFrame) -> np.ndarray:
    """For spte installs not paired with a request: True where requests of the
    same process were lost in the same 2 MiB region (the install most likely
    answers a lost fault, not a prefetch)."""
    out = np.zeros(len(rows), dtype=bool)
    d = lw[lw["kind"].isin(REQUEST_KINDS) & lw["gfn_start"].notna()]
    if not len(rows) or not len(d):
        return out
    key = pd.MultiIndex.from_arrays([d["pid"].astype("int64"), d["proc"].astype("int64"),
                                     d["gfn_start"].astype("int64") // REGION_PAGES])
    mine = pd.MultiIndex.from_arrays([rows["pid"].astype("int64"), rows["proc"].astype("int64"),
                                      rows["gfn"].astype("int64") // REGION_PAGES])
    return mine.isin(key)
