"""The collector's columnar decoder (ringbuf.decode_columns) on real ring bytes,
against the row decoder it replaced (ringbuf.decode), and ring sizes.

Fixtures: tests/fixtures/raw-x86-pvm, the kernel's ring records of a real run
(tests/fixtures/capture_raw.py).
"""

import numpy as np
import pytest

from kvmtrace.collectors.ringbuf import BUSY, DISCARD, decode, decode_columns
from kvmtrace.probes import codegen
from kvmtrace.probes.events import EVENTS

from conftest import FIXTURES

RAW = FIXTURES / "raw-x86-pvm"


def raw(name):
    return np.frombuffer((RAW / f"{name}.bin").read_bytes(), dtype=np.uint8)


@pytest.mark.parametrize("name", ["set_spte", "spte_requested", "memslot", "vm_ioctl"])
def test_columns_equal_rows(name):
    dt = codegen.record_dtype(EVENTS[name])
    rows, used = decode(raw(name), dt)
    cols, used2 = decode_columns(raw(name), dt)
    assert used == used2 == len(raw(name))
    assert len(cols) == len(rows) > 0
    assert cols.names == list(rows.dtype.names)
    for f in rows.dtype.names:
        assert cols[f].dtype == rows[f].dtype, f
        assert cols[f].flags.c_contiguous, f
        assert (cols[f] == rows[f]).all(), f


def test_columns_own_their_memory():
    """The ring space is handed back at once: nothing may still point into it."""
    dt = codegen.record_dtype(EVENTS["set_spte"])
    data = raw("set_spte").copy()
    cols, _ = decode_columns(data, dt)
    before = {f: cols[f].copy() for f in cols.names}
    data[:] = 0xAB
    for f in cols.names:
        assert (cols[f] == before[f]).all(), f


def test_busy_stops_and_discard_drops():
    dt = codegen.record_dtype(EVENTS["spte_requested"])
    data = raw("spte_requested").copy()
    rec = dt.itemsize
    lens = np.ndarray((len(data) // rec,), dtype=np.uint32, buffer=data, strides=(rec,))
    lens[1] |= DISCARD
    lens[5] |= BUSY
    cols, used = decode_columns(data, dt)
    rows, used2 = decode(data, dt)
    assert used == used2 == 5 * rec
    assert len(cols) == 4 and list(cols["gfn"]) == list(rows["gfn"])


def test_partial_and_empty_runs():
    dt = codegen.record_dtype(EVENTS["vm_ioctl"])
    data = raw("vm_ioctl")
    cols, used = decode_columns(data[:-3], dt)
    assert len(cols) == len(data) // dt.itemsize - 1 and used == len(cols) * dt.itemsize
    cols, used = decode_columns(data[:0], dt)
    assert len(cols) == 0 and used == 0 and cols["ts"].dtype == np.uint64


def test_ring_sizes_follow_the_expected_rate():
    """Each kind's ring holds STALL_S seconds of its expected rate (a power of
    two pages, MIN_PAGES to MAX_PAGES): the fault path and kvm_mmio 4 MiB,
    the rare kinds small."""
    pages = {name: codegen.declared_pages(ev) for name, ev in EVENTS.items()}
    for name, ev in EVENTS.items():
        p = pages[name]
        assert p & (p - 1) == 0 and codegen.MIN_PAGES <= p <= codegen.MAX_PAGES
        need = ev.rate * codegen.STALL_S * codegen.record_dtype(ev).itemsize
        assert p * codegen.PAGE_SIZE >= need or p == codegen.MAX_PAGES, name
        assert p == codegen.MIN_PAGES or p // 2 * codegen.PAGE_SIZE < need, name
    for name in ("pt_walk", "spte_requested", "set_spte", "mmio"):
        assert pages[name] == 1024, name
    # a QEMU boot's burst: 20,520 kvm_mmio events in 0.25 s (measured) fit
    assert pages["mmio"] * codegen.PAGE_SIZE // codegen.record_dtype(EVENTS["mmio"]).itemsize \
        > 3 * 20520
    assert pages["memslot"] >= 32 and pages["vm_ioctl"] == codegen.MIN_PAGES


def test_buffer_size_option():
    """-m PAGES resizes the high-rate rings only; a dict sizes the kinds it names."""
    ev = EVENTS
    assert codegen.ring_pages(ev["set_spte"], 64) == 64
    assert codegen.ring_pages(ev["mmio"], 8192) == 8192
    assert codegen.ring_pages(ev["memslot"], 1) == codegen.declared_pages(ev["memslot"])
    assert codegen.ring_pages(ev["memslot"], {"memslot": 512}) == 512
    assert codegen.ring_pages(ev["set_spte"], {"memslot": 512}) == 1024
    assert "BPF_RINGBUF_OUTPUT(rb_mmio, 2048);" in codegen.c_struct(ev["mmio"], {"mmio": 2048})


def test_sizes_without_numpy_match_the_dtypes():
    """The C text's sizes are computed without numpy (record imports it after
    attaching); they must be numpy's aligned layout, which decodes the rings."""
    for ev in EVENTS.values():
        assert codegen.event_size(ev) == codegen.event_dtype(ev).itemsize, ev.name
        assert codegen.record_size(ev) == codegen.record_dtype(ev).itemsize, ev.name
