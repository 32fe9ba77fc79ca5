"""Select, build and load the probe program: the one path `record` and `doctor` share.

``load_probes`` parses a probe selection, finds out which of the probes this
host can attach (tracefs formats, kprobes, BTF struct offsets), builds the
program for the usable ones (program.py) and compiles, loads and attaches it
through bcc (kvmtrace.host.bccload). It returns the loaded program with the
per-probe answer: what attached, and for everything else why not. Record
(kvmtrace.collectors.session) then reads the rings; doctor (kvmtrace.doctor)
reports the answer and unloads.

A failure at any step is a ProbeLoadError naming the step (``stage``) and,
once probes were selected, carrying the per-probe answer so far, so doctor
can still list every probe when the program does not load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from ..host import bccload, bpfcache, btf as btf_mod
from ..host import headers as bcc_headers
from ..host import tracefs
from . import catalogue, program
from .catalogue import Probe


@dataclass
class Selection:
    """The probes asked for and what this host makes of each."""
    requested: list[Probe]
    availability: dict[str, str | None]  # probe name -> None: can attach, else why not
    tracefs: str | None                  # the tracefs root (None: not mounted)
    btf: btf_mod.BTF | None              # the kernel's BTF (struct offsets), where it has one

    @property
    def usable(self) -> list[Probe]:
        return [p for p in self.requested if self.availability[p.name] is None]

    @property
    def unavailable(self) -> dict[str, str]:
        return {k: v for k, v in self.availability.items() if v}


@dataclass
class LoadedProbes:
    """A loaded, attached program and how it came to be."""
    bpf: object                  # bcc.BPF: tracepoints and kprobes attached
    program: program.Program     # its events, cflags and VMA lookup status
    selection: Selection
    headers: bcc_headers.Headers  # the kernel headers bcc compiled it with

    @property
    def attached(self) -> list[str]:
        """Names of the probes attached (every usable one: else loading fails)."""
        return [p.name for p in self.selection.usable]

    @property
    def unavailable(self) -> dict[str, str]:
        """Probe name -> why it was left out."""
        return self.selection.unavailable

    @property
    def cache(self) -> dict:
        """What the compile cache did (bccload.load): status, reason, ms."""
        return getattr(self.bpf, "kvmtrace_cache", {"status": "off"})

    def cleanup(self):
        self.bpf.cleanup()


class ProbeLoadError(RuntimeError):
    """Why no program was loaded; one line for the user.

    ``stage``: ``selection`` (an unknown probe name: a usage error),
    ``tracefs`` (not mounted and not mountable), ``unusable`` (none of the
    chosen memslot / fault probes can attach here), ``headers`` (no kernel
    headers for bcc), ``bpf`` (compile, load or attach refused).
    ``selection``: the per-probe answer when probes were selected, else None.
    """

    def __init__(self, stage: str, msg: str, selection: Selection | None = None):
        super().__init__(msg)
        self.stage = stage
        self.selection = selection


def select(probes: str | Sequence[Probe] = "all") -> Selection:
    """Parse ``probes`` (a --probes string, or Probe objects) and find out
    which of them this host can attach. Mounts tracefs if needed."""
    try:
        wanted = (catalogue.parse_selection(probes) if isinstance(probes, str)
                  else list(probes))
    except catalogue.SelectionError as e:
        raise ProbeLoadError("selection", str(e)) from None
    try:
        root, tracefs_error = tracefs.ensure_mounted(), None
    except tracefs.TracefsError as e:
        root, tracefs_error = None, str(e)
    b = btf_mod.open_kernel()
    sel = Selection(wanted, catalogue.availability(wanted, root, b), root, b)
    if tracefs_error:
        raise ProbeLoadError("tracefs", tracefs_error, sel)
    return sel


CACHE_ENV = bpfcache.USE_ENV  # =0: never use the compile cache (record --no-cache)


def load_probes(probes: str | Sequence[Probe] = "all", *, filter_pids: bool,
                buffer_pages: int | dict | None = None,
                cache: bool | None = None) -> LoadedProbes:
    """Select ``probes``, build the program for the usable ones and load it
    with every one of them attached.

    ``filter_pids``: the program only traces pids in its ``kvmtrace_pids``
    map (record's --pid and launched command); ``buffer_pages`` resizes the
    high-rate rings, or the kinds a dict names (codegen.ring_pages); ``cache``:
    load from / store in the compile cache (host/bpfcache.py; default: unless
    $KVMTRACE_BPF_CACHE is 0). Raises ProbeLoadError."""
    sel = select(probes)
    usable = sel.usable
    if not any(p.group in ("memslots", "faults") for p in usable):
        raise ProbeLoadError("unusable", "none of the chosen probes can attach here: "
                             + "; ".join(f"{k}: {v}" for k, v in sel.unavailable.items()),
                             sel)
    hdr = bcc_headers.find()
    if hdr is None:
        raise ProbeLoadError("headers", bcc_headers.missing_hint(), sel)
    cflags = bcc_headers.apply(hdr)
    prog = program.build(usable, filter_pids,
                         catalogue.offsets(usable, sel.btf) if sel.btf else {},
                         buffer_pages=buffer_pages)
    if cache is None:
        cache = os.environ.get(CACHE_ENV) != "0"
    try:
        b = bccload.load(prog.text, cflags + prog.cflags, after=prog.attach_all, cache=cache)
    except bccload.BPFLoadError as e:
        raise ProbeLoadError("bpf", str(e), sel) from None
    return LoadedProbes(b, prog, sel, hdr)
