"""docs/report.schema.json: the JSON Schema of `kvmtrace report --format json`,
generated from the declared tables (analysis/schema.py), is current, is a
valid draft 2020-12 schema, and every committed fixture's JSON report (whole
and per --table, from the library and from the CLI) validates against it;
reports that break it (a missing or extra column, a string where an integer
is declared, another tables schema version) do not."""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest

import kvmtrace
from conftest import ROOT, kvmtrace as run
from kvmtrace import render
from kvmtrace.analysis import schema

jsonschema = pytest.importorskip("jsonschema")

FIXTURES = [str(ROOT / "tests" / "fixtures" / "x86-pvm-demo.kvt")] + sorted(
    glob.glob(str(ROOT / "tests" / "fixtures" / "arm64" / "*.kvt")))
DOC = ROOT / "docs" / "report.schema.json"


@pytest.fixture(scope="module")
def validator():
    s = schema.report_json_schema()
    jsonschema.Draft202012Validator.check_schema(s)
    return jsonschema.Draft202012Validator(s)


def test_docs_report_schema_is_generated_from_the_declarations():
    assert DOC.read_text() == schema.report_json_schema_text(), \
        "run: python -m kvmtrace.analysis.schema --report-schema > docs/report.schema.json"
    assert json.loads(DOC.read_text())["$id"].endswith(f":{schema.SCHEMA_VERSION}")


def test_the_schema_covers_the_tables_report_prints():
    m = kvmtrace.load(FIXTURES[0])
    t = render.tables(m)
    assert set(t) == set(schema.REPORT_TABLES)
    for key, name in schema.REPORT_TABLES.items():
        if name is not None:
            assert list(t[key].columns) == schema.TABLES[name].names, key


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_every_fixture_report_validates(path, validator):
    m = kvmtrace.load(path)
    # the whole report holds every table but vmas; --table NAME is {NAME: the same rows}
    for table in (None, "vmas", "lost"):
        body = json.loads(render.to_json(m, table=table))
        errors = [f"{list(e.absolute_path)[:3]}: {e.message[:200]}"
                  for e in validator.iter_errors(body)]
        assert not errors, (table, errors[:5])


def test_cli_json_validates(validator):
    r = run("report", FIXTURES[0], "--format", "json")
    assert r.returncode == 0, r.stderr
    validator.validate(json.loads(r.stdout))
    r = run("report", FIXTURES[-1], "--format", "json", "--table", "faults")
    validator.validate(json.loads(r.stdout))


def test_what_breaks_the_schema_is_refused(validator):
    m = kvmtrace.load(FIXTURES[0])
    good = json.loads(render.to_json(m))
    validator.validate(good)
    faults = json.loads(render.to_json(m, table="faults"))  # --table faults only (v3)
    validator.validate(faults)

    def bad(change, of=None):
        body = copy.deepcopy(good if of is None else of)
        change(body)
        return not validator.is_valid(body)

    assert bad(lambda b: b["faults"][0].pop("spte"), faults)
    assert bad(lambda b: b["faults"][0].update(extra=1), faults)
    assert bad(lambda b: b.update(faults=faults["faults"]))  # not in the whole report
    assert bad(lambda b: b["slots"][0].update(faults="-"))
    assert bad(lambda b: b["slots"][0].update(gpa=-1))          # uint64
    assert bad(lambda b: b["faults"][0].update(spte=2**64), faults)  # past uint64
    assert bad(lambda b: b.update(tables_schema_version=schema.SCHEMA_VERSION + 1))
    assert bad(lambda b: b.pop("notes"))
    assert bad(lambda b: b["recording"].update(complete="yes"))


def test_every_column_with_a_unit_carries_it_in_its_name():
    """The naming rule (issue 13): a time, duration, size, share or rate says
    its unit in its name; ``ts`` / ``*_ts`` are ns; an address (bytes) or a
    frame number (pages) says what it is (schema.unit_in_name)."""
    for t in schema.TABLES.values():
        for c in t.columns:
            assert schema.unit_in_name(c), (t.name, c.name, c.unit)
    C = schema.C
    assert not schema.unit_in_name(C("size", "uint64", "bytes", ""))
    assert not schema.unit_in_name(C("t_start", "uint64", "ns", ""))
    assert not schema.unit_in_name(C("p50", "float64", "us", ""))
    assert not schema.unit_in_name(C("start", "uint64", "bytes", ""))
    assert not schema.unit_in_name(C("rate", "float64", "1/s", ""))
    assert not schema.unit_in_name(C("len_ns", "int64", "bytes", ""))
    # the names the issue asked about, and what they are now
    names = {t.name: set(t.names) for t in schema.TABLES.values()}
    for t in ("ops", "slots", "verdicts", "summary", "ops_view", "diff_slots"):
        assert "size_bytes" in names[t] and "size" not in names[t], t
    assert {"mapping_size_bytes", "map_size_bytes"} <= names["faults"]
    assert "mapping_size_bytes" in names["ranges"] and "size_bytes" in names["prefetch"]
    assert {"start_ts", "end_ts"} <= names["slots"] and "len_bytes" in names["exits"]
    assert {"p50_us", "p90_us", "p99_us", "max_us", "faults_per_s"} <= names["diff_latency"]
