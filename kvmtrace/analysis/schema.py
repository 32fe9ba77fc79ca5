"""Every derived table, declared once: its columns, their dtypes, units and
meaning (as probes/events.py declares the raw events).

The analysis builds its DataFrames freely, then hands each to
``TABLE.conform(df)``, which orders the columns as declared, fills the
optional ones that this recording cannot have (an arm64-only column on x86),
casts to the declared dtype and refuses what would lose information: a float
column where an integer is declared (an spte with bit 63 set is not a
float64), an undeclared column (a new column must be declared first). JSON
and CSV output (``records``), the library's DataFrames and docs/tables.md
(``python -m kvmtrace.analysis.schema``) all come from these declarations.

Dtypes: ``int64`` / ``uint64`` never missing; ``Int64`` / ``UInt64``
nullable integers (pandas' masked arrays: null stays null, 2**63 stays
exact); ``str`` text ("" means empty, null means not known); ``category``
text with few distinct values per table (memory types, verdicts, access
kinds: a pandas Categorical, one small code per row; the same text as ``str``
in every output); ``bool``;
``float64`` only for true fractions (shares, seconds relative to the start,
percentiles in microseconds); ``object`` for nested values (dicts) in the
diff's tables.

To add a derived column: compute it where the table is built, then add one
``C(...)`` line below; the tests (tests/test_schema.py) fail until both exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = 3  # of the JSON / CSV tables: bump when a column changes meaning or goes
# v2: units in column names (size_bytes, start_ts, p50_us...); flag_names "" for none; diff_findings
# v3: the whole JSON report leaves out the per-fault rows (--table faults streams them);
#     the faults table's text columns with few values are pandas categoricals

_INT = {"int64", "uint64", "Int64", "UInt64"}


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    unit: str
    doc: str
    optional: bool = False  # may be absent (filled with nulls): arch- or probe-specific


def C(name: str, dtype: str, unit: str, doc: str, optional: bool = False) -> Column:
    return Column(name, dtype, unit, doc, optional)


class SchemaError(TypeError):
    """A derived table does not match its declaration: a bug in the analysis."""


@dataclass(frozen=True)
class Table:
    name: str
    doc: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def dtypes(self) -> dict[str, str]:
        return {c.name: c.dtype for c in self.columns}

    def empty(self) -> pd.DataFrame:
        return pd.DataFrame({c.name: pd.Series(dtype=c.dtype) for c in self.columns})

    def conform(self, df: pd.DataFrame, drop: tuple[str, ...] = ()) -> pd.DataFrame:
        """``df`` with exactly the declared columns, in order, in their dtypes.
        ``drop`` names the working columns the builder knows it leaves behind."""
        extra = [c for c in df.columns if c not in self.dtypes and c not in drop]
        if extra:
            raise SchemaError(f"table {self.name}: undeclared columns {extra}")
        out = {}
        for c in self.columns:
            if c.name not in df:
                if not c.optional:
                    raise SchemaError(f"table {self.name}: column {c.name} missing")
                out[c.name] = pd.Series(_nulls(c.dtype, len(df)), index=df.index)
                continue
            out[c.name] = _cast(df[c.name], c, self.name)
        # the columns as they are (copy-on-write: nothing of df is shared for writing)
        return pd.DataFrame(out, index=df.index, copy=False).reset_index(drop=True)


def _nulls(dtype: str, n: int):
    """A column of ``n`` nulls of ``dtype``, made whole (not value by value)."""
    if dtype in ("Int64", "UInt64"):
        return pd.arrays.IntegerArray(np.zeros(n, np.int64 if dtype == "Int64" else np.uint64),
                                      np.ones(n, bool))
    if dtype == "str":
        return pd.array(pa.chunked_array([pa.nulls(n, pa.large_string())]), dtype="str")
    if dtype == "object":  # as pandas makes it (NaN)
        return pd.Series(None, index=pd.RangeIndex(n), dtype=object).array
    return pd.Series(pd.NA if dtype in _INT else np.nan, index=pd.RangeIndex(n),
                     dtype=dtype).array


def _cast(s: pd.Series, c: Column, table: str) -> pd.Series:
    if str(s.dtype) == c.dtype:
        return s
    if c.dtype in _INT:
        if s.dtype.kind == "f":
            raise SchemaError(f"table {table}: column {c.name} is {s.dtype}, declared "
                              f"{c.dtype}: an integer must not pass through float")
        if s.dtype == object:
            s = s.where(pd.notna(s), None)
        try:
            return s.astype(c.dtype)
        except (TypeError, ValueError, OverflowError) as e:
            raise SchemaError(f"table {table}: column {c.name} ({s.dtype}) does not fit "
                              f"{c.dtype}: {e}") from None
    if c.dtype == "str":
        return s.astype("str").where(pd.notna(s), None) if s.dtype == object else s.astype("str")
    if c.dtype == "category":
        return pd.Series(categorical(s.to_numpy()), index=s.index)
    return s.astype(c.dtype)


def categorical(values, codes=None) -> pd.Categorical:
    """Text as a Categorical of the distinct values used, sorted (so ordering
    by the column orders by its text): ``values`` per row, or with ``codes``
    the distinct values and each row's index into them (-1: null), as the
    analysis builds a column per slot or per distinct value and takes by index."""
    if codes is None:
        codes, values = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=True)
    codes = np.asarray(codes, dtype=np.int64)
    vals = np.asarray(values, dtype=object)
    used = np.bincount(codes[codes >= 0], minlength=len(vals)) > 0 if len(vals) else \
        np.zeros(0, bool)
    cats = sorted({str(v) for v, u in zip(vals, used) if u and pd.notna(v)})
    pos = {v: i for i, v in enumerate(cats)}
    remap = np.array([pos[str(v)] if u and pd.notna(v) else -1 for v, u in zip(vals, used)]
                     + [-1], dtype=np.int64)
    return pd.Categorical.from_codes(remap[codes], dtype=pd.CategoricalDtype(
        pd.Index(cats, dtype="str"), ordered=False))


def records(df: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts: integers as Python ints (exact to 2**64),
    null for missing, floats as floats, nested values as they are."""
    plain = [c for c in df.columns if df[c].dtype != object]
    nested = [c for c in df.columns if df[c].dtype == object]
    rows = pa.Table.from_pandas(df[plain], preserve_index=False).to_pylist() if plain \
        else [{} for _ in range(len(df))]
    for c in nested:
        for row, v in zip(rows, df[c].tolist()):
            row[c] = _plain(v)
    for row in rows:
        for k, v in row.items():
            if isinstance(v, float) and not np.isfinite(v):
                row[k] = None
    return [{c: r[c] for c in df.columns} for r in rows]


