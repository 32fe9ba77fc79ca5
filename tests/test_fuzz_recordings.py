"""Fuzzing the recording reader: no file may crash kvmtrace.

Every case takes a committed fixture (tests/fixtures/*.kvt, arm64/*.kvt) or a
version-2 recording made from one by the current writer, mutates it with a
seeded random generator, and runs one entry point on it: ``report`` (text,
json, csv with a --table), ``diff`` against the unmutated file, or
``kvmtrace.load``. The case must end in a report (exit 0) or in exit 2 with
one line on stderr (load: a one-line RecordingError): never a signal, a
traceback, more than one line, a hang, or more memory than twice the peak RSS
of reporting the largest valid fixture.

Mutations: byte level (bit flips, interesting values over header words,
truncation, inserted / deleted bytes, a body length set huge over a sparse
file, duplicated / dropped / swapped / appended messages, no end marker) and
structure aware, re-sealed with valid checksums so that what lies behind the
checksum is reached too (garbage or mistyped meta JSON, bad versions, wrong
column types, missing or unknown columns, extreme values, nulls, duplicated
and shuffled rows, markup and control characters in strings, bad notes,
batches out of sequence, corrupt Arrow buffers behind a valid checksum).

Cases run in long-lived worker processes (``python tests/test_fuzz_recordings.py
--worker CORPUS SCRATCH``), so a native crash ends one worker and is reported
with its case number instead of ending the test run; the CLI runs in-process
through click's CliRunner, calling the code the ``kvmtrace`` command calls.
Every case's file is read and validated by the reader (the layer under test);
a file the reader refuses goes on through its entry point, which must then
end in one line (cheap: it stops at the reader). The analysis and views cost
20 to 50 times what the reader does, so of the files the reader accepts a
fixed, seeded share goes through the entry point (KVMTRACE_FUZZ_FULL, default
3%, 2.5 times that for the mutations aimed behind the checksum); a decoded
recording equal to one a worker already took through the same entry point
is not analysed again (the analysis is deterministic).

Reproduce a case: ``python tests/test_fuzz_recordings.py --case N`` (keeps
the mutated file and prints what happened). Environment: KVMTRACE_FUZZ_CASES
(default 10000), KVMTRACE_FUZZ_SEED, KVMTRACE_FUZZ_WORKERS, KVMTRACE_FUZZ_FULL
(1: every case to the end, a soak of about 2 cases/s per core).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from kvmtrace.recording import format as fmt  # noqa: E402

CASES = int(os.environ.get("KVMTRACE_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("KVMTRACE_FUZZ_SEED", "20261201"))
WORKERS = int(os.environ.get("KVMTRACE_FUZZ_WORKERS", "0")) or max(2, min(4, os.cpu_count() or 2))
# Share of accepted files that go on through the analysis and a view (see
# full_run); 1 runs every case to the end (a soak: about 2 cases/s per core).
FULL_SHARE = float(os.environ.get("KVMTRACE_FUZZ_FULL", "0.03"))
CASE_TIMEOUT = 60.0          # seconds; a hang is a failure
# CPU seconds (this process, user + system) to read a file declaring a huge body
# over a hole: reading the hole would cost that whatever the load; wall time
# would not (2.77 s measured once for this case with the host loaded 8.7)
SPARSE_CASE_LIMIT = 2.0

V2_SOURCES = ("x86-pvm-demo.kvt", "arm64/cbar-7.x.kvt")
# Re-written with every batch compressed (schema version 3; the writer leaves
# small batches uncompressed, so the fixtures' own batches would not be).
COMPRESSED_SOURCES = ("x86-pvm-demo.kvt",)


def fixture_paths() -> list[Path]:
    return sorted(FIXTURES.glob("*.kvt")) + sorted((FIXTURES / "arm64").glob("*.kvt"))


# -- corpus ---------------------------------------------------------------------

def rewrite_v2(src: Path, dst: Path, compress_all: bool = False):
    """``src`` re-written by the current writer (version 2 or later, sealed
    batches), batch for batch; ``compress_all``: every batch compressed."""
    from kvmtrace.recording import writer as writer_mod
    from kvmtrace.recording.writer import RecordingWriter

    if compress_all:
        saved, writer_mod.COMPRESS_FROM = writer_mod.COMPRESS_FROM, 0
        try:
            return rewrite_v2(src, dst)
        finally:
            writer_mod.COMPRESS_FROM = saved
    with pa.ipc.open_stream(pa.py_buffer(src.read_bytes())) as r:
        meta = json.loads(r.schema.metadata[fmt.META_KEY])
        w = RecordingWriter(str(dst), meta)
        for b in r:
            for i, name in enumerate(b.schema.names):
                typ = w.types[name]  # fields an older recording lacks: zeros
                rows = [{f.name: row.get(f.name, "" if pa.types.is_string(f.type) else 0)
                         for f in typ} for row in b.column(i).flatten().to_pylist()]
                if rows:
                    w.add_rows(name, rows)
            w.flush(force=True)
        w.close()


def make_corpus(d: Path) -> dict[str, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for p in fixture_paths():
        out[str(p.relative_to(FIXTURES))] = p.read_bytes()
    for prefix, names, compress_all in (("v2-", V2_SOURCES, False),
                                        ("v2-z-", COMPRESSED_SOURCES, True)):
        for name in names:
            dst = d / (prefix + name.replace("/", "-"))
            if not dst.exists():  # made aside and renamed: workers may look at once
                tmp = d / f".{dst.name}.{os.getpid()}"
                rewrite_v2(FIXTURES / name, tmp, compress_all)
                os.replace(tmp, dst)
            out[dst.name] = dst.read_bytes()
    return out


class Src:
    """A corpus file and what mutations need to know of it."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data
        self.frames = []  # (offset, metadata length, body length)
        pos = 0
        while pos + 8 <= len(data):
            _, n = struct.unpack_from("<Ii", data, pos)
            if n == 0:
                break
            info = fmt.parse_message(data[pos + 8:pos + 8 + n])
            self.frames.append((pos, n, info.body_length))
            pos += 8 + n + info.body_length
        self.eos = pos
        self._decoded = None

    @property
    def decoded(self):
        """(schema, [batches]) as Arrow reads the unmutated file."""
        if self._decoded is None:
            with pa.ipc.open_stream(pa.py_buffer(self.data)) as r:
                self._decoded = (r.schema, list(r))
        return self._decoded

    def message(self, i: int) -> bytes:
        off, n, body = self.frames[i]
        return self.data[off:off + 8 + n + body]


# -- byte-level mutations ----------------------------------------------------------

INTERESTING32 = [0, 1, 7, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                 0xFFFFFFFF, 0xFFFFFFF8]
INTERESTING64 = [0, 1, 8, 1 << 31, 1 << 32, (1 << 62), (1 << 63) - 1, (1 << 63), (1 << 64) - 1,
                 (1 << 64) - 8]


