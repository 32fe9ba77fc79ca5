"""Bad input to report: one clear line, non-zero exit, never a traceback."""

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
