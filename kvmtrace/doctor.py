"""What this host can trace, tried rather than guessed (`kvmtrace doctor`).

Every attach type is tested by loading and attaching a tiny program; the
probe set ``record`` would use is selected, compiled, loaded and attached for
real by the same function record uses (kvmtrace.probes.load.load_probes).
Each check gives ok / missing and, when it matters for recording, the fix.

Where it sits: doctor is a command over the layers, like record, not a fact
about the machine. It reads host facts (kvmtrace.host) and exercises the
probes (kvmtrace.probes), and since probes use host facts, doctor has to sit
above both: inside kvmtrace.host it made host and probes import each other.
It is not a collector either (it records nothing), so it is its own module,
imported by the cli alone.
"""

from __future__ import annotations

import os
import platform
import stat
from dataclasses import dataclass

from .host import bccload
from .host import headers as bcc_headers
from .host import arm64, kprobes, kvm, tracefs
from .probes.load import ProbeLoadError, load_probes


@dataclass
class Check:
    name: str
    ok: bool | None  # None: informational
    detail: str
    fix: str = ""
    blocks_record: bool = False


def _try_attach(cflags, kind: str, kallsyms: set) -> tuple[bool, str]:
    target = "kvm_arch_prepare_memory_region"
    try:
        if kind == "tracepoint":
            b = bccload.load("TRACEPOINT_PROBE(sched, sched_process_fork) { return 0; }", cflags)
            detail = "sched:sched_process_fork attached"
        elif kind == "raw_tp":
            b = bccload.load("RAW_TRACEPOINT_PROBE(sched_process_fork) { return 0; }", cflags)
            detail = "raw_tp sched_process_fork attached"
        elif kind == "kprobe":
            if not kprobes.available():
                return False, kprobes.UNAVAILABLE
            if target not in kallsyms:
                return False, f"{target} not in /proc/kallsyms"
            b = bccload.load("int kt_probe(void *ctx) { return 0; }", cflags,
                             after=lambda b: b.attach_kprobe(event=target, fn_name="kt_probe"))
            detail = f"kprobe on {target} attached"
        elif kind == "fentry":
            if not bccload.import_bcc().BPF.support_kfunc():
                return False, "bcc/kernel report no fentry (kfunc) support"
            b = bccload.load(f"KFUNC_PROBE({target}) {{ return 0; }}", cflags)
            detail = f"fentry on {target} attached"
        else:
            raise ValueError(kind)
        b.cleanup()
        return True, detail
    except bccload.BPFLoadError as e:
        msg = str(e)
        if kind == "fentry" and "not permitted" in msg and os.geteuid() == 0:
            msg = ("the kernel refuses fentry programs (EPERM as root"
                   + (f"; lockdown: {_lockdown()}" if _lockdown() else "") + ")")
        return False, msg


def _lockdown() -> str:
    try:
        with open("/sys/kernel/security/lockdown") as f:
            text = f.read()
    except OSError:
        return ""
    sel = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return sel[0] if sel else ""


# -- without root: the real cause ---------------------------------------------
#
# As an ordinary user tracefs (mode 0700) cannot even be looked into and
# mounting it is refused, so "not mounted" or "no kvm tracepoints" would be
# guesses; what is known is the missing privilege, and that is what is said.

_CAPS = {21: "CAP_SYS_ADMIN", 38: "CAP_PERFMON", 39: "CAP_BPF"}


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def privilege_problem() -> str:
    """'' when this process may load and attach BPF programs (root, or
    CAP_BPF with CAP_PERFMON, or CAP_SYS_ADMIN), else what is missing."""
    if os.geteuid() == 0:
        return ""
    caps = _effective_caps()
    if caps >> 21 & 1 or (caps >> 38 & 1 and caps >> 39 & 1):
        return ""
    have = [n for b, n in _CAPS.items() if caps >> b & 1]
    return (f"not root (uid {os.geteuid()}) and no CAP_BPF + CAP_PERFMON or CAP_SYS_ADMIN"
            + (f" (has {', '.join(have)})" if have else ""))


def _tracefs_mounts() -> list[str]:
    try:
        with open("/proc/self/mounts") as f:
            return [p[1] for p in (line.split() for line in f) if len(p) > 2 and p[2] == "tracefs"]
    except OSError:
        return []


