"""Bad input to report: one clear line, non-zero exit, never a traceback."""

import json
import os
import shutil

from conftest import FIXTURES, kvmtrace, one_line_error

REC = FIXTURES / "x86-pvm-demo.kvt"


def test_missing_path(tmp_path):
    assert "no such file" in one_line_error(kvmtrace("report", tmp_path / "nope.kvt"))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.kvt"
    p.write_bytes(b"")
    assert "empty file" in one_line_error(kvmtrace("report", p))


def test_not_a_recording(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, this is not a recording\n" * 20)
    assert "not a kvmtrace recording" in one_line_error(kvmtrace("report", p))


def test_directory(tmp_path):
    assert "directory" in one_line_error(kvmtrace("report", tmp_path))


def test_other_arrow_stream(tmp_path):
    import pyarrow as pa
    p = tmp_path / "other.arrow"
    with pa.ipc.new_stream(str(p), pa.schema([("x", pa.int64())])) as w:
        w.write_batch(pa.record_batch([pa.array([1, 2])], names=["x"]))
    assert "not a kvmtrace recording" in one_line_error(kvmtrace("report", p))


def test_truncated_recording_reads_what_was_flushed(tmp_path):
    """Cut anywhere: the header alone is still a recording; a cut inside the
    schema is 'not a recording'; otherwise report works on what is left and
    says it was cut."""
    data = REC.read_bytes()
    for cut in (len(data) - 5, len(data) // 2, len(data) // 7):
        p = tmp_path / f"cut{cut}.kvt"
        p.write_bytes(data[:cut])
        r = kvmtrace("report", p)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        assert "note:" in r.stdout and ("mid-write" in r.stdout or "not closed" in r.stdout)
    p = tmp_path / "tiny.kvt"
    p.write_bytes(data[:40])
    one_line_error(kvmtrace("report", p))


def test_unreadable_cases_do_not_touch_the_file(tmp_path):
    p = tmp_path / "r.kvt"
    shutil.copy(REC, p)
    before = p.read_bytes()
    kvmtrace("report", p, "--format", "json")
    assert p.read_bytes() == before


def test_record_refuses_to_overwrite(tmp_path):
    p = tmp_path / "exists.kvt"
    p.write_bytes(b"precious")
    line = one_line_error(kvmtrace("record", "-o", p, "--duration", "0.1"))
    assert "exists" in line and p.read_bytes() == b"precious"


def test_unknown_probe_set(tmp_path):
    r = kvmtrace("record", "-o", tmp_path / "x.kvt", "--probes", "bogus", "--duration", "0.1")
    assert "unknown probe or set 'bogus'" in one_line_error(r)


def _v2_recording(path):
    """The fixture re-written by the current writer: version 2 or later (3:
    compressed bodies), every batch sealed."""
    from test_fuzz_recordings import rewrite_v2

    rewrite_v2(REC, path)
    return path


def _frames(data):
    """(offset, metadata length, body length) of each message of a stream."""
    import struct

    from kvmtrace.recording import format as fmt

    out, pos = [], 0
    while True:
        n = struct.unpack_from("<i", data, pos + 4)[0]
        if n == 0:
            return out
        body = fmt.parse_message(data[pos + 8:pos + 8 + n]).body_length
        out.append((pos, n, body))
        pos += 8 + n + body


def test_v2_recording_reads_back_clean(tmp_path):
    from kvmtrace.recording import SCHEMA_VERSION
    from kvmtrace.recording.reader import read

    rec = read(_v2_recording(tmp_path / "v2.kvt"))
    assert rec.schema_version == SCHEMA_VERSION and rec.complete and not rec.problems
    assert len(rec["memslot"]) and len(rec["vmas"])


def test_flipped_byte_in_v2_is_named(tmp_path):
    """One bit flipped in a batch body: that batch is named and never
    decoded; what came before it is reported, the recording marked incomplete."""
    p = _v2_recording(tmp_path / "v2.kvt")
    data = bytearray(p.read_bytes())
    frames = _frames(data)
    off, n, body = frames[-1]
    data[off + 8 + n + body // 3] ^= 0x20
    p.write_bytes(data)
    r = kvmtrace("report", p, "--format", "json")
    assert r.returncode == 0 and r.stderr.startswith("kvmtrace: warning: "), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "checksum mismatch" in r.stderr
    rec = json.loads(r.stdout)["recording"]
    last = len(frames) - 1  # batches (the first message is the schema)
    assert rec["complete"] is False
    assert rec["problems"] == [f"batch {last} of {last}: checksum mismatch (corrupted on disk); "
                               f"the recording is read up to batch {last - 1}"]
    r = kvmtrace("report", p)
    assert r.returncode == 0 and "checksum mismatch (corrupted on disk)" in r.stdout


def test_huge_body_over_a_sparse_file_ends_at_once(tmp_path):
    """A batch declaring a 2 GiB body, the file extended with a 2 GiB hole to
    hold it: the reader checks the body against the blocks the file really
    has, reads none of it, and the report names the batch in one line."""
    import struct

    from click.testing import CliRunner

    from kvmtrace.cli import main
    from kvmtrace.recording import format as fmt

    p = _v2_recording(tmp_path / "v2.kvt")
    data = bytearray(p.read_bytes())
    off, n, _ = _frames(data)[1]
    fb = fmt._Flat(bytes(data[off + 8:off + 8 + n]))
    struct.pack_into("<q", data, off + 8 + fb.field(fb.root(), 3), 2 << 30)
    with open(p, "wb") as f:
        f.write(data)
        f.truncate(len(data) + (2 << 30))
    assert os.stat(p).st_blocks * 512 < 10 << 20  # really sparse
    def read_bytes():  # what this process read: a measure that a busy host doesn't change
        with open("/proc/self/io") as f:
            return int(next(ln for ln in f if ln.startswith("rchar:")).split()[1])

    r0 = read_bytes()
    r = CliRunner().invoke(main, ["report", str(p), "--format", "json"])
    took = read_bytes() - r0
    assert r.exit_code == 0 and r.exception is None, r.output
    problems = json.loads(r.stdout)["recording"]["problems"]
    assert len(problems) == 1 and "declares a body of 2.0 GiB" in problems[0] \
        and "sparse file" in problems[0], problems
    assert took < 64 << 20, f"read {took} bytes of a 2 GiB sparse body"
    r = kvmtrace("report", p)  # the command as a user runs it: one note, no traceback
    assert r.returncode == 0 and r.stderr.startswith("kvmtrace: warning: "), r.stderr
    assert len(r.stderr.splitlines()) == 1  # the recording is incomplete: said on stderr
    assert sum("sparse file" in ln for ln in r.stdout.splitlines()) == 1


def test_corrupt_header_is_one_line(tmp_path):
    """Header damage (here: the meta JSON, checksum resealed so the JSON
    check itself is reached) is one line, exit 2, from report, diff and load."""
    import pyarrow as pa
    import pytest

    from kvmtrace import load
    from kvmtrace.recording import format as fmt
    from kvmtrace.recording.reader import RecordingError

    with pa.ipc.open_stream(pa.py_buffer(REC.read_bytes())) as r:
        schema, batches = r.schema, list(r)
    meta = b'{"kernel": 6.1}'
    md = {fmt.VERSION_KEY: b"2", fmt.META_KEY: meta,
          fmt.HEADER_CRC_KEY: fmt.header_checksum(b"2", meta)}
    p = tmp_path / "bad-meta.kvt"
    with pa.ipc.new_stream(str(p), schema.with_metadata(md)) as w:
        for b in batches:
            w.write_batch(b)
    assert "no kernel release" in one_line_error(kvmtrace("report", p, "--format", "csv"))
    assert "no kernel release" in one_line_error(kvmtrace("diff", REC, p))
    with pytest.raises(RecordingError, match="no kernel release"):
        load(str(p))
