"""Recorded and user-given strings are shown as themselves, never as markup.

A recording carries strings from the traced host: its name, the kernel
release, VMA paths (file names anyone can choose), notes. They must not be
able to restyle or crash the text report (rich markup such as ``[/]``), send
escape sequences to the terminal, or put a script into the HTML. The hostile
recording is the committed demo fixture with those strings written into its
schema metadata and its smaps snapshots (pyarrow, everything else unchanged).
"""

import json
import re
from html.parser import HTMLParser

import pytest

from conftest import FIXTURES, kvmtrace, one_line_error

REC = FIXTURES / "x86-pvm-demo.kvt"

HOST = "[bold red]x[/]<script>alert(1)</script>"
KERNEL = "6.18[/]\x1b]0;pwned\x07\x1b[31mred"
KERNEL_SHOWN = "6.18[/]\\x1b]0;pwned\\x07\\x1b[31mred"  # controls shown, not sent
ARCH = "x86_64<img src=x onerror=alert(3)>"
VENDOR = "pvm\ud800\u202e:smile:"  # a lone surrogate (valid JSON), a bidi override, an emoji code
VENDOR_SHOWN = "pvm\\ud800\\u202e:smile:"
FILE_VMA = "/tmp/kvmtrace-guest-slot4-eps28i6u"
EVIL_FILE_VMA = "/tmp/[/]<script>alert(2)</script>"
PFN_VMA = "[vvar]"
EVIL_PFN_VMA = "[v][/]<b>:x:"  # the [vvar] slot: diff names a PFNMAP backing by path


def hostile_copy(src, dst):
    import pyarrow as pa

    with open(src, "rb") as f:
        r = pa.ipc.open_stream(f)
        md = dict(r.schema.metadata)
        meta = json.loads(md[b"kvmtrace.meta"])
        meta.update(host=HOST, kernel=KERNEL, arch=ARCH)
        meta["kvm"]["vendor"] = VENDOR
        md[b"kvmtrace.meta"] = json.dumps(meta).encode()
        schema = r.schema.with_metadata(md)
        batches = list(r)
    vi = schema.get_field_index("vmas")
    changed = 0
    with pa.ipc.new_stream(str(dst), schema) as w:
        for b in batches:
            col = b.column(vi)
            vmas = col.flatten()
            paths = [{FILE_VMA: EVIL_FILE_VMA, PFN_VMA: EVIL_PFN_VMA}.get(p, p)
                     for p in vmas.field("path").to_pylist()]
            changed += sum(a != b for a, b in zip(paths, vmas.field("path").to_pylist()))
            fields = [pa.array(paths, type=pa.string()) if f.name == "path" else vmas.field(f.name)
                      for f in vmas.type]
            new = pa.ListArray.from_arrays(col.offsets, pa.StructArray.from_arrays(
                fields, fields=list(vmas.type)))
            w.write_batch(pa.RecordBatch.from_arrays(
                [new if i == vi else b.column(i) for i in range(b.num_columns)], schema=schema))
    assert changed >= 2
    return dst


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    return hostile_copy(REC, tmp_path_factory.mktemp("evil") / "evil.kvt")


class _Doc(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.scripts, self.text, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self.stack.append(tag)
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts[-1] += data
        self.text.append(data)


def parse(html_text):
    d = _Doc()
    d.feed(html_text)
    d.close()
    return d


def check_html(page, literals):
    d = parse(page)
    assert not any("alert" in s for s in d.scripts), d.scripts
    assert not [t for t, _ in d.tags if t in ("script", "img", "b")]
    assert not any(k.startswith("on") for _, attrs in d.tags for k, _ in attrs)
    text = "".join(d.text)
    for s in literals:
        assert s in text, s
    return d


def test_hostile_fixture_reads(evil):
    """The rewrite kept the recording intact: same report apart from the strings."""
    r = kvmtrace("report", evil, "--format", "json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert (j["meta"]["host"], j["meta"]["kernel"], j["meta"]["arch"]) == (HOST, KERNEL, ARCH)
    assert j["meta"]["kvm"]["vendor"] == VENDOR
    vmas = {s["slot"]: s["vma"] for s in j["slots"]}
    assert vmas[4] == EVIL_FILE_VMA and vmas[5] == EVIL_PFN_VMA
    base = json.loads(kvmtrace("report", REC, "--format", "json").stdout)
    for body, path in ((j, evil), (base, REC)):  # the per-fault rows: --table faults
        body |= json.loads(kvmtrace("report", path, "--format", "json", "--table",
                                    "faults").stdout)
    assert len(j["slots"]) == len(base["slots"]) and len(j["faults"]) == len(base["faults"])


def test_text_report_shows_literal_strings(evil):
    r = kvmtrace("report", evil)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout
    for s in (HOST, KERNEL_SHOWN, ARCH, VENDOR_SHOWN, EVIL_FILE_VMA, EVIL_PFN_VMA):
        assert s in out, s
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out


def test_text_report_to_a_terminal_sends_no_escape_from_the_data(evil):
    """On a terminal rich adds its own colours; the recording's ESC / BEL must
    still not reach it."""
    import os
    import pty
    import subprocess
    import sys

    from conftest import ROOT

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "report", str(evil)], cwd=ROOT,
                         stdout=slave, stderr=subprocess.PIPE, env={**os.environ,
                                                                    "COLUMNS": "250"})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.wait(timeout=120) == 0, p.stderr.read()
    text = out.decode()
    assert "\x1b]" not in text and "\x07" not in text  # no OSC (title) sequence at all
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # rich's own colours
    assert "\x1b" not in plain
    for s in (HOST, KERNEL_SHOWN, ARCH, VENDOR_SHOWN):  # ESC arrived as the text "\x1b"
        assert s in plain, s


