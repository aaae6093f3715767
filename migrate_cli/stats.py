"""The one statistics object: workers bump counters per batch, every renderer reads a snapshot.

Updates are per batch (hundreds of pages), so one lock costs nothing measurable. ``Snapshot.fields`` turns a
snapshot into the documented field names (docs/STATS.md): QEMU's ``query-migrate`` names and units where QEMU has
the concept, our own for the rest. The --json report, the --stats NDJSON stream and `vmmig ctl status` all use it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .ratelimit import BandwidthCap
from .wire.frames import DEFAULT_PAGE_SIZE


@dataclass(frozen=True)
class Snapshot:
    elapsed: float  # seconds since the first page (setup excluded)
    image_bytes: int  # size of the whole image
    done_bytes: int  # image bytes handled so far, every pass (zero pages included)
    wire_bytes: int  # bytes put on (or taken off) the wire, frame headers included
    zero_pages: int
    normal_pages: int
    page_size: int
    raw_batches: int
    compressed_batches: int
    payload_bytes: int  # encoded page data of normal pages (for the compression ratio)
    pass_number: int = 1  # the pass in progress (1 = the full first pass)
    pass_total_bytes: int = 0  # image bytes this pass will send (0 = unknown, e.g. on the receiver)
    pass_done_bytes: int = 0
    status: str = "setup"
    setup_time: float = 0.0  # seconds from start to the first page
    downtime: float | None = None  # live: pause -> destination verified
    dirty_rate: float = 0.0  # live: image bytes dirtied per second, last measured
    achieved_rate: float = 0.0  # live: image bytes of dirty pages per second the wire carries (downtime.py)
    expected_downtime: float | None = None  # live: seconds, last estimate
    dirty_syncs: int = 0
    throttle: int = 0  # live: auto-converge percentage in force
    cap: int = 0  # wire bytes per second, 0 = none

    @property
    def normal_bytes(self) -> int:
        return self.normal_pages * self.page_size

    @property
    def image_rate(self) -> float:
        return self.done_bytes / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def wire_rate(self) -> float:
        return self.wire_bytes / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ratio(self) -> float:
        """Compression ratio over normal (non-zero) pages: raw bytes / encoded bytes."""
        return self.normal_bytes / self.payload_bytes if self.payload_bytes else 1.0

    @property
    def remaining_bytes(self) -> int:
        if self.pass_total_bytes:
            return max(0, self.pass_total_bytes - self.pass_done_bytes)
        return max(0, self.image_bytes - self.done_bytes)

    @property
    def eta(self) -> float | None:
        rate = self.image_rate
        return self.remaining_bytes / rate if rate > 0 else None

    def fields(self) -> dict[str, Any]:
        """The documented field set (docs/STATS.md). Times in ms, rates per second over the whole run."""
        seconds = max(self.elapsed, 1e-9)
        pages = self.zero_pages + self.normal_pages
        return {
            "status": self.status,
            "total-time": round(self.elapsed * 1000),
            "setup-time": round(self.setup_time * 1000),
            "expected-downtime": None if self.expected_downtime is None else round(self.expected_downtime * 1000, 3),
            "downtime": None if self.downtime is None else round(self.downtime * 1000, 3),
            "transferred": self.wire_bytes,
            "remaining": self.remaining_bytes,
            "total": self.image_bytes,
            "duplicate": self.zero_pages,
            "normal": self.normal_pages,
            "normal-bytes": self.normal_bytes,
            "dirty-pages-rate": round(self.dirty_rate / self.page_size),
            "mbps": round(self.wire_bytes * 8 / 1e6 / seconds, 3),
            "dirty-sync-count": self.dirty_syncs,
            "pages-per-second": round(pages / seconds),
            "cpu-throttle-percentage": self.throttle,
            "image-bytes": self.image_bytes,
            "image-bytes-per-second": round(self.image_rate),
            "image-mbytes-per-second": round(self.image_rate / 1e6, 3),
            "compression-ratio": round(self.ratio, 4),
            "raw-batches": self.raw_batches,
            "compressed-batches": self.compressed_batches,
            "page-size": self.page_size,
            "pass": self.pass_number,
            "cap": self.cap,
        }


@dataclass
class Stats:
    image_bytes: int = 0
    page_size: int = DEFAULT_PAGE_SIZE
    born: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    # Set by the orchestration (single writer each; readers tolerate a stale value for one refresh).
    status: str = "setup"
    downtime: float | None = None
    dirty_rate: float = 0.0
    achieved_rate: float = 0.0
    expected_downtime: float | None = None
    dirty_syncs: int = 0
    throttle: int = 0
    bandwidth: BandwidthCap | None = None  # the sender's cap (ratelimit.py), read at each snapshot
    # Guarded by _lock: written by several threads.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _done_bytes: int = 0
    _wire_bytes: int = 0
    _zero_pages: int = 0
    _normal_pages: int = 0
    _raw_batches: int = 0
    _compressed_batches: int = 0
    _payload_bytes: int = 0
    _finished: float | None = None
    _pass_number: int = 1
    _pass_total: int = 0
    _pass_done: int = 0
    _setup_time: float = 0.0

    def add_batch(self, zero_pages: int, normal_pages: int, payload_bytes: int, raw: bool) -> None:
        with self._lock:
            self._zero_pages += zero_pages
            self._normal_pages += normal_pages
            self._done_bytes += (zero_pages + normal_pages) * self.page_size
            self._pass_done += (zero_pages + normal_pages) * self.page_size
            self._payload_bytes += payload_bytes
            if normal_pages and raw:
                self._raw_batches += 1
            elif normal_pages:
                self._compressed_batches += 1  # all-zero batches carry no data and count as neither

    def begin_pass(self, number: int, total_bytes: int) -> None:
        with self._lock:
            self._pass_number, self._pass_total, self._pass_done = number, total_bytes, 0

    def end_pass(self, number: int) -> None:
        """Receiver side: pass ``number`` is complete; the next one's size is not known in advance."""
        self.begin_pass(number + 1, 0)

    def add_wire(self, nbytes: int) -> None:
        with self._lock:
            self._wire_bytes += nbytes

    def restart_clock(self) -> None:
        """Start timing at the first page, so setup (connect, preallocation) does not dilute the rates."""
        self.started = time.monotonic()
        self._setup_time = self.started - self.born
        self.status = "active"

    def finish(self, status: str = "completed") -> None:
        self._finished = time.monotonic()
        self.status = status

    def snapshot(self) -> Snapshot:
        with self._lock:
            end = self._finished if self._finished is not None else time.monotonic()
            return Snapshot(
                elapsed=end - self.started,
                image_bytes=self.image_bytes,
                done_bytes=self._done_bytes,
                wire_bytes=self._wire_bytes,
                zero_pages=self._zero_pages,
                normal_pages=self._normal_pages,
                page_size=self.page_size,
                raw_batches=self._raw_batches,
                compressed_batches=self._compressed_batches,
                payload_bytes=self._payload_bytes,
                pass_number=self._pass_number,
                pass_total_bytes=self._pass_total,
                pass_done_bytes=self._pass_done,
                status=self.status,
                setup_time=self._setup_time,
                downtime=self.downtime,
                dirty_rate=self.dirty_rate,
                achieved_rate=self.achieved_rate,
                expected_downtime=self.expected_downtime,
                dirty_syncs=self.dirty_syncs,
                throttle=self.throttle,
                cap=self.bandwidth.as_int() if self.bandwidth is not None else 0,
            )
