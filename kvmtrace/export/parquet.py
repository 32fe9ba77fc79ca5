"""Recordings as one Parquet dataset, Hive-partitioned by host and recording.

Layout (``EXPORT_VERSION`` 1)::

    DIR/_kvmtrace_dataset.json                      what is here (versions, tables, columns)
    DIR/<table>/host=<H>/recording=<R>/part-0.parquet   derived tables (analysis/schema.py):
        ops slots faults prefetch invalidations exits errors verdicts ranges lost
        lost_where, and recordings processes (one row per recording / VMM process)
    DIR/raw/<kind>/host=<H>/recording=<R>/part-0.parquet  raw events (probes/events.py),
        the smaps snapshots (vmas), flush statistics (stats) and notes

Every recording has a file in every table (zero rows where it has none), so
every table directory can be read on its own, and a glob never comes back
empty. ``R`` is ``recording_id``: the file name stem and 8 hex digits of its
header digest, stable for a file and safe in a path. ``H`` is the recorded
host name, ASCII characters other than ``A-Z a-z 0-9 . _ -`` percent-encoded
(as Hive escapes partition values: DuckDB, polars, pyarrow and Spark decode
it); non-ASCII characters are kept as UTF-8 (Spark decodes %XX byte by
byte); a missing host is ``__HIVE_DEFAULT_PARTITION__``, which all four read
as null. ``recordings.hostname`` holds the host name as recorded.

Column types are the declarations' (analysis/schema.py for derived tables,
recording/format.py for raw ones): integers stay integers, nullable where
declared, floats only for fractions. 64-bit unsigned values (addresses,
sptes, vm_flags, ``end_ts`` = 2**64-1 for a live slot) are stored as Parquet
``INT(64, unsigned)``: exact in DuckDB (UBIGINT), polars (UInt64) and
pyarrow (uint64); Spark, which has no unsigned 64-bit type, reads them as
``decimal(20,0)``, also exact (checked with Spark 4.3). They are not stored as
int64 two's complement: an address past 2**63 would then compare below
zero in every engine. Unsigned 8/16/32-bit raw fields read in Spark as the
next wider signed type. No timestamps types (times are integer ns of
CLOCK_MONOTONIC; ``recordings.start_realtime_ns`` ties them to the wall
clock), no nested types; snappy compression.

Readers infer the type of a partition value: pass the partition columns as
strings where a host name could look like a number (DuckDB
``hive_types={'host': VARCHAR, 'recording': VARCHAR}``, Spark
``spark.sql.sources.partitionColumnTypeInference.enabled=false``).

Files are created through kvmtrace.outputs (0600, O_EXCL|O_NOFOLLOW),
directories 0700. A new dataset is written beside DIR and renamed into place
at the end, so DIR never holds half an export; ``append`` adds recordings
to an existing dataset (a recording already there is refused unless
``force``); ``force`` replaces a dataset, only when everything in DIR was
written by an export (nothing else is ever deleted).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa

from .. import __version__, outputs
from ..analysis import schema
from ..probes.events import EVENTS
from ..recording import format as rfmt
from . import ExportError, header_sha256, need, recording_id
from .tables import EXPORT_VERSION, processes_table, recordings_table

__all__ = ["export", "MODEL_TABLES", "DERIVED", "RAW", "MANIFEST", "PARTITIONS",
           "table_schema", "raw_schema", "host_value", "read_manifest", "table_glob"]

MANIFEST = "_kvmtrace_dataset.json"
RAW = "raw"
PARTITIONS = ("host", "recording")
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
MODEL_TABLES = ("ops", "slots", "faults", "prefetch", "invalidations", "exits", "errors",
                "verdicts", "ranges", "lost", "lost_where")
DERIVED = MODEL_TABLES + ("recordings", "processes")
PART = "part-0.parquet"

_ARROW = {"int64": pa.int64(), "uint64": pa.uint64(), "Int64": pa.int64(),
          "UInt64": pa.uint64(), "str": pa.string(), "bool": pa.bool_(),
          "boolean": pa.bool_(), "float64": pa.float64(),
          "category": pa.string()}  # a categorical is its text in the dataset
_NEVER_NULL = {"int64", "uint64", "bool"}
_LEFTOVER = re.compile(r"\..+\.kvmtrace-[0-9a-f]{12}\.tmp")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def table_schema(name: str) -> pa.Schema:
    """The Arrow schema of a derived table, from its declaration (doc and unit
    as field metadata)."""
    t = schema.TABLES[name]
    return pa.schema([pa.field(c.name, _ARROW[c.dtype], nullable=c.dtype not in _NEVER_NULL,
                               metadata={"doc": c.doc, "unit": c.unit}) for c in t.columns],
                     metadata={"kvmtrace.table": name, "kvmtrace.doc": t.doc})


def raw_schema(kind: str) -> pa.Schema:
    """The Arrow schema of a raw table, as the recording stores it."""
    docs = {f.name: f.doc for f in EVENTS[kind].fields} if kind in EVENTS else {}
    typ = rfmt.table_types()[kind]
    return pa.schema([pa.field(f.name, f.type, nullable=False,
                               metadata={"doc": docs.get(f.name, "")}) for f in typ],
                     metadata={"kvmtrace.table": f"{RAW}/{kind}",
                               "kvmtrace.doc": EVENTS[kind].doc if kind in EVENTS else kind})


def _check_partition_names():
    """No table may have a column named like a partition (readers would clash)."""
    cols = {name: schema.TABLES[name].names for name in DERIVED}
    cols |= {f"{RAW}/{k}": typ.names for k, typ in rfmt.table_types().items()}
    for name, names in cols.items():
        if set(PARTITIONS) & set(names):
            raise schema.SchemaError(f"table {name}: a column is named like a partition "
                                     f"({', '.join(PARTITIONS)})")


def host_value(host) -> str:
    """The host= path value of a host name (see the module doc)."""
    if not isinstance(host, str) or not host:
        return NULL_PARTITION
    out = []
    for ch in host:
        if ch in _SAFE:
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"%{ord(ch):02X}")
        else:
            try:
                ch.encode("utf-8")
                out.append(ch)
            except UnicodeEncodeError:  # a lone surrogate from the recording's JSON
                out.append("%EF%BF%BD")
    return "".join(out)


def table_glob(root, table: str) -> str:
    """The glob of every file of ``table`` (a derived table, or raw/<kind>)."""
    return os.path.join(os.fspath(root), table, "*", "*", "*.parquet")


def _manifest() -> dict:
    return {
        "format": "kvmtrace parquet dataset",
        "export_version": EXPORT_VERSION,
        "tables_schema_version": schema.SCHEMA_VERSION,
        "recording_schema_version": rfmt.SCHEMA_VERSION,
        "created_by": f"kvmtrace {__version__}",
        "layout": "<table>/host=<host>/recording=<id>/part-0.parquet; raw events under "
                  "raw/<kind>/; see kvmtrace/export/parquet.py",
        "partitions": list(PARTITIONS),
        "unsigned_64": "Parquet INT(64, unsigned): DuckDB UBIGINT, polars UInt64, pyarrow "
                       "uint64; Spark reads decimal(20,0) (exact)",
        "tables": {name: {"doc": schema.TABLES[name].doc,
                          "columns": {c.name: {"type": c.dtype, "unit": c.unit, "doc": c.doc}
                                      for c in schema.TABLES[name].columns}}
                   for name in DERIVED},
        "raw": {kind: {"doc": EVENTS[kind].doc if kind in EVENTS else kind,
                       "columns": {f.name: str(f.type) for f in typ}}
                for kind, typ in rfmt.table_types().items()},
    }


# -- the output directory ---------------------------------------------------

def read_manifest(root) -> dict | None:
    """DIR's manifest, or None when DIR is not a kvmtrace dataset."""
    p = os.path.join(os.fspath(root), MANIFEST)
    try:
        st = os.lstat(p)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
        return None
    try:
        with open(p, "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == "kvmtrace parquet dataset" else None


def _ours(root: str) -> str | None:
    """The first entry in ``root`` an export did not write (None: all ours)."""
    tables = set(DERIVED)
    raws = set(rfmt.table_types())
    for top in os.listdir(root):
        p = os.path.join(root, top)
        st = os.lstat(p)
        if top == MANIFEST and stat.S_ISREG(st.st_mode):
            continue
        if _LEFTOVER.fullmatch(top) and stat.S_ISDIR(st.st_mode):
            continue  # staging of an --append that was killed: ours, removed with the rest
        if not stat.S_ISDIR(st.st_mode) or (top not in tables and top != RAW):
            return p
        dirs = [os.path.join(p, k) for k in os.listdir(p)] if top == RAW else [p]
        for d in dirs:
            if top == RAW and (os.path.basename(d) not in raws
                               or not stat.S_ISDIR(os.lstat(d).st_mode)):
                return d
            for h in os.listdir(d):
                hp = os.path.join(d, h)
                if not h.startswith("host=") or not stat.S_ISDIR(os.lstat(hp).st_mode):
                    return hp
                for r in os.listdir(hp):
                    rp = os.path.join(hp, r)
                    if not r.startswith("recording=") or not stat.S_ISDIR(os.lstat(rp).st_mode):
                        return rp
                    for f in os.listdir(rp):
                        fp = os.path.join(rp, f)
                        if not (f.startswith("part-") and f.endswith(".parquet")) or \
                                not stat.S_ISREG(os.lstat(fp).st_mode):
                            return fp
    return None


def _mkdir(path: str):
    """A new directory, 0700; an existing one only if it is a real directory."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise outputs.OutputError(path, "is a symbolic link; kvmtrace does not write through "
                                        "links")
    if not stat.S_ISDIR(st.st_mode):
        raise outputs.OutputError(path, "exists and is not a directory")


def _mkdirs(root: str, rel: str) -> str:
    p = root
    for part in rel.split("/"):
        p = os.path.join(p, part)
        _mkdir(p)
    return p


@dataclass
class _Plan:
    out: str
    mode: str            # new | empty | replace | append
    ids: dict = field(default_factory=dict)   # append: recording id -> host value there
    shas: dict = field(default_factory=dict)  # append: header sha -> recording id there


def _existing(out: str) -> tuple[dict, dict]:
    """Recording ids (-> host value) and header digests (-> id) of a dataset."""
    pq = need("pyarrow.parquet", "export")
    ids, shas = {}, {}
    d = os.path.join(out, "recordings")
    if not os.path.isdir(d):
        return ids, shas
    for h in os.listdir(d):
        for r in os.listdir(os.path.join(d, h)):
            rid = r.partition("=")[2]
            ids[rid] = h.partition("=")[2]
            part = os.path.join(d, h, r, PART)
            try:
                for sha in pq.read_table(part, columns=["header_sha256"]).column(0).to_pylist():
                    shas[sha] = rid
            except (OSError, pa.ArrowException):
                pass
    return ids, shas


def plan(out, force: bool = False, append: bool = False) -> _Plan:
    """Check DIR before any recording is read: what the export will do there."""
    out = os.path.abspath(os.fspath(out))
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        parent = os.path.dirname(out)
        if not os.path.isdir(parent):
            raise ExportError(f"{out}: its directory {parent} does not exist") from None
        return _Plan(out, "new")
    except OSError as e:
        raise ExportError(f"{out}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ExportError(f"{out}: is a symbolic link; kvmtrace does not write through links, "
                          "even with --force")
    if not stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{out}: exists and is not a directory")
    try:
        entries = os.listdir(out)
    except OSError as e:
        raise ExportError(f"{out}: {e.strerror}") from None
    if not entries:
        return _Plan(out, "empty")
    m = read_manifest(out)
    if m is None:
        raise ExportError(f"{out}: not empty and not a kvmtrace dataset (no {MANIFEST}); "
                          "choose a new or empty directory (nothing there is replaced, even "
                          "with --force)")
    if not (force or append):
        raise ExportError(f"{out}: a kvmtrace dataset already; --append adds recordings to "
                          "it, --force replaces it")
    if append:
        if m.get("export_version") != EXPORT_VERSION or \
                m.get("tables_schema_version") != schema.SCHEMA_VERSION:
            raise ExportError(f"{out}: dataset layout {m.get('export_version')} / tables "
                              f"schema {m.get('tables_schema_version')}; this kvmtrace writes "
                              f"{EXPORT_VERSION} / {schema.SCHEMA_VERSION}: export into a new "
                              "directory")
        ids, shas = _existing(out)
        return _Plan(out, "append", ids, shas)
    bad = _ours(out)
    if bad is not None:
        raise ExportError(f"{out}: holds {bad}, which kvmtrace did not write; not replaced "
                          "(remove it, or export into a new directory)")
    return _Plan(out, "replace")


# -- writing ------------------------------------------------------------------

def _arrow(df: pd.DataFrame, sch: pa.Schema) -> pa.Table:
    df = df[sch.names]
    cats = [c for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)]
    if cats:  # the dataset holds text (and pandas' metadata in it says so)
        df = df.astype({c: "str" for c in cats})
    return pa.Table.from_pandas(df, schema=sch, preserve_index=False, safe=True)


def _write_table(root: str, rel: str, table: pa.Table):
    pq = need("pyarrow.parquet", "export")
    d = _mkdirs(root, rel)
    with outputs.open_new(os.path.join(d, PART), binary=True) as f:
        pq.write_table(table, f, compression="snappy")


def _tables_of(model, path, sha: str) -> dict[str, pa.Table]:
    out = {}
    for name in MODEL_TABLES:
        out[name] = _arrow(getattr(model, name), table_schema(name))
    out["recordings"] = _arrow(recordings_table(model, path, sha), table_schema("recordings"))
    out["processes"] = _arrow(processes_table(model), table_schema("processes"))
    for kind in rfmt.table_types():
        out[f"{RAW}/{kind}"] = _arrow(model.recording[kind], raw_schema(kind))
    return out


def _partition(table: str, host: str, rid: str) -> str:
    return f"{table}/host={host}/recording={rid}"


def _temp_dir(parent: str, base: str) -> str:
    p = os.path.join(parent, f".{base}.kvmtrace-{secrets.token_hex(6)}.tmp")
    os.mkdir(p, 0o700)
    os.chmod(p, 0o700)
    return p


def _rmtree(path: str):
    # shutil.rmtree does not follow symlinks (fd-based on Linux)
    shutil.rmtree(path, ignore_errors=True)


def export(paths, out, force: bool = False, append: bool = False, progress=None,
           on_unreadable=None) -> list[dict]:
    """Export the recordings at ``paths`` into the dataset ``out``; returns one
    dict per recording (path, id, host, rows per derived table).

    Raises ExportError (one line) for an unusable DIR or recording; then DIR is
    as it was. With ``on_unreadable(path, why)``, a file that is not a
    readable recording is reported there and left out instead; when none is
    readable, nothing is written."""
    from ..analysis.model import build
    from ..recording.reader import RecordingError, read

    need("pyarrow.parquet", "export")
    _check_partition_names()
    p = plan(out, force, append)
    paths = [os.fspath(x) for x in paths]
    if not paths:
        raise ExportError("no recordings to export")
    parent, base = os.path.split(p.out)
    try:
        stage = _temp_dir(p.out if p.mode == "append" else parent, base)
    except OSError as e:
        raise ExportError(f"{p.out}: cannot create a directory beside it: {e.strerror}") \
            from None
    done: list[dict] = []
    try:
        seen_ids, seen_shas = {}, {}
        for path in paths:
            try:
                rec = read(path)
                model = build(rec)
            except RecordingError as e:
                if on_unreadable is None:
                    raise ExportError(str(e)) from None
                on_unreadable(path, str(e))
                continue
            sha = header_sha256(rec)
            rid = recording_id(path, rec)
            host = host_value(rec.meta.get("host"))
            if sha in seen_shas:
                raise ExportError(f"{path}: the same recording as {seen_shas[sha]} (same "
                                  "header); give it once")
            if rid in seen_ids:
                raise ExportError(f"{path}: same recording id {rid} as {seen_ids[rid]}")
            there = {x for x in (p.shas.get(sha), rid if rid in p.ids else None) if x}
            if there and not force:
                raise ExportError(f"{path}: already in {p.out} as recording "
                                  f"{sorted(there)[0]}; --force replaces it")
            seen_ids[rid], seen_shas[sha] = path, path
            tables = _tables_of(model, path, sha)
            for name, t in tables.items():
                _write_table(stage, _partition(name, host, rid), t)
            done.append({"path": path, "id": rid, "host": host, "replaces": sorted(there),
                         "rows": {n: tables[n].num_rows for n in MODEL_TABLES}})
            if progress:
                progress(done[-1])
            del model, rec, tables
        if not done:
            _rmtree(stage)
            return done
        if p.mode == "append":
            _merge(stage, p, done)
            _rmtree(stage)
        else:
            outputs.write_text(os.path.join(stage, MANIFEST),
                               json.dumps(_manifest(), indent=1) + "\n")
            _swap(stage, p)
    except OSError as e:  # outputs.OutputError included: one line either way
        _rmtree(stage)
        raise ExportError(str(e) if isinstance(e, outputs.OutputError) else
                          f"{e.filename or p.out}: {e.strerror or e}") from None
    except BaseException:
        _rmtree(stage)
        raise
    return done


def _swap(stage: str, p: _Plan):
    """Put the staged dataset at p.out (new, over an empty directory, or in
    place of an old dataset, which is then removed)."""
    if p.mode in ("new", "empty"):
        os.rename(stage, p.out)  # over an empty directory too
        return
    parent, base = os.path.split(p.out)
    old = os.path.join(parent, f".{base}.kvmtrace-{secrets.token_hex(6)}.old")
    os.rename(p.out, old)
    try:
        os.rename(stage, p.out)
    except OSError:
        os.rename(old, p.out)
        raise
    _rmtree(old)


def _merge(stage: str, p: _Plan, done: list[dict]):
    """Move the staged partitions into the dataset; with force, the recording
    already there (same id, or same header under another id) is replaced: its
    old partitions are moved out first."""
    names = DERIVED + tuple(f"{RAW}/{k}" for k in rfmt.table_types())
    for d in done:
        for old_rid in d["replaces"]:
            for name in names:
                old = os.path.join(p.out, _partition(name, p.ids[old_rid], old_rid))
                if os.path.lexists(old):
                    trash = _mkdirs(stage, f".replaced/{name.replace('/', '_')}")
                    os.rename(old, os.path.join(trash, old_rid))
        for name in names:
            new = os.path.join(stage, _partition(name, d["host"], d["id"]))
            dest_parent = _mkdirs(p.out, f"{name}/host={d['host']}")
            os.rename(new, os.path.join(dest_parent, f"recording={d['id']}"))
