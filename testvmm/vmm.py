"""Run a Scenario on /dev/kvm and describe exactly what happened.

Why it records so much: the report is the ground truth that tests and
benchmarks hold the tracer's output against, so every memslot ioctl is logged
as issued (with CLOCK_MONOTONIC time, the clock of bpf_ktime_get_ns), every
exit is counted, and each slot carries its addresses, its VMA and the faults
this host is expected to take for it.

Order of a run:
  1. /dev/kvm, KVM_CREATE_VM, capabilities
  2. host memory for every slot (backings.py); the system slot 0 gets page
     tables, one code page run per vCPU and a stack page per vCPU
  3. memslots, in slot order (slot 0 first)
  4. vCPUs, one thread each (comm "kvmtrace-vcpuN"), KVM_RUN until the guest
     signals done; MMIO exits are serviced (reads return 0). Where KVM
     refuses an access (KVM_RUN fails, or on arm64 the guest takes an abort
     KVM injected), the refusal is recorded with its errno / syndrome; a
     step marked expect="refused" then goes on with its next page
  5. host-side checks of guest writes and of 2 MiB host pages,
     KVM_GET_DIRTY_LOG on dirty-logged slots, then the scenario's memslot
     changes
  6. the report; optionally hold (mappings alive) for a tracer to look

Stopping: vCPU threads block the stop signals (SIGINT, SIGTERM, SIGHUP), so
the kernel delivers those to the main thread, whose handler (see __main__)
unwinds run(); close() then kicks every vCPU still in KVM_RUN out of it
(immediate_exit + SIGUSR1) and joins it before any mmap or fd it uses is
closed.
"""

import ctypes
import errno
import mmap
import os
import signal
import struct
import sys
import threading
import time

from kvmtrace import kvmapi

from . import backings, faults
from .kvmcall import check_extension, ioctl, ioctl_errno, open_kvm
from .scenario import DATA_BASE_GPA, HUGE_SIZE, PAGE_SIZE, SYSTEM_GPA, SYSTEM_SLOT

REPORT_VERSION = 1
MAX_EXITS = 100_000  # per vCPU: a guest this size never needs more
MAX_LOGGED = 256  # MMIO / IO exits listed individually (all are counted)
PR_SET_NAME = 15
MAIN_COMM = b"kvmtrace-guest"
# blocked in vCPU threads: delivered to the main thread, which ends the run
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KICK_SIGNAL = signal.SIGUSR1  # makes a vCPU thread's KVM_RUN return EINTR

_libc = ctypes.CDLL(None, use_errno=True)


class VmmError(Exception):
    """An expected failure (no /dev/kvm, a setup ioctl refused...): one line."""


def _set_comm(name):
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def _default_arch():
    import platform

    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        from .x86 import X86Arch

        return X86Arch()
    if machine in ("aarch64", "arm64"):
        from .arm64 import Arm64Arch

        return Arm64Arch()
    raise VmmError(f"no guest support for {machine} yet")


# The architecture interface (x86.X86Arch, arm64.Arm64Arch): name, page_size,
# exec_stub, exec_stub_offset, data_offset, page_table_pages(),
# build_page_tables(), setup_vcpu(), get_pc(), written_value(), gen_program(),
# is_done(). Optional, used when present (arm64):
#   vm_created(kvm_fd, vm_fd)       after KVM_CREATE_VM
#   page0()                         contents of system-slot page 0 (exception vectors)
#   exception_exit(gpa, write, data) -> dict: an MMIO exit reporting a guest exception
#   refusal(vcpu_fd, how, exc)      -> {"access": "x"/"data", "gpa", "pc", "resume"}:
#                                   what KVM refused (how: "kvm_run" / "guest_exception")
#   resume(vcpu_fd, how, target)    move the vCPU past it


def _sum_levels(dicts):
    total = {}
    for d in dicts:
        for level, n in d.items():
            total[level] = total.get(level, 0) + n
    return dict(sorted(total.items()))


def _runs(pages):
    """Split sorted page indexes into lists of consecutive ones."""
    runs = []
    for p in pages:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


class SlotState:
    """A scenario slot (or the system slot) plus what the VMM made of it."""

    def __init__(self, slot, backing, spec=None, role="data"):
        self.slot = slot
        self.spec = spec
        self.role = role
        self.backing = backing
        self.gpa = spec.gpa if spec else SYSTEM_GPA
        self.flags = 0
        if spec and spec.readonly:
            self.flags |= kvmapi.KVM_MEM_READONLY
        if spec and spec.log_dirty:
            self.flags |= kvmapi.KVM_MEM_LOG_DIRTY_PAGES
        self.initial_flags = self.flags
        # the guest maps the slot with 2 MiB PDEs instead of 4 KiB PTEs
        self.gpage2m = bool(spec and spec.gpage2m)
        self.initial_gpa = self.gpa
        self.present = False  # a memslot exists for it right now
        self.ioctl_name = None
        self.touched = []  # (page, access) in guest order
        self.skipped = []  # steps' pages the guest must not touch (see _vcpu_steps)
        self.extra = {}  # role-specific page lists (code, page tables, stack)
        self.dirty_pages = None
        self.write_check = None
        self.host_written = []  # pages the VMM wrote before the run (execute stubs)
        self.host_pages = None  # check_host_pages(): did the host map 2 MiB pages

    @property
    def size(self):
        return self.backing.size

    @property
    def npages(self):
        return self.backing.size // PAGE_SIZE

    def page_gpa(self, page):
        return self.initial_gpa + page * PAGE_SIZE


