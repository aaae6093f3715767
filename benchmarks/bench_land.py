#!/usr/bin/env python3
"""How the receiver should land raw page data in DEST: measured, not assumed (issue: "land raw payload in the
destination without an intermediate buffer only where that is measured faster than today's pwrite").

One process, two threads: a sender thread writes SIZE bytes of raw page data (1 MiB sends) into a loopback TCP
connection; the receiving thread lands them in a fresh DEST file on /dev/shm (allocated with fallocate first, as
vmmig's receiver does) by each method below, in 4 MiB frames, then reads every page back and fingerprints it (xxh3,
as the receiver's page check does). Reported per method: wall seconds and the receiving thread's CPU seconds
(user + system, from ``time.thread_time``), median of ``--repeat`` rounds, and the ratio against the baseline.

* ``pwrite`` (baseline, what vmmig does): ``recv_into`` a reused 4 MiB buffer, then ``os.pwrite`` into DEST.
* ``mmap-recv``: ``recv_into`` straight into a writable MAP_SHARED mapping of DEST (no intermediate buffer; the
  page faults of first touch are the cost).
* ``mmap-populated``: the same into a mapping made with MAP_POPULATE (faults taken up front, counted too).
* ``splice``: ``os.splice`` socket -> pipe -> DEST (no user-space copy at all; the pipe is raised to 1 MiB).

Usage: bench_land.py [--size 1GiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from migrate_cli.units import parse_size

PAGE = 4096
FRAME = 4 << 20
F_SETPIPE_SZ = 1031


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n


def land_pwrite(sock: socket.socket, fd: int, size: int) -> None:
    buf = memoryview(bytearray(FRAME))
    for off in range(0, size, FRAME):
        n = min(FRAME, size - off)
        _recv_exactly(sock, buf[:n])
        os.pwrite(fd, buf[:n], off)


def _land_mapped(sock: socket.socket, fd: int, size: int, flags: int) -> None:
    mm = mmap.mmap(fd, size, flags=flags)
    view = memoryview(mm)
    try:
        for off in range(0, size, FRAME):
            _recv_exactly(sock, view[off : off + min(FRAME, size - off)])
    finally:
        view.release()
        mm.close()


def land_mmap(sock: socket.socket, fd: int, size: int) -> None:
    _land_mapped(sock, fd, size, mmap.MAP_SHARED)


def land_mmap_populated(sock: socket.socket, fd: int, size: int) -> None:
    _land_mapped(sock, fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0x8000))


def land_splice(sock: socket.socket, fd: int, size: int) -> None:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        off = 0
        while off < size:
            n = os.splice(sock.fileno(), w, min(1 << 20, size - off))
            if n == 0:
                raise EOFError
            left = n
            while left:
                m = os.splice(r, fd, left, offset_dst=off)
                off += m
                left -= m
    finally:
        os.close(r)
        os.close(w)


METHODS: dict[str, Callable[[socket.socket, int, int], None]] = {
    "pwrite": land_pwrite,
    "mmap-recv": land_mmap,
    "mmap-populated": land_mmap_populated,
    "splice": land_splice,
}


def one_round(method: str, size: int, payload: bytes, dest: Path) -> tuple[float, float]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def send() -> None:
        with socket.create_connection(("127.0.0.1", port)) as out:
            view = memoryview(payload)
            for off in range(0, size, 1 << 20):
                out.sendall(view[off % len(payload) : off % len(payload) + min(1 << 20, size - off)])

    dest.unlink(missing_ok=True)
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        sender = threading.Thread(target=send)
        sender.start()
        conn, _ = listener.accept()
        wall, cpu = time.perf_counter(), time.thread_time()
        METHODS[method](conn, fd, size)
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)  # the read-back and page check every method needs
        pages = np.frombuffer(mm, dtype=np.uint8).reshape(-1, PAGE)
        np.fromiter(map(xxhash.xxh3_64_intdigest, pages), np.uint64, pages.shape[0])
        del pages
        mm.close()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        sender.join()
        conn.close()
    finally:
        os.close(fd)
        listener.close()
        dest.unlink(missing_ok=True)
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    size = parse_size(args.size) // FRAME * FRAME
    payload = np.random.default_rng(1).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    dest = Path(args.dir) / f"vmmig-bench-land-{os.getpid()}"
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    for _ in range(args.repeat):  # interleaved rounds: the machine's noise hits every method alike
        for method in METHODS:
            results[method].append(one_round(method, size, payload, dest))
    base_cpu = statistics.median(c for _, c in results["pwrite"])
    print(f"landing {size / 2**20:.0f} MiB of raw pages in {args.dir}, medians of {args.repeat} interleaved rounds")
    print(f"{'method':16} {'wall s':>8} {'recv CPU s':>11} {'CPU / pwrite':>13}")
    for method, rounds in results.items():
        wall = statistics.median(w for w, _ in rounds)
        cpu = statistics.median(c for _, c in rounds)
        print(f"{method:16} {wall:8.3f} {cpu:11.3f} {cpu / base_cpu:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
