"""Read a recording back into pandas tables, validating everything it reads.

A recording whose writer died (SIGKILL, power loss, disk full) ends in the
middle of a message or without the end-of-stream marker; everything up to the
last complete batch is returned and ``complete`` says whether the end was
clean.

Nothing in the file is trusted before it is checked. The stream is framed
here, not by Arrow's stream reader: each message's metadata length and
declared body length are checked against what the file really holds (its
size, and for a sparse file the blocks actually allocated) before anything is
read or allocated, so a corrupt length cannot make the reader allocate or
read gigabytes. A batch is then checked in this order, and the first failure
ends the recording there (what came before is kept, like a cut-off file, with
the problem named in ``problems``): it is a record batch, its
checksum and sequence number match (version 2+; the body is never decoded
when they do not), a compressed body (version 3+ only) declares no more
uncompressed bytes than the file's budget (DECOMPRESSED_RATIO times its
size, over all its batches), Arrow decodes it against the expected schema, and
``validate(full=True)`` accepts it (offsets, lengths, UTF-8). The schema must
hold only known tables of their exact types (an older recording may lack
newer tables, which read as empty, and newer fields of a table, which read as
zeros or empty strings), and the metadata the analysis reads is
type-checked: a damaged header is a one-line RecordingError, a damaged
optional key is dropped with a problem noted. Rows with missing values,
notes that are not JSON of their kind and rows the kernel cannot have
produced (ROW_RULES) are dropped (the writer writes none of them) and
counted in ``problems``. Memory and time are bounded by the file's real size
(times DECOMPRESSED_RATIO for compressed bodies).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import format as fmt


class RecordingError(Exception):
    """A file that is not a readable kvmtrace recording (one-line message)."""


@dataclass
class Recording:
    path: str
    meta: dict
    schema_version: int
    tables: dict[str, pd.DataFrame]
    complete: bool
    batches: int
    problems: list[str] = field(default_factory=list)
    # read(defer=...): the deferred tables' row counts, and how to read them again
    deferred: dict[str, int] = field(default_factory=dict)
    _source: tuple | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def last_note(self, key: str):
        """The value of the last note ``key`` as JSON, None without one (or
        when it is not JSON)."""
        notes = self.tables["notes"]
        v = notes.loc[notes["key"] == key, "value"]
        if not len(v):
            return None
        try:
            return json.loads(v.iloc[-1])
        except ValueError:
            return None

    def stream(self, columns: dict[str, list[str]] | None = None):
        """The deferred tables, batch by batch in file order: one
        ``{name: DataFrame}`` per batch holding the rows of that batch (every
        deferred name present, possibly empty; only ``columns[name]`` where
        given, for speed). The file is read a second
        time and every check of the first read is made again (seal, size
        budget, Arrow validation, row rules); it must be the file read first
        (same inode and size), else RecordingError. Problems found (rows
        dropped by ROW_RULES) are added to ``problems`` when the stream ends."""
        if self._source is None:
            return
        ident, frames, version, decode = self._source
        fd = _open(self.path)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size) != ident:
                raise RecordingError(f"{_shown(self.path)}: the file changed while it was "
                                     "being read")
            names = list(self.deferred)
            types = {n: pa.struct([_TYPES[n].field(c) for c in (columns or {}).get(n) or
                                   _TYPES[n].names]) for n in names}
            budget = _Budget(st.st_size)
            ruled: list[str] = []
            for i, frame in enumerate(frames):
                try:
                    batch = _read_batch(fd, frame, i, version, decode, budget)
                except _BadBatch as e:
                    raise RecordingError(f"{_shown(self.path)}: batch {i + 1} changed between "
                                         f"two reads ({e})") from None
                parts: dict[str, list] = {n: [] for n in names}
                _rows(batch, parts, {}, keep=parts.keys())
                yield {n: _apply_rules(n, _table(n, parts.pop(n), types[n], {}), ruled)
                       for n in names}
            self.problems.extend(_merge_rule_problems(ruled))
        finally:
            os.close(fd)


# Message metadata is a few KiB (a batch header) to a few hundred KiB (the
# schema with its meta JSON); anything bigger is not a kvmtrace message.
MAX_METADATA = 16 << 20
# A body may extend past the blocks the file has allocated by this much
# before the reader asks the file system where its holes are.
SPARSE_SLACK = 1 << 20

_ARROW_ERRORS = (pa.ArrowException, ValueError, TypeError, IndexError, KeyError, OSError,
                 MemoryError, NotImplementedError, OverflowError, EOFError)


def _oneline(text, limit: int = 120) -> str:
    """Text from a file or a library, made fit for a one-line message (no
    newlines or control characters, no rich markup brackets, bounded)."""
    s = re.sub(r"[\x00-\x1f\x7f-\x9f]+", " ", str(text)).strip()
    s = s.replace("[", "(").replace("]", ")")
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _shown(path: str) -> str:
    """A path for a one-line message (control characters escaped)."""
    return path if path.isprintable() else repr(path)[1:-1]


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- framing ------------------------------------------------------------------

@dataclass
class _Frame:
    offset: int        # of the message's 8-byte prefix
    meta_len: int
    info: fmt.MessageInfo

    @property
    def size(self) -> int:
        return 8 + self.meta_len + self.info.body_length


def _pread(fd: int, n: int, off: int) -> bytes:
    """Exactly what the file holds at [off, off + n), shorter at its end."""
    out = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 26), off)
        if not chunk:
            break
        out.append(chunk)
        n -= len(chunk)
        off += len(chunk)
    return b"".join(out)


def _has_hole(fd: int, start: int, end: int, allocated: int) -> bool:
    """Whether [start, end) would read bytes the file never wrote: only asked
    when the file has fewer allocated bytes than ``end`` (sparse, or
    compressed by the file system, whose data is real)."""
    if end <= allocated + SPARSE_SLACK:
        return False
    try:
        return os.lseek(fd, start, os.SEEK_HOLE) < end
    except (OSError, AttributeError):
        return True  # cannot ask: the file holds fewer bytes than it claims


def _scan(fd: int, size: int, allocated: int):
    """Every message's frame, without reading a body: (frames, end) with end
    one of ("eos", trailing bytes), ("eof",), ("cut",), ("bad", offset, why)."""
    frames: list[_Frame] = []
    pos = 0
    while True:
        if pos == size:
            return frames, ("eof",)
        head = _pread(fd, 8, pos)
        if len(head) < 8:
            return frames, ("cut",)
        cont, meta_len = struct.unpack("<Ii", head)
        if cont != fmt.CONTINUATION:
            return frames, ("bad", pos, "no message marker")
        if meta_len == 0:
            return frames, ("eos", size - pos - 8)
        if meta_len < 0 or meta_len > MAX_METADATA:
            return frames, ("bad", pos, f"impossible message metadata length {meta_len}")
        if meta_len > size - pos - 8:
            return frames, ("cut",)
        if _has_hole(fd, pos + 8, pos + 8 + meta_len, allocated):
            return frames, ("bad", pos, f"declares {_size(meta_len)} of message metadata "
                                        f"where the file holds no data (sparse file)")
        meta = _pread(fd, meta_len, pos + 8)
        if len(meta) < meta_len:
            return frames, ("cut",)
        try:
            info = fmt.parse_message(meta)
        except fmt.FormatError as e:
            return frames, ("bad", pos, str(e))
        body_start = pos + 8 + meta_len
        if info.body_length < 0:
            return frames, ("bad", pos, f"negative body length {info.body_length}")
        if info.body_length > size - body_start:
            return frames, ("cut",)
        end = body_start + info.body_length
        if _has_hole(fd, body_start, end, allocated):
            return frames, ("bad", pos, f"declares a body of {_size(info.body_length)} where "
                                        f"the file holds no data (sparse file)")
        frames.append(_Frame(pos, meta_len, info))
        pos = end


# -- the header -----------------------------------------------------------------

_RELEASE = re.compile(r"\s*\d+\.\d+")


def _u64(v) -> bool:
    return type(v) is int and 0 <= v < 1 << 64


def _i63(v) -> bool:
    return type(v) is int and 0 <= v < 1 << 63


def _opt(check):
    return lambda v: v is None or check(v)


def _str(v) -> bool:
    return isinstance(v, str)


def _bool(v) -> bool:
    return isinstance(v, bool)


def _list_of(check, length=None):
    return lambda v: (isinstance(v, list) and (length is None or len(v) == length)
                      and all(check(x) for x in v))


def _dict_of(check):
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


def _range(v) -> bool:
    return isinstance(v, dict) and _u64(v.get("start")) and _u64(v.get("end"))


def _pat_range(v) -> bool:
    return _range(v) and _str(v.get("memtype"))


def _pgtable_prot(v) -> bool:
    """enum kvm_pgtable_prot as read from BTF: the members the stage-2 decoder
    needs (R, W, DEVICE), each a u64, with or without the KVM_PGTABLE_PROT_ prefix."""
    if not _dict_of(_u64)(v):
        return False
    names = {k[len("KVM_PGTABLE_PROT_"):] if k.startswith("KVM_PGTABLE_PROT_") else k for k in v}
    return {"R", "W", "DEVICE"} <= names


def _finite(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


# What the analysis and the views read from the meta JSON, and the type each
# must have. A dict is a nested object checked key by key; a value that fails
# its check is dropped (the analysis then treats it as not recorded) and named
# in ``problems``. Keys not listed are kept as they are (shown, not read).
META_SPEC = {
    "host": _opt(_str),
    "arch": _opt(_str),
    "kvm": {"vendor": _opt(_str), "mmu": _opt(_str), "spte_format": _str},
    "clock": {"monotonic_ns": _i63, "realtime_ns": _i63},
    "ram": _opt(_list_of(_range)),
    "x86": {"pat": {"entries": _list_of(_str, 8), "source": _str},
            "pat_memtype_list": _opt(_list_of(_pat_range)),
            "mtrr": _opt(_list_of(_pat_range)), "mtrr_source": _opt(_str),
            "ram": _opt(_list_of(_range))},
    "arm64": {"fwb": _opt(_bool), "dic": _opt(_bool)},
    "btf": {"enums": {"kvm_pgtable_prot": _pgtable_prot}},
    "probes": {"attached": _list_of(_str), "unavailable": _dict_of(_str)},
}

# The ``end`` note (written when recording stops), read by the views.
END_SPEC = {"elapsed_s": _finite, "stopped_by": _str, "lost": _dict_of(_u64),
            "events": _dict_of(_u64), "command_status": _opt(lambda v: type(v) is int)}


def _normalise(obj: dict, spec: dict, where: str, dropped: list[str]) -> dict:
    out = dict(obj)
    for key, check in spec.items():
        if key not in out:
            continue
        v = out[key]
        if isinstance(check, dict):
            if isinstance(v, dict):
                out[key] = _normalise(v, check, f"{where}{key}.", dropped)
                continue
            ok = False
        else:
            ok = check(v)
        if not ok:
            del out[key]
            dropped.append(where + key)
    return out


def _json(raw: bytes):
    """Parsed JSON, or raise ValueError (deep nesting and huge numbers too)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise ValueError(type(e).__name__) from None


