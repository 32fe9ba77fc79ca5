"""Memslot replay (kvmtrace.analysis.memslots.decode_ops / replay) on real tables.

The base of every case is the memslot table of a real recording:
tests/fixtures/x86-pvm-demo.kvt (KVM-PVM, 6.18) and tests/fixtures/arm64/*.kvt
(emulated arm64 host, 6.1 and 7.3.4). Each recording has beside it the test
VMM's own record of what it asked for and what KVM answered (*.guest.json),
which the replay is checked against. Edge cases are copies of real rows with
a few fields changed; each case says which rows it comes from.

The real x86 table (rows in time order, all pid 7249, vm_fd 4, as_id 0):
  0-8  create slots 0, 1, 2, 3 (KVM_SET_USER_MEMORY_REGION2), 4, 5, 6
       (READONLY), 7 (LOG_DIRTY_PAGES), 9
  9    slot 1 flags 0 -> LOG_DIRTY_PAGES
  10   slot 4 moved 0x1c00000 -> 0x3400000
  11   slot 2 deleted (size 0)
  12   slot 10 over slot 1's GPA: EEXIST
  13   slot 10 with memory_size 4608: EINVAL

KVM's rules (virt/kvm/kvm_main.c, __kvm_set_memory_region and
kvm_set_memslot, 5.x - 6.18): size 0 deletes (EINVAL when the slot does not
exist); no slot with that id creates; another base_gfn moves (whatever the
flags); other flags is a flags-only change; a live slot's size or
userspace_addr cannot change (EINVAL); an overlap with another slot of the
same address space is EEXIST; the slot id's high 16 bits are the address
space (KVM_ADDRESS_SPACE_NUM; x86 SMM is as_id 1).
"""

from __future__ import annotations

import functools

import pandas as pd
import pytest

from kvmtrace.analysis import identity, memslots
from kvmtrace.recording.reader import read

from conftest import FIXTURES, load_json

X86 = FIXTURES / "x86-pvm-demo.kvt"
ARM64 = sorted((FIXTURES / "arm64").glob("*.kvt"))
WITH_GUEST = [X86] + ARM64
US = 1000  # ns

CHANGE_OP = {None: "create", "flags": "flags", "move": "move", "delete": "delete"}


@functools.lru_cache(maxsize=None)
def _tables(path):
    """A recording's tables (read once; tests edit copies, never these)."""
    return read(path).tables


def x86_table() -> pd.DataFrame:
    return _tables(X86)["memslot"].sort_values("ts", kind="stable").reset_index(drop=True)


def replay(memslot: pd.DataFrame, proc_exit: pd.DataFrame | None = None):
    """(ops, slots) as the model computes them (proc from identity.generations)."""
    ops = memslots.decode_ops(memslot)
    if "proc" not in ops:
        ops["proc"] = identity.generations(ops, proc_exit)
    return memslots.replay(ops)


def derive(base: pd.DataFrame, *rows, source: pd.DataFrame | None = None) -> pd.DataFrame:
    """``base`` plus copies of rows of ``source`` (default: ``base``), each
    given as (row index, {field: value}). A copy without its own ts is placed
    after everything before it, 10 us apart, with the enter_ts 1 us before
    (a real memslot ioctl takes 40-110 us)."""
    source = base if source is None else source
    out = [base]
    last = int(base["ts"].max())
    for i, changes in rows:
        r = source.iloc[[i]].copy()
        changes = dict(changes)
        if "ts" not in changes:
            last += 10 * US
            changes["ts"] = last
        changes.setdefault("enter_ts", int(changes["ts"]) - US)
        for k, v in changes.items():
            r[k] = v
        out.append(r)
    return pd.concat(out, ignore_index=True)


def ints(values) -> list:
    return [None if pd.isna(v) else int(v) for v in values]


def is_open(t_end) -> bool:
    """A version still live at the end of the recording."""
    return pd.isna(t_end) or int(t_end) >= 2**63 - 1


def versions(slots, slot, as_id=0, **key) -> pd.DataFrame:
    m = (slots["slot"] == slot) & (slots["as_id"] == as_id)
    for k, v in key.items():
        m &= slots[k] == v
    return slots[m].sort_values("version")


# ---------------------------------------------------------------- real recordings

