"""What DEST may be, checked before anything is written: a name that is a file, no DEST or DEST.partial in the way
(unless --force; a leftover with its state file is pointed at `recv --resume`), an --in-place target that exists
and is writable (before listening); room on its file system for the announced image (before WELCOME)."""

from __future__ import annotations

import os
import stat

from ..errors import DestinationError, UsageError
from ..units import format_bytes


def partial_path(dest: str) -> str:
    return dest + ".partial"


def check_destination_name(dest: str) -> None:
    """DEST must name a file: not nothing, not a directory (an existing one, or a name ending in a slash)."""
    if not dest:
        raise UsageError("DEST is empty: name the image file to create")
    if dest.endswith("/"):
        raise DestinationError(f"destination {dest} ends in '/', so it names a directory: name the image file")
    if os.path.isdir(dest):
        raise DestinationError(f"destination {dest} is a directory: name the image file (in it) instead")


def check_destination(dest: str, force: bool, in_place: bool = False) -> None:
    """Refuse an existing DEST (without --force) and a leftover DEST.partial (naming --force). Before listening,
    so that a DEST that cannot work is refused before any sender connects.

    With ``in_place`` DEST must exist (a file, memfd or block device) and be writable; it is checked for size later.
    """
    check_destination_name(dest)
    if in_place:
        if not os.path.exists(dest):
            raise DestinationError(f"destination {dest} does not exist: --in-place writes into an existing one")
        mode = os.stat(dest).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise DestinationError(
                f"destination {dest} is not a regular file, memfd or block device: --in-place cannot write into it"
            )
        if not os.access(dest, os.W_OK):
            raise DestinationError(f"destination {dest} is not writable")
        return
    if os.path.exists(dest):
        mode = os.stat(dest).st_mode
        if stat.S_ISBLK(mode) or is_memfd(dest):
            raise DestinationError(f"destination {dest} is a block device or memfd: use --in-place to write into it")
        if not stat.S_ISREG(mode):
            raise DestinationError(f"destination {dest} is not a regular file (a character device, FIFO or socket)")
    partial = partial_path(dest)
    parent = os.path.dirname(dest) or "."
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise DestinationError(f"destination {dest}: {parent} is not a directory")
        raise DestinationError(f"destination {dest}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DestinationError(f"destination {dest}: directory {parent} is not writable")
    if os.path.lexists(dest) and not force:
        raise DestinationError(f"destination {dest} already exists (use --force to overwrite it)")
    state = partial + ".state"  # resume.receiver_state_path
    if os.path.lexists(partial):
        if not force:
            if os.path.lexists(state):
                raise DestinationError(
                    f"leftover {partial} from an interrupted migration: `vmmig recv --resume {dest}` continues it "
                    "(or use --force to remove it and start over)"
                )
            raise DestinationError(
                f"leftover {partial} from an earlier migration (use --force to remove it and start over; "
                "without its state file it cannot be resumed)"
            )
        os.unlink(partial)  # unlink never follows a symlink
    if force and os.path.lexists(state):
        os.unlink(state)


def check_fits(dest: str, size: int, in_place: bool = False) -> None:
    """Refuse, before the sender is welcomed, an image that DEST's file system has no room for (a HELLO is 56
    bytes; the image it announces must not fill the disk). statvfs of DEST's directory, or for --in-place of the
    existing file, counting only what that file has not allocated yet (devices and memfds are not checked).

    Not for --sparse (zero pages are never written) nor --discard. Quotas are not seen here: the allocation
    reports them (EDQUOT). A file system that reports no size (tmpfs or hugetlbfs without a limit) passes.
    """
    if in_place:
        try:
            st = os.stat(dest)
        except OSError:
            return  # opening it says what is wrong
        if not stat.S_ISREG(st.st_mode) or is_memfd(dest):
            return
        needed, where = max(0, size - st.st_blocks * 512), dest
    else:
        needed, where = size, os.path.dirname(dest) or "."
    try:
        vfs = os.statvfs(where)
    except OSError:
        return  # creating DEST.partial says what is wrong
    if vfs.f_blocks == 0:
        return
    free = (vfs.f_bavail if os.geteuid() else vfs.f_bfree) * vfs.f_frsize
    if needed > free:
        raise DestinationError(
            f"destination {dest} needs {needed:,} bytes ({format_bytes(needed)}), "
            f"its file system has only {free:,} free ({format_bytes(free)})"
        )


def is_memfd(path: str) -> bool:
    """A memfd reached as /proc/PID/fd/N: a regular file to stat, but it cannot be renamed over."""
    return os.path.islink(path) and os.readlink(path).startswith("/memfd:")
