#!/usr/bin/env python3
"""Resume saves work: a migration cut at about half way, resumed, against a restart from zero, in one run.

A generated 'mixed' guest image (1 GiB by default; examples/make_guest_image.py) moves over 127.0.0.1 with zlib
level 1:

1. baseline: one clean migration; its wire bytes are what a restart from zero costs;
2. the same migration through a TCP proxy (tests/faultproxy.py) that cuts the link after half the baseline's wire
   bytes; the receiver keeps DEST.partial and waits; the pages DEST.partial then lacks (compared page by page with
   the image) are "missing";
3. `vmmig send --resume`: it must send the missing pages and nothing else.

Reported: bytes before the cut, bytes of the resume, a restart's bytes; image bytes the resume re-sent beyond
what was missing, as a share of the image (goal: at most 5%); and the saving against a restart. Both ends must
exit 0 and DEST must equal the image. Writes JSON with ``--json PATH``.

    python benchmarks/bench_resume.py [--size 1GiB] [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from harness import REPO, BenchError, VmmigPair, arg_parser, load_generator, run_main

sys.path.insert(0, str(REPO))
from tests.faultproxy import FaultProxy

GOAL = 0.05  # image share re-sent beyond what was missing
PAGE = 4096


def send(pair: VmmigPair, image: Path, address: str, *args: str) -> tuple[int | None, dict[str, Any], str]:
    """(exit status, JSON report or {}, stderr) of one ``vmmig send`` at zlib level 1 to ``address``."""
    pair.start_send(str(image), address, "--compress", "zlib", "--level", "1", *args)
    assert pair.send is not None
    if not pair.send.wait(600):
        raise BenchError("vmmig send did not exit within 600s")
    report = pair.send.report("send") if pair.send.stdout().strip() else {}
    return pair.send.returncode, report, pair.send.stderr_tail()


def received(pair: VmmigPair) -> int | None:
    """The receiver's exit status once it has exited (within 120 s; None if it has not)."""
    assert pair.recv is not None
    return pair.recv.returncode if pair.recv.wait(120) else None


def missing_pages(image: Path, partial: Path) -> int:
    """Pages of ``partial`` that differ from ``image`` (a vectorised compare of two read-only mappings)."""
    with open(image, "rb") as a, open(partial, "rb") as b:
        ma = mmap.mmap(a.fileno(), 0, prot=mmap.PROT_READ)
        mb = mmap.mmap(b.fileno(), 0, prot=mmap.PROT_READ)
        try:
            pa = np.frombuffer(ma, dtype=np.uint64).reshape(-1, PAGE // 8)
            pb = np.frombuffer(mb, dtype=np.uint64).reshape(-1, PAGE // 8)
            step = 16384
            count = sum(int((pa[i : i + step] != pb[i : i + step]).any(axis=1).sum()) for i in range(0, len(pa), step))
            del pa, pb
            return count
        finally:
            ma.close()
            mb.close()


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def main() -> int:
    args = arg_parser(__doc__.split("\n\n")[0], "1GiB", "a 128 MiB image").parse_args()
    return run_main(lambda work: benchmark(args, work), "vmmig-bench-resume-", args.tree)


def benchmark(args: argparse.Namespace, work: Path) -> int:
    size_text = "128MiB" if args.quick else args.size
    generator = load_generator()
    size = generator.parse_size(size_text)
    image, dest = work / "vm.ram", work / "dest.img"
    generator.generate(str(image), size, seed=11, profile="mixed")
    state = work / "send.state"

    # 1. a restart from zero costs a full migration
    with VmmigPair(work, "restart") as pair:
        address = pair.start_recv(str(dest))
        code, full, err = send(pair, image, address, "--state-file", str(state))
        if code or received(pair) != 0 or not identical(image, dest):
            raise BenchError(f"baseline migration failed: {err}")
    dest.unlink()

    # 2. cut after half of that
    with VmmigPair(work, "resume") as pair:
        address = pair.start_recv("--resume-window", "120s", str(dest))
        proxy = FaultProxy(address, "cut", at=full["transferred"] // 2)
        try:
            code, _, err = send(pair, image, proxy.address, "--state-file", str(state))
            before_cut = proxy.forwarded
        finally:
            proxy.close()
        if code != 5 or not proxy.fired.is_set():
            raise BenchError(f"the cut did not interrupt the migration (exit {code}): {err}")
        missing = missing_pages(image, Path(f"{dest}.partial"))

        # 3. resume
        code, resumed, err = send(pair, image, address, "--resume", "--state-file", str(state))
        recv_code = received(pair)
        if code or recv_code != 0 or not identical(image, dest):
            assert pair.recv is not None
            raise BenchError(f"resume failed (send {code}, recv {recv_code}): {err} {pair.recv.stderr_tail()}")
    resent_pages = resumed["passes"][0]["pages"]
    beyond = max(0, resent_pages - missing) * PAGE / size
    saving = 1 - resumed["transferred"] / full["transferred"]
    rows = {
        "image-bytes": size,
        "restart-wire-bytes": full["transferred"],
        "wire-bytes-before-cut": before_cut,
        "missing-pages": missing,
        "resume-pages": resent_pages,
        "resume-wire-bytes": resumed["transferred"],
        "resent-beyond-missing-share": beyond,
        "saving-vs-restart": saving,
        "wasted-wire-share": (before_cut + resumed["transferred"] - full["transferred"]) / size,
    }
    print(f"image {size / 2**20:.0f} MiB, zlib-1, cut after {before_cut / 1e6:.1f} MB on the wire")
    print(f"  a restart from zero sends     {full['transferred'] / 1e6:10.1f} MB")
    print(f"  the resume sent               {resumed['transferred'] / 1e6:10.1f} MB  ({saving:.0%} saved)")
    print(f"  pages missing at the receiver {missing:10,}")
    print(f"  pages the resume sent         {resent_pages:10,}")
    verdict = "PASS" if beyond <= GOAL else "FAIL"
    print(f"  re-sent beyond missing: {beyond:.2%} of the image (goal <= {GOAL:.0%}): {verdict}")
    print(f"  wire bytes spent twice (before + resume - restart): {rows['wasted-wire-share']:+.2%} of the image")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