@pytest.mark.parametrize("path", WITH_GUEST, ids=lambda p: p.stem)
def test_ops_match_the_vmms_own_record(path):
    """Every ioctl the test VMM made is in the recording, in order, with the
    fields it passed and the errno it got, inside the VMM's own time bracket
    around the call (both are CLOCK_MONOTONIC); its classification is the
    change the VMM meant to make."""
    guest = load_json(path.with_suffix(".guest.json"))
    ops, _ = replay(_tables(path)["memslot"])
    want = guest["memslot_ioctls"]
    assert len(ops) == len(want)
    for o, m in zip(ops.itertuples(index=False), want):
        assert (int(o.slot_id), int(o.as_id), int(o.gpa), int(o.size_bytes), int(o.hva),
                int(o.flags)) == (m["slot"], m["as_id"], m["gpa"], m["size"], m["hva"],
                                  m["flags"])
        assert o.ioctl_name == m["ioctl"]
        assert o.errno == m["errno_name"]
        assert o.flag_names == "|".join(m["flag_names"])  # "" for none
        assert m["time_ns"] <= int(o.enter_ts) <= int(o.ts) <= m["time_ns"] + m["duration_ns"]
        assert 0 <= int(o.latency_ns) <= m["duration_ns"]
        if m["errno_name"]:
            assert o.op.startswith("failed ") and o.reason.startswith(m["errno_name"] + ":")
        else:
            assert o.op == CHANGE_OP[m["change"]] and o.reason == ""


@pytest.mark.parametrize("path", WITH_GUEST, ids=lambda p: p.stem)
def test_final_slots_match_the_vmms_own_record(path):
    """At the end, the live version of each slot is where the VMM left it; a
    slot the VMM deleted, or KVM refused, has no live version; every slot has
    one version per successful create / move / flags change."""
    guest = load_json(path.with_suffix(".guest.json"))
    _, slots = replay(_tables(path)["memslot"])
    for s in guest["slots"]:
        if s["status"] != "ok":
            assert not len(versions(slots, s["slot"])), s["slot"]  # never set
            continue
        v = versions(slots, s["slot"], as_id=s["as_id"])
        live = v[[is_open(t) for t in v["end_ts"]]]
        fin = s["final"]
        if fin["present"]:
            assert len(live) == 1
            assert (int(live["gpa"].iloc[0]), int(live["flags"].iloc[0])) == (fin["gpa"],
                                                                            fin["flags"])
            assert int(live["size_bytes"].iloc[0]) == s["size"]
            assert int(live["hva"].iloc[0]) == s["hva"]
        else:
            assert not len(live)
        changes = [m for m in guest["memslot_ioctls"] if m["slot"] == s["slot"]
                   and not m["errno_name"] and m["change"] != "delete"]
        assert len(v) == len(changes)
        assert ints(v["version"]) == list(range(len(v)))


def test_x86_slot_versions():
    """Rows 1 and 9 (slot 1: create, flags), 4 and 10 (slot 4: create, move),
    2 and 11 (slot 2: create, delete): each version starts at the ioctl that
    made it and ends at the one that replaced it, and says by what."""
    t = x86_table()
    ts = ints(t["ts"])
    _, slots = replay(t)
    assert len(slots) == 11 and set(ints(slots["as_id"])) == {0}
    assert set(ints(slots["pid"])) == {7249} and set(ints(slots["vm_fd"])) == {4}

    s1 = versions(slots, 1)
    assert ints(s1["version"]) == [0, 1]
    assert ints(s1["start_ts"]) == [ts[1], ts[9]]
    assert int(s1["end_ts"].iloc[0]) == ts[9] and is_open(s1["end_ts"].iloc[1])
    assert list(s1["created_by"]) == ["create", "flags"]
    assert list(s1["ended_by"]) == ["flags", ""]
    assert ints(s1["flags"]) == [0, 1]
    assert list(s1["flag_names"]) == ["", "LOG_DIRTY_PAGES"]
    assert ints(s1["gpa"]) == [0x1000000] * 2

    s4 = versions(slots, 4)
    assert ints(s4["gpa"]) == [0x1c00000, 0x3400000]
    assert list(s4["created_by"]) == ["create", "move"] and s4["ended_by"].iloc[0] == "move"
    assert int(s4["end_ts"].iloc[0]) == int(s4["start_ts"].iloc[1]) == ts[10]
    assert ints(s4["gfn_start"]) == [0x1c00, 0x3400]
    assert ints(s4["gfn_end"]) == [0x1c00 + 32, 0x3400 + 32]
    assert ints(s4["hva"])[0] == ints(s4["hva"])[1]  # a move keeps the memory

    s2 = versions(slots, 2)
    assert len(s2) == 1 and s2["ended_by"].iloc[0] == "delete"
    assert int(s2["end_ts"].iloc[0]) == ts[11]

    s3 = versions(slots, 3)
    assert s3["ioctl_name"].iloc[0] == "KVM_SET_USER_MEMORY_REGION2"
    assert versions(slots, 1)["ioctl_name"].iloc[0] == "KVM_SET_USER_MEMORY_REGION"
    assert int(versions(slots, 1)["gmem_fd"].iloc[0]) == -1  # REGION has no gmem fd
    assert not len(versions(slots, 10))  # both attempts were refused


