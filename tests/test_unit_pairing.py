"""Fault pairing: tracepoint events joined into one row per fault.

x86 (kvmtrace.analysis.faults.pair): a fault is a kvm_mmu_spte_requested;
its start is the last kvm_mmu_pagetable_walk / kvm_page_fault on that thread
since the previous request, its install the first kvm_mmu_set_spte /
kvm_tdp_mmu_spte_changed on that thread after it for the same gfn (aligned
to the request's level) and before the next request; other spte writes are
prefetches. arm64 (kvmtrace.analysis.stage2.pair): a fault is a
kvm_handle_guest_abort call, its IPA and ESR the kvm:kvm_guest_fault inside
it, its install the last stage-2 map / relax on that thread inside it.

Real data: tests/fixtures/x86-pvm-demo.kvt (KVM-PVM shadow paging, one vCPU
thread), the raw ring records of tests/fixtures/raw-x86-pvm (captured by
tests/fixtures/capture_raw.py, no start events), tests/fixtures/arm64/*.kvt;
totals are compared with the test VMM's own counts (*.guest.json). The
hand-made cases are real rows with a few fields changed, each saying which.

The x86 guest identity-maps its data, so a walk's address is the faulting
GPA: a start paired with the wrong request would show as a page mismatch.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest

from kvmtrace.analysis import faults, stage2
from kvmtrace.recording.reader import read

from conftest import FIXTURES, load_json

X86 = FIXTURES / "x86-pvm-demo.kvt"
RAW = FIXTURES / "raw-x86-pvm"
ARM64 = sorted((FIXTURES / "arm64").glob("*.kvt"))
PFERR_WRITE, PFERR_FETCH = 1 << 1, 1 << 4


def ints(values) -> list:
    return [None if pd.isna(v) else int(v) for v in values]


def na(v) -> bool:
    return v is None or pd.isna(v)


@functools.lru_cache(maxsize=None)
def _read(path):
    return read(path)


def tables_of(path) -> dict:
    """A fresh copy of a recording's tables, for a test to edit."""
    return {name: df.copy() for name, df in _read(path).tables.items()}


def x86_tables() -> dict:
    return tables_of(X86)


@functools.lru_cache(maxsize=None)
def _real_x86():
    return faults.pair(x86_tables(), "legacy")


def x86_pair(tables=None, spte_format="legacy"):
    """pair() of ``tables``; of the real x86 tables by default (computed
    once: do not edit what it returns)."""
    return _real_x86() if tables is None else faults.pair(tables, spte_format)


def by_tid_ts(df: pd.DataFrame) -> dict:
    """{(tid, ts): row} of a raw event table (ts is unique per thread)."""
    keys = list(zip(ints(df["tid"]), ints(df["ts"])))
    assert len(set(keys)) == len(keys)
    return {k: r for k, r in zip(keys, df.itertuples(index=False))}


def prev_next(req: pd.DataFrame) -> dict:
    """{(tid, ts): (previous request ts, next request ts)} on that thread."""
    out = {}
    for tid, g in req.groupby("tid"):
        ts = sorted(ints(g["ts"]))
        for i, t in enumerate(ts):
            out[(int(tid), t)] = (ts[i - 1] if i else -1, ts[i + 1] if i + 1 < len(ts) else 2**63)
    return out


def x86_fault_rows(tables, f, k) -> dict:
    """The real rows of fault k (its walk, request and install), by position."""
    r = f.iloc[k]
    pick = {}
    for name, col in (("pt_walk", "start_ts"), ("spte_requested", "ts"),
                      ("set_spte", "install_ts")):
        t = tables[name]
        pick[name] = t.index[(t["ts"].astype("int64") == int(r[col]))
                             & (t["tid"].astype("int64") == int(r["tid"]))][0]
    return pick


def with_rows(df: pd.DataFrame, *rows: dict) -> pd.DataFrame:
    """``df`` plus rows given as {column: value} (other columns copied from
    the first row named by '_from', an index label of df)."""
    extra = []
    for spec in rows:
        spec = dict(spec)
        r = df.loc[[spec.pop("_from")]].copy()
        for k, v in spec.items():
            r[k] = v
        extra.append(r)
    return pd.concat([df, *extra], ignore_index=True)


# ================================================================ x86, real

