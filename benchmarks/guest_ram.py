#!/usr/bin/env python3
"""A real guest's RAM as a benchmark image: boot the examples/qemu guest, let it fill its memory, pause, copy.

The guest (examples/qemu: Debian cloud kernel + busybox initramfs, ``bash examples/qemu/build_guest.sh``) boots
under TCG with ``-m SIZE`` on a ``memory-backend-file`` in /dev/shm (``share=on``), with a second initramfs
segment appended to its initrd (the kernel unpacks concatenated cpio archives in turn). That segment carries host
files picked by their first bytes -- text (C headers, Python sources, documentation), ELF (shared libraries,
programs) and compressed files (gzip, xz, zstd, bzip2, zip/jar) -- about 35% of SIZE together, and a fill script
run instead of the heartbeat /init (``rdinit=``). The script does what a working VM's memory holds:

* copies the host files from the initramfs into a tmpfs and deletes the originals (page cache; the freed pages keep
  their old bytes, as they do in a VM that has been up for a while);
* writes some random data (6% of SIZE from /dev/urandom) into the tmpfs;
* grows an anonymous heap until about 40 MiB are free: ``dd`` processes that each read 16 MiB of the copied files
  (a different stretch each) into their own buffer and then stay blocked (a pipe to a ``sleep`` that never reads),
  so the heap stays mapped;
* writes file bytes into a tmpfs file until 16 MiB are free and deletes it (a dropped page cache: free memory
  that was used once);
* prints ``FILL DONE`` and its memory figures on the serial console.

Then the benchmark pauses the guest over QMP (``stop``), checks that fewer than 10% of the RAM file's pages are zero,
copies the file to the cache (``~/.cache/vmmig/guest-ram-SIZE.ram``, with a ``.json`` of its figures beside it;
reused on later runs, ``--rebuild`` makes it again), and kills QEMU by its PID. It prints the image's zero share and
its zlib level-1 ratio (image bytes / zlib-1 output of each 1 MiB chunk, zero pages included).

    python benchmarks/guest_ram.py [--size 1GiB] [--rebuild] [--cache DIR]

Under TCG the boot and the fill take about a minute for 1 GiB; every wait is bounded (``FILL_TIMEOUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import harness
import numpy as np
import zlib_ng.zlib_ng as zlib_ng
from harness import MIB, fmt_size

run_guest = harness.load_module(harness.REPO / "examples" / "qemu" / "run_guest.py", "run_guest")

PAGE = 4096
CHUNK = MIB  # zlib ratio: one stream per MiB, about vmmig's batch
MAX_ZERO_SHARE = 0.10
FILL_TIMEOUT = 900.0  # seconds from QEMU's start to FILL DONE (TCG: about 60 s for 1 GiB on 2 shared cores)
QMP_TIMEOUT = 30.0
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vmmig"
HOST_ROOTS = (Path("/usr"),)
MAX_FILE = 16 * MIB  # larger host files are skipped: many medium files look more like a VM's page cache
# Share of the guest's RAM taken by each kind of host file in the appended initramfs.
BUDGETS = {"text": 0.14, "elf": 0.14, "compressed": 0.07}
RANDOM_SHARE = 0.06
MAGICS = {
    "elf": (b"\x7fELF",),
    "compressed": (b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"BZh", b"PK\x03\x04"),
}

FILL_SCRIPT = r"""#!/bin/busybox sh
# vmmig benchmark guest: fill RAM the way a working VM does, then report and idle. PID 1: must never exit.
/bin/busybox mkdir -p /proc /sys /dev /tmpfs /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mount -t tmpfs -o size=95% tmpfs /tmpfs
out=/dev/ttyS0
[ -c "$out" ] || out=/dev/console
exec >"$out" 2>&1 </dev/null
kib() { awk -v k="$1" '$1 == k":" {print $2}' /proc/meminfo; }
echo "FILL START total $(kib MemTotal) KiB free $(kib MemFree) KiB"
cp -a /host /tmpfs/host && rm -rf /host
echo "FILL FILES free $(kib MemFree) KiB"
dd if=/dev/urandom of=/tmpfs/random bs=1M count=@RANDOM_MB@ 2>/dev/null
echo "FILL RANDOM free $(kib MemFree) KiB"
heaps=0
while [ "$(kib MemFree)" -gt 40960 ] && [ "$heaps" -lt 128 ]; do
    heaps=$((heaps + 1))
    # 16 MiB of file bytes (a different stretch each time) read into dd's own buffer; dd then blocks on the pipe
    # to a sleep that never reads, keeping its heap mapped.
    cat /tmpfs/host/*/* | dd bs=16M skip=$((heaps % 20)) count=1 iflag=fullblock 2>/dev/null | sleep 100000000 &
    sleep 1
done
echo "FILL HEAP $heaps x 16 MiB free $(kib MemFree) KiB"
# What is left free once held file data (a page cache that was dropped): freed pages keep their bytes.
stale=$(( $(kib MemFree) / 1024 - 16 ))
if [ "$stale" -gt 0 ]; then
    cat /tmpfs/host/*/* | dd of=/tmpfs/stale bs=1M count="$stale" iflag=fullblock 2>/dev/null
    rm -f /tmpfs/stale
