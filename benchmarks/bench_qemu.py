#!/usr/bin/env python3
"""vmmig against QEMU's own migration: the same guest RAM, the same machine, the same run, over 127.0.0.1.

What it measures
----------------
One deterministic 'mixed' guest image (examples/make_guest_image.py, seed 1: 40% zero, 25% text, 20% code, 15%
random pages, in runs) is generated in /dev/shm and moved by:

* QEMU (``qemu-system-x86_64 -accel tcg``, paused with ``-S``, so no guest kernel runs). The source's RAM is a
  ``memory-backend-file`` on a fresh copy of the image (``share=on``), the destination's a fresh /dev/shm file
  (``prealloc=on,share=on``) started with ``-incoming defer``. Both are driven over QMP (a small stdlib client):
  ``max-bandwidth`` is raised to 1 TiB/s on both sides, the same capabilities and parameters are set on both, then
  ``migrate-incoming`` / ``migrate`` to ``tcp:127.0.0.1:PORT``. Cases:

  - ``qemu compress``      -- capability ``compress``, compress-threads 2, decompress-threads 2, compress-level 1
    (QEMU 9.1 removed it: if ``migrate-set-capabilities`` rejects it, the case is skipped with a notice);
  - ``qemu multifd-none``, ``qemu multifd-zlib``, ``qemu multifd-zstd`` -- capability ``multifd``, 2 channels,
    ``multifd-compression`` none / zlib (``multifd-zlib-level`` 1) / zstd (``multifd-zstd-level`` 1);
  - ``qemu plain``          -- a single stream, no capabilities.

* vmmig: ``vmmig recv --listen 127.0.0.1:0 --decompress-threads 2`` into a fresh /dev/shm file and ``vmmig send IMAGE
  ADDR --compress none|zlib|zstd --level 1 --compress-threads 2`` (levels: zlib/zstd 1, as QEMU's).

* design floor: ``floor none`` and ``floor zstd`` are not migrations. ``floor.py`` measures, on the same image in
  the same round, the CPU cost of each step the core issue mandates (zero scan of a fresh mapping, copy out of it,
  xxh3 fingerprints, CRC-32 on both ends, zstd level 1 where asked, loopback TCP on 2 connections, preallocation of
  DEST, pwrite into it, the digest recomputed from DEST) with the same C primitives and no vmmig code between
  them. Its ``MB/s tool`` is the image over (the CPU sum / the usable CPUs), perfect overlap of both ends; its
  ``MB/s wall`` adds the wall time of a Python start-up that imports vmmig's sender. No conforming implementation
  with these primitives can beat it on this machine, so each target line also says whether the target lies within
  the floor's reach.

How to read the table
---------------------
* ``MB/s wall`` -- image bytes (10^6 B = 1 MB) over wall time. QEMU: from sending ``migrate`` until the source's
  ``query-migrate`` says ``completed`` *and* the destination has left the ``inmigrate`` run state (both polled every
  5 ms; the processes are already running, the destination already preallocated). vmmig: from starting the ``send``
  process until both processes have exited (interpreter start-up, connecting, the receiver's allocation and its
  final digest check all count against vmmig).
* ``MB/s tool`` -- the tool's own figure: vmmig's ``image-mbytes-per-second``; for QEMU the image size over QEMU's
  ``total-time``.
* ``wire MB`` -- the tool's own count: QEMU's ``ram.transferred``, vmmig's ``transferred``. Careful: QEMU 7.2
  counts multifd pages *before* compression, so for multifd-zlib/-zstd this is not what went over the wire (the
  output adds a NOTE when a tool's count is more than 5% off the measured IP bytes).
* ``IP MB`` -- measured the same way for both tools: the growth of ``IpExt OutOctets`` in /proc/net/netstat (all IP
  traffic of the network namespace, headers included, so other traffic on the machine inflates it) during the case.
* ``src/dst CPU s`` -- QEMU: utime + stime from /proc/PID/stat between ``migrate`` and the end (the migration's
  own CPU, all threads). vmmig: the whole process (os.wait4 rusage), start-up included.
* ``other CPU s`` -- CPU time used by everything else on the machine during the case; ~0 on a quiet machine.
* ``x QEMU`` -- for vmmig rows: MB/s wall over the counterpart's MB/s wall, and IP MB over its IP MB.

Verification: every QEMU destination's RAM file must equal the source QEMU's RAM file byte for byte after the
migration, and the output says whether the source file still equals the pristine image (QEMU could write to guest
RAM at machine init; the number of changed pages is shown if it did). Every vmmig destination must equal the image
byte for byte (and send and recv must report the same digest).

With ``--repeat N`` the cases run in N interleaved rounds and medians are reported. Targets (PASS/FAIL, MB/s wall):
vmmig zlib >= 4x QEMU compress and >= 2.2x QEMU multifd-zlib, vmmig auto >= 3x QEMU multifd-zlib, vmmig zstd >=
0.9x QEMU multifd-zstd, vmmig none >= 0.5x QEMU multifd-none. The exit status is 0 whatever the targets say; 1
when a migration failed or a copy differs.

    python benchmarks/bench_qemu.py [--size 1GiB] [--repeat 3] [--quick] [--json out.json]

Needs ``qemu-system-x86_64`` (Debian: ``apt-get install qemu-system-x86``). KVM is not needed: TCG is used and the
guest never runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import floor
import harness
import numpy as np
from harness import CPUS, MB, MIB, fmt, fmt_size

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
# The design floor (floor.py): the mandated steps' CPU cost over the image, no vmmig code; not a migration.
FLOOR_CASES: dict[str, str] = {"floor zstd": "zstd", "floor none": "none"}
VMMIG_THREADS = 2
VMMIG_LEVEL = 1
# Order of one round (interleaved: each vmmig case next to its QEMU counterparts).
ROUND: tuple[str, ...] = (
    "qemu compress",
    "vmmig zlib",
    "qemu multifd-zlib",
    "vmmig auto",
    "qemu multifd-zstd",
    "vmmig zstd",
    "floor zstd",
    "qemu multifd-none",
    "vmmig none",
    "floor none",
    "qemu plain",
)
# (vmmig case, QEMU case, minimum ratio of MB/s wall)
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("vmmig zlib", "qemu compress", 4.0),
    ("vmmig zlib", "qemu multifd-zlib", 2.2),
    ("vmmig auto", "qemu multifd-zlib", 3.0),
    ("vmmig zstd", "qemu multifd-zstd", 0.9),
    ("vmmig none", "qemu multifd-none", 0.5),
)
# Counterpart shown in the table's 'x QEMU' columns.
COUNTERPART = {
    "vmmig zlib": "qemu multifd-zlib",
    "vmmig auto": "qemu multifd-zlib",
    "vmmig zstd": "qemu multifd-zstd",
    "vmmig none": "qemu multifd-none",
    "floor zstd": "qemu multifd-zstd",
    "floor none": "qemu multifd-none",
}
# The vmmig targets the floor bounds: a target above the floor's ratio cannot be met by any conforming vmmig.
FLOOR_OF = {"vmmig zstd": "floor zstd", "vmmig none": "floor none"}


class SkipCase(Exception):
    """The installed QEMU does not support a case (e.g. the 'compress' capability, removed in QEMU 9.1)."""


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Run(harness.Measured):
    """One migration."""

    ip_bytes: int
    tool_mbps: float | None
    src_cpu_s: float | None
    dst_cpu_s: float | None
    other_cpu_s: float | None
    src_changed_pages: int | None = None  # QEMU: pages of the source RAM file that differ from the image afterwards
    qemu_total_time_ms: int | None = None
    qemu_downtime_ms: int | None = None
    qemu_dst_status: str | None = None
    qemu_process_cpu_s: tuple[float | None, float | None] | None = None  # whole-process rusage (src, dst)
    report: dict[str, Any] = field(default_factory=dict)  # final query-migrate, or vmmig's send + recv reports


@dataclass
class Result(harness.Aggregate):
    """A case aggregated over its repeats (medians)."""

    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and bool(self.runs)

    @property
    def ip_mb(self) -> float | None:
        return self.median(lambda r: r.ip_bytes / MB)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image-bytes": self.image_bytes,
            "error": self.error,
            "skipped": self.skipped,
            "wall-mbytes-per-second": self.wall_mbps,
            "tool-mbytes-per-second": self.median(lambda r: r.tool_mbps),
            "wire-mbytes": self.wire_mb,
            "ip-mbytes": self.ip_mb,
            "src-cpu-seconds": self.median(lambda r: r.src_cpu_s),
            "dst-cpu-seconds": self.median(lambda r: r.dst_cpu_s),
            "other-cpu-seconds": self.median(lambda r: r.other_cpu_s),
            "runs": [asdict(r) for r in self.runs],
        }


# ----------------------------------------------------------------------------------------------------------------
# Child processes: own session, reaped by a thread with os.wait4 (exit time and rusage)


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
            qemu_process_cpu_s=(src.cpu_s, dst.cpu_s),
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
            pair.start_send(str(image), address, "--compress", codec, *level, "--compress-threads", str(VMMIG_THREADS))
            wall = pair.wait(CASE_TIMEOUT)
            ip_bytes = harness.ip_out_octets() - ip_before
            others = harness.other_cpu(before, pair.cpu_s)
            sent, received = pair.reports()
            if not dest.exists():
                raise harness.BenchError(f"{name}: {dest} was not created")
            if differing_pages(dest, image, size) != 0:
                raise harness.BenchError(f"{name}: the destination differs from the image")
            send, recv = pair.children
            return Run(
                wall_s=wall,
                image_bytes=size,
                wire_bytes=int(sent["transferred"]),
                ip_bytes=ip_bytes,
                tool_mbps=float(sent["image-mbytes-per-second"]),
                src_cpu_s=send.cpu_s,
                dst_cpu_s=recv.cpu_s,
                other_cpu_s=others,
                report={"send": sent, "recv": received},
            )
    finally:
        harness.remove(dest, partial)


def run_floor_case(name: str, image: Path, size: int, workdir: Path) -> Run:
    """The design floor (floor.py) on the same image: wall = its CPU sum over the usable CPUs, plus a start-up."""
    before, ip_before = harness.cpu_clock(), harness.ip_out_octets()
    measured = floor.measure(image, FLOOR_CASES[name], workdir)
    ip_bytes = harness.ip_out_octets() - ip_before
    others = harness.other_cpu(before, 0.0)  # the steps ran in this process, which other_cpu leaves out
    measured.startup_s = floor.startup_wall()

    def side(prefix: str) -> float:
        return (
            sum(v for k, v in measured.steps.items() if k.startswith(prefix))
            + measured.steps.get(floor.TCP_STEP, 0.0) / 2
        )

    return Run(
        wall_s=measured.wall_s + measured.startup_s,
        image_bytes=size,
        wire_bytes=measured.wire_bytes,
        ip_bytes=ip_bytes,
        tool_mbps=measured.mbps,
        src_cpu_s=side("send:"),
        dst_cpu_s=side("recv:"),
        other_cpu_s=others,
        report={"floor-steps": measured.steps, "startup-seconds": measured.startup_s},
    )


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


# ----------------------------------------------------------------------------------------------------------------
# Output


def machine_info(version: str) -> dict[str, Any]:
    return {**harness.machine_info(), "qemu": version}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


COLUMNS: tuple[tuple[str, int], ...] = (
    ("case", 18),
    ("MB/s wall", 9),
    ("MB/s tool", 9),
    ("wire MB", 8),
    ("IP MB", 8),
    ("src CPU s", 9),
    ("dst CPU s", 9),
    ("other CPU s", 11),
    ("x QEMU MB/s", 11),
    ("x QEMU IP MB", 12),
    ("vs", 17),
)


def table_row(result: Result, by_name: dict[str, Result]) -> list[str]:
    if not result.ok:
        return [result.name, "SKIPPED" if result.skipped else "FAILED", *(["-"] * (len(COLUMNS) - 2))]
    base = by_name.get(COUNTERPART.get(result.name, ""))
    usable = base is not None and base.ok
    return [
        result.name,
        fmt(result.wall_mbps),
        fmt(result.median(lambda r: r.tool_mbps)),
        fmt(result.wire_mb),
        fmt(result.ip_mb),
        fmt(result.median(lambda r: r.src_cpu_s), ".2f"),
        fmt(result.median(lambda r: r.dst_cpu_s), ".2f"),
        fmt(result.median(lambda r: r.other_cpu_s), ".2f"),
        fmt(ratio(result.wall_mbps, base.wall_mbps) if usable and base else None, ".2f"),
        fmt(ratio(result.ip_mb, base.ip_mb) if usable and base else None, ".2f"),
        base.name if usable and base else "",
    ]


def print_table(results: Sequence[Result]) -> None:
    by_name = {r.name: r for r in results}
    harness.print_table(COLUMNS, [table_row(r, by_name) for r in results], left=(0, -1))
    for result in results:
        if result.error is not None:
            print(f"  {result.name}: FAILED: {result.error}")
        elif result.skipped is not None:
            print(f"  {result.name}: SKIPPED: {result.skipped}")
    print("  MB = 10^6 bytes. MB/s = image bytes / time. wire MB: QEMU ram.transferred, vmmig transferred.")
    print("  IP MB = IpExt OutOctets growth during the case (all IP traffic, headers included).")
    print("  QEMU CPU s = migrate..end delta from /proc/PID/stat; vmmig CPU s = whole process (start-up included).")
    print("  x QEMU = this row's MB/s wall (IP MB) over the 'vs' case's.")
    for result in results:
        wire, ip = result.wire_mb, result.ip_mb
        if result.ok and wire and ip and abs(wire - ip) > 0.05 * ip:
            print(
                f"  NOTE: {result.name}: the tool's wire MB ({wire:.1f}) differs from the IP bytes measured ({ip:.1f}):"
                " that counter is not the bytes on the wire (QEMU 7.2 counts multifd pages before compression)."
            )
    load = [(r.name, r.median(lambda x: x.other_cpu_s), r.runs[0].wall_s) for r in results if r.ok]
    if warning := harness.busy_warning(load):
        print(f"  {warning}")
    print()


def print_qemu_detail(results: Sequence[Result]) -> None:
    print("QEMU details (medians; total-time and downtime as QEMU reports them)")
    for result in results:
        if not result.name.startswith("qemu") or not result.ok:
            continue
        changed = sorted({r.src_changed_pages for r in result.runs})
        states = sorted({str(r.qemu_dst_status) for r in result.runs})
        procs = [r.qemu_process_cpu_s for r in result.runs if r.qemu_process_cpu_s]
        whole = " / ".join(
            fmt(statistics.median(v for v in vals if v is not None), ".2f") for vals in zip(*procs, strict=True)
        )
        print(
            f"  {result.name:<18} total-time {fmt(result.median(lambda r: r.qemu_total_time_ms), '.0f')} ms, "
            f"downtime {fmt(result.median(lambda r: r.qemu_downtime_ms), '.0f')} ms, "
            f"process CPU src/dst {whole or '-'} s, destination state {'/'.join(states)}, "
            f"source pages changed vs image: {', '.join(str(c) for c in changed)}"
        )
    print()


def target_lines(results: Sequence[Result]) -> list[tuple[str, str]]:
    by_name = {r.name: r for r in results}
    lines = []
    for ours, theirs, minimum in TARGETS:
        a, b = by_name.get(ours), by_name.get(theirs)
        value = ratio(a.wall_mbps, b.wall_mbps) if a is not None and b is not None and a.ok and b.ok else None
        if value is None:
            why = (b.skipped or b.error) if b is not None and not b.ok else (a.error if a else None)
            lines.append(("SKIP", f"{ours} vs {theirs}: not measured ({why})"))
            continue
        assert a is not None and b is not None
        verdict = "PASS" if value >= minimum else "FAIL"
        text = (
            f"{ours} vs {theirs}: {fmt(a.wall_mbps)} / {fmt(b.wall_mbps)} MB/s = {value:.2f}x "
            f">= {minimum:g}x (IP {fmt(a.ip_mb)} / {fmt(b.ip_mb)} MB)"
        )
        bound = by_name.get(FLOOR_OF.get(ours, ""))
        if bound is not None and bound.ok and bound.wall_mbps and b.wall_mbps:
            reachable = "above" if bound.wall_mbps / b.wall_mbps < minimum else "within"
            text += (
                f"; design floor {fmt(bound.wall_mbps)} MB/s = {bound.wall_mbps / b.wall_mbps:.2f}x "
                f"(transfer only {fmt(bound.median(lambda r: r.tool_mbps))}): the target is {reachable} the floor's "
                f"reach; vmmig runs at {a.wall_mbps / bound.wall_mbps:.0%} of the floor"
            )
        lines.append((verdict, text))
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="guest RAM / image size (default 1GiB; whole MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: --size 256MiB --repeat 1")
    parser.add_argument("--json", metavar="PATH", help="also write every run (and QEMU's query-migrate) as JSON")
    harness.add_tree_option(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeat = "256MiB", 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
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
    print(f"  image    {fmt_size(size)} 'mixed' (seed 1) in /dev/shm; {args.repeat} interleaved round(s), medians")
    print(flush=True)

    harness.check_space(size, 3.2, "the image, the QEMU source copy and one destination")
    image = workdir / "image.ram"
    harness.make_image(generator, image, size, allocate=True)  # fully resident, like the QEMU copies
    harness.prefault(workdir, size)
    results = {name: Result(name=name, image_bytes=size) for name in ROUND}
    for round_no in range(1, args.repeat + 1):
        for name in ROUND:
            result = results[name]
            if result.skipped is not None or result.error is not None:
                continue
            try:
                if name.startswith("qemu"):
                    run = run_qemu_case(name, image, size, workdir)
                elif name in FLOOR_CASES:
                    run = run_floor_case(name, image, size, workdir)
                else:
                    run = run_vmmig_case(name, image, size, workdir)
            except SkipCase as exc:
                result.skipped = str(exc)
                print(f"NOTICE: {exc}: skipped", flush=True)
                continue
            except (harness.BenchError, QmpError, OSError, ConnectionError, ValueError) as exc:
                result.error = str(exc)
                harness.log(f"{name}: FAILED: {exc}")
                continue
            result.runs.append(run)
            extra = ""
            if run.src_changed_pages:
                extra = f", source RAM changed in {run.src_changed_pages} pages"
            harness.log(
                f"round {round_no}/{args.repeat} {name}: {run.wall_mbps:.1f} MB/s wall ({run.wall_s:.2f}s), "
                f"wire {run.wire_bytes / MB:.1f} MB, IP {run.ip_bytes / MB:.1f} MB, "
                f"CPU src {fmt(run.src_cpu_s, '.2f')} dst {fmt(run.dst_cpu_s, '.2f')} s, "
                f"other {fmt(run.other_cpu_s, '.2f')} s{extra}"
            )
    harness.remove(image)

    ordered = [results[n] for n in (*QEMU_CASES, *VMMIG_CASES, *FLOOR_CASES)]
    print_table(ordered)
    print_qemu_detail(ordered)
    targets = target_lines(ordered)
    print("targets (MB/s wall, medians)")
    for verdict, text in targets:
        print(f"  {verdict}  {text}")
    print()
    if args.json:
        document = {
            "machine": info,
            "options": {"size": size, "repeat": args.repeat, "quick": args.quick},
            "results": [r.summary() for r in ordered],
            "targets": [{"verdict": v, "target": t} for v, t in targets],
        }
        harness.write_json(args.json, document)
    return harness.exit_status(ordered)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.run_main(functools.partial(benchmark, args), "vmmig-bench-qemu-", args.tree)


if __name__ == "__main__":
    sys.exit(main())