def test_x86_refusals_name_the_rule():
    """Rows 12 and 13 as KVM refused them (the VMM expected these errnos)."""
    ops, _ = replay(x86_table())
    assert list(ops["op"]) == ["create"] * 9 + ["flags", "move", "delete",
                                                "failed create", "failed create"]
    assert ops["reason"].iloc[12] == "EEXIST: GPA range overlaps slot 1 (0x1000000+0x40000)"
    assert ops["reason"].iloc[13] == "EINVAL: memory_size not page aligned"
    assert list(ops["errno"].iloc[12:]) == ["EEXIST", "EINVAL"]


def test_arm64_refusal_by_the_arch_hook_is_not_misnamed():
    """cbar-7.x row 2: KVM 7.3.4 refused a well-formed slot over a cacheable
    PFNMAP VMA (kvm_arch_prepare_memory_region, EINVAL). The generic replay
    cannot know that rule (stage2.memslot_reasons adds it), and must not
    invent a generic one such as misalignment or a size change."""
    ops, slots = replay(_tables(FIXTURES / "arm64" / "cbar-7.x.kvt")["memslot"])
    r = ops.iloc[2]
    assert r.op == "failed create" and r.errno == "EINVAL"
    assert r.reason == "EINVAL: KVM refused the request (invalid parameters for this VM)"
    assert not len(versions(slots, 2))


def test_decode_ops_sorts_and_decodes():
    """The real x86 table shuffled: decode_ops puts it back in time order;
    slot ids split into address space and slot (as_id = slot >> 16)."""
    t = x86_table()
    shuffled = t.sample(frac=1, random_state=3).reset_index(drop=True)
    ops = memslots.decode_ops(shuffled)
    assert ints(ops["ts"]) == ints(t["ts"])
    d = memslots.decode_ops(derive(t, (6, {"slot": (1 << 16) | 6, "flags": 3}),
                                   (3, {"slot": (2 << 16) | 0x7fff})))
    assert ints(d["as_id"].iloc[-2:]) == [1, 2] and ints(d["slot_id"].iloc[-2:]) == [6, 0x7fff]
    assert list(d["flag_names"].iloc[-2:]) == ["LOG_DIRTY_PAGES|READONLY", ""]
    assert list(d["ioctl_name"].iloc[-2:]) == ["KVM_SET_USER_MEMORY_REGION",
                                          "KVM_SET_USER_MEMORY_REGION2"]
    assert (d["latency_ns"].astype("int64") > 0).all()


# ---------------------------------------------------------------- derived: refusals

EINVAL, EEXIST, EFAULT, ENOMEM, EPERM = -22, -17, -14, -12, -1


