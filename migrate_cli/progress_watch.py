"""--progress-timeout on both ends: give up on a run that has stopped moving.

Progress is read off the one statistics object (stats.py): page bytes handled (sent on the sender, landed in DEST
on the receiver) growing, or a new pass. Keepalives and other frames move only the wire counter, so a peer that is
alive but sends or takes no pages is a stall, not progress. Any time counts (a QMP step, a dirty-page scan between
passes): DURATION is a bound on the whole silence of the copy, not only on the link's.

A watchdog thread samples the statistics a few times a second; after DURATION without a change it hands a
``Stalled`` error to ``stall`` (the end's failure latch, which wakes whatever blocks) and ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .errors import Stalled
from .stats import Stats
from .units import format_bytes


class ProgressWatch:
    """Watches ``stats`` between ``start`` and ``stop``; ``seconds`` None: off (nothing is started)."""

    def __init__(self, seconds: float | None, stats: Stats, verb: str, stall: Callable[[Stalled], None]) -> None:
        self.seconds = seconds
        self._stats = stats
        self._verb = verb  # what happens to a page on this end: "sent", "landed"
        self._stall = stall
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a stall is reported before ``stop`` or not at all
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.seconds is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name="progress-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No stall is reported after this returns (a verdict wait or a verification is not the copy's business)."""
        with self._lock:
            self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _marker(self) -> tuple[int, int]:
        snap = self._stats.snapshot()
        return snap.done_bytes, snap.pass_number

    def _watch(self) -> None:
        assert self.seconds is not None
        tick = min(0.2, max(0.01, self.seconds / 4))
        last, since = self._marker(), time.monotonic()
        while not self._stop.wait(tick):
            now = self._marker()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= self.seconds:
                with self._lock:
                    if not self._stop.is_set():
                        self._stall(Stalled(self._message()))
                return

    def _message(self) -> str:
        snap = self._stats.snapshot()
        message = f"stalled: no page {self._verb} and no pass ended for {self.seconds:g}s (--progress-timeout)"
        if snap.pass_total_bytes:  # the sender knows what its pass still has to send; the receiver does not
            message += f", {format_bytes(snap.remaining_bytes)} of pass {snap.pass_number} left"
        return message