def tracefs_state(mount: bool = True) -> tuple[str | None, str]:
    """(tracefs root, '') when its event formats can be read; else (None, why),
    naming the real cause: not readable by this user, or not mounted. Mounts it
    when ``mount`` and this process may (root)."""
    root = tracefs.find()
    if root:
        return root, ""
    for mp in _tracefs_mounts():
        try:
            st = os.stat(mp)
        except OSError as e:
            return None, f"tracefs is mounted at {mp} but uid {os.geteuid()} cannot reach " \
                         f"it ({e.strerror})"
        return None, (f"tracefs is mounted at {mp} but not readable by uid {os.geteuid()} "
                      f"(mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): "
                      "tracing needs root")
    if os.geteuid() != 0:
        return None, "tracefs is not mounted, and mounting it needs root"
    if not mount:
        return None, "tracefs is not mounted"
    try:
        return tracefs.ensure_mounted(), ""
    except tracefs.TracefsError as e:
        return None, str(e)


def probe_table() -> tuple[list[str], list[dict]]:
    """Every probe in the catalogue and whether it can attach here, without
    loading anything: the checks record makes before it builds its program
    (tracefs formats, kprobes, kallsyms, BTF offsets), plus the privilege.

    Returns (host problems, rows): what stops every probe here (this user's
    privileges, tracefs access), said once; per probe ``attach`` True, False,
    or None when this user cannot tell (tracefs unreadable), and ``why``."""
    from .host import btf as btf_mod
    from .probes import catalogue

    priv = privilege_problem()
    root, why_tracefs = tracefs_state(mount=False)
    host = [x for x in (priv, why_tracefs) if x]
    avail = catalogue.availability(catalogue.PROBES, root, btf_mod.open_kernel())
    out = []
    for p in catalogue.PROBES:
        why, attach = avail[p.name], None
        if why and root is None and p.needs and why.startswith("tracepoint "):
            why = "cannot tell: tracefs not readable here"
        elif why:
            attach = False
        elif priv:
            attach, why = False, "not root"
        else:
            attach = True
        out.append({"name": p.name, "group": p.group,
                    "type": "kprobe" if p.kfuncs else "tracepoint",
                    "attach": attach, "why": why or "",
                    "needs": list(p.needs) + list(p.kfuncs), "events": list(p.events),
                    "arch": list(p.arch), "doc": p.doc})
    return host, out