def _header(path: str, schema: pa.Schema, problems: list[str]):
    """(version, meta, names of the tables present, the schema to decode with)."""
    md = schema.metadata or {}
    if fmt.VERSION_KEY not in md:
        raise RecordingError(f"{path}: an Arrow stream, but not a kvmtrace recording")
    raw_version = md[fmt.VERSION_KEY]
    if not re.fullmatch(rb"[0-9]{1,6}", raw_version) or int(raw_version) < 1:
        shown = _oneline(raw_version.decode("utf-8", "backslashreplace"), 20)
        raise RecordingError(f"{path}: corrupt recording header (schema version "
                             f"{shown!r} is not a version number)")
    version = int(raw_version)
    if version > fmt.SCHEMA_VERSION:
        raise RecordingError(f"{path}: recording schema {version} is newer than this "
                             f"kvmtrace reads ({fmt.SCHEMA_VERSION}); upgrade kvmtrace")
    raw_meta = md.get(fmt.META_KEY, b"{}")
    stored = md.get(fmt.HEADER_CRC_KEY)
    if stored is not None or version >= fmt.CHECKSUMS_SINCE:
        if stored != fmt.header_checksum(raw_version, raw_meta):
            raise RecordingError(f"{path}: recording header checksum mismatch (corrupted on "
                                 f"disk)")
    try:
        meta = _json(raw_meta)
    except ValueError as e:
        raise RecordingError(f"{path}: corrupt recording header (kvmtrace.meta is not valid "
                             f"JSON: {e})") from None
    if not isinstance(meta, dict):
        raise RecordingError(f"{path}: corrupt recording header (kvmtrace.meta is not a JSON "
                             f"object)")
    kernel = meta.get("kernel")
    if not isinstance(kernel, str) or not _RELEASE.match(kernel):
        raise RecordingError(f"{path}: corrupt recording header (no kernel release in "
                             f"kvmtrace.meta)")
    dropped: list[str] = []
    meta = _normalise(meta, META_SPEC, "", dropped)
    if dropped:
        problems.append("recording header: ignored meta " + ", ".join(dropped[:8])
                        + (f" and {len(dropped) - 8} more" if len(dropped) > 8 else "")
                        + " (wrong type: corrupt or written by another tool)")

    try:
        names, decode = _tables(path, schema)
    except UnicodeDecodeError:  # pyarrow decodes names when asked for them
        raise RecordingError(f"{path}: corrupt recording header (a table or field name is "
                             f"not UTF-8)") from None
    return version, meta, names, decode


