"""What the guest does: memslots, guest accesses, memslot changes over time.

Why a separate, architecture-neutral description: tests and benchmarks of the
tracer need to know exactly what the guest did, and the x86 and arm64 guests
(x86.py, arm64.py) run the same scenarios. A Scenario is plain data (dataclasses, JSON round-trip); the
VMM (vmm.py) executes it and the report repeats it with the addresses filled
in, next to `expected_faults`, the host's fault rule applied to it.

Slot 0 is always the VMM's system slot (page tables, guest code, stacks) and
is not part of `slots`; scenario slots are numbered from 1.
"""

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from typing import List, Optional

from . import backings, faults
from .backings import (ALL_KINDS, ANY_BAR_KINDS, BAR_KINDS, HUGE_SIZE, KINDS,  # noqa: F401
                       PAGE_SIZE, round_up)

ACCESSES = ("r", "w", "rw", "x")
EXPECTS = ("ok", "refused")
CHANGE_KINDS = ("flags", "move", "delete", "fail-overlap", "fail-misaligned")
SYSTEM_SLOT = 0
SYSTEM_GPA = 0
DATA_BASE_GPA = 16 << 20  # data slots start here; the system slot must fit below
SLOT_GAP = HUGE_SIZE  # unmapped hole after each slot: a stray access exits as MMIO
HUGE_PAGES = HUGE_SIZE // PAGE_SIZE  # 4 KiB pages per 2 MiB guest page


class ScenarioError(ValueError):
    """The scenario is inconsistent (bad slot, page range, access...)."""


@dataclass
class Slot:
    """A guest memory slot. gpa is chosen by layout() unless given."""

    slot: int
    backing: str
    npages: int
    readonly: bool = False  # KVM_MEM_READONLY: guest writes exit as MMIO
    log_dirty: bool = False  # KVM_MEM_LOG_DIRTY_PAGES from the start
    region2: bool = False  # create it with KVM_SET_USER_MEMORY_REGION2 if the host has it
    gpa: Optional[int] = None
    # the guest's page tables map the slot with 2 MiB pages (PDE PS=1)
    # instead of 4 KiB PTEs: only then can a shadow MMU install 2 MiB sptes
    gpage2m: bool = False
    # errno the setup KVM_SET_USER_MEMORY_REGION(2) is expected to fail with
    # (0: it succeeds). A slot expected to be refused has no steps; the VMM
    # records the refusal and goes on without the slot.
    expect_errno: int = 0

    def size(self):
        """Bytes of guest memory asked for (hugetlb/thp: whole 2 MiB pages)."""
        size = self.npages * PAGE_SIZE
        return round_up(size, HUGE_SIZE) if self.backing in ("hugetlb", "thp") else size


@dataclass
class Step:
    """Touch pages [first, first + npages) of a slot once each, in order.

    r: 8-byte load; w: 8-byte store; rw: load then store; x: jump to a stub
    placed in the page (executes from it).

    expect: "ok", or "refused" for a step whose accesses KVM must refuse:
    KVM_RUN fails (the errno is reported), or KVM injects an abort into the
    guest (the syndrome is reported), depending on the kernel. E.g. on arm64
    an execute from a PCI BAR, or a write to the read-only [vvar]. The VMM
    records each refusal and moves the vCPU past the refused access (arm64
    only); an expected refusal is not an error, a missing one is.
    """

    slot: int
    first: int
    npages: int
    access: str
    vcpu: int = 0
    expect: str = "ok"


@dataclass
class Change:
    """A memslot ioctl the VMM issues after the guest has run.

    flags            toggle KVM_MEM_LOG_DIRTY_PAGES (a flags-only change)
    move             same slot at another GPA (method "kvm": one ioctl, KVM's
                     MOVE; "recreate": delete, then create at the new GPA)
    delete           memory_size = 0
    fail-overlap     a new slot over `slot`'s GPA range: fails with EEXIST
    fail-misaligned  a new slot with a size that is not page aligned: EINVAL
    """

    kind: str
    slot: int = 0
    method: str = "kvm"
    gpa: Optional[int] = None  # move target; chosen by layout() unless given


