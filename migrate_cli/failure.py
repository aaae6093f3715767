"""Thread plumbing shared by both ends: the first-error latch, worker threads, stop-aware queue operations.

The first failure anywhere is latched (QEMU's sticky ``last_error``); every thread polls the latch while it
blocks, so one error stops all of them within a fraction of a second and the user sees that first cause only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import InternalError, MigrateError, NetworkError, PeerError

T = TypeVar("T")
POLL = 0.2  # seconds between checks of the latch while blocked


class Failure:
    """First error wins and is sticky; ``event`` wakes everyone who waits on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: MigrateError | None = None
        self.event = threading.Event()
        self._wakers: list[Callable[[], None]] = []

    def add_waker(self, waker: Callable[[], None]) -> None:
        """Call ``waker`` on the first failure: it unblocks a thread stuck in I/O (e.g. shuts a socket's read side)."""
        self._wakers.append(waker)

    def set(self, exc: BaseException, replace: bool = False) -> bool:
        """Latch ``exc`` unless an error is already latched; ``replace`` is for a conclusion drawn from that error."""
        err = exc if isinstance(exc, MigrateError) else InternalError(exc)
        with self._lock:
            if self.error is not None and replace:
                self.error = err
                return True
            if self.error is not None:
                # The peer's stated reason outranks our view of the connection it then closed.
                if isinstance(err, PeerError) and isinstance(self.error, NetworkError):
                    self.error = err
                    return True
                return False
            self.error = err
        self.event.set()
        for waker in self._wakers:
            try:
                waker()
            except OSError:
                pass
        return True

    def is_set(self) -> bool:
        return self.event.is_set()

    def raise_if_set(self) -> None:
        if self.error is not None:
            raise self.error


class Stopped(Exception):
    """Raised inside a thread when the latch is set: unwind quietly, the first error is already recorded."""


def put(q: queue.Queue[T], item: T, failure: Failure) -> None:
    while True:
        if failure.is_set():
            raise Stopped
        try:
            q.put(item, timeout=POLL)
            return
        except queue.Full:
            continue


def get(q: queue.Queue[T] | queue.SimpleQueue[T], failure: Failure) -> T:
    while True:
        if failure.is_set():
            raise Stopped
        try:
            return q.get(timeout=POLL)
        except queue.Empty:
            continue


def stop_workers(
    work: queue.Queue[Any],
    workers: list[threading.Thread],
    failure: Failure,
    reader: threading.Thread | None,
    timeout: float = 5.0,
) -> None:
    """End a pipeline: one None per worker on ``work`` (unless a failure stops them already), then wait a while for
    the workers and the thread that feeds them."""
    if not failure.is_set():
        for _ in workers:
            put(work, None, failure)
    for thread in [*workers, *([reader] if reader else [])]:
        thread.join(timeout)


def spawn(name: str, target: Callable[[], None], failure: Failure) -> threading.Thread:
    """Start a daemon thread whose exceptions go to the latch instead of vanishing."""

    def run() -> None:
        try:
            target()
        except Stopped:
            pass
        except BaseException as exc:
            failure.set(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
