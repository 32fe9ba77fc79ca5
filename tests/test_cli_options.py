"""Option values that would silently change what report / diff / doctor do are
refused with one line; a full disk or a closed pipe on stdout ends with one
line or quietly, never a traceback.

Threshold meanings (kvmtrace.analysis.compare): latency, faults,
invalidations and exits are relative increases (0.25 = +25%, any finite value
>= 0); levels and memtype are absolute drops in a share of faults (0..1).
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT, kvmtrace, one_line_error

REC = FIXTURES / "x86-pvm-demo.kvt"


@pytest.mark.parametrize("value, words", [
    ("latency=nan", "finite"),
    ("latency=NaN%", "finite"),
    ("latency=inf", "finite"),
    ("faults=-inf", "finite"),
    ("latency=1e999", "finite"),
    ("latency=-50%", ">= 0"),
    ("exits=-0.1", ">= 0"),
    ("latency=", "expected NAME=NUMBER"),
    ("latency", "expected NAME=NUMBER"),
    ("latency=%", "expected NAME=NUMBER"),
    ("latency=25%%", "expected NAME=NUMBER"),
    ("latency=fast", "expected NAME=NUMBER"),
    ("levels=2", "between 0 and 1"),
    ("memtype=150%", "between 0 and 1"),
    ("speed=1", "unknown threshold"),
    ("=1", "unknown threshold"),
])
def test_bad_threshold(value, words):
    line = one_line_error(kvmtrace("diff", REC, REC, "--threshold", value))
    assert words in line and value in line


def test_good_thresholds():
    r = kvmtrace("diff", REC, REC, "--format", "json", "--fail-on-regression",
                 "--threshold", "latency=25%", "--threshold", "faults=0.1",
                 "--threshold", "levels=100%", "--threshold", "memtype=0",
                 "--threshold", "exits=3", "--threshold", " invalidations = 10% ")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, words", [
    (("--slot", "-1"), "--slot -1"),
    (("--pid", "-1"), "--pid -1"),
    (("--pid", "0"), "--pid 0"),
    (("--slot", str(2**64)), "memslot id"),
    (("--pid", str(2**40)), "process id"),
])
def test_bad_ids(args, words):
    line = one_line_error(kvmtrace("report", REC, *args))
    assert words in line


def test_good_ids():
    r = kvmtrace("report", REC, "--slot", "0", "--format", "json", "--table", "slots")
    assert r.returncode == 0, r.stderr
    slots = json.loads(r.stdout)["slots"]
    assert slots and {s["slot"] for s in slots} == {0}


# -- stdout that cannot be written -------------------------------------------

DEV_FULL_CASES = {
    "report-text": ("report", REC),
    "report-json": ("report", REC, "--format", "json"),
    "report-csv": ("report", REC, "--format", "csv"),
    "report-tsv": ("report", REC, "--format", "tsv"),
    "diff-text": ("diff", REC, REC),
    "diff-json": ("diff", REC, REC, "--format", "json"),
}


def to_dev_full(*args, timeout=120):
    with open("/dev/full", "w") as full:
        return subprocess.run([sys.executable, "-m", "kvmtrace.cli", *map(str, args)], cwd=ROOT,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.mark.parametrize("cmd", list(DEV_FULL_CASES))
def test_dev_full(cmd):
    r = to_dev_full(*DEV_FULL_CASES[cmd])
    line = one_line_error(r)
    assert "No space left on device" in line
    assert "Exception ignored" not in r.stderr
    assert r.returncode == 2


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_doctor_dev_full(fmt):
    r = to_dev_full("doctor", "--format", fmt, timeout=300)
    assert "No space left on device" in one_line_error(r)


@pytest.mark.parametrize("cmd", list(DEV_FULL_CASES))
def test_closed_pipe_ends_quietly_by_sigpipe(cmd):
    """The reader is gone before kvmtrace writes: no traceback, no "Exception
    ignored", killed by SIGPIPE as cat or grep would be."""
    p = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", *map(str, DEV_FULL_CASES[cmd])],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == -signal.SIGPIPE, err
    assert err == ""


@pytest.mark.parametrize("cmd", list(DEV_FULL_CASES))
def test_head_in_a_shell_pipeline(cmd):
    """`kvmtrace ... | head -1`: one line out, nothing on stderr, status 0 (all
    fitted in the pipe) or 141 (SIGPIPE), like other tools."""
    args = " ".join(f"'{a}'" for a in (sys.executable, "-m", "kvmtrace.cli",
                                       *map(str, DEV_FULL_CASES[cmd])))
    r = subprocess.run(["bash", "-c", f"{args} | head -1; exit ${{PIPESTATUS[0]}}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 128 + signal.SIGPIPE), r.stderr
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1


def test_big_output_into_a_closing_pipe():
    """More than a pipe holds (the JSON of the per-fault rows is ~210 KB; the
    whole report, without them, ~30 KB): the write itself fails part way, not
    only the final flush."""
    p = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "report", str(REC), "--format",
                          "json", "--table", "faults"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    first = p.stdout.read(100)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert first.startswith(b"{") and p.wait(timeout=120) == -signal.SIGPIPE, err
    assert err == ""


def test_closed_stdout():
    """stdout closed (`>&-`): one line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "kvmtrace.cli", "report", str(REC), "--format",
                        "json"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
