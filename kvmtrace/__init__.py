"""kvmtrace: trace how KVM maps guest memory, and check the memory types it picks.

``kvmtrace.load(path)`` returns the tidy tables of a recording for use from
Python (notebooks, scripts); the ``kvmtrace`` command is a view of them.
"""

__version__ = "0.1.0"


def load(path: str):
    """Read a recording and derive its analysis tables (see kvmtrace.analysis)."""
    from .analysis.model import build

    return build(path)
