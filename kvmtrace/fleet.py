"""Many recordings from many hosts, summarised per host, kernel, architecture,
KVM flavour and VMM: verdict counts, mismatches, errors, faults, fault
service-time percentiles and lost events (one row each, declared as
``fleet`` in analysis/schema.py).

Inputs are .kvt recordings, directories of them, globs, and Parquet datasets
written by ``kvmtrace export --format parquet`` (a directory holding
``_kvmtrace_dataset.json``). Recordings are exported to a temporary dataset
first; the summary is then computed over the Parquet files, by one of:

- ``duckdb`` (default): one SQL query, in-process;
- ``dask``: the same summary on Dask distributed (an existing scheduler, or a
  local cluster): the per-event tables (verdicts, errors, faults, lost_where)
  are read and aggregated on the workers, the per-recording tables
  (recordings, processes: a row per recording or VMM process) are gathered
  and joined on the client. Both give the same rows, counts exact.

Percentiles are nearest rank, so both engines compute them exactly and agree:
p-th percentile of n sorted service times = the value at 1-based position
ceil(n*p/100), computed in integers as (n*p + 99) // 100; always an observed
value. Dask gets them from the exact histogram of (group, service_ns) counts.

The VMM of a process is its program when the recording names it
(processes.vmm, export/tables.py), else ``pid N``; a recording with no VMM
process at all is one row with vmm ``(no VMM seen)``. Loss: ``lost_events``
counts what the BPF side placed in the group's processes (lost_where);
``recordings_lost_events`` all events lost in the group's recordings.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from urllib.parse import unquote

import pandas as pd

from .analysis import schema
from .export import ExportError, need
from .export import parquet as xp
from .export.tables import NO_VMM

__all__ = ["FleetError", "Fleet", "resolve", "summarise", "duckdb_summary", "dask_summary",
           "nearest_rank", "KEYS", "PERCENTILES"]

KEYS = ["host", "kernel", "arch", "kvm", "vmm"]
PERCENTILES = (50, 90, 99)
_GLOB = set("*?[")
_NULL = "\x00null"  # a null key value inside the Dask computation
# files (one per recording) read by one Dask task: a partition is then
# thousands to millions of rows for real recordings, not a few
FILES_PER_PARTITION = 32


class FleetError(Exception):
    """Input kvmtrace cannot summarise (one line for the user)."""


@dataclass
class Fleet:
    summary: pd.DataFrame            # the fleet table
    recordings: pd.DataFrame         # recordings table of every input (host, recording, ...)
    engine: str
    skipped: list = field(default_factory=list)  # (path, why)


# -- inputs ---------------------------------------------------------------------

def resolve(inputs) -> tuple[list[str], list[str]]:
    """(dataset roots, recording files) named by ``inputs``: files, directories
    of .kvt files (searched recursively), globs, datasets."""
    roots, files = [], []
    for arg in inputs:
        arg = os.fspath(arg)
        if not os.path.lexists(arg) and _GLOB & set(arg):
            hits = sorted(glob.glob(arg, recursive=True))
            if not hits:
                raise FleetError(f"{arg}: no file matches")
        else:
            hits = [arg]
        for p in hits:
            if not os.path.exists(p):
                raise FleetError(f"{p}: no such file or directory")
            if os.path.isdir(p):
                if xp.read_manifest(p) is not None:
                    roots.append(os.path.abspath(p))
                    continue
                found = sorted(glob.glob(os.path.join(glob.escape(p), "**", "*.kvt"),
                                         recursive=True))
                found = [f for f in found if os.path.isfile(f)]
                if not found:
                    raise FleetError(f"{p}: no .kvt recordings in it, and not a kvmtrace "
                                     f"dataset (no {xp.MANIFEST})")
                files += found
            else:
                files.append(p)
    seen = set()
    for f in files:
        k = os.path.realpath(f)
        if k in seen:
            raise FleetError(f"{f}: given twice")
        seen.add(k)
    return list(dict.fromkeys(roots)), files


def _decode_partition(value: str):
    return None if value == xp.NULL_PARTITION else unquote(value)


def _files(roots, table: str) -> list[str]:
    return sorted(f for r in roots for f in glob.glob(xp.table_glob(r, table)))


def _read_file(path: str, columns=None) -> pd.DataFrame:
    """One Parquet file of a dataset with its host and recording (from the
    path), integers as exact (nullable) integers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=columns)
    ints = {pa.int64(): pd.Int64Dtype(), pa.uint64(): pd.UInt64Dtype()}
    df = t.to_pandas(types_mapper=ints.get)
    rec_dir = os.path.dirname(path)
    df["host"] = pd.Series([_decode_partition(os.path.basename(os.path.dirname(rec_dir))
                                              .partition("=")[2])] * len(df), dtype=object)
    df["recording"] = pd.Series([_decode_partition(os.path.basename(rec_dir)
                                                   .partition("=")[2])] * len(df), dtype=object)
    return df