def test_x86_every_request_is_one_fault_and_matches_the_vmm():
    guest = load_json(X86.with_suffix(".guest.json"))
    t = x86_tables()
    f, prefetch = x86_pair()
    assert len(f) == len(t["spte_requested"]) == guest["expected_faults_total"] == 229
    assert sorted(ints(f["ts"])) == sorted(ints(t["spte_requested"]["ts"]))
    assert not len(prefetch)  # KVM-PVM prefetched nothing in this run
    assert f["install_ts"].notna().all() and f["start_ts"].notna().all()
    assert set(f["start_kind"]) == {"kvm_mmu_pagetable_walk"}


def test_x86_install_is_the_requests_gfn_before_the_next_request():
    t = x86_tables()
    f, _ = x86_pair()
    installs = by_tid_ts(t["set_spte"])
    around = prev_next(t["spte_requested"])
    used = set()
    for r in f.itertuples(index=False):
        key = (int(r.tid), int(r.install_ts))
        ins = installs[key]
        used.add(key)
        pages = 1 << (9 * (int(r.level) - 1))
        assert int(ins.gfn) & ~(pages - 1) == int(r.gfn) & ~(pages - 1)
        assert int(r.ts) <= int(r.install_ts) < around[(int(r.tid), int(r.ts))][1]
        assert int(r.spte) == int(ins.spte)
    assert len(used) == len(f)  # no install serves two faults


def test_x86_start_is_the_last_walk_since_the_previous_request():
    t = x86_tables()
    f, _ = x86_pair()
    walks = t["pt_walk"].assign(ts=t["pt_walk"]["ts"].astype("int64"),
                                tid=t["pt_walk"]["tid"].astype("int64"))
    by = by_tid_ts(walks)
    around = prev_next(t["spte_requested"])
    for r in f.itertuples(index=False):
        tid, ts, start = int(r.tid), int(r.ts), int(r.start_ts)
        prev = around[(tid, ts)][0]
        assert prev < start <= ts
        between = walks[(walks["tid"] == tid) & (walks["ts"] > start) & (walks["ts"] <= ts)]
        assert not len(between)
        w = by[(tid, start)]
        assert int(w.addr) >> 12 == int(r.gfn)  # identity-mapped guest: the same page
        assert int(r.error_code) == int(w.pferr)
        assert int(r.service_ns) == int(r.install_ts) - start >= 0


def test_x86_access_kind_from_the_error_code():
    """PFERR_FETCH -> exec, else PFERR_WRITE -> write, else read; the walks
    of this run carry 4 (user read), 6 (user write), 7 (write to a present
    read-only page: the second fault of a read-then-write) and 0x14 (fetch)."""
    f, _ = x86_pair()
    ec = np.array(ints(f["error_code"]))
    want = np.where(ec & PFERR_FETCH, "exec", np.where(ec & PFERR_WRITE, "write", "read"))
    assert list(f["access"]) == list(want)
    assert set(ec) == {4, 6, 7, 0x14}


def test_x86_per_slot_counts_match_the_vmm():
    """Per slot of the test VMM: faults, read / write sptes (an exec fault
    installs a read spte), exec faults and the level, all as it expected
    (all faults happened before the memslot changes)."""
    guest = load_json(X86.with_suffix(".guest.json"))
    f, _ = x86_pair()
    gfn = np.array(ints(f["gfn"]))
    seen = np.zeros(len(f), bool)
    for s in guest["slots"]:
        if s["status"] != "ok":
            continue
        m = (gfn >= s["gpa"] >> 12) & (gfn < (s["gpa"] + s["size"]) >> 12)
        seen |= m
        d, g = s["expected_faults_detail"], f[m]
        assert len(g) == s["expected_faults"] == d["total"], s["slot"]
        assert (g["access"] == "write").sum() == d["write_sptes"], s["slot"]
        assert g["access"].isin(["read", "exec"]).sum() == d["read_sptes"], s["slot"]
        assert (g["access"] == "exec").sum() == s["touched_counts"].get("x", 0), s["slot"]
        assert set(ints(g["level"])) <= {d["level"]}
    assert seen.all()


def _raw_tables():
    from kvmtrace.collectors.ringbuf import decode
    from kvmtrace.probes import codegen
    from kvmtrace.probes.events import EVENTS

    t = {name: df.iloc[0:0].copy() for name, df in x86_tables().items()}
    for name in ("set_spte", "spte_requested"):
        body, _ = decode(np.frombuffer((RAW / f"{name}.bin").read_bytes(), dtype=np.uint8),
                         codegen.record_dtype(EVENTS[name]))
        t[name] = pd.DataFrame({c: body[c] for c in body.dtype.names})
    return t


