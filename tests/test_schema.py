"""The derived tables match their declarations (analysis/schema.py) on every
committed recording, integers stay exact integers through every output, and
--pid / --slot filter every table the same way."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pandas as pd
import pytest

import kvmtrace
from kvmtrace import render
from kvmtrace.analysis import compare, schema, summary

HERE = os.path.dirname(__file__)
FIXTURES = [os.path.join(HERE, "fixtures", "x86-pvm-demo.kvt")] + sorted(
    glob.glob(os.path.join(HERE, "fixtures", "arm64", "*.kvt")))
MODEL_TABLES = {"ops": "ops", "slots": "slots", "faults": "faults", "prefetch": "prefetch",
                "invalidations": "invalidations", "exits": "exits", "errors": "errors",
                "verdicts": "verdicts", "ranges": "ranges", "lost": "lost",
                "lost_where": "lost_where"}


@pytest.fixture(scope="module", params=FIXTURES, ids=os.path.basename)
def model(request):
    return kvmtrace.load(request.param)


def test_model_tables_are_their_declarations(model):
    for attr, name in MODEL_TABLES.items():
        df = getattr(model, attr)
        t = schema.TABLES[name]
        assert list(df.columns) == t.names, name
        assert {c: str(d) for c, d in df.dtypes.items()} == t.dtypes, name


def test_no_declared_integer_is_float(model):
    for t in schema.TABLES.values():
        for c in t.columns:
            assert not (c.dtype in ("int64", "uint64", "Int64", "UInt64") and c.unit == "s"), c


def test_report_tables_are_declared(model):
    t = render.tables(model)
    assert list(t["slots"].columns) == schema.SUMMARY.names
    assert list(t["ops"].columns) == schema.OPS_VIEW.names
    assert {c: str(d) for c, d in t["slots"].dtypes.items()} == schema.SUMMARY.dtypes


def test_json_integers_are_integers(model):
    body = json.loads(render.to_json(model))
    assert body["tables_schema_version"] == schema.SCHEMA_VERSION
    body |= json.loads(render.to_json(model, table="faults"))  # per-fault rows: --table only
    decl = {"slots": schema.SUMMARY, "faults": schema.FAULTS, "verdicts": schema.VERDICTS,
            "ops": schema.OPS_VIEW, "ranges": schema.RANGES, "errors": schema.ERRORS}
    for name, t in decl.items():
        for row in body[name]:
            for c in t.columns:
                v = row[c.name]
                if c.dtype in ("int64", "uint64"):
                    assert isinstance(v, int) and not isinstance(v, bool), (name, c.name, v)
                elif c.dtype in ("Int64", "UInt64"):
                    assert v is None or isinstance(v, int), (name, c.name, v)


def test_spte_with_nx_and_pcd_pwt_stays_exact_and_decodes_uc():
    """Bit 63 (NX) with PCD|PWT: through float64 this would lose its low bits
    and read as WB. Rewrite one real set_spte row of the x86 fixture."""
    from kvmtrace.recording.reader import read

    rec = read(FIXTURES[0])
    f0 = kvmtrace.load(rec).faults
    i = int(np.flatnonzero(f0["spte"].notna().to_numpy(dtype=bool))[0])
    ts, gfn = int(f0.loc[i, "install_ts"]), int(f0.loc[i, "gfn"])
    ss = rec.tables["set_spte"]
    j = int(np.flatnonzero((ss["ts"].astype("int64") == ts).to_numpy()
                           & (ss["gfn"].astype("int64") == gfn))[0])
    spte = (1 << 63) | (int(ss.loc[j, "spte"]) & ~0x1F8) | 0x18  # NX, PCD|PWT, no PAT bit
    ss.loc[j, "spte"] = np.uint64(spte)
    f = kvmtrace.load(rec).faults
    assert int(f.loc[i, "spte"]) == spte
    assert f.loc[i, "spte_memtype"] == "UC"
    js = json.loads(render.to_json(kvmtrace.load(rec), table="faults"))["faults"][i]
    assert js["spte"] == spte


def test_filter_applies_to_every_table():
    m = kvmtrace.load(FIXTURES[0])
    pid = int(m.slots["pid"].iloc[0])
    slot = int(m.slots["slot"].iloc[1])
    t = render.tables(m, pid, slot)
    for name in ("slots", "faults", "verdicts", "ranges"):
        assert len(t[name]), name
        assert set(t[name]["slot"].dropna().astype(int)) == {slot}, name
    assert set(t["ops"]["slot_id"]) == {slot}
    s = m.slots[m.slots["slot"] == slot].iloc[0]
    v = t["vmas"]
    assert len(v) and ((v["start"] < s.hva + s["size_bytes"]) & (v["end"] > s.hva)).all()
    other = render.tables(m, pid + 1_000_000, None)
    assert all(len(other[n]) == 0 for n in ("slots", "faults", "verdicts", "ranges", "ops",
                                            "vmas", "errors"))


def test_filter_matching_nothing_says_so():
    from click.testing import CliRunner

    from kvmtrace.cli import main
    r = CliRunner().invoke(main, ["report", FIXTURES[0], "--slot", "99"])
    assert r.exit_code == 0
    assert "no memslot matches --slot 99" in r.output
    assert "before recording started" not in r.output


def test_diff_tables_are_declared():
    a = kvmtrace.load(FIXTURES[0])
    c = compare.compare(a, a)
    for df, t in ((c.slots, schema.DIFF_SLOTS), (c.latency, schema.DIFF_LATENCY),
                  (c.totals, schema.DIFF_VMS), (compare.findings_table(c), schema.DIFF_FINDINGS)):
        assert list(df.columns) == t.names


def test_docs_tables_md_is_generated_from_the_declarations():
    with open(os.path.join(HERE, "..", "docs", "tables.md")) as f:
        assert f.read() == schema.markdown(), \
            "run: python -m kvmtrace.analysis.schema > docs/tables.md"


def test_conform_refuses_float_and_undeclared():
    t = schema.VERDICTS
    df = t.empty()
    df["faults"] = df["faults"].astype("float64")
    with pytest.raises(schema.SchemaError):
        t.conform(df)
    with pytest.raises(schema.SchemaError):
        t.conform(t.empty().assign(extra=pd.Series(dtype="int64")))


def test_page_size_drives_levels_and_frames():
    from kvmtrace.analysis import pages
    assert pages.level_names(4096, (1, 2, 3)) == {1: "4K", 2: "2M", 3: "1G"}
    assert pages.level_names(65536, (1, 2, 3)) == {1: "64K", 2: "512M", 3: "4T"}
    assert pages.level_names(16384, (1, 2)) == {1: "16K", 2: "32M"}
    assert list(pages.level_of_size([4096, 2 << 20, 1 << 30, 12345], 4096)) == [1, 2, 3, 0]
    assert pages.page_size({"page_size": 65536}) == 65536
    assert pages.page_size({}) == 4096
    s = summary.LEVELS
    assert s == ("level1", "level2", "level3")


def test_no_flags_is_empty_in_data_and_a_dash_in_text():
    """flag_names is '' for "no flags" in the library, JSON and CSV; only the
    text views print '-' for it."""
    import csv
    import io

    m = kvmtrace.load(FIXTURES[0])
    assert "" in set(m.ops["flag_names"]) and "" in set(m.slots["flag_names"])
    assert not any("-" in x for x in m.slots["flag_names"])
    body = json.loads(render.to_json(m))
    for table in ("slots", "ops"):
        names = {r["flag_names"] for r in body[table]}
        assert "" in names and "-" not in names, table
    rows = list(csv.DictReader(io.StringIO(render.to_csv(m, table="ops"))))
    assert "" in {r["flag_names"] for r in rows} and "-" not in {r["flag_names"] for r in rows}
    from rich.console import Console
    con = Console(file=io.StringIO(), width=200, emoji=False)
    render.to_text(m, con, table="ops")
    text = con.file.getvalue().splitlines()
    head = [c.strip() for c in next(ln for ln in text if "┃" in ln).split("┃")[1:-1]]
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in text if "│" in ln]
    shown = [r[head.index("flags")] for r in rows]
    assert shown == [x or "-" for x in m.ops["flag_names"]]