@dataclass
class Scenario:
    name: str
    slots: List[Slot] = field(default_factory=list)
    steps: List[Step] = field(default_factory=list)
    changes: List[Change] = field(default_factory=list)
    vcpus: int = 1

    # -- helpers -----------------------------------------------------------
    def slot(self, slot_id):
        for s in self.slots:
            if s.slot == slot_id:
                return s
        raise ScenarioError(f"no slot {slot_id} in scenario {self.name!r}")

    def next_slot_id(self):
        return max([SYSTEM_SLOT] + [s.slot for s in self.slots]) + 1

    def add_slot(self, backing, npages, access=None, **flags):
        """Append a slot (and, if given, one step touching all its pages)."""
        s = Slot(self.next_slot_id(), backing, npages, **flags)
        self.slots.append(s)
        for acc in access or ():
            self.steps.append(Step(s.slot, 0, npages, acc))
        return s

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(
            name=d.get("name", "custom"),
            slots=[Slot(**s) for s in d.get("slots", [])],
            steps=[Step(**s) for s in d.get("steps", [])],
            changes=[Change(**c) for c in d.get("changes", [])],
            vcpus=d.get("vcpus", 1),
        )

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))

    # -- checks and layout ---------------------------------------------------
    def validate(self):
        """Raise ScenarioError unless the scenario can run as described."""
        if not 1 <= self.vcpus <= 64:
            raise ScenarioError("vcpus must be 1..64")
        ids = [s.slot for s in self.slots]
        if len(set(ids)) != len(ids) or SYSTEM_SLOT in ids:
            raise ScenarioError(f"slot ids must be unique and not {SYSTEM_SLOT} (the system "
                                f"slot)")
        for s in self.slots:
            if s.backing not in ALL_KINDS:
                raise ScenarioError(f"slot {s.slot}: unknown backing {s.backing!r} (one of "
                                    f"{', '.join(ALL_KINDS)})")
            if s.npages <= 0:
                raise ScenarioError(f"slot {s.slot}: npages must be > 0")
            if s.gpa is not None and s.gpa % HUGE_SIZE:
                raise ScenarioError(f"slot {s.slot}: gpa must be 2 MiB aligned")
            if s.gpage2m and s.npages % HUGE_PAGES:
                raise ScenarioError(f"slot {s.slot}: gpage2m needs npages a multiple of "
                                    f"{HUGE_PAGES} (2 MiB)")
            if s.gpage2m and s.backing == "pfnmap":
                raise ScenarioError(f"slot {s.slot}: gpage2m needs 2 MiB of memory; the "
                                    f"pfnmap ([vvar]) VMA is a few pages")
            if s.gpage2m and s.backing in ANY_BAR_KINDS:
                raise ScenarioError(f"slot {s.slot}: gpage2m is for RAM backings, not a "
                                    f"PCI BAR")
        owner = {}  # (slot, page) -> vcpu: pages are not shared between vCPUs
        for st in self.steps:
            s = self.slot(st.slot)
            if st.access not in ACCESSES:
                raise ScenarioError(f"step on slot {st.slot}: access {st.access!r} not in "
                                    f"{ACCESSES}")
            if st.first < 0 or st.npages <= 0 or st.first + st.npages > s.size() // PAGE_SIZE:
                raise ScenarioError(f"step on slot {st.slot}: pages {st.first}.."
                                    f"{st.first + st.npages - 1} outside the slot's "
                                    f"{s.size() // PAGE_SIZE} pages")
            if s.backing == "pfnmap" and st.access == "x":
                raise ScenarioError(f"slot {st.slot}: pfnmap ([vvar]) pages cannot hold an "
                                    f"execute stub")
            if s.expect_errno:
                raise ScenarioError(f"step on slot {st.slot}: the slot is expected to be "
                                    f"refused (errno {s.expect_errno}), nothing can touch it")
            if st.expect not in EXPECTS:
                raise ScenarioError(f"step on slot {st.slot}: expect {st.expect!r} not in "
                                    f"{EXPECTS}")
            if not 0 <= st.vcpu < self.vcpus:
                raise ScenarioError(f"step on slot {st.slot}: vcpu {st.vcpu} of "
                                    f"{self.vcpus}")
            for p in range(st.first, st.first + st.npages):
                if owner.setdefault((st.slot, p), st.vcpu) != st.vcpu:
                    raise ScenarioError(f"slot {st.slot} page {p} is touched by two vCPUs: "
                                        f"the fault count would race")
        live = set(ids)
        for c in self.changes:
            if c.kind not in CHANGE_KINDS:
                raise ScenarioError(f"change {c.kind!r} not in {CHANGE_KINDS}")
            if c.kind in ("flags", "move", "delete", "fail-overlap"):
                if c.slot not in live:
                    raise ScenarioError(f"change {c.kind}: slot {c.slot} does not exist "
                                        f"(any more)")
            if c.kind == "move" and c.method not in ("kvm", "recreate"):
                raise ScenarioError("move method must be kvm or recreate")
            if c.kind == "move" and c.gpa is not None and c.gpa % HUGE_SIZE:
                raise ScenarioError("move target gpa must be 2 MiB aligned")
            if c.kind == "delete":
                live.discard(c.slot)
        return self

    def layout(self):
        """Give every slot without one a 2 MiB aligned, non-overlapping GPA.

        Slots go upwards from DATA_BASE_GPA in order, each followed by an
        unmapped 2 MiB gap; move targets go above all of them.
        """
        taken = [(s.gpa, s.gpa + s.size()) for s in self.slots if s.gpa is not None]
        cursor = DATA_BASE_GPA

        def place(size):
            nonlocal cursor
            gpa = round_up(cursor, HUGE_SIZE)
            while any(a < gpa + size and gpa < b for a, b in taken):
                gpa = round_up(max(b for a, b in taken if a < gpa + size and gpa < b)
                               + SLOT_GAP, HUGE_SIZE)
            taken.append((gpa, gpa + size))
            cursor = gpa + size + SLOT_GAP
            return gpa

        for s in self.slots:
            if s.gpa is None:
                s.gpa = place(s.size())
        for c in self.changes:
            if c.kind == "move" and c.gpa is None:
                c.gpa = place(self.slot(c.slot).size())
        return self