def test_html_report_escapes_everything(evil, tmp_path):
    out = tmp_path / "r.html"
    r = kvmtrace("report", evil, "--format", "html", "-o", out)
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    check_html(page, [HOST, ARCH, EVIL_FILE_VMA, EVIL_PFN_VMA, "pvm\\ud800"])


def test_diff_text_and_html(evil, tmp_path):
    # the hostile arch differs from x86_64: refused in one line, shown literally
    line = one_line_error(kvmtrace("diff", REC, evil))
    assert f"NEW is {ARCH}" in line and "--allow-arch-mismatch" in line
    r = kvmtrace("diff", REC, evil, "--allow-arch-mismatch")
    assert r.returncode == 0, r.stderr
    assert f"PFNMAP {PFN_VMA} -> PFNMAP {EVIL_PFN_VMA}" in r.stdout
    out = tmp_path / "d.html"
    r = kvmtrace("diff", REC, evil, "--format", "html", "-o", out, "--allow-arch-mismatch")
    assert r.returncode == 0, r.stderr
    check_html(out.read_text(), [f"PFNMAP {EVIL_PFN_VMA}"])
    r = kvmtrace("diff", evil, evil, "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["regressions"] == 0


def test_markup_in_paths(evil, tmp_path):
    """Paths given on the command line with markup in them: the recording's
    own path in the report header, and -o for text reports."""
    d = tmp_path / "a["
    d.mkdir()
    rec = d / "]b[red].kvt"  # ".../a[/]b[red].kvt"
    rec.write_bytes(evil.read_bytes())
    r = kvmtrace("report", rec)
    assert r.returncode == 0, r.stderr
    assert f"kvmtrace report {rec}" in r.stdout
    out = d / "]report.txt"
    r = kvmtrace("report", rec, "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and f"wrote {out}" in r.stderr
    assert HOST in out.read_text() and "\x1b" not in out.read_text()
    r = kvmtrace("diff", rec, rec)
    assert r.returncode == 0 and f"BASE {rec}" in r.stdout


def test_plot_labels_are_literal():
    """A '$' in a plot label is drawn as a dollar sign (mathtext would fail to
    parse it), and SVG comments cannot be closed early."""
    import numpy as np

    from kvmtrace import plots

    svg = plots.latency_cdf({"$\\frac{$ --><script>alert(5)</script>": np.arange(1.0, 9)},
                            "a $x^$ b")
    svg += plots.level_mix(["$a$", "_hidden"], {"4K": [1, 0.5]}, "$t")
    svg += plots.grouped_bars(["$a$", "_b"], {"base": [1, 2], "new": [2, 3]}, "t", "$y$")
    assert "<script" not in svg
    d = parse(svg)
    assert not d.scripts


@pytest.mark.live
def test_record_to_a_path_with_markup(live, tmp_path):
    """record -o with '[/]' in the path: no MarkupError, the recording is made."""
    d = tmp_path / "x["
    d.mkdir()
    out = d / "]y.kvt"
    r = kvmtrace("record", "-o", out, "--probes", "memslots", "--duration", "0.2", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "MarkupError" not in r.stderr
    assert str(out) in r.stderr
    assert (out.stat().st_mode & 0o777) == 0o600
    assert kvmtrace("report", out).returncode == 0