def _tables(path: str, schema: pa.Schema) -> tuple[list[str], pa.Schema]:
    """The tables present and the schema to decode their batches with."""
    expected = fmt.table_types()
    names: list[str] = []
    fields: list[pa.Field] = []
    for f in schema:
        name = f.name
        if name not in expected:
            raise RecordingError(f"{path}: corrupt recording header (unknown table "
                                 f"{_oneline(name, 40)!r})")
        if name in names:
            raise RecordingError(f"{path}: corrupt recording header (table {name!r} twice)")
        st = _present_fields(f.type, expected[name])
        if st is None:
            raise RecordingError(f"{path}: corrupt recording header (table {name!r} has the "
                                 f"wrong type)")
        names.append(name)
        fields.append(pa.field(name, pa.list_(st)))
    return names, pa.schema(fields)


def _present_fields(typ: pa.DataType, want: pa.StructType) -> pa.StructType | None:
    """The struct a table column holds, if it is ``want`` or, from an older
    kvmtrace, ``want`` without some of its fields (each present field of its
    exact type, in any order); None for anything else."""
    if not pa.types.is_list(typ) or not pa.types.is_struct(typ.value_type):
        return None
    have = typ.value_type
    if have.num_fields == 0:
        return None
    seen = set()
    out = []
    for f in have:
        i = want.get_field_index(f.name)
        if i < 0 or f.name in seen or f.type != want.field(i).type:
            return None
        seen.add(f.name)
        out.append(want.field(i))
    return pa.struct(out)


