"""`--format tsv`: plain tab-separated tables for grep, awk and cut (issue 13).

One header line per table (the declared columns of kvmtrace/analysis/schema.py,
in order), a "# table NAME" line before each when several are printed,
integers as integers, the empty field for null, no box drawing or colour; the
same values as the JSON report, field by field.
"""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import FIXTURES, ROOT
from kvmtrace import render
from kvmtrace.analysis import schema
from kvmtrace.cli import main

X86 = FIXTURES / "x86-pvm-demo.kvt"
ARM = FIXTURES / "arm64" / "bar-7.x.kvt"


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


def sections(text: str) -> dict[str, list[list[str]]]:
    """{table: [header, row, ...]} of a multi-table TSV output."""
    out, name = {}, None
    for line in text.split("\n")[:-1]:
        if line.startswith("# table "):
            name = line[len("# table "):]
            out[name] = []
        else:
            out[name].append(line.split("\t"))
    return out


@pytest.mark.parametrize("rec", [X86, ARM], ids=["x86", "arm64"])
def test_report_tsv_is_the_json_report(rec):
    r = run("report", rec, "--format", "tsv")
    assert r.exit_code == 0, r.output
    text = r.stdout
    assert text.endswith("\n") and "\x1b" not in text
    assert not set("┃│━─┏┗") & set(text)
    t = sections(text)
    body = json.loads(run("report", rec, "--format", "json").stdout)
    body |= json.loads(run("report", rec, "--format", "json", "--table", "faults").stdout)
    assert list(t) == ["slots", "ops", "faults", "ranges", "verdicts", "errors", "lost"]
    for name, rows in t.items():
        declared = render.REPORT_TSV[name]
        assert rows[0] == declared.names, name  # the declared columns, in order
        assert len(rows) - 1 == len(body[name]), name
        for fields, obj in zip(rows[1:], body[name]):
            assert len(fields) == len(rows[0])
            for col, field in zip(rows[0], fields):
                v = obj[col]
                assert field == render.tsv_field(v), (name, col, field, v)
                if v is None:
                    assert field == ""
                elif isinstance(v, bool):
                    assert field in ("true", "false")
                elif isinstance(v, int):
                    assert field == str(v) and int(field) == v  # never 1234.0
                elif isinstance(v, float):
                    assert float(field) == v


def test_integer_columns_are_integers_and_null_is_empty():
    t = sections(run("report", X86, "--format", "tsv").stdout)
    hdr, *rows = t["faults"]
    for col in ("spte", "pfn", "gfn", "install_ts"):
        i = hdr.index(col)
        vals = [r[i] for r in rows]
        assert all(v == "" or v.isdigit() for v in vals), col
        assert any(v for v in vals)
    i = hdr.index("ipa")  # arm64-only column on x86: null everywhere
    assert {r[i] for r in rows} == {""}
    dec = {c.name for c in schema.FAULTS.columns if c.dtype in ("int64", "uint64")}
    for col in dec:
        i = hdr.index(col)
        assert all(r[i].lstrip("-").isdigit() for r in rows), col


def test_one_table_has_no_table_line():
    r = run("report", X86, "--format", "tsv", "--table", "verdicts")
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == schema.VERDICTS.names
    assert not any(ln.startswith("#") for ln in lines)
    r = run("report", X86, "--format", "tsv", "--table", "vmas")  # undeclared: its own columns
    assert r.stdout.splitlines()[0].startswith("ts\tpid\t")


def test_filters_apply():
    t = sections(run("report", X86, "--format", "tsv", "--slot", "5").stdout)
    i = t["slots"][0].index("slot")
    assert {r[i] for r in t["slots"][1:]} == {"5"}


def test_awk_and_cut_in_a_shell_pipeline():
    """The use it is for: count rejected memslots with awk, list GPAs with cut."""
    cmd = (f"'{sys.executable}' -m kvmtrace.cli report '{X86}' --format tsv --table verdicts"
           " | awk -F'\\t' 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }"
           " $col[\"verdict\"] == \"rejected\" { n++ } END { print n }'")
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "2", r.stderr
    gpa = schema.VERDICTS.names.index("gpa") + 1
    cmd = (f"'{sys.executable}' -m kvmtrace.cli report '{X86}' --format tsv --table verdicts"
           f" | cut -f{gpa} | sed 1d | sort -un | head -3")
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["0", "12582912", "16777216"], r.stdout


def test_fields_are_one_line_and_one_column():
    assert render.tsv_field("a\tb\nc\\d\re") == "a\\tb\\nc\\\\d\\re"
    assert render.tsv_field("\x1b[31m") == "\\x1b[31m"
    assert render.tsv_field(None) == "" and render.tsv_field(float("nan")) == ""
    assert render.tsv_field(2**64 - 1) == "18446744073709551615"
    assert render.tsv_field(True) == "true" and render.tsv_field(0.25) == "0.25"
    assert render.tsv_field({"4K": 3}) == '{"4K":3}'


def test_diff_tsv():
    r = run("diff", X86, X86, "--format", "tsv")
    assert r.exit_code == 0, r.output
    t = sections(r.stdout)
    assert list(t) == ["slots", "latency", "vms", "findings"]
    assert t["slots"][0] == schema.DIFF_SLOTS.names
    assert t["latency"][0] == schema.DIFF_LATENCY.names
    assert t["vms"][0] == schema.DIFF_VMS.names
    assert t["findings"][0] == schema.DIFF_FINDINGS.names
    body = json.loads(run("diff", X86, X86, "--format", "json").stdout)
    assert len(t["slots"]) - 1 == len(body["slots"]) and len(t["vms"]) - 1 == len(body["vms"])
    i = t["slots"][0].index("levels_base")  # nested values as compact JSON
    assert json.loads(t["slots"][1][i]) == body["slots"][0]["levels_base"]


def test_diff_findings_say_regression():
    bar61, bar7 = FIXTURES / "arm64" / "bar-6.1.kvt", FIXTURES / "arm64" / "bar-7.x.kvt"
    t = sections(run("diff", bar61, bar7, "--format", "tsv").stdout)
    hdr, *rows = t["findings"]
    assert rows and {r[hdr.index("regression")] for r in rows} <= {"true", "false"}
    js = json.loads(run("diff", bar61, bar7, "--format", "json").stdout)
    assert sum(r[hdr.index("regression")] == "true" for r in rows) == \
        sum(f["regression"] for f in js["findings"])


def test_tsv_to_a_file(tmp_path):
    out = tmp_path / "r.tsv"
    r = run("report", X86, "--format", "tsv", "-o", out)
    assert r.exit_code == 0 and r.stdout == ""
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.read_text() == run("report", X86, "--format", "tsv").stdout
