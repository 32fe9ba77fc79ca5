"""Compressed recordings (schema version 3): written, sealed and read back.

The writer compresses every batch body (Arrow IPC buffer compression, zstd by
default) and seals the bytes it writes: the checksum covers the compressed
body as it is on disk. The reader decodes compressed bodies only in version
3+ recordings and only within a decompression budget, so a forged length
cannot make it allocate more than a multiple of the file's size.
"""

import json
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from kvmtrace.collectors.ringbuf import decode_columns
from kvmtrace.probes import codegen
from kvmtrace.probes.events import EVENTS
from kvmtrace.recording import format as fmt
from kvmtrace.recording import reader
from kvmtrace.recording.writer import RecordingWriter, batch_metadata

from conftest import FIXTURES, ROOT

RAW = FIXTURES / "raw-x86-pvm"
META = {"kernel": "6.18.0", "host": "test"}
VMA = {"ts": 1, "pid": 2, "reason": "start", "start": 0x1000, "end": 0x3000, "perms": "rw-p",
       "offset": 0, "dev": "00:00", "inode": 0, "path": "[anon] ü", "vmflags": "rd wr",
       "size_kb": 8, "kernelpagesize_kb": 4, "mmupagesize_kb": 4, "rss_kb": 4,
       "anonhugepages_kb": 0}


def columns(name):
    dt = codegen.record_dtype(EVENTS[name])
    return decode_columns(np.frombuffer((RAW / f"{name}.bin").read_bytes(), np.uint8), dt)[0]


def write(path, codec="zstd", batches=2, tile=1):
    """A recording of ``batches`` batches, each the captured set_spte records
    (``tile`` times over: 1000 makes batches large enough to be compressed),
    the captured memslots, a VMA row and a note."""
    w = RecordingWriter(str(path), META, compression=codec)
    one = columns("set_spte")
    spte = _columns({f: np.tile(one[f], tile) for f in one.names})
    for _ in range(batches):
        w.add_events("set_spte", spte)
        w.add_events("memslot", columns("memslot"))
        w.add_rows("vmas", [VMA])
        w.note("x", {"a": 1})
        w.flush()
    w.close()
    return path


def frames(data: bytes):
    """(offset, metadata length, MessageInfo) of each message."""
    out, pos = [], 0
    while pos + 8 <= len(data):
        n = struct.unpack_from("<i", data, pos + 4)[0]
        if n == 0:
            break
        info = fmt.parse_message(data[pos + 8:pos + 8 + n])
        out.append((pos, n, info))
        pos += 8 + n + info.body_length
    return out


@pytest.mark.parametrize("codec", [None, "lz4", "zstd"])
def test_round_trip(tmp_path, codec):
    rec = reader.read(write(tmp_path / "r.kvt", codec, tile=1000))
    assert rec.complete and not rec.problems, rec.problems
    assert rec.schema_version == fmt.SCHEMA_VERSION == 6
    want = columns("set_spte")
    got = rec["set_spte"]
    assert len(got) == 2 * 1000 * len(want)
    for f in want.names:
        assert (got[f].to_numpy().reshape(2000, len(want)) == want[f]).all(), f
        assert got[f].dtype == want[f].dtype, f
    slots = rec["memslot"]
    assert list(slots["gpa"][:len(columns("memslot"))]) == list(columns("memslot")["gpa"])
    assert rec["vmas"].iloc[0].to_dict() == VMA
    assert [json.loads(v) for v in rec["notes"]["value"]] == [{"a": 1}, {"a": 1}]


def test_big_batches_are_compressed_small_ones_not(tmp_path):
    """A batch with COMPRESS_FROM bytes of data or more is compressed (and much
    smaller); a small one is not (compressing it makes it larger). Both kinds
    follow each other in one stream, which reads back whole."""
    one = columns("set_spte")
    big = {f: np.tile(one[f], 2000) for f in one.names}  # 34,000 events, 1.5 MB of data
    sizes = {}
    for codec in ("zstd", None):
        p = tmp_path / f"{codec}.kvt"
        w = RecordingWriter(str(p), META, compression=codec)
        w.add_events("set_spte", one)
        w.flush()
        w.add_events("set_spte", _columns(big))
        w.flush()
        w.close()
        msgs = [i for _, _, i in frames(p.read_bytes()) if i.kind == fmt.MSG_RECORD_BATCH]
        sizes[codec] = [i.body_length for i in msgs]
        assert [i.batch.compressed for i in msgs] == [False, False, codec is not None]
        rec = reader.read(p)
        assert rec.complete and not rec.problems and len(rec["set_spte"]) == 34017
        assert (rec["set_spte"]["gfn"].to_numpy()[17:] == big["gfn"]).all()
    assert sizes["zstd"][:2] == sizes[None][:2]
    assert sizes["zstd"][2] < sizes[None][2] / 4


def _columns(cols):
    from kvmtrace.collectors.ringbuf import Columns
    return Columns(cols, len(next(iter(cols.values()))))