def _read_files(paths: list[str], columns=None) -> pd.DataFrame:
    """Several files of one table as one frame (a Dask partition)."""
    return pd.concat([_read_file(p, columns) for p in paths], ignore_index=True)


def _read_all(roots, table: str, columns=None) -> pd.DataFrame:
    fs = _files(roots, table)
    parts = [_read_file(f, columns) for f in fs]
    if parts:
        return pd.concat(parts, ignore_index=True)
    return pd.DataFrame(columns=(columns or schema.TABLES[table].names) + ["host", "recording"])


def _check_unique(recs: pd.DataFrame):
    for cols, what in ((["host", "recording"], "recording id"), (["header_sha256"], "header")):
        dup = recs[recs.duplicated(cols, keep=False)]
        if len(dup):
            r = dup.iloc[0]
            raise FleetError(f"recording {r['recording']} (host {r['host']}) is in the inputs "
                             f"twice (same {what}): give each recording once")


# -- DuckDB -----------------------------------------------------------------------

def _sql_list(roots, table: str) -> str:
    globs = [xp.table_glob(r, table) for r in roots]
    return "[" + ", ".join("'" + g.replace("'", "''") + "'" for g in globs) + "]"


def duckdb_summary(roots) -> pd.DataFrame:
    """The fleet table over the datasets at ``roots``, in one DuckDB query."""
    duckdb = need("duckdb", "fleet")

    def src(table):
        return (f"read_parquet({_sql_list(roots, table)}, hive_partitioning = true, "
                "hive_types = {'host': VARCHAR, 'recording': VARCHAR})")

    keys = ", ".join(KEYS)
    ukeys = ", ".join(f"u.{k}" for k in KEYS)
    join = ("JOIN units u ON x.recording = u.recording AND x.host IS NOT DISTINCT FROM u.host "
            "AND x.pid = u.pid AND x.proc = u.proc")
    pct = ",\n".join(
        f"  min(service_ns) FILTER (WHERE kind = 'fault' AND rn = (n * {p} + 99) // 100) "
        f"AS service_p{p}_ns" for p in PERCENTILES)
    verdicts = ",\n".join(f"  count(*) FILTER (WHERE kind = 'verdict' AND verdict = '{v}') AS {v}"
                          for v in ("consistent", "downgraded", "upgraded", "rejected",
                                    "unknown"))
    sql = f"""
WITH rec AS (SELECT host, recording, kernel, arch, kvm, complete, lost_events
             FROM {src('recordings')}),
proc AS (SELECT host, recording, pid, proc, vmm FROM {src('processes')}),
units AS (SELECT r.host, r.recording, r.kernel, r.arch, r.kvm, r.complete, r.lost_events,
                 p.pid, p.proc, coalesce(p.vmm, '{NO_VMM}') AS vmm
          FROM rec r LEFT JOIN proc p
            ON p.recording = r.recording AND p.host IS NOT DISTINCT FROM r.host),
facts AS (
  SELECT {keys}, 'unit' AS kind, recording, pid, complete, NULL::VARCHAR AS verdict,
         NULL::BIGINT AS version, NULL::BIGINT AS service_ns, NULL::BIGINT AS rn,
         NULL::BIGINT AS n, NULL::BIGINT AS cnt FROM units
  UNION ALL
  SELECT DISTINCT {keys}, 'recording', recording, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         lost_events FROM units
  UNION ALL
  SELECT {ukeys}, 'verdict', x.recording, x.pid, NULL, x.verdict, x.version, NULL, NULL, NULL,
         NULL FROM {src('verdicts')} x {join}
  UNION ALL
  SELECT {ukeys}, 'error', x.recording, x.pid, NULL, NULL, NULL, NULL, NULL, NULL, NULL
  FROM {src('errors')} x {join}
  UNION ALL
  SELECT {ukeys}, 'fault', x.recording, x.pid, NULL, NULL, NULL, x.service_ns,
         CASE WHEN x.service_ns IS NOT NULL THEN row_number() OVER (
           PARTITION BY {ukeys}, x.service_ns IS NULL ORDER BY x.service_ns) END,
         count(x.service_ns) OVER (PARTITION BY {ukeys}), NULL
  FROM {src('faults')} x {join}
  UNION ALL
  SELECT {ukeys}, 'lost', x.recording, x.pid, NULL, NULL, NULL, NULL, NULL, NULL, x.count
  FROM {src('lost_where')} x {join}
)
SELECT {keys},
  count(DISTINCT recording) FILTER (WHERE kind = 'unit') AS recordings,
  count(DISTINCT recording) FILTER (WHERE kind = 'unit' AND NOT complete) AS incomplete,
  count(*) FILTER (WHERE kind = 'unit' AND pid IS NOT NULL) AS processes,
  count(*) FILTER (WHERE kind = 'verdict' AND version >= 0) AS slot_versions,
{verdicts},
  count(*) FILTER (WHERE kind = 'verdict' AND verdict IN ('downgraded', 'upgraded'))
    AS mismatches,
  count(*) FILTER (WHERE kind = 'error') AS errors,
  count(*) FILTER (WHERE kind = 'fault') AS faults,
  count(service_ns) FILTER (WHERE kind = 'fault') AS timed_faults,
{pct},
  max(service_ns) FILTER (WHERE kind = 'fault') AS service_max_ns,
  coalesce(sum(cnt) FILTER (WHERE kind = 'lost'), 0)::BIGINT AS lost_events,
  coalesce(sum(cnt) FILTER (WHERE kind = 'recording'), 0)::BIGINT AS recordings_lost_events
FROM facts GROUP BY {keys}
"""
    con = duckdb.connect()
    try:
        rel = con.sql(sql)
        df = _exact(rel.to_arrow_table() if hasattr(rel, "to_arrow_table")
                    else rel.fetch_arrow_table())
    finally:
        con.close()
    return finish(df)


