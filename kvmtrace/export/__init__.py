"""Recordings for other tools: a Parquet dataset and a Perfetto trace.

- :mod:`kvmtrace.export.parquet`: the raw events and the derived tables of
  many recordings as one Hive-partitioned Parquet dataset
  (``DIR/<table>/host=H/recording=R/part-0.parquet``) that DuckDB, polars,
  pyarrow.dataset and Spark read as is;
- :mod:`kvmtrace.export.perfetto`: one recording as a Perfetto trace (a track
  per vCPU thread with its faults, memslot changes and MMIO exits, verdicts
  as arguments), written with the ``perfetto`` package's own protos.

Both need optional packages (``pip install kvmtrace[export]``); this module
and :mod:`kvmtrace.export.tables` need only the core ones. Files are created
through kvmtrace.outputs (0600, never through a symlink), directories 0700.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets

from .. import outputs

__all__ = ["ExportError", "recording_id", "header_sha256", "write_bytes", "need"]


class ExportError(Exception):
    """Input or output kvmtrace will not export (one line for the user)."""


def header_sha256(rec) -> str:
    """SHA-256 of a recording's format version and metadata (its header), as
    read back: the same file always gives the same digest."""
    meta = json.dumps(rec.meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str)
    return hashlib.sha256(f"{rec.schema_version}\n{meta}".encode()).hexdigest()


def recording_id(path, rec) -> str:
    """A stable id for a recording: its file name stem (characters other than
    A-Z a-z 0-9 . _ - as '_', at most 80) and the first 8 hex digits of its
    header digest, e.g. ``vm-1f3a9c0e``. Safe as a path component."""
    stem = os.path.basename(os.fspath(path))
    stem = stem[:-4] if stem.endswith(".kvt") else stem
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:80].lstrip(".") or "recording"
    return f"{stem}-{header_sha256(rec)[:8]}"


def need(module: str, extra: str):
    """Import an optional dependency, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"this needs the Python package '{module.split('.')[0]}': "
                          f"pip install 'kvmtrace[{extra}]'") from None


def write_bytes(path, data: bytes, force: bool = False):
    """A whole binary file, as outputs.write_text writes text: 0600, never
    through a link, an existing file replaced (with ``force``) only once the
    new one is complete; nothing half-written is left behind."""
    path = os.fspath(path)
    replace = outputs.check(path, force)
    target = path
    if replace:
        d, base = os.path.split(os.path.abspath(path))
        target = os.path.join(d, f".{base}.kvmtrace-{secrets.token_hex(6)}.tmp")
    fd = outputs.create(target)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        _unlink(target)
        raise outputs.OutputError(path, f"write failed ({e.strerror}); nothing written",
                                  e.errno) from None
    os.close(fd)
    if replace:
        try:
            os.rename(target, path)  # replaces the entry, never writes through it
        except OSError as e:
            _unlink(target)
            raise outputs.OutputError(path, e.strerror, e.errno) from None


def _unlink(path: str):
    try:
        os.unlink(path)
    except OSError:
        pass
