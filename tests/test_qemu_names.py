"""QEMU's names for memslots, offline (issue 7): the `info mtree -f` parser
(analysis/qemu.py), the join of slot versions to QEMU's regions, the --qmp
socket found in a QEMU command line (collectors/qmp.py), and the report's
columns, on real captured answers of QEMU (tests/fixtures/qemu-x86/, see its
README) and on small tables built here for the join's edge cases.
"""

import io
import json
from pathlib import Path

import pandas as pd
import pytest

import kvmtrace
from kvmtrace import render
from kvmtrace.analysis import qemu, schema, summary
from kvmtrace.collectors import qmp

FIX = Path(__file__).resolve().parent / "fixtures" / "qemu-x86"
REC = FIX / "qemu-x86.kvt"
PAGE = 4096


def test_flat_view_parser():
    text = ('FlatView #2\n AS "memory", root: system\n Root memory region: system\n'
            '  0000000000000000-0000000003ffffff (prio 0, romd): virt.flash0 KVM\n'
            '  000000003f000000-000000003fffffff (prio 0, i/o): pcie-mmcfg-mmio\n'
            '  0000000040000000-0000000043ffffff (prio 0, ram): kt-ram KVM\n'
            'FlatView #3\n AS "I/O", root: io\n'
            '  0000000000000000-000000000000ffff (prio 0, i/o): io\n')
    assert qemu.flat_view(text) == [
        {"gpa": 0, "size": 64 << 20, "kind": "romd", "name": "virt.flash0", "kvm": True},
        {"gpa": 0x3f000000, "size": 16 << 20, "kind": "i/o", "name": "pcie-mmcfg-mmio",
         "kvm": False},
        {"gpa": 0x40000000, "size": 64 << 20, "kind": "ram", "name": "kt-ram", "kvm": True}]
    assert [r["name"] for r in qemu.flat_view(text, "I/O")] == ["io"]
    # names may hold spaces (vfio's BAR mmaps); the offset and KVM mark are not the name
    line = ('FlatView #0\n AS "memory", root: system\n'
            '  0000000010000000-00000000101fffff (prio 0, ramd): 0000:00:01.0 BAR 2 mmaps[0] KVM\n'
            '  0000000000100000-0000000003ffffff (prio 0, ram): kt-ram @0000000000100000 KVM\n'
            '  0000000000000000-000000000000ffff (prio 0, nv-ram): nv @0000000000000010\n')
    assert [(r["name"], r["kind"], r["kvm"]) for r in qemu.flat_view(line)] == [
        ("0000:00:01.0 BAR 2 mmaps[0]", "ramd", True), ("kt-ram", "ram", True),
        ("nv", "nv-ram", False)]


def test_flat_views_of_a_real_answer():
    """QEMU 7.2 after SeaBIOS programmed PAM: read-only parts of pc.ram, the
    empty FlatView of the PCI bus masters, address spaces sharing a view."""
    views = qemu.flat_views((FIX / "pc-pam.mtree.txt").read_text())
    assert views["i440FX"] == [] and views["cpu-memory-0"] is views["memory"]
    mem = [(hex(r["gpa"]), hex(r["size"]), r["kind"], r["name"]) for r in views["memory"]
           if r["kvm"]]
    assert mem == [("0x0", "0xc3000", "ram", "pc.ram"), ("0xc3000", "0x25000", "rom", "pc.ram"),
                   ("0xe8000", "0x8000", "ram", "pc.ram"), ("0xf0000", "0x10000", "rom", "pc.ram"),
                   ("0x100000", "0xff00000", "ram", "pc.ram"),
                   ("0xfffc0000", "0x40000", "rom", "pc.bios")]
    # QEMU marks KVM exactly on the memory kinds
    assert all(r["kvm"] == (qemu.memory_kind(r["kind"]) is not None) for r in views["memory"])
    assert qemu.memory_kind("nv-ram") == "ram" and qemu.memory_kind("i/o") is None


# -- the join, on the real recording ----------------------------------------

@pytest.fixture(scope="module")
def model():
    return kvmtrace.load(str(REC))