def _exact(t) -> pd.DataFrame:
    """An Arrow table as pandas, integers as exact nullable integers."""
    import pyarrow as pa

    ints = {pa.int64(): pd.Int64Dtype(), pa.uint64(): pd.UInt64Dtype()}
    return t.to_pandas(types_mapper=ints.get)


def finish(df: pd.DataFrame) -> pd.DataFrame:
    """The fleet table in its declared columns and types, sorted by its keys."""
    df = df.copy()
    for k in KEYS:
        df[k] = df[k].astype(object).where(df[k].notna(), None)
    for c in schema.FLEET.columns:
        if c.dtype == "int64" and c.name in df:
            df[c.name] = df[c.name].astype("int64")
        elif c.dtype == "Int64" and c.name in df:
            df[c.name] = pd.array(df[c.name].astype(object).where(df[c.name].notna(), None),
                                  dtype="Int64")
    df = df.sort_values(KEYS, na_position="last", kind="stable")
    return schema.FLEET.conform(df)


# -- Dask ---------------------------------------------------------------------------

def nearest_rank(hist: pd.DataFrame, keys: list[str], value: str = "service_ns",
                 count: str = "count", pcts=PERCENTILES) -> pd.DataFrame:
    """Per group of ``keys``: n, max and the nearest-rank percentiles of
    ``value`` from its exact histogram (one row per distinct value, ``count``)."""
    cols = keys + ["timed_faults", "service_max_ns"] + [f"service_p{p}_ns" for p in pcts]
    if not len(hist):
        return pd.DataFrame(columns=cols)
    h = hist.sort_values(keys + [value], kind="stable").reset_index(drop=True)
    g = h.groupby(keys, sort=False, dropna=False)
    h["cum"] = g[count].cumsum()
    n = g[count].transform("sum")
    out = g.agg(timed_faults=(count, "sum"), service_max_ns=(value, "max")).reset_index()
    for p in pcts:
        rank = (n * p + 99) // 100
        hit = h[h["cum"] >= rank]
        first = hit.groupby(keys, sort=False, dropna=False)[value].first().rename(
            f"service_p{p}_ns").reset_index()
        out = out.merge(first, on=keys, how="left")
    return out[cols]


