"""Loading programs through bcc with errors a user can read.

bcc prints compiler and verifier output on fd 2 and raises a bare Exception;
this keeps fd 2 clean and turns a failure into one line naming the first
real error (record and doctor both load through here).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

BCC_HINT = ("the bcc Python module is not importable: install Debian's python3-bpfcc and "
            "run kvmtrace from a Python that sees it (make setup makes such a virtual "
            "environment)")


class BPFLoadError(RuntimeError):
    pass


def import_bcc():
    try:
        import bcc
    except ImportError:
        raise BPFLoadError(BCC_HINT) from None
    return bcc


@contextlib.contextmanager
def captured_stderr():
    """Redirect fd 2 into a temporary file for the duration (yields the file)."""
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield f
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def first_error(exc: Exception, captured) -> str:
    captured.seek(0)
    lines = [ln.strip() for ln in captured.read().splitlines() if ln.strip()]
    interesting = [ln for ln in lines if any(w in ln.lower() for w in
                                             ("error", "denied", "invalid", "not", "fail"))]
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg + (f" ({interesting[0][:160]})" if interesting else "")


def load(text: str, cflags: list[str], after=None):
    """Compile and load ``text``; ``after(b)`` runs inside the capture (attach calls)."""
    bcc = import_bcc()
    with captured_stderr() as err:
        try:
            b = bcc.BPF(text=text, cflags=cflags)
            if after:
                after(b)
            return b
        except Exception as e:  # bcc raises bare Exception on compile/load/attach errors
            raise BPFLoadError(first_error(e, err)) from None
