"""Create the files kvmtrace writes (recordings, reports) safely as root.

kvmtrace runs as root on shared hosts: a link planted where a user asked for
output must never make root write somewhere else. Every output file is

- created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing file, a symlink
  (dangling or not), a FIFO or a device at the path is never opened;
- with ``force``, created under a random temporary name in the same directory
  and renamed over the path: rename(2) replaces a symlink itself, never its
  target; a symlink, FIFO, socket, device or directory at the path is refused
  before anything is created, force or not;
- mode 0600 whatever the umask (recordings and reports hold host physical
  addresses, the PAT memtype list, the VMM's address layout and command line).

``write_text`` (whole reports) never leaves a half-written file behind: with
``force`` the text is written to the temporary file first and renamed over the
old report only once complete; without it a file that could not be written in
full is removed again.

Only the last path component is protected: directories on the way are
followed (``/var/run`` -> ``/run`` must work); the kernel's
``fs.protected_symlinks`` covers links planted in sticky world-writable
directories such as /tmp.
"""

from __future__ import annotations

import os
import secrets
import stat

MODE = 0o600
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputError(OSError):
    """An output path kvmtrace will not (or could not) write.

    ``str(e)`` is one line for the user, ``PATH: reason``; ``e.filename`` is the
    path and ``e.strerror`` the reason, so code that reports an ``OSError`` as
    ``f"{path}: {e.strerror}"`` says the same thing."""

    def __init__(self, path: str, reason: str, errno_: int = 0):
        super().__init__(errno_, reason, path)

    def __str__(self):
        return f"{self.filename}: {self.strerror}"


def check(path, force: bool = False) -> bool:
    """Refuse early (OutputError) what ``create`` would refuse, before any work
    is done; True when a regular file is there that ``force`` will replace.
    ``create`` checks again: the path may change in between."""
    return _check(os.fspath(path), force)


def _check(path: str, force: bool) -> bool:
    """True when a regular file is at ``path`` (and ``force`` allows replacing it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise OutputError(path, e.strerror, e.errno) from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(path, "is a symbolic link; kvmtrace does not write through links, "
                                "even with --force (remove it or choose another path)")
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(path, "exists and is not a regular file (a FIFO, socket or device); "
                                "choose another path")
    if not force:
        raise OutputError(path, "exists; use --force to overwrite it")
    return True


def _open_excl(path: str, shown: str) -> int:
    try:
        fd = os.open(path, _FLAGS, MODE)
    except FileExistsError:
        raise OutputError(shown, "appeared while kvmtrace was creating it (a file, link or "
                                 "FIFO); not overwritten") from None
    except OSError as e:
        raise OutputError(shown, e.strerror, e.errno) from None
    try:
        os.fchmod(fd, MODE)  # 0600 exactly, whatever the umask
    except OSError:
        pass
    return fd


def _temp_beside(path: str) -> tuple[int, str]:
    """A new 0600 file with a random name in the directory of ``path``."""
    d, base = os.path.split(os.path.abspath(path))
    for _ in range(20):
        tmp = os.path.join(d, f".{base}.kvmtrace-{secrets.token_hex(6)}.tmp")
        try:
            return _open_excl(tmp, path), tmp
        except OutputError as e:
            if e.strerror.startswith("appeared"):
                continue
            raise
    raise OutputError(path, "cannot create a temporary file beside it")


def _rename(fd: int, tmp: str, path: str):
    try:
        os.rename(tmp, path)  # replaces whatever entry is there now, never through it
    except OSError as e:
        os.close(fd)
        _unlink_quietly(tmp)
        raise OutputError(path, e.strerror, e.errno) from None


def _unlink_quietly(path: str):
    try:
        os.unlink(path)
    except OSError:
        pass


def _unlink_if_ours(path: str, fd: int):
    """Remove ``path`` only if it is still the file open as ``fd``."""
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        _unlink_quietly(path)


def create(path, force: bool = False) -> int:
    """A new file at ``path``, mode 0600, opened for writing; returns its fd.

    Raises OutputError (one line) for anything that is not a plain new file,
    or an existing regular file when ``force`` is not given. With ``force`` an
    existing regular file is replaced at once (for files written as they grow,
    such as recordings)."""
    path = os.fspath(path)
    if not _check(path, force):
        return _open_excl(path, path)
    fd, tmp = _temp_beside(path)
    _rename(fd, tmp, path)
    return fd


def open_new(path, force: bool = False, binary: bool = False):
    """``create`` as a Python file object (text unless ``binary``)."""
    fd = create(path, force)
    return os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8")


def write_text(path, text, force: bool = False):
    """A whole report file at once (``text``: a string, or an iterable of
    strings written as they come, so a big report streams); on any failure
    nothing half-written is left (and with ``force`` the old file is kept)."""
    path = os.fspath(path)
    chunks = [text] if isinstance(text, str) else text
    replace = _check(path, force)
    if replace:
        fd, tmp = _temp_beside(path)
    else:
        fd, tmp = _open_excl(path, path), None
    try:
        for chunk in chunks:
            view = memoryview(chunk.encode("utf-8", "backslashreplace"))  # lone surrogates too
            while view:
                n = os.write(fd, view)
                view = view[n:]
    except BaseException as e:
        if not isinstance(e, OSError):  # the text failed to make: nothing left behind
            if tmp:
                _unlink_quietly(tmp)
            else:
                _unlink_if_ours(path, fd)
            os.close(fd)
            raise
        if tmp:
            _unlink_quietly(tmp)
        else:
            _unlink_if_ours(path, fd)
        os.close(fd)
        raise OutputError(path, f"write failed ({e.strerror}); nothing written", e.errno) \
            from None
    if tmp:
        _rename(fd, tmp, path)
    os.close(fd)