def test_raw_ring_records_pair_without_start_events():
    """The raw records of the 'minimal' run (only requests and installs were
    traced): every request pairs with its install, there is no start, so no
    service time, and read / write comes from the spte's W bit."""
    guest = load_json(RAW / "guest.json")
    t = _raw_tables()
    f, prefetch = faults.pair(t, "legacy")
    assert len(f) == guest["expected_faults_total"] == 17 and not len(prefetch)
    assert f["install_ts"].notna().all() and f["start_ts"].isna().all()
    assert f["service_ns"].isna().all() and set(f["start_kind"]) == {""}
    d = [s["expected_faults_detail"] for s in guest["slots"]]
    assert (f["access"] == "write").sum() == sum(x["write_sptes"] for x in d)
    assert (f["access"] == "read").sum() == sum(x["read_sptes"] for x in d)
    spte_w = [(int(s) >> 1) & 1 for s in f["spte"]]
    assert list(f["access"]) == ["write" if w else "read" for w in spte_w]


# ================================================================ x86, hand-made

def test_two_threads_interleaved():
    """Faults 1 and 2 of the real run (gfn 0x1000 and 0x1001, one walk,
    request and install each); fault 2's rows moved to a second vCPU thread
    and all six re-timed to interleave: walk1 walk2 req1 req2 set1 set2."""
    t = x86_tables()
    f, _ = x86_pair()
    a, b = x86_fault_rows(t, f, 1), x86_fault_rows(t, f, 2)
    t0 = int(t["pt_walk"].loc[a["pt_walk"], "ts"])
    times = {"pt_walk": (0, 100), "spte_requested": (200, 300), "set_spte": (400, 500)}
    tid2 = int(f["tid"].iloc[0]) + 1
    for name, (ta, tb) in times.items():
        rows = t[name].loc[[a[name], b[name]]].copy()
        rows["ts"] = [t0 + ta, t0 + tb]
        rows["tid"] = [rows["tid"].iloc[0], tid2]
        t[name] = rows.reset_index(drop=True)
    got, prefetch = faults.pair(t, "legacy")
    assert not len(prefetch)
    assert ints(got["gfn"]) == [0x1000, 0x1001]
    assert [int(x) - t0 for x in got["start_ts"]] == [0, 100]
    assert [int(x) - t0 for x in got["install_ts"]] == [400, 500]
    assert ints(got["service_ns"]) == [400, 400]
    # the same rows on one thread: the thread is what keeps them apart
    one = {k: (v.assign(tid=v["tid"].iloc[0]) if k in times else v) for k, v in t.items()}
    g1, _ = faults.pair(one, "legacy")
    assert int(g1["start_ts"].iloc[0]) - t0 == 100


def test_lost_install_leaves_the_fault_without_one():
    """The real run without fault 10's kvm_mmu_set_spte (lost in the ring):
    fault 10 keeps its start and access kind but has no install, spte or
    service time; fault 11's install is not taken for it."""
    t = x86_tables()
    f, _ = x86_pair()
    k = 10
    rows = x86_fault_rows(t, f, k)
    t["set_spte"] = t["set_spte"].drop(index=rows["set_spte"])
    g, prefetch = faults.pair(t, "legacy")
    assert len(g) == len(f) and not len(prefetch)
    r = g.iloc[k]
    assert na(r["install_ts"]) and na(r["spte"]) and na(r["service_ns"])
    assert int(r["start_ts"]) == int(f["start_ts"].iloc[k]) and r["access"] == f["access"].iloc[k]
    others = np.arange(len(f)) != k
    assert ints(g["install_ts"][others]) == ints(f["install_ts"][others])


def test_a_start_before_the_previous_request_is_not_used():
    """The real run without the walk of fault 20 (a write): the last walk
    before its request is fault 19's, which precedes fault 19's request, so
    fault 20 has no start (no service time) and its access kind comes from
    the installed spte's W bit."""
    t = x86_tables()
    f, _ = x86_pair()
    k = 20
    assert f["access"].iloc[k] == "write"
    t["pt_walk"] = t["pt_walk"].drop(index=x86_fault_rows(t, f, k)["pt_walk"])
    g, _ = faults.pair(t, "legacy")
    r = g.iloc[k]
    assert na(r["start_ts"]) and na(r["error_code"]) and na(r["service_ns"])
    assert r["start_kind"] == "" and r["access"] == "write"
    assert int(r["install_ts"]) == int(f["install_ts"].iloc[k])
    assert int(g["start_ts"].iloc[k - 1]) == int(f["start_ts"].iloc[k - 1])


