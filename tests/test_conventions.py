"""The habits kernel and VMM people expect of a tracing tool (issue 13):
-o for every format, --table never ignored, no silent report.html, a
truncated recording flagged by --fail-on, -p for --pid, `kvmtrace probes`,
doctor's advice as an ordinary user, diff refusing mixed architectures,
shell completion, a man page made from the CLI, and HTML plotting
(matplotlib) as an optional extra."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib

import pytest
from click.testing import CliRunner

from conftest import FIXTURES, ROOT, kvmtrace, one_line_error
from kvmtrace.cli import main

X86 = FIXTURES / "x86-pvm-demo.kvt"
ARM = FIXTURES / "arm64" / "bar-7.x.kvt"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def run(*args, **kw):
    r = CliRunner().invoke(main, [str(a) for a in args], **kw)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


def cut(tmp_path, size=50 * 1024):
    """The demo recording cut to ``size`` bytes (a copy in tmp)."""
    p = tmp_path / f"cut{size}.kvt"
    p.write_bytes(X86.read_bytes()[:size])
    return p


# -- -o, --table, html ------------------------------------------------------------

OUTPUTS = {
    "report-text": ("report", X86), "report-tsv": ("report", X86, "--format", "tsv"),
    "report-json": ("report", X86, "--format", "json"),
    "report-csv": ("report", X86, "--format", "csv"),
    "report-html": ("report", X86, "--format", "html"),
    "diff-text": ("diff", X86, X86), "diff-tsv": ("diff", X86, X86, "--format", "tsv"),
    "diff-json": ("diff", X86, X86, "--format", "json"),
    "diff-html": ("diff", X86, X86, "--format", "html"),
}


@pytest.mark.parametrize("case", list(OUTPUTS))
def test_output_file_for_every_format(case, tmp_path):
    out = tmp_path / "out"
    r = run(*OUTPUTS[case], "-o", out)
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and f"kvmtrace: wrote {out}" in r.stderr
    assert stat.S_IMODE(os.lstat(out).st_mode) == 0o600 and out.stat().st_size > 100
    if "html" not in case:  # what -o writes is what stdout gets
        assert out.read_text() == run(*OUTPUTS[case]).stdout
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    r = run(*OUTPUTS[case], "-o", link, "--force")
    assert r.exit_code == 2 and "symbolic link" in r.stderr
    assert not (tmp_path / "target").exists()


@pytest.mark.parametrize("args, words", [
    (("report", X86, "--format", "html", "--table", "slots"), "--table applies to"),
    (("report", X86, "--format", "json", "--width", "100"), "--width applies to --format text"),
    (("diff", X86, X86, "--format", "tsv", "--width", "100"), "--width applies"),
    (("doctor", "--format", "json", "--width", "100"), "--width applies"),
])
def test_options_that_do_not_apply_are_refused(args, words):
    assert words in one_line_error(kvmtrace(*args))


def test_html_without_output_never_replaces_report_html(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "kvmtrace.cli", "report", str(X86), "--format", "html"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "wrote report.html" in r.stderr, r.stderr
    (tmp_path / "report.html").write_text("mine")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    line = one_line_error(r)
    assert "report.html" in line and "--force" in line
    assert (tmp_path / "report.html").read_text() == "mine"
    assert "never over an existing file without --force" in " ".join(
        run("report", "--help").stdout.split())


# -- truncated recordings ---------------------------------------------------------


def test_truncated_recording_is_flagged(tmp_path):
    p = cut(tmp_path)
    r = kvmtrace("report", p, "--fail-on", "error", "--fail-on", "mismatch")
    assert r.returncode == 0  # nothing of those kinds in what could be read
    warn = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warn) == 1 and warn[0].startswith("kvmtrace: warning: ") and \
        "recording incomplete" in warn[0] and "mid-write" in warn[0]
    assert "no memslots in the part of the recording that could be read" in r.stdout
    assert "set its memslots before recording started" not in r.stdout
    for flag in ("truncated", "any"):
        r = kvmtrace("report", p, "--fail-on", flag, "--format", "json")
        assert r.returncode == 1, (flag, r.stderr)
        assert "recording incomplete" in r.stderr and json.loads(r.stdout)["recording"][
            "complete"] is False
    r = kvmtrace("diff", X86, p)
    assert r.returncode == 0 and "kvmtrace: warning: NEW " in r.stderr


def test_complete_recording_passes_fail_on_truncated():
    r = kvmtrace("report", X86, "--fail-on", "truncated")
    assert r.returncode == 0 and r.stderr == ""
    r = kvmtrace("report", X86, "--fail-on", "any")  # the demo has rejected memslots
    assert r.returncode == 1 and "2 error(s) found" in r.stderr


# -- -p, arch mismatch ----------------------------------------------------------


def test_p_is_pid_everywhere():
    assert run("report", X86, "-p", "1", "--format", "json").stdout == \
        run("report", X86, "--pid", "1", "--format", "json").stdout
    for cmd in (("report", X86), ("record", "-o", "/nonexistent/x.kvt"), ("query",)):
        assert "--pid 0" in one_line_error(kvmtrace(*cmd, "-p", "0"))
        assert "-p, --pid" in run(cmd[0], "--help").stdout


def test_diff_refuses_different_architectures(tmp_path):
    line = one_line_error(kvmtrace("diff", X86, ARM))
    assert "BASE is x86_64 and NEW is aarch64" in line and "--allow-arch-mismatch" in line
    r = kvmtrace("diff", X86, ARM, "--allow-arch-mismatch", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["base"] == str(X86)


# -- probes, doctor ---------------------------------------------------------------


def test_probes_lists_the_catalogue():
    from kvmtrace.host import btf
    from kvmtrace.host import tracefs
    from kvmtrace.probes import catalogue

    r = run("probes", "--format", "json")
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert [p["name"] for p in body["probes"]] == [p.name for p in catalogue.PROBES]
    assert set(body["groups"]) == set(catalogue.GROUPS)
    if os.geteuid() == 0 and tracefs.find():
        want = catalogue.availability(catalogue.PROBES, tracefs.find(), btf.open_kernel())
        for p in body["probes"]:
            assert p["attach"] == (want[p["name"]] is None), p
            assert p["why"] == (want[p["name"]] or "")
    text = run("probes", "--width", 120).stdout
    for p in catalogue.PROBES:
        assert p.name in text
    assert "can attach here" in text


def _as_nobody(*args):
    """kvmtrace as user nobody, from this checkout (skipped where nobody cannot read it)."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import kvmtrace.cli"], cwd="/",
                           env=env, capture_output=True, text=True, timeout=60)
    if probe.returncode:
        pytest.skip(f"user nobody cannot read this checkout ({ROOT})")
    return subprocess.run([*NOBODY, sys.executable, "-m", "kvmtrace.cli", *args], cwd="/",
                          env=env, capture_output=True, text=True, timeout=300)