def _read_schema(path: str, fd: int, frames: list[_Frame], end) -> pa.Schema:
    if not frames or frames[0].info.kind != fmt.MSG_SCHEMA:
        if end[0] == "eos" and not frames:
            raise RecordingError(f"{path}: not a kvmtrace recording (an empty Arrow stream)")
        raise RecordingError(f"{path}: not a kvmtrace recording (no Arrow stream header)")
    s = frames[0]
    if s.info.body_length:
        raise RecordingError(f"{path}: corrupt recording header (a schema with a body)")
    try:
        return pa.ipc.read_schema(pa.py_buffer(_pread(fd, s.size, s.offset)))
    except _ARROW_ERRORS as e:
        raise RecordingError(f"{path}: corrupt recording header "
                             f"({_oneline(str(e).splitlines()[0] if str(e) else e, 80)})") \
            from None


# -- batches ------------------------------------------------------------------

class _BadBatch(Exception):
    pass


def _check_seal(frame: _Frame, body: bytes, index: int, version: int):
    """The batch's checksum and sequence number, before its body is decoded."""
    custom = frame.info.custom
    seq_raw, crc = custom.get(fmt.SEQ_KEY), custom.get(fmt.CRC_KEY)
    if seq_raw is None and crc is None and version < fmt.CHECKSUMS_SINCE:
        return
    if seq_raw is None or crc is None or not re.fullmatch(rb"[0-9]{1,12}", seq_raw):
        raise _BadBatch("checksum missing (corrupted on disk)")
    seq = int(seq_raw)
    if fmt.batch_checksum(seq, frame.info.batch, body) != crc:
        raise _BadBatch("checksum mismatch (corrupted on disk)")
    if seq != index:
        raise _BadBatch(f"holds batch {seq + 1} (a block duplicated or moved on disk)")


