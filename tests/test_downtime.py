"""The downtime estimate, on recorded passes: what the pages still dirty will cost on the wire, at the rate the wire
achieves, plus what the switchover costs besides sending."""

from __future__ import annotations

import json

import numpy as np
import pytest

from migrate_cli.ratelimit import TokenBucket
from migrate_cli.sender.downtime import (
    PAUSE_PRIOR,
    QEMU_HANDOFF,
    VERDICT,
    DowntimeEstimator,
    PassCost,
    SwitchoverCost,
)
from migrate_cli.wire import codec as codecs

PS = 4096
PAGES = 2048
MB = 1_000_000
PER_PAGE_OVERHEAD = 16  # a fingerprint and a page number travel with each non-zero page of a scattered pass


def image() -> np.ndarray:
    """Pages 0-1023 compress well (repeated text), 1024-2047 are random, 2048.. zero."""
    rng = np.random.default_rng(7)
    pages = np.zeros((PAGES + 256, PS), dtype=np.uint8)
    text = np.frombuffer((b"the guest kernel wrote this line again " * 120)[:PS], dtype=np.uint8)
    pages[:1024] = text
    pages[:1024, :8] = rng.integers(0, 256, (1024, 8), dtype=np.uint8)  # distinct pages, still compressible
    pages[1024:PAGES] = rng.integers(0, 256, (1024, PS), dtype=np.uint8)
    return pages


def estimator(codec: str, cap: float | None = None, cost: SwitchoverCost | None = None) -> DowntimeEstimator:
    return DowntimeEstimator(
        image(), codecs.by_name(codec), codecs.by_name(codec).default_level, TokenBucket(cap), cost or SwitchoverCost()
    )


def test_dirty_pages_that_do_not_compress_cost_their_raw_size_even_when_pass_1_compressed_well() -> None:
    """The case the issue found: pass 1 compressed 2.7:1 under a 50M cap, the dirty pages were random."""
    est = estimator("zlib", cap=50 * MB)
    est.note_pass(PassCost(pages=PAGES, wire_bytes=int(PAGES * PS / 2.7), duration=PAGES * PS / 2.7 / (50 * MB)))
    dirty = np.arange(1024, PAGES)  # random pages
    estimate = est.estimate(dirty, pages_until_pause=0, scan_time=0.05)
    wire = 1024 * (PS + PER_PAGE_OVERHEAD)
    assert estimate.wire_bytes == pytest.approx(wire, rel=0.02)
    assert estimate.wire_rate == pytest.approx(50 * MB, rel=0.01)
    send = (wire - est.bucket.burst) / (50 * MB)  # the cap's burst goes out at once after the pause
    assert send > 0.02
    assert estimate.seconds == pytest.approx(send + estimate.switchover + estimate.pipeline, rel=0.02)
    assert estimate.pipeline > 0, "one batch encoded before the wire"


def test_compressible_dirty_pages_cost_what_the_codec_makes_of_them() -> None:
    est = estimator("zlib", cap=50 * MB)
    dirty = np.arange(0, 500)
    sample = image()[:64].tobytes()  # pages alike: any 64 of them compress the same
    ratio = len(sample) / len(codecs.by_name("zlib").compressor(1).compress(sample))
    estimate = est.estimate(dirty, pages_until_pause=0, scan_time=0.0)
    assert estimate.wire_bytes < 500 * PS / 4, "repeated text packs far better than 4:1"
    assert estimate.wire_bytes == pytest.approx(500 * (PS / ratio + PER_PAGE_OVERHEAD), rel=0.1)


def test_zero_pages_in_the_dirty_set_cost_only_their_page_number() -> None:
    est = estimator("none")
    assert est.wire_per_page(np.arange(PAGES, PAGES + 100)) == 8


def test_the_cap_bounds_the_rate_a_short_bursty_pass_seems_to_reach() -> None:
    est = estimator("none", cap=50 * MB)
    est.note_pass(PassCost(pages=1000, wire_bytes=4 * MB, duration=0.04))  # 100 MB/s: the bucket's burst
    assert est.wire_rate() == 50 * MB