def _pos_in_metadata(rng, src: Src) -> int:
    off, n, _ = rng.choice(src.frames)
    return off + rng.randrange(0, 8 + n)


def m_flip(rng, src):
    d = bytearray(src.data)
    k = rng.choice((1, 1, 1, 2, 3, 8))
    where = []
    for _ in range(k):
        p = _pos_in_metadata(rng, src) if rng.random() < 0.4 else rng.randrange(len(d))
        d[p] ^= 1 << rng.randrange(8)
        where.append(p)
    return bytes(d), 0, f"flip bits at {where}"


def m_word(rng, src):
    d = bytearray(src.data)
    p = _pos_in_metadata(rng, src) if rng.random() < 0.7 else rng.randrange(len(d) - 8)
    p = min(p - p % 4, len(d) - 8)
    if rng.random() < 0.5:
        v = rng.choice(INTERESTING32)
        struct.pack_into("<I", d, p, v)
    else:
        v = rng.choice(INTERESTING64)
        struct.pack_into("<Q", d, p, v)
    return bytes(d), 0, f"word {v:#x} at {p}"


def m_truncate(rng, src):
    n = rng.randrange(1, len(src.data))
    return src.data[:n], 0, f"truncate to {n}"


def m_insert(rng, src):
    p = rng.randrange(len(src.data))
    junk = bytes(rng.randrange(256) for _ in range(rng.choice((1, 3, 8, 64))))
    return src.data[:p] + junk + src.data[p:], 0, f"insert {len(junk)} bytes at {p}"


def m_delete(rng, src):
    p = rng.randrange(len(src.data))
    n = rng.choice((1, 3, 8, 64, 1000))
    return src.data[:p] + src.data[p + n:], 0, f"delete {n} bytes at {p}"


def body_length_pos(src: Src, i: int) -> int | None:
    off, n, _ = src.frames[i]
    fb = fmt._Flat(src.data[off + 8:off + 8 + n])
    p = fb.field(fb.root(), 3)
    return None if p is None else off + 8 + p


def m_huge_body(rng, src):
    """A batch declares a huge body; the file is extended with a hole to hold it."""
    i = rng.randrange(1, len(src.frames))
    p = body_length_pos(src, i)
    if p is None:
        return m_word(rng, src)
    v = rng.choice((1 << 31, 2 << 30, 3 << 30, 1 << 40, (1 << 63) - 1))
    d = bytearray(src.data)
    struct.pack_into("<q", d, p, v)
    off, n, body = src.frames[i]
    extra = off + 8 + n + v - len(d) + 8 if v <= 4 << 30 and rng.random() < 0.8 else 0
    return bytes(d), max(0, extra), f"batch {i} body length {v:#x}, sparse extension {extra}"


def m_meta_len(rng, src):
    i = rng.randrange(len(src.frames))
    off = src.frames[i][0]
    d = bytearray(src.data)
    v = rng.choice((-1, -8, 0, 1, 7, 9, 1 << 30, 0x7FFFFFFF, src.frames[i][1] + 8))
    struct.pack_into("<i", d, off + 4, v)
    return bytes(d), 0, f"message {i} metadata length {v}"


def m_messages(rng, src):
    """Duplicate, drop, swap or append messages; drop the end marker."""
    msgs = [src.message(i) for i in range(len(src.frames))]
    tail = src.data[src.eos:]
    op = rng.choice(("dup", "drop", "swap", "append", "no-eos", "dup-schema", "garbage-tail"))
    if op == "dup" and len(msgs) > 1:
        i = rng.randrange(1, len(msgs))
        msgs.insert(rng.randrange(1, len(msgs) + 1), msgs[i])
    elif op == "drop" and len(msgs) > 1:
        del msgs[rng.randrange(1, len(msgs))]
    elif op == "swap" and len(msgs) > 2:
        i, j = rng.sample(range(1, len(msgs)), 2)
        msgs[i], msgs[j] = msgs[j], msgs[i]
    elif op == "append":
        tail = tail + src.message(rng.randrange(len(src.frames)))
    elif op == "no-eos":
        tail = b""
    elif op == "dup-schema":
        msgs.insert(rng.randrange(1, len(msgs) + 1), msgs[0])
    else:
        tail = tail + bytes(rng.randrange(256) for _ in range(rng.choice((1, 8, 100))))
    return b"".join(msgs) + tail, 0, f"messages: {op}"


def crc_value_pos(meta: bytes):
    """Offset of the kvmtrace.crc32 value string inside a batch's metadata."""
    fb = fmt._Flat(meta)
    t = fb.root()
    kv = fb.ref(t, 4)
    if kv is None:
        return None
    start, n = fb.vector(kv, 4)
    for i in range(n):
        p = start + 4 * i
        e = fb.table(p + fb._get("<I", p))
        k, v = fb.ref(e, 0), fb.ref(e, 1)
        if k is not None and v is not None and fb.string(k) == fmt.CRC_KEY:
            return v + 4
    return None


def reseal_bytes(d: bytearray, off: int) -> bool:
    """Recompute the checksum of the batch message at ``off`` in place."""
    try:
        (n,) = struct.unpack_from("<i", d, off + 4)
        meta = bytes(d[off + 8:off + 8 + n])
        info = fmt.parse_message(meta)
        seq = int(info.custom[fmt.SEQ_KEY])
        body = bytes(d[off + 8 + n:off + 8 + n + info.body_length])
        p = crc_value_pos(meta)
        if p is None or info.batch is None:
            return False
        d[off + 8 + p:off + 8 + p + 8] = fmt.batch_checksum(seq, info.batch, body)
        return True
    except (KeyError, ValueError, struct.error, fmt.FormatError):
        return False


def m_flip_resealed(rng, src):
    """Bytes of one batch's header or body changed, checksum recomputed: what
    the checksum cannot see (a bug in the writer, or a forged file) must still
    be caught by Arrow's validation."""
    if src.name.startswith("v2-") is False or len(src.frames) < 2:
        return m_flip(rng, src)
    i = rng.randrange(1, len(src.frames))
    off, n, body = src.frames[i]
    d = bytearray(src.data)
    for _ in range(rng.choice((1, 1, 2, 4))):
        if rng.random() < 0.5 or not body:
            p = off + 8 + rng.randrange(n)
        else:
            p = off + 8 + n + rng.randrange(body)
        if rng.random() < 0.5:
            d[p] ^= 1 << rng.randrange(8)
        else:
            q = min(p - p % 8, len(d) - 8)
            struct.pack_into("<Q", d, q, rng.choice(INTERESTING64))
    ok = reseal_bytes(d, off)
    return bytes(d), 0, f"batch {i} changed and resealed ({ok})"


# -- structure-aware mutations (valid Arrow, valid checksums) ---------------------

