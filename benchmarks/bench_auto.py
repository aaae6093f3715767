#!/usr/bin/env python3
"""Is `--compress auto` ever worse than the better of `none` and `zlib`? The rule for making it the default.

The issue's rule: `auto` becomes the default codec only if it never loses by more than 5% against the better of
`none` and `zlib` (level 1), on the mixed image and on an all-random image. This runs, in interleaved rounds
(medians of ``--repeat``, default 3), each of none, zlib and auto at 2 threads over 127.0.0.1:

* on a 'mixed' image (40% zero, 25% text, 20% code, 15% random) and a 'random' one, uncapped (loopback: the link
  outruns the compressors, so raw wins), and
* on the mixed image under ``--max-bandwidth`` (default 150M: a link the compressors can outrun, so zlib wins).

Rate = image MB (10^6 B) over the sender's wall time from process start to exit (the receiver exits right after).
Every run must exit 0 on both ends with matching digests. Prints a table, the ratio auto / best per setting, and
PASS/FAIL against 0.95; ``--json PATH`` writes it.

    python benchmarks/bench_auto.py [--size 512MiB] [--repeat 3] [--cap 150M] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from harness import VmmigPair, arg_parser, load_generator, remove, run_main

RULE = 0.95
CODECS = ("none", "zlib", "auto")


def run_once(image: Path, work: Path, codec: str, cap: str | None) -> float:
    """One migration at 2 threads; image MB/s by wall clock (send start to both exited)."""
    dest = work / "dest.img"
    remove(dest)
    try:
        with VmmigPair(work, codec) as pair:
            address = pair.start_recv("--decompress-threads", "2", str(dest))
            level = [] if codec == "none" else ["--level", "1"]
            capped = ["--max-bandwidth", cap] if cap else []
            pair.start_send(str(image), address, "--compress", codec, *level, *capped, "--compress-threads", "2")
            wall = pair.wait(600)
            pair.reports()
            return image.stat().st_size / 1e6 / wall
    finally:
        remove(dest)


def main() -> int:
    parser = arg_parser(__doc__.split("\n\n")[0], "512MiB", "128 MiB, 1 round")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cap", default="150M")
    args = parser.parse_args()
    return run_main(lambda work: benchmark(args, work), "vmmig-bench-auto-", args.tree)


def benchmark(args: argparse.Namespace, work: Path) -> int:
    generator = load_generator()
    size = generator.parse_size("128MiB" if args.quick else args.size)
    repeat = 1 if args.quick else args.repeat
    settings = {"mixed": ("mixed", None), "random": ("random", None), f"mixed, cap {args.cap}": ("mixed", args.cap)}
    rates: dict[tuple[str, str], list[float]] = {}
    images = {}
    for profile in ("mixed", "random"):
        images[profile] = work / f"{profile}.img"
        generator.generate(str(images[profile]), size, seed=3, profile=profile)
    for round_ in range(repeat):
        for setting, (profile, cap) in settings.items():
            for codec in CODECS:
                rate = run_once(images[profile], work, codec, cap)
                rates.setdefault((setting, codec), []).append(rate)
                print(f"round {round_ + 1}: {setting:<20} {codec:<5} {rate:8.1f} MB/s", flush=True)
    print(f"\nimage {size / 2**20:.0f} MiB, 2 threads, medians of {repeat}; MB/s of image by wall clock")
    print(f"{'setting':<22}{'none':>9}{'zlib':>9}{'auto':>9}  auto/best")
    verdicts, rows = [], {}
    for setting in settings:
        med = {c: statistics.median(rates[(setting, c)]) for c in CODECS}
        ratio = med["auto"] / max(med["none"], med["zlib"])
        verdicts.append(ratio >= RULE)
        rows[setting] = {**med, "auto-over-best": ratio}
        print(f"{setting:<22}{med['none']:9.1f}{med['zlib']:9.1f}{med['auto']:9.1f}  {ratio:8.3f}")
    verdict = "PASS" if all(verdicts) else "FAIL"
    print(f"\nauto within {1 - RULE:.0%} of the better of none and zlib everywhere: {verdict}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"size": size, "repeat": repeat, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
