"""`--compress auto`: per batch, compress only when it pays, decided by measurement during the run.

Model. Compressing a batch of N bytes costs N / c seconds of one worker (c: this worker's measured compression
speed); T workers together compress C = T × c bytes a second. The wire moves W bytes a second (measured by the
network thread: bytes sent over the time spent sending, token-bucket waits included). If batches go raw the
pipeline moves W image bytes a second (W is capped by --max-bandwidth when one is set); compressed at ratio r it
moves min(C, r × W). So a batch is compressed only when both hold:

- r > 1 + MARGIN, where r is the ratio this worker measured on a two-page sample of the batch (random or
  already-compressed data stops here: zlib-ng spends ~85 MB/s per core on it for a ratio of 0.95), and
- C > W × (1 + MARGIN): the compressors can feed the link faster than raw pages would fill it (on a fast link,
  or loopback, raw wins).

Before the first measurements exist, batches are compressed (a cheap way to measure both). Every decision is
counted by reason and reported.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..ratelimit import BandwidthCap

MARGIN = 0.05
SAMPLE_BYTES = 4096
EWMA = 0.2  # weight of the newest measurement


@dataclass
class AutoStats:
    compressed: int = 0
    raw_incompressible: int = 0
    raw_link_faster: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "auto-compressed-batches": self.compressed,
            "auto-raw-incompressible": self.raw_incompressible,
            "auto-raw-link-faster": self.raw_link_faster,
        }


class AutoPolicy:
    """Measured speeds and the decision. ``cap`` is the shared BandwidthCap (ratelimit.py): the wire can never go
    faster than its rate (bursts make sends look so); a number makes a cap of its own."""

    def __init__(self, threads: int, cap: BandwidthCap | float | None = None) -> None:
        self.threads = threads
        self._lock = threading.Lock()
        self.compress_speed: float | None = None  # bytes/s of one worker, EWMA
        self.wire_speed: float | None = None  # bytes/s the network thread achieves while sending, EWMA
        self.limit = cap if isinstance(cap, BandwidthCap) else BandwidthCap(cap)
        self.stats = AutoStats()

    @property
    def cap(self) -> float | None:
        return self.limit.rate

    @cap.setter
    def cap(self, rate: float | None) -> None:
        self.limit.set(rate)

    def note_compression(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0:
            return
        speed = nbytes / seconds
        with self._lock:
            self.compress_speed = (
                speed if self.compress_speed is None else (1 - EWMA) * self.compress_speed + EWMA * speed
            )

    def note_wire(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < 64 * 1024:  # tiny frames measure latency, not bandwidth
            return
        speed = nbytes / seconds
        with self._lock:
            self.wire_speed = speed if self.wire_speed is None else (1 - EWMA) * self.wire_speed + EWMA * speed

    def link_faster(self, count: bool = True) -> bool:
        """True (and counted, unless ``count`` is False) when raw pages fill the wire faster than the compressors
        could: no need to sample."""
        with self._lock:
            wire = min(self.wire_speed or float("inf"), self.cap or float("inf"))
            if self.compress_speed is None or wire == float("inf"):
                return False  # nothing measured yet: compress, which measures
            if self.compress_speed * self.threads <= wire * (1 + MARGIN):
                self.stats.raw_link_faster += count
                return True
            return False

    def note_incompressible(self) -> None:
        """A frame the sender's byte test (entropy.py) found incompressible goes raw without a sample."""
        with self._lock:
            self.stats.raw_incompressible += 1

    def worth_compressing(self, sample_ratio: float) -> bool:
        """After ``link_faster`` said no: compress unless the sample shows the batch is incompressible."""
        with self._lock:
            if sample_ratio <= 1 + MARGIN:
                self.stats.raw_incompressible += 1
                return False
            self.stats.compressed += 1
            return True


class Stopwatch:
    """time.perf_counter() intervals, for the measurements above."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
