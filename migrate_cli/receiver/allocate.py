"""Allocating DEST.partial on a thread of its own, while the first pages arrive.

Why: allocating a tmpfs file zeroes every page (~0.23 s per GiB on this project's machines) and used to run before
WELCOME, so every migration waited for it with the sender idle. Now the first chunk is allocated at once (a full
disk still fails before WELCOME in the common case), the file is sized with ftruncate, WELCOME goes out, and this
thread allocates the rest in chunks while batches arrive. The writers never wait for it: they write with pwrite,
which allocates what it fills and reports a full disk as ENOSPC (a store through a mapping into a hole would be a
SIGBUS). What the allocation adds is the promise QEMU's prealloc=on makes: a published DEST is allocated in full,
its zero pages included, so the guest cannot run out of memory on it later.

fallocate(2) is called directly (ctypes): where a filesystem lacks it, glibc's posix_fallocate emulates it by
writing a zero byte into every block that reads as zero, which would race with the writers. Such a filesystem gets
the old behaviour: the whole file allocated up front, before WELCOME.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time

FIRST = 16 << 20  # allocated before WELCOME: a disk without even this much room fails before any page is sent
# Bytes per fallocate call on the thread. Each call holds the file's inode lock, which the workers' pwrite calls
# need too: 2 MiB calls (~0.5 ms) made both ends ~4% faster than 16 MiB ones (~4 ms).
CHUNK = 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)  # CDLL releases the GIL during the call
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

# CPU seconds this process spent allocating DEST (the report's cpu-allocation-seconds): each part measured with
# time.thread_time() in the thread doing it, so the writers' CPU is never counted.
_cpu_lock = threading.Lock()
_cpu_seconds = 0.0


def _add_cpu(seconds: float) -> None:
    global _cpu_seconds
    with _cpu_lock:
        _cpu_seconds += seconds


def cpu_seconds() -> float:
    """CPU seconds spent allocating so far, all allocations of this process."""
    with _cpu_lock:
        return _cpu_seconds


def fallocate(fd: int, offset: int, length: int) -> None:
    """fallocate(2) with mode 0: allocate [offset, offset + length) and extend the file if needed."""
    while _fallocate(fd, 0, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


class Allocation:
    """The allocation of one file of ``size`` bytes: done up to ``allocated`` bytes, growing in order."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.allocated = 0
        self.error: OSError | None = None
        self._fd = fd
        self._cond = threading.Condition()
        self._stop = False
        self._closed = False  # the fd is closing: never allocate again
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Allocate the first chunk now (raises OSError: a full disk fails here) and size the file, so the whole
        mapping is valid before the rest is allocated; ``continue_in_background`` allocates the rest."""
        first = min(FIRST, self.size)
        started = time.thread_time()
        try:
            fallocate(self._fd, 0, first)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            os.posix_fallocate(self._fd, 0, self.size)  # no fallocate(2) here: all of it, before any writer runs
            self.allocated = self.size
            return
        finally:
            _add_cpu(time.thread_time() - started)
        self.allocated = first
        if first < self.size:
            os.ftruncate(self._fd, self.size)

    def continue_in_background(self) -> None:
        """Allocate the rest on a thread. Called once the receiver has written what it must write beside DEST (its
        resume state): the thread may fill the disk."""
        if self.allocated < self.size and self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="allocate", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        started = time.thread_time()
        try:
            self._allocate_rest()
        finally:
            _add_cpu(time.thread_time() - started)

    def _allocate_rest(self) -> None:
        offset = self.allocated
        while offset < self.size and not self._stop:
            length = min(CHUNK, self.size - offset)
            try:
                fallocate(self._fd, offset, length)
            except Exception as exc:  # any failure must reach finish(), which would otherwise wait for ever
                error = exc if isinstance(exc, OSError) else OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
                with self._cond:
                    self.error = error
                    self._cond.notify_all()
                return
            offset += length
            with self._cond:
                self.allocated = offset
                self._cond.notify_all()

    def finish(self) -> None:
        """Wait until the whole file is allocated (before DEST is published); raise if that failed."""
        self.continue_in_background()  # never started (or stopped): allocate now, rather than wait for nothing
        if self._closed and self.allocated < self.size:
            raise OSError(errno.EBADF, "the file was closed before it was allocated")
        with self._cond:
            while self.allocated < self.size and self.error is None:
                self._cond.wait(0.5)
        if self.allocated < self.size:
            assert self.error is not None
            raise self.error
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        """Stop allocating: returns after at most one more chunk (one fallocate call). What is allocated stays,
        and ``continue_in_background`` or ``finish`` carries on from there (a session parked for a resume)."""
        self._stop = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop = False

    def close(self) -> None:
        """Stop for good, before the fd closes: nothing may allocate through a closed (or reused) fd number."""
        self._closed = True
        self.stop()
