#!/usr/bin/env python3
"""vmmig against QEMU's own migration: the same guest RAM, the same machine, the same run, over 127.0.0.1.

What it measures
----------------
Two 1 GiB images (``--images``), each moved by every case in the same interleaved rounds:

* ``generated``: the deterministic 'mixed' image (examples/make_guest_image.py, seed 1: 40% zero, 25% text, 20%
  code, 15% random pages, in runs), generated in /dev/shm;
* ``guest``: a real guest's RAM (guest_ram.py): the examples/qemu guest booted with ``-m SIZE`` on a
  memory-backend-file, its memory filled the way a working VM's is (host text, ELF and compressed files copied into
  a tmpfs, an anonymous heap, some random data) to under 10% zero pages, paused over QMP and copied; cached in
  ``~/.cache/vmmig`` and reused (``--rebuild-guest`` makes it again).

The header of each image's table gives its zero share and zlib level-1 ratio. Cases:

* QEMU (``qemu-system-x86_64 -accel tcg``, paused with ``-S``, so no guest kernel runs). The source's RAM is a
  ``memory-backend-file`` on a fresh copy of the image (``share=on``), the destination's a fresh /dev/shm file
  (``prealloc=on,share=on``) started with ``-incoming defer``. Both are driven over QMP (a small stdlib client):
  ``max-bandwidth`` is raised to 1 TiB/s on both sides, the same capabilities and parameters are set on both, then
  ``migrate-incoming`` / ``migrate`` to ``tcp:127.0.0.1:PORT``. ``qemu multifd-none``, ``-zlib``, ``-zstd``:
  capability ``multifd``, 2 channels, ``multifd-compression`` none / zlib (level 1) / zstd (level 1). With
  ``--cases`` also ``qemu compress`` (capability ``compress``, 2 threads, level 1; QEMU 9.1 removed it: skipped
  with a notice then) and ``qemu plain`` (one stream, no capabilities).
* vmmig: ``vmmig recv --listen 127.0.0.1:0 --decompress-threads 2`` into a fresh /dev/shm file and ``vmmig send
  IMAGE ADDR --compress none|zlib|zstd|auto --level 1 --compress-threads 2 --channels 2`` (QEMU's cases use 2
  multifd channels too).
* design floor: ``floor none``, ``floor zlib``, ``floor zstd`` are not migrations. ``floor.py`` measures, on the same
  image in the same round, the CPU cost of each step of the protocol-3 design (zero scan, in-place xxh3
  fingerprints, a gather copy and level-1 compression for compressed batches only, loopback TCP on 2 connections,
  decompression, fallocate of DEST, pwrite, the read-back fingerprint pass) with the same C primitives and no vmmig
  code between them; ``--floor-designs 3,2`` adds the protocol-2 steps as ``floor2`` rows. Its ``MB/s`` is the image
  over (the CPU sum / the usable CPUs): perfect overlap of both ends. No conforming implementation with these
  primitives can beat it on this machine, so each target line also says whether the target lies within its reach.

How to read a table
-------------------
* ``MB/s`` -- image bytes (10^6 B = 1 MB) over the tool's own ``total-time``: QEMU's (``query-migrate``), vmmig's
  (the sender's report: from WELCOME to the verified result). The targets use this column.
* ``MB/s wall`` -- QEMU: from sending ``migrate`` until the source says ``completed`` *and* the destination has left
  ``inmigrate`` (both polled every 5 ms; both processes already running, the destination preallocated). vmmig: from
  starting ``send`` until both processes have exited (start-up, connecting and allocation count against vmmig).
* ``x QEMU`` -- for vmmig and floor rows: MB/s over the counterpart's (``vs``).
* ``wire MB`` -- the tool's own count: QEMU's ``ram.transferred``, vmmig's ``transferred``, the floor's bytes
  sent. QEMU 7.2 counts multifd pages *before* compression, so for multifd-zlib/-zstd that is not what went over
  the wire: ``IP MB`` (the growth of ``IpExt OutOctets`` during the case, headers and other traffic included; the
  least of the rounds, since other traffic only adds) is measured alike for every tool, and ``IP x QEMU`` and the
  wire targets use it.
* ``CPU s/GiB`` -- CPU seconds of both ends *over the migration*, per GiB of image. QEMU: utime + stime of both
  processes (all threads, /proc/PID/stat) between ``migrate`` and the end. vmmig: the sender's plus the receiver's
  ``cpu-migration-seconds`` (process CPU from the first connection to the verified result; the receiver's includes
  DEST's allocation, which QEMU's ``prealloc=on`` does before ``migrate``). Floor: the sum of its steps.
  ``src/dst CPU s`` are the two ends' shares of it. Below the table, for vmmig rows: start-up CPU (before the first
  connection), DEST allocation CPU, and whole-process CPU (rusage) of each end; for QEMU rows the whole-process CPU.
* ``other CPU s`` -- CPU time used by everything else on the machine during the case; ~0 on a quiet machine.

Verification: every QEMU destination's RAM file must equal the source QEMU's RAM file byte for byte after the
migration, and the output says whether the source file still equals the pristine image. Every vmmig destination
must equal the image byte for byte (and send and recv must report the same digest).

Medians of ``--repeat`` (default 3) interleaved rounds. Targets (PASS/FAIL on MB/s and IP bytes, medians; the exit
status is 0 whatever they say, 1 when a migration failed or a copy differs): vmmig zlib >= 5x QEMU multifd-zlib
on the generated image and >= 4x on the real guest's RAM, with IP bytes no more than multifd-zlib's; vmmig zstd
>= 1.0x multifd-zstd and vmmig none >= 0.5x multifd-none on both; vmmig none <= 1.0 CPU s per GiB (both ends, over
the migration) on the generated image.

    python benchmarks/bench_qemu.py [--size 1GiB] [--repeat 3] [--quick] [--images generated,guest] [--json out.json]

Needs ``qemu-system-x86_64`` (Debian: ``apt-get install qemu-system-x86``); the guest image also needs the
examples/qemu guest (``bash examples/qemu/build_guest.sh``). KVM is not needed: TCG is used.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import floor
import guest_ram
import harness
import numpy as np
from harness import CPUS, GIB, MB, MIB, fmt, fmt_size

QEMU = "qemu-system-x86_64"

PAGE = 4096
CASE_TIMEOUT = 300.0  # seconds for one migration
START_TIMEOUT = 60.0  # seconds for a QEMU to answer QMP (the destination preallocates first) or vmmig recv to listen
QMP_TIMEOUT = 30.0  # seconds for one QMP reply
POLL = 0.005  # seconds between query-migrate / query-status polls
QUIT_TIMEOUT = 15.0  # seconds for a QEMU to exit after 'quit'
COMPARE_CHUNK = 16 * MIB
MAX_BANDWIDTH = 1 << 40  # bytes/s: effectively unlimited (QEMU 7.2's default is 128 MiB/s, older ones 32 MiB/s)

# QEMU cases: name -> (capabilities, parameters); the same on both sides. max-bandwidth is added to all.
QEMU_CASES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "qemu compress": (["compress"], {"compress-threads": 2, "decompress-threads": 2, "compress-level": 1}),
    "qemu multifd-none": (["multifd"], {"multifd-channels": 2, "multifd-compression": "none"}),
    "qemu multifd-zlib": (
        ["multifd"],
        {"multifd-channels": 2, "multifd-compression": "zlib", "multifd-zlib-level": 1},
    ),
    "qemu multifd-zstd": (
        ["multifd"],
        {"multifd-channels": 2, "multifd-compression": "zstd", "multifd-zstd-level": 1},
    ),
    "qemu plain": ([], {}),
}
VMMIG_CASES: dict[str, str] = {"vmmig none": "none", "vmmig zlib": "zlib", "vmmig zstd": "zstd", "vmmig auto": "auto"}
# The design floors (floor.py): each design's steps' CPU cost over the image, no vmmig code; not migrations.
FLOOR_CASES: dict[str, tuple[str, int]] = {
    f"{'floor' if design == 3 else f'floor{design}'} {codec}": (codec, design)
    for design in floor.DESIGNS
    for codec in floor.CODECS
}
VMMIG_THREADS = 2
VMMIG_CHANNELS = 2  # as QEMU's multifd-channels: 2 threads and 2 connections a side, as the issue measures
VMMIG_LEVEL = 1
# Order of one round on one image (interleaved: each vmmig case next to its QEMU counterpart).
ROUND: tuple[str, ...] = (
    "qemu compress",
    "vmmig zlib",
    "qemu multifd-zlib",
    "vmmig auto",
    "floor zlib",
    "floor2 zlib",
    "qemu multifd-zstd",
    "vmmig zstd",
    "floor zstd",
    "floor2 zstd",
    "qemu multifd-none",
    "vmmig none",
    "floor none",
    "floor2 none",
    "qemu plain",
)
DEFAULT_CASES = tuple(n for n in ROUND if n not in ("qemu compress", "qemu plain") and not n.startswith("floor2"))
IMAGES = {"generated": "generated mixed image", "guest": "real guest's RAM"}


@dataclass(frozen=True)
class Target:
    """``ours`` MB/s >= ``minimum`` x ``theirs`` MB/s on ``image``; with ``wire``, ours' IP bytes <= theirs'."""

    image: str
    ours: str
    theirs: str
    minimum: float
    wire: bool = False


TARGETS: tuple[Target, ...] = (
    Target("generated", "vmmig zlib", "qemu multifd-zlib", 5.0, wire=True),
    Target("guest", "vmmig zlib", "qemu multifd-zlib", 4.0, wire=True),
    Target("generated", "vmmig zstd", "qemu multifd-zstd", 1.0),
    Target("guest", "vmmig zstd", "qemu multifd-zstd", 1.0),
    Target("generated", "vmmig none", "qemu multifd-none", 0.5),
    Target("guest", "vmmig none", "qemu multifd-none", 0.5),
)
# (image, case, most CPU seconds per GiB of both ends over the migration)
CPU_TARGETS: tuple[tuple[str, str, float], ...] = (("generated", "vmmig none", 1.0),)
# Counterpart shown in the table's 'x QEMU' columns.
COUNTERPART = {
    "vmmig zlib": "qemu multifd-zlib",
    "vmmig auto": "qemu multifd-zlib",
    "vmmig zstd": "qemu multifd-zstd",
    "vmmig none": "qemu multifd-none",
    **{name: f"qemu multifd-{codec}" for name, (codec, _) in FLOOR_CASES.items()},
}
# The vmmig cases a floor bounds: a target above the floor's ratio cannot be met by any conforming vmmig.
FLOOR_OF = {"vmmig zlib": "floor zlib", "vmmig zstd": "floor zstd", "vmmig none": "floor none"}


class SkipCase(Exception):
    """The installed QEMU does not support a case (e.g. the 'compress' capability, removed in QEMU 9.1)."""


# ----------------------------------------------------------------------------------------------------------------
# Images and results


@dataclass
class Image:
    """One benchmark image in the work directory (fully resident in /dev/shm)."""

    key: str  # 'generated' or 'guest'
    path: Path
    size: int
    zero_share: float
    zlib_ratio: float

    @property
    def title(self) -> str:
        return IMAGES[self.key]


@dataclass
class Run(harness.Measured):
    """One migration (or one floor measurement)."""

    ip_bytes: int
    tool_mbps: float | None
    src_cpu_s: float | None  # over the migration
    dst_cpu_s: float | None
    other_cpu_s: float | None
    process_cpu_s: tuple[float | None, float | None] | None = None  # whole-process rusage (src, dst)
    startup_cpu_s: tuple[float, float] | None = None  # vmmig: before the first connection (send, recv)
    alloc_cpu_s: float | None = None  # vmmig recv: DEST's allocation (part of dst_cpu_s)
    src_changed_pages: int | None = None  # QEMU: pages of the source RAM file that differ from the image afterwards
    qemu_total_time_ms: int | None = None
    qemu_downtime_ms: int | None = None
    qemu_dst_status: str | None = None
    report: dict[str, Any] = field(default_factory=dict)  # final query-migrate, or vmmig's send + recv reports

    @property
    def migration_cpu_s(self) -> float | None:
        if self.src_cpu_s is None or self.dst_cpu_s is None:
            return None
        return self.src_cpu_s + self.dst_cpu_s

    @property
    def cpu_per_gib(self) -> float | None:
        cpu = self.migration_cpu_s
        return None if cpu is None else cpu / (self.image_bytes / GIB)


@dataclass
class Result(harness.Aggregate):
    """A case on one image aggregated over its repeats (medians)."""

    image: str = ""
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and bool(self.runs)

    @property
    def ip_mb(self) -> float | None:
        """The least of the runs, not the median: other traffic on the machine only ever adds to the counter."""
        return min((r.ip_bytes / MB for r in self.runs), default=None)

    @property
    def tool_mbps(self) -> float | None:
        return self.median(lambda r: r.tool_mbps)

    @property
    def cpu_per_gib(self) -> float | None:
        return self.median(lambda r: r.cpu_per_gib)

    def summary(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "name": self.name,
            "image-bytes": self.image_bytes,
            "error": self.error,
            "skipped": self.skipped,
            "mbytes-per-second": self.tool_mbps,
            "wall-mbytes-per-second": self.wall_mbps,
            "wire-mbytes": self.wire_mb,
            "ip-mbytes": self.ip_mb,
            "migration-cpu-seconds-per-gib": self.cpu_per_gib,
            "src-cpu-seconds": self.median(lambda r: r.src_cpu_s),
            "dst-cpu-seconds": self.median(lambda r: r.dst_cpu_s),
            "other-cpu-seconds": self.median(lambda r: r.other_cpu_s),
            "runs": [asdict(r) for r in self.runs],
        }


# ----------------------------------------------------------------------------------------------------------------
# QMP


class QmpError(Exception):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", error))
        super().__init__(f"QMP {command}: {self.error_class}: {self.desc}")


class Qmp:
    """A minimal QMP client: unix socket, greeting, qmp_capabilities, then one command at a time (events skipped)."""

    def __init__(self, path: Path, child: harness.Child) -> None:
        deadline = time.perf_counter() + START_TIMEOUT
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if child.done.is_set():
                    self.sock.close()
                    raise harness.BenchError(f"{child.tag} exited {child.returncode}: {child.stderr_tail()}") from None
                if time.perf_counter() > deadline:
                    self.sock.close()
                    raise harness.BenchError(f"{child.tag}: no QMP socket after {START_TIMEOUT:.0f}s") from None
                time.sleep(0.01)
        self.sock.settimeout(START_TIMEOUT)  # the greeting comes once the machine is initialised (prealloc included)
        self.file = self.sock.makefile("rwb")
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise harness.BenchError(f"{child.tag}: unexpected QMP greeting {self.greeting}")
        self.sock.settimeout(QMP_TIMEOUT)
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            message = json.loads(line)
            if "event" not in message:
                return message

    def command(self, name: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise QmpError(name, reply["error"])
        return reply.get("return")

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def qemu_version() -> str | None:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def qemu_argv(ram: Path, size: int, qmp: Path, incoming: bool) -> list[str]:
    backend = f"memory-backend-file,id=mem,size={size},mem-path={ram},share=on"
    if incoming:
        backend += ",prealloc=on"
    argv = [
        QEMU,
        "-accel",
        "tcg",
        "-machine",
        "pc,memory-backend=mem",
        "-m",
        f"{size // MIB}M",
        "-object",
        backend,
    ]
    argv += ["-S", "-nographic", "-nodefaults", "-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv + (["-incoming", "defer"] if incoming else [])


def configure(qmp: Qmp, capabilities: Sequence[str], parameters: dict[str, Any], case: str) -> None:
    if capabilities:
        try:
            qmp.command(
                "migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in capabilities]
            )
        except QmpError as exc:
            raise SkipCase(f"{case}: this QEMU rejects capability {'/'.join(capabilities)}: {exc.desc}") from None
    try:
        qmp.command("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH, **parameters})
    except QmpError as exc:
        raise SkipCase(f"{case}: this QEMU rejects parameters {parameters}: {exc.desc}") from None


def quit_qemu(qmp: Qmp | None, child: harness.Child | None) -> None:
    if qmp is not None:
        try:
            qmp.command("quit")
        except (OSError, ConnectionError, QmpError, ValueError):
            pass
        qmp.close()
    if child is not None and not child.wait(QUIT_TIMEOUT):
        child.kill()


def run_qemu_case(name: str, image: Path, size: int, workdir: Path) -> Run:
    capabilities, parameters = QEMU_CASES[name]
    src_ram, dst_ram = workdir / "qemu-src.ram", workdir / "qemu-dst.ram"
    src_sock, dst_sock = workdir / "src.qmp", workdir / "dst.qmp"
    harness.remove(src_ram, dst_ram, src_sock, dst_sock)
    src: harness.Child | None = None
    dst: harness.Child | None = None
    qs: Qmp | None = None
    qd: Qmp | None = None
    try:
        shutil.copyfile(image, src_ram)  # a fully allocated copy, like a VM's RAM
        src = harness.Child(qemu_argv(src_ram, size, src_sock, incoming=False), workdir, "qemu-src")
        dst = harness.Child(qemu_argv(dst_ram, size, dst_sock, incoming=True), workdir, "qemu-dst")
        qs, qd = Qmp(src_sock, src), Qmp(dst_sock, dst)
        for qmp in (qd, qs):
            configure(qmp, capabilities, parameters, name)
        port = harness.free_port()
        uri = f"tcp:127.0.0.1:{port}"
        qd.command("migrate-incoming", uri=uri)
        before, ip_before = harness.cpu_clock(), harness.ip_out_octets()
        cpu0 = (src.live_cpu_s(), dst.live_cpu_s())
        started = time.perf_counter()
        qs.command("migrate", uri=uri)
        deadline = started + CASE_TIMEOUT
        info: dict[str, Any] = {}
        while True:  # the source: until completed
            info = qs.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise harness.BenchError(
                    f"{name}: migration {status}: {info.get('error-desc', '')} / {dst.stderr_tail()}"
                )
            check_alive(name, src, dst, deadline)
            time.sleep(POLL)
        src_done = time.perf_counter()
        while True:  # the destination: until it has left 'inmigrate'
            dst_status = qd.command("query-status")
            if dst_status.get("status") != "inmigrate":
                break
            check_alive(name, src, dst, deadline)
            time.sleep(POLL)
        ended = max(src_done, time.perf_counter())
        cpu1 = (src.live_cpu_s(), dst.live_cpu_s())
        ip_bytes = harness.ip_out_octets() - ip_before
        if dst_status.get("running") or dst_status.get("status") not in ("paused", "prelaunch", "postmigrate"):
            raise harness.BenchError(f"{name}: destination ended in state {dst_status}")
        src_cpu = None if None in (cpu0[0], cpu1[0]) else cpu1[0] - cpu0[0]  # type: ignore[operator]
        dst_cpu = None if None in (cpu0[1], cpu1[1]) else cpu1[1] - cpu0[1]  # type: ignore[operator]
        others = harness.other_cpu(before, (src_cpu or 0.0) + (dst_cpu or 0.0))
        quit_qemu(qs, src)
        quit_qemu(qd, dst)
        qs = qd = None
        ram = info.get("ram", {})
        wire = int(ram.get("transferred", info.get("transferred", 0)))
        total_ms = info.get("total-time")
        if differing_pages(dst_ram, src_ram, size) != 0:
            raise harness.BenchError(f"{name}: the destination's RAM differs from the source's after the migration")
        return Run(
            wall_s=ended - started,
            image_bytes=size,
            wire_bytes=wire,
            ip_bytes=ip_bytes,
            tool_mbps=size / MB / (total_ms / 1000) if total_ms else None,
            src_cpu_s=src_cpu,
            dst_cpu_s=dst_cpu,
            other_cpu_s=others,
            src_changed_pages=differing_pages(src_ram, image, size),
            qemu_total_time_ms=total_ms,
            qemu_downtime_ms=info.get("downtime"),
            qemu_dst_status=str(dst_status.get("status")),
            process_cpu_s=(src.cpu_s, dst.cpu_s),
            report=info,
        )
    finally:
        for qmp in (qs, qd):
            if qmp is not None:
                qmp.close()
        harness.kill_all([src, dst])
        harness.remove(src_ram, dst_ram, src_sock, dst_sock)


def check_alive(name: str, src: harness.Child, dst: harness.Child, deadline: float) -> None:
    for child in (src, dst):
        if child.done.is_set():
            raise harness.BenchError(f"{name}: {child.tag} died (exit {child.returncode}): {child.stderr_tail()}")
    if time.perf_counter() > deadline:
        raise harness.BenchError(f"{name}: timed out after {CASE_TIMEOUT:.0f}s")


# ----------------------------------------------------------------------------------------------------------------
# vmmig cases


def report_float(report: dict[str, Any], name: str, what: str) -> float:
    value = report.get(name)
    if not isinstance(value, int | float):
        raise harness.BenchError(f"{what}: the report has no number {name!r} (a vmmig without the CPU split?)")
    return float(value)


def run_vmmig_case(name: str, image: Path, size: int, workdir: Path) -> Run:
    codec = VMMIG_CASES[name]
    dest = workdir / "vmmig-dest.ram"
    partial = Path(f"{dest}.partial")
    harness.remove(dest, partial)
    try:
        with harness.VmmigPair(workdir, name, tags=("vmmig-recv", "vmmig-send")) as pair:
            before, ip_before = harness.cpu_clock(), harness.ip_out_octets()
            address = pair.start_recv("--decompress-threads", str(VMMIG_THREADS), str(dest), timeout=START_TIMEOUT)
            level = [] if codec == "none" else ["--level", str(VMMIG_LEVEL)]
            pair.start_send(
                str(image), address, "--compress", codec, *level, "--compress-threads", str(VMMIG_THREADS),
                "--channels", str(VMMIG_CHANNELS),
            )  # fmt: skip
            wall = pair.wait(CASE_TIMEOUT)
            ip_bytes = harness.ip_out_octets() - ip_before
            others = harness.other_cpu(before, pair.cpu_s)
            sent, received = pair.reports()
            if not dest.exists():
                raise harness.BenchError(f"{name}: {dest} was not created")
            if differing_pages(dest, image, size) != 0:
                raise harness.BenchError(f"{name}: the destination differs from the image")
            send, recv = pair.children
            total_ms = report_float(sent, "total-time", name)
            return Run(
                wall_s=wall,
                image_bytes=size,
                wire_bytes=int(sent["transferred"]),
                ip_bytes=ip_bytes,
                tool_mbps=size / MB / (total_ms / 1000) if total_ms else None,
                src_cpu_s=report_float(sent, "cpu-migration-seconds", name),
                dst_cpu_s=report_float(received, "cpu-migration-seconds", name),
                other_cpu_s=others,
                process_cpu_s=(send.cpu_s, recv.cpu_s),
                startup_cpu_s=(
                    report_float(sent, "cpu-startup-seconds", name),
                    report_float(received, "cpu-startup-seconds", name),
                ),
                alloc_cpu_s=report_float(received, "cpu-allocation-seconds", name),
                report={"send": sent, "recv": received},
            )
    finally:
        harness.remove(dest, partial)


def run_floor_case(name: str, image: Path, size: int, workdir: Path) -> Run:
    """A design floor (floor.py) on the same image: MB/s = image over its CPU sum / the usable CPUs; 'wall' adds a
    Python start-up that imports vmmig's sender."""
    codec, design = FLOOR_CASES[name]
    before, ip_before = harness.cpu_clock(), harness.ip_out_octets()
    measured = floor.measure(image, codec, workdir, design=design)
    ip_bytes = harness.ip_out_octets() - ip_before
    others = harness.other_cpu(before, 0.0)  # the steps ran in this process, which other_cpu leaves out
    measured.startup_s = floor.startup_wall()
    return Run(
        wall_s=measured.wall_s + measured.startup_s,
        image_bytes=size,
        wire_bytes=measured.wire_bytes,
        ip_bytes=ip_bytes,
        tool_mbps=measured.mbps,
        src_cpu_s=measured.side_cpu_s("send:"),
        dst_cpu_s=measured.side_cpu_s("recv:"),
        other_cpu_s=others,
        report={"floor-steps": measured.steps, "design": design, "startup-seconds": measured.startup_s},
    )