# --------------------------------------------------------------------------
# built-in scenarios


def demo(machine=None):
    """Every backing kind, every access kind, and each kind of memslot change.

    On arm64 (machine aarch64, default: this one's) also the PCI BAR through
    resource2 and resource2_wc, read and written ("unavailable" without the
    ivshmem device), and the [vvar] write is a refusal there.
    """
    arm = (machine or platform.machine()) == "aarch64"
    sc = Scenario("demo")
    anon = sc.add_slot("anon", 64)
    sc.steps += [Step(anon.slot, 0, 16, "r"), Step(anon.slot, 16, 16, "w"),
                 Step(anon.slot, 32, 16, "rw"), Step(anon.slot, 48, 4, "x")]
    shared = sc.add_slot("anon-shared", 32, ["w"])
    memfd = sc.add_slot("memfd", 32, region2=True)
    sc.steps += [Step(memfd.slot, 0, 16, "rw"), Step(memfd.slot, 16, 16, "r")]
    filed = sc.add_slot("file", 32)
    sc.steps += [Step(filed.slot, 0, 8, "r"), Step(filed.slot, 8, 8, "w"),
                 Step(filed.slot, 16, 2, "x")]
    vvar = sc.add_slot("pfnmap", 4)
    # arm64: a guest write to the read-only [vvar] fails KVM_RUN with EFAULT
    # (x86 turns it into an MMIO exit while [vvar] is VM_PFNMAP; x86 7.3.4's
    # VM_MIXEDMAP [vvar] fails with EFAULT too)
    # (whether [vvar] is VM_PFNMAP is a fact of this host: asked only for it)
    here = machine is None or machine == platform.machine()
    refused = arm or (here and backings.vvar_is_pfnmap() is False)
    sc.steps += [Step(vvar.slot, 0, 4, "r"),
                 Step(vvar.slot, 0, 1, "w", expect="refused" if refused else "ok")]
    ro = sc.add_slot("anon", 16, readonly=True)
    sc.steps += [Step(ro.slot, 0, 8, "r"), Step(ro.slot, 8, 2, "w"),
                 Step(ro.slot, 10, 2, "rw"), Step(ro.slot, 12, 2, "x")]
    dirty = sc.add_slot("anon", 32, log_dirty=True)
    sc.steps += [Step(dirty.slot, 0, 16, "w"), Step(dirty.slot, 16, 8, "r"),
                 Step(dirty.slot, 24, 4, "rw")]
    huge = sc.add_slot("hugetlb", 512)  # skipped ("unavailable") without reserved pages
    sc.steps += [Step(huge.slot, 0, 8, "w")]
    thp = sc.add_slot("thp", 512)
    sc.steps += [Step(thp.slot, 0, 8, "w"), Step(thp.slot, 8, 8, "r")]
    sc.changes = [
        Change("flags", anon.slot),  # turn dirty logging on: flags-only change
        Change("move", filed.slot),  # KVM's move
        Change("delete", shared.slot),
        Change("fail-overlap", anon.slot),  # EEXIST
        Change("fail-misaligned"),  # EINVAL
    ]
    if arm:
        for kind in BAR_KINDS:
            bar_slot = sc.add_slot(kind, 8)
            sc.steps += [Step(bar_slot.slot, 0, 2, "r"), Step(bar_slot.slot, 2, 2, "w"),
                         Step(bar_slot.slot, 4, 2, "rw")]
    return sc


