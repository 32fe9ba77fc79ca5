"""kvmtrace diff finds regressions injected with the built-in guest, and names
their cause; identical configurations pass. Real KVM, real BPF (CI runs it)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, guest_cmd, kvmtrace

pytestmark = pytest.mark.usefixtures("live")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    out = {}
    for sc in ("huge-base", "huge-4k", "dirty-off", "dirty-on", "ram", "pfnmap",
               "pages-1x", "pages-2x"):
        path = d / f"{sc}.kvt"
        p = subprocess.run([sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(path),
                            "--", *guest_cmd("--scenario", sc, "-q")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out[sc] = path
    return out


def diff(recs, a, b):
    p = kvmtrace("diff", recs[a], recs[b], "--format", "json", "--fail-on-regression")
    return p.returncode, json.loads(p.stdout)


@pytest.mark.parametrize("base,new,must_say", [
    ("huge-base", "huge-4k", ["2M/1G mappings 100% -> 0%", "backing anon (THP", "-> anon (no THP)"]),
    ("dirty-off", "dirty-on", ["2M/1G mappings 100% -> 0%", "dirty logging turned on"]),
    ("ram", "pfnmap", ["backing anon (no THP) -> PFNMAP [vvar]"]),
    ("pages-1x", "pages-2x", ["faults 32 -> 64 (+100%)", "pages touched 32 -> 64 (x2)"]),
])
def test_injected_regression_is_found_and_named(recordings, base, new, must_say):
    rc, body = diff(recordings, base, new)
    assert rc == 1 and body["regressions"] >= 1
    line = next(ln for ln in body["summary"] if ln.startswith("REGRESSION"))
    assert "slot 1 (GPA 0x1000000" in line
    for words in must_say:
        assert words in line, line
    # the system slot (GPA 0) is identical in every pair: nothing said about it
    assert not any("(GPA 0x0+" in ln for ln in body["summary"])


@pytest.mark.parametrize("sc", ["huge-base", "dirty-on", "pages-2x"])
def test_identical_configuration_passes(recordings, sc, tmp_path):
    again = tmp_path / "again.kvt"
    p = kvmtrace("record", "-o", again, "--", *guest_cmd("--scenario", sc, "-q"))
    assert p.returncode == 0, p.stderr
    rc, body = diff({"a": recordings[sc], "b": again}, "a", "b")
    assert rc == 0, body["summary"]


def test_reverse_direction_is_an_improvement(recordings):
    rc, body = diff(recordings, "pages-2x", "pages-1x")
    assert rc == 0 and body["regressions"] == 0
    assert any("faults 64 -> 32" in ln for ln in body["summary"])
