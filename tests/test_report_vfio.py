"""Reports of real recordings of the PCI BAR through VFIO (device assignment
as QEMU maps it), offline: the test VMM's ``vfio`` scenario recorded in the
emulated arm64 and x86 hosts booted with an IOMMU (``--iommu``), Debian
6.1 and 7.3.4. tests/fixtures/arm64-vfio/README.md and x86-vfio/README.md have
the commands that made them.

Checked against the guest's own report and the kernels' sources: the BAR
slot's VMA is vfio-pci's (anon_inode:[vfio-device], VM_PFNMAP|VM_IO, and
VM_ALLOW_ANY_UNCACHED, set by vfio_pci_core_mmap from 6.9, on 7.3.4 only);
every fault is in its slot, as many as the guest counts; arm64 installs
Device on 6.1 (every non-RAM pfn) and Normal-NC on 7.3.4
(s2_force_noncacheable with VM_ALLOW_ANY_UNCACHED), and the slot's verdict
names that rule; x86 NPT entries carry no memory type (write-back bits),
and the verdict names the NPT rule.
"""

import json

import numpy as np
import pytest

import kvmtrace
from kvmtrace.memtype import arm64 as a64
from kvmtrace.memtype import x86

from conftest import FIXTURES, kvmtrace as run

A64, X86 = FIXTURES / "arm64-vfio", FIXTURES / "x86-vfio"
VM_IO, VM_PFNMAP, VM_ALLOW_ANY_UNCACHED = 1 << 14, 1 << 10, 1 << 39
KERNELS = ["6.1", "7.x"]
X86_KERNELS = KERNELS
# the arm64 rule that decided the vfio BAR's stage-2 type, per kernel
A64_RULE = {"6.1": "device_pfn_forced", "7.x": "force_noncacheable_nc"}


def _have(d, k):
    return (d / f"vfio-{k}.kvt").exists()


def load(d, k):
    if not _have(d, k):
        pytest.skip(f"no {d.name}/vfio-{k}.kvt fixture")
    g = json.loads((d / f"vfio-{k}.guest.json").read_text())
    return kvmtrace.load(str(d / f"vfio-{k}.kvt")), g


def _slot(g, backing):
    return next(s["slot"] for s in g["slots"] if s["backing"] == backing)


def check_common(m, g, k):
    assert g["ok"], g["errors"]
    assert {s["backing"]: s["status"] for s in g["slots"] if s["role"] == "data"} == \
        {"anon": "ok", "bar-vfio": "ok"}
    slots = m.slots[m.slots["pid"] == g["pid"]].set_index("slot")
    n = _slot(g, "bar-vfio")
    assert slots.loc[n, "vma"] == "anon_inode:[vfio-device]"
    flags = int(slots.loc[n, "vm_flags"])
    assert flags & (VM_IO | VM_PFNMAP) == VM_IO | VM_PFNMAP
    assert bool(flags & VM_ALLOW_ANY_UNCACHED) == (k == "7.x")
    f = m.faults[m.faults["pid"] == g["pid"]]
    # outside every memslot: only the guest's MMIO exits (arm64: the stores
    # to its exit page, each a stage-2 abort with no slot)
    assert (f["slot_row"] < 0).sum() <= g["exits"]["counts"].get("MMIO", 0)
    f = f[f["slot_row"] >= 0]
    assert f.groupby("slot").size().to_dict() == {
        s["slot"]: s["expected_faults"] for s in g["slots"] if s["expected_faults"]}
    assert not len(m.lost) or int(m.lost["lost"].sum()) == 0
    return slots, f


@pytest.mark.parametrize("k", KERNELS)
def test_arm64_vfio_bar_stage2_type_and_rule(k):
    m, g = load(A64, k)
    slots, f = check_common(m, g, k)
    n = _slot(g, "bar-vfio")
    assert slots.loc[n, "pgprot_memtype"] == "Device-nGnRnE"  # vfio-pci: pgprot_noncached
    rule = a64.RULES[A64_RULE[k]]
    bar = f[f["slot"] == n]
    assert len(bar) == 24
    assert set(bar["spte_memtype"].astype(str)) == {rule.stage2}
    assert bar["rule"].astype(str).str.startswith(rule.words).all()
    v = m.verdicts[m.verdicts["pid"] == g["pid"]].set_index("slot")
    assert v.loc[n, "verdict"] == "consistent"
    assert "kernel rule: " + rule.words in v.loc[n, "reason"]
    assert f"KVM installed {rule.stage2}" in v.loc[n, "reason"]


