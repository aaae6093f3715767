#!/usr/bin/env python3
"""A simulated guest that keeps rewriting a shared memory image, for testing and benchmarking live migration.

Usage::

    python examples/guest_workload.py IMAGE [--threads 8] [--rate 50M] [--pattern uniform|hotset|sweep]
        [--hot-fraction 0.05] [--zero-fraction 0.1] [--restore-fraction 0.1] [--seed 1] [--duration 0]
        [--page-size 4096] [--pid-file PATH] [--create SIZE]

IMAGE (for example ``/dev/shm/vm.ram``, a regular file, or a ``/proc/PID/fd/N`` path) is opened read-write and
mapped whole with ``MAP_SHARED``, the same file ``vmmig send --live`` migrates, and ``--threads`` writer threads (8 by
default, like the 8 vCPUs of QEMU's 2018 live-migration measurement) rewrite its pages until ``--duration`` seconds
have passed (0 = forever) or SIGTERM/SIGINT arrives; then the process exits 0. Its size must be a whole number of
pages. ``--create SIZE`` first creates the file (zero-filled) if it does not exist, or extends it to SIZE if it is
shorter.

Rate
----
``--rate`` is the total number of bytes written per second by all threads (``K M G`` are powers of 10, ``KiB MiB
GiB`` powers of 2, a trailing ``/s`` is accepted); ``0`` means as fast as possible. Every thread gets an equal share
and runs a token bucket on ``time.monotonic``: it writes whole pages in bursts of about 5 ms worth (1 to 64 pages)
and sleeps until it has earned the next burst. The credit a thread can accumulate is capped at 10 ms worth, so after
the process was stopped (SIGSTOP, as ``vmmig`` does for the switchover or to throttle a guest with a SIGSTOP/SIGCONT
duty cycle) it resumes at its normal rate instead of catching up with a burst of writes for the time it was stopped.

Patterns
--------
* ``uniform`` -- random pages over the whole image;
* ``hotset``  -- 95% of the writes go to a hot set of ``--hot-fraction`` of the pages (chosen once from the seed),
  the other 5% are uniform;
* ``sweep``   -- each thread walks sequentially through its own contiguous slice of the image, wrapping around.

Writes
------
Every write replaces one whole page, by numpy or memoryview slice assignment on the mapping, with one of:

* new content (the common case): one of a pool of up to 64 pages with a unique 64-bit stamp (thread number
  and per-thread counter, XORed with a per-process nonce) in its first 8 bytes, so every write gives distinct,
  non-zero content. ``--content random`` (default) fills the pool with random bytes (they do not compress, like
  encrypted or compressed data); ``--content compressible`` with words of a small vocabulary (zlib level 1 packs
  them about 3:1, like text and code);
* zeros (``--zero-fraction`` of the writes);
* an earlier content of that page (``--restore-fraction`` of the writes): before some overwrites a thread saves the
  page's old content in a small ring (at most 256 pages, oldest dropped first) and a restore writes the oldest saved
  page back to where it came from (an overwrite is done instead while the ring is empty).

On start, once the mapping is set up and the threads are running, one line is printed to stdout::

    guest_workload: pid <PID> writing <IMAGE> at <rate> with <N> threads (<pattern>)

and ``--pid-file`` (written atomically) receives the pid at the same moment. At exit a summary of the pages written
per kind goes to stderr. Bad arguments or an unusable image give a one-line error on stderr and exit status 2.

Import ``parse_size`` and ``Workload`` from this file (``importlib.util.spec_from_file_location``) to run the
workload inside a benchmark::

    workload = Workload("/dev/shm/vm.ram", threads=8, rate=50_000_000, pattern="hotset")
    workload.start()
    ...
    workload.stop()
    print(workload.stats())
"""

from __future__ import annotations

import argparse
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType, TracebackType

import numpy as np

from migrate_cli import units

