"""kvmtrace export --format perfetto: the trace is written with the perfetto
package's protos and read back here with the same package's ``Trace`` proto
(its trace processor downloads a binary at run time, which these machines
cannot). Checked against the model of each committed fixture: a thread track
per vCPU thread with one slice per fault (start to install, or to the fault
handler's return) named access + size + memory type, MMIO exits and memslot
ioctls as instants, slot versions as slices carrying their verdict, a
fault-rate counter per slot that adds up to its faults, slices that nest."""

from __future__ import annotations

import collections
import os
import stat

import pytest

import kvmtrace
from kvmtrace.analysis import pages
from conftest import FIXTURES, kvmtrace as run, one_line_error
from test_fleet import cli

pb2 = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2")
TE = pb2.TrackEvent

RECS = [FIXTURES / "x86-pvm-demo.kvt", FIXTURES / "arm64" / "demo-7.x.kvt",
        FIXTURES / "arm64" / "bar-6.1.kvt"]


def _args(ev) -> dict:
    out = {}
    for a in ev.debug_annotations:
        kind = a.WhichOneof("value")
        out[a.name] = getattr(a, kind)
    return out


class Parsed:
    def __init__(self, path):
        self.trace = pb2.Trace()
        self.trace.ParseFromString(path.read_bytes())
        self.tracks = {}
        self.events = []  # (ts, track uuid, TrackEvent)
        for p in self.trace.packet:
            if p.HasField("track_descriptor"):
                self.tracks[p.track_descriptor.uuid] = p.track_descriptor
            elif p.HasField("track_event"):
                assert p.timestamp_clock_id == pb2.BUILTIN_CLOCK_MONOTONIC
                assert p.trusted_packet_sequence_id == 1
                self.events.append((p.timestamp, p.track_event.track_uuid, p.track_event))

    def under(self, uuid) -> set:
        """``uuid`` and every track below it."""
        out = {uuid}
        grew = True
        while grew:
            new = {u for u, t in self.tracks.items() if t.parent_uuid in out} - out
            out |= new
            grew = bool(new)
        return out


