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
import statistics
import subprocess
import sys
from pathlib import Path

from harness import VmmigPair, arg_parser, load_generator, remove, run_main, tree, vmmig

GOAL = 0.15


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
    dest = work / "dest.img"
    remove(dest)
    try:
        with VmmigPair(work, f"c{channels} {'plain' if pki is None else 'tls'}") as pair:
            address = pair.start_recv(*tls_args(pki, "receiver", "sender"), str(dest))
            pair.start_send(str(image), address, "--compress", "zlib", "--level", "1", "--compress-threads", "2",
                            "--channels", str(channels), *tls_args(pki, "sender", "receiver"))  # fmt: skip
            wall = pair.wait(300)
            pair.reports()
            return image.stat().st_size / wall / 1e6
    finally:
        remove(dest)


def main() -> int:
    parser = arg_parser(__doc__, "1GiB", "256MiB, one round", json=False)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    return run_main(lambda work: benchmark(args, work), "vmmig-bench-tls-", args.tree)


def benchmark(args: argparse.Namespace, work: Path) -> int:
    size_text, repeat = ("256MiB", 1) if args.quick else (args.size, args.repeat)
    generator = load_generator()
    image = work / "guest.ram"
    generator.generate(str(image), generator.parse_size(size_text), seed=1, profile="mixed")
    pki = work / "pki"
    subprocess.run(vmmig("tls", "init", str(pki), "--host", "receiver", "--host", "sender"), cwd=tree(),
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