PATTERNS: tuple[str, ...] = ("uniform", "hotset", "sweep")
DEFAULT_THREADS = 8
DEFAULT_RATE = 50_000_000
DEFAULT_PAGE_SIZE = 4096
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 2 * 1024 * 1024
HOT_SHARE = 0.95  # share of hotset writes that land in the hot set
CONTENTS = ("random", "compressible")
POOL_PAGES = 64  # distinct random pages new content is taken from
POOL_BYTES_MAX = 16 * 1024 * 1024  # fewer pool pages when pages are large
RING_PAGES = 256  # saved page contents per thread, for restores
RING_BYTES_MAX = 4 * 1024 * 1024  # fewer saved pages per thread when pages are large
BURST_SECONDS = 0.005  # a rate-limited thread writes about this much time's worth of pages at once
MAX_BURST_PAGES = 64  # and never more pages than this in one burst (also the burst at unlimited rate)
MAX_CREDIT_SECONDS = 0.01  # token bucket cap: a stopped guest (SIGSTOP duty cycle) never catches up afterwards
KINDS: tuple[str, ...] = ("overwrite", "zero", "restore")


def parse_size(text: str) -> int:
    """vmmig's size syntax (``4096``, ``50M``, ``64MiB``; K M G T powers of 10, KiB MiB GiB TiB powers of 2); a
    trailing ``/s`` is ignored, so rates read naturally. Raises ValueError for anything else."""
    stripped = text.strip()
    return units.parse_size(stripped[:-2] if stripped.lower().endswith("/s") else stripped)


def format_rate(rate: int) -> str:
    """``8_000_000`` -> ``8.0 MB/s`` (MB = 10^6 bytes, as in vmmig's reports); 0 -> ``full speed``."""
    if rate <= 0:
        return "full speed"
    for unit, scale in (("GB/s", 10**9), ("MB/s", 10**6), ("kB/s", 10**3)):
        if rate >= scale:
            return f"{rate / scale:.1f} {unit}"
    return f"{rate} B/s"


