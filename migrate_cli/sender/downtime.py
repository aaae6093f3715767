"""The downtime estimate: what sending the pages still dirty will cost once the guest is paused.

    expected downtime = switchover cost + wire bytes of the dirty pages / the rate the wire achieves

- **Wire bytes of the dirty pages.** The pages that get dirtied are rarely the pages of pass 1: a guest rewrites
  its heap and buffers with fresh, often incompressible data, while pass 1 was mostly cold, compressible memory. So
  the cost is measured on the dirty set itself: a sample of its pages (1 MiB, or 4x the codec's window), spread
  over it, is encoded as the pipeline would (zero pages cost their index; the rest compressed as one batch by this
  estimator's own compressor, or raw where the pipeline would send them raw). Each pass then checks the
  prediction: the wire bytes the pass really took over what the sample predicted for it is a calibration factor
  (frame headers, batch size, auto's choices) that later estimates are multiplied by.
- **The rate the wire achieves.** Wire bytes per second of the latest pass long enough to measure (QEMU:
  ``mig_throttle_counter``'s bandwidth, migration.c). Under ``--max-bandwidth`` the cap is the ceiling (a burst
  makes short passes look faster); the cap in force now is used, so `vmmig ctl set max-bandwidth` counts at once.
  Nothing is sent while the guest pauses and the last scan runs, so the cap's bucket is full when the last pass
  starts: its burst (50 ms worth) is free.
- **The pipeline.** Under the cap's burst the last pass is not wire-bound: its first batch is gathered,
  fingerprinted and compressed before a byte goes out, and the workers then share the rest. The per-page cost is
  measured on the sample as it is encoded (the same steps, one thread): the least of the latest four samples,
  since a sample's thread is often descheduled on a busy host. The receiver decompresses the last batch only once
  it has arrived: the sample is decompressed too, with the codec's decompressor, and the last batch's share of
  that is added. Pages the pipeline would send raw (zlib: 4 pages of the batch compressed on their own shrink
  by less than 5%) cost neither.
- **Switchover cost.** What the pause itself costs besides sending: pausing (SIGSTOP and its confirmation, QMP
  ``stop``, or the hooks), the post-pause scan (the latest scan's time), the receiver's verdict (the last frames'
  round trip, its flush, digest and rename) and, in QEMU mode, the device-state handoff (downtime there runs from
  ``stop`` to the destination running). Priors measured on this design (docs/LIVE.md), until a step is measured.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..ratelimit import TokenBucket
from ..wire import codec as codecs
from ..wire.digest import fingerprint_pages
from ..wire.frames import FINGERPRINT_SIZE, Encoding
from .adaptive import MARGIN, AutoPolicy
from .pipeline import sample_ratio

# A sample of the dirty set is encoded per estimate: at least SAMPLE_BYTES, and 4x the codec's window (zstd level 1
# searches 512 KiB back) so that a repeat the pipeline's batch would find is found in the sample too (a guest that
# writes the same content to many pages: 64 pages predicted 2-3x the wire bytes zstd took), at most one batch.
SAMPLE_BYTES = 1 << 20  # ~1 ms of ISA-L deflate, ~2 ms of zstd level 1 on one core here
SAMPLE_WINDOWS = 4
MIN_SAMPLE_PAGES = 8  # large pages
INDEX_SIZE = 8  # a scattered pass carries each page's number (PAGE_LIST / indexed PAGES)
MIN_PASS_PAGES = 64  # a pass shorter than this or MIN_PASS_SECONDS measures latency, not rate
MIN_PASS_SECONDS = 0.02
CALIBRATION_WEIGHT = 0.5  # EWMA weight of the latest pass's actual / predicted wire bytes
# The least encoding time per page of the latest samples: on a busy host a sample's thread is often descheduled, and
# an EWMA of such times predicted pipelines of 50-70 ms for last passes that took 20-30.
COST_SAMPLES = 4

# Priors (seconds), measured here: docs/LIVE.md "How the estimate is made".
VERDICT = 0.013  # END -> RESULT: the receiver finishing the last pass, its digest and rename, one round trip
PAUSE_PRIOR = {"pid": 0.003, "qmp": 0.002, "libvirt": 0.011, "command": 0.02}
QEMU_HANDOFF = 0.02  # `migrate` of the device state (x-ignore-shared), its load and `cont`, beyond the verdict


@dataclass(frozen=True)
class SwitchoverCost:
    """The parts of downtime that are not sending pages; ``scan`` is filled in per estimate."""

    pause: float = PAUSE_PRIOR["pid"]
    verdict: float = VERDICT
    handoff: float = 0.0

    @classmethod
    def for_guest(cls, pauser_kind: str, qemu_handoff: bool) -> SwitchoverCost:
        return cls(PAUSE_PRIOR.get(pauser_kind, PAUSE_PRIOR["command"]), VERDICT, QEMU_HANDOFF if qemu_handoff else 0)

    def total(self, scan: float) -> float:
        return self.pause + scan + self.verdict + self.handoff

    def parts(self, scan: float) -> dict[str, float]:
        return {"pause": self.pause, "scan": scan, "verdict": self.verdict, "handoff": self.handoff}


@dataclass(frozen=True)
class Estimate:
    seconds: float  # expected downtime
    wire_bytes: float  # what the dirty pages (and those dirtied until the pause) will take on the wire
    wire_rate: float  # bytes/s the wire achieves (0: nothing measured)
    switchover: float  # seconds of the switchover cost
    pipeline: float  # seconds the last pass takes besides the wire: its first batch encoded, the rest if CPU-bound
    image_rate: float  # image bytes of dirty pages per second the sender achieves (for auto-converge, display)
    parts: dict[str, float] | None = None  # seconds per term: pause, scan, verdict, handoff, send, pipeline

    def parts_ms(self) -> dict[str, float]:
        return {name: round(value * 1000, 3) for name, value in (self.parts or {}).items()}


@dataclass(frozen=True)
class PassCost:
    """What one finished pass measured: its pages and what they took."""

    pages: int
    wire_bytes: int
    duration: float


class DowntimeEstimator:
    """Owned by the pre-copy thread: its compressor is created once and reused for every sample."""

    def __init__(
        self,
        pages2d: np.ndarray,
        codec: codecs.Codec,
        level: int,
        bucket: TokenBucket,
        cost: SwitchoverCost,
        auto: AutoPolicy | None = None,
        rng: np.random.Generator | None = None,
        batch_pages: int = 1024,
        threads: int = 1,
    ) -> None:
        self.pages2d = pages2d  # the live mapping, one row per page
        self.page_size = pages2d.shape[1]
        self.raw = codec.wire_id == Encoding.RAW
        self.compressor = None if self.raw else codec.compressor(level)
        self.decompressor = None if self.raw else codec.decompressor()
        # The 4-page check before a batch is compressed (pipeline.py _compress): zlib's, and auto's with any codec.
        self.checks_first = not codec.skips_incompressible or auto is not None
        sample_bytes = min(batch_pages * self.page_size, max(SAMPLE_BYTES, SAMPLE_WINDOWS * codec.window(level)))
        self.sample_pages = max(MIN_SAMPLE_PAGES, sample_bytes // self.page_size)
        self.bucket = bucket
        self.cost = cost
        self.auto = auto
        self.rng = rng if rng is not None else np.random.default_rng()
        self.calibration = 1.0
        self.batch_pages, self.threads = batch_pages, max(1, threads)
        self._costs: deque[float] = deque(maxlen=COST_SAMPLES)
        self._decode_costs: deque[float] = deque(maxlen=COST_SAMPLES)
        self._rate = 0.0
        self._predicted: float | None = None  # the latest estimate's wire bytes per page, for calibration

    # --- measurements ---------------------------------------------------------------------------------------------
    def note_pass(self, cost: PassCost, predicted_per_page: float | None = None) -> None:
        """A pass finished: its wire rate replaces the last one if it was long enough to measure; when it sent the
        pages a sample predicted, actual / predicted wire bytes corrects the next samples."""
        if cost.pages >= MIN_PASS_PAGES and cost.duration >= MIN_PASS_SECONDS and cost.wire_bytes > 0:
            self._rate = cost.wire_bytes / cost.duration
            if predicted_per_page:
                ratio = cost.wire_bytes / (predicted_per_page * cost.pages)
                self.calibration = (1 - CALIBRATION_WEIGHT) * self.calibration + CALIBRATION_WEIGHT * ratio
        elif self._rate == 0.0 and cost.duration > 0 and cost.wire_bytes > 0:
            self._rate = cost.wire_bytes / cost.duration  # better than nothing until a pass measures

    def wire_rate(self) -> float:
        cap = self.bucket.rate
        if cap is None:
            return self._rate
        return cap if self._rate == 0.0 else min(self._rate, cap)

    def wire_per_page(self, dirty: np.ndarray) -> float:
        """Predicted wire bytes per page of ``dirty`` (page numbers), from a sample of its pages, uncalibrated."""
        if dirty.size == 0:
            return 0.0
        wanted = self.sample_pages
        take = dirty if dirty.size <= wanted else np.sort(self.rng.choice(dirty, wanted, replace=False))
        started = time.perf_counter()
        sample = np.take(self.pages2d, take, axis=0)
        nonzero = sample.any(axis=1)
        normal = sample[nonzero]
        payload = normal.size
        if normal.size:
            fingerprint_pages(normal.reshape(-1), self.page_size, np.empty(normal.shape[0], dtype=np.uint64))
        spent = time.perf_counter() - started
        if normal.size and not self._sent_raw(normal):
            assert self.compressor is not None and self.decompressor is not None
            started = time.perf_counter()
            # The pipeline's rule (pipeline.py _compress): zlib compresses 4 pages of a batch on their own first and
            # sends the batch raw when they do not shrink by MARGIN; zstd sends raw what does not shrink.
            if self.checks_first and sample_ratio(self.compressor, normal.reshape(-1), self.page_size) <= 1 + MARGIN:
                spent += time.perf_counter() - started
            else:
                compressed = self.compressor.compress(normal.reshape(-1))
                deflating = time.perf_counter() - started
                if len(compressed) < payload:
                    payload, spent = len(compressed), spent + deflating
                    started = time.perf_counter()
                    self.decompressor.decompress(compressed, normal.size)  # what the receiver's worker will do
                    self._decode_costs.append((time.perf_counter() - started) / take.size)
                else:  # compressed in vain: the pipeline, too, then sends the batch raw
                    spent += deflating
        cost = spent / take.size
        self._costs.append(cost)
        wire = payload + int(np.count_nonzero(nonzero)) * FINGERPRINT_SIZE + take.size * INDEX_SIZE
        return wire / take.size

    @property
    def encode_per_page(self) -> float:
        """Seconds to gather, fingerprint and encode one page on one thread (0 before the first sample)."""
        return min(self._costs, default=0.0)

    @property
    def decode_per_page(self) -> float:
        """Seconds the receiver takes to decompress one page of the sample (0: raw), timed here on its codec."""
        return min(self._decode_costs, default=0.0)

    def _sent_raw(self, normal: np.ndarray) -> bool:
        """Whether the pipeline sends these pages raw: always without a codec, and with auto on a link faster than
        the compressors (for the others, wire_per_page applies the pipeline's own raw rule)."""
        return self.raw or (self.auto is not None and self.auto.link_faster(count=False))

    # --- the estimate ---------------------------------------------------------------------------------------------
    def estimate(self, dirty: np.ndarray, pages_until_pause: float, scan_time: float) -> Estimate:
        """Expected downtime if the guest were paused now: ``dirty`` are the pages the latest scan found changed,
        ``pages_until_pause`` how many more the guest will dirty before the pause takes hold (dirty rate x the
        next scan's time)."""
        per_page = self.wire_per_page(dirty)
        if len(self._costs) == 1:
            # The first encode of a run is cold: in a live sender it took 2-6x the time of the next ones (first
            # use of the compressor, the sample's buffers), and in a two-pass run it is the only estimate.
            self.wire_per_page(dirty)
        self._predicted = per_page
        pages = dirty.size + pages_until_pause
        wire = pages * per_page * self.calibration
        rate = self.wire_rate()
        switchover = self.cost.total(scan_time)
        # While the guest pauses and the last scan runs nothing is sent: the cap's bucket fills, and its burst
        # goes out at once.
        send = max(0.0, wire - self.bucket.burst) / rate if rate > 0 else float("inf")
        if wire == 0:
            send = 0.0
        # The first batch is encoded before anything goes out; then the workers share the rest, and the slower of
        # them and the wire sets the pace.
        first = min(pages, self.batch_pages)
        rest = max(0.0, pages - first) * self.encode_per_page / self.threads
        # The receiver decompresses the last batch after it arrives: that part cannot overlap with the sending. (Its
        # other landing steps, raw splice and check, are in the verdict's prior, measured with them.)
        last = pages - (math.ceil(pages / self.batch_pages) - 1) * self.batch_pages if pages else 0.0
        pipeline = first * self.encode_per_page + max(0.0, rest - send) + last * self.decode_per_page
        image_rate = rate * self.page_size / (per_page * self.calibration) if per_page > 0 and rate > 0 else 0.0
        parts = {**self.cost.parts(scan_time), "send": send, "pipeline": pipeline}
        parts = {name: float(value) for name, value in parts.items()}  # plain floats: reports are JSON
        seconds = float(switchover + send + pipeline)
        return Estimate(seconds, float(wire), float(rate), float(switchover), float(pipeline), float(image_rate), parts)

    @property
    def predicted_per_page(self) -> float | None:
        """The latest estimate's wire bytes per page: what the pass about to be sent should take, per page."""
        return self._predicted
