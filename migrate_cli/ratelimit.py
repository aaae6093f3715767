"""The bandwidth cap, and a token bucket on wire bytes shared by every thread that puts bytes on the wire.

``BandwidthCap`` is the one owner of the rate (--max-bandwidth, changed by `vmmig ctl set max-bandwidth`): the
bucket charges against it, the auto policy and the statistics read it, the report prints it. QEMU keeps one
budget for all channels (migration-stats.c); so do we. ``consume(n)`` blocks until ``n`` bytes may go out. The
clock and sleep are injectable so tests run on a fake clock. A new rate applies at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class BandwidthCap:
    """Wire bytes per second, None = unlimited. Read without a lock: one attribute, replaced whole."""

    def __init__(self, rate: float | None = None) -> None:
        self.rate: float | None = rate if rate else None

    def set(self, rate: float | None) -> None:
        self.rate = rate if rate else None

    def as_int(self) -> int:
        """For reports and statistics: 0 = none."""
        return int(self.rate or 0)


class TokenBucket:
    """Charges against ``cap`` (a shared BandwidthCap, or a rate in bytes per second: None = unlimited); ``burst``
    is the most that can go out at once after idling."""

    def __init__(
        self,
        rate: BandwidthCap | float | None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self.cap = rate if isinstance(rate, BandwidthCap) else BandwidthCap(rate)
        self._rate: float | None = None  # the cap's rate as last seen: the burst is derived from it
        self._burst = 0.0
        self._explicit_burst = burst
        self._tokens = 0.0
        self._last = clock()
        with self._lock:
            self._follow_cap()

    @property
    def rate(self) -> float | None:
        return self.cap.rate

    @property
    def burst(self) -> float:
        """Bytes that go out at once after idling (0: no cap)."""
        rate = self.cap.rate
        return (self._explicit_burst or max(rate * 0.05, 256 * 1024)) if rate else 0.0

    def set_rate(self, rate: float | None) -> None:
        with self._lock:
            self._refill()  # the time so far at the old rate
            self.cap.set(rate)
            self._follow_cap()

    def _follow_cap(self) -> None:
        """Take the cap's current rate (set here or by its owner elsewhere) and derive the burst from it."""
        self._rate = self.cap.rate
        # 50 ms worth of bytes: smooth enough for a 5 s window, big enough for one batch frame.
        self._burst = self.burst
        self._tokens = min(self._tokens, self._burst)

    def _refill(self) -> None:
        if self.cap.rate != self._rate:
            self._follow_cap()
        now = self._clock()
        if self._rate is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def consume(self, nbytes: int, stop: threading.Event | None = None, idle: Callable[[], None] | None = None) -> None:
        """Take ``nbytes`` tokens, sleeping while the bucket is in debt. Returns early if ``stop`` is set.

        Going into debt lets a frame larger than the burst pass; the debt is paid by sleeping in short steps that
        re-read the rate, so a ``set_rate`` from another thread takes effect within one step (50 ms). ``idle`` runs
        between steps: under a low cap one batch can wait longer than the peer's silence timeout (a keepalive).
        """
        with self._lock:
            self._refill()
            if self._rate is None:
                return
            self._tokens -= nbytes
        while True:
            with self._lock:
                self._refill()
                if self._rate is None or self._tokens > -1.0:  # within a byte: float rounding, not debt
                    return
                wait = -self._tokens / self._rate
            if stop is not None and stop.is_set():
                return
            if idle is not None:
                idle()
            self._sleep(min(wait, 0.05))