def test_2m_request_pairs_with_its_aligned_install():
    """Fault 2 of the real run (gfn 0x1001) turned into a 2M request: its
    install at the 2M-aligned gfn 0x1000, level 2, pairs with it; an
    install in the next 2M region does not, and is a prefetch."""
    t = x86_tables()
    f, _ = x86_pair()
    k = 2
    rows = x86_fault_rows(t, f, k)
    t["spte_requested"].loc[rows["spte_requested"], "level"] = 2
    t["set_spte"].loc[rows["set_spte"], ["gfn", "level"]] = [0x1000, 2]
    g, prefetch = faults.pair(t, "legacy")
    r = g.iloc[k]
    assert int(r["gfn"]) == 0x1001 and int(r["level"]) == 2
    assert int(r["install_ts"]) == int(f["install_ts"].iloc[k]) and not len(prefetch)

    t["set_spte"].loc[rows["set_spte"], "gfn"] = 0x1200
    g, prefetch = faults.pair(t, "legacy")
    assert na(g["install_ts"].iloc[k])
    assert ints(prefetch["gfn"]) == [0x1200]


def test_prefetches_are_exactly_the_unpaired_installs():
    """Three kvm_mmu_set_spte rows for the next gfns written just after
    fault 30's install on its thread (what KVM's pte prefetch does): they
    are the prefetches, and every fault keeps its own install."""
    t = x86_tables()
    f, _ = x86_pair()
    k = 30
    s = x86_fault_rows(t, f, k)["set_spte"]
    ts, gfn = int(t["set_spte"].loc[s, "ts"]), int(t["set_spte"].loc[s, "gfn"])
    assert int(f["ts"].iloc[k + 1]) > ts + 3
    t["set_spte"] = with_rows(t["set_spte"], *({"_from": s, "ts": ts + i, "gfn": gfn + i}
                                              for i in (1, 2, 3)))
    g, prefetch = faults.pair(t, "legacy")
    assert ints(g["install_ts"]) == ints(f["install_ts"])
    assert sorted(zip(ints(prefetch["ts"]), ints(prefetch["gfn"]))) == \
        [(ts + i, gfn + i) for i in (1, 2, 3)]
    paired = set(zip(ints(g["tid"]), ints(g["install_ts"])))
    rest = set(zip(ints(prefetch["tid"]), ints(prefetch["ts"])))
    assert not paired & rest
    assert len(paired) + len(rest) == len(t["set_spte"])


def _tdp_tables(error_code) -> dict:
    """The real run as a TDP host records it: each walk as a kvm:kvm_page_fault
    with ``error_code(pferr)``, each kvm_mmu_set_spte also as a
    kvm_tdp_mmu_spte_changed (old_spte 0: a new leaf)."""
    t = x86_tables()
    w, s = t["pt_walk"], t["set_spte"]
    pf = pd.DataFrame({"ts": w["ts"], "pid": w["pid"], "tid": w["tid"],
                       "vcpu_fd": w["vcpu_fd"], "cpu": w["cpu"], "vcpu_id": 0, "guest_rip": 0,
                       "fault_address": w["addr"],
                       "error_code": [error_code(int(p)) for p in w["pferr"]]})
    t["page_fault"] = pf.astype({c: t["page_fault"][c].dtype for c in pf.columns})
    ch = pd.DataFrame({"ts": s["ts"], "pid": s["pid"], "tid": s["tid"], "vcpu_fd": s["vcpu_fd"],
                       "cpu": s["cpu"], "gfn": s["gfn"], "old_spte": 0, "new_spte": s["spte"],
                       "level": s["level"], "as_id": 0})
    t["tdp_spte_changed"] = ch.astype({c: t["tdp_spte_changed"][c].dtype for c in ch.columns})
    return t


def _ept_qualification(pferr: int) -> int:
    """EPT violation exit qualification bits 0-2: data read, data write,
    instruction fetch (Intel SDM, table "Exit Qualification for EPT
    Violations"); KVM 6.x traces it raw in kvm:kvm_page_fault."""
    return 4 if pferr & PFERR_FETCH else 2 if pferr & PFERR_WRITE else 1


