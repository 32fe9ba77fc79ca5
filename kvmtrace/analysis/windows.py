"""x86 fault pairing over a recording read batch by batch, in bounded memory.

``faults.pair`` joins each request (kvm_mmu_spte_requested) with its thread's
last start event at or before it, and the thread's first install at or after
it and before the thread's next request. Every join is per thread (tid), so a
request can be paired as soon as no event still unread can change its match.
Two facts of the recording decide when that is, exactly:

- a thread's events of one kind are written in the order the thread made
  them (one BPF ring per kind, one consumer), so once an event of thread T
  with time t has been read, T's unread events of that kind are later than t;
- the fault-handler kprobe event is written at the handler's return with its
  entry time, so for it the same holds of the return time.

A request of T at time r, whose next request on T is at n, is final once T's
next request has been read and T has events read of both the start kind and
the install kind at or after n (a fault-handler start: a return at or after
r). The finished requests of a thread are a prefix of its requests, so a
window pairs those with T's starts up to the last of them and T's installs
before the first unfinished request; everything later is carried into the
next window. Threads with no event of a kind read yet fall back on the kind's
newest time read from any thread, less FRONTIER_SLACK_NS (a BPF program reads
the clock and reserves its ring record in one non-preemptible run, so a
record is never older than that behind the ring's newest); the handler kind
has no such fallback (its records are as old as the call is long).

The result is what ``faults.pair`` gives on the whole recording, window by
window: a window's faults and prefetches, in time order within the window.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import faults as faults_mod

FRONTIER_SLACK_NS = 500_000_000
WINDOW_REQUESTS = 1 << 19  # requests buffered before a window is paired
NEVER, ALWAYS = np.iinfo(np.int64).min, np.iinfo(np.int64).max
REQUEST_COLUMNS = ["ts", "pid", "tid", "vcpu_fd", "cpu", "gfn", "pfn", "level"]
START_COLUMNS = {"fault_handler": ["ts", "tid", "error_code", "exit_ts", "ret"],
                 "page_fault": ["ts", "tid", "error_code"], "pt_walk": ["ts", "tid", "pferr"]}


def start_kind(counts: dict) -> str:
    """The start event faults.pair uses for this recording (by its event counts)."""
    return "fault_handler" if counts.get("fault_handler") else \
        "page_fault" if counts.get("page_fault") else "pt_walk"


def install_kind(counts: dict, spte_format: str) -> str:
    return "tdp_spte_changed" if spte_format != "legacy" and counts.get("tdp_spte_changed") \
        else "set_spte"


class _Latest:
    """The newest time read per thread of one kind, and of any thread."""

    def __init__(self, has_events: bool, fallback: bool):
        self.per_tid: dict[int, int] = {}  # threads: a few per vCPU
        self.any = NEVER
        self.has_events, self.fallback = has_events, fallback

    def see(self, tid: np.ndarray, ts: np.ndarray):
        for t, v in _per_tid(tid, ts, np.maximum).items():
            if v > self.per_tid.get(t, NEVER):
                self.per_tid[t] = v
            self.any = max(self.any, v)

    def horizon(self, tids: np.ndarray) -> np.ndarray:
        """Per thread: every unread event of the kind is at or after this."""
        if not self.has_events:  # the recording has none: nothing to wait for
            return np.full(len(tids), ALWAYS, dtype=np.int64)
        fallback = self.any - FRONTIER_SLACK_NS if self.fallback and self.any != NEVER \
            else NEVER
        return _lookup(self.per_tid, tids, fallback)


def _lookup(per_tid: dict, tids: np.ndarray, default: int) -> np.ndarray:
    """per_tid[tid] for each tid, ``default`` where absent (int64 throughout);
    looked up once per distinct thread."""
    if not per_tid or not len(tids):
        return np.full(len(tids), default, dtype=np.int64)
    codes, uniq = pd.factorize(tids)
    vals = np.fromiter((per_tid.get(t, default) for t in uniq.tolist()), dtype=np.int64,
                       count=len(uniq))
    return vals[codes]


def _per_tid(tid: np.ndarray, ts: np.ndarray, how) -> dict:
    """{tid: how(ts of that tid)} for ``how`` np.maximum or np.minimum."""
    if not len(tid):
        return {}
    u, inv = np.unique(tid, return_inverse=True)
    m = np.full(len(u), NEVER if how is np.maximum else ALWAYS, dtype=np.int64)
    how.at(m, inv, ts)
    return dict(zip(u.tolist(), m.tolist()))


def _only(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """df's columns ``cols`` (df itself when it has just those: no copy)."""
    return df if list(df.columns) == cols else df[cols]


def _cat(parts: list[pd.DataFrame], template: pd.DataFrame) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if not parts:
        return template.iloc[:0]
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def stream_columns() -> dict[str, list[str]]:
    """The columns pairing reads of each streamed kind (installs: all, for prefetch)."""
    return {"spte_requested": REQUEST_COLUMNS, **START_COLUMNS}