def run_case(name: str, image: Image, workdir: Path) -> Run:
    if name.startswith("qemu"):
        return run_qemu_case(name, image.path, image.size, workdir)
    if name in FLOOR_CASES:
        return run_floor_case(name, image.path, image.size, workdir)
    return run_vmmig_case(name, image.path, image.size, workdir)


# ----------------------------------------------------------------------------------------------------------------
# Files


def differing_pages(a: Path, b: Path, size: int) -> int:
    """Number of PAGE-sized pages that differ between two files of ``size`` bytes (-1 if a size differs)."""
    if a.stat().st_size != size or b.stat().st_size != size:
        return -1
    differing = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(COMPARE_CHUNK), fb.read(COMPARE_CHUNK)
            if not ca and not cb:
                return differing
            if ca == cb:
                continue
            if len(ca) != len(cb) or len(ca) % PAGE:
                return -1
            pa = np.frombuffer(ca, dtype=np.uint64).reshape(-1, PAGE // 8)
            pb = np.frombuffer(cb, dtype=np.uint64).reshape(-1, PAGE // 8)
            differing += int(np.count_nonzero((pa != pb).any(axis=1)))


def prepare_images(args: argparse.Namespace, size: int, workdir: Path) -> list[Image]:
    """The chosen images in the work directory, fully resident, with their zero share and zlib-1 ratio."""
    images = []
    for key in args.images:
        path = workdir / f"{key}.ram"
        if key == "generated":
            harness.make_image(harness.load_generator(), path, size, allocate=True)  # fully resident, like the copies
            share, ratio_ = guest_ram.figures(path)
        else:
            cached = guest_ram.ensure(size, workdir, args.guest_cache, args.rebuild_guest)
            shutil.copyfile(cached.path, path)
            share, ratio_ = cached.zero_share, cached.zlib_ratio
        images.append(Image(key, path, size, share, ratio_))
        harness.log(f"image {key}: {fmt_size(size)}, {share:.1%} zero pages, zlib-1 ratio {ratio_:.2f}")
    return images


# ----------------------------------------------------------------------------------------------------------------
# Output


def machine_info(version: str) -> dict[str, Any]:
    return {**harness.machine_info(), "qemu": version}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def median_pair(result: Result, get: Any) -> str:
    """'a / b' of the medians of a per-run (src, dst) pair."""
    pairs = [p for r in result.runs if (p := get(r)) is not None]
    if not pairs:
        return "-"
    return " / ".join(fmt(harness.median_of(pairs, lambda p, i=i: p[i]), ".2f") for i in range(2))


COLUMNS: tuple[tuple[str, int], ...] = (
    ("case", 17),
    ("MB/s", 7),
    ("MB/s wall", 9),
    ("x QEMU", 6),
    ("wire MB", 7),
    ("IP MB", 7),
    ("IP x QEMU", 9),
    ("CPU s/GiB", 9),
    ("src CPU s", 9),
    ("dst CPU s", 9),
    ("other CPU s", 11),
    ("vs", 17),
)


def table_row(result: Result, by_name: dict[str, Result]) -> list[str]:
    if not result.ok:
        return [result.name, "SKIPPED" if result.skipped else "FAILED", *(["-"] * (len(COLUMNS) - 2))]
    base = by_name.get(COUNTERPART.get(result.name, ""))
    usable = base is not None and base.ok
    return [
        result.name,
        fmt(result.tool_mbps),
        fmt(result.wall_mbps),
        fmt(ratio(result.tool_mbps, base.tool_mbps) if usable and base else None, ".2f"),
        fmt(result.wire_mb),
        fmt(result.ip_mb),
        fmt(ratio(result.ip_mb, base.ip_mb) if usable and base else None, ".2f"),
        fmt(result.cpu_per_gib, ".2f"),
        fmt(result.median(lambda r: r.src_cpu_s), ".2f"),
        fmt(result.median(lambda r: r.dst_cpu_s), ".2f"),
        fmt(result.median(lambda r: r.other_cpu_s), ".2f"),
        base.name if usable and base else "",
    ]


def print_table(image: Image, results: Sequence[Result]) -> None:
    print(
        f"{image.title} ({image.key}): {fmt_size(image.size)}, {image.zero_share:.1%} zero pages, zlib-1 ratio "
        f"{image.zlib_ratio:.2f}"
    )
    by_name = {r.name: r for r in results}
    harness.print_table(COLUMNS, [table_row(r, by_name) for r in results], left=(0, -1))
    for result in results:
        if result.error is not None:
            print(f"  {result.name}: FAILED: {result.error}")
        elif result.skipped is not None:
            print(f"  {result.name}: SKIPPED: {result.skipped}")
    print("  CPU outside the migration (medians, s): start-up before the first connection, DEST allocation (inside")
    print("  dst CPU s), whole process (rusage) beside the migration's; QEMU: its whole processes")
    for result in results:
        if not result.ok or result.name.startswith("floor"):
            continue
        whole = median_pair(result, lambda r: r.process_cpu_s)
        migration = fmt(result.median(lambda r: r.migration_cpu_s), ".2f")
        if result.name.startswith("vmmig"):
            startup = median_pair(result, lambda r: r.startup_cpu_s)
            alloc = fmt(result.median(lambda r: r.alloc_cpu_s), ".2f")
            print(
                f"    {result.name:<17} start-up send/recv {startup}, allocation {alloc}, migration {migration}, "
                f"whole process send/recv {whole}"
            )
        else:
            print(f"    {result.name:<17} migration {migration}, whole process src/dst {whole}")
    for result in results:
        wire, ip = result.wire_mb, result.ip_mb
        if result.ok and result.name.startswith("qemu") and wire and ip and abs(wire - ip) > 0.05 * ip:
            print(
                f"  NOTE: {result.name}: wire MB ({wire:.1f}) differs from the IP bytes measured ({ip:.1f}): QEMU 7.2"
                " counts multifd pages before compression."
            )
    load = [(r.name, r.median(lambda x: x.other_cpu_s), r.runs[0].wall_s) for r in results if r.ok]
    if warning := harness.busy_warning(load):
        print(f"  {warning}")
    print()


def print_qemu_detail(image: Image, results: Sequence[Result]) -> None:
    print(f"QEMU details, {image.key} (medians; total-time and downtime as QEMU reports them)")
    for result in results:
        if not result.name.startswith("qemu") or not result.ok:
            continue
        changed = sorted({r.src_changed_pages for r in result.runs})
        states = sorted({str(r.qemu_dst_status) for r in result.runs})
        print(
            f"  {result.name:<18} total-time {fmt(result.median(lambda r: r.qemu_total_time_ms), '.0f')} ms, "
            f"downtime {fmt(result.median(lambda r: r.qemu_downtime_ms), '.0f')} ms, "
            f"destination state {'/'.join(states)}, source pages changed vs image: {', '.join(map(str, changed))}"
        )
    print()


def floor_note(target: Target, by_name: dict[str, Result], theirs: Result, ours: Result) -> str:
    bound = by_name.get(FLOOR_OF.get(target.ours, ""))
    if bound is None or not bound.ok or not bound.tool_mbps or not theirs.tool_mbps or not ours.tool_mbps:
        return ""
    reach = bound.tool_mbps / theirs.tool_mbps
    return (
        f"; design floor {fmt(bound.tool_mbps)} MB/s = {reach:.2f}x: the target is "
        f"{'above' if reach < target.minimum else 'within'} its reach; vmmig runs at "
        f"{ours.tool_mbps / bound.tool_mbps:.0%} of it"
    )


def target_lines(image: str, results: Sequence[Result]) -> list[tuple[str, str]]:
    by_name = {r.name: r for r in results}
    lines = []
    for target in (t for t in TARGETS if t.image == image):
        a, b = by_name.get(target.ours), by_name.get(target.theirs)
        label = f"{image}: {target.ours} vs {target.theirs}"
        if a is None or b is None or not a.ok or not b.ok or not a.tool_mbps or not b.tool_mbps:
            why = next((r.skipped or r.error for r in (a, b) if r is not None and not r.ok), "not run")
            lines.append(("SKIP", f"{label}: not measured ({why})"))
            continue
        value = a.tool_mbps / b.tool_mbps
        passed = value >= target.minimum
        text = f"{label}: {fmt(a.tool_mbps)} / {fmt(b.tool_mbps)} MB/s = {value:.2f}x >= {target.minimum:g}x"
        if target.wire:
            wire_ok = a.ip_mb is not None and b.ip_mb is not None and a.ip_mb <= b.ip_mb
            passed = passed and wire_ok
            text += f", IP {fmt(a.ip_mb)} <= {fmt(b.ip_mb)} MB ({'yes' if wire_ok else 'no'})"
        lines.append(("PASS" if passed else "FAIL", text + floor_note(target, by_name, b, a)))
    for target_image, name, most in CPU_TARGETS:
        if target_image != image:
            continue
        result = by_name.get(name)
        cpu = result.cpu_per_gib if result is not None and result.ok else None
        if cpu is None:
            lines.append(("SKIP", f"{image}: {name} CPU over the migration: not measured"))
            continue
        text = f"{image}: {name} CPU over the migration, both ends: {cpu:.2f} s per GiB <= {most:g}"
        bound = by_name.get(FLOOR_OF.get(name, ""))
        if bound is not None and bound.ok and bound.cpu_per_gib is not None:
            reach = "above" if bound.cpu_per_gib > most else "within"
            text += f"; design floor {bound.cpu_per_gib:.2f} s per GiB: the target is {reach} its reach"
        lines.append(("PASS" if cpu <= most else "FAIL", text))
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="guest RAM / image size (default 1GiB; whole MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: --size 512MiB --repeat 1")
    parser.add_argument("--images", default="generated,guest", help="comma-separated: generated, guest (default both)")
    parser.add_argument(
        "--cases",
        help=f"comma-separated cases (default: {', '.join(DEFAULT_CASES)}; also: qemu compress, qemu plain)",
    )
    parser.add_argument(
        "--floor-designs", default="3", help="design floors to measure: 3 (protocol 3, default), 2 or 3,2"
    )
    parser.add_argument("--rebuild-guest", action="store_true", help="boot and fill the guest again (guest_ram.py)")
    parser.add_argument("--guest-cache", type=Path, default=guest_ram.DEFAULT_CACHE, help="guest image cache dir")
    parser.add_argument("--json", metavar="PATH", help="also write every run (and QEMU's query-migrate) as JSON")
    harness.add_tree_option(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeat = "512MiB", 1  # a 256 MiB guest keeps >10% zero pages (kernel reserve)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.images = [i.strip() for i in args.images.split(",") if i.strip()]
    if not args.images or set(args.images) - set(IMAGES):
        parser.error(f"--images: choose from {', '.join(IMAGES)}")
    try:
        designs = {int(d) for d in args.floor_designs.split(",") if d.strip()}
    except ValueError:
        parser.error("--floor-designs: 3, 2 or 3,2")
    if designs - set(floor.DESIGNS):
        parser.error("--floor-designs: 3, 2 or 3,2")
    chosen = [c.strip() for c in args.cases.split(",")] if args.cases else list(DEFAULT_CASES)
    if unknown := set(chosen) - set(ROUND):
        parser.error(f"--cases: unknown {', '.join(sorted(unknown))} (known: {', '.join(ROUND)})")
    if args.cases is None:  # every floor row of the chosen designs; with --cases, the floor rows it names
        chosen += [n for n, (_, d) in FLOOR_CASES.items() if d in designs and n not in chosen]
    else:
        designs |= {FLOOR_CASES[n][1] for n in chosen if n in FLOOR_CASES}
    chosen = [n for n in chosen if n not in FLOOR_CASES or FLOOR_CASES[n][1] in designs]
    args.cases = [n for n in ROUND if n in chosen]
    return args


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    generator = harness.load_generator()
    size = generator.parse_size(args.size)
    if size <= 0 or size % MIB:
        raise harness.BenchError("--size must be a positive whole number of MiB (QEMU's -m)")
    version = qemu_version()
    if version is None:
        raise harness.BenchError(f"{QEMU} not found: install it (Debian: apt-get install qemu-system-x86)")
    info = machine_info(version)
    print("vmmig vs QEMU migration over 127.0.0.1")
    print(f"  date     {info['date']}   (load average at start: {' '.join(info['load-average'])})")
    print(f"  machine  {CPUS} usable CPUs, {info['cpu-model']}, Linux {info['kernel']}")
    print(f"  software {info['vmmig']} (commit {info['commit']}), Python {info['python']}")
    print(f"  qemu     {version} (-accel tcg, guest paused with -S)")
    print(
        f"  images   {fmt_size(size)}: {', '.join(IMAGES[k] for k in args.images)}; {args.repeat} interleaved "
        "round(s), medians"
    )
    print(flush=True)

    harness.check_space(size, len(args.images) + 2.2, "the images, the QEMU source copy and one destination")
    images = prepare_images(args, size, workdir)
    harness.prefault(workdir, size)
    results = {
        (image.key, name): Result(name=name, image_bytes=size, image=image.key)
        for image in images
        for name in args.cases
    }
    for round_no in range(1, args.repeat + 1):
        for image in images:
            for name in args.cases:
                result = results[image.key, name]
                if result.skipped is not None or result.error is not None:
                    continue
                try:
                    run = run_case(name, image, workdir)
                except SkipCase as exc:
                    result.skipped = str(exc)
                    print(f"NOTICE: {exc}: skipped", flush=True)
                    continue
                except (harness.BenchError, QmpError, OSError, ConnectionError, ValueError) as exc:
                    result.error = str(exc)
                    harness.log(f"{image.key} {name}: FAILED: {exc}")
                    continue
                result.runs.append(run)
                extra = f", source RAM changed in {run.src_changed_pages} pages" if run.src_changed_pages else ""
                harness.log(
                    f"round {round_no}/{args.repeat} {image.key} {name}: {fmt(run.tool_mbps)} MB/s "
                    f"({run.wall_mbps:.1f} wall, {run.wall_s:.2f}s), wire {run.wire_bytes / MB:.1f} MB, "
                    f"IP {run.ip_bytes / MB:.1f} MB, CPU over the migration src {fmt(run.src_cpu_s, '.2f')} "
                    f"dst {fmt(run.dst_cpu_s, '.2f')} s, other {fmt(run.other_cpu_s, '.2f')} s{extra}"
                )
    for image in images:
        harness.remove(image.path)

    order = [n for n in (*QEMU_CASES, *VMMIG_CASES, *FLOOR_CASES) if n in args.cases]
    all_targets: list[tuple[str, str]] = []
    for image in images:
        ordered = [results[image.key, n] for n in order]
        print_table(image, ordered)
        print_qemu_detail(image, ordered)
        all_targets += target_lines(image.key, ordered)
    print("targets (MB/s = image / the tool's total-time, medians; IP bytes, least of the rounds)")
    for verdict, text in all_targets:
        print(f"  {verdict}  {text}")
    print()
    if args.json:
        document = {
            "machine": info,
            "options": {"size": size, "repeat": args.repeat, "quick": args.quick, "cases": args.cases},
            "images": [
                {"image": i.key, "zero-share": i.zero_share, "zlib-ratio": i.zlib_ratio, "bytes": i.size}
                for i in images
            ],
            "results": [r.summary() for r in results.values()],
            "targets": [{"verdict": v, "target": t} for v, t in all_targets],
        }
        harness.write_json(args.json, document)
    return harness.exit_status(list(results.values()))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.run_main(functools.partial(benchmark, args), "vmmig-bench-qemu-", args.tree)


if __name__ == "__main__":
    sys.exit(main())
