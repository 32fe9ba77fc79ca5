"""diff and the HTML views on committed recordings (no root needed)."""

import json

from kvmtrace.analysis import stats

from conftest import FIXTURES, kvmtrace, one_line_error

REC = FIXTURES / "x86-pvm-demo.kvt"


def test_identical_recording_has_no_regression():
    p = kvmtrace("diff", REC, REC, "--fail-on-regression")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no regression" in p.stdout
    assert "tracepoint pairing" in p.stdout  # the method is said


def test_json_shape():
    body = json.loads(kvmtrace("diff", REC, REC, "--format", "json").stdout)
    assert body["regressions"] == 0 and body["findings"] == []
    assert {"slots", "latency", "vms", "method", "summary"} <= set(body)
    gpas = {s["gpa"] for s in body["slots"]}
    assert 0x2000000 in gpas  # the [vvar] slot, matched by GPA
    by = {r["by"] for r in body["latency"]}
    assert by == {"slot GPA", "memtype", "level"}


def test_html_is_self_contained(tmp_path):
    for args, name in ((("diff", REC, REC), "d.html"), (("report", REC), "r.html")):
        out = tmp_path / name
        p = kvmtrace(*args, "--format", "html", "-o", out)
        assert p.returncode == 0, p.stderr
        text = out.read_text()
        assert text.count("<svg") >= 2
        assert "<script" not in text and "src=\"http" not in text and "href=\"http" not in text


def test_bad_inputs(tmp_path):
    assert "no such file" in one_line_error(kvmtrace("diff", REC, tmp_path / "missing.kvt"))
    assert "unknown threshold" in one_line_error(kvmtrace("diff", REC, REC, "--threshold",
                                                          "speed=1"))
    assert "expected NAME=NUMBER" in one_line_error(kvmtrace("diff", REC, REC, "--threshold",
                                                             "latency=fast"))


def test_effect_size_on_a_known_shift():
    import numpy as np
    rng = np.random.default_rng(1)
    base = rng.lognormal(1.0, 0.3, 400)
    same = stats.median_ratio(base, rng.lognormal(1.0, 0.3, 400))
    assert same.ci_low < 1 < same.ci_high and abs(same.cliffs_delta) < 0.15
    slow = stats.median_ratio(base, base * 2.5)
    assert 2.2 < slow.ci_low and slow.ci_high < 2.8 and slow.cliffs_delta > 0.9
    assert stats.cliffs_delta(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0
