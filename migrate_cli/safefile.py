"""Creating the files vmmig writes, without ever writing through a name someone else planted.

A directory vmmig writes into (beside DEST, beside a --state-file, /tmp for a --ready-file) may be writable by
others. A fixed temporary name there (``STATE.tmp``) can be pre-created as a hard link to a victim file, or as a
symlink, and opening it would write into the victim. So every file vmmig creates is created new: either under an
unpredictable name (``tempfile.mkstemp``: O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600) and renamed into place, or
with O_CREAT | O_EXCL | O_NOFOLLOW at its final name; never opened if something is already there. Reading a
state file back does not follow a symlink either and reads a bounded amount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile

READ_LIMIT = 1 << 20  # a state file is a few hundred bytes: a bigger one is not ours


class UnsafePath(OSError):
    """A path vmmig will not write through (a symlink, a file with other hard links) or read (not a file)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(errno.EPERM, why, path)


def fsync_directory(path: str) -> None:
    """Make a rename or a creation in the directory of ``path`` durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(fd: int, data: bytes, mode: int, sync: bool = True) -> None:
    """Give a file we just created its mode and all of ``data``, synced to disk (unless not ``sync``); the fd is
    closed either way."""
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """Write ``path`` whole: a new file under an unpredictable name beside it (written, fsynced, given ``mode``),
    renamed over ``path``. A reader sees the old content or the new, never a torn file; whatever was at ``path``
    (a file, a symlink, a hard link to something else) is replaced, never written through. Without ``sync``
    neither the file nor the rename is fsynced (a file rewritten every second, whose loss in a crash costs
    nothing)."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)[:100]}."  # the temporary name stays within NAME_MAX
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        write_whole(fd, data, mode, sync)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_directory(path)


def create_exclusive(path: str, mode: int = 0o600, flags: int = os.O_WRONLY) -> int:
    """A new file at ``path`` (O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC): FileExistsError if anything is there,
    a symlink included (dangling or not)."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def open_output(path: str, mode: int = 0o644) -> int:
    """A file the user named for output (``--stats FILE``), opened for writing from its start.

    A missing file is created (O_EXCL). An existing regular file is truncated and rewritten, but only if this name
    is its only link: a hard link planted at the name is refused, and so is a symlink (never followed). A FIFO or
    a device (``/dev/null``) is written as it is, not truncated.
    """
    for _ in range(3):  # a name that appears or vanishes between the two opens: look again
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                return create_exclusive(path, mode)
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP and os.path.islink(path):
                raise UnsafePath(path, "is a symbolic link (not followed: name its target)") from None
            raise
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink != 1:
                    raise UnsafePath(path, f"has {st.st_nlink} hard links (not written through: remove it first)")
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EAGAIN, "keeps appearing and vanishing", path)


def read_small(path: str, limit: int = READ_LIMIT) -> bytes:
    """The content of a small regular file, not read through a symlink; at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise UnsafePath(path, "is a symbolic link (not followed)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(path, "is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, limit + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UnsafePath(path, f"is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
