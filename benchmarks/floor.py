"""The design floor: the fastest a migration that does what vmmig must do could run on this machine.

This module measures the CPU cost of each step a design mandates on the given image, one step at a time, with the
same C primitives vmmig calls (numpy, xxhash, ISA-L / zlib-ng, zstandard, sendmsg, pwrite, fallocate, loopback TCP)
and none of vmmig's own code between them: no protocol, no queues, no Python per batch beyond one loop iteration.

Design 3 (protocol 3, the default): the sender scans the mapping for zero pages and fingerprints each non-zero page
(xxh3) in place; raw batches go from the mapping to the socket without a copy (sendmsg of the runs), compressed
ones are gathered into a buffer first and compressed; the CRC covers only frame heads (negligible, not measured).
The receiver decompresses where asked, pwrites the pages into DEST, reads each written page back from DEST's
mapping and fingerprints it (one pass: both the per-page check and the digest), and allocates DEST (fallocate).

Design 2 (``--design 2``, the protocol-2 pipeline): every non-zero page copied out of the mapping, xxh3
fingerprints of the copies, CRC-32 of every frame on both ends, preallocation, pwrite, and the digest recomputed
from DEST in a separate pass.

    floor wall = sum of the steps' CPU seconds / usable CPUs     (perfect overlap of both ends on all cores)
    floor MB/s = image bytes / floor wall                        ('with start-up': + the interpreter's start)

Any implementation of a design with these primitives on this machine takes at least that long, so
``floor MB/s / QEMU MB/s`` is the highest ratio to QEMU a conforming vmmig could reach in the same run.

    python benchmarks/floor.py IMAGE [--codec none|zlib|zstd] [--design 3|2] [--repeat 3]

``bench_qemu.py`` runs it in every round next to the QEMU cases (rows ``floor none``, ``floor zlib``, ``floor zstd``).
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

try:  # vmmig deflates at levels 1-2 and inflates with ISA-L where it installs (migrate_cli/wire/codec.py)
    from isal import isal_zlib as deflate
except ImportError:  # pragma: no cover
    deflate = zlib_ng

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
BATCH = 1 << 20  # vmmig's default batch: 256 pages
CHANNELS = 2
MB = 1_000_000
TCP_STEP = "both: loopback TCP, 2 connections"  # the one step whose CPU both ends share
CPUS = len(os.sched_getaffinity(0))
CODECS = ("none", "zlib", "zstd")
DESIGNS = (3, 2)
LEVEL = 1


@dataclass
class Floor:
    """CPU seconds of each mandated step over one image (single-threaded unless the step says otherwise)."""

    codec: str
    image_bytes: int
    nonzero_bytes: int
    wire_bytes: int
    steps: dict[str, float] = field(default_factory=dict)
    design: int = 3
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

    def side_cpu_s(self, prefix: str) -> float:
        """CPU seconds of one end's steps (``send:`` or ``recv:``) plus half of the shared TCP step."""
        own = sum(v for k, v in self.steps.items() if k.startswith(prefix))
        return own + self.steps.get(TCP_STEP, 0.0) / 2


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


def send_message(sock: socket.socket, buffers: list[memoryview]) -> None:
    """sendmsg until every byte of ``buffers`` is out (one call per message unless the socket buffer fills)."""
    while buffers:
        sent = sock.sendmsg(buffers)
        while sent:
            if sent >= buffers[0].nbytes:
                sent -= buffers[0].nbytes
                buffers = buffers[1:]
            else:
                buffers[0] = buffers[0][sent:]
                sent = 0