@pytest.mark.parametrize("k", X86_KERNELS)
def test_x86_vfio_bar_on_npt(k):
    m, g = load(X86, k)
    assert m.meta["kvm"]["mmu"] == "npt" and m.meta["kvm"]["vendor"] == "amd"
    slots, f = check_common(m, g, k)
    n = _slot(g, "bar-vfio")
    assert slots.loc[n, "pgprot_memtype"] == "UC-"  # vfio-pci: pgprot_noncached -> PCD
    bar = f[f["slot"] == n]
    sptes = bar["spte"].astype("uint64").to_numpy()
    assert not (sptes & np.uint64(x86.PWT | x86.PCD | x86.PAT_4K)).any()
    assert set(f["rule"].astype(str)) == {x86.NPT_RULE}
    v = m.verdicts[m.verdicts["pid"] == g["pid"]].set_index("slot")
    assert v.loc[n, "verdict"] == "unknown"
    assert "kernel rule: " + x86.NPT_RULE in v.loc[n, "reason"]


@pytest.mark.parametrize("k", X86_KERNELS)
def test_x86_host_side_pat_memtype_list(k):
    """While the VMM held the BAR, the PAT memtype list had its vfio part
    uncached-minus (vfio-pci's pgprot_noncached, UC- on x86), as the VMA said,
    and vfio-pci had the device."""
    p = X86 / f"vfio-{k}.host.txt"
    if not p.exists():
        pytest.skip(f"no {p.name}")
    during = p.read_text().split("## pat_memtype_list while the VMM holds the BAR")[1]
    assert "[mem 0x00000000fe800000-0x00000000fea00000] uncached-minus" in during
    assert "drivers/vfio-pci" in p.read_text()


@pytest.mark.parametrize("d,k", [(d, k) for d in (A64, X86) for k in KERNELS],
                         ids=[f"{a}-{k}" for a in ("arm64", "x86") for k in KERNELS])
def test_report_text_names_the_rule(d, k):
    if not _have(d, k):
        pytest.skip(f"no {d.name}/vfio-{k}.kvt fixture")
    r = run("report", d / f"vfio-{k}.kvt", "--format", "tsv", "--table", "verdicts")
    assert r.returncode == 0, r.stderr
    assert "kernel rule: " in r.stdout and "anon_inode" not in r.stderr


def test_vfio_ioctl_numbers_are_the_uapi_ones():
    """include/uapi/linux/vfio.h: _IO(';', 100 + n)."""
    from testvmm import vfio
    assert (vfio.VFIO_GET_API_VERSION, vfio.VFIO_CHECK_EXTENSION, vfio.VFIO_SET_IOMMU,
            vfio.VFIO_GROUP_GET_STATUS, vfio.VFIO_GROUP_SET_CONTAINER,
            vfio.VFIO_GROUP_GET_DEVICE_FD, vfio.VFIO_DEVICE_GET_REGION_INFO) == \
        (0x3B64, 0x3B65, 0x3B66, 0x3B67, 0x3B68, 0x3B6A, 0x3B6C)
    assert vfio.VFIO_TYPE1v2_IOMMU == 3 and vfio.VFIO_PCI_CONFIG_REGION_INDEX == 7


def test_bar_vfio_without_an_iommu_is_unavailable_with_the_reason(tmp_path, monkeypatch):
    """A PCI device with no iommu_group link (a host without an IOMMU, as
    the testbeds without --iommu): the slot is "unavailable", saying why."""
    from testvmm import backings
    dev = tmp_path / "0000:00:01.0"
    dev.mkdir()
    monkeypatch.setenv(backings.BAR_ENV, f"{dev}:2")
    b = backings.allocate("bar-vfio", 8 * 4096, 2)
    assert b.status == "unavailable"
    assert "has no IOMMU group" in b.reason and "vfio-pci cannot take it" in b.reason
