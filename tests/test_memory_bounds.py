"""Batch buffers stay bounded whatever the thread count: the defaults of a many-core host must not pin gigabytes."""

from migrate_cli.receiver.pipeline import POOL_BUDGET, pool_count
from migrate_cli.sender.options import (
    DEFAULT_BATCH_SIZE,
    MIN_DEFAULT_BATCH_SIZE,
    SENDER_BUFFER_BUDGET,
    default_batch_size,
)
from migrate_cli.sender.pipeline import RING

MiB = 1 << 20


def test_a_small_host_gets_the_full_default_batch() -> None:
    assert default_batch_size(1, RING) == default_batch_size(8, RING) == DEFAULT_BATCH_SIZE == 4 * MiB


def test_the_default_batch_shrinks_with_threads_so_the_senders_buffers_fit_the_budget() -> None:
    for threads in (9, 16, 24, 32):
        size = default_batch_size(threads, RING)
        assert size < DEFAULT_BATCH_SIZE and RING * threads * size <= SENDER_BUFFER_BUDGET, threads


def test_the_default_batch_never_drops_below_one_mib() -> None:
    assert default_batch_size(64, RING) == default_batch_size(1024, RING) == MIN_DEFAULT_BATCH_SIZE


def test_the_receiver_keeps_two_buffers_per_worker_on_a_small_host() -> None:
    assert pool_count(2, 4 * MiB + 4096) == 6
    assert pool_count(8, 1 * MiB + 4096) == 18


def test_the_receivers_buffers_stay_within_the_budget_on_a_many_core_host() -> None:
    payload = 4 * MiB + 16 * 1024
    count = pool_count(64, payload)
    assert count * payload <= POOL_BUDGET and count >= 6
    assert pool_count(64, 16 * MiB + 16 * 1024) * (16 * MiB + 16 * 1024) <= POOL_BUDGET  # the largest batches
    assert pool_count(64, 64 * MiB) == 6  # whatever the size: never fewer than 6 (a reader, a queue, workers)