def test_ept_access_from_the_exit_qualification():
    real, _ = x86_pair()
    t = _tdp_tables(_ept_qualification)
    f, prefetch = faults.pair(t, "ept")
    assert set(f["start_kind"]) == {"kvm_page_fault"} and not len(prefetch)
    assert list(f["access"]) == list(real["access"])
    assert ints(f["install_ts"]) == ints(real["install_ts"])
    assert ints(f["spte"]) == ints(real["spte"])


def test_npt_access_from_the_pferr_error_code():
    """AMD NPT traces the #NPF error code (PFERR bits) in kvm:kvm_page_fault;
    its sptes are legacy-format, installed through kvm_mmu_set_spte."""
    real, _ = x86_pair()
    t = _tdp_tables(lambda p: p)
    t["tdp_spte_changed"] = t["tdp_spte_changed"].iloc[0:0]
    f, _ = faults.pair(t, "legacy")
    assert set(f["start_kind"]) == {"kvm_page_fault"}
    assert list(f["access"]) == list(real["access"])
    assert ints(f["service_ns"]) == ints(real["service_ns"])


def test_tdp_page_table_links_are_not_the_install():
    """Faults 1 and 2 of the real run (gfn 0x1000, 0x1001) on a TDP host
    whose first touch of the region created the level-1 page table: one
    non-leaf change at level 2, gfn 0x1000, just after each request (new_spte
    a page-table pointer: RWX and accessed, no memory type bits)."""
    t = _tdp_tables(_ept_qualification)
    real, _ = x86_pair()
    ch = t["tdp_spte_changed"]
    links = []
    for k in (1, 2):
        leaf = ch.index[(ch["ts"].astype("int64") == int(real["install_ts"].iloc[k]))][0]
        links.append({"_from": leaf, "ts": int(real["ts"].iloc[k]) + 1, "gfn": 0x1000,
                      "level": 2, "new_spte": (0x2a1b3 << 12) | 0x107})
    t["tdp_spte_changed"] = with_rows(ch, *links)
    f, prefetch = faults.pair(t, "ept")
    for k in (1, 2):
        assert int(f["install_ts"].iloc[k]) == int(real["install_ts"].iloc[k])
        assert int(f["spte"].iloc[k]) == int(real["spte"].iloc[k])
    assert not len(prefetch) or set(ints(prefetch["level"])) == {2}


# ================================================================ arm64, real

def _arm(path):
    return _read(path), tables_of(path)


@functools.lru_cache(maxsize=None)
def _real_arm(path):
    return stage2.pair(tables_of(path), _read(path).meta)


def _installs(t) -> dict:
    m = t["s2_map"].assign(kind="map")
    r = t["s2_relax"].assign(kind="relax")
    return {**by_tid_ts(m), **by_tid_ts(r)} if len(r) else by_tid_ts(m)


@pytest.mark.parametrize("path", ARM64, ids=lambda p: p.stem)
def test_arm64_faults_and_installs(path):
    """Every kvm_handle_guest_abort is one fault; its install lies on its
    thread inside the handler call and maps the faulting IPA; installs
    either belong to one fault or are reported apart; service time is the
    handler call; a refused or exiting fault (return <= 0) installs nothing."""
    rec, t = _arm(path)
    f, other = _real_arm(path)
    assert len(f) == len(t["guest_abort"])
    assert int(f["installs"].sum()) + len(other) == len(t["s2_map"]) + len(t["s2_relax"])
    ins = _installs(t)
    for r in f.itertuples(index=False):
        assert int(r.service_ns) == int(r.handler_exit_ts) - int(r.ts) >= 0
        if int(r.handler_ret) <= 0:
            assert int(r.installs) == 0
        if not int(r.installs):
            assert na(r.install_ts) and na(r.spte)
            continue
        i = ins[(int(r.tid), int(r.install_ts))]
        assert int(r.ts) <= int(r.install_ts) <= int(r.handler_exit_ts)
        assert int(r.spte) == int(i.prot) and r.install_kind == i.kind
        if i.kind == "map":
            size = int(i.size)
            assert int(i.ipa) % size == 0
            assert int(i.ipa) <= int(r.gfn) * 4096 < int(i.ipa) + size
            assert int(r.level) == {4096: 1, 2 << 20: 2, 1 << 30: 3}[size]