def _plain(v):
    """A nested value (dict, array, numpy scalar) as plain JSON types."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v) if np.isfinite(v) else None
    if v is pd.NA or v is pd.NaT or (isinstance(v, float) and not np.isfinite(v)):
        return None
    return v


def json_schema(t: Table) -> dict:
    """The table as a JSON Schema fragment (an array of row objects)."""
    kinds = {"int64": "integer", "uint64": "integer", "Int64": ["integer", "null"],
             "UInt64": ["integer", "null"], "str": ["string", "null"], "bool": "boolean",
             "boolean": ["boolean", "null"], "float64": ["number", "null"], "object": {},
             "category": ["string", "null"]}
    props = {}
    for c in t.columns:
        k = kinds[c.dtype]
        p = dict(k) if isinstance(k, dict) else {"type": k}
        p["description"] = c.doc + (f" [{c.unit}]" if c.unit else "")
        props[c.name] = p
    return {"type": "array", "description": t.doc,
            "items": {"type": "object", "properties": props, "required": t.names}}


# -- the naming rule: a column says its unit -------------------------------
#
# A quantity carries its unit as a suffix (_ns _us _ms _s _bytes _kb _pct
# _per_s); a CLOCK_MONOTONIC time is ``ts`` or ``*_ts`` (ns). A position
# needs no suffix, its name says what it is: an address in bytes (gpa, hva,
# ipa, phys, vma_start, ...) or a guest / host frame number in pages (gfn,
# pfn, vm_pgoff; ``pages`` counts them). diff's ``_base`` / ``_new`` come after.

UNIT_SUFFIX = {"ns": "_ns", "us": "_us", "ms": "_ms", "s": "_s", "bytes": "_bytes",
               "KiB": "_kb", "%": "_pct", "1/s": "_per_s"}
ADDRESSES = {"gpa", "gpa_end", "hva", "hva_start", "hva_end", "ipa", "install_ipa", "phys",
             "vma_start", "vma_end"}
_FRAMES = ("gfn", "pfn", "pgoff", "pages")


def unit_in_name(c: Column) -> bool:
    """Whether ``c``'s name says its unit (the rule above); a unit the rule
    does not know is never said."""
    name = c.name.removesuffix("_base").removesuffix("_new") \
        if c.name.endswith(("_base", "_new")) else c.name
    if not c.unit:
        return True
    if c.unit == "ns" and (name == "ts" or name.endswith("_ts")):
        return True
    if c.unit == "bytes" and name in ADDRESSES:
        return True
    if c.unit == "pages" and any(w in name.split("_") or name.startswith(w) for w in _FRAMES):
        return True
    return c.unit in UNIT_SUFFIX and name.endswith(UNIT_SUFFIX[c.unit])


# -- identity columns every per-VM table shares ---------------------------

PID = C("pid", "int64", "", "VMM process id")
PROC = C("proc", "int64", "", "which process with this pid in the recording (0 first; "
         "pids are reused: see analysis/identity.py)")
VM_FD = C("vm_fd", "int64", "", "the VM's file descriptor in the VMM (-1 when unknown)")
AS_ID = C("as_id", "int64", "", "KVM address space (1 = x86 SMM)")
TS = C("ts", "int64", "ns", "CLOCK_MONOTONIC time of the event")
TID = C("tid", "int64", "", "thread id (the vCPU thread for faults)")
VCPU_FD = C("vcpu_fd", "int64", "", "vCPU fd of the thread's last KVM_RUN (-1 when none)")
SLOT_ROW = C("slot_row", "int64", "", "row of the slots table (slot version) the event "
             "falls in; -1 outside every recorded slot")

OPS = Table("ops", "every memslot ioctl, decoded and classified by KVM's rules "
            "(analysis/memslots.py)", (
    TS, PID, TID, VCPU_FD, C("cpu", "int64", "", "CPU"), VM_FD,
    C("ioctl", "int64", "", "1: KVM_SET_USER_MEMORY_REGION, 2: ..._REGION2"),
    C("slot", "int64", "", "the raw slot field: as_id << 16 | slot id"),
    C("flags", "int64", "", "KVM_MEM_* flags"),
    C("gpa", "uint64", "bytes", "guest_phys_addr"),
    C("size_bytes", "uint64", "bytes", "memory_size (0 deletes)"),
    C("hva", "uint64", "bytes", "userspace_addr"),
    C("gmem_offset_bytes", "uint64", "bytes", "guest_memfd_offset (REGION2)"),
    C("gmem_fd", "int64", "", "guest_memfd (REGION2)"),
    C("read_ok", "int64", "", "1 when the probe could read the request"),
    C("ret", "int64", "", "the ioctl's return value"),
    C("enter_ts", "int64", "ns", "when the ioctl was entered"),
    C("vma_status", "int64", "", "VMA lookup at the ioctl (probes/events.py VMA_STATUS)"),
    C("vma_has_file", "int64", "", "the VMA has a file"),
    C("vma_covers", "int64", "", "one VMA covers the whole slot"),
    C("vma_count", "int64", "", "VMAs the slot spans (capped)"),
    C("vma_err", "int64", "", "errno of a failed VMA lookup"),
    C("vma_dev", "int64", "", "kernel dev_t of the VMA's file"),
    C("vma_start", "uint64", "bytes", "VMA start"), C("vma_end", "uint64", "bytes", "VMA end"),
    C("vm_flags", "uint64", "", "VMA vm_flags"),
    C("vm_page_prot", "uint64", "", "VMA vm_page_prot"),
    C("vm_pgoff", "uint64", "pages", "VMA vm_pgoff"),
    C("vma_ino", "uint64", "", "inode of the VMA's file"),
    C("vma_name", "str", "", "the VMA's name as the kernel stored it at the ioctl "
      "(its file's dentry's, or a special mapping's such as [vvar]; '' for none and "
      "before recording format 6)"),
    C("vma_fs_magic", "int64", "", "s_magic of the VMA file's file system"),
    AS_ID, C("slot_id", "int64", "", "slot id within the address space"),
    C("ioctl_name", "str", "", "the ioctl's name; 'recovered' for a change whose ioctl "
      "event the kernel skipped or lost, put back from kvm_arch_prepare_memory_region's "
      "(memslots.recover_skipped)"),
    C("errno", "str", "", "errno name of a failure, '' on success"),
    C("flag_names", "str", "", "flags by name, '|'-separated ('' for none)"),
    C("latency_ns", "int64", "ns", "time in the ioctl"),
    PROC,
    C("op", "str", "", "create / delete / move / flags / no-op, 'failed <op>' on failure"),
    C("reason", "str", "", "why KVM refused it, '' on success"),
))

VM_INSTANCE = C("vm_instance", "int64", "", "which VM on this fd number: 0 the first seen, 1 the "
      "next one KVM_CREATE_VM returned the same fd number for (after the first was closed), ...")

SLOTS = Table("slots", "slot versions over time: one row per create, move or flags change, "
              "with the VMA behind it (analysis/memslots.py, analysis/vmas.py)", (
    PID, PROC, VM_FD, VM_INSTANCE, AS_ID, C("slot", "int64", "", "slot id"),
    C("gpa", "uint64", "bytes", "guest physical start"),
    C("size_bytes", "uint64", "bytes", "size"),
    C("hva", "uint64", "bytes", "host virtual start"),
    C("flags", "int64", "", "KVM_MEM_* flags"),
    C("flag_names", "str", "", "flags by name, '|'-separated ('' for none)"),
    C("ioctl_name", "str", "", "the ioctl that set this version ('recovered': see ops)"),
    C("gmem_fd", "int64", "", "guest_memfd (-1 without)"),
    C("start_ts", "uint64", "ns", "when this version began"),
    C("end_ts", "uint64", "ns", "when it ended (2**64-1: still live at the end)"),
    C("created_by", "str", "", "create / move / flags, or 'before recording' (set before "
      "recording began: read from the kernel at the start)"),
    C("ended_by", "str", "", "delete / move / flags, 'VM replaced' (the process created a "
      "new VM on the same fd: the old one was closed before), '' while live"),
    C("snapshot_ts", "UInt64", "ns", "when a slot set before recording was read from the "
      "kernel (null: set while recording)"),
    C("gfn_start", "int64", "pages", "first guest frame"),
    C("gfn_end", "int64", "pages", "guest frame after the last"),
    C("version", "int64", "", "0 for the slot's first version, +1 per move / flags change"),
    C("vma", "str", "", "the VMA's name ([anon], memfd:x, a path)"),
    C("vmflags", "str", "", "smaps VmFlags mnemonics"),
    C("pfnmap", "bool", "", "VM_PFNMAP or VM_MIXEDMAP"),
    C("vma_count", "int64", "", "VMAs seen behind the slot"),
    C("kernelpagesize_kb", "Int64", "KiB", "smaps KernelPageSize"),
    C("anonhuge_kb", "int64", "KiB", "smaps AnonHugePages"),
    C("snapshot_delay_ms", "float64", "ms", "smaps snapshot delay after the ioctl"),
    C("vma_covers", "bool", "", "one VMA covers the slot"),
    C("vma_source", "str", "", "where the VMA came from, or why it is missing"),
    C("vma_start", "UInt64", "bytes", "VMA start"), C("vma_end", "UInt64", "bytes", "VMA end"),
    C("vm_flags", "UInt64", "", "vm_flags"), C("vm_page_prot", "UInt64", "", "vm_page_prot"),
    C("vm_pgoff", "UInt64", "pages", "vm_pgoff"),
    C("vma_has_file", "boolean", "", "the VMA has a file"),
    C("vma_ino", "UInt64", "", "inode"), C("vma_dev", "str", "", "device (major:minor)"),
    C("pgprot_memtype", "str", "", "memory type decoded from vm_page_prot"),
    C("pgprot_memtype_source", "str", "", "how it was decoded"),
    C("kvm_vma_memtype", "str", "", "arm64: the VMA memory type KVM looked up", True),
    C("kvm_vm_flags", "UInt64", "", "arm64: vm_flags KVM looked up", True),
    C("kvm_pgprot", "UInt64", "", "arm64: vm_page_prot KVM looked up", True),
    C("vma_memtype_arm64", "str", "", "arm64: the VMA's memory type used by verdicts", True),
    *(QEMU := (
        C("qemu_region", "str", "", "QEMU's memory region at the slot's place (pc.ram, "
          "pc.bios, a backend's id ...), from QEMU's flat view asked through QMP while the "
          "slot version was live (record --qmp; analysis/qemu.py); null: no answer of QEMU "
          "names it", True),
        C("qemu_kind", "str", "", "the region's kind in that flat view: ram / rom / romd / "
          "ramd (null with qemu_region)", True))),
))

FAULTS = Table("faults", "one row per guest fault, paired from tracepoints (or kprobes), "
               "attributed to a slot, with both memory types and a verdict "
               "(analysis/faults.py on x86, analysis/stage2.py on arm64)", (
    TS, PID, TID, VCPU_FD, C("cpu", "int64", "", "CPU"),
    C("fault_id", "int64", "", "order of the fault in the recording"),
    C("gfn", "uint64", "pages", "guest frame number"),
    C("pfn", "UInt64", "pages", "host frame number (null: nothing installed)"),
    C("level", "int64", "", "mapping level: 1 = 4K, 2 = 2M, 3 = 1G"),
    C("start_ts", "Int64", "ns", "start of the fault (null: start event not seen)"),
    C("error_code", "UInt64", "", "x86 page-fault error code / EPT qualification; "
      "arm64 ESR_EL2"),
    C("install_ts", "Int64", "ns", "when KVM installed the entry (null: none seen)"),
    C("spte", "UInt64", "", "x86: the installed spte; arm64: the stage-2 prot"),
    C("access", "category", "", "read / write / exec"),
    C("start_kind", "category", "", "which event started the fault"),
    C("service_ns", "Int64", "ns", "fault service time (start to install, or handler "
      "entry to return)"),
    C("install_gfn", "UInt64", "pages", "x86: gfn of the install", True),
    C("install_level", "Int64", "", "x86: level of the install", True),
    C("handler_exit_ts", "Int64", "ns", "fault handler return (kprobes)", True),
    C("handler_ret", "Int64", "", "fault handler return value (kprobes)", True),
    C("tp_ts", "Int64", "ns", "arm64: kvm_guest_fault time", True),
    C("ipa", "UInt64", "bytes", "arm64: faulting IPA", True),
    C("esr", "UInt64", "", "arm64: ESR_EL2", True),
    C("install_ipa", "UInt64", "bytes", "arm64: IPA of the stage-2 map", True),
    C("map_size_bytes", "UInt64", "bytes", "arm64: size of the stage-2 map", True),
    C("phys", "UInt64", "bytes", "arm64: host physical address mapped", True),
    C("install_kind", "str", "", "arm64: map / relax", True),
    C("install_ret", "Int64", "", "arm64: kvm_pgtable_stage2_map's return", True),
    C("installs", "Int64", "", "arm64: stage-2 updates within the fault", True),
    PROC, VM_FD, SLOT_ROW,
    C("slot", "Int64", "", "slot id (null outside every slot)"),
    C("spte_memtype", "category", "", "memory type KVM installed ('' when nothing)"),
    C("vma_memtype", "category", "", "memory type of the host VMA"),
    C("vma_memtype_source", "category", "", "how the VMA memory type was found"),
    C("expected_memtype", "category", "", "arm64: what the kernel's rule gives"),
    C("rule", "category", "", "the kernel rule behind the installed entry's memory type "
      "(arm64: stage-2 attributes, memtype/arm64.py; x86: NPT / EPT / shadow, memtype/x86.py)"),
    C("verdict", "category", "", "consistent / downgraded / upgraded / rejected / unknown; '' "
      "when nothing was installed"),
    C("mapping_size_bytes", "UInt64", "bytes", "bytes one entry at this level maps (4K / 2M "
      "/ 1G on x86; null: no known level)"),
))

PREFETCH = Table("prefetch", "installs that answer no fault (x86 prefetch of neighbours; "
                 "arm64 stage-2 updates outside a fault)", (
    C("ts", "int64", "ns", "time"), PID, TID, VCPU_FD,
    C("gfn", "uint64", "pages", "guest frame"),
    C("spte", "UInt64", "", "x86: the spte", True),
    C("level", "Int64", "", "x86: level", True),
    C("ipa", "UInt64", "bytes", "arm64: IPA", True),
    C("size_bytes", "UInt64", "bytes", "arm64: size of the stage-2 map", True),
    C("phys", "UInt64", "bytes", "arm64: physical address", True),
    C("kind", "str", "", "arm64: map / relax", True),
    PROC, VM_FD, SLOT_ROW,
    C("request_lost", "bool", "", "its request may have been lost (ring full)"),
))

INVALIDATIONS = Table("invalidations", "MMU-notifier invalidations of host ranges "
                      "(kvm_unmap_hva_range)", (
    TS, PID, TID, C("hva_start", "uint64", "bytes", "first host virtual address"),
    C("hva_end", "uint64", "bytes", "host virtual address after the last"), PROC, VM_FD,
    SLOT_ROW,
))

EXITS = Table("exits", "MMIO exits to the VMM (kvm_mmio)", (
    TS, PID, TID, VCPU_FD, C("type", "int64", "", "KVM_TRACE_MMIO_* type"),
    C("len_bytes", "int64", "bytes", "access size"), C("gpa", "uint64", "bytes", "guest address"),
    C("val", "uint64", "", "value"), C("gfn", "uint64", "pages", "guest frame"),
    PROC, VM_FD, SLOT_ROW,
))

ERRORS = Table("errors", "failed memslot ioctls, faults KVM refused and failed KVM_RUNs "
               "(not EINTR: a signal kicked the vCPU out, as VMMs do)", (
    C("ts", "uint64", "ns", "CLOCK_MONOTONIC time of the event"), PID, PROC, VM_FD, C("what", "str", "", "what failed"),
    C("slot", "Int64", "", "slot id (null when not about one slot)"),
    C("errno", "str", "", "errno name"), C("detail", "str", "", "why"),
))

VERDICTS = Table("verdicts", "per slot version (and per refused memslot ioctl): does the "
                 "memory type KVM installed match the host VMA's?", (
    PID, PROC, VM_FD, AS_ID, C("slot", "int64", "", "slot id"),
    C("version", "int64", "", "slot version; -1 for a refused ioctl"),
    C("gpa", "uint64", "bytes", "guest physical start"),
    C("size_bytes", "uint64", "bytes", "size"),
    C("faults", "int64", "", "faults seen in the slot"),
    C("lost", "int64", "", "events lost in the slot's guest range"),
    C("verdict", "str", "", "consistent / downgraded / upgraded / rejected / unknown"),
    C("vma_memtype", "str", "", "host VMA memory type(s)"),
    C("spte_memtype", "str", "", "installed memory type(s)"),
    C("reason", "str", "", "why, with the kernel rule"),
))

RANGES = Table("ranges", "runs of consecutive guest pages of one slot with the same level "
               "and memory types", (
    SLOT_ROW, C("slot", "int64", "", "slot id"),
    C("gfn_first", "uint64", "pages", "first guest frame"),
    C("gfn_last", "uint64", "pages", "last guest frame"),
    C("pages", "int64", "pages", "frames in the run"),
    C("mapping_size_bytes", "UInt64", "bytes", "bytes one entry at the run's level maps "
      "(null: no known level)"),
    C("vma_memtype", "str", "", "VMA type"),
    C("spte_memtype", "str", "", "installed type"), C("verdict", "str", "", "verdict"),
))

LOST = Table("lost", "events per kind: recorded and lost (ring buffer full)", (
    C("kind", "str", "", "event kind (probes/events.py)"),
    C("events", "int64", "", "events recorded"), C("lost", "int64", "", "events lost"),
    C("lost_pct", "float64", "%", "lost / (recorded + lost)"),
))

LOST_WHERE = Table("lost_where", "lost events per process, kind and 2 MiB guest region "
                   "(analysis/loss.py)", (
    C("kind", "str", "", "event kind"), PID,
    C("gfn_start", "Int64", "pages", "region start (null: no guest address)"),
    C("count", "int64", "", "events lost"),
    C("first_ts", "int64", "ns", "first loss"), C("last_ts", "int64", "ns", "last loss"),
    C("gfn_end", "Int64", "pages", "region end"), PROC,
))

# -- the views report prints (analysis/summary.py) ------------------------

SUMMARY = Table("summary", "the memslot table joined with its activity and verdict: what "
                "`kvmtrace report` leads with and --format csv prints", (
    PID, PROC, VM_FD, AS_ID, C("slot", "int64", "", "slot id"),
    C("version", "int64", "", "slot version"),
    C("gpa", "uint64", "bytes", "guest physical start"),
    C("gpa_end", "uint64", "bytes", "guest physical end"),
    C("size_bytes", "uint64", "bytes", "size"),
    C("flag_names", "str", "", "KVM_MEM_* flags, '|'-separated ('' for none)"),
    C("hva", "uint64", "bytes", "host virtual start"),
    C("ioctl_name", "str", "", "the ioctl that set it"),
    C("vma", "str", "", "VMA name"), C("vm_flags", "str", "", "VM_* flags in words"),
    C("vmflags", "str", "", "smaps VmFlags mnemonics"),
    C("created_by", "str", "", "create / move / flags, or 'before recording'"),
    C("t_start_s", "float64", "s", "start, from the recording's start (null: set before "
      "recording)"),
    C("ended_by", "str", "", "delete / move / flags"),
    C("t_end_s", "float64", "s", "end, from the recording's start (null: live)"),
    C("faults", "int64", "", "faults"), C("read", "int64", "", "read faults"),
    C("write", "int64", "", "write faults"), C("exec", "int64", "", "exec faults"),
    C("level1", "int64", "", "faults mapped at level 1: a base page (4K on x86)"),
    C("level2", "int64", "", "faults mapped at level 2 (2M with 4K pages)"),
    C("level3", "int64", "", "faults mapped at level 3 (1G with 4K pages)"),
    C("prefetched", "int64", "", "installs without a fault (prefetch)"),
    C("unpaired_installs", "int64", "", "installs whose request may have been lost"),
    C("invalidations", "int64", "", "MMU-notifier invalidations"),
    C("mmio_exits", "int64", "", "MMIO exits"),
    C("service_p50_us", "float64", "us", "median fault service time"),
    C("lost", "int64", "", "events lost in the slot"),
    C("vma_memtype", "str", "", "host VMA type(s) from faults"),
    C("spte_memtype", "str", "", "installed type(s)"),
    C("slot_vma_memtype", "str", "", "the VMA type even without faults"),
    C("verdict", "str", "", "verdict"), C("reason", "str", "", "why"),
    C("vma_source", "str", "", "where the VMA came from"),
    VM_INSTANCE,  # last: the columns before it keep their places in CSV
    *QEMU,  # after it, for the same reason
))

OPS_VIEW = Table("ops_view", "the memslot ioctls as report prints them", (
    C("t_s", "float64", "s", "time from the recording's start"), PID, PROC, VM_FD,
    C("ioctl_name", "str", "", "ioctl"), AS_ID, C("slot_id", "int64", "", "slot id"),
    C("op", "str", "", "KVM's classification"),
    C("flag_names", "str", "", "flags, '|'-separated ('' for none)"),
    C("gpa", "uint64", "bytes", "guest physical start"),
    C("size_bytes", "uint64", "bytes", "size"),
    C("hva", "uint64", "bytes", "host virtual start"), C("ret", "int64", "", "return value"),
    C("errno", "str", "", "errno name"), C("reason", "str", "", "why refused"),
    C("latency_ns", "int64", "ns", "time in the ioctl"),
))

# -- diff (analysis/compare.py) ---------------------------------------------


def _sides(c: Column) -> tuple[Column, Column]:
    return (Column(f"{c.name}_base", c.dtype, c.unit, f"{c.doc} (BASE)", True),
            Column(f"{c.name}_new", c.dtype, c.unit, f"{c.doc} (NEW)", True))


_SLOT_IDS = ("slot ids [id, ...]: one, or several where pooled VMs number the slot "
             "differently; null: not in the recording")
_PROFILE = (C("slot", "object", "", _SLOT_IDS),
            C("backing", "str", "", "what backs the slot"),
            C("flags", "object", "", "the distinct flag_names of its versions in order of "
              "first use [names, ...] ('' for none)"),
            C("faults", "Int64", "", "faults"),
            C("pages", "Int64", "pages", "distinct guest pages faulted"),
            C("huge_share", "float64", "", "share of 2M / 1G mappings"),
            C("levels", "object", "", "mappings per size {size: count}"),
            C("cacheable_share", "float64", "", "share of cacheable installs"),
            C("invalidations", "Int64", "", "invalidations"),
            C("mmio_exits", "Int64", "", "MMIO exits"),
            C("p50_us", "float64", "us", "median service time"))

DIFF_SLOTS = Table("diff_slots", "slots of both recordings matched by (address space, GPA, "
                   "size), side by side", (
    AS_ID, C("gpa", "uint64", "bytes", "guest physical start"),
    C("size_bytes", "uint64", "bytes", "size"),
    *[x for c in _PROFILE for x in _sides(c)],
))

DIFF_LATENCY = Table("diff_latency", "fault service-time quantiles by slot, memory type "
                     "and level, per side", (
    C("side", "str", "", "base / new"), C("by", "str", "", "slot GPA / memtype / level"),
    C("key", "str", "", "the slot's GPA, the memory type or the level"),
    C("count", "int64", "", "faults"), C("p50_us", "float64", "us", "median"),
    C("p90_us", "float64", "us", "90th percentile"),
    C("p99_us", "float64", "us", "99th percentile"),
    C("max_us", "float64", "us", "maximum"),
    C("faults_per_s", "float64", "1/s", "faults per second of the recording (null: its "
      "length is not known)"),
))

DIFF_VMS = Table("diff_vms", "per recording and VM totals", (
    C("side", "str", "", "base / new"), PID, PROC, VM_FD,
    C("faults", "int64", "", "faults"),
    C("huge_share", "float64", "", "share of 2M / 1G mappings"),
    C("p50_us", "float64", "us", "median service time"),
    C("userspace_exits", "int64", "", "exits to the VMM"),
    C("exits", "object", "", "exits to the VMM per KVM_EXIT_* reason {reason: count}"),
    C("errors", "int64", "", "errors"),
    C("recorded_s", "float64", "s", "how long the recording ran (null: not closed)"),
))

DIFF_FINDINGS = Table("diff_findings", "what changed between the recordings, one row per "
                      "finding: the slot it is about as data, the values on both sides, and "
                      "the change in words (analysis/compare.py)", (
    C("as_id", "Int64", "", "KVM address space of the slot (null: a finding about every "
      "slot, e.g. errors)"),
    C("gpa", "UInt64", "bytes", "guest physical start of the slot"),
    C("size_bytes", "UInt64", "bytes", "size of the slot"),
    C("slot_base", "object", "", "BASE's " + _SLOT_IDS),
    C("slot_new", "object", "", "NEW's " + _SLOT_IDS),
    C("metric", "str", "", "latency / faults / levels / memtype / invalidations / exits / "
      "errors / backing / slots (a slot in one recording only)"),
    C("base", "object", "", "the metric in BASE (slots: whether the slot is in BASE)"),
    C("new", "object", "", "the metric in NEW (slots: whether the slot is in NEW)"),
    C("regression", "bool", "", "past its threshold in the bad direction"),
    C("message", "str", "", "the change in words, for people"),
    C("causes", "object", "", "likely causes seen on the slot [{cause: backing / "
      "dirty_logging / flags / pages, base, new, message}, ...]"),
    C("detail", "object", "", "more about the change: latency {ratio, ci_low, ci_high, "
      "cliffs_delta, ...}, levels {base, new}, errors {what, errno}"),
))

TABLES = {t.name: t for t in (OPS, SLOTS, FAULTS, PREFETCH, INVALIDATIONS, EXITS, ERRORS,
                              VERDICTS, RANGES, LOST, LOST_WHERE, SUMMARY, OPS_VIEW,
                              DIFF_SLOTS, DIFF_LATENCY, DIFF_VMS, DIFF_FINDINGS)}


def markdown() -> str:
    """docs/tables.md: every derived table and column."""
    out = ["# Derived tables", "",
           "Generated from kvmtrace/analysis/schema.py by "
           "`python -m kvmtrace.analysis.schema > docs/tables.md`; do not edit.", "",
           f"JSON / CSV schema version {SCHEMA_VERSION}. Integers are exact (no floats), "
           "null means not known.", "",
           "A column's name says its unit: a quantity ends in `_ns`, `_us`, `_ms`, `_s`, "
           "`_bytes`, `_kb` (KiB), `_pct` or `_per_s`; a time is `ts` or `*_ts` "
           "(CLOCK_MONOTONIC ns); an address (`gpa`, `hva`, `ipa`, `phys`, `vma_start`, ...) "
           "is in bytes and a frame number (`gfn`, `pfn`, `vm_pgoff`) or `pages` in pages. "
           "Text in a `str` column is data (`flag_names` is '' for no flags); the text "
           "views print '-' for it. A `category` column is text too, with few distinct "
           "values (a pandas Categorical in the DataFrames `kvmtrace.load()` returns; "
           "the same strings in JSON, CSV, TSV and Parquet).", "",
           "The whole JSON report (`kvmtrace report --format json`) holds every table "
           "below that report prints but the per-fault rows: `--format json --table "
           "faults` (or `--format csv --table faults`) streams those, one compact row "
           "each, in pieces, so a recording of millions of faults is written in bounded "
           "memory.", ""]
    for t in TABLES.values():
        out += [f"## {t.name}", "", t.doc[0].upper() + t.doc[1:] + ".", "",
                "| column | type | unit | meaning |", "|---|---|---|---|"]
        out += [f"| `{c.name}` | {c.dtype}{' (optional)' if c.optional else ''} | {c.unit} | "
                f"{c.doc.replace('|', chr(92) + '|')} |" for c in t.columns]  # \| in a cell
        out.append("")
    return "\n".join(out)


# -- the Parquet export and fleets (kvmtrace/export, kvmtrace/fleet.py) -----
#
# Every exported table (the raw events, the tables above, these two) is
# partitioned by host and recording: its rows get those two columns from the
# Hive path (DIR/<table>/host=H/recording=R/part-0.parquet), not from the file.

RECORDINGS = Table("recordings", "one row per exported recording (kvmtrace export; its host "
                   "and recording columns come from the partition path)", (
    C("hostname", "str", "", "host name as recorded (null: not recorded); the host= path "
      "value is this with ASCII characters other than A-Z a-z 0-9 . _ - percent-encoded"),
    C("file", "str", "", "file name of the recording when it was exported"),
    C("header_sha256", "str", "", "SHA-256 of the recording's format version and metadata; "
      "the recording id is the file name stem, '-' and its first 8 hex digits"),
    C("kernel", "str", "", "kernel release"),
    C("arch", "str", "", "machine (uname -m)"),
    C("kvm", "str", "", "KVM flavour, vendor/mmu: intel/tdp, amd/tdp, pvm/shadow, "
      "arm64/stage2, ..."),
    C("spte_format", "str", "", "the format of KVM's page-table entries"),
    C("page_size_bytes", "Int64", "bytes", "host base page size"),
    C("start_realtime_ns", "Int64", "ns", "wall clock when recording started "
      "(CLOCK_REALTIME, since the Unix epoch)"),
    C("start_monotonic_ns", "Int64", "ns", "CLOCK_MONOTONIC when recording started: the "
      "clock of every ts column"),
    C("duration_ns", "Int64", "ns", "start to stop, from the end note's clock (null: not "
      "closed cleanly)"),
    C("complete", "bool", "", "closed cleanly and read back without damage"),
    C("batches", "int64", "", "flushes read back"),
    C("problems", "str", "", "what the reader found wrong, '; '-separated ('' for nothing)"),
    C("stopped_by", "str", "", "why recording stopped (null: no end note)"),
    C("events", "int64", "", "events recorded, all kinds"),
    C("lost_events", "int64", "", "events lost (ring buffers full), all kinds, host-wide"),
    C("recording_schema_version", "int64", "", "version of the recording file format"),
    C("tables_schema_version", "int64", "", "version of the derived tables' columns "
      "(SCHEMA_VERSION above)"),
    C("export_version", "int64", "", "version of the dataset layout (kvmtrace/export)"),
    C("kvmtrace_version", "str", "", "kvmtrace version that recorded"),
    C("exported_by", "str", "", "kvmtrace version that exported"),
))

PROCESSES = Table("processes", "the VMM processes of each exported recording and the name "
                  "fleets group them by (kvmtrace export)", (
    PID, PROC,
    C("vmm", "str", "", "the VMM program: basename of the launched command's argv[0] "
      "('python -m MODULE' for a Python module) when this process is known to be it, else "
      "'pid N' ('pid N#2' for a later process with the same pid)"),
    C("cmdline", "str", "", "the launched command line, space-separated (null: not known for "
      "this process)"),
    C("vmm_source", "str", "", "how vmm was found: 'command note' (record wrote the "
      "launched pid), 'end note' (the command's pid at the end), 'only VMM of the launched "
      "command' (older recordings: one VMM process and a launched command), 'pid'"),
))

_PCT = ("nearest rank: the value at 1-based position ceil(n*{p}/100) of the n sorted "
        "service times, an observed value, computed exactly; null: no timed fault")

FLEET = Table("fleet", "many recordings summarised per host, kernel, architecture, KVM "
              "flavour and VMM (kvmtrace fleet, kvmtrace/fleet.py: the same rows on DuckDB "
              "and on Dask)", (
    C("host", "str", "", "host name (null: not recorded)"),
    C("kernel", "str", "", "kernel release"), C("arch", "str", "", "machine"),
    C("kvm", "str", "", "KVM flavour, vendor/mmu"),
    C("vmm", "str", "", "VMM program, or 'pid N' where the recording does not name it "
      "(processes.vmm); '(no VMM seen)' for a recording without one"),
    C("recordings", "int64", "", "recordings"),
    C("incomplete", "int64", "", "of those, not closed cleanly or damaged"),
    C("processes", "int64", "", "VMM processes"),
    C("slot_versions", "int64", "", "slot versions judged (verdicts of version >= 0)"),
    C("consistent", "int64", "", "verdicts: consistent"),
    C("downgraded", "int64", "", "verdicts: downgraded"),
    C("upgraded", "int64", "", "verdicts: upgraded"),
    C("rejected", "int64", "", "verdicts: rejected (refused memslots and faults)"),
    C("unknown", "int64", "", "verdicts: unknown"),
    C("mismatches", "int64", "", "downgraded + upgraded"),
    C("errors", "int64", "", "rows of the errors table"),
    C("faults", "int64", "", "faults"),
    C("timed_faults", "int64", "", "faults with a service time"),
    C("service_p50_ns", "Int64", "ns", "median fault service time; " + _PCT.format(p=50)),
    C("service_p90_ns", "Int64", "ns", "90th percentile; " + _PCT.format(p=90)),
    C("service_p99_ns", "Int64", "ns", "99th percentile; " + _PCT.format(p=99)),
    C("service_max_ns", "Int64", "ns", "longest fault service time"),
    C("lost_events", "int64", "", "events lost in these VMM processes (lost_where: the BPF "
      "side's count per process)"),
    C("recordings_lost_events", "int64", "", "events lost host-wide in these recordings, "
      "placeable in a process or not (a recording with two VMMs counts in both rows)"),
))

TABLES.update({t.name: t for t in (RECORDINGS, PROCESSES, FLEET)})

# -- the whole JSON report (docs/report.schema.json) ------------------------

# `kvmtrace report --format json`: each table key and the declaration of its rows
# (render.tables); "vmas" (--table vmas only) is the recording's raw smaps table;
# "faults" (--table faults only: one row per fault, streamed) is not in the whole report
REPORT_TABLES = {"slots": "summary", "ops": "ops_view", "faults": "faults",
                 "ranges": "ranges", "verdicts": "verdicts", "errors": "errors",
                 "lost": "lost", "vmas": None}
REPORT_SCHEMA_ID = f"urn:kvmtrace:report-schema:{SCHEMA_VERSION}"
WHOLE_LEAVES_OUT = ("vmas", "faults")  # --table NAME only

_BOUNDS = {"int64": (-2**63, 2**63 - 1), "Int64": (-2**63, 2**63 - 1),
           "uint64": (0, 2**64 - 1), "UInt64": (0, 2**64 - 1)}


def _rows_schema(t: Table) -> dict:
    """json_schema(t), closed: exactly the declared keys, integers in their range."""
    s = json_schema(t)
    s["items"]["additionalProperties"] = False
    for c in t.columns:
        if c.dtype in _BOUNDS:
            lo, hi = _BOUNDS[c.dtype]
            s["items"]["properties"][c.name].update(minimum=lo, maximum=hi)
    return s


def _arrow_rows_schema(fields, doc: str) -> dict:
    """A raw recording table (kvmtrace/recording/format.py) as a JSON Schema array."""
    import pyarrow as pa

    props = {}
    for name, typ in fields:
        if pa.types.is_integer(typ):
            bits = typ.bit_width
            lo, hi = (0, 2**bits - 1) if pa.types.is_unsigned_integer(typ) else \
                (-2**(bits - 1), 2**(bits - 1) - 1)
            props[name] = {"type": "integer", "minimum": lo, "maximum": hi}
        else:
            props[name] = {"type": "string"}
        props[name]["description"] = f"{typ}"
    return {"type": "array", "description": doc,
            "items": {"type": "object", "properties": props, "required": [n for n, _ in fields],
                      "additionalProperties": False}}


def report_json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of `kvmtrace report --format json`: the
    whole report, or with --table NAME an object holding that one table."""
    from ..recording import format as rfmt

    defs = {}
    for key, name in REPORT_TABLES.items():
        defs[key] = (_arrow_rows_schema(rfmt.VMA_FIELDS, "the recording's /proc/PID/smaps "
                                        "snapshots (raw table vmas)")
                     if name is None else _rows_schema(TABLES[name]))
        defs[key]["description"] = (f"table {name}: " if name else "") + defs[key]["description"]
    defs["recording"] = {
        "type": "object", "description": "the recording file as read back",
        "properties": {
            "path": {"type": "string", "description": "the path given to report"},
            "complete": {"type": "boolean", "description": "closed cleanly and read back "
                         "without damage"},
            "problems": {"type": "array", "items": {"type": "string"},
                         "description": "what the reader found wrong (damage, truncation)"},
            "schema_version": {"type": "integer", "minimum": 1,
                               "description": "version of the recording file format"}},
        "required": ["path", "complete", "problems", "schema_version"],
        "additionalProperties": False}
    opt_str = {"type": ["string", "null"]}
    defs["meta"] = {
        "type": "object", "description": "the recording's header as recorded: host, kernel, "
        "arch, KVM flavour, clock base, probes, decode context (PAT, stage-2 enums); keys "
        "the reader type-checks are listed, others are kept as recorded",
        "properties": {
            "host": opt_str | {"description": "host name"},
            "kernel": {"type": "string", "description": "kernel release"},
            "arch": opt_str | {"description": "machine (uname -m)"},
            "page_size": {"type": "integer", "description": "base page size [bytes]"},
            "kvm": {"type": "object", "description": "KVM flavour",
                    "properties": {"vendor": opt_str, "mmu": opt_str,
                                   "spte_format": {"type": "string"}}},
            "clock": {"type": "object", "description": "clocks when recording started [ns]",
                      "properties": {"monotonic_ns": {"type": "integer", "minimum": 0},
                                     "realtime_ns": {"type": "integer", "minimum": 0}}},
            "probes": {"type": "object", "description": "probes requested, attached, and "
                       "unavailable (with why)"}},
        "required": ["kernel"]}
    defs["notes"] = {"type": "array", "items": {"type": "string"},
                     "description": "what the reader and the analysis want the reader of the "
                     "report to know (loss, incomplete pictures, decode caveats)"}
    whole = {"recording": {"$ref": "#/$defs/recording"},
             "tables_schema_version": {"const": SCHEMA_VERSION,
                                       "description": "version of the tables' columns"},
             "meta": {"$ref": "#/$defs/meta"}, "notes": {"$ref": "#/$defs/notes"}}
    whole |= {k: {"$ref": f"#/$defs/{k}"} for k in REPORT_TABLES if k not in WHOLE_LEAVES_OUT}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": REPORT_SCHEMA_ID,
        "title": "kvmtrace report --format json",
        "description": f"Tables schema version {SCHEMA_VERSION}. Generated from "
        "kvmtrace/analysis/schema.py by `python -m kvmtrace.analysis.schema --report-schema "
        "> docs/report.schema.json`; do not edit. Integers are JSON integers (exact to "
        "2**64), null means not known, units are in each column's description. "
        "CSV (--format csv --table NAME) has the same columns as NAME's rows here, in the "
        "same order, with an empty field for null.",
        "oneOf": [
            {"title": "the whole report", "type": "object", "properties": whole,
             "required": list(whole), "additionalProperties": False},
            {"title": "one table (--table NAME)", "type": "object",
             "properties": {k: {"$ref": f"#/$defs/{k}"} for k in REPORT_TABLES},
             "minProperties": 1, "maxProperties": 1, "additionalProperties": False}],
        "$defs": defs,
    }


def report_json_schema_text() -> str:
    """docs/report.schema.json, as written."""
    return json.dumps(report_json_schema(), indent=1) + "\n"


if __name__ == "__main__" and "--report-schema" in __import__("sys").argv:
    print(report_json_schema_text(), end="")
    raise SystemExit(0)


if __name__ == "__main__":
    print(markdown(), end="")
    if "--json-schema" in __import__("sys").argv:
        print(json.dumps({n: json_schema(t) for n, t in TABLES.items()}, indent=1))