WEIRD_VALUES = [None, True, False, -1, 0, 1 << 63, 1 << 64, -(1 << 63), 1.5, float("nan"),
                float("inf"), "", "x", "[/]", "[bold red]boom", "\x1b[31mred", "6.1", "7.3.4",
                [], [1, 2], ["a"], {}, {"a": 1}, {"start": -1, "end": 5}, [{"start": 1}],
                [{"start": 0, "end": 1 << 70}], "a" * 3000]
META_PATHS = [("kernel",), ("host",), ("arch",), ("kvm",), ("kvm", "spte_format"),
              ("kvm", "vendor"), ("kvm", "mmu"), ("clock",), ("clock", "monotonic_ns"),
              ("ram",), ("x86",), ("x86", "pat"), ("x86", "pat", "entries"),
              ("x86", "pat_memtype_list"), ("x86", "ram"), ("arm64",), ("arm64", "fwb"),
              ("arm64", "dic"), ("btf",), ("btf", "enums"), ("btf", "enums", "kvm_pgtable_prot"),
              ("probes",), ("probes", "attached"), ("probes", "unavailable"), ("page_size",)]
GARBAGE_META = [b"", b"{", b"[]", b"null", b"1", b'"x"', b"\xff\xfe", b"[" * 100000,
                b'{"a": ' * 5000, b"1" * 50000, b"NaN", b'{"kernel": "6.1"}',
                b'{"kernel": 6.1}', b'{"kernel": "x"}', b'{"kernel": "6.1", "kvm": []}']
VERSIONS = [b"", b"0", b"-1", b"3", b"99999999", b"1\x00", b" 2", b"abc", b"1.0", b"\xff",
            b"1", b"2"]
NOTE_VALUES = ["not json", "[]", "{", '{"elapsed_s": "x"}', '{"lost": {"a": -1}}',
               '{"lost": [1]}', "1e999", "[" * 50000, '{"elapsed_s": NaN}',
               '{"lost": {"a": 1e30}}', '{"stopped_by": 5, "elapsed_s": -1}', '"end"',
               '{"lost": {"a": 18446744073709551615, "b": 1}}', "null", "{}"]
STRINGS = ["", "[/]", "[bold]x", "\x1b[2J", "pf io", "pf", "mm", "ht", "/memfd:x (deleted)",
           "[anon]", "\n\n", "%s%n", "{}", "nan", "ü\u202e", "a" * 2000, "end", "/dev/zero"]


def _meta_set(meta: dict, path: tuple, value):
    cur = meta
    for k in path[:-1]:
        if not isinstance(cur.get(k), dict):
            cur[k] = {}
        cur = cur[k]
    cur[path[-1]] = value


def encode(schema: pa.Schema, batches: list, *, seal: bool = True, seqs=None,
           eos: bool = True) -> bytes:
    """A stream of ``batches`` under ``schema``, each batch sealed with the
    writer's checksum unless ``seal`` is false."""
    from kvmtrace.recording.writer import batch_metadata

    sink = io.BytesIO()
    w = pa.ipc.new_stream(sink, schema)
    for k, b in enumerate(batches):
        seq = k if seqs is None else seqs[k]
        w.write_batch(b, custom_metadata=batch_metadata(b, seq) if seal else None)
    if eos:
        w.close()
    return sink.getvalue()


def header(meta: bytes, version: bytes = b"2", seal: bool = True) -> dict:
    md = {fmt.VERSION_KEY: version, fmt.META_KEY: meta}
    if seal:
        md[fmt.HEADER_CRC_KEY] = fmt.header_checksum(version, meta)
    return md


def _src_meta(src) -> tuple[pa.Schema, list, dict]:
    schema, batches = src.decoded
    return schema, batches, json.loads(schema.metadata[fmt.META_KEY])


def s_meta_type(rng, src):
    schema, batches, meta = _src_meta(src)
    what = []
    for _ in range(rng.choice((1, 1, 2, 4))):
        path = rng.choice(META_PATHS)
        v = rng.choice(WEIRD_VALUES)
        _meta_set(meta, path, v)
        what.append(f"{'.'.join(path)}={str(v)[:20]!r}")
    raw = json.dumps(meta).encode()
    return encode(schema.with_metadata(header(raw)), batches), 0, "meta " + ", ".join(what)


def s_meta_garbage(rng, src):
    schema, batches, _ = _src_meta(src)
    raw = rng.choice(GARBAGE_META)
    seal = rng.random() < 0.8
    return (encode(schema.with_metadata(header(raw, seal=seal)), batches), 0,
            f"meta garbage {raw[:20]!r} sealed={seal}")


def s_version(rng, src):
    schema, batches, _ = _src_meta(src)
    v = rng.choice(VERSIONS)
    md = dict(schema.metadata)
    md[fmt.VERSION_KEY] = v
    if rng.random() < 0.5:
        md[fmt.HEADER_CRC_KEY] = fmt.header_checksum(v, md[fmt.META_KEY])
    elif rng.random() < 0.5:
        md.pop(fmt.HEADER_CRC_KEY, None)
    if rng.random() < 0.3:
        md.pop(fmt.META_KEY, None)
    return encode(schema.with_metadata(md), batches, seal=rng.random() < 0.7), 0, f"version {v!r}"


INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(),
             pa.uint32(), pa.uint64()]
OTHER_TYPES = [pa.float64(), pa.string(), pa.bool_(), pa.binary(), pa.list_(pa.int32()),
               pa.large_string(), pa.timestamp("ns"), pa.null()]


def rand_array(rng, typ: pa.DataType, n: int) -> pa.Array:
    if pa.types.is_integer(typ):
        info = (0, (1 << typ.bit_width) - 1) if pa.types.is_unsigned_integer(typ) else \
            (-(1 << (typ.bit_width - 1)), (1 << (typ.bit_width - 1)) - 1)
        vals = [rng.choice((info[0], info[1], 0, 1, rng.randint(*info))) for _ in range(n)]
        return pa.array(vals, type=typ)
    if pa.types.is_floating(typ):
        return pa.array([rng.choice((0.0, -1.0, float("nan"), float("inf"), 1e300))
                         for _ in range(n)], type=typ)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return pa.array([rng.choice(STRINGS) for _ in range(n)], type=typ)
    if pa.types.is_binary(typ):
        return pa.array([bytes([rng.randrange(256)]) * rng.randrange(4) for _ in range(n)],
                        type=typ)
    if pa.types.is_boolean(typ):
        return pa.array([rng.random() < 0.5 for _ in range(n)], type=typ)
    if pa.types.is_struct(typ):
        return pa.StructArray.from_arrays([rand_array(rng, f.type, n) for f in typ],
                                          fields=list(typ))
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        sizes = [rng.randrange(3) for _ in range(n)]
        offs = [0]
        for s in sizes:
            offs.append(offs[-1] + s)
        values = rand_array(rng, typ.value_type, offs[-1])
        cls = pa.LargeListArray if pa.types.is_large_list(typ) else pa.ListArray
        return cls.from_arrays(pa.array(offs, type=pa.int64() if cls is pa.LargeListArray
                                        else pa.int32()), values)
    if pa.types.is_timestamp(typ):
        return pa.array([rng.randrange(1 << 40) for _ in range(n)], type=typ)
    return pa.nulls(n, type=typ)