def ensure_image(path: str, size: int) -> None:
    """Create ``path`` zero-filled with ``size`` bytes if it does not exist, or extend it to ``size`` if shorter."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def content_pool(content: str, pages: int, page_size: int, rng: np.random.Generator) -> np.ndarray:
    """The pages new content is taken from: random bytes, or text-like words (a vocabulary of 64 words of 2 to 9
    lowercase letters, each followed by a space: zlib level 1 packs such a page about 3:1)."""
    if content == "random":
        return rng.integers(0, 256, size=(pages, page_size), dtype=np.uint8)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    vocabulary = [bytes(rng.choice(letters, int(rng.integers(2, 10)))) + b" " for _ in range(64)]
    pool = np.empty((pages, page_size), dtype=np.uint8)
    for page in pool:
        text = b"".join(vocabulary[i] for i in rng.integers(0, len(vocabulary), page_size // 2))
        page[:] = np.frombuffer(text[:page_size], dtype=np.uint8)
    return pool


def hot_pages(pages: int, fraction: float, seed: int) -> np.ndarray:
    """The hot set of the ``hotset`` pattern: ``max(1, round(fraction * pages))`` distinct page indices (sorted)."""
    count = min(pages, max(1, round(fraction * pages)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x407]))
    return np.sort(rng.choice(pages, size=count, replace=False)).astype(np.int64)


class Workload:
    """Writer threads rewriting the pages of a shared mapping of ``path``; see the module docstring.

    ``start()`` opens and maps the image (ValueError if it is not a whole number of pages, OSError if it cannot be
    opened) and starts the threads; ``stop()`` stops and joins them and unmaps the image; ``stats()`` may be called
    at any time. Also usable as a context manager.
    """

    def __init__(
        self,
        path: str,
        threads: int = DEFAULT_THREADS,
        rate: int = DEFAULT_RATE,
        pattern: str = "uniform",
        *,
        hot_fraction: float = 0.05,
        zero_fraction: float = 0.1,
        restore_fraction: float = 0.1,
        seed: int = 1,
        page_size: int = DEFAULT_PAGE_SIZE,
        content: str = "random",
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if rate < 0:
            raise ValueError(f"rate must not be negative, not {rate}")
        if content not in CONTENTS:
            raise ValueError(f"unknown content {content!r} (use {', '.join(CONTENTS)})")
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r} (use {', '.join(PATTERNS)})")
        if not 0 < hot_fraction <= 1:
            raise ValueError(f"hot fraction must be in (0, 1], not {hot_fraction}")
        for name, value in (("zero", zero_fraction), ("restore", restore_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} fraction must be in [0, 1], not {value}")
        if zero_fraction + restore_fraction > 1 + 1e-9:
            raise ValueError("zero fraction + restore fraction must not exceed 1")
        if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page size must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}")
        self.path = path
        self.threads = threads
        self.rate = rate
        self.pattern = pattern
        self.hot_fraction = hot_fraction
        self.zero_fraction = zero_fraction
        self.restore_fraction = restore_fraction
        self.seed = seed
        self.page_size = page_size
        self.content = content
        self.pages = 0
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._counts: list[list[int]] = []  # per thread: pages written per kind (index into KINDS), snapshots
        self._errors: list[BaseException] = []
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._started = 0.0
        self._stopped = 0.0

    # ----------------------------------------------------------------------------------------------------------------
    # Life cycle

    def start(self) -> None:
        """Map the image and start the writer threads."""
        if self._mm is not None:
            raise RuntimeError("workload already started")
        fd = os.open(self.path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % self.page_size:
                raise ValueError(
                    f"{self.path}: size {size} is not a positive multiple of the page size {self.page_size}"
                )
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._mm = fd, mm
        self.pages = size // self.page_size
        seeds = np.random.SeedSequence(self.seed).spawn(self.threads + 1)
        pool_pages = max(2, min(POOL_PAGES, POOL_BYTES_MAX // self.page_size))
        pool = content_pool(self.content, pool_pages, self.page_size, np.random.default_rng(seeds[-1]))
        hot = hot_pages(self.pages, self.hot_fraction, self.seed) if self.pattern == "hotset" else None
        nonce = int.from_bytes(os.urandom(8), "little")
        self._stop.clear()
        self._counts = [[0, 0, 0, 0] for _ in range(self.threads)]
        self._workers = [
            threading.Thread(
                target=self._run,
                args=(index, np.random.default_rng(seeds[index]), pool, hot, nonce),
                name=f"guest-writer-{index}",
                daemon=True,
            )
            for index in range(self.threads)
        ]
        self._started = time.monotonic()
        self._stopped = 0.0
        for worker in self._workers:
            worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and join the writer threads, then unmap and close the image. Safe to call more than once."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self._mm is not None and not any(worker.is_alive() for worker in self._workers):
            self._stopped = time.monotonic()
            try:
                self._mm.close()
            except BufferError:  # a numpy view still exists somewhere; the mapping goes with the process
                pass
            os.close(self._fd)
            self._mm, self._fd = None, -1

    def running(self) -> bool:
        """True while at least one writer thread is alive."""
        return any(worker.is_alive() for worker in self._workers)

    def stats(self) -> dict[str, int | float]:
        """Pages written so far per kind, their total, bytes, elapsed seconds and the average rate in bytes/s."""
        totals = [sum(counts[i] for counts in self._counts) for i in range(4)]
        result: dict[str, int | float] = dict(zip(KINDS, totals[:3], strict=True))
        pages = sum(totals[:3])
        end = self._stopped or time.monotonic()
        elapsed = end - self._started if self._started else 0.0
        result.update(
            pages=pages,
            bytes=pages * self.page_size,
            snapshots=totals[3],
            elapsed=elapsed,
            rate=pages * self.page_size / elapsed if elapsed > 0 else 0.0,
            errors=len(self._errors),
        )
        return result

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------------------------
    # Writer threads

    def _run(self, index: int, rng: np.random.Generator, pool: np.ndarray, hot: np.ndarray | None, nonce: int) -> None:
        try:
            self._write_loop(index, rng, pool, hot, nonce)
        except BaseException as exc:  # keep the process alive; stats() reports it
            self._errors.append(exc)
            print(f"guest_workload: writer {index} failed: {exc!r}", file=sys.stderr, flush=True)

    def _write_loop(
        self, index: int, rng: np.random.Generator, pool: np.ndarray, hot: np.ndarray | None, nonce: int
    ) -> None:
        assert self._mm is not None
        page_size, total_pages = self.page_size, self.pages
        pages = np.frombuffer(self._mm, dtype=np.uint8).reshape(total_pages, page_size)
        words = np.frombuffer(self._mm, dtype=np.uint64).reshape(total_pages, page_size // 8)
        view = memoryview(self._mm)
        counts = self._counts[index]
        stop = self._stop

        # Where this thread writes.
        lo, hi = index * total_pages // self.threads, (index + 1) * total_pages // self.threads
        if hi <= lo:  # more threads than pages: share a page
            lo, hi = index % total_pages, index % total_pages + 1
        position = 0

        # What it writes.
        zero_cut = self.zero_fraction
        restore_cut = self.zero_fraction + self.restore_fraction
        overwrite_share = 1.0 - restore_cut
        if self.restore_fraction <= 0:
            snapshot_probability = 0.0
        elif overwrite_share <= 1e-9:
            snapshot_probability = 1.0
        else:
            snapshot_probability = min(1.0, 2.0 * self.restore_fraction / overwrite_share)
        ring_capacity = max(4, min(RING_PAGES, RING_BYTES_MAX // page_size))
        ring: dict[int, bytes] = {}
        pool_count = len(pool)
        stamp_base = np.uint64(((index + 1) << 48) ^ nonce)
        counter = 0

        # How fast: a token bucket in bytes.
        share = self.rate / self.threads
        if share > 0:
            burst = int(min(MAX_BURST_PAGES, max(1, share * BURST_SECONDS // page_size)))
            capacity = max(share * MAX_CREDIT_SECONDS, float(burst * page_size))
        else:
            burst, capacity = MAX_BURST_PAGES, 0.0
        burst_bytes = burst * page_size
        tokens = 0.0
        last = time.monotonic()

        try:
            while not stop.is_set():
                if share > 0:
                    now = time.monotonic()
                    tokens = min(capacity, tokens + (now - last) * share)
                    last = now
                    if tokens < burst_bytes:
                        stop.wait((burst_bytes - tokens) / share)
                        continue
                    tokens -= burst_bytes

                # Pick the pages.
                if self.pattern == "sweep":
                    idx = lo + (position + np.arange(burst, dtype=np.int64)) % (hi - lo)
                    position = (position + burst) % (hi - lo)
                elif hot is not None:
                    idx = rng.integers(0, total_pages, size=burst, dtype=np.int64)
                    in_hot = rng.random(burst) < HOT_SHARE
                    idx[in_hot] = hot[rng.integers(0, len(hot), size=int(in_hot.sum()), dtype=np.int64)]
                else:
                    idx = rng.integers(0, total_pages, size=burst, dtype=np.int64)

                # Pick the kinds of write.
                draw = rng.random(burst)
                zero = draw < zero_cut
                restore = (draw >= zero_cut) & (draw < restore_cut)
                restores = min(int(restore.sum()), len(ring))
                if restores < restore.sum():  # not enough saved pages: overwrite instead
                    restore[np.flatnonzero(restore)[restores:]] = False
                overwrite_idx = idx[~(zero | restore)]

                # Earlier contents back in place (oldest saved first).
                for _ in range(restores):
                    page = next(iter(ring))
                    saved = ring.pop(page)
                    view[page * page_size : (page + 1) * page_size] = saved
                # Save some pages before they are overwritten.
                if snapshot_probability > 0 and len(overwrite_idx):
                    chosen = overwrite_idx[rng.random(len(overwrite_idx)) < snapshot_probability]
                    for page in chosen.tolist():
                        ring.pop(page, None)
                        if len(ring) >= ring_capacity:
                            del ring[next(iter(ring))]
                        ring[page] = view[page * page_size : (page + 1) * page_size].tobytes()
                    counts[3] += len(chosen)
                # Zero pages.
                if zero.any():
                    pages[idx[zero]] = 0
                # New content: a pool page, then a unique stamp in its first 8 bytes.
                count = len(overwrite_idx)
                if count:
                    serial = np.arange(counter, counter + count, dtype=np.uint64)
                    pages[overwrite_idx] = pool[serial % np.uint64(pool_count)]
                    words[overwrite_idx, 0] = serial ^ stamp_base
                    counter += count
                counts[0] += count
                counts[1] += int(zero.sum())
                counts[2] += restores
        finally:
            del pages, words
            view.release()


# --------------------------------------------------------------------------------------------------------------------
# Command line


def write_pid_file(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically (a temporary file next to it, then os.replace)."""
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as handle:
        handle.write(f"{pid}\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guest_workload",
        description="Keep rewriting the pages of a shared memory image, like the vCPUs of a running guest.",
    )
    parser.add_argument("image", metavar="IMAGE", help="memory image to map MAP_SHARED and rewrite")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="writer threads (default 8)")
    parser.add_argument("--rate", default="50M", help="total bytes written per second, 0 = unlimited (default 50M)")
    parser.add_argument("--pattern", choices=PATTERNS, default="uniform", help="which pages are written")
    parser.add_argument("--hot-fraction", type=float, default=0.05, help="hotset: share of pages in the hot set")
    parser.add_argument("--zero-fraction", type=float, default=0.1, help="share of writes that zero a page")
    parser.add_argument("--restore-fraction", type=float, default=0.1, help="share of writes restoring old content")
    parser.add_argument("--seed", type=int, default=1, help="seed for page choices and content (default 1)")
    parser.add_argument(
        "--content", choices=CONTENTS, default="random", help="new pages: random bytes or compressible text"
    )
    parser.add_argument("--duration", type=float, default=0.0, help="seconds to run, 0 = until SIGTERM/SIGINT")
    parser.add_argument("--page-size", default="4096", help="page size (default 4096)")
    parser.add_argument("--pid-file", help="write the pid here (atomically) once running")
    parser.add_argument("--create", metavar="SIZE", help="create IMAGE zero-filled with SIZE bytes (or extend it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"guest_workload: error: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        rate = parse_size(args.rate)
        page_size = parse_size(args.page_size)
        create = parse_size(args.create) if args.create is not None else None
        if args.duration < 0:
            raise ValueError(f"duration must not be negative, not {args.duration}")
        workload = Workload(
            args.image,
            threads=args.threads,
            rate=rate,
            pattern=args.pattern,
            hot_fraction=args.hot_fraction,
            zero_fraction=args.zero_fraction,
            restore_fraction=args.restore_fraction,
            seed=args.seed,
            page_size=page_size,
            content=args.content,
        )
        if create is not None:
            ensure_image(args.image, create)
    except (ValueError, OSError) as exc:
        return fail(str(exc))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        workload.start()
    except (ValueError, OSError) as exc:
        return fail(str(exc))

    pid = os.getpid()
    print(
        f"guest_workload: pid {pid} writing {args.image} at {format_rate(rate)} "
        f"with {args.threads} threads ({args.pattern})",
        flush=True,
    )
    if args.pid_file:
        write_pid_file(args.pid_file, pid)

    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    while not stop.is_set() and workload.running():
        timeout = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if timeout <= 0:
            break
        stop.wait(timeout)
    workload.stop()

    stats = workload.stats()
    print(
        f"guest_workload: wrote {stats['pages']} pages ({stats['overwrite']} overwrite, {stats['zero']} zero, "
        f"{stats['restore']} restore) in {stats['elapsed']:.2f} s, {stats['rate'] / 1e6:.1f} MB/s",
        file=sys.stderr,
        flush=True,
    )
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