@pytest.fixture(scope="module", params=RECS, ids=lambda p: p.name)
def case(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("pf") / "trace.pftrace"
    r = cli("export", out, request.param)  # perfetto chosen by the suffix
    assert r.returncode == 0, r.stderr
    return kvmtrace.load(str(request.param)), Parsed(out), out


def test_clock_and_file(case):
    m, t, out = case
    first = t.trace.packet[0]
    snap = first.clock_snapshot
    assert snap.primary_trace_clock == pb2.BUILTIN_CLOCK_MONOTONIC
    clocks = {c.clock_id: c.timestamp for c in snap.clocks}
    assert clocks == {pb2.BUILTIN_CLOCK_MONOTONIC: m.meta["clock"]["monotonic_ns"],
                      pb2.BUILTIN_CLOCK_REALTIME: m.meta["clock"]["realtime_ns"]}
    assert first.sequence_flags & pb2.TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
    ts = [e[0] for e in t.events]
    assert ts == sorted(ts)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_a_thread_track_per_vcpu_with_a_slice_per_fault(case):
    m, t, _ = case
    f = m.faults
    threads = {td.thread.tid: u for u, td in t.tracks.items() if td.HasField("thread")}
    assert set(threads) == set(f["tid"]) | set(m.exits["tid"])
    procs = [td.process for td in t.tracks.values() if td.HasField("process")]
    assert [p.pid for p in procs] == sorted(set(f["pid"]))
    assert all("-m kvmtrace.guest" in p.process_name for p in procs)
    for tid, uuid in threads.items():
        lanes = t.under(uuid)
        mine = [e for e in t.events if e[1] in lanes]
        begins = [e for e in mine if e[2].type == TE.TYPE_SLICE_BEGIN]
        faults = [e for e in mine if e[2].type in (TE.TYPE_SLICE_BEGIN, TE.TYPE_INSTANT)
                  and "fault_id" in _args(e[2])]
        ff = f[f["tid"] == tid]
        assert sorted(_args(e[2])["fault_id"] for e in faults) == sorted(ff["fault_id"])
        names = collections.Counter(e[2].name for e in faults)
        want = collections.Counter(
            " ".join(x for x in (r.access or "fault", pages.size_name(int(r.mapping_size_bytes)),
                                 r.spte_memtype or "nothing installed") if x)
            for r in ff.itertuples())
        assert names == want
        # each slice lasts from the fault's start to its install (or handler return)
        stack = {}
        for ts, track, ev in mine:
            if ev.type == TE.TYPE_SLICE_BEGIN:
                assert track not in stack, "slices on one track must not overlap"
                stack[track] = (ts, _args(ev))
            elif ev.type == TE.TYPE_SLICE_END:
                begin, a = stack.pop(track)
                r = ff[ff["fault_id"] == a["fault_id"]].iloc[0]
                end = r.handler_exit_ts if r.handler_exit_ts is not None and \
                    str(r.handler_exit_ts) != "<NA>" else r.install_ts
                assert (begin, ts) == (int(r.start_ts), int(end))
                assert a.get("verdict", "") == r.verdict
                assert a["gfn"] == int(r.gfn)
                assert a["mapping_size_bytes"] == int(r.mapping_size_bytes)
        assert not stack and len(begins) <= len(ff)
        mmio = [e for e in mine if e[2].type == TE.TYPE_INSTANT and e[2].name.startswith("MMIO")]
        ex = m.exits[m.exits["tid"] == tid]
        assert sorted(_args(e[2])["gpa"] for e in mmio) == sorted(int(x) for x in ex["gpa"])


def test_memslots_verdicts_and_fault_rates_on_the_vm_track(case):
    m, t, _ = case
    vms = {u: td for u, td in t.tracks.items() if td.name.startswith("VM fd")}
    assert {td.name for td in vms.values()} == {f"VM fd {x}" for x in set(m.ops["vm_fd"])}
    inst = [e for e in t.events if e[1] in vms and e[2].type == TE.TYPE_INSTANT]
    assert sorted(e[2].name for e in inst) == sorted(
        f"{r.op} slot {r.slot_id}" for r in m.ops.itertuples())
    assert sum(_args(e[2]).get("errno", "") != "" for e in inst) == int((m.ops["ret"] < 0).sum())
    # slot versions: slices carrying the verdict of that version
    slot_tracks = {u: td for u, td in t.tracks.items()
                   if td.parent_uuid in vms and not td.HasField("counter")}
    got = sorted((t.tracks[e[1]].name, _args(e[2])["version"], _args(e[2]).get("verdict"))
                 for e in t.events if e[1] in slot_tracks and e[2].type == TE.TYPE_SLICE_BEGIN)
    v = m.verdicts[m.verdicts["version"] >= 0]
    assert got == sorted((f"slot {r.slot}", r.version, r.verdict) for r in v.itertuples())
    # fault rate counters: rate x bin width adds up to the slot's faults
    counters = {u: td for u, td in t.tracks.items() if td.HasField("counter")}
    assert all(td.counter.unit_name == "faults/s" for td in counters.values())
    per_slot = m.faults[m.faults["slot_row"] >= 0].groupby("slot").size()
    assert {td.name for td in counters.values()} == {f"slot {s} faults/s" for s in per_slot.index}
    for u, td in counters.items():
        pts = [(e[0], e[2].double_counter_value) for e in t.events if e[1] == u]
        width = pts[1][0] - pts[0][0]
        total = sum(v for _, v in pts) * width / 1e9
        assert round(total) == per_slot[int(td.name.split()[1])], td.name


def test_cli_refusals(tmp_path):
    rec = RECS[0]
    out = tmp_path / "t.pftrace"
    assert cli("export", "--format", "perfetto", out, rec).returncode == 0
    assert "exists" in one_line_error(cli("export", out, rec))
    assert cli("export", "--force", out, rec).returncode == 0
    assert "one recording" in one_line_error(cli("export", out, rec, rec))
    assert "--append" in one_line_error(cli("export", "--append", out, rec))
    link = tmp_path / "l.pftrace"
    link.symlink_to(tmp_path / "target")
    assert "symbolic link" in one_line_error(cli("export", "--force", link, rec))
    assert not (tmp_path / "target").exists()
    bad = tmp_path / "bad.kvt"
    bad.write_bytes(b"ARROW1" * 10)
    assert "recording" in one_line_error(run("export", tmp_path / "b.pftrace", bad))
    assert not (tmp_path / "b.pftrace").exists()
