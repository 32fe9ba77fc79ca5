"""recording: the on-disk format between collectors and analysis.

An Arrow IPC *stream*: crash-safe (every flushed batch stays readable when
the writer dies mid-way), columnar, and readable by anything that reads Arrow
(pyarrow, DuckDB, polars). See format.py for the layout.
"""
from .format import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION"]
