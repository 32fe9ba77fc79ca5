"""kvmtrace fleet: many recordings summarised per host, kernel, KVM flavour and
VMM, on DuckDB (default) and on a Dask distributed local cluster of 2 worker
processes, with the same rows; both checked against a summary computed here
from kvmtrace.load() of each recording (numpy's sort for the nearest-rank
percentiles).

The fleet is made from the committed fixtures, each re-written by the current
writer with another host name (the x86 demo on two hosts, the arm64 6.1 and
7.x recordings on two more, one host with a name that needs escaping in a
path, one recording cut short, one with lost events)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import kvmtrace
from conftest import FIXTURES, kvmtrace as run, one_line_error
from kvmtrace import fleet
from kvmtrace.analysis import schema
from kvmtrace.export import parquet as xp
from kvmtrace.recording import format as fmt

X86 = FIXTURES / "x86-pvm-demo.kvt"
# both arm64 kernels; the bar recordings hold mismatches and refusals
ARM = sorted(p for p in (FIXTURES / "arm64").glob("*.kvt") if not p.name.startswith("cbar"))
WEIRD_HOST = "rack 7/b=1%"


def rehost(src: Path, dst: Path, host, notes=(), rows=()):
    """``src`` re-written by the current writer (batch for batch) with meta
    host ``host`` (None: no host), then ``notes`` (key, value) and ``rows``
    (table, [row, ...]) added in a last flush."""
    from kvmtrace.recording.writer import RecordingWriter

    with pa.ipc.open_stream(pa.py_buffer(Path(src).read_bytes())) as r:
        meta = json.loads(r.schema.metadata[fmt.META_KEY])
        if host is None:
            meta.pop("host", None)
        else:
            meta["host"] = host
        w = RecordingWriter(str(dst), meta)
        for b in r:
            for i, name in enumerate(b.schema.names):
                typ = w.types[name]
                batch_rows = [{f.name: row.get(f.name, "" if pa.types.is_string(f.type) else 0)
                               for f in typ} for row in b.column(i).flatten().to_pylist()]
                if batch_rows:
                    w.add_rows(name, batch_rows)
            w.flush(force=True)
    for key, value in notes:
        w.note(key, value)
    for table, add in rows:
        w.add_rows(table, list(add))
    w.close()


def make_fleet(d: Path) -> dict[str, Path]:
    """The test fleet in ``d`` (nested directories, as hosts would upload)."""
    out = {}
    for host in ("x86-a", "x86-b"):
        p = d / host / "demo.kvt"
        p.parent.mkdir(parents=True, exist_ok=True)
        rehost(X86, p, host)
        out[host] = p
    for src in ARM:
        host = "arm-a" if "6.1" in src.name else "arm-b"
        p = d / host / src.name
        p.parent.mkdir(parents=True, exist_ok=True)
        rehost(src, p, host)
        out[f"{host}/{src.name}"] = p
    # a host whose name needs escaping in a path, with 5 lost set_spte events
    # placed in slot 1 of the VMM (pid 7249) by the BPF side
    p = d / "weird" / "lossy.kvt"
    p.parent.mkdir()
    rehost(X86, p, WEIRD_HOST,
           notes=[("lost_where", [["set_spte", 7249, 4096, 5, 1533863983012, 1533863983012]])],
           rows=[("stats", [{"ts": 1533900605747, "kind": "set_spte", "events": 229,
                             "lost": 5}])])
    out["weird"] = p
    # cut short: still a recording, but incomplete
    p = d / "x86-c" / "cut.kvt"
    p.parent.mkdir()
    tmp = d / "whole.tmp"
    rehost(X86, tmp, "x86-c")
    data = tmp.read_bytes()
    p.write_bytes(data[:len(data) - 100])
    tmp.unlink()
    out["cut"] = p
    return out


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    make_fleet(d / "kvt")
    return d / "kvt"


@pytest.fixture(scope="module")
def dataset(fleet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "dataset"
    xp.export(sorted(fleet_dir.rglob("*.kvt")), out)
    return out


@pytest.fixture(scope="module")
def by_duckdb(dataset):
    return fleet.summarise([dataset])


def _label(argv):
    prog = os.path.basename(argv[0])
    return f"{prog} -m {argv[argv.index('-m') + 1]}"


def expected(paths) -> pd.DataFrame:
    """The fleet table computed here, recording by recording, from the models."""
    groups: dict = {}
    for p in paths:
        m = kvmtrace.load(str(p))
        meta = m.meta
        kvm = meta.get("kvm") or {}
        procs = set(zip(m.faults["pid"], m.faults["proc"])) | set(zip(m.ops["pid"], m.ops["proc"]))
        key = (meta.get("host"), meta["kernel"], meta.get("arch"),
               f"{kvm.get('vendor')}/{kvm.get('mmu')}",
               _label(meta["filter"]["command"]) if procs else "(no VMM seen)")
        g = groups.setdefault(key, {"recordings": 0, "incomplete": 0, "processes": 0,
                                    "verdicts": [], "errors": 0, "service": [], "faults": 0,
                                    "lost_events": 0, "recordings_lost_events": 0,
                                    "slot_versions": 0})
        g["recordings"] += 1
        g["incomplete"] += not (m.recording.complete and not m.recording.problems)
        g["processes"] += len(procs)
        g["verdicts"] += list(m.verdicts["verdict"])
        g["slot_versions"] += int((m.verdicts["version"] >= 0).sum())
        g["errors"] += len(m.errors)
        g["faults"] += len(m.faults)
        g["service"] += [int(x) for x in m.faults["service_ns"].dropna()]
        g["lost_events"] += int(m.lost_where["count"].sum())
        g["recordings_lost_events"] += int(m.lost["lost"].sum())
    rows = []
    for key, g in groups.items():
        row = dict(zip(fleet.KEYS, key))
        v = pd.Series(g.pop("verdicts"), dtype=object).value_counts()
        for name in ("consistent", "downgraded", "upgraded", "rejected", "unknown"):
            row[name] = int(v.get(name, 0))
        row["mismatches"] = row["downgraded"] + row["upgraded"]
        s = np.sort(np.array(g.pop("service"), dtype=np.int64))
        row["timed_faults"] = len(s)
        for pct in fleet.PERCENTILES:  # nearest rank, by its textbook definition
            row[f"service_p{pct}_ns"] = int(s[math.ceil(len(s) * pct / 100) - 1]) \
                if len(s) else None
        row["service_max_ns"] = int(s[-1]) if len(s) else None
        row.update(g)
        rows.append(row)
    return fleet.finish(pd.DataFrame(rows))


def test_duckdb_summary_matches_the_models(fleet_dir, by_duckdb):
    want = expected(sorted(fleet_dir.rglob("*.kvt")))
    got = by_duckdb.summary
    pd.testing.assert_frame_equal(got, want)
    assert list(got.columns) == schema.FLEET.names
    assert {c: str(d) for c, d in got.dtypes.items()} == schema.FLEET.dtypes
    # what the fleet holds: 6 hosts, the arm64 kernels apart, the loss and the cut seen
    assert set(got["host"]) == {"x86-a", "x86-b", "x86-c", "arm-a", "arm-b", WEIRD_HOST}
    w = got[got["host"] == WEIRD_HOST].iloc[0]
    assert (w["lost_events"], w["recordings_lost_events"]) == (5, 5)
    # cut before its first batch with events: a recording without a VMM is a row too
    cut = got[got["host"] == "x86-c"].iloc[0]
    assert (cut["incomplete"], cut["vmm"], cut["processes"]) == (1, "(no VMM seen)", 0)
    assert got["mismatches"].sum() > 0 and got["rejected"].sum() > 0
    assert (got.loc[got["host"] != "x86-c", "vmm"].str.contains("-m kvmtrace.guest")).all()


def test_dask_on_a_local_cluster_gives_the_same_rows(dataset, by_duckdb, monkeypatch):
    distributed = pytest.importorskip("distributed")
    # several partitions per table, so the tree reductions really combine
    monkeypatch.setattr(fleet, "FILES_PER_PARTITION", 3)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        got = fleet.summarise([dataset], engine="dask", client=client)
    pd.testing.assert_frame_equal(got.summary, by_duckdb.summary)


def test_recordings_directory_glob_and_dataset_agree(fleet_dir, dataset, by_duckdb):
    from_dir = fleet.summarise([fleet_dir])
    pd.testing.assert_frame_equal(from_dir.summary, by_duckdb.summary)
    # a glob and a directory: rows are per host, so those hosts' rows are the same
    parts = fleet.summarise([str(fleet_dir / "x86-[ab]" / "*.kvt"), fleet_dir / "arm-b"])
    full = by_duckdb.summary
    want = full[full["host"].isin(["x86-a", "x86-b", "arm-b"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(parts.summary, want)


def test_nearest_rank_is_the_textbook_definition():
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 10, 99, 100, 101, 1000):
        x = rng.integers(0, 50, n)  # ties on purpose
        vals, counts = np.unique(x, return_counts=True)
        hist = pd.DataFrame({"k": "a", "service_ns": vals, "count": counts})
        got = fleet.nearest_rank(hist, ["k"]).iloc[0]
        s = np.sort(x)
        for p in fleet.PERCENTILES:
            assert got[f"service_p{p}_ns"] == s[math.ceil(n * p / 100) - 1], (n, p)
        assert got["timed_faults"] == n and got["service_max_ns"] == s[-1]


def test_a_recording_twice_is_refused(fleet_dir, dataset, tmp_path):
    with pytest.raises(fleet.FleetError, match="given twice"):
        fleet.summarise([fleet_dir / "x86-a" / "demo.kvt", fleet_dir / "x86-a"])
    with pytest.raises(fleet.FleetError, match="twice"):
        fleet.summarise([dataset, fleet_dir / "x86-a" / "demo.kvt"])


class _Result:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def cli(*args):
    """The kvmtrace CLI in-process (click's runner): as `kvmtrace ARGS`, quicker."""
    from click.testing import CliRunner

    from kvmtrace.cli import main
    return _Result(CliRunner().invoke(main, [str(a) for a in args]))


def test_cli_text_json_tsv_csv_and_fail_on(dataset, by_duckdb, tmp_path):
    r = run("fleet", dataset)  # once as a user runs it
    assert r.returncode == 0, r.stderr
    assert "arm-b" in r.stdout and "nearest rank" in r.stdout
    assert "rack 7/b=1%" in r.stdout
    r = cli("fleet", dataset, "--width", "80")  # fitted: columns left out, never split
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    assert "left out at 80 columns" in r.stdout and "100.0 us" in r.stdout
    assert "--width applies" in one_line_error(cli("fleet", dataset, "--format", "json",
                                                   "--width", "80"))
    r = cli("fleet", dataset, "--format", "json")
    body = json.loads(r.stdout)
    assert body["tables_schema_version"] == schema.SCHEMA_VERSION
    assert body["fleet"] == schema.records(by_duckdb.summary)
    assert len(body["recordings"]) == 8
    r = cli("fleet", dataset, "--format", "tsv")
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == schema.FLEET.names and len(lines) == 1 + len(by_duckdb.summary)
    out = tmp_path / "fleet.csv"
    r = cli("fleet", dataset, "--format", "csv", "-o", out)
    assert r.returncode == 0 and oct(out.stat().st_mode & 0o777) == "0o600"
    assert pd.read_csv(out)["faults"].sum() == by_duckdb.summary["faults"].sum()
    r = cli("fleet", dataset, "--fail-on", "mismatch")
    assert r.returncode == 1 and "mismatch" in r.stderr
    assert cli("fleet", dataset, "--fail-on", "loss").returncode == 1
    assert cli("fleet", dataset, "--fail-on", "incomplete").returncode == 1


def test_cli_bad_input_is_one_line(tmp_path, dataset):
    assert "no such file" in one_line_error(cli("fleet", tmp_path / "nope"))
    assert "no file matches" in one_line_error(cli("fleet", str(tmp_path / "*.kvt")))
    assert "no .kvt recordings" in one_line_error(cli("fleet", tmp_path))
    junk = tmp_path / "junk.kvt"
    junk.write_text("not a recording\n" * 10)
    assert "not a kvmtrace recording" in one_line_error(run("fleet", junk))  # as a user sees it
    assert "apply to --engine dask" in one_line_error(cli("fleet", junk, "--workers", "2"))
    assert "--workers 0" in one_line_error(cli("fleet", junk, "--engine", "dask",
                                               "--workers", "0"))
    assert "unknown address scheme" in one_line_error(
        cli("fleet", dataset, "--engine", "dask", "--scheduler", "nonsense://x"))


def test_skip_unreadable_names_what_it_left_out(tmp_path):
    shutil.copy(X86, tmp_path / "good.kvt")
    (tmp_path / "bad.kvt").write_bytes(b"\x00" * 64)
    r = cli("fleet", tmp_path, "--skip-unreadable", "--format", "json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert [s["path"] for s in body["skipped"]] == [str(tmp_path / "bad.kvt")]
    assert "skipped" in r.stderr and body["fleet"][0]["recordings"] == 1
    r = cli("fleet", tmp_path, "--skip-unreadable", "--fail-on", "unreadable")
    assert r.returncode == 1


def test_report_of_many_recordings_is_the_fleet_summary(fleet_dir):
    """`kvmtrace report DIR` (or a glob) gives what `kvmtrace fleet` gives, and
    refuses the options that only apply to one recording."""
    for path in (fleet_dir, f"{fleet_dir}/**/*.kvt"):
        r, f = (run(cmd, path, "--format", "csv") for cmd in ("report", "fleet"))
        assert r.returncode == f.returncode == 0, r.stderr + f.stderr
        assert r.stdout == f.stdout and r.stdout.startswith("host,")
    assert "apply to one recording" in one_line_error(run("report", fleet_dir, "--slot", "1"))
