"""diff says what makes two recordings less comparable than their numbers
look: a different host load, and events lost on either side (offline, on the
committed fixture with the notes record writes added to a copy)."""

import json

import pandas as pd

import kvmtrace
from kvmtrace.analysis.compare import compare
from kvmtrace.analysis.hostload import host_load, load_difference
from kvmtrace.recording.reader import read

from conftest import FIXTURES

REC = FIXTURES / "x86-pvm-demo.kvt"


def _with_load(busy, steal=0.0, load1=0.5):
    rec = read(str(REC))
    notes = rec.tables["notes"]
    end = {"phase": "end", "cpus": 2, "loadavg": {"load1": load1}, "intervals": 3,
           "seconds": 3.0, "load1": {"min": load1, "max": load1},
           "busy_pct": {"min": busy, "max": busy, "run": busy},
           "steal_pct": {"min": steal, "max": steal, "run": steal}}
    extra = pd.DataFrame([{"ts": 1, "key": "host_load", "value": json.dumps(
        {"phase": "start", "cpus": 2, "loadavg": {"load1": load1}})},
        {"ts": 2, "key": "host_load", "value": json.dumps(end)}])
    rec.tables["notes"] = pd.concat([notes, extra], ignore_index=True)
    return rec


def test_host_load_read_back():
    load = host_load(_with_load(12.0))
    assert load["complete"] and load["busy_pct"]["run"] == 12.0
    assert host_load(read(str(REC))) is None  # recorded before host load was kept


def test_diff_names_a_different_host_load():
    idle, busy = kvmtrace.load(_with_load(8.0)), kvmtrace.load(_with_load(97.0, load1=6.2))
    c = compare(idle, busy)
    assert any("different host load" in n and "CPU busy 8% -> 97%" in n for n in c.notes)
    assert not compare(idle, kvmtrace.load(_with_load(15.0))).notes


def test_load_difference_thresholds():
    def load(busy, steal):
        return {"busy_pct": {"run": busy}, "steal_pct": {"run": steal}, "load1": {"max": 1.0}}
    assert load_difference(load(10, 0), load(30, 0)) is None
    assert "CPU busy" in load_difference(load(10, 0), load(40, 0))
    assert "CPU steal" in load_difference(load(10, 0), load(10, 6))
    assert load_difference(None, load(90, 0)) is None


def test_diff_names_loss_on_either_side():
    base = kvmtrace.load(str(REC))
    rec = read(str(REC))
    st = rec.tables["stats"]
    last = st[st["ts"] == st["ts"].max()].copy()
    last.loc[last["kind"] == "set_spte", "lost"] = 40
    rec.tables["stats"] = pd.concat([st, last.assign(ts=last["ts"] + 1)], ignore_index=True)
    c = compare(base, kvmtrace.load(rec))
    assert any(n.startswith("NEW lost 40 events") for n in c.notes)


def test_damaged_load_notes_say_nothing_rather_than_crash():
    bad = {"busy_pct": "x", "steal_pct": [1], "load1": [2]}
    assert load_difference(bad, bad) is None
    rec = read(str(REC))
    rec.tables["notes"] = pd.concat([rec.tables["notes"], pd.DataFrame([
        {"ts": 1, "key": "host_load", "value": json.dumps({"phase": "start", "loadavg": [1]})},
        {"ts": 2, "key": "host_load", "value": "[]"}])], ignore_index=True)
    assert host_load(rec)["complete"] is False