def _one_row(values: pa.Array, typ) -> pa.Array:
    """A one-row list column holding ``values`` (as the writer makes them)."""
    if pa.types.is_list(typ):
        return pa.ListArray.from_arrays(pa.array([0, len(values)], type=pa.int32()), values)
    if pa.types.is_large_list(typ):
        return pa.LargeListArray.from_arrays(pa.array([0, len(values)], type=pa.int64()),
                                             values)
    return values


def _rebuild(batches: list, fields: list, fill) -> list:
    """Batches under new ``fields``: fill(name, typ, batch) gives each column."""
    return [pa.RecordBatch.from_arrays([fill(f.name, f.type, b) for f in fields],
                                       schema=pa.schema(fields)) for b in batches]


def s_column_type(rng, src):
    """A table of the wrong type, a missing, unknown or duplicated table."""
    schema, batches, _ = _src_meta(src)
    fields = list(schema)
    i = rng.randrange(len(fields))
    f = fields[i]
    st = f.type.value_type
    op = rng.choice(("field-type", "drop-field", "add-field", "rename-field", "not-list",
                     "list-of-int", "large-list", "drop-table", "unknown-table",
                     "dup-table", "reorder"))
    new_type = None
    if op == "field-type":
        k = rng.randrange(st.num_fields)
        t = rng.choice(INT_TYPES + OTHER_TYPES)
        sub = [pa.field(x.name, t) if j == k else x for j, x in enumerate(st)]
        new_type = pa.list_(pa.struct(sub))
    elif op == "drop-field" and st.num_fields > 1:
        k = rng.randrange(st.num_fields)
        new_type = pa.list_(pa.struct([x for j, x in enumerate(st) if j != k]))
    elif op == "add-field":
        new_type = pa.list_(pa.struct(list(st) + [pa.field("bogus", rng.choice(INT_TYPES))]))
    elif op == "rename-field":
        k = rng.randrange(st.num_fields)
        new_type = pa.list_(pa.struct([pa.field(x.name + "x", x.type) if j == k else x
                                       for j, x in enumerate(st)]))
    elif op == "not-list":
        new_type = st
    elif op == "list-of-int":
        new_type = pa.list_(pa.int64())
    elif op == "large-list":
        new_type = pa.large_list(st)
    if new_type is not None:
        fields[i] = pa.field(f.name, new_type)
    elif op == "drop-table":
        del fields[i]
    elif op == "unknown-table":
        fields.append(pa.field(rng.choice(("bogus", "mmio ", "", "memslot\n")), pa.list_(st)))
    elif op == "dup-table":
        fields.append(fields[i])
    else:
        rng.shuffle(fields)
    orig = {x.name: j for j, x in enumerate(schema)}

    def fill(name, typ, b):
        j = orig.get(name)
        if j is not None and b.schema.field(j).type == typ:
            return b.column(j)
        if pa.types.is_list(typ) or pa.types.is_large_list(typ):
            return _one_row(rand_array(rng, typ.value_type, rng.randrange(4)), typ)
        return rand_array(rng, typ, 1)
    new_schema = pa.schema(fields, metadata=schema.metadata)
    data = encode(new_schema, _rebuild(batches, fields, fill))
    return data, 0, f"column {f.name}: {op}"


def _table_values(b: pa.RecordBatch, j: int) -> pa.StructArray:
    return b.column(j).flatten()


def _mutate_struct(rng, vals: pa.StructArray, typ: pa.StructType, ops: list) -> pa.StructArray:
    n = len(vals)
    cols = {f.name: vals.field(k) for k, f in enumerate(typ)}
    op = rng.choice(("extreme", "extreme", "strings", "dup-rows", "shuffle", "reverse",
                     "nulls", "add-rows", "same", "drop-rows"))
    ops.append(op)
    if op in ("extreme", "same") and n:
        names = [f.name for f in typ]
        for name in rng.sample(names, rng.randint(1, min(3, len(names)))):
            t = typ.field(name).type
            if op == "same":
                v = cols[name][rng.randrange(n)].as_py()
                cols[name] = pa.array([v] * n, type=t)
            else:
                arr = rand_array(rng, t, n).to_pylist()
                keep = cols[name].to_pylist()
                mask = [rng.random() < 0.5 for _ in range(n)]
                cols[name] = pa.array([a if m else k for a, k, m in zip(arr, keep, mask)],
                                      type=t)
    elif op == "strings" and n:
        for f in typ:
            if pa.types.is_string(f.type):
                cols[f.name] = pa.array([rng.choice(STRINGS) if rng.random() < 0.5 else v
                                         for v in cols[f.name].to_pylist()], type=f.type)
    elif op == "dup-rows" and n:
        idx = [rng.randrange(n) for _ in range(min(3000, n * rng.choice((2, 10, 50))))]
        return vals.take(pa.array(sorted(idx) if rng.random() < 0.5 else idx))
    elif op == "shuffle" and n:
        idx = list(range(n))
        rng.shuffle(idx)
        return vals.take(pa.array(idx))
    elif op == "reverse" and n:
        return vals.take(pa.array(list(range(n - 1, -1, -1))))
    elif op == "drop-rows" and n:
        return vals.take(pa.array(sorted(rng.sample(range(n), rng.randrange(n))), type=pa.int64()))
    elif op == "nulls":
        m = max(n, 2)
        if not n:
            cols = {f.name: rand_array(rng, f.type, m) for f in typ}
        names = [f.name for f in typ]
        name = rng.choice(names)
        mask = pa.array([rng.random() < 0.3 for _ in range(m)])
        cols[name] = pa.array([None if x else v for v, x in
                               zip(cols[name].to_pylist(), mask.to_pylist())],
                              type=typ.field(name).type)
        return pa.StructArray.from_arrays([cols[f.name] for f in typ], fields=list(typ),
                                          mask=pa.array([rng.random() < 0.1 for _ in range(m)])
                                          if rng.random() < 0.5 else None)
    elif op == "add-rows" or not n:
        extra = rand_array(rng, typ, rng.choice((1, 5, 50)))
        return pa.concat_arrays([vals, extra]) if n else extra
    return pa.StructArray.from_arrays([cols[f.name] for f in typ], fields=list(typ))


