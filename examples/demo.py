#!/usr/bin/env python3
"""`make demo`: generate a realistic guest image, migrate it over 127.0.0.1 with live progress, verify the result.

Runs the real `vmmig recv` and `vmmig send` as two processes, exactly as a user would on two hosts, then checks
the copy independently (SHA-256 of both files) on top of vmmig's own end-to-end digest.

    python examples/demo.py [--size 256MiB] [--profile mixed] [--compress zlib] [--max-bandwidth 0] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_guest_image  # noqa: E402  (the project's own generator, beside this file)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def vmmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrate_cli", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="image size (default 256MiB)")
    parser.add_argument("--profile", default="mixed", help="generator profile (default mixed)")
    parser.add_argument("--compress", default="zlib", help="codec: zlib, zstd or none (default zlib)")
    parser.add_argument("--max-bandwidth", default="0", help="cap, e.g. 100M (default none)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="vmmig-demo-", dir=base))
    source, dest, ready = work / "guest.ram", work / "migrated.ram", work / "ready"
    recv: subprocess.Popen[str] | None = None
    try:
        size = make_guest_image.parse_size(args.size)
        print(f"demo: generating a {args.size} '{args.profile}' guest image at {source}", file=sys.stderr)
        counts = make_guest_image.generate(str(source), size, seed=1, profile=args.profile)
        print(f"demo: pages by class {counts}", file=sys.stderr)

        recv = subprocess.Popen(
            vmmig("recv", "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--json", "--quiet", str(dest)),
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if recv.poll() is not None or time.monotonic() > deadline:
                print("demo: vmmig recv did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        address = ready.read_text().strip()
        print(f"demo: vmmig send {source} {address} --compress {args.compress}", file=sys.stderr)
        started = time.monotonic()
        send = subprocess.run(
            vmmig(
                "send",
                str(source),
                address,
                "--compress",
                args.compress,
                "--max-bandwidth",
                args.max_bandwidth,
                "--json",
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        wall = time.monotonic() - started
        recv_out, _ = recv.communicate(timeout=120)
        if send.returncode or recv.returncode:
            print(f"demo: FAILED (send exit {send.returncode}, recv exit {recv.returncode})", file=sys.stderr)
            return 1
        sent, received = json.loads(send.stdout), json.loads(recv_out)
        same = sha256(source) == sha256(dest)
        print(
            f"\ndemo: verified digest {sent['digest']} (sender) == {received['digest']} (receiver)\n"
            f"demo: independent SHA-256 of source and destination {'match' if same else 'DIFFER'}\n"
            f"demo: {size / 2**20:.0f} MiB in {sent['total-time'] / 1000:.2f}s of transfer ({wall:.2f}s wall): "
            f"{sent['image-mbytes-per-second']:.0f} MB/s of image, {sent['mbps'] / 8:.0f} MB/s on the wire, "
            f"compression ratio {sent['compression-ratio']:.2f}, {sent['duplicate']:,} zero pages skipped",
        )
        return 0 if same and sent["digest"] == received["digest"] else 1
    finally:
        if recv is not None and recv.poll() is None:
            recv.kill()
            recv.wait()
        if args.keep:
            print(f"demo: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
