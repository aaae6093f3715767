#!/usr/bin/env python3
"""Snapshots: `vmmig save` / `vmmig restore` against `zstd -1 -T2` / `zstd -d -T2` and QEMU's migrate to a file.

On each image, in interleaved rounds, every method saves the image to a file in /dev/shm and restores it again:

* ``vmmig zstd``: ``vmmig save IMAGE FILE --compress zstd --level 1 --compress-threads 2`` and ``vmmig restore FILE
  DEST --decompress-threads 2``; ``vmmig zlib`` the same with ``--compress zlib`` (vmmig's default codec);
* ``zstd``: ``zstd -1 -T2 -q -o FILE IMAGE`` and ``zstd -d -T2 -q -o DEST FILE``;
* ``qemu`` (``--with-qemu``; QEMU 7.2 here): a ``qemu-system-x86_64 -accel tcg -S`` whose RAM is a
  memory-backend-file on a copy of the image saves it with ``migrate "exec:cat > FILE"`` (``max-bandwidth`` raised
  to 1 TiB/s), and a fresh one started with ``-incoming defer`` (RAM on a new /dev/shm file, ``prealloc=on``)
  loads it with ``migrate-incoming "exec:cat FILE"`` -- the same URI as ``-incoming "exec:cat FILE"``, sent over QMP
  so that QEMU's start-up and preallocation are not counted. Both driven over QMP as in bench_qemu.py.

Columns: ``save MB/s`` and ``restore MB/s`` are image MB (10^6 B) over the wall clock (vmmig and zstd: process start
to exit; QEMU: from ``migrate`` / ``migrate-incoming`` to ``completed`` / leaving ``inmigrate``, polled every 5 ms);
``tool MB/s`` over vmmig's own ``seconds`` (QEMU's ``total-time`` for its save); ``file MB`` the file's size; ``CPU
s`` user + system of the process and its children (QEMU: its own threads only). Every restore is checked: DEST
equals the image byte for byte (QEMU: its destination RAM file does).

Targets (issue 19, with ``--compress zstd --level 1``, medians, per image): save MB/s >= zstd -1 -T2's, restore
MB/s >= zstd -d -T2's, file size <= 1.10x zstd -1's. PASS/FAIL lines with the ratios; the exit status is 1 only when
a run failed.

Images: the generated 'mixed' image (examples/make_guest_image.py, seed 1) and a real guest's RAM from
benchmarks/guest_ram.py (``~/.cache/vmmig``, booted and filled once under TCG if missing; ``--guest-size``,
default ``--size``; ``--quick`` uses it only if ``--guest-size`` is given).

    python benchmarks/bench_snapshot.py [--size 1GiB] [--repeat 3] [--quick] [--guest-size SIZE | --no-guest]
                                        [--with-qemu] [--json PATH]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_qemu
import guest_ram
import harness
from harness import MB, BenchError, Child, fmt, fmt_size, log

CASE_TIMEOUT = 300.0
VMMIG_METHODS = {"vmmig zstd": "zstd", "vmmig zlib": "zlib"}
ZSTD = "zstd"
QEMU = "qemu"
FILE_GOAL = 1.10  # vmmig zstd's file at most this times zstd -1's


@dataclass
class Run:
    image_bytes: int
    file_bytes: int
    save_s: float
    restore_s: float
    save_cpu_s: float | None
    restore_cpu_s: float | None
    save_tool_s: float | None = None
    restore_tool_s: float | None = None
    other_cpu_s: float | None = None

    @property
    def save_mbps(self) -> float:
        return self.image_bytes / MB / self.save_s

    @property
    def restore_mbps(self) -> float:
        return self.image_bytes / MB / self.restore_s

    @property
    def save_tool_mbps(self) -> float | None:
        return None if not self.save_tool_s else self.image_bytes / MB / self.save_tool_s

    @property
    def restore_tool_mbps(self) -> float | None:
        return None if not self.restore_tool_s else self.image_bytes / MB / self.restore_tool_s


# ----------------------------------------------------------------------------------------------------------------
# Processes: vmmig and zstd


def timed(argv: list[str], workdir: Path, tag: str) -> tuple[float, Child]:
    """Run ``argv`` to its exit (raising on failure); (wall seconds, the reaped child)."""
    started = time.perf_counter()
    child = Child(argv, workdir, tag)
    try:
        harness.wait_all([child], started + CASE_TIMEOUT, tag)
        harness.check_exits([child], tag)
    finally:
        harness.kill_all([child])
    assert child.ended is not None
    return child.ended - started, child


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while chunk := fa.read(16 << 20):
            if chunk != fb.read(16 << 20):
                return False
    return True


def run_tool(method: str, image: Path, workdir: Path) -> Run:
    """vmmig save + restore, or zstd + zstd -d, of ``image`` through a file in ``workdir``."""
    snap, dest = workdir / "snap.file", workdir / "dest.img"
    harness.remove(snap, dest)
    try:
        before = harness.cpu_clock()
        if method == ZSTD:
            save_s, saver = timed(["zstd", "-1", "-T2", "-q", "-o", str(snap), str(image)], workdir, "zstd")
            restore_s, restorer = timed(["zstd", "-d", "-T2", "-q", "-o", str(dest), str(snap)], workdir, "unzstd")
            save_tool = restore_tool = None
        else:
            codec = VMMIG_METHODS[method]
            save = harness.vmmig("save", str(image), str(snap), "--compress", codec, "--level", "1",
                                 "--compress-threads", "2", "--json", "--quiet")  # fmt: skip
            restore = harness.vmmig("restore", str(snap), str(dest), "--decompress-threads", "2", "--json", "--quiet")
            save_s, saver = timed(save, workdir, "save")
            restore_s, restorer = timed(restore, workdir, "restore")
            save_tool = float(saver.report("vmmig save")["seconds"])
            restore_tool = float(restorer.report("vmmig restore")["seconds"])
        cpu = (saver.cpu_s or 0.0) + (restorer.cpu_s or 0.0)
        others = harness.other_cpu(before, cpu)
        if not same_bytes(dest, image):
            raise BenchError(f"{method}: the restored image differs from the original")
        return Run(image.stat().st_size, snap.stat().st_size, save_s, restore_s, saver.cpu_s, restorer.cpu_s,
                   save_tool, restore_tool, others)  # fmt: skip
    finally:
        harness.remove(snap, dest)


# ----------------------------------------------------------------------------------------------------------------
# QEMU: migrate "exec:cat > FILE", then migrate-incoming "exec:cat FILE"


def wait_status(get: Callable[[], str], done: Callable[[str], bool], what: str, child: Child, deadline: float) -> str:
    while True:
        status = get()
        if done(status):
            return status
        if status in ("failed", "cancelled"):
            raise BenchError(f"{what}: migration {status}: {child.stderr_tail()}")
        if child.done.is_set():
            raise BenchError(f"{what}: QEMU exited {child.returncode}: {child.stderr_tail()}")
        if time.perf_counter() > deadline:
            raise BenchError(f"{what}: not done after {CASE_TIMEOUT:.0f}s (status {status})")
        time.sleep(bench_qemu.POLL)


def run_qemu(image: Path, workdir: Path) -> Run:
    size = image.stat().st_size
    ram, dst_ram, snap = workdir / "qemu-src.ram", workdir / "qemu-dst.ram", workdir / "qemu.file"
    src_sock, dst_sock = workdir / "src.qmp", workdir / "dst.qmp"
    harness.remove(ram, dst_ram, snap, src_sock, dst_sock)
    src = dst = None
    qs = qd = None
    try:
        shutil.copyfile(image, ram)  # a fully allocated copy, like a VM's RAM
        src = Child(bench_qemu.qemu_argv(ram, size, src_sock, incoming=False), workdir, "qemu-src")
        qs = bench_qemu.Qmp(src_sock, src)
        bench_qemu.configure(qs, [], {}, QEMU)  # max-bandwidth only
        before = harness.cpu_clock()
        cpu0 = src.live_cpu_s() or 0.0
        started = time.perf_counter()
        qs.command("migrate", uri=f"exec:cat > {snap}")
        info: dict[str, Any] = {}

        def source_status() -> str:
            nonlocal info
            info = qs.command("query-migrate")
            return str(info.get("status"))

        wait_status(source_status, lambda s: s == "completed", "qemu save", src, started + CASE_TIMEOUT)
        save_s = time.perf_counter() - started
        save_cpu = (src.live_cpu_s() or 0.0) - cpu0
        bench_qemu.quit_qemu(qs, src)
        qs = None
        dst = Child(bench_qemu.qemu_argv(dst_ram, size, dst_sock, incoming=True), workdir, "qemu-dst")
        qd = bench_qemu.Qmp(dst_sock, dst)
        bench_qemu.configure(qd, [], {}, QEMU)
        cpu1 = dst.live_cpu_s() or 0.0
        started = time.perf_counter()
        qd.command("migrate-incoming", uri=f"exec:cat {snap}")
        status = wait_status(lambda: str(qd.command("query-status").get("status")), lambda s: s != "inmigrate",
                             "qemu load", dst, started + CASE_TIMEOUT)  # fmt: skip
        restore_s = time.perf_counter() - started
        restore_cpu = (dst.live_cpu_s() or 0.0) - cpu1
        others = harness.other_cpu(before, save_cpu + restore_cpu)
        if status not in ("paused", "prelaunch", "postmigrate"):
            raise BenchError(f"qemu load: the destination ended in state {status}")
        file_bytes = snap.stat().st_size
        bench_qemu.quit_qemu(qd, dst)
        qd = None
        if bench_qemu.differing_pages(dst_ram, image, size) != 0:
            raise BenchError("qemu: the loaded RAM differs from the image")
        total_ms = info.get("total-time")
        return Run(size, file_bytes, save_s, restore_s, save_cpu, restore_cpu,
                   total_ms / 1000 if total_ms else None, None, others)  # fmt: skip
    finally:
        for qmp in (qs, qd):
            if qmp is not None:
                qmp.close()
        harness.kill_all([src, dst])
        harness.remove(ram, dst_ram, snap, src_sock, dst_sock)


# ----------------------------------------------------------------------------------------------------------------
# Images, rounds, output


def prepare_images(args: argparse.Namespace, workdir: Path, size: int) -> list[tuple[str, Path]]:
    images = [("generated", workdir / "generated.ram")]
    harness.make_image(harness.load_generator(), images[0][1], size, allocate=True)
    guest_size = None if args.no_guest else args.guest_size or (None if args.quick else args.size)
    if guest_size:
        cached = guest_ram.ensure(harness.load_generator().parse_size(guest_size), workdir)
        path = workdir / "guest.ram"
        shutil.copyfile(cached.path, path)
        images.append((f"guest ({cached.describe()})", path))
    return images


def methods(with_qemu: bool) -> list[str]:
    return [*VMMIG_METHODS, ZSTD, *([QEMU] if with_qemu else [])]


def measure(images: list[tuple[str, Path]], args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, list[Run]]]:
    chosen = methods(args.with_qemu)
    results: dict[str, dict[str, list[Run]]] = {name: {m: [] for m in chosen} for name, _ in images}
    for round_ in range(args.repeat):
        for name, path in images:
            for method in chosen if round_ % 2 == 0 else reversed(chosen):  # interleaved; the order flips each round
                run = run_qemu(path, workdir) if method == QEMU else run_tool(method, path, workdir)
                results[name][method].append(run)
                log(f"round {round_ + 1} {name.split()[0]} {method}: save {run.save_mbps:.0f} MB/s, restore "
                    f"{run.restore_mbps:.0f} MB/s, file {run.file_bytes / MB:.1f} MB")  # fmt: skip
    return results


def med(runs: list[Run], attribute: str) -> float | None:
    return harness.median_of(runs, lambda run: getattr(run, attribute))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def print_results(name: str, size: int, runs: dict[str, list[Run]], repeat: int) -> None:
    print(f"\n{name}: {fmt_size(size)}, medians of {repeat} interleaved rounds")
    rows = []
    for method, method_runs in runs.items():
        file_bytes = med(method_runs, "file_bytes")
        rows.append([method, fmt(med(method_runs, "save_mbps")), fmt(med(method_runs, "save_tool_mbps")),
                     fmt(med(method_runs, "save_cpu_s"), ".2f"), fmt(med(method_runs, "restore_mbps")),
                     fmt(med(method_runs, "restore_tool_mbps")), fmt(med(method_runs, "restore_cpu_s"), ".2f"),
                     fmt(None if file_bytes is None else file_bytes / MB), fmt(ratio(size, file_bytes), ".2f"),
                     fmt(med(method_runs, "other_cpu_s"), ".2f")])  # fmt: skip
    harness.print_table(
        [("method", 10), ("save MB/s", 9), ("tool MB/s", 9), ("save CPU s", 10), ("restore MB/s", 12),
         ("tool MB/s", 9), ("restore CPU s", 13), ("file MB", 8), ("ratio", 5), ("other CPU s", 11)], rows)  # fmt: skip
    warning = harness.busy_warning(
        [(m, med(r, "other_cpu_s"), (med(r, "save_s") or 0) + (med(r, "restore_s") or 0)) for m, r in runs.items()]
    )
    if warning:
        print(warning)
    ours, zstd = runs["vmmig zstd"], runs[ZSTD]
    targets = [
        ("save MB/s", ratio(med(ours, "save_mbps"), med(zstd, "save_mbps")), 1.0, ">="),
        ("restore MB/s", ratio(med(ours, "restore_mbps"), med(zstd, "restore_mbps")), 1.0, ">="),
        ("file size", ratio(med(ours, "file_bytes"), med(zstd, "file_bytes")), FILE_GOAL, "<="),
    ]
    print(f"targets ({name.split()[0]}, vmmig zstd level 1 against zstd -1 -T2 / zstd -d -T2):")
    for what, value, goal, sense in targets:
        passed = value is not None and (value >= goal if sense == ">=" else value <= goal)
        print(f"  {'PASS' if passed else 'FAIL'}  {what}: vmmig / zstd = {fmt(value, '.2f')} (goal {sense} {goal:.2f})")


def main() -> int:
    parser = harness.arg_parser(__doc__, "1GiB", "256 MiB generated image; the guest image only with --guest-size")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--guest-size", metavar="SIZE", help="the real guest's RAM size (default --size)")
    parser.add_argument("--no-guest", action="store_true", help="only the generated image")
    parser.add_argument("--with-qemu", action="store_true", help="also QEMU's migrate to exec:cat and back")
    args = parser.parse_args()
    return harness.run_main(lambda work: benchmark(args, work), "vmmig-bench-snapshot-", args.tree)


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    if shutil.which("zstd") is None:
        raise BenchError("zstd is not installed (apt-get install zstd)")
    if args.with_qemu and shutil.which("qemu-system-x86_64") is None:
        raise BenchError("--with-qemu: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    size = harness.load_generator().parse_size("256MiB" if args.quick else args.size)
    images = prepare_images(args, workdir, size)
    info = harness.machine_info()
    if args.with_qemu:
        info["qemu"] = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
        info["qemu"] = info["qemu"].splitlines()[0] if info["qemu"] else "unknown"
    results = measure(images, args, workdir)
    print(f"vmmig save/restore against zstd{' and QEMU' if args.with_qemu else ''} ({info['cpu-model']}, "
          f"{harness.CPUS} usable CPUs, load {' '.join(info['load-average'])}"
          f"{', ' + info['qemu'] if args.with_qemu else ''}; files in /dev/shm)")  # fmt: skip
    for name, path in images:
        print_results(name, path.stat().st_size, results[name], args.repeat)
    if args.json_path:
        harness.write_json(args.json_path, {"machine": info, "results": {
            name: {m: [asdict(run) for run in runs] for m, runs in by_method.items()}
            for name, by_method in results.items()}})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
