"""The token bucket: one budget of wire bytes per second, on a fake clock."""

import itertools
import threading
import time

from migrate_cli.ratelimit import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_unlimited_bucket_never_sleeps() -> None:
    clock = FakeClock()
    bucket = TokenBucket(None, clock=clock, sleep=clock.sleep)
    for _ in range(1000):
        bucket.consume(1 << 20)
    assert clock.slept == 0


def test_sustained_rate_matches_the_cap() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10_000_000, clock=clock, sleep=clock.sleep)
    total = 0
    for _ in range(400):
        bucket.consume(256 * 1024)
        total += 256 * 1024
    rate = total / clock.now
    assert 0.97 * 10_000_000 <= rate <= 1.03 * 10_000_000


def test_a_frame_larger_than_the_burst_still_passes_by_going_into_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, burst=1000, clock=clock, sleep=clock.sleep)
    bucket.consume(2_000_000)
    assert clock.now >= 1.99


def test_a_long_wait_for_tokens_calls_idle_at_every_step_so_the_caller_can_send_keepalives() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100_000, burst=1000, clock=clock, sleep=clock.sleep)
    seen: list[float] = []
    bucket.consume(400_000, idle=lambda: seen.append(clock.now))  # a 4 s wait
    assert clock.now >= 3.99
    assert len(seen) >= 70 and max(b - a for a, b in itertools.pairwise([0.0, *seen])) <= 0.05 + 1e-9


def test_rate_changes_apply_to_the_next_consume() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        bucket.consume(100_000)
    slow = clock.now
    bucket.set_rate(10_000_000)
    start = clock.now
    for _ in range(100):
        bucket.consume(100_000)
    assert (clock.now - start) < slow * 1.2


def test_stop_event_interrupts_a_long_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=1, clock=clock, sleep=clock.sleep)
    stop = threading.Event()
    stop.set()
    bucket.consume(10**9, stop)
    assert clock.slept < 1.0


class SharedClock(FakeClock):
    """A fake clock that several threads advance; sleeping yields so the others run."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds / 4  # four sleepers share the passing time
            self.slept += seconds
        time.sleep(0)


def test_concurrent_consumers_share_one_budget() -> None:
    clock = SharedClock()
    bucket = TokenBucket(10_000_000, clock=clock, sleep=clock.sleep)
    sent = [0] * 4

    def consumer(i: int) -> None:
        for _ in range(50):
            bucket.consume(100_000)
            sent[i] += 100_000

    threads = [threading.Thread(target=consumer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(sent)
    assert total == 20_000_000
    # 20 MB through one 10 MB/s bucket takes ~2 s however many threads push, never ~0.5 s.
    assert clock.now >= 1.8


def test_burst_after_idle_is_bounded() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10_000_000, clock=clock, sleep=clock.sleep)
    clock.now += 100.0  # a long idle period must not bank 100 s of tokens
    start = clock.now
    for _ in range(100):
        bucket.consume(100_000)
    assert clock.now - start >= 0.9  # 10 MB at 10 MB/s: at most the 50 ms burst was free


def test_a_rate_change_reaches_a_consumer_already_waiting() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock=clock, sleep=clock.sleep)
    changed: list[float] = []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now > 0.2 and not changed:
            bucket.set_rate(None)  # another thread lifts the cap while this consumer sleeps
            changed.append(clock.now)

    bucket._sleep = sleep
    bucket.consume(1_000_000)  # 1000 s at the old rate
    assert changed and clock.now < changed[0] + 0.06
