"""kvmtrace export --format parquet: one Hive-partitioned dataset of raw events
and derived tables that DuckDB, polars and pyarrow.dataset read as is, with
every value exact (integers stay integers, 2**64-1 stays 2**64-1, null stays
null); Spark's conventions checked on the files themselves (Spark is not
installed here: see kvmtrace/export/parquet.py for what Spark 4.3 read).
Files 0600, directories 0700, DIR refused unless new or empty (or --append /
--force), nothing written through a link, a bad recording one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

import kvmtrace
from conftest import FIXTURES, kvmtrace as run, one_line_error
from kvmtrace.analysis import schema
from kvmtrace.export import ExportError, parquet as xp, recording_id
from kvmtrace.recording import format as rfmt
from kvmtrace.recording.reader import read
from test_fleet import cli, rehost

X86 = FIXTURES / "x86-pvm-demo.kvt"
ARM = [FIXTURES / "arm64" / "demo-7.x.kvt", FIXTURES / "arm64" / "bar-6.1.kvt"]
WEIRD = "h\u00e9 st/1=%2"  # non-ASCII, space, slash, '=', '%'
HIVE = "hive_partitioning = true, hive_types = {'host': VARCHAR, 'recording': VARCHAR}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    rehost(X86, d / "weird.kvt", WEIRD)
    rehost(X86, d / "nohost.kvt", None)
    return [X86, *ARM, d / "weird.kvt", d / "nohost.kvt"]


@pytest.fixture(scope="module")
def ds(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "dataset"
    done = xp.export(inputs, out)
    assert [d["path"] for d in done] == [str(p) for p in inputs]
    return out


@pytest.fixture(scope="module")
def models(inputs):
    out = {}
    for p in inputs:
        rec = read(str(p))
        out[recording_id(p, rec)] = (rec, kvmtrace.load(rec))
    return out


def _duck():
    import duckdb
    return duckdb.connect()


def test_layout_modes_and_one_file_per_recording_and_table(ds, models):
    assert stat.S_IMODE(os.lstat(ds).st_mode) == 0o700
    man = json.loads((ds / xp.MANIFEST).read_text())
    assert man["export_version"] == 1 and man["tables_schema_version"] == schema.SCHEMA_VERSION
    tables = list(xp.DERIVED) + [f"raw/{k}" for k in rfmt.table_types()]
    files = sorted(p for p in ds.rglob("*") if p.is_file() and p.name != xp.MANIFEST)
    assert len(files) == len(tables) * len(models)
    for p in ds.rglob("*"):
        assert not p.is_symlink()
        assert stat.S_IMODE(os.lstat(p).st_mode) == (0o700 if p.is_dir() else 0o600), p
    for t in tables:
        rids = {p.parent.name.partition("=")[2] for p in (ds / t).glob("*/*/part-0.parquet")}
        assert rids == set(models), t
    hosts = {p.name for p in (ds / "faults").iterdir()}
    assert hosts == {"host=vm", "host=kvmtrace-arm64", "host=h\u00e9%20st%2F1%3D%252",
                     "host=__HIVE_DEFAULT_PARTITION__"}


def test_duckdb_reads_every_value_exactly(ds, models):
    con = _duck()
    for name in xp.MODEL_TABLES:
        got = con.sql(f"SELECT * FROM read_parquet('{ds}/{name}/*/*/*.parquet', {HIVE})").df()
        for rid, (rec, m) in models.items():
            want = getattr(m, name)
            part = got[got["recording"] == rid].drop(columns=["host", "recording"])
            assert len(part) == len(want), (name, rid)
            if not len(want):
                continue
            # same rows, column by column, exact: integers compared as Python ints
            sort = [c for c in want.columns if str(want[c].dtype) in ("int64", "uint64")][:4]
            a = schema.records(want.sort_values(sort, kind="stable").reset_index(drop=True))
            b = part.sort_values(sort, kind="stable").reset_index(drop=True)
            b = schema.TABLES[name].conform(b)
            assert schema.records(b) == a, (name, rid)
    types = {r[0]: r[1] for r in con.sql(
        f"DESCRIBE SELECT * FROM read_parquet('{ds}/slots/*/*/*.parquet', {HIVE})").fetchall()}
    assert types["end_ts"] == "UBIGINT" and types["kernelpagesize_kb"] == "BIGINT"
    assert types["pfnmap"] == "BOOLEAN" and types["snapshot_delay_ms"] == "DOUBLE"
    live = con.sql(f"SELECT count(*) FROM read_parquet('{ds}/slots/*/*/*.parquet', {HIVE}) "
                   "WHERE end_ts = 18446744073709551615").fetchall()[0][0]
    assert live == sum(int((m.slots["end_ts"] == 2**64 - 1).sum()) for _, m in models.values())


def test_raw_events_and_recordings_table(ds, models):
    con = _duck()
    for kind in rfmt.table_types():
        n = dict(con.sql(f"SELECT recording, count(*) FROM read_parquet("
                         f"'{ds}/raw/{kind}/*/*/*.parquet', {HIVE}) GROUP BY 1").fetchall())
        for rid, (rec, _) in models.items():
            assert n.get(rid, 0) == len(rec[kind]), (kind, rid)
    rel = con.sql(f"SELECT * FROM read_parquet('{ds}/recordings/*/*/*.parquet', {HIVE})")
    rows = [dict(zip(rel.columns, r)) for r in rel.fetchall()]
    assert len(rows) == len(models)
    for row in rows:
        rec, m = models[row["recording"]]
        assert row["hostname"] == (rec.meta.get("host") or None)
        assert row["host"] == row["hostname"]  # the path value decodes to the host name
        assert (row["kernel"], row["arch"]) == (rec.meta["kernel"], rec.meta["arch"])
        assert row["complete"] and row["recording_schema_version"] == rec.schema_version
        assert row["start_realtime_ns"] == rec.meta["clock"]["realtime_ns"]
        assert row["duration_ns"] > 0 and row["events"] > 0
    p = con.sql(f"SELECT DISTINCT vmm FROM read_parquet('{ds}/processes/*/*/*.parquet', "
                f"{HIVE})").fetchall()
    assert {x for (x,) in p} == {"python -m kvmtrace.guest", "python3 -m kvmtrace.guest"}


def test_polars_reads_it(ds, models):
    pl = pytest.importorskip("polars")
    f = pl.scan_parquet(f"{ds}/faults/**/*.parquet", hive_partitioning=True).collect()
    assert f.height == sum(len(m.faults) for _, m in models.values())
    assert f.schema["gfn"] == pl.UInt64 and f.schema["service_ns"] == pl.Int64
    assert set(f["host"].unique().to_list()) == {"vm", "kvmtrace-arm64", WEIRD, None}
    s = pl.scan_parquet(f"{ds}/slots/**/*.parquet", hive_partitioning=True).collect()
    assert s["end_ts"].max() == 2**64 - 1
    v = pl.scan_parquet(f"{ds}/raw/memslot/**/*.parquet", hive_partitioning=True).collect()
    assert v.height == sum(len(r["memslot"]) for r, _ in models.values())


def test_pyarrow_dataset_reads_it(ds, models):
    part = pds.partitioning(pa.schema([("host", pa.string()), ("recording", pa.string())]),
                            flavor="hive")
    t = pds.dataset(ds / "faults", partitioning=part).to_table()
    assert t.num_rows == sum(len(m.faults) for _, m in models.values())
    assert t.schema.field("spte").type == pa.uint64()
    assert set(t.column("host").to_pylist()) == {"vm", "kvmtrace-arm64", WEIRD, None}
    x86 = [rid for rid, (r, _) in models.items() if r.path == str(X86)][0]
    got = t.filter(pds.field("recording") == x86).to_pandas(
        types_mapper={pa.uint64(): pd.UInt64Dtype()}.get)
    want = models[x86][1].faults
    assert got["spte"].tolist() == want["spte"].tolist()


def test_spark_conventions_in_the_files(ds):
    """What Spark needs: plain Hive directories, no file or directory it would
    skip (leading '_' or '.') inside a table, column names it accepts
    (case-insensitively unique, no partition name among them), flat columns of
    types it maps: ints (uint64 as INT(64, unsigned) -> decimal(20,0)), double,
    boolean, UTF-8 strings; no timestamps."""
    for table in list(xp.DERIVED) + [f"raw/{k}" for k in rfmt.table_types()]:
        for f in (ds / table).rglob("*"):
            assert not f.name.startswith(("_", ".")), f
            rel = f.relative_to(ds / table).parts
            assert re.fullmatch(r"host=[^/]+", rel[0]), f
            if len(rel) > 1:
                assert re.fullmatch(r"recording=[A-Za-z0-9._-]+", rel[1]), f
        one = next((ds / table).glob("*/*/part-0.parquet"))
        sch = pq.read_schema(one)
        names = [n.lower() for n in sch.names]
        assert len(set(names)) == len(names) and not set(names) & {"host", "recording"}
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names), names
        for field in sch:
            t = field.type
            assert (pa.types.is_integer(t) or pa.types.is_float64(t) or pa.types.is_boolean(t)
                    or t == pa.string()), (table, field)
        meta = pq.ParquetFile(one).schema
        for i in range(len(meta)):
            col = meta.column(i)
            if col.physical_type == "INT64" and "isSigned=false" in str(col.logical_type):
                assert sch.field(col.name).type == pa.uint64()
            assert "Timestamp" not in str(col.logical_type)


def test_cli_refuses_what_it_must(tmp_path, inputs):
    d = tmp_path / "notours"
    d.mkdir()
    (d / "precious").write_text("x")
    for flags in ((), ("--force",), ("--append",)):
        line = one_line_error(cli("export", *flags, d, X86))
        assert "not a kvmtrace dataset" in line
    assert (d / "precious").read_text() == "x" and len(list(d.iterdir())) == 1
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    assert "symbolic link" in one_line_error(cli("export", link, X86))
    assert not (tmp_path / "elsewhere").exists()
    f = tmp_path / "file"
    f.write_text("")
    assert "not a directory" in one_line_error(cli("export", f, X86))
    bad = tmp_path / "bad.kvt"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "never"
    assert "not a kvmtrace recording" in one_line_error(run("export", out, X86, bad))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "kvmtrace-" in p.name]
    assert "same recording" in one_line_error(cli("export", out, X86, inputs[-1], X86))
    assert "no such file" in one_line_error(cli("export", out, tmp_path / "nope.kvt"))


def test_append_force_and_an_empty_directory(tmp_path, models):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli("export", "--format", "parquet", out, X86).returncode == 0
    assert "a kvmtrace dataset already" in one_line_error(cli("export", out, ARM[0]))
    assert cli("export", "--append", out, ARM[0]).returncode == 0
    assert "already in" in one_line_error(cli("export", "--append", out, ARM[0]))
    r = cli("export", "--append", "--force", out, ARM[0])
    assert r.returncode == 0, r.stderr
    con = _duck()
    n = con.sql(f"SELECT recording, count(*) FROM read_parquet('{out}/ops/*/*/*.parquet', "
                f"{HIVE}) GROUP BY 1").fetchall()
    ops = {r.path: len(m.ops) for r, m in models.values()}
    assert sorted(c for _, c in n) == sorted([ops[str(X86)], ops[str(ARM[0])]])
    # the same recording under another file name is the same recording
    shutil.copy(X86, tmp_path / "renamed.kvt")
    assert "already in" in one_line_error(cli("export", "--append", out,
                                              tmp_path / "renamed.kvt"))
    assert cli("export", "--append", "--force", out, tmp_path / "renamed.kvt").returncode == 0
    rids = sorted(p.name.split("=")[1].rsplit("-", 1)[0] for p in (out / "faults").glob("*/*"))
    assert rids == ["demo-7.x", "renamed"]
    # --force replaces a dataset (only ours): now just the one recording
    assert cli("export", "--force", out, ARM[1]).returncode == 0
    rids = {p.name for p in (out / "recordings").glob("*/*")}
    assert len(rids) == 1 and rids.pop().startswith("recording=bar-6.1-")
    assert not [p for p in tmp_path.iterdir() if "kvmtrace-" in p.name]
    # a file put into the dataset by someone else: --force does not delete it
    (out / "faults" / "notes.txt").write_text("mine")
    assert "did not write" in one_line_error(cli("export", "--force", out, X86))
    assert (out / "faults" / "notes.txt").read_text() == "mine"


def test_recording_id_is_stable_and_path_safe(tmp_path):
    rec = read(str(X86))
    a = recording_id(X86, rec)
    shutil.copy(X86, tmp_path / "we ird;name.kvt")
    b = recording_id(tmp_path / "we ird;name.kvt", read(str(tmp_path / "we ird;name.kvt")))
    assert a == recording_id(X86, read(str(X86))) and re.fullmatch(r"x86-pvm-demo-[0-9a-f]{8}", a)
    assert b == "we_ird_name-" + a.rsplit("-", 1)[1]
    assert xp.host_value("a b/c") == "a%20b%2Fc" and xp.host_value(None) == xp.NULL_PARTITION
    with pytest.raises(ExportError):
        xp.export([], tmp_path / "x")