def _decompressed_size(header: fmt.BatchHeader, body) -> int:
    """What decompressing a batch would allocate: the sum of the uncompressed
    lengths its buffers declare (Arrow IPC: each non-empty compressed buffer
    starts with its uncompressed length as an int64, -1 for a buffer stored
    uncompressed). Buffers that do not lie in the body count as nothing here:
    Arrow refuses them."""
    total = 0
    for off, length in struct.iter_unpack("<qq", header.buffers):
        if length >= 8 and 0 <= off <= len(body) - 8:
            n = struct.unpack_from("<q", body, off)[0]
            total += max(n, 0)  # -1: stored as it is, sliced, not allocated
    return total


class _Budget:
    """Bytes that decompressing the batches of one file may allocate in all:
    DECOMPRESSED_RATIO times the file's size, plus DECOMPRESSED_SLACK. Real
    recordings compress 2 to 10 times (bench/bytes_per_event.py); a file
    declaring more is refused before Arrow allocates anything."""

    def __init__(self, size: int):
        self.left = DECOMPRESSED_SLACK + DECOMPRESSED_RATIO * size

    def take(self, n: int):
        if n > self.left:
            raise _BadBatch(f"declares {_size(n)} of compressed data, more than a recording "
                            f"of this size can hold (corrupt)")
        self.left -= n


DECOMPRESSED_RATIO = 256
DECOMPRESSED_SLACK = 16 << 20


def _decode(data: bytes, frame: _Frame, index: int, version: int,
            schema: pa.Schema, budget: _Budget | None = None) -> pa.RecordBatch:
    info = frame.info
    if info.kind != fmt.MSG_RECORD_BATCH:
        raise _BadBatch(f"a {fmt.MESSAGE_TYPES.get(info.kind, 'unknown')} message where a "
                        f"record batch belongs")
    if info.batch.compressed and version < fmt.COMPRESSED_SINCE:
        raise _BadBatch(f"compressed body (a version-{version} recording has none)")
    body = memoryview(data)[8 + frame.meta_len:]
    _check_seal(frame, body, index, version)
    if info.batch.compressed:
        (budget or _Budget(len(data))).take(_decompressed_size(info.batch, body))
    try:
        batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)), schema)
        batch.validate(full=True)
    except _ARROW_ERRORS as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _BadBatch(f"corrupt ({_oneline(first, 100)})") from None
    return batch