def _with_keys(df: pd.DataFrame, ukeys: pd.DataFrame, join: list[str]) -> pd.DataFrame:
    """Rows of one partition with their group keys (inner join on the process)."""
    df = df.assign(host=df["host"].astype(object).where(df["host"].notna(), _NULL),
                   pid=df["pid"].astype("int64"), proc=df["proc"].astype("int64"))
    return df.merge(ukeys, on=join, how="inner")


def _units(recs: pd.DataFrame, procs: pd.DataFrame) -> pd.DataFrame:
    u = recs.merge(procs[["host", "recording", "pid", "proc", "vmm"]], on=["host", "recording"],
                   how="left")
    u["vmm"] = u["vmm"].astype(object).where(u["vmm"].notna(), NO_VMM)
    return u


def dask_summary(roots, client) -> pd.DataFrame:
    """The fleet table over the datasets at ``roots``, computed on the Dask
    cluster of ``client`` (a distributed.Client)."""
    dd = need("dask.dataframe", "fleet")

    def table(name, columns):
        fs = _files(roots, name)
        if not fs:
            raise FleetError(f"no {name} table in the dataset(s)")
        chunks = [fs[i:i + FILES_PER_PARTITION] for i in range(0, len(fs), FILES_PER_PARTITION)]
        return dd.from_map(functools.partial(_read_files, columns=columns), chunks,
                           label=f"read-{name}")

    rcols = ["kernel", "arch", "kvm", "complete", "lost_events"]
    recs, procs = client.compute([table("recordings", rcols),
                                  table("processes", ["pid", "proc", "vmm"])], sync=True)
    units = _units(recs, procs)
    for k in KEYS:
        units[k] = units[k].astype(object).where(units[k].notna(), _NULL)
    join = ["host", "recording", "pid", "proc"]
    ukeys = units[join + [k for k in KEYS if k not in join]].dropna(subset=["pid"]).astype(
        {"pid": "int64", "proc": "int64"})

    def keyed(name, columns):
        # each partition joined with the (small) units table, sent along with
        # the task: a broadcast join, no shuffle
        t = table(name, columns)
        return t.map_partitions(_with_keys, ukeys, join,
                                meta=_with_keys(t._meta, ukeys.iloc[:0], join))

    v = keyed("verdicts", ["pid", "proc", "version", "verdict"])
    v = v.assign(judged=v["version"] >= 0)
    e = keyed("errors", ["pid", "proc"])
    f = keyed("faults", ["pid", "proc", "service_ns"])
    lw = keyed("lost_where", ["pid", "proc", "count"])
    timed = f[~f["service_ns"].isna()]
    # tree reductions (split_out=1): partial counts per partition, combined
    jobs = [v.groupby(KEYS + ["verdict", "judged"]).size(split_out=1),
            e.groupby(KEYS).size(split_out=1),
            f.groupby(KEYS).size(split_out=1),
            timed.groupby(KEYS + ["service_ns"]).size(split_out=1),
            lw.groupby(KEYS)["count"].sum(split_out=1)]
    vs, es, fs, hist, ls = client.compute(jobs, sync=True)

    # per-recording facts: small, on the client
    g = units.groupby(KEYS, dropna=False)
    out = g.agg(recordings=("recording", "nunique"), processes=("pid", "count")).reset_index()
    inc = units[~units["complete"].astype(bool)].groupby(KEYS)["recording"].nunique()
    out = out.merge(inc.rename("incomplete").reset_index(), on=KEYS, how="left")
    rl = units.drop_duplicates(KEYS + ["recording"]).groupby(KEYS)["lost_events"].sum()
    out = out.merge(rl.rename("recordings_lost_events").reset_index(), on=KEYS, how="left")

    vs = vs.rename("n").reset_index()
    for name in ("consistent", "downgraded", "upgraded", "rejected", "unknown"):
        c = vs[vs["verdict"] == name].groupby(KEYS)["n"].sum().rename(name)
        out = out.merge(c.reset_index(), on=KEYS, how="left")
    sv = vs[vs["judged"].astype(bool)].groupby(KEYS)["n"].sum().rename("slot_versions")
    out = out.merge(sv.reset_index(), on=KEYS, how="left")
    for s, name in ((es, "errors"), (fs, "faults"), (ls, "lost_events")):
        out = out.merge(s.rename(name).reset_index(), on=KEYS, how="left")
    hist = hist.rename("count").reset_index()
    hist["service_ns"] = hist["service_ns"].astype("int64")
    out = out.merge(nearest_rank(hist, KEYS), on=KEYS, how="left")
    counts = [c.name for c in schema.FLEET.columns if c.dtype == "int64"]
    for c in counts:
        if c in out:
            out[c] = out[c].fillna(0)
    out["mismatches"] = out["downgraded"] + out["upgraded"]
    for k in KEYS:
        out[k] = out[k].where(out[k] != _NULL, None)
    return finish(out)