def minimal():
    """One anonymous RAM slot: a few pages written, a few read."""
    sc = Scenario("minimal")
    ram = sc.add_slot("anon", 16)
    sc.steps += [Step(ram.slot, 0, 8, "w"), Step(ram.slot, 8, 8, "r")]
    return sc


def bar():
    """arm64: RAM slots next to a PCI memory BAR mapped through sysfs.

    The ivshmem BAR (2 MiB in the testbed) as two slots: through resource2
    (uncached mmap) and resource2_wc (write-combine mmap), each over its own
    part of the BAR. In each, pages read, written, read then written, and
    one page executed: KVM refuses to execute from device memory
    (expect="refused"), after which the guest goes on.
    """
    sc = Scenario("bar")
    anon = sc.add_slot("anon", 16)
    sc.steps += [Step(anon.slot, 0, 8, "r"), Step(anon.slot, 8, 8, "w")]
    memfd = sc.add_slot("memfd", 16)
    sc.steps += [Step(memfd.slot, 0, 8, "rw"), Step(memfd.slot, 8, 8, "r")]
    for kind in BAR_KINDS:
        s = sc.add_slot(kind, 32)
        sc.steps += [Step(s.slot, 0, 8, "r"), Step(s.slot, 8, 8, "w"), Step(s.slot, 16, 8, "rw"),
                     Step(s.slot, 24, 1, "x", expect="refused")]
    # after the refusals: RAM still works
    sc.steps += [Step(anon.slot, 0, 1, "w")]
    return sc


def x86_bar():
    """x86: a RAM slot next to the ivshmem BAR through resource2 (UC-) and
    resource2_wc (WC), each over its own part of the BAR: pages read,
    written, read then written. No execute step: x86 KVM does not refuse
    fetches from a BAR (arm64's bar scenario expects the refusal)."""
    sc = Scenario("x86-bar")
    anon = sc.add_slot("anon", 16)
    sc.steps += [Step(anon.slot, 0, 8, "r"), Step(anon.slot, 8, 8, "w")]
    for kind in BAR_KINDS:
        s = sc.add_slot(kind, 24)
        sc.steps += [Step(s.slot, 0, 8, "r"), Step(s.slot, 8, 8, "w"), Step(s.slot, 16, 8, "rw")]
    return sc


def cbar(rule=None, dic=None):
    """arm64: a RAM slot next to a *cacheable* mapping of the PCI BAR.

    The bar-cacheable backing (the testbed's kvmtrace_cbar module: the BAR
    remap_pfn_range()d with Normal cacheable attributes, VM_PFNMAP, not RAM):
    the seed case of KVM's cacheable-PFNMAP rules. What KVM does depends on
    the kernel and CPU (faults.arm64_memslot_errno, measured): 6.1 accepts
    the slot and maps its pages Device (PFNMAP forced to Device): the guest
    reads, writes and read-writes a few pages; 7.x on a CPU without
    CTR_EL0.DIC refuses the memslot with EINVAL (kvm_arch_prepare_memory_region):
    the slot is created with expect_errno=EINVAL and nothing touches it.
    rule / dic: faults.arm64_memslot_errno's (default: this host's).
    """
    sc = Scenario("cbar")
    anon = sc.add_slot("anon", 16)
    sc.steps += [Step(anon.slot, 0, 4, "w"), Step(anon.slot, 4, 4, "r")]
    err = faults.arm64_memslot_errno("bar-cacheable", rule=rule, dic=dic) or 0
    s = sc.add_slot("bar-cacheable", 8, expect_errno=err)
    if not err:
        sc.steps += [Step(s.slot, 0, 2, "r"), Step(s.slot, 2, 2, "w"), Step(s.slot, 4, 2, "rw")]
    # RAM after the BAR slot
    sc.steps += [Step(anon.slot, 8, 4, "rw")]
    return sc