def test_doctor_as_an_ordinary_user_names_the_real_cause():
    r = _as_nobody("doctor", "--format", "json")
    assert r.returncode == 1, r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    priv = checks["privileges"]
    assert priv["ok"] is False and "not root" in priv["detail"] and "CAP_BPF" in priv["detail"]
    tfs = checks["tracefs"]
    assert tfs["ok"] is False and "not mounted" not in tfs["detail"]
    assert "not readable by uid 65534" in tfs["detail"] and "root" in tfs["fix"]
    for name in ("kvm tracepoints", "kvmmmu tracepoints"):
        if name in checks:
            assert checks[name]["ok"] is None and "load the kvm module" not in checks[name]["fix"]
    text = _as_nobody("doctor").stdout
    assert "tracefs is not mounted" not in text and "load the kvm module" not in text
    assert "not root" in text


def test_probes_as_an_ordinary_user():
    r = _as_nobody("probes", "--format", "json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert any("not root" in h for h in body["host_problems"])
    for p in body["probes"]:
        assert p["attach"] is not True
        if p["type"] == "tracepoint" and not p["arch"]:
            assert p["attach"] is None and "tracefs not readable" in p["why"]


# -- completion, man page ---------------------------------------------------------


def test_shell_completion():
    env = {**os.environ, "_KVMTRACE_COMPLETE": "bash_source"}
    r = subprocess.run([sys.executable, "-m", "kvmtrace.cli"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "_kvmtrace_completion" in r.stdout and "complete " in r.stdout
    env = {**os.environ, "_KVMTRACE_COMPLETE": "bash_complete", "COMP_WORDS": "kvmtrace rep",
           "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-m", "kvmtrace.cli"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert "plain,report" in r.stdout.split()
    env.update(COMP_WORDS="kvmtrace report x.kvt --format t", COMP_CWORD="4")
    r = subprocess.run([sys.executable, "-m", "kvmtrace.cli"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert {"plain,text", "plain,tsv"} <= set(r.stdout.split())
    assert "_KVMTRACE_COMPLETE=bash_source kvmtrace" in run("--help").stdout


def test_man_page_is_up_to_date():
    r = subprocess.run([sys.executable, "scripts/manpage", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    page = (ROOT / "docs" / "kvmtrace.1").read_text()
    for cmd in ("report", "diff", "record", "doctor", "probes"):
        assert f".SS {cmd}\n" in page
    assert "\\-\\-fail\\-on" in page and "_KVMTRACE_COMPLETE=bash_source" in page
    if shutil.which("man"):
        r = subprocess.run(["man", "-l", str(ROOT / "docs" / "kvmtrace.1")], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "MANWIDTH": "80"})
        assert r.returncode == 0 and "--allow-arch-mismatch" in r.stdout


# -- matplotlib is an optional extra ---------------------------------------------

NO_MPL = ("import sys; sys.modules['matplotlib'] = None; "
          "from kvmtrace.cli import main; main()")


def _without_matplotlib(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", NO_MPL, *map(str, args)], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)


def test_html_without_matplotlib_says_how_to_get_it(tmp_path):
    for args in (("report", X86, "--format", "html", "-o", tmp_path / "r.html"),
                 ("diff", X86, X86, "--format", "html", "-o", tmp_path / "d.html"),
                 ("report", X86, "--format", "html")):
        line = one_line_error(_without_matplotlib(*args, cwd=tmp_path))
        assert "pip install 'kvmtrace[html]'" in line
    assert not list(tmp_path.iterdir())  # nothing written, report.html neither


@pytest.mark.parametrize("args", [("report", X86), ("report", X86, "--format", "tsv"),
                                  ("report", X86, "--format", "json"),
                                  ("report", X86, "--format", "csv"), ("diff", X86, X86),
                                  ("probes",)])
def test_everything_else_works_without_matplotlib(args):
    r = _without_matplotlib(*args)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout


def test_library_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import kvmtrace, kvmtrace.html, kvmtrace.plots as p\n"
            f"m = kvmtrace.load({str(X86)!r})\n"
            "assert not p.available()\n"
            "try:\n    p.latency_cdf({'a': [1.0, 2.0]}, 't')\nexcept p.PlotsUnavailable as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "kvmtrace[html]" in r.stdout, r.stderr


def test_pyproject_extras():
    p = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("matplotlib") for d in p["dependencies"])
    extras = p["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["html"])
    # the test extra pulls everything html does, so CI keeps testing the HTML views
    assert {d.split(">")[0] for d in extras["html"]} <= {d.split(">")[0] for d in extras["test"]}
