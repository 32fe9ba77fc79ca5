"""kvmtrace: trace how KVM maps guest memory, and check the memory types it picks.

``kvmtrace.load(path)`` returns the tidy tables of a recording for use from
Python (notebooks, scripts); the ``kvmtrace`` command is a view of them.
"""

__version__ = "0.1.0"


def load(path: str):
    """Read a recording and derive its analysis tables (see kvmtrace.analysis)."""
    from .analysis.model import build

    return build(path)


def query(pid: int, gpa: int | None = None, size: int | None = None, hva: int | None = None,
          slot: int | None = None, window: float = 0, vm_fd: int | None = None):
    """The memory type of a guest range of a running VM, now (root, bcc).

    One row per memslot the range touches (``gpa`` / ``hva`` with ``size``,
    default one page; or ``slot``; or every slot): the memslot, its VMA and the
    memory type vm_page_prot gives, what KVM installed (seen in a ``window``
    seconds recording; x86 has no page-table dump), who decides the final
    type, and a verdict. ``df.attrs`` holds the sources and ``exit_code``
    (0 consistent, 1 mismatch, 2 cannot tell). Errors: ValueError for bad
    input, RuntimeError when the process cannot be read.
    """
    import os

    from .analysis import query as q
    from .analysis.model import build
    from .collectors import snapshot

    if gpa is not None and hva is not None:
        raise q.QueryError("give gpa or hva, not both")
    rng = None
    if gpa is not None or hva is not None:
        start = gpa if gpa is not None else hva
        rng = (int(start), int(size) if size is not None else q.PAGE)
        if rng[1] <= 0 or rng[0] < 0:
            raise q.QueryError("the range must start at 0 or above and have a size above 0")
    from .host.procfs import process_state

    def exited(when: str = "") -> None:
        state = process_state(pid)
        if state is None or state in ("Z", "X"):
            raise q.QueryError(f"--pid {pid}: " + ("no such process" if state is None else
                               "the process has exited (a zombie its parent has not reaped)")
                               + when)

    exited()
    model, path = None, None
    try:
        if window:
            path, _ = snapshot.record_window(pid, window)
            model = build(path)
        snap = snapshot.take(pid)
        df = q.answer(snap, gpa=rng if gpa is not None else None,
                      hva=rng if hva is not None else None, slot=slot, window=model,
                      window_s=window or None, vm_fd=vm_fd)
        if df["slot"].isna().all():  # it exited during the window: say so
            exited(" while it was queried")
        return df
    finally:
        if path:
            import shutil

            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
