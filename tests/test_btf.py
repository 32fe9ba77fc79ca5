"""Struct offsets and enums from the running kernel's BTF, checked against
pahole (dwarves), an independent BTF reader."""

import os
import re
import shutil
import subprocess

import pytest

from kvmtrace.host.btf import BTF, BTFError

from conftest import REQUIRE_LIVE

pytestmark = pytest.mark.skipif(
    not os.path.exists("/sys/kernel/btf/vmlinux") and not REQUIRE_LIVE,
    reason="kernel without BTF")


def _pahole(struct):
    out = subprocess.run(["pahole", "-C", struct, "/sys/kernel/btf/vmlinux"],
                         capture_output=True, text=True).stdout
    return {name: int(off) for name, off in
            re.findall(r"\s\**(\w+)(?:\[\d*\])?;\s+/\*\s+(\d+)\s", out)}


@pytest.mark.parametrize("struct,fields", [
    ("vm_area_struct", ["vm_start", "vm_end", "vm_mm", "vm_page_prot"]),
    ("kvm_memory_slot", ["base_gfn", "npages", "userspace_addr", "flags", "id", "as_id"]),
])
def test_offsets_match_pahole(struct, fields):
    if not shutil.which("pahole"):
        if REQUIRE_LIVE:
            pytest.fail("pahole (dwarves) missing: scripts/setup installs it")
        pytest.skip("pahole not installed")
    want = _pahole(struct)
    with BTF("kvm") as b:
        if not b.has_struct(struct):
            pytest.skip(f"struct {struct} not in this kernel's BTF")
        for f in fields:
            assert b.member_offset(struct, f) == want[f], f


def test_member_inside_anonymous_union():
    """vm_flags sits in an anonymous union since 6.3; found either way."""
    with BTF() as b:
        off = b.member_offset("vm_area_struct", "vm_flags")
        assert off > b.member_offset("vm_area_struct", "vm_mm")
        assert b.member_offset("vm_area_struct", "vm_page_prot.pgprot") == \
            b.member_offset("vm_area_struct", "vm_page_prot")


def test_enum_values():
    with BTF("kvm") as b:
        assert b.enum("kvm_mr_change") == {"KVM_MR_CREATE": 0, "KVM_MR_DELETE": 1,
                                           "KVM_MR_MOVE": 2, "KVM_MR_FLAGS_ONLY": 3}


def test_missing_names_are_clear_errors():
    with BTF() as b:
        with pytest.raises(BTFError, match="no_such_struct"):
            b.member_offset("no_such_struct", "x")
        with pytest.raises(BTFError, match="has no member"):
            b.member_offset("vm_area_struct", "no_such_field")
        with pytest.raises(BTFError, match="enum no_such_enum"):
            b.enum("no_such_enum")