def vfio():
    """The PCI BAR as a VMM doing device assignment maps it: through VFIO.

    A RAM slot and the ivshmem BAR through vfio-pci (the bar-vfio backing:
    IOMMU group, type1 container, device fd, the BAR region mmap'ed from it,
    as QEMU's -device vfio-pci does): pages read, written, read then
    written. No execute step (the bar scenario has the arm64 refusal): every
    fault here maps, so the slot's verdict is the memory-type rule itself
    (Device / Normal-NC on arm64, NPT's on x86). No sysfs resource2 slot
    beside it: while vfio-pci holds the BAR's region, mmap of resource2
    failed with EINVAL (measured on 6.1.0-57 arm64; pci_mmap_resource
    refuses a region iomem_is_exclusive() reports claimed, from the source).
    Needs an IOMMU (testbed run --iommu); the bar-vfio slot is "unavailable"
    with the reason without one. The same on both architectures.
    """
    sc = Scenario("vfio")
    anon = sc.add_slot("anon", 16)
    sc.steps += [Step(anon.slot, 0, 8, "r"), Step(anon.slot, 8, 8, "w")]
    s = sc.add_slot("bar-vfio", 32)
    sc.steps += [Step(s.slot, 0, 8, "r"), Step(s.slot, 8, 8, "w"), Step(s.slot, 16, 8, "rw")]
    # after the BAR: RAM still works
    sc.steps += [Step(anon.slot, 0, 1, "w")]
    return sc


def smp():
    """Two vCPUs, each writing its own slot (one vCPU thread each)."""
    sc = Scenario("smp", vcpus=2)
    for vcpu in range(2):
        s = sc.add_slot("anon", 32)
        sc.steps.append(Step(s.slot, 0, 32, "w", vcpu=vcpu))
    return sc


# --------------------------------------------------------------------------
# pairs for `kvmtrace diff`: the two scenarios of a pair differ in one thing
# only, and each has one data slot at the same GPA range (the diff matches
# slots by GPA). Expected faults in the data slot on KVM-PVM
# (faults.expected_faults; the system slot adds one 4K fault to each):
#   huge-base / huge-4k    2 faults at level 2 / 64 at level 1
#   dirty-off / dirty-on   4 faults at level 2 / 64 at level 1 (32 dirty pages)
#   ram / pfnmap           2 faults at level 1 each; the backing VMA differs
#   pages-1x / pages-2x    32 / 64 faults at level 1

PAIR_GPA = DATA_BASE_GPA


def _huge(name, backing, log_dirty=False, reads=0, writes=32):
    """One 4 MiB slot the guest maps with 2 MiB pages; in each 2 MiB frame,
    `reads` pages read, then the next `writes` pages written."""
    sc = Scenario(name)
    s = sc.add_slot(backing, 2 * HUGE_PAGES, gpa=PAIR_GPA, gpage2m=True, log_dirty=log_dirty)
    for frame in (0, HUGE_PAGES):
        if reads:
            sc.steps.append(Step(s.slot, frame, reads, "r"))
        sc.steps.append(Step(s.slot, frame + reads, writes, "w"))
    return sc


def huge_base():
    """2 MiB guest pages on THP (2 MiB host pages): one level-2 fault per frame."""
    return _huge("huge-base", "thp")


def huge_4k():
    """huge-base on 4 KiB host pages (MADV_NOHUGEPAGE): one level-1 fault per page."""
    return _huge("huge-4k", "anon")


def dirty_off():
    """2 MiB guest pages on THP, 16 pages read then 16 written per frame."""
    return _huge("dirty-off", "thp", reads=16, writes=16)


def dirty_on():
    """dirty-off with KVM_MEM_LOG_DIRTY_PAGES: KVM maps 4 KiB sptes only."""
    return _huge("dirty-on", "thp", log_dirty=True, reads=16, writes=16)


def _four_pages(name, backing):
    sc = Scenario(name)
    s = sc.add_slot(backing, 4, gpa=PAIR_GPA)
    # pages 0 and 2: the [vvar] pages with memory behind them on 6.18
    sc.steps += [Step(s.slot, 0, 1, "r"), Step(s.slot, 2, 1, "r")]
    return sc


def ram():
    """Four pages of anonymous RAM, pages 0 and 2 read."""
    return _four_pages("ram", "anon")


def pfnmap():
    """ram with the slot backed by [vvar] (VM_PFNMAP|VM_IO) instead."""
    return _four_pages("pfnmap", "pfnmap")


