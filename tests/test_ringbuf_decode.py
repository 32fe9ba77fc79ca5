"""The batch ring-buffer decoder on raw bytes captured from a real run.

Fixtures in tests/fixtures/raw-x86-pvm were made on the KVM-PVM x86 host
(kernel 6.18) by tests/fixtures/capture_raw.py: the kernel's ring records as
written, and the built-in guest's own report of the same run.
"""

import numpy as np

from kvmtrace.collectors.ringbuf import BUSY, DISCARD, decode
from kvmtrace.probes import codegen
from kvmtrace.probes.events import EVENTS

from conftest import FIXTURES, load_json

RAW = FIXTURES / "raw-x86-pvm"


def raw(name):
    return np.frombuffer((RAW / f"{name}.bin").read_bytes(), dtype=np.uint8)


def test_set_spte_records_match_the_guest():
    guest = load_json(RAW / "guest.json")
    bodies, used = decode(raw("set_spte"), codegen.record_dtype(EVENTS["set_spte"]))
    assert used == len(raw("set_spte"))
    assert len(bodies) == sum(s["expected_faults"] for s in guest["slots"])
    tids = {v["tid"] for v in guest["vcpus"]}
    assert set(bodies["tid"]) <= tids and set(bodies["pid"]) == {guest["pid"]}
    slot1 = next(s for s in guest["slots"] if s["slot"] == 1)
    gfns = bodies["gfn"].astype(np.int64)
    in_slot1 = (gfns >= slot1["gpa"] // 4096) & (gfns < (slot1["gpa"] + slot1["size"]) // 4096)
    assert in_slot1.sum() == slot1["expected_faults"]
    assert set(bodies["level"]) == {1}
    assert (np.diff(bodies["ts"].astype(np.int64)) >= 0).all()


def test_memslot_records_match_the_guest():
    guest = load_json(RAW / "guest.json")
    bodies, _ = decode(raw("memslot"), codegen.record_dtype(EVENTS["memslot"]))
    want = [(m["slot"], m["gpa"], m["size"], m["hva"], m["flags"])
            for m in guest["memslot_ioctls"]]
    got = [(int(b["slot"]), int(b["gpa"]), int(b["size"]), int(b["hva"]), int(b["flags"]))
           for b in bodies]
    assert got == want
    assert (bodies["ret"] == 0).all() and (bodies["read_ok"] == 1).all()
    assert (bodies["vm_fd"] == guest["vm_fd"]).all()


def test_busy_record_stops_the_batch_and_discard_is_dropped():
    dt = codegen.record_dtype(EVENTS["spte_requested"])
    data = raw("spte_requested").copy()
    rec = dt.itemsize
    lens = np.ndarray((len(data) // rec,), dtype=np.uint32, buffer=data, strides=(rec,))
    n = len(lens)
    lens[1] |= DISCARD
    lens[5] |= BUSY
    bodies, used = decode(data, dt)
    assert used == 5 * rec
    assert len(bodies) == 4  # records 0, 2, 3, 4
    full, _ = decode(raw("spte_requested"), dt)
    assert list(bodies["gfn"]) == [full["gfn"][i] for i in (0, 2, 3, 4)]
    assert n == len(full)


def test_partial_record_is_left_for_later():
    dt = codegen.record_dtype(EVENTS["vm_ioctl"])
    data = raw("vm_ioctl")
    bodies, used = decode(data[:-3], dt)
    assert len(bodies) == len(data) // dt.itemsize - 1
    assert used == len(bodies) * dt.itemsize