def test_without_a_cap_the_rate_is_what_the_latest_measurable_pass_achieved() -> None:
    est = estimator("none")
    est.note_pass(PassCost(pages=PAGES, wire_bytes=800 * MB, duration=1.0))
    est.note_pass(PassCost(pages=10, wire_bytes=40_000, duration=0.001))  # too short to measure a rate
    assert est.wire_rate() == 800 * MB
    est.note_pass(PassCost(pages=5000, wire_bytes=200 * MB, duration=0.5))
    assert est.wire_rate() == 400 * MB


def test_a_new_cap_counts_at_the_next_estimate() -> None:
    est = estimator("none", cap=200 * MB)
    est.note_pass(PassCost(pages=PAGES, wire_bytes=100 * MB, duration=0.5))
    assert est.wire_rate() == 200 * MB
    est.bucket.set_rate(25 * MB)  # vmmig ctl set max-bandwidth 25M
    assert est.wire_rate() == 25 * MB


def test_a_pass_that_took_more_wire_than_its_sample_predicted_raises_later_estimates() -> None:
    est = estimator("none")
    est.note_pass(PassCost(pages=PAGES, wire_bytes=PAGES * PS, duration=0.1))
    dirty = np.arange(1024, 1524)
    first = est.estimate(dirty, 0, 0.0)
    # The pass that sent these pages took twice what the sample said (a skewed sample, frame overheads).
    est.note_pass(PassCost(pages=500, wire_bytes=int(2 * first.wire_bytes), duration=0.1), est.predicted_per_page)
    assert est.calibration == pytest.approx(1.5)
    assert est.estimate(dirty, 0, 0.0).wire_bytes == pytest.approx(1.5 * first.wire_bytes)


def test_pages_dirtied_until_the_pause_are_part_of_the_estimate() -> None:
    est = estimator("none", cap=50 * MB)
    dirty = np.arange(1024, 1124)
    assert est.estimate(dirty, 100, 0.0).wire_bytes == pytest.approx(2 * est.estimate(dirty, 0, 0.0).wire_bytes)


def test_the_switchover_cost_adds_pause_scan_verdict_and_in_qemu_mode_the_device_state_handoff() -> None:
    qemu = SwitchoverCost.for_guest("qmp", qemu_handoff=True)
    assert qemu.total(scan=0.04) == pytest.approx(PAUSE_PRIOR["qmp"] + 0.04 + VERDICT + QEMU_HANDOFF)
    assert SwitchoverCost.for_guest("pid", qemu_handoff=False).total(0.0) == pytest.approx(PAUSE_PRIOR["pid"] + VERDICT)
    est = estimator("none", cost=qemu)
    assert est.estimate(np.empty(0, dtype=np.int64), 0, 0.04).seconds == pytest.approx(qemu.total(0.04))