@pytest.mark.parametrize("path", ARM64, ids=lambda p: p.stem)
def test_arm64_access_kind_from_the_esr(path):
    """ESR_EL2.EC 0x20/0x21 (instruction abort) -> exec; 0x24/0x25 (data
    abort) with WnR (bit 6) -> write; else read."""
    f, _ = _real_arm(path)
    esr = np.array(ints(f["error_code"]), dtype=np.int64)
    ec = (esr >> 26) & 0x3f
    want = np.where(np.isin(ec, (0x20, 0x21)), "exec",
                    np.where(np.isin(ec, (0x24, 0x25)) & (esr & (1 << 6) != 0), "write", "read"))
    assert list(f["access"]) == list(want)
    assert {"exec", "write", "read"} <= set(f["access"])


@pytest.mark.parametrize("path", ARM64, ids=lambda p: p.stem)
def test_arm64_per_slot_counts_match_the_vmm(path):
    """Per slot of the test VMM: faults, stage-2 maps (and their levels),
    permission relaxations and exec faults as it expected; the faults
    outside every slot are the VMM's MMIO exits to an unbacked GPA."""
    guest = load_json(path.with_suffix(".guest.json"))
    f, _ = _real_arm(path)
    gfn = np.array(ints(f["gfn"]))
    seen = np.zeros(len(f), bool)
    for s in guest["slots"]:
        if s["status"] != "ok" or not s["size"]:
            continue
        m = (gfn >= s["gpa"] >> 12) & (gfn < (s["gpa"] + s["size"]) >> 12)
        seen |= m
        d, g = s["expected_faults_detail"], f[m]
        maps = g[g["install_kind"] == "map"]
        assert len(g) == d["faults"], s["slot"]
        assert len(maps) == d["set_spte"], s["slot"]
        assert (g["install_kind"] == "relax").sum() == d["relax_perms"], s["slot"]
        assert {str(k): v for k, v in maps["level"].astype(int).value_counts().items()} == \
            d["set_spte_levels"], s["slot"]
        assert (g["access"] == "exec").sum() == s["touched_counts"].get("x", 0), s["slot"]
    outside = f[~seen]
    assert len(outside) == sum(v["exits"].get("MMIO", 0) for v in guest["vcpus"]) - sum(
        s["expected_faults_detail"]["mmio_exits"] for s in guest["slots"])
    assert set(ints(outside["handler_ret"])) <= {0} and (outside["installs"] == 0).all()


# ================================================================ arm64, hand-made

DEMO7 = FIXTURES / "arm64" / "demo-7.x.kvt"


def _arm_rows(t, f, k) -> dict:
    """Index labels of fault k's rows: its abort, tracepoint and map."""
    r = f.iloc[k]
    ab, gf, mp = t["guest_abort"], t["guest_fault"], t["s2_map"]
    after = (gf["ts"].astype("int64") > int(r["ts"])) & (gf["tid"] == r["tid"])
    return {"guest_abort": ab.index[ab["ts"].astype("int64") == int(r["ts"])][0],
            "guest_fault": gf.index[after][0],
            "s2_map": mp.index[mp["ts"].astype("int64") == int(r["install_ts"])][0]}


def test_arm64_lost_install():
    """demo-7.x without fault 5's kvm_pgtable_stage2_map: fault 5 keeps its
    IPA (from the tracepoint), access and service time, with no install."""
    rec, t = _arm(DEMO7)
    f, _ = _real_arm(DEMO7)
    k = 5
    t["s2_map"] = t["s2_map"].drop(index=_arm_rows(t, f, k)["s2_map"])
    g, other = stage2.pair(t, rec.meta)
    assert len(g) == len(f) and not len(other)
    r = g.iloc[k]
    assert int(r["installs"]) == 0 and na(r["install_ts"]) and na(r["spte"])
    assert int(r["gfn"]) == int(f["gfn"].iloc[k]) and r["access"] == f["access"].iloc[k]
    assert int(r["service_ns"]) == int(f["service_ns"].iloc[k])