class Windows:
    """Feed the stream's batches to ``add``, then call ``finish``; each returns
    the (faults, prefetch) windows that became final (a list, maybe empty)."""

    def __init__(self, spte_format: str, counts: dict, empty: dict[str, pd.DataFrame],
                 window_requests: int | None = None):
        self.spte_format = spte_format
        self.start = start_kind(counts)
        self.install = install_kind(counts, spte_format)
        self.empty = empty
        self.window = self.base_window = window_requests or WINDOW_REQUESTS
        self.buf: dict[str, list] = {"spte_requested": [], self.start: [], self.install: []}
        self.latest = {"start": _Latest(bool(counts.get(self.start)),
                                        self.start != "fault_handler"),
                       "install": _Latest(bool(counts.get(self.install)), True),
                       "request": _Latest(bool(counts.get("spte_requested")), True)}
        self.last_final: dict[int, int] = {}  # per tid: its last paired request
        self.buffered = 0
        self.fault_base = 0

    def add(self, batch: dict[str, pd.DataFrame]) -> list:
        req = batch.get("spte_requested")
        if req is not None and len(req):
            self.buf["spte_requested"].append(_only(req, REQUEST_COLUMNS))
            self.latest["request"].see(req["tid"].to_numpy(np.int64), req["ts"].to_numpy(np.int64))
            self.buffered += len(req)
        st = batch.get(self.start)
        if st is not None and len(st):
            self.buf[self.start].append(_only(st, START_COLUMNS[self.start]))
            t = st["exit_ts"] if self.start == "fault_handler" else st["ts"]
            self.latest["start"].see(st["tid"].to_numpy(np.int64), t.to_numpy(np.int64))
        ins = batch.get(self.install)
        if ins is not None and len(ins):
            self.latest["install"].see(ins["tid"].to_numpy(np.int64),
                                       ins["ts"].to_numpy(np.int64))
            if self.install == "tdp_spte_changed":  # only leaf installs pair or prefetch
                ins = faults_mod.tdp_leaf_installs(ins.rename(columns={"new_spte": "spte"})) \
                    .rename(columns={"spte": "new_spte"})
            self.buf[self.install].append(ins)
        if self.buffered < self.window:
            return []
        out = self._pair(end=False)
        # a window that could pair nothing (threads waiting on a kind) grows
        if out is None:
            self.window *= 2
            return []
        self.window = max(self.base_window, self.window // 2)
        return [out]

    def finish(self) -> list:
        out = self._pair(end=True)
        return [out] if out is not None else []

    def _pair(self, end: bool):
        req = _cat(self.buf["spte_requested"], self.empty["spte_requested"][REQUEST_COLUMNS])
        ts = req["ts"].to_numpy(np.int64)
        order = np.argsort(ts, kind="stable")
        ts, tid = ts[order], req["tid"].to_numpy(np.int64)[order]
        prev, has_prev, nxt, has_next = faults_mod.thread_neighbours(tid, ts)
        carried = _lookup(self.last_final, tid, -1)
        prev = np.where(has_prev, prev, carried)
        nxt = np.where(has_next, nxt, faults_mod.NO_NEXT_REQUEST)
        if end:
            final = np.ones(len(req), dtype=bool)
        else:
            h = np.minimum(self.latest["start"].horizon(tid), self.latest["install"].horizon(tid))
            final = has_next & (nxt <= h)
        if not final.any() and not end:
            return None
        fin = req.take(order[final]).assign(prev_req_ts=prev[final], next_req_ts=nxt[final])
        waiting = req.take(order[~final])
        # per thread: the last paired request (starts up to it are used) and the first
        # unpaired one (installs before it are decided)
        for t, v in _per_tid(tid[final], ts[final], np.maximum).items():
            self.last_final[t] = max(v, self.last_final.get(t, -1))
        first_wait = _per_tid(tid[~final], ts[~final], np.minimum)

        st = _cat(self.buf[self.start], self.empty[self.start][START_COLUMNS[self.start]])
        ins = _cat(self.buf[self.install], self.empty[self.install])
        if end:
            st_now, st_keep = st, st.iloc[:0]
            ins_now, ins_keep = ins, ins.iloc[:0]
        else:
            st_tid = st["tid"].to_numpy(np.int64)
            upto = _lookup(self.last_final, st_tid, -1)
            now = st["ts"].to_numpy(np.int64) <= upto
            st_now, st_keep = st[now], self._compact_starts(st[~now], first_wait)
            ins_tid = ins["tid"].to_numpy(np.int64)
            # a thread with no request waiting: none of its later installs can be matched
            # by a request already read; a future request is newer than the ring's newest
            # request read (less the slack), and can only match installs after it
            cut = _lookup(first_wait, ins_tid, NEVER)
            cut = np.where(cut == NEVER, self.latest["request"].horizon(ins_tid), cut)
            now = ins["ts"].to_numpy(np.int64) < cut
            ins_now, ins_keep = ins[now], ins[~now]
        self.buf = {"spte_requested": [waiting], self.start: [st_keep], self.install: [ins_keep]}
        self.buffered = len(waiting)
        tables = dict(self.empty)
        tables.update({"spte_requested": fin, self.start: st_now, self.install: ins_now})
        f, prefetch = faults_mod.pair(tables, self.spte_format, consume=True)
        f["fault_id"] = f["fault_id"] + self.fault_base
        self.fault_base += len(f)
        return f, prefetch

    def _compact_starts(self, st: pd.DataFrame, first_wait: dict) -> pd.DataFrame:
        """The starts still to carry: of a thread's starts before its next possible
        request, only the last can be that request's start."""
        if not len(st):
            return st
        tid = st["tid"].to_numpy(np.int64)
        bound = _lookup(first_wait, tid, NEVER)
        bound = np.where(bound == NEVER, self.latest["request"].horizon(tid), bound)
        ts = st["ts"].to_numpy(np.int64)
        early = ts < bound  # every future request of the thread is after these
        if not early.any():
            return st
        pos = np.flatnonzero(early)
        keep_early = pd.Series(ts[pos]).groupby(tid[pos]).idxmax().to_numpy()
        keep = ~early
        keep[pos[keep_early]] = True
        return st[keep]
