"""The host's page size and the mapping sizes it makes of page-table levels.

A recording stores the host's page size (meta ``page_size``, from
sysconf(_SC_PAGE_SIZE) at record time). x86 always has 4 KiB pages; arm64
hosts run with 4, 16 or 64 KiB pages, and the block sizes follow from it:
each table level holds page/8 entries, so level 2 maps 2 MiB with 4 KiB
pages, 32 MiB with 16 KiB and 512 MiB with 64 KiB. Level 1 is a base page
(the x86 tracepoints' PG_LEVEL_4K = 1; arm64's levels counted the same way).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_PAGE = 4096  # recordings made before page_size was stored: all x86 / 4K arm64


def page_size(meta: dict) -> int:
    try:
        p = int((meta or {}).get("page_size") or DEFAULT_PAGE)
    except (TypeError, ValueError, OverflowError):  # a damaged meta value
        return DEFAULT_PAGE
    return p if p in (4096, 16384, 65536) else DEFAULT_PAGE


def level_bytes(level: int, page: int) -> int:
    """Bytes one entry at ``level`` maps (1 = a base page)."""
    shift = page.bit_length() - 1
    return 1 << (shift + (int(level) - 1) * (shift - 3))


def size_name(nbytes: int) -> str:
    """'4K', '2M', '1G', '512M', '64K' ... as kernel people write them."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return f"{nbytes}B"


def level_names(page: int, levels=(1, 2, 3, 4)) -> dict[int, str]:
    """{1: '4K', 2: '2M', 3: '1G', 4: '512G'} for 4 KiB pages."""
    return {lv: size_name(level_bytes(lv, page)) for lv in levels}


def mapping_bytes(levels: pd.Series, page: int) -> pd.Series:
    """Bytes one entry at each of ``levels`` maps (UInt64: exact, never through
    float; null where the level is not 1-4)."""
    lv = pd.Series(levels).astype("Int64")
    known = lv.between(1, 4).fillna(False).to_numpy(dtype=bool)
    table = np.array([0] + [level_bytes(x, page) for x in (1, 2, 3, 4)], dtype=np.uint64)
    idx = np.where(known, lv.fillna(0).to_numpy(dtype=np.int64), 0)
    return pd.Series(pd.arrays.IntegerArray(table[idx], ~known), index=levels.index)


def level_of_size(nbytes, page: int) -> np.ndarray:
    """The level whose entries map ``nbytes`` (0 where no level does)."""
    n = np.asarray(nbytes, dtype=np.uint64)
    out = np.zeros(n.shape, dtype=np.int64)
    for lv in (1, 2, 3, 4):
        out[n == np.uint64(level_bytes(lv, page))] = lv
    return out