# -- the whole command ------------------------------------------------------------

def summarise(inputs, engine: str = "duckdb", client=None, scheduler: str | None = None,
              workers: int = 2, skip_unreadable: bool = False, progress=None) -> Fleet:
    """The fleet summary of ``inputs`` (see the module doc). ``engine`` duckdb
    or dask; for dask a ``client``, a ``scheduler`` address, or else a local
    cluster of ``workers`` processes."""
    if engine not in ("duckdb", "dask"):
        raise FleetError(f"unknown engine {engine!r} (duckdb or dask)")
    need("pyarrow.parquet", "export")
    need("duckdb" if engine == "duckdb" else "distributed", "fleet")
    roots, files = resolve(inputs)
    if not roots and not files:
        raise FleetError("no recordings given")
    tmp = None
    skipped: list = []
    try:
        if files:
            tmp = tempfile.mkdtemp(prefix="kvmtrace-fleet-")  # 0700
            ds = os.path.join(tmp, "dataset")
            try:
                xp.export(files, ds, progress=progress,
                          on_unreadable=(lambda p, why: skipped.append((p, why)))
                          if skip_unreadable else None)
            except ExportError as e:
                raise FleetError(str(e)) from None
            if os.path.isdir(ds):
                roots.append(ds)
        if not roots:
            raise FleetError("no readable recording among the inputs")
        recs = _read_all(roots, "recordings")
        _check_unique(recs)
        if engine == "duckdb":
            df = duckdb_summary(roots)
        else:
            df = _with_client(client, scheduler, workers, lambda c: dask_summary(roots, c))
        return Fleet(df, recs, engine, skipped)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _with_client(client, scheduler, workers, run):
    if client is not None:
        return run(client)
    distributed = need("distributed", "fleet")
    if scheduler:
        try:
            c = distributed.Client(scheduler, timeout="20s")
        except (OSError, ValueError, TypeError) as e:  # unreachable, or not an address
            raise FleetError(f"dask scheduler {scheduler}: {str(e).splitlines()[0]}") \
                from None
        with c:
            return run(c)
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        return run(c)