def _read_batch(fd: int, frame: _Frame, index: int, version: int, schema: pa.Schema,
                budget: _Budget) -> pa.RecordBatch:
    """One batch read from the file and checked (_decode); _BadBatch if not."""
    data = _pread(fd, frame.size, frame.offset)
    if len(data) < frame.size:
        raise _BadBatch("cut short while reading (the file changed)")
    return _decode(data, frame, index, version, schema, budget)


def _rows(batch: pa.RecordBatch, parts: dict, dropped: dict, keep=None, counts=None):
    """Each table's rows of a decoded (and validated) batch: its struct values,
    null rows dropped. Only the tables in ``keep`` (None: all) are kept; the
    others' valid rows are counted in ``counts``."""
    for i, name in enumerate(batch.schema.names):
        if keep is not None and name not in keep and counts is None:
            continue
        col = batch.column(i)
        if col.null_count:
            vals = col.flatten()
        else:  # the values between the first and last offset (what flatten gives)
            offsets = col.offsets
            first, last = offsets[0].as_py(), offsets[-1].as_py()
            if first == last:
                continue
            vals = col.values.slice(first, last - first)
        if vals.null_count:
            dropped[name] = dropped.get(name, 0) + vals.null_count
            vals = vals.filter(vals.is_valid())
        if keep is not None and name not in keep:
            counts[name] = counts.get(name, 0) + len(vals)
        elif len(vals):
            parts[name].append(vals)


_EMPTY: dict[str, pd.DataFrame] = {}


def _table(name: str, chunks: list, typ: pa.StructType, dropped: dict) -> pd.DataFrame:
    """One table from its struct values: rows with a missing value dropped,
    fields an older recording lacks filled with zeros (empty strings)."""
    if not chunks:  # most tables of a recording are empty: made once
        if name not in _EMPTY or not _EMPTY[name].columns.equals(pd.Index(typ.names)):
            _EMPTY[name] = _frame([pa.array([], type=f.type) for f in typ], typ.names)
        return _EMPTY[name].copy()
    # field by field, each a chunked array over the batches (one copy: into numpy)
    flat = [c.flatten() for c in chunks]
    have = {f.name: pa.chunked_array([fl[i] for fl in flat], type=f.type)
            for i, f in enumerate(chunks[0].type)}
    del flat
    if any(c.null_count for c in have.values()):
        keep = None
        for c in have.values():
            if c.null_count:
                v = c.is_valid()
                keep = v if keep is None else pc.and_(keep, v)
        n = sum(len(c) for c in chunks)
        have = {k: c.filter(keep) for k, c in have.items()}
        dropped[name] = dropped.get(name, 0) + n - len(next(iter(have.values())))
    n = len(next(iter(have.values()))) if have else 0
    cols = [have[f.name] if f.name in have else
            pa.repeat(pa.scalar("" if pa.types.is_string(f.type) else 0, type=f.type), n)
            for f in typ]
    return _frame(cols, [f.name for f in typ])


def _frame(cols: list, names: list) -> pd.DataFrame:
    """What ``Table.to_pandas()`` gives for these (null-free) columns, made
    column by column: integers as writable numpy arrays, strings by Arrow."""
    if not all(pa.types.is_integer(c.type) or pa.types.is_string(c.type) for c in cols):
        return pa.Table.from_arrays(cols, names=names).to_pandas()
    return pd.DataFrame({n: _numpy(c) if pa.types.is_integer(c.type) else c.to_pandas()
                         for n, c in zip(names, cols)}, copy=False)


def _numpy(c) -> np.ndarray:
    """An integer column (an array or chunked array) as a writable numpy array."""
    a = c.to_numpy() if isinstance(c, pa.ChunkedArray) else \
        c.to_numpy(zero_copy_only=False, writable=True)
    return a if a.flags.writeable else a.copy()


