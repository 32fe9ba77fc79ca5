"""The shortcuts that make `kvmtrace report` fast on millions of faults give
exactly what the per-fault computation they replace gives: per distinct
spte instead of per fault, counting instead of sorting, pairing that lets go
of the raw events, the reader's column-by-column conversion."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from conftest import FIXTURES
from kvmtrace.analysis import faults, model, schema
from kvmtrace.memtype import x86 as x86mt
from kvmtrace.recording.reader import read

X86 = sorted(FIXTURES.glob("x86*.kvt")) + sorted(FIXTURES.glob("x86-tdp/*.kvt"))


def _random_sptes(n, seed):
    rng = np.random.default_rng(seed)
    spte = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    spte[::7] |= np.uint64(1 << 63)  # past int64: stays exact
    level = rng.integers(1, 4, n)
    return spte, level


@pytest.mark.parametrize("fmt", ["ept", "legacy"])
def test_spte_memtypes_per_distinct_equal_per_fault(fmt):
    spte, level = _random_sptes(5000, 1)
    nulls = np.zeros(len(spte), bool)
    nulls[::5] = True
    f = pd.DataFrame({"spte": pd.arrays.IntegerArray(spte, nulls), "level": level})
    got = faults.spte_memtypes(f, fmt, x86mt.LINUX_PAT)
    want = np.where(nulls, "", x86mt.spte_memtype(spte, level, fmt, x86mt.LINUX_PAT))
    assert list(got.astype(object)) == list(want)
    assert list(got.categories) == sorted(set(want))


@pytest.mark.parametrize("mmu", ["ept", "npt", "shadow"])
def test_x86_rules_per_distinct_equal_per_fault(mmu):
    spte, level = _random_sptes(3000, 2)
    f = pd.DataFrame({"spte": pd.array(spte, dtype="UInt64"), "level": level})
    rule, combines = model._x86_rules(f, mmu, x86mt.LINUX_PAT)
    want = x86mt.kvm_rules(spte, level, mmu, x86mt.LINUX_PAT)
    assert list(rule.astype(object)) == list(want)
    assert np.array_equal(combines, x86mt.guest_pat_combines(spte, mmu))


@pytest.mark.parametrize("dtype", ["Int64", "UInt64", "str", "object", "float64", "bool",
                                   "boolean"])
def test_null_columns_as_before(dtype):
    before = pd.Series(None, index=pd.RangeIndex(4), dtype=object) if dtype == "object" else \
        pd.Series(pd.NA if dtype in ("Int64", "UInt64", "str") else np.nan,
                  index=pd.RangeIndex(4), dtype=dtype)
    now = pd.Series(schema._nulls(dtype, 4), index=pd.RangeIndex(4))
    pd.testing.assert_series_equal(now, before)


@pytest.mark.parametrize("path", X86, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pairing_that_lets_go_equals_pairing_that_keeps(path):
    rec = read(path)
    spte_format = (rec.meta.get("kvm") or {}).get("spte_format", "legacy")
    f1, p1 = faults.pair(rec.tables, spte_format)
    ev = {k: rec.tables[k] for k in model.FAULT_EVENT_TABLES if k in rec.tables}
    f2, p2 = faults.pair(ev, spte_format, consume=True)
    pd.testing.assert_frame_equal(f1, f2, check_exact=True)
    pd.testing.assert_frame_equal(p1, p2, check_exact=True)
    assert set(ev) <= {"set_spte", "tdp_spte_changed"}  # the others were let go


@pytest.mark.parametrize("path", X86, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_report_model_equals_library_model(path):
    """report's build (raw fault events let go) and kvmtrace.load()'s give the
    same tables."""
    a, b = model.build(path), model.build(path, keep_raw=False)
    for name in ("ops", "slots", "faults", "prefetch", "invalidations", "exits", "errors",
                 "verdicts", "ranges", "lost", "lost_where"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)
    assert a.notes == b.notes and a.event_counts == b.event_counts


def test_reader_columns_as_arrow_gives_them():
    """The reader's tables equal Arrow's own conversion of the same rows."""
    rec = read(X86[0])
    for name, df in rec.tables.items():
        if not len(df) or df.dtypes.eq(object).any():
            continue
        t = pa.Table.from_pandas(df, preserve_index=False)
        pd.testing.assert_frame_equal(df, t.to_pandas(), check_exact=True)
        df.iloc[0, 0] = df.iloc[0, 0]  # writable, as a DataFrame of the library's is