def _pages(name, npages):
    sc = Scenario(name)
    s = sc.add_slot("anon", 64, gpa=PAIR_GPA)
    sc.steps.append(Step(s.slot, 0, npages, "w"))
    return sc


def pages_1x():
    """A 64-page anonymous slot, 32 pages written."""
    return _pages("pages-1x", 32)


def pages_2x():
    """pages-1x with all 64 pages written."""
    return _pages("pages-2x", 64)


DIFF_PAIRS = (("huge-base", "huge-4k"), ("dirty-off", "dirty-on"), ("ram", "pfnmap"),
              ("pages-1x", "pages-2x"))

BUILTIN = {"demo": demo, "minimal": minimal, "smp": smp, "bar": bar, "cbar": cbar,
           "x86-bar": x86_bar, "vfio": vfio,
           "huge-base": huge_base, "huge-4k": huge_4k, "dirty-off": dirty_off,
           "dirty-on": dirty_on, "ram": ram, "pfnmap": pfnmap, "pages-1x": pages_1x,
           "pages-2x": pages_2x}


def builtin(name):
    try:
        return BUILTIN[name]()
    except KeyError:
        raise ScenarioError(f"unknown scenario {name!r} (one of "
                            f"{', '.join(BUILTIN)})") from None


# --------------------------------------------------------------------------
# command-line specs

SLOT_FLAGS = {"ro": "readonly", "readonly": "readonly", "dirty": "log_dirty",
              "log_dirty": "log_dirty", "region2": "region2", "mem2": "region2",
              "gpage2m": "gpage2m"}


def _int(text, what):
    try:
        return int(text, 0)
    except ValueError:
        raise ScenarioError(f"{what}: {text!r} is not a number") from None


def add_slot_spec(sc, spec):
    """--slot KIND:NPAGES[:ACCESS[+ACCESS...]][:FLAG,...]

    ACCESS: r, w, rw, x or "-" (none), each touching all NPAGES pages;
    FLAGs: ro (KVM_MEM_READONLY), dirty (KVM_MEM_LOG_DIRTY_PAGES), region2,
    gpage2m (guest maps the slot with 2 MiB pages; NPAGES a multiple of 512).
    e.g. anon:64:rw  memfd:32:r+w:region2  anon:16:r:ro,dirty  thp:1024:w:gpage2m
    """
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 4:
        raise ScenarioError(f"--slot {spec!r}: expected KIND:NPAGES[:ACCESS][:FLAGS]")
    kind, npages = parts[0], _int(parts[1], "--slot " + spec)
    access = [a for a in (parts[2].split("+") if len(parts) > 2 else []) if a not in ("", "-")]
    for a in access:
        if a not in ACCESSES:
            raise ScenarioError(f"--slot {spec!r}: access {a!r} not in {ACCESSES}")
    flags = {}
    for f in (parts[3].split(",") if len(parts) > 3 and parts[3] else []):
        if f not in SLOT_FLAGS:
            raise ScenarioError(f"--slot {spec!r}: flag {f!r} not in {sorted(SLOT_FLAGS)}")
        flags[SLOT_FLAGS[f]] = True
    return sc.add_slot(kind, npages, access, **flags)


def add_access_spec(sc, spec):
    """--access SLOT:FIRST:NPAGES:ACCESS[:VCPU[:EXPECT]]  (EXPECT: ok, refused)"""
    parts = spec.split(":")
    if len(parts) not in (4, 5, 6):
        raise ScenarioError(f"--access {spec!r}: expected "
                            f"SLOT:FIRST:NPAGES:ACCESS[:VCPU[:EXPECT]]")
    vcpu = _int(parts[4], "--access") if len(parts) >= 5 and parts[4] else 0
    expect = parts[5] if len(parts) == 6 else "ok"
    sc.steps.append(Step(_int(parts[0], "--access"), _int(parts[1], "--access"),
                         _int(parts[2], "--access"), parts[3], vcpu, expect))


def add_change_spec(sc, spec):
    """--change KIND[:SLOT[:METHOD]]  e.g. flags:1  move:2:recreate  delete:3  fail-misaligned"""
    parts = spec.split(":")
    kind = parts[0]
    slot = _int(parts[1], "--change") if len(parts) > 1 else 0
    method = parts[2] if len(parts) > 2 else "kvm"
    if kind in ("flags", "move", "delete", "fail-overlap") and len(parts) < 2:
        raise ScenarioError(f"--change {kind} needs a slot: {kind}:SLOT")
    sc.changes.append(Change(kind, slot, method))
