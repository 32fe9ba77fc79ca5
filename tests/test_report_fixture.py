"""report on a real recording, offline (no root, no bcc).

tests/fixtures/x86-pvm-demo.kvt was recorded on the KVM-PVM x86 host (6.18) with

    .venv/bin/kvmtrace record -o tests/fixtures/x86-pvm-demo.kvt -- \\
        .venv/bin/python -m testvmm --scenario demo -q \\
        --report tests/fixtures/x86-pvm-demo.guest.json

and the guest's report beside it says what the guest did.
"""

import json
import os

import pandas as pd
import pytest

import kvmtrace
from kvmtrace import render

from conftest import FIXTURES, kvmtrace as run, load_json

REC = FIXTURES / "x86-pvm-demo.kvt"
GUEST = FIXTURES / "x86-pvm-demo.guest.json"


@pytest.fixture(scope="module")
def model():
    return kvmtrace.load(str(REC))


@pytest.fixture(scope="module")
def guest():
    return load_json(GUEST)


def check_against_guest(model, guest):
    """The assertions shared with the live end-to-end test."""
    ops = model.ops
    want = [(m["slot"], m["as_id"], m["flags"], m["gpa"], m["size"], m["hva"], m["errno"])
            for m in guest["memslot_ioctls"]]
    got = [(int(r.slot_id), int(r.as_id), int(r.flags), int(r.gpa), int(r.size_bytes), int(r.hva),
            -int(r.ret) if r.ret < 0 else 0) for r in ops.itertuples()]
    assert got == want
    assert set(ops["pid"]) == {guest["pid"]} and set(ops["vm_fd"]) == {guest["vm_fd"]}
    first = model.slots[model.slots["version"] == 0].set_index("slot")
    faults = model.faults[model.faults["slot_row"] >= 0]
    per_row = faults.groupby("slot_row").size()
    for s in guest["slots"]:
        if s["status"] != "ok":
            assert s["slot"] not in first.index
            continue
        row = first.loc[s["slot"]]
        assert (row.gpa, row["size_bytes"], row.hva) == (s["gpa"], s["size"], s["hva"])
        idx = model.slots.index[(model.slots["slot"] == s["slot"])
                                & (model.slots["version"] == 0)][0]
        assert per_row.get(idx, 0) == s["expected_faults"], s["slot"]
        # the VMA the report found is the one the guest mapped
        if s["backing"] == "pfnmap":
            assert "[vvar]" in row.vma and row.pfnmap
        elif s["backing"] == "memfd":
            assert row.vma.startswith("memfd:kvmtrace-guest-slot")
        elif s["backing"] == "file":
            # the whole path comes from a smaps snapshot; when the guest exited
            # before one (a loaded host), the file's own name from BPF
            short = f".../{os.path.basename(s['path'])} ("
            assert row.vma == s["path"] or (pd.isna(row.snapshot_delay_ms)
                                            and row.vma.startswith(short)), row.vma
    assert (model.faults["slot_row"] >= 0).all(), "every fault is in a slot"
    exp_total = guest["expected_faults_total"]
    assert len(model.faults) == exp_total


def test_memslots_and_faults_equal_what_the_guest_did(model, guest):
    check_against_guest(model, guest)


def test_changes_over_time(model):
    ops = model.ops
    assert {"create", "flags", "move", "delete"} <= set(ops["op"])
    failed = ops[ops["ret"] < 0]
    assert set(failed["errno"]) == {"EEXIST", "EINVAL"}
    assert failed["reason"].str.contains("overlaps slot").any()


def test_access_kinds_and_levels(model, guest):
    slot1 = next(s for s in guest["slots"] if s["slot"] == 1)
    f = model.faults[(model.faults["slot_row"] >= 0)]
    f = f[model.slots.loc[f["slot_row"], "slot"].to_numpy() == 1]
    counts = f["access"].value_counts().to_dict()
    # r pages: one read fault; w: one write; rw: read then write; x: one exec
    t = slot1["touched_counts"]
    assert counts == {"read": t["r"] + t["rw"], "write": t["w"] + t["rw"], "exec": t["x"]}
    assert set(model.faults["mapping_size_bytes"]) == {4096}


def test_verdicts(model):
    v = model.verdicts
    first = v[v["version"] == 0]
    assert (first[first["faults"] > 0]["verdict"] == "consistent").all()
    assert (v[v["version"] < 0]["verdict"] == "rejected").all()
    pfn = first[first["reason"].str.contains("VM_PFNMAP")]
    assert len(pfn) == 1 and "System RAM" in pfn["reason"].iloc[0]
    unknown = v[v["verdict"] == "unknown"]
    assert unknown["reason"].str.contains("no faults observed").all()


def test_text_report_shows_every_section():
    p = run("report", REC)
    assert p.returncode == 0, p.stderr
    for text in ("memslots of VM", "memslot ioctls", "faults per slot", "memory-type verdicts",
                 "[vvar]", "VM_PFNMAP|VM_IO", "memfd:kvmtrace-guest-slot3", "EEXIST",
                 "READONLY", "LOG_DIRTY_PAGES", "consistent", "rejected"):
        assert text in p.stdout, text


def test_json_and_csv():
    p = run("report", REC, "--format", "json")
    body = json.loads(p.stdout)
    assert "faults" not in body  # the per-fault rows: --table faults (tables schema v3)
    body |= json.loads(run("report", REC, "--format", "json", "--table", "faults").stdout)
    assert {"slots", "ops", "faults", "verdicts", "errors", "meta"} <= set(body)
    assert body["meta"]["kvm"]["spte_format"] == "legacy"
    p = run("report", REC, "--format", "csv")
    assert p.stdout.splitlines()[0].startswith("pid,proc,vm_fd,as_id,slot,version,gpa")
    p = run("report", REC, "--format", "csv", "--table", "errors", "--slot", "10")
    assert len(p.stdout.splitlines()) == 3


def test_filters():
    p = run("report", REC, "--format", "json", "--slot", "5")
    body = json.loads(p.stdout)
    assert {s["slot"] for s in body["slots"]} == {5}
    assert p.returncode == 0
    p = run("report", REC, "--format", "json", "--pid", "1")
    assert json.loads(p.stdout)["slots"] == []


def test_fail_on(model):
    assert run("report", REC, "--fail-on", "mismatch").returncode == 0
    p = run("report", REC, "--fail-on", "error")
    assert p.returncode == 1 and "error(s) found" in p.stderr


def test_json_round_trip_of_render(model):
    body = json.loads(render.to_json(model, table="ranges"))
    assert sum(r["pages"] for r in body["ranges"]) == \
        model.faults.drop_duplicates(["slot_row", "gfn"]).shape[0]
