"""The design floor: the fastest a migration that does what vmmig must do could run on this machine.

The core issue mandates work that QEMU's migration does not do: copy each page out of the mapping before it is
checksummed, fingerprint every page (xxh3) and CRC-32 every frame on the sender, CRC-32 again on the receiver,
preallocate DEST in full, write the pages into it, and recompute the digest from DEST before acknowledging.
This module measures the CPU cost of each of those steps on the given image, one step at a time, with the same
C primitives vmmig calls (numpy, xxhash, zlib-ng, zstandard, pwrite, fallocate, loopback TCP) and none of
vmmig's own code between them: no protocol, no queues, no Python per batch beyond one loop iteration.

    floor wall = sum of the steps' CPU seconds / usable CPUs     (perfect overlap of both ends on all cores)
    floor MB/s = image bytes / floor wall                        ('with start-up': + the interpreter's start)

Any implementation that does these steps with these primitives on this machine takes at least that long, so
``floor MB/s / QEMU MB/s`` is the highest ratio to QEMU a conforming vmmig could reach in the same run. A
hand-written C pass that fused scan, copy, hash and CRC would share memory traffic between them; it would not
remove the hashing, the checksums, the two TCP copies or the allocation, which are most of the sum.

    python benchmarks/floor.py IMAGE [--codec none|zstd] [--repeat 3]

``bench_qemu.py`` runs it in every round next to the QEMU cases (rows ``floor none`` and ``floor zstd``).
"""

from __future__ import annotations

import argparse
import itertools
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
import zlib_ng.zlib_ng as zlib_ng
import zstandard

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
BATCH = 1 << 20  # vmmig's default batch: 256 pages
CHANNELS = 2
MB = 1_000_000
TCP_STEP = "both: loopback TCP, 2 connections"  # the one step whose CPU both ends share
CPUS = len(os.sched_getaffinity(0))


@dataclass
class Floor:
    """CPU seconds of each mandated step over one image (single-threaded unless the step says otherwise)."""

    codec: str
    image_bytes: int
    nonzero_bytes: int
    wire_bytes: int
    steps: dict[str, float] = field(default_factory=dict)
    startup_s: float = 0.0  # wall time of a Python start-up that imports vmmig's sender

    @property
    def cpu_s(self) -> float:
        return sum(self.steps.values())

    @property
    def wall_s(self) -> float:
        return self.cpu_s / CPUS

    @property
    def mbps(self) -> float:
        return self.image_bytes / MB / self.wall_s

    @property
    def mbps_with_startup(self) -> float:
        return self.image_bytes / MB / (self.wall_s + self.startup_s)


def cpu_of(step: Callable[[], None], clock: Callable[[], float] = time.thread_time) -> float:
    before = clock()
    step()
    return clock() - before


def chunks(size: int) -> Iterator[tuple[int, int]]:
    for offset in range(0, size, BATCH):
        yield offset, min(BATCH, size - offset)


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) of each run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def startup_wall(repeat: int = 3) -> float:
    """Median wall time of ``python -c 'import migrate_cli.sender.session'`` (bytecode compiled by the caller)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import migrate_cli.sender.session"], cwd=REPO, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def tcp_cpu(payload: list[memoryview]) -> float:
    """Process CPU (both ends' threads, kernel included) to move ``payload`` over CHANNELS loopback connections:
    sendmsg of 1 MiB buffers on one end, recv_into a reused buffer on the other."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    senders = [socket.create_connection(("127.0.0.1", port)) for _ in range(CHANNELS)]
    receivers = [listener.accept()[0] for _ in range(CHANNELS)]
    listener.close()
    shares = [payload[i::CHANNELS] for i in range(CHANNELS)]
    errors: list[BaseException] = []

    def send(sock: socket.socket, share: list[memoryview]) -> None:
        try:
            for buf in share:
                sock.sendall(buf)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def receive(sock: socket.socket, expected: int) -> None:
        buf = memoryview(bytearray(BATCH))
        got = 0
        try:
            while n := sock.recv_into(buf):
                got += n
            if got != expected:
                errors.append(RuntimeError(f"received {got} of {expected} bytes"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s, sh)) for s, sh in zip(senders, shares, strict=True)]
    threads += [
        threading.Thread(target=receive, args=(r, sum(b.nbytes for b in sh)))
        for r, sh in zip(receivers, shares, strict=True)
    ]
    before = time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spent = time.process_time() - before
    for sock in senders + receivers:
        sock.close()
    if errors:
        raise errors[0]
    return spent