# What the writer puts in each note it writes, at the top level; a note of a
# known key holding anything else is dropped (the views and the analysis
# read these).
NOTE_TYPES = {"end": dict, "smaps_unavailable": dict, "host_load": dict, "command": dict,
              "lost_where": list, "bpf_misses": dict, "qmp": dict}


def _clean_notes(notes: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """Notes hold JSON values; known notes hold their kind of value, and the
    ``end`` note's keys are type-checked."""
    if not len(notes):
        return notes
    values, keep, bad, dropped = [], [], 0, []
    for key, value in zip(notes["key"], notes["value"]):
        try:
            v = _json(value)
        except ValueError:
            v = _json  # not JSON: no type matches
        want = NOTE_TYPES.get(key, object)
        if v is _json or not isinstance(v, want):
            keep.append(False)
            values.append(value)
            bad += 1
            continue
        if key == "end":
            fixed = _normalise(v, END_SPEC, "end.", dropped)
            if fixed != v:
                value = json.dumps(fixed)
        keep.append(True)
        values.append(value)
    if bad:
        problems.append(f"{bad} note(s) that are not valid JSON of their kind ignored (corrupt)")
    if dropped:
        problems.append("end note: ignored " + ", ".join(sorted(set(dropped))[:8])
                        + " (wrong type: corrupt)")
    notes = notes.assign(value=values)
    return notes[keep].reset_index(drop=True) if bad else notes


def _wraps(a: pd.Series, b: pd.Series) -> pd.Series:
    """a + b past 2**64 (both uint64)."""
    return (a.to_numpy(dtype="uint64") + b.to_numpy(dtype="uint64")) < a.to_numpy(dtype="uint64")


# Rows the kernel cannot have produced, by table: (why, mask of such rows).
# They are dropped and counted in ``problems``; what the analysis computes
# from the rest is then free of the overflows they would cause.
ROW_RULES = {
    "memslot": [("a successful memslot whose GPA or HVA range wraps past 2^64 (KVM refuses "
                 "those with EINVAL)",
                 lambda d: (d["ret"].to_numpy() >= 0)
                 & (_wraps(d["gpa"], d["size"]) | _wraps(d["hva"], d["size"])))],
    "memslot_snapshot": [("a memslot read at the start whose GPA or HVA range wraps past "
                          "2^64 (KVM holds none such)",
                          lambda d: _wraps(d["gpa"], d["size"]) | _wraps(d["hva"], d["size"]))],
}


# Every table: CLOCK_MONOTONIC nanoseconds reach 2^63 after 292 years of uptime.
TIME_COLUMNS = ("ts", "enter_ts", "exit_ts")
ANY_TABLE_RULES = [("a timestamp at or past 2^63 ns (292 years of uptime)",
                    lambda d: np.logical_or.reduce(
                        [d[c].to_numpy(dtype="uint64") >= np.uint64(1 << 63)
                         for c in TIME_COLUMNS if c in d and d[c].dtype.kind == "u"]
                        or [np.zeros(len(d), dtype=bool)]))]


def _apply_rules(name: str, df: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    for why, rule in ANY_TABLE_RULES + ROW_RULES.get(name, []):
        if not len(df):
            break
        bad = rule(df)
        n = int(bad.sum())
        if n:
            problems.append(f"table {name}: {n} impossible row(s) ignored ({why}: corrupt)")
            df = df[~bad].reset_index(drop=True)
    return df


# -- reading ------------------------------------------------------------------

def _open(path) -> int:
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RecordingError(f"{_shown(path)}: no such file") from None
    except OSError as e:
        raise RecordingError(f"{_shown(path)}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise RecordingError(f"{_shown(path)}: is a directory, not a recording")
    if not stat.S_ISREG(st.st_mode):
        raise RecordingError(f"{_shown(path)}: not a regular file (a recording is a file)")
    if st.st_size == 0:
        raise RecordingError(f"{_shown(path)}: empty file (the recording was never started, "
                             f"or was cut off before its header)")
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise RecordingError(f"{_shown(path)}: {e.strerror}") from None


def read(path, defer=()) -> Recording:
    """The recording at ``path``, every table read whole, except the tables
    named in ``defer``: those are only counted here (``deferred``) and read
    batch by batch by ``Recording.stream()``, so a caller can process the
    big event tables in bounded memory (kvmtrace report)."""
    fd = _open(path)
    try:
        return _read(os.fspath(path), fd, frozenset(defer))
    finally:
        os.close(fd)


_TYPES = fmt.table_types()


def _merge_rule_problems(found: list[str]) -> list[str]:
    """The problems _apply_rules noted batch by batch, one line per rule with
    the rows summed (as one read of the whole table would say)."""
    sums: dict[str, int] = {}
    for p in found:
        m = re.match(r"table (\S+): (\d+) impossible row\(s\) ignored (.*)$", p)
        if m:
            key = f"table {m[1]}: {{}} impossible row(s) ignored {m[3]}"
            sums[key] = sums.get(key, 0) + int(m[2])
        else:
            sums.setdefault(p, 0)
    return [k.format(n) if "{}" in k else k for k, n in sums.items()]


def _read(path: str, fd: int, defer: frozenset = frozenset()) -> Recording:
    st = os.fstat(fd)
    size = st.st_size
    allocated = st.st_blocks * 512 if hasattr(st, "st_blocks") else size
    frames, end = _scan(fd, size, allocated)
    shown = _shown(path)  # for one-line messages
    schema = _read_schema(shown, fd, frames, end)
    problems: list[str] = []
    version, meta, names, decode = _header(shown, schema, problems)

    batch_frames = frames[1:]
    total = len(batch_frames)
    parts: dict[str, list] = {n: [] for n in names}
    dropped: dict[str, int] = {}
    complete, batches = True, 0
    budget = _Budget(size)
    counts: dict[str, int] = {}
    keep = [n for n in names if n not in defer] if defer else None
    for i, frame in enumerate(batch_frames):
        try:
            batch = _read_batch(fd, frame, i, version, decode, budget)
            _rows(batch, parts, dropped, keep, counts if defer else None)
        except _BadBatch as e:
            complete = False
            problems.append(f"batch {i + 1} of {total}: {e}; the recording is read up to "
                            f"batch {i}")
            break
        batches += 1
    else:
        kind = end[0]
        if kind == "cut":
            complete = False
            problems.append(f"recording ends mid-write after {batches} flushes")
        elif kind == "eof":
            complete = False
            problems.append(f"recording was not closed (no end marker) after {batches} "
                            f"flushes")
        elif kind == "bad":
            complete = False
            problems.append(f"batch {batches + 1}: {_oneline(end[2], 100)} at byte {end[1]}; "
                            f"the recording is read up to batch {batches}")
        elif end[1]:
            complete = False
            problems.append(f"{_size(end[1])} after the end marker ignored")

    tables = {}
    for name, typ in fmt.table_types().items():
        # each table's decoded batches let go once it is made: peak = the file's data + one table
        tables[name] = _table(name, [] if name in defer else parts.pop(name, None) or [], typ,
                              dropped)
    for name, n in dropped.items():
        problems.append(f"table {name}: {n} row(s) with missing values ignored (corrupt)")
    for name in tables:  # ANY_TABLE_RULES hold for every table, ROW_RULES for theirs
        tables[name] = _apply_rules(name, tables[name], problems)
    tables["notes"] = _clean_notes(tables["notes"], problems)
    rec = Recording(path, meta, version, tables, complete, batches, problems)
    if defer:
        rec.deferred = {n: counts.get(n, 0) for n in _TYPES if n in defer}
        rec._source = ((st.st_dev, st.st_ino, size), batch_frames[:batches], version, decode)
    return rec