def test_a_last_pass_inside_the_burst_still_costs_its_pipeline_first_batch_encoded_last_batch_decoded() -> None:
    """Compressible pages under a cap whose burst holds them all: the wire costs nothing, the encoding at the sender
    does, and so does the receiver's decompression of the last batch (it starts only once that batch arrived)."""
    est = DowntimeEstimator(image(), codecs.by_name("zlib"), 1, TokenBucket(50 * MB), SwitchoverCost(), batch_pages=256)
    est.note_pass(PassCost(pages=PAGES, wire_bytes=PAGES * PS // 4, duration=0.5))
    small = est.estimate(np.arange(0, 200), 0, 0.0)
    assert small.wire_bytes < est.bucket.burst and small.seconds == pytest.approx(small.switchover + small.pipeline)
    encode, decode = est.encode_per_page, est.decode_per_page
    assert encode > 0 and decode > 0
    assert small.pipeline == pytest.approx(200 * (encode + decode)), "one batch of 200: encoded, sent, decoded"
    large = est.estimate(np.arange(0, 1000), 0, 0.0)
    encode, decode = est.encode_per_page, est.decode_per_page
    # 256 pages encoded before the wire; the other 744 by one worker (threads=1), the wire costing nothing; the
    # last batch (1000 = 3 x 256 + 232) decoded at the receiver after it arrived.
    assert large.pipeline == pytest.approx(256 * encode + 744 * encode + 232 * decode, rel=0.01)


def test_pages_the_pipeline_would_send_raw_cost_no_compression_and_no_decompression() -> None:
    """Random pages: zlib's 4-page check sends them raw, so the estimate must not price deflate and inflate."""
    est = DowntimeEstimator(image(), codecs.by_name("zlib"), 1, TokenBucket(50 * MB), SwitchoverCost(), batch_pages=256)
    est.note_pass(PassCost(pages=PAGES, wire_bytes=PAGES * PS, duration=0.5))
    est.estimate(np.arange(1024, 1200), 0, 0.0)
    assert est.decode_per_page == 0.0


def test_nothing_measured_yet_means_no_rate_and_an_infinite_estimate() -> None:
    est = estimator("none")
    assert est.estimate(np.arange(10), 0, 0.0).seconds == float("inf")


def test_a_sample_of_the_dirty_set_spans_the_codec_window_so_repeats_a_batch_would_find_are_priced_in() -> None:
    """The benchmark guest writes pages drawn from a pool of 64 random pages, each with its own 8-byte stamp: zstd
    finds the repeats across a batch, so a sample too small to hold them predicted 2-3x the wire bytes."""
    rng = np.random.default_rng(11)
    pool = rng.integers(0, 256, (64, PS), dtype=np.uint8)
    pages = pool[rng.integers(0, 64, 4096)]
    pages[:, :8] = rng.integers(0, 256, (4096, 8), dtype=np.uint8)
    zstd = codecs.by_name("zstd")
    est = DowntimeEstimator(pages, zstd, 1, TokenBucket(50 * MB), SwitchoverCost(), batch_pages=1024)
    dirty = np.sort(rng.choice(4096, 3000, replace=False))
    predicted = est.wire_per_page(dirty)
    compressor = zstd.compressor(1)
    batches = [dirty[i : i + 1024] for i in range(0, dirty.size, 1024)]
    actual = sum(len(compressor.compress(np.take(pages, b, axis=0).reshape(-1))) for b in batches) / dirty.size
    assert predicted == pytest.approx(actual + PER_PAGE_OVERHEAD, rel=0.25)
    assert est.sample_pages * PS == 4 * zstd.window(1), "four windows of zstd level 1"


def test_the_estimate_names_its_parts_and_they_add_up() -> None:
    est = estimator("zlib", cap=50 * MB, cost=SwitchoverCost.for_guest("qmp", qemu_handoff=True))
    est.note_pass(PassCost(pages=PAGES, wire_bytes=PAGES * PS, duration=PAGES * PS / (50 * MB)))
    estimate = est.estimate(np.arange(1024, PAGES), pages_until_pause=10, scan_time=0.02)
    assert estimate.parts is not None
    assert set(estimate.parts) == {"pause", "scan", "verdict", "handoff", "send", "pipeline"}
    assert sum(estimate.parts.values()) == pytest.approx(estimate.seconds)
    assert estimate.parts["handoff"] == QEMU_HANDOFF and estimate.parts["scan"] == 0.02


def test_an_estimate_is_plain_floats_that_a_report_can_carry() -> None:
    """numpy scalars in an estimate once made `converged` a numpy bool, which JSON refused after a migration."""
    est = estimator("zstd", cap=50 * MB)
    est.note_pass(PassCost(pages=PAGES, wire_bytes=PAGES * PS, duration=0.5))
    estimate = est.estimate(np.arange(0, 1500), pages_until_pause=3.5, scan_time=0.01)
    values = [estimate.seconds, estimate.wire_bytes, estimate.wire_rate, estimate.pipeline, *estimate.parts.values()]
    assert all(type(value) is float for value in values)
    json.dumps({"converged": estimate.seconds <= 0.3, "parts": estimate.parts_ms()})