@pytest.mark.parametrize("row,changes,op,reason", [
    # row 1 (create slot 1) with a GPA off a page boundary
    (1, {"slot": 11, "gpa": 0x5000800, "ret": EINVAL}, "failed create",
     "EINVAL: guest_phys_addr not page aligned"),
    # row 2 (create slot 2) with an unaligned userspace address
    (2, {"slot": 11, "gpa": 0x5000000, "hva": 0x7f3400000008, "ret": EINVAL}, "failed create",
     "EINVAL: userspace_addr not page aligned"),
    # row 5 (create slot 5) with all three unaligned
    (5, {"slot": 11, "gpa": 0x5000010, "size": 0x4010, "hva": 0x7f3400000100, "ret": EINVAL},
     "failed create", "EINVAL: guest_phys_addr, memory_size, userspace_addr not page aligned"),
    # row 7 (create slot 7, LOG_DIRTY_PAGES) with a flag bit KVM does not know
    (7, {"slot": 11, "gpa": 0x5000000, "flags": 0x101, "ret": EINVAL}, "failed create",
     "EINVAL: unknown flags 0x101"),
    # row 1 again later, twice the size: a live slot cannot be resized
    (1, {"size": 0x80000, "ret": EINVAL}, "failed",
     "EINVAL: a live slot's size or userspace address cannot change"),
    # row 9 (slot 1 flags) with another userspace address
    (9, {"hva": 0x7f3400000000, "ret": EINVAL}, "failed",
     "EINVAL: a live slot's size or userspace address cannot change"),
    # row 11 (delete slot 2) for slot 11, which never existed
    (11, {"slot": 11, "ret": EINVAL}, "failed delete",
     "EINVAL: deleting a slot that does not exist"),
    # row 10 (move slot 4) onto slot 3's range
    (10, {"gpa": 0x1801000, "ret": EEXIST}, "failed move",
     "EEXIST: GPA range overlaps slot 3 (0x1800000+0x20000)"),
    # row 12 (EEXIST over slot 1) moved to overlap slot 7's last page
    (12, {"gpa": 0x281f000, "size": 0x2000, "ret": EEXIST}, "failed create",
     "EEXIST: GPA range overlaps slot 7 (0x2800000+0x20000)"),
    # row 5 with the request unreadable by the probe
    (5, {"slot": 11, "read_ok": 0, "ret": EFAULT}, "failed",
     "EFAULT: the request could not be read from user memory by the probe"),
    # row 5 with an unmapped userspace range
    (5, {"slot": 11, "gpa": 0x5000000, "ret": EFAULT}, "failed create",
     "EFAULT: userspace_addr range is not accessible"),
    (5, {"slot": 11, "gpa": 0x5000000, "ret": ENOMEM}, "failed create",
     "ENOMEM: KVM could not allocate the slot"),
    (5, {"slot": 11, "gpa": 0x5000000, "ret": EPERM}, "failed create",
     "EPERM: not allowed for this VM"),
])
def test_refusal_reasons(row, changes, op, reason):
    """A refused ioctl is classified as what it asked for, with the rule
    that refused it, and leaves every slot as it was."""
    base = x86_table()
    t = derive(base, (row, changes))
    ops, slots = replay(t)
    _, before = replay(base)
    r = ops.iloc[-1]
    assert r.op.startswith(op) and r.op.startswith("failed ")
    assert r.reason == reason
    cols = ["as_id", "slot", "version", "gpa", "size_bytes", "flags", "start_ts", "created_by"]
    pd.testing.assert_frame_equal(slots[cols].reset_index(drop=True),
                                  before[cols].reset_index(drop=True))
    assert [is_open(t) for t in slots["end_ts"]] == [is_open(t) for t in before["end_ts"]]


# ---------------------------------------------------------------- derived: classification

def test_repeat_is_a_no_op():
    """Row 9 (slot 1 -> LOG_DIRTY_PAGES) issued again: nothing changes."""
    ops, slots = replay(derive(x86_table(), (9, {})))
    assert ops["op"].iloc[-1] == "no-op" and ops["reason"].iloc[-1] == ""
    assert len(versions(slots, 1)) == 2 and is_open(versions(slots, 1)["end_ts"].iloc[1])


def test_move_with_new_flags_is_a_move():
    """Row 10 (move slot 4) with LOG_DIRTY_PAGES too: KVM classifies by
    base_gfn first, so it is a move, and the new version has the flags."""
    t = x86_table()
    ops, slots = replay(derive(t.iloc[:10], (10, {"ts": int(t["ts"].iloc[10]), "flags": 1}),
                               source=t))
    assert ops["op"].iloc[-1] == "move"
    v = versions(slots, 4)
    assert list(v["created_by"]) == ["create", "move"] and ints(v["flags"]) == [0, 1]


def test_flags_back_move_back_and_recreate():
    """After the real history: row 1 (slot 1 with flags 0) again is a flags
    change back; row 4 (slot 4 at its first GPA) again is a move back; row 2
    (create slot 2) after row 11 deleted it is a new create."""
    t = x86_table()
    ops, slots = replay(derive(t, (1, {}), (4, {}), (2, {})))
    assert list(ops["op"].iloc[-3:]) == ["flags", "move", "create"]
    s1, s4, s2 = versions(slots, 1), versions(slots, 4), versions(slots, 2)
    assert ints(s1["flags"]) == [0, 1, 0] and list(s1["ended_by"]) == ["flags", "flags", ""]
    assert ints(s4["gpa"]) == [0x1c00000, 0x3400000, 0x1c00000]
    assert list(s4["created_by"]) == ["create", "move", "move"]
    assert ints(s2["version"]) == [0, 1] and list(s2["created_by"]) == ["create", "create"]
    assert s2["ended_by"].iloc[0] == "delete" and is_open(s2["end_ts"].iloc[1])
    assert int(s2["start_ts"].iloc[1]) > int(s2["end_ts"].iloc[0])


