"""memtype: memory-type decode tables, one module per architecture, each table
with the kernel versions it holds for. The analysis only calls these."""

# Cacheability of each memory type name used in reports. "cacheable" types can
# hold lines in the CPU caches; the rest can't (Device, Normal-NC, UC, WC).
CACHEABLE = {
    "WB": True, "WT": True, "WP": True, "Normal": True, "Normal-Tagged": True,
    "UC": False, "UC-": False, "WC": False, "Normal-NC": False, "Device": False,
    "Device-nGnRE": False, "Device-nGnRnE": False,
    "Normal-WT": True, "Device-GRE": False,  # arm64 before 5.14
}


def is_cacheable(memtype: str):
    """True / False, or None for a type this table doesn't know (e.g. 'unknown')."""
    return CACHEABLE.get(memtype)