fi
echo "FILL STALE $stale MiB free $(kib MemFree) KiB"
sync
echo "FILL DONE free $(kib MemFree) KiB"
while :; do sleep 1000; done
"""


@dataclass
class GuestImage:
    """A cached real-guest RAM image and its figures."""

    path: Path
    size: int
    zero_share: float
    zlib_ratio: float
    fill_seconds: float | None = None
    host_files: dict[str, int] | None = None  # bytes of each kind put into the guest

    def describe(self) -> str:
        return f"{self.zero_share:.1%} zero pages, zlib-1 ratio {self.zlib_ratio:.2f}"


# ----------------------------------------------------------------------------------------------------------------
# Figures of an image: zero share and zlib level-1 ratio


def zero_share(path: Path) -> float:
    """Share of the PAGE-sized pages of ``path`` that are all zero."""
    zero = total = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(64 * MIB):
            pages = np.frombuffer(chunk[: len(chunk) // PAGE * PAGE], dtype=np.uint64).reshape(-1, PAGE // 8)
            zero += int(np.count_nonzero(~pages.any(axis=1)))
            total += len(pages)
    return zero / total if total else 0.0


def zlib_ratio(path: Path) -> float:
    """Image bytes over the zlib level-1 output of each CHUNK (zero pages included)."""
    raw = packed = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            raw += len(chunk)
            packed += len(zlib_ng.compress(chunk, 1))
    return raw / packed if packed else 0.0


def figures(path: Path) -> tuple[float, float]:
    return zero_share(path), zlib_ratio(path)


# ----------------------------------------------------------------------------------------------------------------
# The appended initramfs: host files and the fill script, in cpio newc


def kind_of(path: Path) -> str | None:
    """'elf', 'compressed', 'text' or None, from the file's first 4 KiB."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(PAGE)
    except OSError:
        return None
    for kind, magics in MAGICS.items():
        if head.startswith(magics):
            return kind
    if not head or b"\0" in head:
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "text"


def host_files(size: int) -> dict[str, list[Path]]:
    """Regular host files of each kind (sorted walk of HOST_ROOTS) up to BUDGETS[kind] * size bytes."""
    left = {kind: int(share * size) for kind, share in BUDGETS.items()}
    picked: dict[str, list[Path]] = {kind: [] for kind in BUDGETS}
    for root in HOST_ROOTS:
        for directory, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                path = Path(directory, name)
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if not path.is_file() or path.is_symlink() or not 0 < st.st_size <= MAX_FILE:
                    continue
                kind = kind_of(path)
                if kind is None or left[kind] < st.st_size:
                    continue
                picked[kind].append(path)
                left[kind] -= st.st_size
            if all(v < 64 * 1024 for v in left.values()):
                return picked
    return picked


def cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    """One cpio 'newc' member: header, NUL-terminated name and data, each padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    head = header + encoded
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def write_cpio(out: Path, size: int) -> dict[str, int]:
    """The appended initramfs: /vmmig-fill and /host/KIND/NNNNN-NAME; returns the bytes of each kind."""
    picked = host_files(size)
    totals = {kind: 0 for kind in picked}
    script = FILL_SCRIPT.replace("@RANDOM_MB@", str(max(1, int(RANDOM_SHARE * size) // MIB)))
    ino = 1
    with open(out, "wb") as fh:
        fh.write(cpio_entry("vmmig-fill", 0o100755, script.encode(), ino))
        fh.write(cpio_entry("host", 0o040755, ino=ino + 1))
        ino += 2
        for kind, paths in picked.items():
            fh.write(cpio_entry(f"host/{kind}", 0o040755, ino=ino))
            ino += 1
            for number, path in enumerate(paths):
                data = path.read_bytes()
                fh.write(cpio_entry(f"host/{kind}/{number:05d}-{path.name}", 0o100644, data, ino))
                ino += 1
                totals[kind] += len(data)
        fh.write(cpio_entry("TRAILER!!!", 0))
    return totals


def combined_initrd(out: Path, base: Path, extra: Path) -> None:
    """base initrd + zero padding to 4 bytes + the extra cpio: the kernel unpacks both segments in turn."""
    with open(out, "wb") as fh:
        data = base.read_bytes()
        fh.write(data + b"\0" * (-len(data) % 4))
        with open(extra, "rb") as src:
            shutil.copyfileobj(src, fh, 16 * MIB)


# ----------------------------------------------------------------------------------------------------------------
# Boot, fill, pause, copy


def boot_and_fill(size: int, workdir: Path, dest: Path) -> tuple[float, dict[str, int]]:
    """Fill a guest of ``size`` bytes, pause it and copy its RAM file to ``dest``; (fill seconds, host bytes)."""
    kernel, initrd = run_guest.kernel_paths()
    extra, combined, ram = workdir / "host.cpio", workdir / "initrd-fill", workdir / "guest.ram"
    harness.remove(extra, combined, ram)
    totals = write_cpio(extra, size)
    combined_initrd(combined, initrd, extra)
    harness.remove(extra)
    harness.log(
        f"guest RAM: host files {', '.join(f'{k} {v / MIB:.0f} MiB' for k, v in totals.items())}; booting "
        f"{fmt_size(size)} guest (TCG)"
    )
    guest = None
    started = time.perf_counter()
    try:
        guest = run_guest.start_guest(
            workdir,
            ram,
            "source",
            name="fill",
            new_session=True,
            mem_mb=size // MIB,
            kernel=kernel,
            initrd=combined,
            extra_append="rdinit=/vmmig-fill",
        )
        try:
            done = run_guest.wait_for_line(guest.serial_log, r"^FILL DONE", FILL_TIMEOUT, proc=guest)
        except (TimeoutError, RuntimeError) as exc:
            raise harness.BenchError(f"guest RAM: the guest did not fill its memory: {exc}") from None
        fill_s = time.perf_counter() - started
        with run_guest.Qmp(guest.qmp_path, timeout=QMP_TIMEOUT) as qmp:
            qmp.execute("stop")
            status = qmp.execute("query-status")
        if status.get("running"):
            raise harness.BenchError(f"guest RAM: the guest still runs after 'stop': {status}")
        fills = [line for line in run_guest.read_lines(guest.serial_log) if line.startswith("FILL ")]
        harness.log(f"guest RAM: {done.string.strip()} after {fill_s:.0f}s; paused; {' / '.join(fills[:-1])}")
        share = zero_share(ram)
        if share >= MAX_ZERO_SHARE:
            raise harness.BenchError(f"guest RAM: {share:.1%} of the pages are zero (must be under 10%)")
        partial = dest.with_name(dest.name + ".partial")
        shutil.copyfile(ram, partial)
        partial.replace(dest)
        return fill_s, totals
    finally:
        if guest is not None:
            guest.kill()  # SIGKILL by PID, then reaped
        harness.remove(combined, ram, workdir / "fill.qmp.sock")


def cache_paths(cache: Path, size: int) -> tuple[Path, Path]:
    stem = f"guest-ram-{fmt_size(size).replace(' ', '')}"
    return cache / f"{stem}.ram", cache / f"{stem}.json"


def ensure(size: int, workdir: Path, cache: Path = DEFAULT_CACHE, rebuild: bool = False) -> GuestImage:
    """The cached real-guest image of ``size`` bytes (made first if missing or ``rebuild``)."""
    if size <= 0 or size % MIB or size < 256 * MIB:
        raise harness.BenchError("the guest's RAM must be a whole number of MiB, at least 256 MiB")
    path, meta = cache_paths(cache, size)
    if not rebuild and path.is_file() and path.stat().st_size == size and meta.is_file():
        known = json.loads(meta.read_text())
        image = GuestImage(**{**known, "path": path})
        harness.log(f"guest RAM: reusing {path} ({image.describe()})")
        return image
    cache.mkdir(parents=True, exist_ok=True)
    fill_s, totals = boot_and_fill(size, workdir, path)
    share, ratio = figures(path)
    image = GuestImage(path, size, share, ratio, round(fill_s, 1), totals)
    meta.write_text(json.dumps({**asdict(image), "path": str(path)}, indent=1) + "\n")
    harness.log(f"guest RAM: {path} ({image.describe()})")
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="guest RAM (default 1GiB; whole MiB, at least 256MiB)")
    parser.add_argument("--rebuild", action="store_true", help="boot and fill again even if the cache has an image")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache directory (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    size = harness.load_generator().parse_size(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="vmmig-guest-ram-", dir=harness.SHM))
    try:
        image = ensure(size, workdir, args.cache, args.rebuild)
    except harness.BenchError as exc:
        print(f"guest_ram: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{image.path}: {fmt_size(image.size)}, {image.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