def test_checksum_covers_the_compressed_bytes(tmp_path):
    """A bit flipped in a compressed body is named by its checksum, never decompressed."""
    p = write(tmp_path / "z.kvt", tile=1000)
    data = bytearray(p.read_bytes())
    off, n, info = frames(bytes(data))[-1]
    assert info.batch.compressed
    data[off + 8 + n + info.body_length // 2] ^= 0x10
    p.write_bytes(data)
    rec = reader.read(p)
    assert not rec.complete
    assert rec.problems == [f"batch {rec.batches + 1} of {rec.batches + 1}: checksum mismatch "
                            f"(corrupted on disk); the recording is read up to batch "
                            f"{rec.batches}"]


def test_seal_is_the_uncompressed_seal_for_uncompressed_bodies(tmp_path):
    """With compression off the writer's seal is what batch_metadata gives (the
    checksum's meaning did not change, only the bytes it covers)."""
    data = write(tmp_path / "p.kvt", None, batches=1).read_bytes()
    with pa.ipc.open_stream(pa.py_buffer(data)) as r:
        batches = list(r)
    for seq, ((_, _, info), b) in enumerate(zip(frames(data)[1:], batches)):
        assert info.custom[fmt.CRC_KEY] == batch_metadata(b, seq)[fmt.CRC_KEY]
        assert info.custom[fmt.SEQ_KEY] == str(seq).encode()


def _reseal(data: bytearray, off: int, n: int, info):
    seq = int(info.custom[fmt.SEQ_KEY])
    body = bytes(data[off + 8 + n:off + 8 + n + info.body_length])
    start, length = fmt.custom_value_span(bytes(data[off + 8:off + 8 + n]), fmt.CRC_KEY)
    data[off + 8 + start:off + 8 + start + length] = fmt.batch_checksum(seq, info.batch, body)


def test_forged_uncompressed_length_is_refused_before_allocating(tmp_path):
    """A compressed buffer declaring 1 TiB (checksum resealed, as a forger
    would): the batch is refused, nothing is decompressed."""
    p = write(tmp_path / "z.kvt", tile=1000)
    data = bytearray(p.read_bytes())
    off, n, info = frames(bytes(data))[-1]
    assert info.batch.compressed
    body_at = off + 8 + n
    for boff, blen in struct.iter_unpack("<qq", info.batch.buffers):
        if blen >= 8:
            struct.pack_into("<q", data, body_at + boff, 1 << 40)
            break
    _reseal(data, off, n, info)
    p.write_bytes(data)
    rec = reader.read(p)
    assert not rec.complete
    assert "declares 1.0 TiB of compressed data" in rec.problems[0], rec.problems


def test_a_version_2_recording_never_has_compressed_bodies(tmp_path):
    """The same compressed stream labelled version 2 (header resealed): its
    first compressed batch is refused in words."""
    data = write(tmp_path / "z.kvt", tile=1000).read_bytes()
    with pa.ipc.open_stream(pa.py_buffer(data)) as r:
        schema = r.schema
    md = dict(schema.metadata)
    md[fmt.VERSION_KEY] = b"2"
    md[fmt.HEADER_CRC_KEY] = fmt.header_checksum(b"2", md[fmt.META_KEY])
    sink = pa.BufferOutputStream()
    pa.ipc.new_stream(sink, schema.with_metadata(md)).close()
    head = sink.getvalue().to_pybytes()[:-8]  # the schema message, without the end marker
    first = frames(data)[1][0]
    p = tmp_path / "v2.kvt"
    p.write_bytes(head + data[first:])
    rec = reader.read(p)
    assert rec.schema_version == 2 and rec.batches == 1  # the first batch is small
    assert "compressed body (a version-2 recording has none)" in rec.problems[0], rec.problems


def test_older_recordings_still_read():
    for name in ("x86-pvm-demo.kvt",):
        rec = reader.read(FIXTURES / name)
        assert rec.schema_version in (1, 2) and rec.complete and not rec.problems


def test_record_path_never_imports_pandas(tmp_path):
    """Writing a recording builds Arrow arrays from numpy buffers: pa.array
    would import pandas (0.7 s here), which record never needs."""
    code = f"""
import sys, numpy as np
from kvmtrace.collectors.ringbuf import decode_columns
from kvmtrace.probes import codegen
from kvmtrace.probes.events import EVENTS
from kvmtrace.recording.writer import RecordingWriter
dt = codegen.record_dtype(EVENTS["set_spte"])
cols, _ = decode_columns(np.fromfile({str(RAW / "set_spte.bin")!r}, np.uint8), dt)
w = RecordingWriter({str(tmp_path / "x.kvt")!r}, {{"kernel": "6.18"}})
w.add_events("set_spte", cols)
w.add_rows("vmas", [{VMA!r}])
w.note("end", {{"a": 1}})
w.close()
print("pandas" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