def s_values(rng, src):
    """Valid types, weird content: extreme values, duplicates, reordering,
    nulls, markup in strings, rows added to tables the source had empty."""
    schema, batches, _ = _src_meta(src)
    names = schema.names
    targets = rng.sample(names, rng.choice((1, 1, 2, 3)))
    if rng.random() < 0.5 and "memslot" in names:
        targets.append("memslot")
    bi = {t: rng.randrange(len(batches)) for t in targets}
    ops = []
    out = []
    for k, b in enumerate(batches):
        cols = []
        for j, name in enumerate(names):
            col = b.column(j)
            if bi.get(name) == k:
                typ = schema.field(j).type.value_type
                col = _one_row(_mutate_struct(rng, _table_values(b, j), typ, ops),
                               schema.field(j).type)
            cols.append(col)
        out.append(pa.RecordBatch.from_arrays(cols, schema=schema))
    md = dict(schema.metadata)
    md = header(md[fmt.META_KEY], b"2")
    return encode(schema.with_metadata(md), out), 0, f"values {targets}: {ops}"


def s_notes(rng, src):
    schema, batches, _ = _src_meta(src)
    j = schema.get_field_index("notes")
    k = rng.randrange(len(batches))
    key = rng.choice(("end", "end", "lost_where", "host_load", "smaps_unavailable", "x"))
    value = rng.choice(NOTE_VALUES)
    typ = schema.field(j).type.value_type
    row = pa.array([{"ts": rng.choice((0, 1 << 63, 5)), "key": key, "value": value}], type=typ)
    out = []
    for i, b in enumerate(batches):
        cols = list(b.columns)
        if i == k:
            vals = _table_values(b, j)
            cols[j] = _one_row(pa.concat_arrays([vals, row]), schema.field(j).type)
        out.append(pa.RecordBatch.from_arrays(cols, schema=schema))
    md = header(schema.metadata[fmt.META_KEY], b"2")
    return encode(schema.with_metadata(md), out), 0, f"note {key}={value[:20]!r}"


def s_sequence(rng, src):
    """Batches duplicated, dropped or reordered, sealed with their old or new
    sequence numbers."""
    schema, batches, _ = _src_meta(src)
    idx = list(range(len(batches)))
    op = rng.choice(("dup", "swap", "drop", "reverse"))
    if op == "dup":
        i = rng.randrange(len(idx))
        idx.insert(rng.randrange(len(idx) + 1), i)
    elif op == "swap" and len(idx) > 1:
        a, c = rng.sample(range(len(idx)), 2)
        idx[a], idx[c] = idx[c], idx[a]
    elif op == "drop" and len(idx) > 1:
        del idx[rng.randrange(len(idx))]
    else:
        idx.reverse()
    keep_seq = rng.random() < 0.5
    md = header(schema.metadata[fmt.META_KEY], b"2")
    data = encode(schema.with_metadata(md), [batches[i] for i in idx],
                  seqs=idx if keep_seq else None, eos=rng.random() < 0.9)
    return data, 0, f"sequence {op} keep_seq={keep_seq}"


BYTE_MUTATIONS = [(m_flip, 14), (m_word, 8), (m_truncate, 6), (m_insert, 4), (m_delete, 4),
                  (m_huge_body, 4), (m_meta_len, 3), (m_messages, 6), (m_flip_resealed, 8)]
STRUCT_MUTATIONS = [(s_meta_type, 9), (s_meta_garbage, 3), (s_version, 3), (s_column_type, 6),
                    (s_values, 16), (s_notes, 4), (s_sequence, 4)]
MUTATIONS = BYTE_MUTATIONS + STRUCT_MUTATIONS
# mutations aimed past the reader, at the analysis and the views
BEHIND_CHECKSUM = {"s_meta_type", "s_values", "s_notes", "s_sequence", "m_flip_resealed"}
ACTIONS = [("load", 20), ("text", 25), ("json", 20), ("csv", 20), ("diff", 15)]
TABLES = ["slots", "ops", "faults", "ranges", "verdicts", "errors", "vmas"]


def _pick(rng, weighted):
    total = sum(w for _, w in weighted)
    x = rng.uniform(0, total)
    for item, w in weighted:
        x -= w
        if x <= 0:
            return item
    return weighted[-1][0]


def full_run(i: int, desc: str) -> bool:
    """Whether case ``i`` runs its entry point (analysis and view) on a file the
    reader accepted, or stops after the reader: a fixed share per mutation
    family, drawn from the case's own seed (the analysis costs 20 to 50 times
    what the reader does)."""
    family = desc.split(":", 1)[0]
    share = FULL_SHARE * (2.5 if family in BEHIND_CHECKSUM else 0.5)
    return random.Random(SEED * 7_000_003 + i).random() < share


def make_case(i: int, corpus: dict[str, Src], only=None):
    """(source name, data, sparse extension, mutation description, action, argv);
    None when ``only`` (a set of mutation names) does not hold this case's."""
    rng = random.Random(SEED * 1_000_003 + i)
    name = rng.choice(sorted(corpus))
    src = corpus[name]
    mutate = _pick(rng, MUTATIONS)
    if only is not None and mutate.__name__ not in only:
        return None
    data, extra, desc = mutate(rng, src)
    action = _pick(rng, ACTIONS)
    argv = None
    if action == "text":
        argv = ["report", "{path}"]
    elif action == "json":
        argv = ["report", "{path}", "--format", "json"] + (
            ["--table", rng.choice(TABLES)] if rng.random() < 0.3 else [])
    elif action == "csv":
        argv = ["report", "{path}", "--format", "csv", "--table", rng.choice(TABLES)]
    elif action == "diff":
        argv = ["diff", "{orig}", "{path}"] if rng.random() < 0.5 else ["diff", "{path}", "{orig}"]
        argv += ["--format", rng.choice(("text", "json"))]
    return name, data, extra, f"{mutate.__name__}: {desc}", action, argv


# -- regression cases: small files, each a bug found (and fixed) by fuzzing -----

def _v2(corpus) -> Src:
    return corpus["v2-x86-pvm-demo.kvt"]