def run() -> list[Check]:
    checks: list[Check] = []
    add = checks.append
    machine = platform.machine()
    add(Check("arch / kernel", None, f"{machine}, Linux {platform.release()}"))
    priv = privilege_problem()
    root = os.geteuid() == 0
    add(Check("privileges", not priv, ("root" if root else f"uid {os.geteuid()} with CAP_BPF")
              if not priv else priv,
              "run as root: sudo kvmtrace doctor (BPF needs CAP_BPF + CAP_PERFMON, and "
              "tracefs is readable by root only)", blocks_record=bool(priv)))
    has_btf = os.path.exists("/sys/kernel/btf/vmlinux")
    add(Check("BTF", has_btf, "/sys/kernel/btf/vmlinux" if has_btf else "absent",
              "" if has_btf else "a kernel with CONFIG_DEBUG_INFO_BTF=y gives struct offsets "
              "(needed for kprobe-based probes)"))
    flav = kvm.flavour()
    add(Check("/dev/kvm", flav["dev_kvm"], "present" if flav["dev_kvm"] else "absent",
              "" if flav["dev_kvm"] else "load kvm (modprobe kvm_intel / kvm_amd) to trace VMs"))
    if machine == "aarch64":
        cpu = arm64.cpu_facts()
        cap = cpu["cap_cacheable_pfnmap"]
        yn = {True: "yes", False: "no", None: "unknown"}
        add(Check("arm64 CPU", None,
                  f"S2FWB {yn[cpu['fwb']]} (boot log), CTR_EL0.DIC {yn[cpu['dic']]}; "
                  f"KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED: VM fd {cap['vm']}, /dev/kvm "
                  f"{cap['dev_kvm']} -> cacheable VM_PFNMAP memslots "
                  + ("allowed" if cap["vm"] == 1 else
                     "refused on kernels with the 6.17 rules (needs S2FWB and DIC), mapped "
                     "Device on older ones")))
    add(Check("KVM flavour", None, f"{flav.get('vendor')}: {flav.get('mmu')} MMU, "
                                   f"{flav.get('spte_format')} sptes, tdp_mmu={flav.get('tdp_mmu')}"))
    troot, why = tracefs_state()
    unreadable = "not readable" in why or "cannot reach" in why
    if troot:
        add(Check("tracefs", True, troot))
    else:
        add(Check("tracefs", False, why,
                  "run as root" if unreadable or not root else
                  "mount -t tracefs tracefs /sys/kernel/tracing", blocks_record=True))
    kvm_loaded = any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm", "kvm_intel", "kvm_amd",
                                                                  "kvm_pvm"))
    for cat in ("kvm", "kvmmmu") if machine == "x86_64" else ("kvm",):
        if troot is None:
            add(Check(f"{cat} tracepoints", None, "not checked: tracefs cannot be read"))
            continue
        evs = tracefs.category_events(cat, troot)
        add(Check(f"{cat} tracepoints", bool(evs), f"{len(evs)} present" if evs else "none",
                  "" if evs else "load the kvm module (modprobe kvm_intel / kvm_amd)"
                  if not kvm_loaded else "a kernel built with KVM tracepoints"))

    try:
        bcc = bccload.import_bcc()
        add(Check("bcc", True, f"importable ({os.path.dirname(bcc.__file__)})"))
    except bccload.BPFLoadError as e:
        bcc = None
        add(Check("bcc", False, "python module 'bcc' not importable", str(e),
                  blocks_record=True))
    hdr = bcc_headers.find()
    if hdr:
        add(Check("kernel headers for bcc", True,
                  f"{hdr.source}" + ("" if hdr.matches_kernel else
                                     f" (not the running kernel's: {hdr.version}; used for "
                                     "BPF helpers only, struct offsets never come from them)")))
    else:
        add(Check("kernel headers for bcc", False, "none found", bcc_headers.missing_hint(),
                  blocks_record=True))
    if bcc and hdr and root:
        cflags = bcc_headers.apply(hdr)
        syms = kprobes.kallsyms()
        for kind in ("tracepoint", "raw_tp", "kprobe", "fentry"):
            ok, detail = _try_attach(cflags, kind, syms)
            if kind == "kprobe" and not ok:
                detail += ("; without it, kvm_arch_prepare_memory_region and the fault "
                           "handler's entry/return are not traced (tracepoints cover the rest)")
            add(Check(f"attach {kind}", ok, detail,
                      blocks_record=(kind == "tracepoint" and not ok)))
        checks += probe_set_checks()
        from .collectors import snapshot  # kvmtrace query's live sources

        for what, (ok, detail) in snapshot.sources().items():
            if what == "memslots" and not ok:
                detail += ("; record --pid of a VM that is already running then knows its "
                           "slots only from memslot ioctls made while recording")
            add(Check(f"query, record --pid: {what} of a running VM", ok, detail))
    return checks


def probe_set_checks() -> list[Check]:
    """Every probe and whether it can attach here, then record's program
    loaded for real (load_probes, as record does, with the pid filter in)."""
    try:
        loaded = load_probes("all", filter_pids=True)
        sel, err = loaded.selection, None
    except ProbeLoadError as e:
        loaded, sel, err = None, e.selection, e
    out = []
    for p in sel.requested if sel else ():
        why = sel.availability[p.name]
        out.append(Check(f"probe {p.name}", why is None, p.group + (f": {why}" if why else "")))
    if loaded is None:
        out.append(Check("record's program", False, str(err),
                         "report this with `kvmtrace doctor --format json`"
                         if err.stage == "bpf" else "",
                         blocks_record=True))
        return out
    loaded.cleanup()
    prog = loaded.program
    out.append(Check("record's program", True,
                     f"{len(loaded.attached)} probes, {len(prog.events)} event kinds: "
                     "compiled, loaded and attached"))
    if prog.enter_ioctl:
        vl = prog.vma_lookup
        out.append(Check(
            "VMA lookup in BPF", bool(vl.get("available")),
            f"bpf_find_vma at each memslot ioctl's entry: loaded ({vl.get('load_ms')} ms to "
            "link and load); a slot's VMA is captured even if the VMM exits at once"
            if vl.get("available") else vl.get("reason", "not loaded"),
            "" if vl.get("available") else
            "slots' VMAs then come from /proc/PID/smaps snapshots taken after the ioctl "
            "(missing when the VMM exits or remaps first; no page protection)"))
    return out