def test_address_spaces_are_separate():
    """Rows 1 and 3 copied into address space 1 (x86 SMM: slot | 1 << 16),
    slot 3's copy at slot 1's GPA: both are creates (not a flags change or
    an overlap with address space 0), and an EEXIST in address space 1 (row
    12 copied there) names address space 1's slot at that GPA."""
    t = x86_table()
    ops, slots = replay(derive(
        t, (1, {"slot": (1 << 16) | 1, "gpa": 0x4000000}),
        (3, {"slot": (1 << 16) | 3, "gpa": 0x1000000}),
        (12, {"slot": (1 << 16) | 10, "gpa": 0x1000000, "ret": EEXIST})))
    assert list(ops["op"].iloc[-3:]) == ["create", "create", "failed create"]
    assert ints(ops["as_id"].iloc[-3:]) == [1, 1, 1]
    assert ints(ops["slot_id"].iloc[-3:]) == [1, 3, 10]
    assert ops["reason"].iloc[-1] == "EEXIST: GPA range overlaps slot 3 (0x1000000+0x20000)"
    smm = slots[slots["as_id"] == 1]
    assert sorted(ints(smm["slot"])) == [1, 3] and set(smm["created_by"]) == {"create"}
    assert ints(versions(slots, 3, as_id=1)["gpa"]) == [0x1000000]
    assert len(versions(slots, 1, as_id=0)) == 2  # address space 0 untouched


@pytest.mark.parametrize("field,value", [("vm_fd", 5), ("pid", 7250)])
def test_vms_are_separate(field, value):
    """The whole real table again, interleaved 1 ns after each real row, for
    a second VM of the same process (another vm_fd) or another process: each
    VM replays exactly as the real one, versions numbered from 0 per VM, and
    neither ends the other's slots."""
    t = x86_table()
    other = t.assign(**{field: value, "ts": t["ts"] + 1, "enter_ts": t["enter_ts"] + 1})
    ops, slots = replay(pd.concat([t, other], ignore_index=True))
    real_ops, real_slots = replay(t)
    for v, want in ((int(t[field].iloc[0]), real_ops), (value, real_ops)):
        mine = ops[ops[field] == v]
        assert list(mine["op"]) == list(want["op"])
        assert list(mine["reason"]) == list(want["reason"])
    cols = ["slot", "version", "gpa", "flags", "created_by", "ended_by"]
    for v in (int(t[field].iloc[0]), value):
        mine = slots[slots[field] == v].sort_values(["slot", "version"])[cols]
        pd.testing.assert_frame_equal(mine.reset_index(drop=True),
                                      real_slots.sort_values(["slot", "version"])[cols]
                                      .reset_index(drop=True), check_dtype=False)


def test_pid_reuse_is_a_new_vmm():
    """The real table replayed again 1 s later by the same pid, after that
    pid's process exited (a proc_exit row between): the second process's
    ioctls are creates of its own VM (keyed by proc), not no-ops on the
    first process's slots, and the first process's slots are not ended."""
    t = x86_table()
    later = t.assign(ts=t["ts"] + 10**9, enter_ts=t["enter_ts"] + 10**9)
    exits = _tables(X86)["proc_exit"]
    gone = pd.DataFrame({c: [0] for c in exits.columns}).astype(exits.dtypes.to_dict())
    gone["ts"], gone["pid"], gone["tid"], gone["group_dead"] = \
        int(t["ts"].max()) + 10**6, 7249, 7249, 1
    ops, slots = replay(pd.concat([t, later], ignore_index=True), gone)
    assert ints(ops["proc"]) == [0] * 14 + [1] * 14
    assert list(ops["op"].iloc[14:]) == list(ops["op"].iloc[:14])
    first = slots[slots["proc"] == 0]
    assert len(first) == len(slots[slots["proc"] == 1]) == 11
    live_first = [is_open(x) for x in first["end_ts"]]
    assert sum(live_first) == 8  # slots 0, 1 (v1), 3, 4 (v1), 5, 6, 7, 9


def test_region2_without_guest_memfd_has_no_gmem_fd():
    """Row 3: slot 3 set with KVM_SET_USER_MEMORY_REGION2, flags 0."""
    _, slots = replay(x86_table())
    assert int(versions(slots, 3)["gmem_fd"].iloc[0]) == -1


def test_unreadable_start_memslots_are_said(tmp_path):
    """A VMM whose memslots could not be read at record's start: the report
    says so instead of leaving its faults unexplained."""
    from kvmtrace.recording.reader import read
    from kvmtrace.recording.writer import RecordingWriter
    import kvmtrace

    src = read(str(FIXTURES / "x86-pvm-demo.kvt"))
    out = tmp_path / "n.kvt"
    w = RecordingWriter(str(out), src.meta)
    w.note("memslot_snapshot_unavailable", {"pid": 4242, "reason": "no BPF iterators"})
    w.close()
    notes = kvmtrace.load(str(out)).notes
    assert any("VMM 4242" in n and "no BPF iterators" in n for n in notes), notes
