"""Files kvmtrace writes as root: never through a symlink, never over a file
without --force, never a FIFO, always mode 0600.

Every case runs the real CLI on the committed demo recording, for each way
report and diff write a file (-o with text / tsv / json / csv / html, and the
default report.html / diff.html in the working directory), plus the
recording writer and kvmtrace.outputs itself.
"""

import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import FIXTURES, ROOT, kvmtrace, one_line_error

REC = FIXTURES / "x86-pvm-demo.kvt"

WRITERS = {
    "report-text": ("report", REC),
    "report-json": ("report", REC, "--format", "json"),
    "report-csv": ("report", REC, "--format", "csv", "--table", "verdicts"),
    "report-tsv": ("report", REC, "--format", "tsv"),
    "report-html": ("report", REC, "--format", "html"),
    "diff-text": ("diff", REC, REC),
    "diff-json": ("diff", REC, REC, "--format", "json"),
    "diff-tsv": ("diff", REC, REC, "--format", "tsv"),
    "diff-html": ("diff", REC, REC, "--format", "html"),
}
CASES = pytest.mark.parametrize("cmd", list(WRITERS))
DEFAULTS = {"report-html": "report.html", "diff-html": "diff.html"}


def run(*args, cwd=ROOT, timeout=120):
    """The CLI in another working directory (default report.html / diff.html)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kvmtrace.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def mode(p):
    return stat.S_IMODE(os.lstat(p).st_mode)


@CASES
def test_new_file_is_0600_even_with_umask_0(cmd, tmp_path):
    out = tmp_path / "out"
    r = kvmtrace(*WRITERS[cmd], "-o", out, preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and f"wrote {out}" in r.stderr
    assert out.stat().st_size > 100 and mode(out) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary left


@CASES
def test_dangling_symlink_refused_target_not_created(cmd, tmp_path):
    target, link = tmp_path / "target", tmp_path / "link"
    link.symlink_to(target)
    for extra in ((), ("--force",)):
        line = one_line_error(kvmtrace(*WRITERS[cmd], "-o", link, *extra))
        assert "symbolic link" in line
        assert not target.exists() and link.is_symlink()


@CASES
def test_symlink_to_existing_file_refused_even_with_force(cmd, tmp_path):
    target, link = tmp_path / "precious", tmp_path / "link"
    target.write_text("precious\n")
    target.chmod(0o644)
    link.symlink_to(target)
    for extra in ((), ("--force",)):
        assert "symbolic link" in one_line_error(kvmtrace(*WRITERS[cmd], "-o", link, *extra))
        assert target.read_text() == "precious\n" and mode(target) == 0o644
        assert link.is_symlink()


@CASES
def test_existing_file_needs_force(cmd, tmp_path):
    out = tmp_path / "out"
    out.write_text("old\n")
    out.chmod(0o644)
    line = one_line_error(kvmtrace(*WRITERS[cmd], "-o", out))
    assert "exists" in line and "--force" in line
    assert out.read_text() == "old\n"
    r = kvmtrace(*WRITERS[cmd], "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    assert out.read_text() != "old\n" and out.stat().st_size > 100
    assert mode(out) == 0o600 and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@CASES
def test_fifo_refused_without_blocking(cmd, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for extra in ((), ("--force",)):
        t = time.monotonic()
        line = one_line_error(kvmtrace(*WRITERS[cmd], "-o", fifo, *extra, timeout=60))
        assert "not a regular file" in line
        assert time.monotonic() - t < 30
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@CASES
def test_directory_refused(cmd, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    assert "directory" in one_line_error(kvmtrace(*WRITERS[cmd], "-o", d, "--force"))


@pytest.mark.parametrize("cmd", list(DEFAULTS))
def test_default_html_path(cmd, tmp_path):
    """report.html / diff.html in the working directory: same rules as -o."""
    name = DEFAULTS[cmd]
    default = tmp_path / name
    target = tmp_path / "target"
    default.symlink_to(target)
    assert "symbolic link" in one_line_error(run(*WRITERS[cmd], cwd=tmp_path))
    assert not target.exists()
    default.unlink()
    r = run(*WRITERS[cmd], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert mode(default) == 0o600 and "<svg" in default.read_text()
    before = default.read_bytes()
    assert "exists" in one_line_error(run(*WRITERS[cmd], cwd=tmp_path))
    assert default.read_bytes() == before
    r = run(*WRITERS[cmd], "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert mode(default) == 0o600


def test_missing_directory(tmp_path):
    line = one_line_error(kvmtrace(*WRITERS["report-json"], "-o", tmp_path / "no" / "out"))
    assert "No such file or directory" in line


# -- kvmtrace.outputs and the recording writer --------------------------------

def test_outputs_create(tmp_path):
    from kvmtrace import outputs

    p = tmp_path / "f"
    fd = outputs.create(p)
    os.write(fd, b"one")
    os.close(fd)
    assert mode(p) == 0o600
    with pytest.raises(outputs.OutputError, match="exists; use --force"):
        outputs.create(p)
    fd = outputs.create(p, force=True)
    os.write(fd, b"two")
    os.close(fd)
    assert p.read_bytes() == b"two" and mode(p) == 0o600
    link = tmp_path / "l"
    link.symlink_to(p)
    with pytest.raises(outputs.OutputError, match="symbolic link") as e:
        outputs.create(link, force=True)
    assert isinstance(e.value, OSError) and str(e.value).startswith(f"{link}: ")
    assert p.read_bytes() == b"two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f", "l"]


def test_write_text_leaves_nothing_half_written(tmp_path):
    """A write that fails part way (here: a file size limit) leaves no partial
    new file, and with --force keeps the old one."""
    code = r"""