def measure(image: Path, codec: str = "none", workdir: Path | None = None) -> Floor:
    """Measure every mandated step once over ``image`` (a file whose pages are resident, e.g. in /dev/shm)."""
    size = image.stat().st_size
    fd = os.open(image, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)  # fresh: its page faults are part of the scan
    finally:
        os.close(fd)
    src = np.frombuffer(mapping, dtype=np.uint8)
    steps: dict[str, float] = {}
    masks: list[np.ndarray] = []
    copies: list[np.ndarray] = []  # what a sender copies out: the non-zero pages of each batch

    def scan() -> None:
        for offset, length in chunks(size):
            words = src[offset : offset + length].view(np.uint64).reshape(-1, PAGE // 8)
            masks.append(np.bitwise_or.reduce(words, axis=1) != 0)

    def copy_out() -> None:  # into buffers touched beforehand, as vmmig's workers reuse theirs
        for (offset, length), mask, out in zip(chunks(size), masks, copies, strict=True):
            pages = src[offset : offset + length].reshape(-1, PAGE)
            np.compress(mask, pages, axis=0, out=out.reshape(-1, PAGE))

    def fingerprint(buffers: list[np.ndarray]) -> Callable[[], None]:
        def run() -> None:
            for buf in buffers:
                rows = buf.reshape(-1, PAGE)
                np.fromiter(map(xxhash.xxh3_64_intdigest, rows), np.uint64, len(rows))

        return run

    def crc(buffers: list[np.ndarray] | list[bytes]) -> Callable[[], None]:
        def run() -> None:
            for buf in buffers:
                zlib_ng.crc32(buf)

        return run

    steps["send: zero scan (mapping's first touch)"] = cpu_of(scan)
    store = np.ones(sum(int(m.sum()) for m in masks) * PAGE, dtype=np.uint8)  # touched: no page faults below
    offsets = np.cumsum([0] + [int(m.sum()) * PAGE for m in masks])
    copies.extend(store[a:b] for a, b in itertools.pairwise(offsets))
    steps["send: copy out of the mapping"] = cpu_of(copy_out)
    steps["send: xxh3 fingerprints"] = cpu_of(fingerprint(copies))
    wire: list[np.ndarray] | list[bytes] = copies
    if codec == "zstd":
        compressor = zstandard.ZstdCompressor(level=1)
        packed: list[bytes] = []

        # Timed with each output dropped at once, as a sender does after sending it (kept, the outputs would add
        # page faults no sender pays); then compressed again, untimed, to keep them for the steps below.
        def compress_and_drop() -> None:
            for copy in copies:
                if copy.size:
                    compressor.compress(copy)

        steps["send: zstd level 1"] = cpu_of(compress_and_drop)
        packed.extend(compressor.compress(c) for c in copies if c.size)
        wire = packed
    elif codec != "none":
        raise ValueError(f"unknown codec {codec!r} (none or zstd)")
    steps["send: CRC-32 of each frame"] = cpu_of(crc(wire))
    steps[TCP_STEP] = tcp_cpu([memoryview(w).cast("B") for w in wire if len(w)])
    steps["recv: CRC-32 of each frame"] = cpu_of(crc(wire))
    if codec == "zstd":
        decompressor = zstandard.ZstdDecompressor()

        def decompress() -> None:
            for packed_batch, copy in zip(packed, (c for c in copies if c.size), strict=True):
                decompressor.decompress(packed_batch, max_output_size=copy.size)

        steps["recv: zstd decompress"] = cpu_of(decompress)
    nonzero = sum(c.size for c in copies)
    directory = workdir or Path("/dev/shm")
    with tempfile.NamedTemporaryFile(dir=directory, prefix="floor-dest-") as dest:
        dfd = dest.fileno()
        steps["recv: preallocate DEST"] = cpu_of(lambda: os.posix_fallocate(dfd, 0, size))

        def write() -> None:  # one pwrite per run of non-zero pages, as vmmig's receiver does
            for (offset, _), mask, copy in zip(chunks(size), masks, copies, strict=True):
                done = 0
                for lo, hi in runs_of(mask):
                    n = (hi - lo) * PAGE
                    os.pwrite(dfd, copy[done : done + n], offset + lo * PAGE)
                    done += n

        steps["recv: write pages into DEST"] = cpu_of(write)
        readback = mmap.mmap(dfd, size, prot=mmap.PROT_READ)
        dst = np.frombuffer(readback, dtype=np.uint8)

        def digest() -> None:  # the non-zero pages read back in place, run by run; zero pages are known
            for (offset, _), mask in zip(chunks(size), masks, strict=True):
                for lo, hi in runs_of(mask):
                    rows = dst[offset + lo * PAGE : offset + hi * PAGE].reshape(-1, PAGE)
                    np.fromiter(map(xxhash.xxh3_64_intdigest, rows), np.uint64, len(rows))

        steps["recv: digest from DEST"] = cpu_of(digest)
    # Both mappings are unmapped when the last array over them goes, with this call's closures.
    return Floor(codec, size, nonzero, sum(len(w) for w in wire), steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--codec", choices=("none", "zstd"), default="none")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    floors = [measure(args.image, args.codec) for _ in range(args.repeat)]
    startup = startup_wall()
    print(f"design floor, {args.codec}, {args.image.stat().st_size / MB:.0f} MB image, {CPUS} CPUs, medians:")
    for name in floors[0].steps:
        print(f"  {name:<44} {statistics.median(f.steps[name] for f in floors):6.3f} CPU s")
    cpu = statistics.median(f.cpu_s for f in floors)
    print(f"  {'sum':<44} {cpu:6.3f} CPU s")
    print(
        f"  floor: {statistics.median(f.mbps for f in floors):.0f} MB/s of image; with a {startup:.2f} s start-up "
        f"{statistics.median(f.image_bytes / MB / (f.wall_s + startup) for f in floors):.0f} MB/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
