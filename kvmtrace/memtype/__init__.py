"""memtype: memory-type decode tables, one module per architecture, each table
with the kernel versions it holds for. The analysis only calls these.

The names used in reports, and how relaxed each is, are defined here once:
rank 3 cacheable (WB, Normal...), 2 write-combining / Normal-NC (no caching,
gathered writes), 1 uncached / Device. Mapping a VMA at a lower rank than its
own loses performance ("downgraded"); a non-cacheable VMA mapped at rank 3 is
a mismatched-attributes bug ("upgraded").
"""

CACHED, COMBINING, UNCACHED = 3, 2, 1

RANK = {
    # x86 (PAT / MTRR / EPT types)
    "WB": CACHED, "WT": CACHED, "WP": CACHED, "WC": COMBINING, "UC-": UNCACHED, "UC": UNCACHED,
    # arm64 (MAIR attributes as Linux names them)
    "Normal": CACHED, "Normal-Tagged": CACHED, "Normal-NC": COMBINING, "Device": UNCACHED,
    "Device-nGnRE": UNCACHED, "Device-nGnRnE": UNCACHED,
    "Normal-WT": CACHED, "Device-GRE": UNCACHED,  # arm64 before 5.14
}

# Cacheability of each name: "cacheable" types can hold lines in the CPU caches.
CACHEABLE = {name: rank == CACHED for name, rank in RANK.items()}


def is_cacheable(memtype: str):
    """True / False, or None for a type this table doesn't know (e.g. 'unknown')."""
    return CACHEABLE.get(memtype)
