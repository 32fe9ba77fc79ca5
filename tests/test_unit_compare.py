"""diff's comparison (kvmtrace.analysis.compare) on real recordings.

A recording compared with itself shows nothing. The other cases compare the
real x86 recording (tests/fixtures/x86-pvm-demo.kvt) with copies made by
rewriting its tables (``rewrite``, the way tests/test_fuzz_recordings.py
rewrites fixtures): one with every timestamp stretched (slower service
time), and one with a separate change on each of several slots (more
faults, another memory type, other flags, a slot missing, one more refused
ioctl). The comparison must find each change, on its own slot, and nothing
else.

Slots of the real run (faults from the test VMM's own record): slot 1
(anon, 68 faults), slot 2 (shared anon, 32), slot 3 (memfd, 48 faults on
32 pages), slot 7 (dirty-logged, 32), slot 9 (THP, 16). Memslot rows:
row 2 creates slot 2, row 3 slot 3, row 8 slot 9; row 12 is the refused
EEXIST.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa
import pytest

from kvmtrace.analysis import compare, faults, model
from kvmtrace.recording import format as fmt
from kvmtrace.recording.reader import read
from kvmtrace.recording.writer import RecordingWriter

from conftest import FIXTURES

X86 = FIXTURES / "x86-pvm-demo.kvt"
ARM64 = FIXTURES / "arm64" / "demo-7.x.kvt"
TIME_FIELDS = ("ts", "enter_ts", "exit_ts")
SLOT3_GFNS = range(0x1800, 0x1820)


def rewrite(src: Path, dst: Path, edit=None) -> Path:
    """``src`` re-written by kvmtrace's writer as one batch, after
    ``edit(tables)`` changed it in place; ``tables`` is {table name: list
    of rows}, each row a dict of exact Python values (u64 stay exact)."""
    with pa.ipc.open_stream(pa.py_buffer(Path(src).read_bytes())) as r:
        meta = json.loads(r.schema.metadata[fmt.META_KEY])
        tables: dict[str, list[dict]] = {name: [] for name in r.schema.names}
        for b in r:
            for i, name in enumerate(b.schema.names):
                tables[name] += b.column(i).flatten().to_pylist()
    if edit is not None:
        edit(tables)
    w = RecordingWriter(str(dst), meta, force=True)
    for name, rows in tables.items():
        typ = w.types[name]
        w.add_rows(name, [{f.name: row.get(f.name, "" if pa.types.is_string(f.type) else 0)
                           for f in typ} for row in rows])
    w.close()
    return dst


@functools.lru_cache(maxsize=1)
def _real_faults():
    return faults.pair(read(X86).tables, "legacy")[0]


def fault_rows(tables: dict, gfns) -> dict[str, list[dict]]:
    """The walk, request and install rows of the real faults on ``gfns``
    (paired as the analysis pairs them)."""
    f = _real_faults()
    f = f[f["gfn"].astype("int64").isin(list(gfns))]
    want = {"pt_walk": set(f["start_ts"].astype("int64")),
            "spte_requested": set(f["ts"].astype("int64")),
            "set_spte": set(f["install_ts"].astype("int64"))}
    return {name: [r for r in tables[name] if r["ts"] in ts] for name, ts in want.items()}


def faults_again(tables: dict, gfns):
    """The real faults on ``gfns`` (walk, request, install) happen once more,
    1 ms after the last fault event of the run, in the same order."""
    rows = fault_rows(tables, gfns)
    end = max(r["ts"] for name in rows for r in tables[name])
    shift = end + 10**6 - min(r["ts"] for name in rows for r in rows[name])
    for name, rs in rows.items():
        tables[name] += [{**r, "ts": r["ts"] + shift} for r in rs]


@pytest.fixture(scope="module")
def base():
    return model.build(X86)


def build_changed(tmp_path, edit) -> model.Model:
    return model.build(rewrite(X86, tmp_path / "new.kvt", edit))


def by_metric(c: compare.Comparison, metric: str) -> list[compare.Finding]:
    return [f for f in c.findings if f.metric == metric]


# ---------------------------------------------------------------- nothing changed

@pytest.mark.parametrize("which", ["x86-pvm-demo", "demo-7.x"])
def test_a_recording_compared_with_itself_shows_nothing(base, which):
    m = base if which == "x86-pvm-demo" else model.build(ARM64)
    c = compare.compare(m, m)
    assert c.findings == [] and c.regressions == []
    assert not (c.slots["faults_base"] != c.slots["faults_new"]).any()
    assert set(c.totals["side"]) == {"base", "new"}
    assert c.totals.groupby("side")["faults"].sum().nunique() == 1


# ---------------------------------------------------------------- slower everywhere

def test_slower_service_time_is_a_latency_regression(base, tmp_path):
    """Every timestamp of the recording stretched 3x around its start: the
    same events in the same order, each fault taking 3x as long. Service
    time is compared per slot with at least 20 faults (slots 1, 2, 3, 7)."""
    def stretch(tables):
        t0 = min(r[k] for rows in tables.values() for r in rows for k in TIME_FIELDS
                 if r.get(k))
        for rows in tables.values():
            for r in rows:
                for k in TIME_FIELDS:
                    if r.get(k):
                        r[k] = t0 + (r[k] - t0) * 3
    new = build_changed(tmp_path, stretch)
    c = compare.compare(base, new)
    assert {f.metric for f in c.findings} == {"latency"}
    regs = c.regressions
    assert {(f.as_id, f.gpa, f.size_bytes) for f in regs} == {
        (0, 0x1000000, 0x40000), (0, 0x1400000, 0x20000), (0, 0x1800000, 0x20000),
        (0, 0x2800000, 0x20000)}
    assert sorted((f.slot_base, f.slot_new) for f in regs) == [([1], [1]), ([2], [2]),
                                                              ([3], [3]), ([7], [7])]
    assert {compare.label(f).split(" ")[1] for f in regs} == {"1", "2", "3", "7"}
    for f in regs:
        assert f.message.startswith("p50 fault time +200%"), f.message
        assert f.new == pytest.approx(3 * f.base)
        assert f.detail["ci_low"] > 1.25  # the whole interval past the threshold
    # the other way round it is an improvement, not a regression
    back = compare.compare(new, base)
    assert len(back.findings) == 4 and back.regressions == []
    assert all(f.message.startswith("p50 fault time -67%") for f in back.findings)


# ---------------------------------------------------------------- one change per slot



SLOT1_GFNS = range(0x1000, 0x1040)
SLOT1, SLOT2, SLOT3 = (0, 0x1000000, 0x40000), (0, 0x1400000, 0x20000), (0, 0x1800000, 0x20000)
SLOT9 = (0, 0x3000000, 0x200000)  # the THP slot: 2 MiB
LABEL1 = "slot 1 (GPA 0x1000000+256 KiB)"
LABEL3 = "slot 3 (GPA 0x1800000+128 KiB)"


def _slot_changes(tables):
    ms = tables["memslot"]
    # slot 3: dirty logging on, and its 48 faults happen twice
    next(r for r in ms if r["slot"] == 3)["flags"] = 1
    faults_again(tables, SLOT3_GFNS)
    # slot 1: every installed spte with PCD|PWT (PAT entry 3: UC)
    for r in fault_rows(tables, SLOT1_GFNS)["set_spte"]:
        r["spte"] |= 0x18
    # slot 2: READONLY, nothing else
    next(r for r in ms if r["slot"] == 2 and r["size"])["flags"] = 2
    # slot 9: never created
    ms[:] = [r for r in ms if r["slot"] != 9]
    # the refused EEXIST issued twice
    refused = next(r for r in ms if r["ret"] == -17)
    ms.append({**refused, "ts": refused["ts"] + 10**6, "enter_ts": refused["enter_ts"] + 10**6})


@pytest.fixture(scope="module")
def changed(base, tmp_path_factory):
    new = model.build(rewrite(X86, tmp_path_factory.mktemp("cmp") / "new.kvt", _slot_changes))
    return new, compare.compare(base, new)


def test_each_change_is_found_on_its_own_slot_and_nothing_else(changed):
    _, c = changed
    assert sorted((f.metric, compare.label(f), f.regression) for f in c.findings) == [
        ("errors", "all slots", True),
        ("faults", LABEL3, True),
        ("memtype", LABEL1, True),
        ("slots", "slot 9 (GPA 0x3000000)", False)]
    # the slot of each finding is data: address space, GPA, size, slot id per side
    assert sorted(((f.metric, f.key, f.slot_base, f.slot_new) for f in c.findings),
                  key=str) == sorted([
        ("errors", None, None, None), ("faults", SLOT3, [3], [3]),
        ("memtype", SLOT1, [1], [1]), ("slots", SLOT9, [9], None)], key=str)


def test_more_faults_on_one_slot(base, changed):
    new, c = changed
    assert len(new.faults) == len(base.faults) + 48
    f = by_metric(c, "faults")[0]
    assert (f.base, f.new, f.message) == (48, 96, "faults 48 -> 96 (+100%)")
    row = c.slots[c.slots["gpa"] == 0x1800000].iloc[0]
    assert (row["pages_base"], row["pages_new"]) == (32, 32)
    # past a threshold of +150% it is still reported, but not a regression
    lenient = compare.compare(base, new, thresholds={"faults": 1.5}, metrics=("faults",))
    assert [(f.key, f.regression) for f in by_metric(lenient, "faults")] == [(SLOT3, False)]
    assert {f.metric for f in lenient.findings} == {"faults", "slots"}  # slots always


def test_dirty_logging_turned_on_is_named_as_the_cause(changed):
    """Slot 3 was created with KVM_MEM_LOG_DIRTY_PAGES in the new copy;
    slot 1 had dirty logging turned on during both runs: no cause there."""
    _, c = changed
    assert c.causes[SLOT3] == [{"cause": "dirty_logging", "base": False, "new": True,
                                "message": "dirty logging turned on"}]
    assert by_metric(c, "faults")[0].causes == c.causes[SLOT3]  # each finding carries them
    row = c.slots[c.slots["gpa"] == 0x1800000].iloc[0]
    assert (row["flags_base"], row["flags_new"]) == ([""], ["LOG_DIRTY_PAGES"])
    assert c.causes[SLOT1] == []


def test_a_flags_change_alone_is_a_cause_not_a_finding(changed):
    _, c = changed
    assert c.causes[SLOT2] == [{"cause": "flags", "base": [""], "new": ["READONLY"],
                                "message": "flags - -> READONLY"}]
    assert not [f for f in c.findings if f.key == SLOT2]


def test_a_slot_whose_memory_type_changed(changed):
    new, c = changed
    on1 = new.faults["gfn"].astype("int64").isin(list(SLOT1_GFNS))
    assert on1.sum() == 68 and set(new.faults.loc[on1, "spte_memtype"]) == {"UC"}
    f = by_metric(c, "memtype")[0]
    assert (f.base, f.new) == ({"WB": 1.0}, {"UC": 1.0})
    assert f.message == "memory types WB 100% -> UC 100%"
    row = c.slots[c.slots["gpa"] == 0x1000000].iloc[0]
    assert (row["cacheable_share_base"], row["cacheable_share_new"]) == (1.0, 0.0)


def test_a_missing_slot_and_a_new_refusal(changed):
    """Slot 9 only in BASE is not a regression by itself; one more refused
    memslot ioctl is."""
    _, c = changed
    assert [(f.message, f.base, f.new, f.regression) for f in by_metric(c, "slots")] == \
        [("only in BASE", True, False, False)]
    assert [(f.message, f.base, f.new, f.detail) for f in by_metric(c, "errors")] == \
        [("KVM_SET_USER_MEMORY_REGION EEXIST: 1 -> 2", 1, 2,
          {"what": "KVM_SET_USER_MEMORY_REGION", "errno": "EEXIST"})]


def test_json_findings_name_the_slot_in_data_columns(base, changed):
    """diff --format json: each finding names its slot by address space, GPA,
    size and slot ids (schema.DIFF_FINDINGS); prose only in ``message`` (and
    the causes' ``message``), beside the structured fields."""
    from kvmtrace import render
    from kvmtrace.analysis import schema

    new, c = changed
    body = json.loads(render.diff_to_json(base, new, c))
    rows = body["findings"]
    assert [list(r) for r in rows] == [schema.DIFF_FINDINGS.names] * len(c.findings)
    faults = next(r for r in rows if r["metric"] == "faults")
    assert (faults["as_id"], faults["gpa"], faults["size_bytes"]) == SLOT3
    assert (faults["slot_base"], faults["slot_new"]) == ([3], [3])
    assert (faults["base"], faults["new"], faults["regression"]) == (48, 96, True)
    assert faults["message"] == "faults 48 -> 96 (+100%)"
    assert faults["causes"] == [{"cause": "dirty_logging", "base": False, "new": True,
                                 "message": "dirty logging turned on"}]
    gone = next(r for r in rows if r["metric"] == "slots")
    assert (gone["gpa"], gone["slot_base"], gone["slot_new"]) == (0x3000000, [9], None)
    errors = next(r for r in rows if r["metric"] == "errors")
    assert (errors["as_id"], errors["gpa"], errors["slot_base"]) == (None, None, None)
    # the slots table: slot ids and flags as data too
    s = next(r for r in body["slots"] if r["gpa"] == 0x1800000)
    assert (s["slot_base"], s["flags_base"], s["flags_new"]) == ([3], [""], ["LOG_DIRTY_PAGES"])
    assert next(r for r in body["slots"] if r["gpa"] == 0x3000000)["slot_new"] is None
    # the human summary line still says it all
    assert f"REGRESSION: {LABEL3}: faults 48 -> 96 (+100%); cause: dirty logging turned on" \
        in body["summary"]