def _trimmed(r):
    lo = -(-r["gpa"] // PAGE) * PAGE
    return lo, (r["gpa"] + r["size"]) // PAGE * PAGE - lo


def test_fixture_slots_named_as_qemu_saw_them(model):
    w = json.loads((FIX / "qemu-x86.witness.json").read_text())
    t = int(w["monotonic_ns"])
    s = model.slots
    alive = s[(s["start_ts"].astype("uint64") <= t) & (s["end_ts"].astype("uint64") > t)]
    got = {(int(r.gpa), int(r.size_bytes)): (r.qemu_region, r.qemu_kind)
           for r in alive.itertuples()}
    want = {_trimmed(r): (r["name"], qemu.memory_kind(r["kind"]))
            for r in qemu.flat_view(w["mtree"]) if qemu.memory_kind(r["kind"])}
    assert got == want
    assert {n for n, _ in want.values()} == {"kt-ram", "kt-dimm-a", "pc.rom", "pc.bios"}
    # the memfd backend's VMA does not say kt-ram; QEMU does
    ram = s[s["qemu_region"] == "kt-ram"]
    assert len(ram) == 2 and ram["vma"].str.startswith("memfd:memory-backend-memfd").all()


def test_fixture_every_name_from_an_answer_while_live(model):
    dumps = model.recording["qmp_mtree"]
    assert len(dumps) == 3 and (dumps["request_ts"] <= dumps["ts"]).all()
    s = model.slots
    for r in s.itertuples():
        seen = dumps[(dumps["pid"] == r.pid) & (dumps["request_ts"] >= r.start_ts)
                     & (dumps["ts"] <= r.end_ts)]
        names = {(n["name"], qemu.memory_kind(n["kind"])) for x in seen["text"]
                 for n in qemu.flat_view(x) if qemu.memory_kind(n["kind"])
                 and _trimmed(n) == (int(r.gpa), int(r.size_bytes))}
        if pd.isna(r.qemu_region):
            assert not names, r  # never a name no answer gave
        else:
            assert (r.qemu_region, r.qemu_kind) in names, r


def test_fixture_report_columns(model):
    slots = summary.slot_summary(model)
    assert list(slots.columns[-3:]) == ["vm_instance", "qemu_region", "qemu_kind"]
    rows = schema.records(slots)
    assert {(x["qemu_region"], x["qemu_kind"]) for x in rows} >= {("kt-dimm-a", "ram"),
                                                                  ("pc.bios", "rom")}
    csv = render.to_csv(model).splitlines()
    assert csv[0].endswith(",vm_instance,qemu_region,qemu_kind")
    out = io.StringIO()
    render.to_text(model, render.make_console(file=out, width=220))
    text = out.getvalue()
    assert "QEMU region" in text and "kt-dimm-a (ram)" in text and "pc.rom (rom)" in text
    assert not model.notes, model.notes


def test_no_qmp_no_names():
    """Without QEMU's answers a slot has no name, and the text report no column."""
    m = kvmtrace.load(str(Path(__file__).resolve().parent / "fixtures" / "x86-pvm-demo.kvt"))
    assert len(m.slots) and m.slots["qemu_region"].isna().all()
    assert m.slots["qemu_kind"].isna().all()
    out = io.StringIO()
    render.to_text(m, render.make_console(file=out, width=220))
    assert "QEMU region" not in out.getvalue()


# -- the join's edges, on small tables ---------------------------------------

MTREE = ('FlatView #0\n AS "memory", root: system\n Root memory region: system\n'
         '  0000000000000000-0000000000000fff (prio 0, i/o): io-here\n'
         '  0000000000100000-00000000001fffff (prio 0, ram): big KVM\n'
         '  0000000000200800-00000000002027ff (prio 0, romd): odd KVM\n'
         'FlatView #1\n AS "KVM-SMRAM", root: mem-container-smram\n'
         '  0000000000100000-00000000001fffff (prio 0, ram): smram-ram KVM\n')


def _slots(rows):
    cols = ["pid", "as_id", "gpa", "size_bytes", "start_ts", "end_ts"]
    return pd.DataFrame(rows, columns=cols).astype(
        {"gpa": "uint64", "size_bytes": "uint64", "start_ts": "uint64", "end_ts": "uint64"})


def _dumps(rows):
    return pd.DataFrame(rows, columns=["ts", "request_ts", "pid", "socket", "command", "text"])


INF = 2**64 - 1


def _vals(col) -> list:
    return [None if pd.isna(x) else x for x in col]


def test_join_edges():
    slots = _slots([
        (7, 0, 0x100000, 0x100000, 10, INF),     # named: big
        (7, 1, 0x100000, 0x100000, 10, INF),     # SMM address space: smram-ram
        (7, 0, 0x201000, 0x1000, 10, INF),       # odd trimmed to pages as KVM gets it
        (7, 0, 0x0, 0x1000, 10, INF),            # an I/O range: no name
        (7, 0, 0x100000, 0x100000, 200, INF),    # created after the only answer: no name
        (7, 0, 0x100000, 0x100000, 0, 60),       # ended before it was answered: no name
        (8, 0, 0x100000, 0x100000, 10, INF),     # another process: no name
        (7, 0, 0x100000, 0x80000, 10, INF),      # a different size: no name
    ])
    d = _dumps([(100, 50, 7, "s", "info mtree -f", MTREE)])
    got = qemu.slot_regions(slots, d, PAGE)
    assert _vals(got["qemu_region"]) == ["big", "smram-ram", "odd", None, None, None, None, None]
    assert _vals(got["qemu_kind"]) == ["ram", "ram", "romd", None, None, None, None, None]
    # an answer whose QEMU is unknown (pid 0) names nothing
    d0 = d.assign(pid=0)
    assert qemu.slot_regions(slots, d0, PAGE)["qemu_region"].isna().all()
    # the first answer while live wins: a later one with another name does not rename it
    later = MTREE.replace("big KVM", "renamed KVM")
    d2 = _dumps([(100, 50, 7, "s", "c", MTREE), (300, 250, 7, "s", "c", later)])
    got = _vals(qemu.slot_regions(slots, d2, PAGE)["qemu_region"])
    assert got[0] == "big" and got[4] == "renamed"


def test_qmp_notes_in_the_report():
    n = pd.DataFrame({"ts": [1, 2, 3], "key": ["qmp"] * 3, "value": [
        json.dumps({"socket": "/a", "pid": None, "status": "unavailable",
                    "reason": "never connected: No such file or directory", "dumps": 0}),
        json.dumps({"socket": "/b", "pid": 5, "status": "connected", "qemu": "7.2.22"}),
        json.dumps({"socket": "/b", "pid": 5, "status": "closed", "dumps": 3})]})
    assert qemu.notes(n) == ["QMP socket /a gave no answer (never connected: No such file or "
                             "directory): memslots are not named after QEMU's memory regions"]


# -- --qmp auto ------------------------------------------------------------

@pytest.mark.parametrize("argv, want", [
    (["qemu", "-qmp", "unix:/run/q.sock,server=on,wait=off"], ["/run/q.sock"]),
    (["qemu", "--qmp", "unix:/run/q.sock"], ["/run/q.sock"]),
    (["qemu", "-qmp-pretty", "unix:/run/q.sock,server,nowait"], ["/run/q.sock"]),
    (["qemu", "-qmp", "unix:/run/a,,b.sock,server=on"], ["/run/a,b.sock"]),
    (["qemu", "-qmp", "tcp:localhost:4444,server=on"], []),
    (["qemu", "-chardev", "socket,id=mon0,path=/run/m.sock,server=on,wait=off",
      "-mon", "chardev=mon0,mode=control"], ["/run/m.sock"]),
    (["qemu", "-chardev", "socket,id=mon0,path=/run/m.sock,server=on,wait=off",
      "-mon", "chardev=mon0,mode=readline"], []),  # HMP, not QMP
    (["qemu", "-qmp", "unix:/run/1.sock,server=on", "-qmp", "unix:/run/2.sock,server=on"],
     ["/run/1.sock", "/run/2.sock"]),
])
def test_sockets_from_argv(argv, want):
    assert qmp.sockets_from_argv(argv) == want


def test_resolve():
    cmd = ("qemu", "-qmp", "unix:/run/1.sock,server=on", "-qmp", "unix:/run/2.sock,server=on")
    # auto takes the first only: QEMU serves one client a socket, the others stay free
    assert qmp.resolve(("auto",), cmd) == ["/run/1.sock"]
    assert qmp.resolve(("auto", "/run/2.sock", "/run/1.sock"), cmd) == ["/run/1.sock",
                                                                        "/run/2.sock"]
    with pytest.raises(qmp.QmpError, match="no COMMAND"):
        qmp.resolve(("auto",), ())
    with pytest.raises(qmp.QmpError, match="no QMP unix socket"):
        qmp.resolve(("auto",), ("qemu", "-m", "64"))


def test_record_qmp_usage_errors(tmp_path):
    from conftest import kvmtrace as run, one_line_error

    out = tmp_path / "x.kvt"
    p = run("record", "-o", out, "--qmp", "auto")
    assert p.returncode == 2 and "no COMMAND" in one_line_error(p)
    p = run("record", "-o", out, "--qmp", "auto", "--", "qemu-system-x86_64", "-m", "64")
    assert p.returncode == 2 and "no QMP unix socket" in one_line_error(p)
    p = run("record", "-o", out, "--qmp", "", "--", "true")
    assert p.returncode == 2 and "empty path" in one_line_error(p)
    assert not out.exists()