def r_checksum(corpus):
    src = _v2(corpus)
    off, n, body = src.frames[-1]
    d = bytearray(src.data)
    d[off + 8 + n + body // 2] ^= 0x04
    return bytes(d), 0


def r_sparse(corpus):
    src = _v2(corpus)
    p = body_length_pos(src, 1)
    d = bytearray(src.data)
    struct.pack_into("<q", d, p, 2 << 30)
    return bytes(d), 2 << 30


def r_list_offsets(corpus):
    """List offsets pointing past the struct values, checksum resealed (the
    reader before validation: SIGABRT, Arrow's "Check failed: (off) <= (length)
    Slice offset (571) greater than array length (563)")."""
    src = _v2(corpus)
    off, n, body = src.frames[-1]
    schema, batches = src.decoded
    rows = len(batches[-1].column(schema.get_field_index("vmas")).values)
    # the list offsets buffer of the vmas column holds exactly [0, rows]
    needle = struct.pack("<ii", 0, rows)
    p = src.data.find(needle, off + 8 + n, off + 8 + n + body)
    assert p > 0
    d = bytearray(src.data)
    d[p:p + 8] = struct.pack("<ii", rows + 8, rows + 16)
    assert reseal_bytes(d, off)
    return bytes(d), 0


def r_meta_pat_entries(corpus):
    src = corpus["x86-pvm-demo.kvt"]
    schema, batches = src.decoded
    meta = json.loads(schema.metadata[fmt.META_KEY])
    meta["x86"]["pat"]["entries"] = ["WB"]
    meta["clock"]["monotonic_ns"] = "soon"
    return encode(schema.with_metadata(header(json.dumps(meta).encode())), batches), 0


def r_meta_not_json(corpus):
    schema, batches = _v2(corpus).decoded
    return encode(schema.with_metadata(header(b"[" * 100000)), batches), 0


def r_end_note(corpus):
    schema, batches = _v2(corpus).decoded
    j = schema.get_field_index("notes")
    typ = schema.field(j).type.value_type
    row = pa.array([{"ts": 1, "key": "end", "value": '{"elapsed_s": "x", "lost": [1]}'},
                    {"ts": 2, "key": "end", "value": "not json"}], type=typ)
    b = batches[-1]
    cols = list(b.columns)
    cols[j] = _one_row(pa.concat_arrays([b.column(j).flatten(), row]), schema.field(j).type)
    out = batches[:-1] + [pa.RecordBatch.from_arrays(cols, schema=schema)]
    return encode(schema.with_metadata(header(schema.metadata[fmt.META_KEY])), out), 0


def r_duplicated_batch(corpus):
    schema, batches = _v2(corpus).decoded
    return encode(schema.with_metadata(header(schema.metadata[fmt.META_KEY])),
                  batches + [batches[-1]], seqs=list(range(len(batches))) + [len(batches) - 1]), 0


def _edit_table(corpus, table: str, edit) -> bytes:
    """The v2 x86 recording with ``edit(list of row dicts)`` applied to the
    rows of ``table`` in its last batch holding any, re-sealed."""
    schema, batches = _v2(corpus).decoded
    j = schema.get_field_index(table)
    k = max(i for i, b in enumerate(batches) if len(b.column(j).values)) \
        if any(len(b.column(j).values) for b in batches) else len(batches) - 1
    typ = schema.field(j).type
    rows = batches[k].column(j).flatten().to_pylist()
    edit(rows)
    cols = list(batches[k].columns)
    cols[j] = _one_row(pa.array(rows, type=typ.value_type), typ)
    out = list(batches)
    out[k] = pa.RecordBatch.from_arrays(cols, schema=schema)
    return encode(schema.with_metadata(header(schema.metadata[fmt.META_KEY])), out)


def r_slot_wraps(corpus):
    """A successful memslot whose HVA range wraps past 2^64 (was OverflowError
    in analysis.faults.attribute)."""
    def edit(rows):
        ok = [r for r in rows if r["ret"] >= 0 and r["size"]]
        ok[0]["hva"] = (1 << 64) - 4096
        ok[1]["gpa"] = (1 << 64) - 4096
    return _edit_table(corpus, "memslot", edit), 0


def r_vma_prot_bit63(corpus):
    """A memslot whose VMA was captured at the ioctl with vm_page_prot bit 63
    set, next to slots without one (was TypeError in analysis.vmas: the
    column went through float64, losing the low bits first)."""
    def edit(rows):
        r = next(r for r in rows if r["ret"] >= 0 and r["size"])
        r.update(vma_status=1, vma_start=r["hva"], vma_end=r["hva"] + r["size"],
                 vm_page_prot=(1 << 64) - 1, vm_flags=0xfb, vma_count=1, vma_covers=1)
    return _edit_table(corpus, "memslot", edit), 0


def r_pgtable_enum(corpus):
    """An arm64 recording whose BTF enum lacks the members the stage-2
    decoder needs (was TypeError in memtype.arm64.stage2_prot_decode)."""
    schema, batches = corpus["arm64/demo-7.x.kvt"].decoded
    meta = json.loads(schema.metadata[fmt.META_KEY])
    meta["btf"]["enums"]["kvm_pgtable_prot"] = {"a": 1}
    return encode(schema.with_metadata(header(json.dumps(meta).encode())), batches), 0


def r_field_name_not_utf8(corpus):
    """A table name that is not UTF-8 (was UnicodeDecodeError from pyarrow)."""
    src = _v2(corpus)
    off, n, _ = src.frames[0]
    d = bytearray(src.data)
    p = src.data.find(struct.pack("<I", 7) + b"memslot", off, off + 8 + n)  # flatbuffer string
    d[p + 4] = 0xFF
    return bytes(d), 0


# name: (make file, action, expectation: "ok" / "error", text the outcome must contain)
REGRESSIONS = {
    "slot-range-wraps": (r_slot_wraps, "text", "ok", "impossible row(s) ignored"),
    "vma-prot-bit63": (r_vma_prot_bit63, "json", "ok", ""),
    "pgtable-enum": (r_pgtable_enum, "text", "ok", "btf.enums.kvm_pgtable_prot"),
    "field-name-not-utf8": (r_field_name_not_utf8, "csv", "error", "not UTF-8"),
    "checksum": (r_checksum, "json", "ok", "checksum mismatch (corrupted on disk)"),
    "sparse-2GiB-body": (r_sparse, "text", "ok", "sparse file"),
    "list-offsets-behind-checksum": (r_list_offsets, "csv", "ok", "corrupt ("),
    "meta-wrong-types": (r_meta_pat_entries, "text", "ok", "x86.pat.entries"),
    "meta-deep-json": (r_meta_not_json, "load", "error", "not valid JSON"),
    "end-note": (r_end_note, "json", "ok", "not valid JSON"),
    "duplicated-batch": (r_duplicated_batch, "json", "ok", "duplicated or moved"),
}


# -- the worker -------------------------------------------------------------------

def _hwm_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _fingerprint(rec) -> str:
    import pandas as pd

    h = hashlib.sha1()
    h.update(repr((rec.schema_version, rec.complete, rec.batches, rec.problems)).encode())
    h.update(json.dumps(rec.meta, sort_keys=True, default=str).encode())
    for name, df in sorted(rec.tables.items()):
        h.update(f"{name}:{list(df.columns)}:{list(map(str, df.dtypes))}:{len(df)}".encode())
        if len(df):
            h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()


def _classify(exit_code, exception, stderr: str) -> tuple[str, str]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if exception is not None and not isinstance(exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(type(exception), exception,
                                                exception.__traceback__))
        return "traceback", tb[-3000:]
    if exit_code == 0:
        # allowed on success: where the output went, and the one-line warning
        # that the recording is incomplete or damaged
        return ("ok", "") if not lines or all(
            ln.startswith(("kvmtrace: wrote", "kvmtrace: warning:")) for ln in lines) \
            else ("stderr-on-success", stderr[-2000:])
    if exit_code == 2:
        if len(lines) == 1 and "Traceback" not in stderr:
            return "error", lines[0]
        return "error-lines", stderr[-2000:]
    return "exit", f"exit {exit_code}: {stderr[-2000:]}"


def run_action(action: str, argv, path: str, orig: str) -> tuple[str, str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if action == "load":
            import kvmtrace
            from kvmtrace.recording.reader import RecordingError

            try:
                kvmtrace.load(path)
                out = ("ok", "")
            except RecordingError as e:
                msg = str(e)
                out = ("error", msg) if msg and "\n" not in msg else ("error-lines", msg)
            except Exception as e:  # noqa: BLE001 - the point: anything else is a bug
                out = _classify(1, e, "")
        else:
            from click.testing import CliRunner

            from kvmtrace.cli import main

            args = [a.format(path=path, orig=orig) for a in argv]
            r = CliRunner().invoke(main, args, catch_exceptions=True)
            out = _classify(r.exit_code, r.exception, r.stderr)
    warned = [f"{w.category.__name__}: {w.message} ({os.path.basename(w.filename)}:{w.lineno})"
              for w in caught]
    if warned and out[0] == "ok":
        return "warning", "; ".join(dict.fromkeys(warned))[:2000]
    return out


class Worker:
    """State of one worker process: the corpus, the case file, the cache."""

    def __init__(self, corpus_dir: Path, scratch: str | None = None):
        self.corpus = {k: Src(k, v) for k, v in make_corpus(corpus_dir).items()}
        self.tmp = tempfile.mkdtemp(prefix="kvmtrace-fuzz-", dir=scratch)
        self.path = os.path.join(self.tmp, "case.kvt")
        self.cache: dict = {}
        self.origs = {}
        for name, src in self.corpus.items():
            p = os.path.join(self.tmp, "orig-" + name.replace("/", "-"))
            with open(p, "wb") as f:
                f.write(src.data)
            self.origs[name] = p

    def write(self, data: bytes, extra: int):
        with open(self.path, "wb") as f:
            f.write(data)
            if extra:
                f.truncate(len(data) + extra)

    def run(self, data, extra, action, argv, name, full: bool = True) -> dict:
        """Read the file (every case); run the entry point when ``full`` or
        when the reader refused the file (then the entry point must end in one
        line, exit 2)."""
        from kvmtrace.recording.reader import RecordingError, read

        self.write(data, extra)
        t0, c0 = time.monotonic(), time.process_time()
        _hwm_reset()
        key, reader_out = None, None
        try:
            rec = read(self.path)
            reader_out = ("ok", "")
            if full:
                key = (_fingerprint(rec), action, tuple(argv or ()), name)
            del rec
        except RecordingError as e:
            msg = str(e)
            reader_out = ("error", msg) if msg and "\n" not in msg else ("error-lines", msg)
            full = True  # cheap: the entry point stops at the reader
        except Exception as e:  # noqa: BLE001 - the reader must raise nothing else
            reader_out = _classify(1, e, "")
            full = False
        read_secs, read_cpu = time.monotonic() - t0, time.process_time() - c0
        dedup = False
        if not full:
            outcome, detail = reader_out
        elif key is not None and key in self.cache:
            outcome, detail = self.cache[key]
            dedup = True
        else:
            outcome, detail = run_action(action, argv, self.path, self.origs[name])
            if key is not None:
                self.cache[key] = (outcome, detail)
        secs, cpu = time.monotonic() - t0, time.process_time() - c0
        hwm = _status_kb("VmHWM")
        if extra:
            os.truncate(self.path, 0)
        return {"outcome": outcome, "detail": detail, "secs": round(secs, 4), "hwm_kb": hwm,
                "read_secs": round(read_secs, 4), "cpu": round(cpu, 4),
                "read_cpu": round(read_cpu, 4), "dedup": dedup, "sparse": bool(extra),
                "full": full}

    def case(self, i: int) -> dict:
        try:
            name, data, extra, desc, action, argv = make_case(i, self.corpus)
        except Exception as e:  # noqa: BLE001 - a bug of this test, reported as a failure
            return {"id": i, **dict(zip(("outcome", "detail"), _classify(1, e, ""))),
                    "mutation": "making the case failed", "secs": 0, "hwm_kb": 0}
        res = self.run(data, extra, action, argv, name, full=full_run(i, desc))
        res.update(id=i, corpus=name, mutation=desc[:300], action=action, argv=argv)
        return res

    def regression(self, rname: str) -> dict:
        """Run a regression case; for a readable file, ``detail`` is the
        problems the reader found (what the report's notes show)."""
        from kvmtrace.recording.reader import read

        make, action, _, _ = REGRESSIONS[rname]
        data, extra = make(self.corpus)
        argv = {"text": ["report", "{path}"], "json": ["report", "{path}", "--format", "json"],
                "csv": ["report", "{path}", "--format", "csv"], "load": None}[action]
        res = self.run(data, extra, action, argv, "v2-x86-pvm-demo.kvt")
        if res["outcome"] == "ok":
            self.write(data, extra)
            res["detail"] = "; ".join(read(self.path).problems)
            if extra:
                os.truncate(self.path, 0)
        res.update(id=rname, action=action)
        return res


def scratch_dir() -> str:
    """Where cases are written: tmpfs when there is one (no disk writes)."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="kvmtrace-fuzz-", dir=shm)


def worker_main(corpus_dir: str, scratch: str):
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    w = Worker(Path(corpus_dir), scratch)
    proto.write(json.dumps({"ready": True, "rss_kb": _status_kb("VmRSS")}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if "abort" in req:  # the harness's own test: a native crash mid-case
            os.abort()
        if "case" in req:
            res = w.case(req["case"])
        elif "regression" in req:
            res = w.regression(req["regression"])
        else:
            break
        proto.write(json.dumps(res, default=str) + "\n")


# -- the parent -------------------------------------------------------------------

class Pool:
    def __init__(self, n: int, corpus_dir: Path, log_dir: Path):
        self.corpus_dir, self.log_dir = corpus_dir, log_dir
        self.scratch = scratch_dir()  # removed by close(), whatever the workers left
        self.procs = [self._spawn(k) for k in range(n)]

    def _spawn(self, k: int):
        err = open(self.log_dir / f"worker-{k}-{time.monotonic_ns()}.err", "w+")
        p = subprocess.Popen([sys.executable, __file__, "--worker", str(self.corpus_dir),
                              self.scratch],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                             text=True, bufsize=1, cwd=ROOT)
        p.errfile = err
        ready = p.stdout.readline()
        if not ready:
            err.seek(0)
            raise RuntimeError("fuzz worker did not start: " + err.read()[-3000:])
        p.busy = None
        return p

    def _dead(self, k: int, req: dict, why: str) -> dict:
        p = self.procs[k]
        p.kill()
        rc = p.wait()
        p.errfile.seek(0)
        tail = p.errfile.read()[-3000:]
        self.procs[k] = self._spawn(k)
        return {**req, "id": req.get("case", req.get("regression")), "outcome": why,
                "detail": f"returncode {rc}; stderr: {tail}", "secs": 0, "hwm_kb": 0,
                "dedup": False}

    def run(self, requests: list[dict], on_result):
        pending = list(reversed(requests))
        started = {}
        while pending or any(p.busy for p in self.procs):
            for k, p in enumerate(self.procs):
                if p.busy is None and pending:
                    req = pending.pop()
                    p.busy = req
                    started[k] = time.monotonic()
                    p.stdin.write(json.dumps(req) + "\n")
                    p.stdin.flush()
            busy = {p.stdout.fileno(): k for k, p in enumerate(self.procs) if p.busy}
            ready, _, _ = select.select(list(busy), [], [], 1.0)
            for fd in ready:
                k = busy[fd]
                p = self.procs[k]
                req = p.busy
                line = p.stdout.readline()
                if not line:
                    p.wait()
                    res = self._dead(k, req, f"signal {-p.returncode}" if p.returncode < 0
                                     else f"worker exit {p.returncode}")
                else:
                    res = json.loads(line)
                    p.busy = None
                on_result(res)
            now = time.monotonic()
            for k, p in enumerate(self.procs):
                if p.busy and now - started[k] > CASE_TIMEOUT:
                    on_result(self._dead(k, p.busy, "timeout"))

    def close(self):
        for p in self.procs:
            try:
                p.stdin.write(json.dumps({"quit": True}) + "\n")
                p.stdin.close()
                p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


def baseline_peak_kb() -> int:
    """Peak RSS of ``kvmtrace report`` on the largest committed fixture."""
    largest = max(fixture_paths(), key=lambda p: p.stat().st_size)
    p = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "report", str(largest)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode == 0
    return ru.ru_maxrss


GOOD = ("ok", "error")


def _summary_plugin(config, lines: list[str]):
    class _Summary:
        def pytest_terminal_summary(self, terminalreporter):
            terminalreporter.section("kvmtrace fuzz", sep="-")
            for line in lines:
                terminalreporter.write_line(line)

    if not config.pluginmanager.has_plugin("kvmtrace-fuzz-summary"):
        config.pluginmanager.register(_Summary(), "kvmtrace-fuzz-summary")


SUMMARY: list[str] = []


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    make_corpus(d / "corpus")  # once, before the workers read it
    (d / "logs").mkdir()
    p = Pool(WORKERS, d / "corpus", d / "logs")
    yield p
    p.close()


def test_native_crash_is_caught(pool):
    """A worker killed by a signal mid-case is reported with that case, and
    a new worker takes the next case."""
    results = []
    pool.run([{"abort": True, "case": "self-test"}, {"regression": "checksum"}], results.append)
    assert sorted(r["outcome"] for r in results) == ["ok", "signal 6"], results
    assert next(r for r in results if r["outcome"] == "signal 6")["id"] == "self-test"


def test_regressions(pool):
    results = {}
    pool.run([{"regression": name} for name in REGRESSIONS],
             lambda r: results.__setitem__(r["id"], r))
    bad = []
    for name, (_, _, want, text) in REGRESSIONS.items():
        r = results[name]
        if r["outcome"] != want or text not in r["detail"]:
            bad.append(f"{name}: {r['outcome']}: {r['detail'][:600]}")
        if name == "sparse-2GiB-body" and r["cpu"] > SPARSE_CASE_LIMIT:  # read and report
            bad.append(f"{name}: took {r['cpu']} s of CPU")
    assert not bad, "\n".join(bad)


def test_fuzz(pool, request):
    _summary_plugin(request.config, SUMMARY)  # the counts, shown at the end of the run
    limit_kb = 2 * baseline_peak_kb()
    counts: dict[str, int] = {}
    failures = []
    st = {"dedup": 0, "sparse": 0, "full": 0, "max_hwm": 0, "max_secs": 0.0,
          "sparse_max_secs": 0.0}
    entry: dict[str, int] = {}
    t0 = time.monotonic()

    def on_result(r):
        out = r["outcome"]
        counts[out] = counts.get(out, 0) + 1
        if r.get("full"):
            st["full"] += 1
            entry[r["action"]] = entry.get(r["action"], 0) + 1
        st["dedup"] += bool(r.get("dedup"))
        st["max_hwm"] = max(st["max_hwm"], r.get("hwm_kb", 0))
        st["max_secs"] = max(st["max_secs"], r.get("secs", 0))
        if r.get("sparse"):
            st["sparse"] += 1
            st["sparse_max_secs"] = max(st["sparse_max_secs"], r["read_secs"])
        why = None
        if out not in GOOD:
            why = out
        elif r.get("hwm_kb", 0) > limit_kb:
            why = f"memory {r['hwm_kb']} KiB > {limit_kb} KiB"
        elif r.get("sparse") and r["read_cpu"] > SPARSE_CASE_LIMIT:
            why = f"reading the sparse file took {r['read_cpu']} s of CPU"
        if why:
            detail = str(r.get("detail"))[-1500:]
            failures.append(f"case {r['id']} ({why}): {r.get('corpus')} | {r.get('mutation')} | "
                            f"{r.get('action')} {r.get('argv')}\n    {detail}")

    pool.run([{"case": i} for i in range(CASES)], on_result)
    wall = time.monotonic() - t0
    SUMMARY.append(
        f"fuzz: {CASES} cases (seed {SEED}, {len(pool.procs)} workers) in {wall:.0f} s, "
        f"{CASES / wall:.0f} cases/s: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; every case read and validated, {st['full']} also through an entry point ("
        + ", ".join(f"{k} {v}" for k, v in sorted(entry.items()))
        + f"; {st['dedup']} of them answered from an identical earlier recording); "
        f"sparse files {st['sparse']} (slowest read {st['sparse_max_secs']:.2f} s); slowest case "
        f"{st['max_secs']:.1f} s; peak RSS {st['max_hwm'] // 1024} MiB "
        f"(limit {limit_kb // 1024} MiB = 2 x report of the largest fixture)")
    assert not failures, f"{len(failures)} of {CASES} cases failed " \
        f"(reproduce: python tests/test_fuzz_recordings.py --case N)\n" + "\n".join(failures[:30])


# -- reproducing ------------------------------------------------------------------

def _reproduce(i: int):
    d = Path(tempfile.mkdtemp(prefix="kvmtrace-fuzz-case-"))
    w = Worker(d / "corpus")
    name, data, extra, desc, action, argv = make_case(i, w.corpus)
    res = w.run(data, extra, action, argv, name)
    keep = d / f"case-{i}.kvt"
    with open(keep, "wb") as f:
        f.write(data)
    print(f"case {i}: {name} | {desc} | {action} {argv}\nfile: {keep}"
          f"{f' (+{extra} bytes of hole)' if extra else ''}\n"
          f"outcome: {res['outcome']} in {res['secs']} s, peak RSS {res['hwm_kb']} KiB\n"
          f"{res['detail']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--case"]:
        for arg in sys.argv[2:]:
            _reproduce(int(arg))
    else:
        print(__doc__)