# -- views --------------------------------------------------------------------------

def _us(ns) -> str:
    return "" if pd.isna(ns) else f"{int(ns) / 1000:.1f} us"


def to_text(fleet: Fleet, console):
    """The fleet table for people, fitted to the console's width (render.fit_table:
    low-value columns go first, numbers are never split); every recorded
    string shown literally."""
    from rich.text import Text

    from .render import Col, fit_table, plain

    df = fleet.summary
    # left out first at narrow widths: drop=1, then 2, ...
    cols = [Col("host"), Col("kernel"), Col("kvm", drop=4), Col("vmm", kind="prose", min=12),
            Col("recordings", "num", short="recs"),
            Col("incomplete", "num", drop=3, short="cut"), Col("slots", "num", drop=2),
            Col("consistent", "num", drop=1, short="ok"), Col("mismatches", "num", short="mism"),
            Col("rejected", "num", drop=2, short="rej"), Col("unknown", "num", drop=1,
                                                              short="unk"),
            Col("errors", "num", short="err"), Col("faults", "num", drop=6), Col("p50", "num"),
            Col("p90", "num", drop=3), Col("p99", "num", drop=5), Col("lost", "num")]
    rows = []
    for r in df.itertuples(index=False):
        lost = f"{r.lost_events}" + (f"/{r.recordings_lost_events}"
                                     if r.recordings_lost_events != r.lost_events else "")
        rows.append([Text(plain("null" if v is None else v)) for v in
                     (r.host, r.kernel, r.kvm, r.vmm)]
                    + [r.recordings, r.incomplete, r.slot_versions, r.consistent,
                       Text(str(r.mismatches), style="bold red" if r.mismatches else ""),
                       r.rejected, r.unknown,
                       Text(str(r.errors), style="red" if r.errors else ""), r.faults,
                       _us(r.service_p50_ns), _us(r.service_p90_ns), _us(r.service_p99_ns),
                       Text(lost, style="yellow" if r.recordings_lost_events else "")])
    fit_table(console, f"fleet: {len(fleet.recordings)} recordings, "
                       f"{fleet.recordings['host'].nunique(dropna=False)} hosts ({fleet.engine})",
              cols, rows)
    console.print(Text("p50 / p90 / p99: fault service time, nearest rank; slots: slot "
                       "versions judged; incomplete (cut): recordings not closed cleanly; lost: "
                       "events lost in these VMMs / in their recordings", style="dim"))
    for _, why in fleet.skipped:
        console.print(Text(plain(f"skipped: {why}"), style="yellow"))


def to_json(fleet: Fleet) -> str:
    import json

    body = {"tables_schema_version": schema.SCHEMA_VERSION, "engine": fleet.engine,
            "percentiles": "nearest rank: the value at 1-based position ceil(n*p/100) of the "
                           "n sorted service times",
            "skipped": [{"path": p, "why": w} for p, w in fleet.skipped],
            "recordings": schema.records(fleet.recordings.sort_values(
                ["host", "recording"], na_position="last")[
                    ["host", "recording"] + schema.RECORDINGS.names]),
            "fleet": schema.records(fleet.summary)}
    return json.dumps(body, indent=1) + "\n"


def found(fleet: Fleet, what: str) -> str | None:
    """--fail-on: a one-line finding, or None."""
    s = fleet.summary
    if what == "mismatch" and s["mismatches"].sum():
        return f"{int(s['mismatches'].sum())} memory-type mismatch(es) in the fleet"
    if what == "error" and s["errors"].sum():
        return f"{int(s['errors'].sum())} error(s) in the fleet"
    if what == "loss" and s["recordings_lost_events"].sum():
        return f"{int(s['recordings_lost_events'].sum()):,} events lost in the fleet"
    if what == "incomplete" and s["incomplete"].sum():
        return f"{int(s['incomplete'].sum())} incomplete recording(s) in the fleet"
    if what == "unreadable" and fleet.skipped:
        return f"{len(fleet.skipped)} unreadable recording(s) skipped"
    return None