def test_arm64_lost_tracepoint_takes_the_ipa_from_the_install():
    """demo-7.x without fault 5's kvm:kvm_guest_fault: the next fault's
    tracepoint lies after fault 5's handler returned, so it is not used;
    fault 5's page comes from its install and its access kind is unknown
    (read). Without the install too, fault 5 has no page and is dropped."""
    rec, t = _arm(DEMO7)
    f, _ = _real_arm(DEMO7)
    k = 5
    rows = _arm_rows(t, f, k)
    t["guest_fault"] = t["guest_fault"].drop(index=rows["guest_fault"])
    g, _ = stage2.pair(t, rec.meta)
    assert len(g) == len(f)
    r = g.iloc[k]
    assert int(r["gfn"]) == int(f["gfn"].iloc[k]) and na(r["error_code"])
    assert r["access"] == "read" and int(r["installs"]) == 1
    assert ints(g["gfn"].iloc[k + 1:]) == ints(f["gfn"].iloc[k + 1:])

    t["s2_map"] = t["s2_map"].drop(index=rows["s2_map"])
    g, _ = stage2.pair(t, rec.meta)
    assert len(g) == len(f) - 1
    assert ints(g["ts"]) == ints(f["ts"].drop(index=f.index[k]))


def test_arm64_two_threads_interleaved():
    """Faults 5 and 6 of demo-7.x; fault 6's abort, tracepoint and map moved
    to a second vCPU thread and re-timed so both handler calls overlap:
    abort5 abort6 tp5 tp6 map6 map5 exit5 exit6. Each fault keeps its own."""
    rec, t = _arm(DEMO7)
    f, _ = _real_arm(DEMO7)
    a, b = _arm_rows(t, f, 5), _arm_rows(t, f, 6)
    t0 = int(t["guest_abort"].loc[a["guest_abort"], "ts"])
    tid2 = int(f["tid"].iloc[0]) + 1
    keep = {}
    for name, ta, tb in (("guest_abort", 0, 100), ("guest_fault", 200, 300),
                         ("s2_map", 500, 400)):
        rows = t[name].loc[[a[name], b[name]]].copy()
        rows["ts"] = [t0 + ta, t0 + tb]
        rows["tid"] = [rows["tid"].iloc[0], tid2]
        if "exit_ts" in rows:
            rows["exit_ts"] = [t0 + (900 if name == "guest_abort" else ta + 50),
                               t0 + (1000 if name == "guest_abort" else tb + 50)]
        keep[name] = rows.reset_index(drop=True)
    t.update(keep)
    t["s2_relax"] = t["s2_relax"].iloc[0:0]
    g, other = stage2.pair(t, rec.meta)
    assert not len(other)
    assert ints(g["gfn"]) == ints(f["gfn"].iloc[5:7])
    assert [int(x) - t0 for x in g["install_ts"]] == [500, 400]
    assert ints(g["spte"]) == ints(f["spte"].iloc[5:7])
    assert ints(g["service_ns"]) == [900, 900]


def test_arm64_map_outside_every_fault_is_reported_apart():
    """A copy of fault 5's stage-2 map on its thread after its handler
    returned and before the next abort (a map no abort asked for): not an
    install of either fault."""
    rec, t = _arm(DEMO7)
    f, _ = _real_arm(DEMO7)
    k = 5
    m = _arm_rows(t, f, k)["s2_map"]
    at = int(f["handler_exit_ts"].iloc[k]) + 10
    assert at < int(f["ts"].iloc[k + 1])
    t["s2_map"] = with_rows(t["s2_map"], {"_from": m, "ts": at, "exit_ts": at + 5})
    g, other = stage2.pair(t, rec.meta)
    assert ints(other["ts"]) == [at]
    assert ints(g["install_ts"]) == ints(f["install_ts"])
    assert ints(g["installs"]) == ints(f["installs"])


def test_arm64_tracepoint_only():
    """demo-7.x as a host without kprobes records it (no handler entry /
    return, no stage-2 map calls): one fault per kvm:kvm_guest_fault, with
    access kind, and no install or service time."""
    rec, t = _arm(DEMO7)
    real, _ = _real_arm(DEMO7)
    for name in ("guest_abort", "s2_map", "s2_relax", "user_mem_abort"):
        t[name] = t[name].iloc[0:0]
    f, other = stage2.pair(t, rec.meta)
    assert len(f) == len(t["guest_fault"]) and not len(other)
    assert set(f["start_kind"]) == {"kvm:kvm_guest_fault"}
    assert (f["installs"] == 0).all() and f["service_ns"].isna().all()
    assert ints(f["gfn"]) == ints(real["gfn"]) and list(f["access"]) == list(real["access"])