def tcp_cpu(messages: list[list[memoryview]]) -> float:
    """Process CPU (both ends' threads, kernel included) to move ``messages`` over CHANNELS loopback connections:
    one sendmsg per message (a batch: its buffers gathered by the kernel) on one end, recv_into a reused buffer on
    the other."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    senders = [socket.create_connection(("127.0.0.1", port)) for _ in range(CHANNELS)]
    receivers = [listener.accept()[0] for _ in range(CHANNELS)]
    listener.close()
    shares = [messages[i::CHANNELS] for i in range(CHANNELS)]
    errors: list[BaseException] = []

    def send(sock: socket.socket, share: list[list[memoryview]]) -> None:
        try:
            for message in share:
                send_message(sock, list(message))
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
        threading.Thread(target=receive, args=(r, sum(b.nbytes for m in sh for b in m)))
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


class Codec:
    """Level-1 compression and its inverse with the libraries vmmig uses (zlib: ISA-L where installed)."""

    def __init__(self, name: str) -> None:
        if name not in ("zlib", "zstd"):
            raise ValueError(f"unknown codec {name!r} ({', '.join(CODECS)})")
        self.name = name
        self._zstd_c = zstandard.ZstdCompressor(level=LEVEL)
        self._zstd_d = zstandard.ZstdDecompressor()

    def compress(self, data: np.ndarray) -> bytes:
        return self._zstd_c.compress(data) if self.name == "zstd" else deflate.compress(data, LEVEL)

    def decompress(self, packed: bytes, size: int) -> bytes:
        if self.name == "zstd":
            return self._zstd_d.decompress(packed, max_output_size=size)
        return deflate.decompress(packed, bufsize=size)  # one output buffer of the batch's size, as vmmig asks


def open_image(image: Path) -> tuple[mmap.mmap, np.ndarray, int]:
    """A fresh read-only mapping of the image (its page faults are part of the scan), as bytes."""
    size = image.stat().st_size
    fd = os.open(image, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return mapping, np.frombuffer(mapping, dtype=np.uint8), size


def scan(src: np.ndarray, size: int, masks: list[np.ndarray]) -> Callable[[], None]:
    """The zero scan, batch by batch: one mask of non-zero pages per batch."""

    def run() -> None:
        for offset, length in chunks(size):
            words = src[offset : offset + length].view(np.uint64).reshape(-1, PAGE // 8)
            masks.append(np.bitwise_or.reduce(words, axis=1) != 0)

    return run


def fingerprint_rows(rows: np.ndarray) -> None:
    np.fromiter(map(xxhash.xxh3_64_intdigest, rows), np.uint64, len(rows))


def gather_store(masks: list[np.ndarray]) -> list[np.ndarray]:
    """One buffer per batch for its non-zero pages, touched beforehand (vmmig's workers reuse theirs)."""
    store = np.ones(sum(int(m.sum()) for m in masks) * PAGE, dtype=np.uint8)
    offsets = np.cumsum([0] + [int(m.sum()) * PAGE for m in masks])
    return [store[a:b] for a, b in itertools.pairwise(offsets)]


def gather(src: np.ndarray, size: int, masks: list[np.ndarray], copies: list[np.ndarray]) -> Callable[[], None]:
    def run() -> None:
        for (offset, length), mask, out in zip(chunks(size), masks, copies, strict=True):
            pages = src[offset : offset + length].reshape(-1, PAGE)
            np.compress(mask, pages, axis=0, out=out.reshape(-1, PAGE))

    return run


def compress_steps(codec: Codec, copies: list[np.ndarray], steps: dict[str, float]) -> list[bytes]:
    """Time the compression with each output dropped at once, as a sender does after sending it (kept, the outputs
    would add page faults no sender pays); then compress again, untimed, to keep them for the steps below."""

    def compress_and_drop() -> None:
        for copy in copies:
            if copy.size:
                codec.compress(copy)

    steps[f"send: {codec.name} level {LEVEL}"] = cpu_of(compress_and_drop)
    return [codec.compress(c) for c in copies if c.size]


def decompress_step(codec: Codec, packed: list[bytes], copies: list[np.ndarray], steps: dict[str, float]) -> None:
    def decompress() -> None:
        for packed_batch, copy in zip(packed, (c for c in copies if c.size), strict=True):
            codec.decompress(packed_batch, copy.size)

    steps[f"recv: {codec.name} decompress"] = cpu_of(decompress)


def measure(image: Path, codec: str = "none", workdir: Path | None = None, design: int = 3) -> Floor:
    """Measure every step of ``design`` (3 or 2) once over ``image`` (a file whose pages are resident, e.g. in
    /dev/shm)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} ({', '.join(CODECS)})")
    if design == 3:
        return measure_design3(image, codec, workdir)
    if design == 2:
        return measure_design2(image, codec, workdir)
    raise ValueError(f"unknown design {design} (3 or 2)")


def measure_design3(image: Path, codec: str, workdir: Path | None) -> Floor:
    """Protocol 3: fingerprints in place, raw pages sent from the mapping, one read-back pass on the receiver."""
    mapping, src, size = open_image(image)
    steps: dict[str, float] = {}
    masks: list[np.ndarray] = []
    steps["send: zero scan (mapping's first touch)"] = cpu_of(scan(src, size, masks))
    runs = [runs_of(mask) for mask in masks]

    def fingerprint_in_place() -> None:
        for (offset, _), batch_runs in zip(chunks(size), runs, strict=True):
            for lo, hi in batch_runs:
                fingerprint_rows(src[offset + lo * PAGE : offset + hi * PAGE].reshape(-1, PAGE))

    steps["send: xxh3 fingerprints (in the mapping)"] = cpu_of(fingerprint_in_place)
    view = memoryview(mapping)
    # What lands in DEST, batch by batch: (offset in DEST, bytes), from the mapping or from the decompressed copy.
    landing: list[list[tuple[int, memoryview]]] = []
    if codec == "none":
        messages = [
            [view[offset + lo * PAGE : offset + hi * PAGE] for lo, hi in batch_runs]
            for (offset, _), batch_runs in zip(chunks(size), runs, strict=True)
        ]
        messages = [m for m in messages if m]
        landing = [
            [(offset + lo * PAGE, view[offset + lo * PAGE : offset + hi * PAGE]) for lo, hi in batch_runs]
            for (offset, _), batch_runs in zip(chunks(size), runs, strict=True)
        ]
        wire_bytes = sum(b.nbytes for m in messages for b in m)
    else:
        compressor = Codec(codec)
        copies = gather_store(masks)
        steps["send: gather non-zero pages into a buffer"] = cpu_of(gather(src, size, masks, copies))
        packed = compress_steps(compressor, copies, steps)
        messages = [[memoryview(p)] for p in packed]
        wire_bytes = sum(len(p) for p in packed)
        for (offset, _), batch_runs, copy in zip(chunks(size), runs, copies, strict=True):
            done, flat, lands = 0, memoryview(copy), []
            for lo, hi in batch_runs:
                n = (hi - lo) * PAGE
                lands.append((offset + lo * PAGE, flat[done : done + n]))
                done += n
            landing.append(lands)
    steps[TCP_STEP] = tcp_cpu(messages)
    if codec != "none":
        decompress_step(compressor, packed, copies, steps)
    nonzero = sum(int(m.sum()) for m in masks) * PAGE
    with tempfile.NamedTemporaryFile(dir=workdir or Path("/dev/shm"), prefix="floor-dest-") as dest:
        dfd = dest.fileno()
        steps["recv: fallocate DEST"] = cpu_of(lambda: os.posix_fallocate(dfd, 0, size))

        def write() -> None:  # one pwrite per run of non-zero pages, as vmmig's receiver does
            for lands in landing:
                for at, data in lands:
                    os.pwrite(dfd, data, at)

        steps["recv: pwrite pages into DEST"] = cpu_of(write)
        readback = mmap.mmap(dfd, size, prot=mmap.PROT_READ)
        dst = np.frombuffer(readback, dtype=np.uint8)

        def read_back() -> None:  # each written page fingerprinted from DEST: the check and the digest at once
            for (offset, _), batch_runs in zip(chunks(size), runs, strict=True):
                for lo, hi in batch_runs:
                    fingerprint_rows(dst[offset + lo * PAGE : offset + hi * PAGE].reshape(-1, PAGE))

        steps["recv: xxh3 read-back from DEST (check + digest)"] = cpu_of(read_back)
    # Both mappings are unmapped when the last array and view over them go, with this call's closures.
    return Floor(codec, size, nonzero, wire_bytes, steps, design=3)


def measure_design2(image: Path, codec: str, workdir: Path | None) -> Floor:
    """Protocol 2: a copy of every non-zero page, CRC-32 on both ends, the digest recomputed from DEST."""
    _mapping, src, size = open_image(image)
    steps: dict[str, float] = {}
    masks: list[np.ndarray] = []
    steps["send: zero scan (mapping's first touch)"] = cpu_of(scan(src, size, masks))
    copies = gather_store(masks)
    steps["send: copy out of the mapping"] = cpu_of(gather(src, size, masks, copies))

    def fingerprint() -> None:
        for buf in copies:
            fingerprint_rows(buf.reshape(-1, PAGE))

    def crc(buffers: list[np.ndarray] | list[bytes]) -> Callable[[], None]:
        def run() -> None:
            for buf in buffers:
                zlib_ng.crc32(buf)

        return run

    steps["send: xxh3 fingerprints"] = cpu_of(fingerprint)
    wire: list[np.ndarray] | list[bytes] = copies
    if codec != "none":
        compressor = Codec(codec)
        packed = compress_steps(compressor, copies, steps)
        wire = packed
    steps["send: CRC-32 of each frame"] = cpu_of(crc(wire))
    steps[TCP_STEP] = tcp_cpu([[memoryview(w).cast("B")] for w in wire if len(w)])
    steps["recv: CRC-32 of each frame"] = cpu_of(crc(wire))
    if codec != "none":
        decompress_step(compressor, packed, copies, steps)
    nonzero = sum(c.size for c in copies)
    with tempfile.NamedTemporaryFile(dir=workdir or Path("/dev/shm"), prefix="floor-dest-") as dest:
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
                    fingerprint_rows(dst[offset + lo * PAGE : offset + hi * PAGE].reshape(-1, PAGE))

        steps["recv: digest from DEST"] = cpu_of(digest)
    # Both mappings are unmapped when the last array over them goes, with this call's closures.
    return Floor(codec, size, nonzero, sum(len(w) for w in wire), steps, design=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--codec", choices=CODECS, default="none")
    parser.add_argument("--design", type=int, choices=DESIGNS, default=3, help="3: protocol 3 (default); 2: the old")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    floors = [measure(args.image, args.codec, design=args.design) for _ in range(args.repeat)]
    startup = startup_wall()
    size = args.image.stat().st_size
    print(f"design {args.design} floor, {args.codec}, {size / MB:.0f} MB image, {CPUS} CPUs, medians:")
    for name in floors[0].steps:
        print(f"  {name:<48} {statistics.median(f.steps[name] for f in floors):6.3f} CPU s")
    cpu = statistics.median(f.cpu_s for f in floors)
    print(f"  {'sum':<48} {cpu:6.3f} CPU s ({cpu / (size / (1 << 30)):.2f} CPU s per GiB)")
    print(
        f"  floor: {statistics.median(f.mbps for f in floors):.0f} MB/s of image; with a {startup:.2f} s start-up "
        f"{statistics.median(f.image_bytes / MB / (f.wall_s + startup) for f in floors):.0f} MB/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