class Vcpu:
    def __init__(self, index, fd, run):
        self.index = index
        self.fd = fd
        self.run = run  # mmap of struct kvm_run
        self.tid = None
        self.comm = f"kvmtrace-vcpu{index}"
        self.code_gpa = 0
        self.code_pages = 0
        self.stack_gpa = 0
        self.done = False
        self.error = None
        self.exits = {}
        self.mmio = []
        self.io = []
        self.kvm_runs = 0
        self.run_start_ns = self.run_end_ns = 0
        self.final_pc = None
        self.thread = None
        # set by the thread as its last step: from then on it touches neither
        # its kvm_run mapping nor its fd. Not Thread.is_alive(): a join()
        # interrupted by a signal handler's exception can mark a thread that
        # still runs as stopped (CPython 3.11's bpo-45274 handling)
        self.finished = threading.Event()
        self.expect_refused = set()  # (slot, page, "x"/"data") its steps expect KVM to refuse
        self.refusals = []  # what KVM refused, expected or not
        self.run_errno = 0  # errno of a KVM_RUN that ended the run


class Vmm:
    def __init__(self, scenario, arch=None, timeout=30.0, log=None, device="/dev/kvm"):
        self.scenario = scenario.validate().layout()
        self.device = device
        self.arch = arch or _default_arch()
        self.timeout = timeout
        self.log = log or (lambda msg: None)
        self.kvm_fd = self.vm_fd = -1
        self.caps = {}
        self.slots = {}  # slot id -> SlotState, system slot included
        self.vcpus = []
        self.memslot_ioctls = []
        self.dirty_log_ioctls = []
        self.errors = []
        self.skipped_changes = []
        self.mmap_size = 0
        self.cr3 = 0
        self.vcpu_layout = []  # per vCPU: (code gpa, code pages, stack gpa)
        self.expect_refused = {}  # vCPU -> {(slot, page, "x"/"data")} its steps expect refused
        self.stopping = False  # stop_vcpus() was called: vCPU threads end at their next exit

    # ------------------------------------------------------------------ setup
    def open(self):
        try:
            self.kvm_fd = open_kvm(self.device)
        except FileNotFoundError:
            raise VmmError(f"{self.device} does not exist (no KVM on this machine)") from None
        except PermissionError:
            raise VmmError(f"{self.device}: permission denied (run as root or join group "
                           f"kvm)") from None
        except OSError as e:
            raise VmmError(f"{self.device}: {e.strerror or e}") from None
        try:
            self.vm_fd = ioctl(self.kvm_fd, kvmapi.KVM_CREATE_VM, 0)
        except OSError as e:
            raise VmmError(f"KVM_CREATE_VM failed: {e.strerror}") from None
        if hasattr(self.arch, "vm_created"):
            try:
                self.arch.vm_created(self.kvm_fd, self.vm_fd)
            except OSError as e:
                raise VmmError(f"{self.arch.name} VM set-up failed: {e.strerror}") from None
        self.caps = {name: check_extension(self.vm_fd, cap)
                     for name, cap in kvmapi.CAPS.items()}
        self.mmap_size = ioctl(self.kvm_fd, kvmapi.KVM_GET_VCPU_MMAP_SIZE, 0)

    def allocate(self):
        sc = self.scenario
        for spec in sc.slots:
            b = backings.allocate(spec.backing, spec.size(), spec.slot)
            self.slots[spec.slot] = SlotState(spec.slot, b, spec)
            if b.status != "ok":
                self.log(f"slot {spec.slot}: {b.reason}")
        self._build_system_slot()

    def _vcpu_steps(self, vcpu):
        """(gpa, npages, access) for the vCPU's steps on slots that exist."""
        out = []
        for st in self.scenario.steps:
            s = self.slots[st.slot]
            if st.vcpu != vcpu or s.backing.status != "ok":
                continue
            ok = s.backing.readable_pages
            usable = []
            for p in range(st.first, st.first + st.npages):
                if p >= s.npages:  # pfnmap: the VMA is smaller than asked
                    why = f"beyond the {s.npages} pages of the {s.backing.path} VMA"
                elif ok is not None and p not in ok:
                    why = (f"nothing behind this {s.backing.path} page (a read gets SIGBUS, "
                           f"so KVM_RUN would fail with EFAULT)")
                else:
                    usable.append(p)
                    continue
                s.skipped.append({"page": p, "access": st.access, "reason": why})
            for run in _runs(usable):
                out.append((s.page_gpa(run[0]), len(run), st.access))
                s.touched += [(p, st.access) for p in run]
            if st.expect == "refused":
                kind = "x" if st.access == "x" else "data"
                self.expect_refused.setdefault(vcpu, set()).update(
                    (s.slot, p, kind) for p in usable)
        return out

    def _build_system_slot(self):
        arch, sc = self.arch, self.scenario
        programs = [arch.gen_program(self._vcpu_steps(v), v) for v in range(sc.vcpus)]
        code_pages = [-(-len(p) // PAGE_SIZE) for p in programs]
        data_pages, huge_frames = [], []
        for s in self.slots.values():
            if s.backing.status != "ok":
                continue
            if s.gpage2m:
                huge_frames += range(s.gpa // HUGE_SIZE, (s.gpa + s.size) // HUGE_SIZE)
            else:
                data_pages += range(s.gpa // PAGE_SIZE, (s.gpa + s.size) // PAGE_SIZE)
        # page 0 is mapped but left empty (the PVM emulator reads linear
        # address 0 when it emulates `out`; unmapped, the guest triple-faults);
        # then page tables, code, stacks. Size the slot first, then fill it.
        fixed = 1 + sum(code_pages) + sc.vcpus
        npages = fixed
        while True:
            guess = backings.round_up(npages + 16, 512)
            mapped = list(range(0, guess)) + data_pages
            need = fixed + arch.page_table_pages(mapped, huge_frames)
            if need <= guess:
                break
            npages = need
        size = guess * PAGE_SIZE
        if SYSTEM_GPA + size > DATA_BASE_GPA:
            raise VmmError(f"scenario too large: system slot needs {size >> 10} KiB")
        b = backings.allocate("anon", size, SYSTEM_SLOT)
        sys_slot = SlotState(SYSTEM_SLOT, b, role="system")
        self.slots[SYSTEM_SLOT] = sys_slot
        mem = memoryview(b.buffer()).cast("B")
        page0 = arch.page0() if hasattr(arch, "page0") else b""
        mem[:len(page0)] = page0

        cursor = iter(range(PAGE_SIZE, size, PAGE_SIZE))
        self.cr3, tables = arch.build_page_tables(mem, SYSTEM_GPA, cursor, mapped, huge_frames)
        free = next(cursor)
        code_list, stack_list = [], []
        for v, prog in enumerate(programs):
            code = free
            mem[code:code + len(prog)] = prog
            stack = code + code_pages[v] * PAGE_SIZE
            free = stack + PAGE_SIZE
            self.vcpu_layout.append((code, code_pages[v], stack))
            code_list += range(code // PAGE_SIZE, code // PAGE_SIZE + code_pages[v])
            stack_list.append(stack // PAGE_SIZE)
        sys_slot.extra = {"page_tables": [t // PAGE_SIZE for t in tables],
                          "code": code_list, "stack": stack_list}
        if page0:
            sys_slot.extra["vectors"] = [0]
        if hasattr(arch, "walked_tables"):
            # the table pages the guest's accesses walk through (GPA pages):
            # each is a guest-physical access of its own on a TDP host
            pages, frames = {SYSTEM_GPA // PAGE_SIZE + p for p in code_list}, set()
            for s in self.slots.values():
                if s.role != "data":
                    continue
                for p, _ in s.touched:
                    if s.gpage2m:
                        frames.add((s.gpa + p * PAGE_SIZE) // HUGE_SIZE)
                    else:
                        pages.add(s.gpa // PAGE_SIZE + p)
            sys_slot.extra["page_tables_walked"] = [
                t - SYSTEM_GPA // PAGE_SIZE
                for t in arch.walked_tables(tables, mapped, huge_frames, pages, frames)]
        sys_slot.touched = [(p, "x") for p in code_list]
        # execute stubs in every page a step jumps into
        for s in self.slots.values():
            pages = sorted({p for p, a in s.touched if a == "x"}) if s.role == "data" else []
            for p in pages:
                s.backing.write_bytes(p * PAGE_SIZE + arch.exec_stub_offset, arch.exec_stub)
            s.host_written = pages

    # -------------------------------------------------------------- memslots
    def set_region(self, slot, flags, gpa, size, hva, phase, change=None, use2=None,
                   expect=0):
        """Issue one KVM_SET_USER_MEMORY_REGION(2) and log it; returns errno.

        use2=None: the ioctl the slot was created with (changes to a slot made
        with MEMORY_REGION2 use it too).
        """
        as_id = slot >> 16
        if use2 is None:
            existing = self.slots.get(slot)
            use2 = bool(existing and existing.ioctl_name == "KVM_SET_USER_MEMORY_REGION2")
        if use2:
            arg = kvmapi.kvm_userspace_memory_region2(slot, flags, gpa, size, hva)
            req = kvmapi.KVM_SET_USER_MEMORY_REGION2
        else:
            arg = kvmapi.kvm_userspace_memory_region(slot, flags, gpa, size, hva)
            req = kvmapi.KVM_SET_USER_MEMORY_REGION
        name = kvmapi.IOCTL_NAMES[req]
        t0 = time.monotonic_ns()
        _, err = ioctl_errno(self.vm_fd, req, arg)
        t1 = time.monotonic_ns()
        self.memslot_ioctls.append({
            "seq": len(self.memslot_ioctls), "time_ns": t0, "duration_ns": t1 - t0,
            "phase": phase, "change": change, "ioctl": name, "request": req,
            "slot": slot & 0xFFFF, "as_id": as_id, "slot_field": slot,
            "flags": flags, "flag_names": kvmapi.mem_flag_names(flags),
            "gpa": gpa, "size": size, "hva": hva,
            "errno": err, "errno_name": kvmapi.errno_name(err),
            "expected_errno": expect, "expected_errno_name": kvmapi.errno_name(expect),
        })
        return err

    def create_memslots(self):
        have2 = self.caps.get("USER_MEMORY2", 0) > 0
        for sid in sorted(self.slots):
            s = self.slots[sid]
            if s.backing.status != "ok":
                continue
            use2 = bool(s.spec and s.spec.region2 and have2)
            expect = getattr(s.spec, "expect_errno", 0) or 0 if s.spec else 0
            err = self.set_region(sid, s.flags, s.gpa, s.size, s.backing.hva, "setup",
                                  use2=use2, expect=expect)
            if err and err == expect:  # an expected refusal: go on without the slot
                self.log(f"slot {sid}: {self.memslot_ioctls[-1]['ioctl']} refused as "
                         f"expected: {os.strerror(err)}")
                continue
            if err:
                raise VmmError(f"slot {sid} ({s.backing.kind} at gpa {s.gpa:#x}, "
                               f"{s.size >> 10} KiB): {self.memslot_ioctls[-1]['ioctl']} "
                               f"failed: {os.strerror(err)}")
            s.present = True
            s.ioctl_name = self.memslot_ioctls[-1]["ioctl"]

    # ------------------------------------------------------------------ vCPUs
    def create_vcpus(self):
        for v, (code_gpa, code_pages, stack_gpa) in enumerate(self.vcpu_layout):
            fd = ioctl(self.vm_fd, kvmapi.KVM_CREATE_VCPU, v)
            run = mmap.mmap(fd, self.mmap_size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
            vc = Vcpu(v, fd, run)
            vc.code_gpa, vc.code_pages, vc.stack_gpa = code_gpa, code_pages, stack_gpa
            vc.expect_refused = self.expect_refused.get(v, set())
            self.arch.setup_vcpu(fd, self.cr3, code_gpa, stack_gpa + PAGE_SIZE)
            self.vcpus.append(vc)

    def _slot_of(self, gpa):
        for s in self.slots.values():
            if s.present and s.gpa <= gpa < s.gpa + s.size:
                return s.slot
        return None

    def _page_at(self, gpa):
        """(slot, page) of a guest physical address, (None, None) outside every slot."""
        slot = self._slot_of(gpa) if gpa is not None else None
        if slot is None:
            return None, None
        return slot, (gpa - self.slots[slot].gpa) // PAGE_SIZE

    def _refused(self, vc, how, rec):
        """KVM refused a guest access: KVM_RUN failed (how "kvm_run", rec has
        the errno) or the guest took an abort KVM injected (how
        "guest_exception", rec has the syndrome). Records it in vc.refusals;
        returns True when a step expected it and the vCPU was moved past it.
        """
        rec.update(how=how, access=None, gpa=None, slot=None, page=None, expected=False)
        site = None
        if hasattr(self.arch, "refusal"):
            try:
                site = self.arch.refusal(vc.fd, how, rec)
            except OSError:
                site = None
        if site:
            slot, page = self._page_at(site["gpa"])
            rec.update(access=site["access"], gpa=site["gpa"], pc=site["pc"], slot=slot,
                       page=page, expected=(slot, page, site["access"]) in vc.expect_refused)
        vc.refusals.append(rec)
        if rec["expected"]:
            try:
                self.arch.resume(vc.fd, how, site["resume"])
                return True
            except OSError as e:
                vc.error = f"could not move past a refused access: {e.strerror}"
                return False
        if how == "kvm_run":
            vc.run_errno = rec["errno"]
            vc.error = f"KVM_RUN failed: {rec['strerror']} ({rec['errno_name']})"
        else:
            pc = hex(rec["pc"]) if rec.get("pc") is not None else "?"
            vc.error = (f"guest took exception ({rec.get('vector_name')}): "
                        f"{rec.get('ec_name')}, ESR {rec.get('esr', 0):#x}, pc {pc}")
        return False

    def _vcpu_loop(self, vc):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        _set_comm(vc.comm.encode())
        vc.tid = threading.get_native_id()
        run = vc.run
        vc.run_start_ns = time.monotonic_ns()
        try:
            while vc.kvm_runs < MAX_EXITS and not self.stopping:
                vc.kvm_runs += 1
                try:
                    ioctl(vc.fd, kvmapi.KVM_RUN, 0)
                except OSError as e:
                    if e.errno == errno.EINTR and self.stopping:
                        vc.error = "stopped (guest still running)"
                    elif e.errno == errno.EINTR and run[kvmapi.RUN_IMMEDIATE_EXIT]:
                        vc.error = f"timed out after {self.timeout:.1f} s (guest still running)"
                    elif e.errno == errno.EINTR:  # a signal, not a refusal: run on
                        continue
                    else:
                        err = e.errno or errno.EIO
                        if self._refused(vc, "kvm_run", {
                                "errno": err, "errno_name": kvmapi.errno_name(err),
                                "strerror": os.strerror(err), "pc": None}):
                            continue
                    return
                reason = struct.unpack_from("<I", run, kvmapi.RUN_EXIT_REASON)[0]
                name = kvmapi.exit_reason_name(reason)
                vc.exits[name] = vc.exits.get(name, 0) + 1
                if reason == kvmapi.KVM_EXIT_IO:
                    direction, size, port, count, off = struct.unpack_from(
                        kvmapi.RUN_IO_FMT, run, kvmapi.RUN_UNION)
                    value = int.from_bytes(run[off:off + size], "little")
                    if len(vc.io) < MAX_LOGGED:
                        vc.io.append({"port": port, "out": direction == kvmapi.KVM_EXIT_IO_OUT,
                                      "size": size, "count": count, "value": value})
                    if self.arch.is_done("io", port, direction == kvmapi.KVM_EXIT_IO_OUT):
                        vc.done = True
                        return
                    if direction == kvmapi.KVM_EXIT_IO_IN:
                        run[off:off + size * count] = bytes(size * count)
                elif reason == kvmapi.KVM_EXIT_MMIO:
                    gpa, data, length, is_write = struct.unpack_from(
                        kvmapi.RUN_MMIO_FMT, run, kvmapi.RUN_UNION)
                    if len(vc.mmio) < MAX_LOGGED:
                        vc.mmio.append({
                            "gpa": gpa, "len": length, "write": bool(is_write),
                            "data": int.from_bytes(data[:length], "little") if is_write else None,
                            "slot": self._slot_of(gpa)})
                    if self.arch.is_done("mmio", gpa, bool(is_write)):
                        vc.done = True
                        return
                    exc = (self.arch.exception_exit(gpa, bool(is_write),
                                                    int.from_bytes(data[:8], "little"))
                           if hasattr(self.arch, "exception_exit") else None)
                    if exc is not None:
                        if self._refused(vc, "guest_exception", exc):
                            continue
                        return
                    if not is_write:
                        off = kvmapi.RUN_MMIO_DATA
                        run[off:off + 8] = bytes(8)
                elif reason == kvmapi.KVM_EXIT_INTR:
                    continue
                else:
                    vc.error = f"unexpected exit {name} ({reason})"
                    return
            if self.stopping:
                vc.error = "stopped (guest still running)"
            else:
                vc.error = f"gave up after {MAX_EXITS} exits"
        finally:
            vc.run_end_ns = time.monotonic_ns()
            vc.finished.set()

    def run_vcpus(self):
        """Run every vCPU in its own thread until done, an error or the timeout.

        A vCPU still in KVM_RUN at the timeout is kicked out with
        immediate_exit + SIGUSR1 (a no-op handler, so KVM_RUN returns EINTR).
        Handlers can only be installed from the main thread; elsewhere the
        timeout is not enforced.
        """
        main = threading.current_thread() is threading.main_thread()
        # a stop signal waits until every thread is started (and vc.thread
        # names only started ones), so close() knows which ones to end
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for vc in self.vcpus:
                thread = threading.Thread(target=self._vcpu_loop, args=(vc,), name=vc.comm,
                                          daemon=True)
                thread.start()
                vc.thread = thread
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        deadline = time.monotonic() + self.timeout
        for vc in self.vcpus:
            vc.finished.wait(max(0.0, deadline - time.monotonic()) if main else None)
            if not vc.finished.is_set():
                self._kick([vc])
        for vc in self.vcpus:
            try:
                vc.final_pc = self.arch.get_pc(vc.fd)
            except OSError:
                pass
            if vc.error:
                pc = hex(vc.final_pc) if vc.final_pc is not None else "?"
                self.errors.append(f"vcpu {vc.index}: {vc.error} (pc {pc})")
            elif not vc.done:
                what = "port" if hasattr(self.arch, "done_port") else "exit"
                self.errors.append(f"vcpu {vc.index}: did not reach the done {what}")
            refused = {(r["slot"], r["page"], r["access"]) for r in vc.refusals
                       if r["expected"]}
            missing = sorted(vc.expect_refused - refused)
            if vc.done and missing:
                what = ", ".join(
                    f"slot {slot} page {page} ({'execute' if kind == 'x' else 'data access'})"
                    for slot, page, kind in missing)
                self.errors.append(f"vcpu {vc.index}: KVM was expected to refuse {what}, "
                                   f"but did not")
            if any(r["how"] == "guest_exception" for r in vc.refusals):
                sys_slot = self.slots[SYSTEM_SLOT]
                if (0, "x") not in sys_slot.touched:  # the vectors ran
                    sys_slot.touched.insert(0, (0, "x"))

    # -------------------------------------------------------------- after run
    def check_writes(self):
        """Compare host memory with what the guest was told to store.

        A page written by the guest (w, rw) holds arch.written_value(gpa) at
        data_offset; in a read-only slot, and in [vvar], the write went to the
        VMM as MMIO and host memory must not hold it.
        """
        for s in self.slots.values():
            if s.role != "data" or s.backing.status != "ok":
                continue
            readable = s.backing.readable_pages
            written = sorted({p for p, a in s.touched if a in ("w", "rw")
                              and (readable is None or p in readable)})
            if not written:
                continue
            lands = faults.writes_land(s.backing.kind, s.initial_flags)
            buf = s.backing.buffer()
            bad = []
            for p in written:
                off = p * PAGE_SIZE + self.arch.data_offset
                got = struct.unpack_from("<Q", buf, off)[0]
                want = self.arch.written_value(s.page_gpa(p))
                if (got == want) != lands:
                    bad.append({"page": p, "value": got})
            s.write_check = {"pages": len(written), "expect_in_host_memory": lands,
                             "ok": not bad, "mismatches": bad[:16]}
            if bad:
                self.errors.append(f"slot {s.slot}: {len(bad)} written pages do not match "
                                   f"host memory")

    def check_host_pages(self):
        """Check that 2 MiB guest pages on thp / hugetlb got 2 MiB host pages.

        expected_faults assumes each 2 MiB frame of such a slot is one host
        huge page. hugetlb always is; THP comes from the fault path (measured
        here: every time) but the kernel falls back to 4 KiB pages when it
        cannot allocate a 2 MiB one, and then the rule does not hold. Every
        frame written (by the guest, or by the VMM's execute stubs) must show
        in smaps AnonHugePages / *_Hugetlb; frames only read map the huge
        zero page, which smaps does not count, so they go unchecked.
        """
        for s in self.slots.values():
            if not (s.gpage2m and s.backing.status == "ok"
                    and s.backing.kind in faults.HUGE_HOST_KINDS):
                continue
            vma = s.backing.describe() or {}
            lands = faults.writes_land(s.backing.kind, s.initial_flags)
            written = {p // faults.PAGES_PER_2M for p in s.host_written}
            written |= {p // faults.PAGES_PER_2M for p, a in s.touched
                        if lands and a in faults.WRITE_ACCESSES}
            if s.backing.kind == "thp":
                huge_kb = vma.get("anon_huge_kb", 0)
            else:
                huge_kb = vma.get("private_hugetlb_kb", 0) + vma.get("shared_hugetlb_kb", 0)
            need_kb = len(written) * (HUGE_SIZE >> 10)
            s.host_pages = {"written_frames": len(written), "huge_kb": huge_kb,
                            "needed_kb": need_kb, "ok": huge_kb >= need_kb}
            if huge_kb < need_kb:
                self.errors.append(
                    f"slot {s.slot} ({s.backing.kind}): only {huge_kb} KiB of the {need_kb} "
                    f"KiB written are 2 MiB host pages; expected_faults assumes 2 MiB host "
                    f"pages")

    def get_dirty_logs(self):
        for sid in sorted(self.slots):
            s = self.slots[sid]
            if not (s.present and s.flags & kvmapi.KVM_MEM_LOG_DIRTY_PAGES):
                continue
            words = -(-s.npages // 64)
            bitmap = (ctypes.c_uint64 * words)()
            arg = kvmapi.kvm_dirty_log(sid, 0, ctypes.addressof(bitmap))
            t0 = time.monotonic_ns()
            _, err = ioctl_errno(self.vm_fd, kvmapi.KVM_GET_DIRTY_LOG, arg)
            pages = [w * 64 + b for w in range(words) for b in range(64)
                     if bitmap[w] >> b & 1] if not err else None
            self.dirty_log_ioctls.append({
                "seq": len(self.dirty_log_ioctls), "time_ns": t0, "ioctl": "KVM_GET_DIRTY_LOG",
                "request": kvmapi.KVM_GET_DIRTY_LOG, "slot": sid, "errno": err,
                "errno_name": kvmapi.errno_name(err), "dirty_pages": pages})
            s.dirty_pages = pages
            if err:
                self.errors.append(f"slot {sid}: KVM_GET_DIRTY_LOG failed: "
                                   f"{os.strerror(err)}")

    def apply_changes(self):
        for ch in self.scenario.changes:
            getattr(self, "_change_" + ch.kind.replace("-", "_"))(ch)

    def _live(self, ch):
        s = self.slots.get(ch.slot)
        if s is None or not s.present:
            state = "unavailable" if s and s.backing.status != "ok" else "not present"
            why = f"slot {ch.slot} is {state}"
            self.skipped_changes.append({"kind": ch.kind, "slot": ch.slot, "reason": why})
            self.log(f"change {ch.kind} skipped: {why}")
            return None
        return s

    def _change_flags(self, ch):
        s = self._live(ch)
        if s:
            new = s.flags ^ kvmapi.KVM_MEM_LOG_DIRTY_PAGES
            if not self.set_region(s.slot, new, s.gpa, s.size, s.backing.hva, "change", "flags"):
                s.flags = new

    def _change_move(self, ch):
        s = self._live(ch)
        if not s:
            return
        if ch.method == "recreate":
            if self.set_region(s.slot, s.flags, s.gpa, 0, s.backing.hva, "change", "move"):
                return
            s.present = False
        if not self.set_region(s.slot, s.flags, ch.gpa, s.size, s.backing.hva, "change", "move"):
            s.gpa, s.present = ch.gpa, True

    def _change_delete(self, ch):
        s = self._live(ch)
        if s and not self.set_region(s.slot, 0, s.gpa, 0, s.backing.hva, "change", "delete"):
            s.present = False

    def _unused_slot_id(self):
        return max(self.slots) + 1

    def _change_fail_overlap(self, ch):
        s = self._live(ch)
        if s:
            self.set_region(self._unused_slot_id(), 0, s.gpa, PAGE_SIZE, s.backing.hva,
                            "change", "fail-overlap", expect=errno.EEXIST)

    def _change_fail_misaligned(self, ch):
        sys_slot = self.slots[SYSTEM_SLOT]
        self.set_region(self._unused_slot_id(), 0, DATA_BASE_GPA - (4 << 20),
                        PAGE_SIZE + 512, sys_slot.backing.hva, "change", "fail-misaligned",
                        expect=errno.EINVAL)

    def check_change_results(self):
        for rec in self.memslot_ioctls:
            if rec["errno"] != rec["expected_errno"]:
                self.errors.append(
                    f"{rec['ioctl']} slot {rec['slot']} ({rec['change'] or rec['phase']}): "
                    f"errno {rec['errno_name'] or 0}, expected {rec['expected_errno_name'] or 0}")

    # ------------------------------------------------------------------ report
    def report(self):
        mmu = faults.host_mmu()
        slots = []
        for sid in sorted(self.slots):
            s = self.slots[sid]
            s.backing.describe()  # after the run: Rss / AnonHugePages are current
            touched = {}
            for p, a in s.touched:
                touched.setdefault(a, []).append(p)
            expected = faults.expected_faults(
                s.backing.kind, s.initial_flags, s.touched, mmu,
                status=s.backing.status, role=s.role, extra=s.extra, gpage2m=s.gpage2m,
                host_written=s.host_written, fs=s.backing.fs)
            d = {
                "slot": sid, "as_id": 0, "role": s.role, "backing": s.backing.kind,
                "status": s.backing.status, "unavailable_reason": s.backing.reason or None,
                "hva": s.backing.hva, "gpa": s.initial_gpa, "size": s.size,
                "npages": s.npages, "flags": s.initial_flags,
                "flag_names": kvmapi.mem_flag_names(s.initial_flags),
                "ioctl": s.ioctl_name, "path": s.backing.path, "fs": s.backing.fs,
                "vma": s.backing.vma,
                "touched": touched,
                "touched_counts": {a: len(p) for a, p in touched.items()},
                "skipped": s.skipped,
                "readable_pages": s.backing.readable_pages,
                "guest_page_size": HUGE_SIZE if s.gpage2m else PAGE_SIZE,
                "expected_faults": expected["total"],
                "expected_levels": expected["levels"],
                "expected_set_spte": expected["set_spte"],
                "expected_faults_detail": expected,
                "host_pages": s.host_pages,
                "dirty_pages": s.dirty_pages,
                "expected_dirty_pages": (
                    faults.expected_dirty_pages(s.backing.kind, s.initial_flags, s.touched,
                                                s.gpage2m, s.host_written, mmu=mmu,
                                                fs=s.backing.fs)
                    if s.dirty_pages is not None else None),
                "write_check": s.write_check,
                "final": {"present": s.present, "gpa": s.gpa, "flags": s.flags,
                          "flag_names": kvmapi.mem_flag_names(s.flags)},
            }
            if s.role == "system":
                d.update(s.extra)
            slots.append(d)
        counts, mmio, io = {}, [], []
        for vc in self.vcpus:
            for k, n in vc.exits.items():
                counts[k] = counts.get(k, 0) + n
            mmio += [dict(m, vcpu=vc.index) for m in vc.mmio]
            io += [dict(x, vcpu=vc.index) for x in vc.io]
        starts = [vc.run_start_ns for vc in self.vcpus if vc.run_start_ns]
        ends = [vc.run_end_ns for vc in self.vcpus if vc.run_end_ns]
        return {
            "version": REPORT_VERSION,
            "tool": "testvmm",
            "arch": self.arch.name,
            "ok": not self.errors,
            "errors": list(self.errors),
            "pid": os.getpid(),
            "comm": MAIN_COMM.decode(),
            "kernel": os.uname().release,
            "mmu": mmu,
            "kvm_fd": self.kvm_fd,
            "vm_fd": self.vm_fd,
            "caps": self.caps,
            "scenario": self.scenario.to_dict(),
            "vcpus": [{
                "index": vc.index, "fd": vc.fd, "tid": vc.tid, "comm": vc.comm,
                "done": vc.done, "error": vc.error, "kvm_run_calls": vc.kvm_runs,
                "run_errno": vc.run_errno, "run_errno_name": kvmapi.errno_name(vc.run_errno),
                "refusals": vc.refusals,
                "exits": vc.exits, "run_ns": vc.run_end_ns - vc.run_start_ns,
                "code_gpa": vc.code_gpa, "stack_gpa": vc.stack_gpa, "final_pc": vc.final_pc,
            } for vc in self.vcpus],
            "memslot_ioctls": self.memslot_ioctls,
            "dirty_log_ioctls": self.dirty_log_ioctls,
            "skipped_changes": self.skipped_changes,
            "slots": slots,
            "exits": {"counts": counts, "mmio": mmio, "io": io},
            "refusals": [dict(r, vcpu=vc.index) for vc in self.vcpus for r in vc.refusals],
            "run_start_ns": min(starts) if starts else None,
            "run_end_ns": max(ends) if ends else None,
            "run_ns": (max(ends) - min(starts)) if starts and ends else None,
            "expected_faults_total": sum(s["expected_faults"] or 0 for s in slots),
            "expected_levels_total": _sum_levels(s["expected_levels"] for s in slots),
            "expected_set_spte_total": sum(s["expected_set_spte"] or 0 for s in slots),
        }

    # -------------------------------------------------------------- lifecycle
    def _kick(self, vcpus):
        """Get each vCPU thread out of KVM_RUN and wait for it to end.

        immediate_exit makes the next KVM_RUN return EINTR at once; SIGUSR1
        (a no-op handler) interrupts the one in progress. Handlers can only be
        installed from the main thread: elsewhere a thread is only waited for
        (up to 5 s) and True means it is still running.
        """
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(KICK_SIGNAL, lambda *_: None) if main else None
        try:
            for vc in vcpus:
                vc.run[kvmapi.RUN_IMMEDIATE_EXIT] = 1
                deadline = time.monotonic() + 5
                while not vc.finished.is_set() and (main or time.monotonic() < deadline):
                    if main:
                        try:
                            signal.pthread_kill(vc.thread.ident, KICK_SIGNAL)
                        except ProcessLookupError:  # it ended meanwhile
                            pass
                    vc.finished.wait(0.05)
        finally:
            if main:
                signal.signal(KICK_SIGNAL, signal.SIG_DFL if previous is None else previous)
        return not all(vc.finished.is_set() for vc in vcpus)

    def stop_vcpus(self):
        """End every vCPU thread still running (a signal or an error cut the
        run short). Returns True if one could not be ended."""
        self.stopping = True
        alive = [vc for vc in self.vcpus if vc.thread is not None and not vc.finished.is_set()]
        return self._kick(alive) if alive else False

    def close(self):
        """Release everything; vCPU threads are ended first, so none touches a
        closed kvm_run mapping or fd."""
        stuck = self.stop_vcpus()
        for vc in self.vcpus:
            if stuck and vc.thread is not None and not vc.finished.is_set():
                continue  # leave its mapping alone: the process is about to exit
            vc.run.close()
            os.close(vc.fd)
        for fd in (self.vm_fd, self.kvm_fd):
            if fd >= 0:
                os.close(fd)
        self.vm_fd = self.kvm_fd = -1
        for s in self.slots.values():
            s.backing.close()


def _wait_for(path: str, timeout: float):
    print(f"testvmm: set up, waiting for {path}", file=sys.stderr, flush=True)
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise VmmError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.01)


GATE_LIMIT = 3600.0  # s: how long a gated VMM waits for its gate (--gate-timeout)


def run(scenario, arch=None, timeout=30.0, log=None, on_report=None, hold=0.0,
        device="/dev/kvm", pause=0.0, gate=None, gate_timeout=GATE_LIMIT):
    """Run `scenario`; returns the report dict (report["ok"] says if all went as planned).

    on_report(report) is called before the hold, while every fd and mapping is
    still alive, so a tracer can inspect /proc/PID/* against the report.
    ``pause``: seconds between setting up (memslots, vCPUs) and running the
    guest, so that a tracer attaching then finds a VM whose memslots exist;
    ``gate``: a path: say so on stderr ("testvmm: set up, waiting for PATH")
    and run the guest once PATH exists (a test's handshake, not a timing),
    waiting at most ``gate_timeout`` s: not ``timeout``, the guest's run
    limit, since what opens the gate (a tracer attaching, bcc compiling under
    TCG) can take minutes; with ``timeout`` (30 s) the VMM of
    tests/test_vfio_live.py gave up before query's window attached.
    Raises VmmError for failures that leave nothing to report (no /dev/kvm,
    a setup memslot refused).
    """
    _set_comm(MAIN_COMM)
    vmm = Vmm(scenario, arch, timeout, log, device)
    try:
        vmm.open()
        vmm.allocate()
        vmm.create_memslots()
        vmm.create_vcpus()
        if pause > 0:
            time.sleep(pause)
        if gate:
            _wait_for(gate, gate_timeout)
        vmm.run_vcpus()
        vmm.check_writes()
        vmm.check_host_pages()
        vmm.get_dirty_logs()
        vmm.apply_changes()
        vmm.check_change_results()
        report = vmm.report()
        if on_report:
            on_report(report)
        if hold > 0:
            time.sleep(hold)
        return report
    finally:
        vmm.close()
