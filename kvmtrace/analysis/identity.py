"""Which process an event belongs to when a pid is reused within a recording.

A pid names a process only until it exits: a VMM that exits and another that
is given the same pid later are two VMMs, and their VMs, memslots and faults
must never be merged. The recording holds each VMM's end (the ``proc_exit``
event: sched:sched_process_exit of its last thread, or of its leader on
older kernels), so every row with a pid gets ``proc``: how many processes
with that pid ended before the row's time (0 for the first). A VM is then
keyed by (pid, proc, vm_fd), and a pid can never stand for two VMMs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

VM_KEY = ["pid", "proc", "vm_fd"]


def generations(df: pd.DataFrame, exits: pd.DataFrame, ts: str = "ts") -> np.ndarray:
    """``proc`` for each row of ``df``: exits of its pid strictly before its time."""
    out = np.zeros(len(df), dtype=np.int64)
    if not len(df) or exits is None or not len(exits):
        return out
    ex = exits[["pid", "ts"]].astype({"pid": "int64", "ts": "int64"}).sort_values(["pid", "ts"])
    ex = ex.assign(proc=ex.groupby("pid").cumcount().astype("int64") + 1)
    ex = ex[ex["pid"].isin(df["pid"].astype("int64").unique())]
    if not len(ex):
        return out
    left = pd.DataFrame({"pid": df["pid"].to_numpy(dtype=np.int64),
                         "t": df[ts].to_numpy(dtype=np.int64),
                         "row": np.arange(len(df))}).sort_values("t", kind="stable")
    m = pd.merge_asof(left, ex.rename(columns={"ts": "t"}).sort_values("t"), on="t", by="pid",
                      direction="backward", allow_exact_matches=False)
    out[m["row"].to_numpy()] = m["proc"].fillna(0).to_numpy(dtype=np.int64)
    return out


def label(pid, proc) -> str:
    """How a VMM is named to people: '1234', or '1234#2' for the second process
    that had pid 1234 in this recording."""
    return f"{int(pid)}" if not proc else f"{int(pid)}#{int(proc) + 1}"