import resource, signal, sys
from kvmtrace import outputs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for path, force in ((sys.argv[1], False), (sys.argv[2], True)):
    try:
        outputs.write_text(path, "x" * 100000, force=force)
    except outputs.OutputError as e:
        print(e)
"""
    new, old = tmp_path / "new", tmp_path / "old"
    old.write_text("old report\n")
    r = subprocess.run([sys.executable, "-c", code, str(new), str(old)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all("write failed" in x for x in lines), r.stdout
    assert not new.exists() and old.read_text() == "old report\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["old"]


def test_recording_writer(tmp_path):
    from kvmtrace.outputs import OutputError
    from kvmtrace.recording.reader import read
    from kvmtrace.recording.writer import RecordingWriter

    meta = {"host": "h", "kernel": "6.18.0", "arch": "x86_64"}
    p = tmp_path / "r.kvt"
    RecordingWriter(str(p), meta).close()
    assert mode(p) == 0o600 and read(str(p)).meta["host"] == "h"
    with pytest.raises(OutputError, match="exists"):
        RecordingWriter(str(p), meta)
    p.chmod(0o644)
    w = RecordingWriter(str(p), {**meta, "host": "again"}, force=True)
    w.close()
    assert mode(p) == 0o600 and read(str(p)).meta["host"] == "again"
    target, link = tmp_path / "target", tmp_path / "link.kvt"
    link.symlink_to(target)
    for force in (False, True):
        with pytest.raises(OutputError, match="symbolic link"):
            RecordingWriter(str(link), meta, force=force)
    assert not target.exists()
    fifo = tmp_path / "fifo.kvt"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        RecordingWriter(str(fifo), meta, force=True)


def test_record_refuses_a_planted_link(tmp_path):
    """record -o onto a dangling link: refused before anything is traced or
    created (one line; with or without root)."""
    target, link = tmp_path / "target", tmp_path / "link.kvt"
    link.symlink_to(target)
    r = kvmtrace("record", "-o", link, "--probes", "memslots", "--duration", "0.1",
                 timeout=300)
    one_line_error(r)
    assert not target.exists() and link.is_symlink()
