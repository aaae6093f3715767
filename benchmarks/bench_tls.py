#!/usr/bin/env python3
"""TLS cost: the same migration with and without mutually authenticated TLS 1.3, in one run.

A generated 1 GiB 'mixed' guest image (examples/make_guest_image.py) moves over 127.0.0.1 with zlib level 1 at
2 threads, over 1 and 2 channels, plain and with TLS (certificates from `vmmig tls init`), in interleaved rounds;
medians of ``--repeat`` rounds (default 3). Each run is checked: both ends exit 0 and report the same digest.

Goal (issue: security): TLS at most 15% slower than plain with zlib level 1 (AES-GCM with AES-NI is cheap next to
deflate). Prints a table and PASS/FAIL; exits 1 only if a migration failed.

    python benchmarks/bench_tls.py [--size 1GiB] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.15


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_guest_image", ROOT / "examples" / "make_guest_image.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vmmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrate_cli", *args]


def tls_args(pki: Path | None, me: str, peer: str) -> list[str]:
    """This end's certificate and key, the CA, and the name the peer's certificate must carry."""
    if pki is None:
        return []
    return [
        "--tls-cert", str(pki / f"{me}.pem"), "--tls-key", str(pki / f"{me}.key"), "--tls-ca", str(pki / "ca.pem"),
        "--tls-peer-name", peer,
    ]  # fmt: skip


def run_once(image: Path, work: Path, channels: int, pki: Path | None) -> float:
    """One migration (TLS when ``pki`` is given); returns image MB/s by wall clock (send start to both exited)."""
    dest, ready = work / "dest.img", work / "ready"
    for path in (dest, ready):
        path.unlink(missing_ok=True)
    recv = subprocess.Popen(
        vmmig("recv", "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--json", "--quiet",
              *tls_args(pki, "receiver", "sender"), str(dest)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    send: subprocess.Popen[str] | None = None
    try:
        while not ready.exists():
            if recv.poll() is not None:
                raise RuntimeError(f"recv exited: {recv.stderr.read() if recv.stderr else ''}")
            time.sleep(0.02)
        address = ready.read_text().strip()
        started = time.perf_counter()
        send = subprocess.Popen(
            vmmig("send", str(image), address, "--compress", "zlib", "--level", "1", "--compress-threads", "2",
                  "--channels", str(channels), "--json", "--quiet", *tls_args(pki, "sender", "receiver")),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        send_out, send_err = send.communicate(timeout=300)
        recv_out, recv_err = recv.communicate(timeout=60)
        wall = time.perf_counter() - started
        if send.returncode or recv.returncode:
            raise RuntimeError(
                f"migration failed: send {send.returncode} {send_err} / recv {recv.returncode} {recv_err}"
            )
        if json.loads(send_out)["digest"] != json.loads(recv_out)["digest"]:
            raise RuntimeError("digests differ")
        return image.stat().st_size / wall / 1e6
    finally:
        for proc in (send, recv):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        dest.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256MiB, one round")
    args = parser.parse_args()
    size_text, repeat = ("256MiB", 1) if args.quick else (args.size, args.repeat)
    generator = load_generator()
    work = Path(tempfile.mkdtemp(prefix="vmmig-bench-tls-", dir="/dev/shm"))
    try:
        image = work / "guest.ram"
        generator.generate(str(image), generator.parse_size(size_text), seed=1, profile="mixed")
        pki = work / "pki"
        subprocess.run(vmmig("tls", "init", str(pki), "--host", "receiver", "--host", "sender"), cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        cases: dict[tuple[int, str], list[float]] = {(c, mode): [] for c in (1, 2) for mode in ("plain", "tls")}
        for round_ in range(repeat):
            for (channels, mode), rates in cases.items():
                rates.append(run_once(image, work, channels, pki if mode == "tls" else None))
                print(f"round {round_ + 1}: zlib-1 x2 c{channels} {mode}: {rates[-1]:.1f} MB/s", file=sys.stderr)
        print(f"\nTLS cost, {size_text} mixed image, zlib level 1, 2 threads, median of {repeat} interleaved rounds")
        print(f"{'channels':>8}  {'plain MB/s':>10}  {'TLS MB/s':>9}  {'TLS/plain':>9}  goal")
        for channels in (1, 2):
            plain = statistics.median(cases[(channels, "plain")])
            secured = statistics.median(cases[(channels, "tls")])
            ratio = secured / plain
            verdict = "PASS" if ratio >= 1 - GOAL else "FAIL"
            print(f"{channels:>8}  {plain:>10.1f}  {secured:>9.1f}  {ratio:>9.2f}  {verdict} (>= {1 - GOAL:.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
