"""The event declarations generate matching C and numpy layouts."""

import re

import numpy as np
import pytest

from kvmtrace.host.btf import BTF
from kvmtrace.probes import catalogue, codegen, program
from kvmtrace.probes.events import EVENTS, HEADER
from kvmtrace.recording import format as fmt


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_c_struct_matches_dtype(name):
    ev = EVENTS[name]
    text = codegen.c_struct(ev)
    members = re.findall(r"^\s+(\w+) (\w+)(?:\[\d+\])?;", text, re.M)
    assert [m[1] for m in members] == [f.name for f in ev.all_fields]
    dt = codegen.event_dtype(ev)
    assert f"== {dt.itemsize}," in text  # the generated _Static_assert
    rec = codegen.record_dtype(ev)
    assert rec.itemsize % 8 == 0 and rec.fields["body"][1] == 8


def test_header_first_in_every_event():
    for ev in EVENTS.values():
        assert ev.all_fields[:len(HEADER)] == HEADER


def test_no_kernel_pointers_declared():
    """sptep and friends are kernel addresses: never recorded."""
    for ev in EVENTS.values():
        for f in ev.fields:
            assert "ptr" not in f.name and "sptep" not in (f.src or ""), (ev.name, f.name)


def test_arrow_schema_follows_declarations():
    types = fmt.table_types()
    for name, ev in EVENTS.items():
        assert [f.name for f in types[name]] == [f.name for f in ev.all_fields]
        dt = codegen.event_dtype(ev)
        for f in types[name]:
            if dt.fields[f.name][0].kind == "S":  # a char array: a string column
                assert f.type == "string", (name, f.name)
                continue
            assert np.dtype(f.type.to_pandas_dtype()) == dt.fields[f.name][0]


def _offsets(probes):
    with BTF("kvm") as b:
        return catalogue.offsets(probes, b)


@pytest.mark.parametrize("spec", ["all", "memslots", "faults", "exits", "set_spte"])
def test_program_builds_for_each_selection(spec):
    probes = catalogue.parse_selection(spec)
    prog = program.build(probes, filter_pids=spec == "all", offsets=_offsets(probes))
    for ev in prog.events:
        assert f"struct {codegen.struct_name(ev)} {{" in prog.text
    assert "EMIT_" not in prog.text
    if spec == "all":
        assert "KVMTRACE_FILTER_PIDS" in prog.text


def test_struct_reads_need_btf_offsets():
    probes = catalogue.parse_selection("kvm_arch_prepare_memory_region")
    with pytest.raises(KeyError, match="kvm_memory_slot.base_gfn"):
        program.build(probes, filter_pids=False, offsets={})
    prog = program.build(probes, filter_pids=False, offsets=_offsets(probes))
    assert ("kprobe", "kvm_arch_prepare_memory_region", "kvmtrace_kp_prepare_region") \
        in prog.attach
    assert any(d.startswith("-DKT_OFF_kvm_memory_slot__userspace_addr=") for d in prog.cflags)


def test_kprobe_programs_compile_and_load(live):
    """The generated kprobe C passes clang and the verifier on this kernel, even
    where kprobes can't attach (load does not need CONFIG_KPROBES)."""
    from bcc import BPF

    from kvmtrace.host import headers

    probes = [p for p in catalogue.PROBES if p.kfuncs] + catalogue.parse_selection("memslots")
    prog = program.build(probes, True, _offsets(probes))
    b = BPF(text=prog.text, cflags=headers.apply(headers.find()) + prog.cflags)
    for _, _, fn in prog.attach:
        assert b.load_func(fn, BPF.KPROBE).fd >= 0
    b.cleanup()


def test_unknown_probe_is_a_clear_error():
    with pytest.raises(catalogue.SelectionError, match="unknown probe or set 'nope'"):
        catalogue.parse_selection("nope")
