"""Memslots over time, replayed from the recorded ioctls with KVM's own rules.

KVM (virt/kvm/kvm_main.c, __kvm_set_memory_region, 5.x-6.18) classifies a
successful KVM_SET_USER_MEMORY_REGION(2) as: size 0 -> DELETE; no slot with
that id -> CREATE; a different guest_phys_addr -> MOVE; different flags ->
FLAGS_ONLY; otherwise nothing changes. Changing size or userspace_addr of a
live slot is refused (-EINVAL). Memslot ioctls are rare (tens per VM), so the
replay is a plain loop; faults are attributed to its result with column
operations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .. import kvmapi
from ..kvmapi import ret_errno as errno_name
INF = np.iinfo(np.uint64).max
SLOT_INT_COLS = {"pid": "int64", "proc": "int64", "vm_fd": "int64", "as_id": "int64", "slot": "int64",
                 "gpa": "uint64", "size_bytes": "uint64", "hva": "uint64", "flags": "int64",
                 "gmem_fd": "int64", "start_ts": "uint64", "end_ts": "uint64"}


def flag_names(flags: int) -> str:
    """KVM_MEM_* names, '|'-separated; '' for none (text views show '-')."""
    return "|".join(kvmapi.mem_flag_names(flags))


def _failure_reason(row, live: dict, page: int) -> str:
    """Why KVM refused a memslot ioctl, as far as the request and state tell
    (KVM checks alignment to the host's PAGE_SIZE)."""
    err = errno_name(row.ret)
    if row.read_ok == 0:
        return f"{err}: the request could not be read from user memory by the probe"
    if err == "EINVAL":
        bad = [n for n, v in (("guest_phys_addr", row.gpa), ("memory_size", row.size_bytes),
                              ("userspace_addr", row.hva)) if v % page]
        if bad:
            return f"EINVAL: {', '.join(bad)} not page aligned"
        if row.flags & ~sum(kvmapi.MEM_FLAG_NAMES):
            return f"EINVAL: unknown flags 0x{row.flags:x}"
        old = live.get((row.as_id, row.slot_id))
        if old is not None and row.size_bytes and (old["size_bytes"] != row.size_bytes
                                                   or old["hva"] != row.hva):
            return "EINVAL: a live slot's size or userspace address cannot change"
        if row.size_bytes == 0 and old is None:
            return "EINVAL: deleting a slot that does not exist"
        return "EINVAL: KVM refused the request (invalid parameters for this VM)"
    if err == "EEXIST":
        lo, hi = row.gpa, row.gpa + row.size_bytes
        for (as_id, sid), s in live.items():
            if as_id == row.as_id and sid != row.slot_id and s["gpa"] < hi \
                    and lo < s["gpa"] + s["size_bytes"]:
                return (f"EEXIST: GPA range overlaps slot {sid} "
                        f"({s['gpa']:#x}+{s['size_bytes']:#x})")
        return "EEXIST: GPA range overlaps another slot"
    if err == "EFAULT":
        return "EFAULT: userspace_addr range is not accessible"
    if err == "ENOMEM":
        return "ENOMEM: KVM could not allocate the slot"
    if err == "EPERM":
        return "EPERM: not allowed for this VM"
    return f"{err}: KVM refused the request"


def decode_ops(memslot: pd.DataFrame) -> pd.DataFrame:
    """The memslot ioctls with decoded fields (vectorised part); the raw
    event's byte counts renamed with their unit (schema.OPS)."""
    df = memslot.sort_values("ts", kind="stable").reset_index(drop=True).rename(
        columns={"size": "size_bytes", "gmem_offset": "gmem_offset_bytes"})
    df["as_id"] = (df["slot"].astype("int64") // 65536)
    df["slot_id"] = (df["slot"].astype("int64") % 65536)
    df["ioctl_name"] = np.select([df["ioctl"] == 2, df["ioctl"] == RECOVERED_IOCTL],
                                 ["KVM_SET_USER_MEMORY_REGION2", RECOVERED],
                                 "KVM_SET_USER_MEMORY_REGION")
    df["errno"] = [errno_name(int(r)) for r in df["ret"]]
    df["flag_names"] = [flag_names(int(f)) for f in df["flags"]]
    df["latency_ns"] = (df["ts"].astype("int64") - df["enter_ts"].astype("int64"))
    return df


# created_by of a slot that existed before recording began, read from the kernel
# by record (table memslot_snapshot, collectors/snapshot.py)
BEFORE_RECORDING = "before recording"


def seed(snapshot: pd.DataFrame | None, ops: pd.DataFrame) -> tuple[dict, list]:
    """(replay state, slot versions) of the memslots that existed when
    recording began (``snapshot``: the recording's memslot_snapshot rows with
    ``proc``). Each starts at time 0, since it was set before anything was
    recorded. A slot that a recorded ioctl changed before the snapshot was
    read is left to the ioctls: the snapshot shows it after that change."""
    state: dict = {}
    versions: list = []
    if snapshot is None or not len(snapshot):
        return state, versions
    touched = {}
    for r in ops[["pid", "proc", "vm_fd", "as_id", "slot_id", "ts"]].itertuples(index=False):
        k = (r.pid, r.proc, r.vm_fd, r.as_id, r.slot_id)
        touched[k] = min(touched.get(k, r.ts), r.ts)
    for r in snapshot.itertuples(index=False):
        k = (r.pid, r.proc, r.vm_fd, r.as_id, r.slot)
        if k in touched and touched[k] < r.ts:
            continue
        live = state.setdefault((r.pid, r.proc, r.vm_fd), {})
        if (r.as_id, r.slot) in live:  # the same VM read twice (a thread sharing the fd)
            continue
        new = {"pid": r.pid, "proc": r.proc, "vm_fd": r.vm_fd, "as_id": r.as_id,
               "slot": r.slot, "gpa": int(r.gpa), "size_bytes": int(r.size), "hva": int(r.hva),
               "flags": int(r.flags), "flag_names": flag_names(int(r.flags)),
               "ioctl_name": "", "gmem_fd": -1, "start_ts": 0, "end_ts": INF,
               "created_by": BEFORE_RECORDING, "ended_by": "", "snapshot_ts": int(r.ts)}
        live[(r.as_id, r.slot)] = new
        versions.append(new)
    return state, versions


# ended_by of the slots of a VM whose fd number a new VM of the same process
# got: the old VM was closed (not recorded) some time before that KVM_CREATE_VM
VM_REPLACED = "VM replaced"


def vm_creations(vm_ioctl: pd.DataFrame | None) -> pd.DataFrame:
    """Successful KVM_CREATE_VM calls: (pid, proc, vm_fd = the fd returned, ts),
    from the vm_ioctl rows with ``proc`` (identity.py)."""
    cols = ["pid", "proc", "vm_fd", "ts"]
    if vm_ioctl is None or not len(vm_ioctl):
        return pd.DataFrame({c: pd.Series(dtype="int64") for c in cols})
    c = vm_ioctl[(vm_ioctl["cmd"] == kvmapi.KVM_CREATE_VM) & (vm_ioctl["ret"] >= 0)]
    return pd.DataFrame({"pid": c["pid"].to_numpy(dtype=np.int64),
                         "proc": c["proc"].to_numpy(dtype=np.int64),
                         "vm_fd": c["ret"].to_numpy(dtype=np.int64),
                         "ts": c["ts"].to_numpy(dtype=np.int64)}).sort_values("ts", kind="stable")


def replay(ops: pd.DataFrame, page: int = 4096, snapshot: pd.DataFrame | None = None,
           created: pd.DataFrame | None = None):
    """(ops with 'op' and 'reason' columns, slot versions table); ``page``:
    the host's page size (analysis/pages.py); ``snapshot``: the memslots that
    existed when recording began (see ``seed``), which the ioctls then change;
    ``created``: the KVM_CREATE_VM calls (``vm_creations``). A VM fd number is
    reused when a process closes a VM and creates another (KVM's selftests do
    it all the time): at the new VM's creation the old VM's slots end
    (``VM_REPLACED``), so the new VM starts with none."""
    op_col, reason_col = [], []
    state, versions = seed(snapshot, ops)
    # which VM on its fd number: 0 the first seen, +1 at each KVM_CREATE_VM returning it
    instance = {key: 0 for key in state}
    new_vms = [] if created is None else list(
        created[["ts", "pid", "proc", "vm_fd"]].itertuples(index=False, name=None))
    nxt = 0
    for row in ops.itertuples(index=False):
        while nxt < len(new_vms) and new_vms[nxt][0] <= row.ts:
            ts, pid, proc, fd = new_vms[nxt]
            nxt += 1
            for old in state.pop((pid, proc, fd), {}).values():
                old["end_ts"], old["ended_by"] = int(ts), VM_REPLACED
            instance[(pid, proc, fd)] = instance.get((pid, proc, fd), -1) + 1
        live = state.setdefault((row.pid, row.proc, row.vm_fd), {})
        key = (row.as_id, row.slot_id)
        old = live.get(key)
        if row.size_bytes == 0:
            op = "delete"
        elif old is None:
            op = "create"
        elif old["gpa"] != row.gpa:
            op = "move"
        elif old["flags"] != row.flags:
            op = "flags"
        else:
            op = "no-op"
        if row.ret < 0:
            op_col.append(f"failed {op}")
            reason_col.append(_failure_reason(row, live, page))
            continue
        op_col.append(op)
        reason_col.append("")
        if op == "no-op":
            continue
        if old is not None:
            old["end_ts"], old["ended_by"] = int(row.ts), op
        if op == "delete":
            live.pop(key, None)
            continue
        new = {"pid": row.pid, "proc": row.proc, "vm_fd": row.vm_fd, "as_id": row.as_id, "slot": row.slot_id,
               "gpa": int(row.gpa), "size_bytes": int(row.size_bytes), "hva": int(row.hva),
               "flags": int(row.flags), "flag_names": row.flag_names,
               "ioctl_name": row.ioctl_name, "gmem_fd": int(row.gmem_fd) if row.ioctl == 2
               and row.flags & kvmapi.KVM_MEM_GUEST_MEMFD else -1,
               "start_ts": int(row.ts), "end_ts": INF, "created_by": op, "ended_by": "",
               "vm_instance": instance.setdefault((row.pid, row.proc, row.vm_fd), 0)}
        live[key] = new
        versions.append(new)
    ops = ops.assign(op=op_col, reason=reason_col)
    cols = ["pid", "proc", "vm_fd", "as_id", "slot", "gpa", "size_bytes", "hva", "flags",
            "flag_names", "ioctl_name", "gmem_fd", "start_ts", "end_ts", "created_by", "ended_by"]
    slots = pd.DataFrame(versions, columns=cols).astype(SLOT_INT_COLS)
    slots.insert(3, "vm_instance", np.array([v.get("vm_instance", 0) for v in versions],
                                            dtype=np.int64))
    # when it was read from the kernel, for a slot that existed before recording
    slots["snapshot_ts"] = pd.array([v.get("snapshot_ts") for v in versions], dtype="UInt64")
    slots["gfn_start"] = (slots["gpa"] // page).astype("int64")
    slots["gfn_end"] = ((slots["gpa"] + slots["size_bytes"]) // page).astype("int64")
    slots["version"] = slots.groupby(["pid", "proc", "vm_fd", "as_id", "slot"]).cumcount() \
        .astype("int64")
    return ops, slots.reset_index(drop=True)


# KVM's own memslots on x86 (APIC access page, identity map, TSS:
# arch/x86/include/asm/kvm_host.h, KVM_INTERNAL_MEM_SLOTS = 3 ids just below
# KVM_MEM_SLOTS_NUM = SHRT_MAX, 5.17 to 7.x) are set by KVM itself, not by a
# memslot ioctl: their kvm_arch_prepare_memory_region calls are not skipped ioctls.
X86_FIRST_INTERNAL_SLOT = 32767 - 3
# the ioctl field of a memslot change recovered from kvm_arch_prepare_memory_region
# (the probes write 1 or 2): decode_ops names it RECOVERED
RECOVERED_IOCTL = 0
RECOVERED = "recovered"


def recover_skipped(memslot: pd.DataFrame, prepare: pd.DataFrame, vm_ioctl: pd.DataFrame,
                    page: int, x86: bool) -> tuple[pd.DataFrame, int, int]:
    """The memslot ioctl table with the changes whose ioctl event is missing
    put back from kvm_arch_prepare_memory_region's kprobe event: (table,
    recovered, left out).

    The ioctl events come from the syscall tracepoints, which the kernel
    skips while the CPU's bpf_prog_active is held (measured on 7.3.4: 4 to 10
    skips in a run of KVM's selftests, 3 of them memslot creates). KVM calls
    kvm_arch_prepare_memory_region once for every memslot change that passes
    the generic checks, inside the ioctl, on the ioctl's thread; a call that
    falls in no recorded memslot ioctl of its thread (enter_ts..ts) is one
    whose ioctl event is missing. Its slot gives the change: gpa, size (0 for
    a delete, as the ioctl said), userspace address, flags, slot id and the
    arch's verdict. The VM is the one of the thread's nearest recorded memslot
    ioctl, or else the process's last KVM_CREATE_VM before it; with neither,
    the change is left out (counted). A change refused after the arch hook
    (rare: -ENOMEM) would read as accepted. Where kprobes do not load there
    is nothing to recover from."""
    cols = ["ts", "pid", "tid", "exit_ts", "change", "base_gfn", "npages", "hva", "flags",
            "slot_id", "as_id", "ret"]
    if prepare is None or not len(prepare) or not set(cols) <= set(prepare.columns):
        return memslot, 0, 0
    prep = prepare[cols]
    if x86:
        prep = prep[prep["slot_id"].astype("int64") < X86_FIRST_INTERNAL_SLOT]
    # inside a recorded memslot ioctl of the same thread? (a thread's syscalls
    # do not overlap: the last ioctl entered before the call must contain it)
    orphan = np.ones(len(prep), dtype=bool)
    ptid = prep["tid"].to_numpy(np.int64)
    pts = prep["ts"].to_numpy(np.uint64)
    for tid, idx in pd.Series(np.arange(len(ptid))).groupby(ptid):
        mine = memslot[memslot["tid"] == tid]
        if not len(mine):
            continue
        order = np.argsort(mine["enter_ts"].to_numpy(np.uint64), kind="stable")
        enter = mine["enter_ts"].to_numpy(np.uint64)[order]
        leave = mine["ts"].to_numpy(np.uint64)[order]
        i = np.searchsorted(enter, pts[idx.to_numpy()], side="right") - 1
        inside = (i >= 0) & (pts[idx.to_numpy()] <= leave[np.maximum(i, 0)])
        orphan[idx.to_numpy()] = ~inside
    lost = prep[orphan]
    if not len(lost):
        return memslot, 0, 0
    created = vm_creations(vm_ioctl.assign(proc=0)) if vm_ioctl is not None else None
    rows, left_out = [], 0
    for r in lost.itertuples(index=False):  # a handful per recording
        same = memslot[memslot["tid"] == r.tid]
        fd = None
        if len(same):
            near = np.abs(same["ts"].to_numpy(np.int64) - np.int64(r.ts))
            fd = int(same["vm_fd"].iloc[int(np.argmin(near))])
        elif created is not None:
            c = created[(created["pid"] == r.pid) & (created["ts"] <= int(r.ts))]
            fd = int(c["vm_fd"].iloc[-1]) if len(c) else None
        if fd is None:
            left_out += 1
            continue
        delete = int(r.change) == 1
        rows.append({"ts": int(r.exit_ts), "enter_ts": int(r.ts), "pid": int(r.pid),
                     "tid": int(r.tid), "vm_fd": fd, "ioctl": RECOVERED_IOCTL,
                     "slot": (int(r.as_id) << 16) | int(r.slot_id),
                     "flags": int(r.flags) & 0xFFFF, "gpa": int(r.base_gfn) * page,
                     "size": 0 if delete else int(r.npages) * page, "hva": int(r.hva),
                     "read_ok": 1, "ret": int(r.ret), "vma_status": 4})
    if not rows:
        return memslot, 0, left_out
    add = pd.DataFrame(rows)
    for c in memslot.columns:  # every other field zero, each in the table's dtype
        add[c] = add[c] if c in add else 0
    add = add[list(memslot.columns)].astype(memslot.dtypes.to_dict())
    out = pd.concat([memslot, add], ignore_index=True).sort_values("ts", kind="stable")
    return out.reset_index(drop=True), len(rows), left_out


def recovered_note(recovered: int, left_out: int) -> list[str]:
    """What the report says about memslot changes recover_skipped put back."""
    out = []
    if recovered:
        out.append(f"{recovered} memslot change{'s' if recovered != 1 else ''} had no ioctl "
                   "event (the kernel skipped or lost it) and "
                   f"{'were' if recovered != 1 else 'was'} recovered from "
                   "kvm_arch_prepare_memory_region's: ioctl shown as 'recovered'")
    if left_out:
        out.append(f"{left_out} memslot change{'s' if left_out != 1 else ''} seen only by "
                   "kvm_arch_prepare_memory_region could not be given a VM and "
                   f"{'are' if left_out != 1 else 'is'} left out of the memslot history")
    return out


def history(t: dict, meta: dict, page: int):
    """The memslot history of a recording's tables ``t``, as every consumer
    builds it (report, kvmtrace.load(), the selftests check): (ops, slots,
    vm_ioctl with ``proc``, notes). Memslot changes whose ioctl event is
    missing are recovered first (recover_skipped)."""
    from . import identity

    exits = t["proc_exit"]
    memslot, recovered, left_out = recover_skipped(
        t["memslot"], t.get("prepare_region"), t.get("vm_ioctl"), page,
        x86=str(meta.get("arch", "")) in ("x86_64", "i686", "i386"))
    ops = decode_ops(memslot)
    ops["proc"] = identity.generations(ops, exits)
    snap = t.get("memslot_snapshot")  # slots set before recording (format 4+)
    if snap is not None:
        snap = snap.assign(proc=identity.generations(snap, exits))
    vm_ioctl = t["vm_ioctl"].assign(proc=identity.generations(t["vm_ioctl"], exits))
    ops, slots = replay(ops, page, snap, vm_creations(vm_ioctl))
    return ops, slots, vm_ioctl, snap, recovered_note(recovered, left_out)


def vcpu_to_vm(vm_ioctl: pd.DataFrame) -> pd.DataFrame:
    """(pid, proc, vcpu_fd) -> vm_fd, from KVM_CREATE_VCPU results (``proc``:
    see identity.py)."""
    v = vm_ioctl[(vm_ioctl["cmd"] == kvmapi.KVM_CREATE_VCPU) & (vm_ioctl["ret"] >= 0)]
    return (v.rename(columns={"fd": "vm_fd"})
            .assign(vcpu_fd=v["ret"].astype("int32"))[["pid", "proc", "vcpu_fd", "vm_fd", "ts"]])
