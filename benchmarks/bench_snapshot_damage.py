#!/usr/bin/env python3
"""Snapshots under damage: seeded flipped, truncated and inserted bytes, each restored by a real `vmmig restore`.

Issue 19's target: every damaged snapshot is refused or restores byte-identical; none publishes a corrupt image.

Two snapshots of the generated 'mixed' image (examples/make_guest_image.py, seed 1), ``--compress zstd --level 1``:

* ``full``: ``vmmig save IMAGE FILE`` of the image at rest;
* ``live``: ``vmmig save --live --pause-pid PID`` of a copy that examples/guest_workload.py rewrites while it is
  saved (several passes; the guest is left paused, so the copy then holds exactly what the snapshot must restore).

Each undamaged snapshot is restored first (it must restore byte-identical). Then ``--damages`` times per snapshot,
from ``random.Random(seed)``: one damage anywhere in the file, a third each of one flipped bit, the file cut at an
offset, or one random byte inserted; the damaged file is restored with ``vmmig restore FILE DEST`` and the outcome
classified:

* ``refused``: exit 3, 7 or 16 and neither DEST nor DEST.partial left behind;
* ``identical``: exit 0 and DEST equals the expected image byte for byte (a flip in bits nothing reads);
* ``corrupt``: exit 0 and DEST differs -- a corrupt image published (the target: 0);
* ``other``: any other exit status, or a refusal that left a file behind (also a failure).

The exit status is 1 when any outcome is ``corrupt`` or ``other``.

    python benchmarks/bench_snapshot_damage.py [--size 4MiB] [--damages 200] [--seed 19] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness
from harness import BenchError, Child, fmt_size, log

REFUSED_CODES = (3, 7, 16)  # SOURCE (truncated, foreign), INTEGRITY (corrupt), RESUME_REFUSED (a base)
KINDS = ("flip", "truncate", "insert")
OUTCOMES = ("refused", "identical", "corrupt", "other")
RESTORE_TIMEOUT = 60.0
WORKLOAD = harness.REPO / "examples" / "guest_workload.py"


@dataclass
class Campaign:
    name: str
    file_bytes: int
    counts: dict[str, collections.Counter[str]] = field(default_factory=dict)  # kind -> outcome -> count
    exits: dict[str, collections.Counter[int]] = field(default_factory=dict)  # kind -> exit status -> count
    failures: list[str] = field(default_factory=list)  # what went wrong in each corrupt / other outcome

    @property
    def damages(self) -> int:
        return sum(sum(counter.values()) for counter in self.counts.values())

    def total(self, outcome: str) -> int:
        return sum(counter[outcome] for counter in self.counts.values())

    def as_json(self) -> dict[str, object]:
        return {
            "file_bytes": self.file_bytes,
            "counts": {kind: dict(counter) for kind, counter in self.counts.items()},
            "exits": {kind: dict(counter) for kind, counter in self.exits.items()},
            "failures": self.failures,
        }


def damage(data: bytes, rng: random.Random) -> tuple[str, int, bytes]:
    """(kind, offset, the damaged bytes): one bit flipped, the file cut, or one byte inserted, at any offset."""
    kind, at = KINDS[rng.randrange(3)], rng.randrange(len(data))
    buf = bytearray(data)
    if kind == "flip":
        buf[at] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buf[at:]
    else:
        buf[at:at] = bytes([rng.randrange(256)])
    return kind, at, bytes(buf)


def restore(snap: Path, dest: Path, workdir: Path) -> tuple[int, str]:
    """``vmmig restore SNAP DEST`` to its exit: (exit status, last stderr line)."""
    child = Child(harness.vmmig("restore", str(snap), str(dest), "--decompress-threads", "2", "--quiet"),
                  workdir, "restore")  # fmt: skip
    try:
        if not child.wait(RESTORE_TIMEOUT):
            raise BenchError(f"vmmig restore of {snap} did not end in {RESTORE_TIMEOUT:.0f}s")
    finally:
        child.kill()
    assert child.returncode is not None
    return child.returncode, child.stderr_tail(1)


def classify(code: int, dest: Path, expected: bytes) -> str:
    partial = dest.with_name(dest.name + ".partial")
    if code in REFUSED_CODES:
        return "refused" if not dest.exists() and not partial.exists() else "other"
    if code == 0 and dest.exists():
        return "identical" if dest.read_bytes() == expected else "corrupt"
    return "other"


def run_campaign(name: str, snap: Path, expected: bytes, args: argparse.Namespace, workdir: Path) -> Campaign:
    data = snap.read_bytes()
    bad, dest = workdir / f"{name}-damaged.snap", workdir / f"{name}-restored.ram"
    harness.remove(dest)
    code, err = restore(snap, dest, workdir)
    if classify(code, dest, expected) != "identical":
        raise BenchError(f"{name}: the undamaged snapshot does not restore byte-identical (exit {code}: {err})")
    campaign = Campaign(name, len(data), {kind: collections.Counter() for kind in KINDS},
                        {kind: collections.Counter() for kind in KINDS})  # fmt: skip
    rng = random.Random(f"{args.seed}-{name}")
    started = time.perf_counter()
    for number in range(1, args.damages + 1):
        kind, at, damaged = damage(data, rng)
        bad.write_bytes(damaged)
        harness.remove(dest, dest.with_name(dest.name + ".partial"))
        code, err = restore(bad, dest, workdir)
        outcome = classify(code, dest, expected)
        campaign.counts[kind][outcome] += 1
        campaign.exits[kind][code] += 1
        if outcome in ("corrupt", "other"):
            campaign.failures.append(f"damage {number} ({kind} at {at}): exit {code}, {outcome}: {err}")
        if number % 50 == 0:
            log(f"{name}: {number} damages in {time.perf_counter() - started:.0f}s")
    harness.remove(bad, dest, dest.with_name(dest.name + ".partial"))
    return campaign


# ----------------------------------------------------------------------------------------------------------------
# The two snapshots


def save_full(image: Path, workdir: Path) -> Path:
    snap = workdir / "full.snap"
    check_run(harness.vmmig("save", str(image), str(snap), "--compress", "zstd", "--level", "1"), "save (full)")
    return snap


def save_live(image: Path, workdir: Path) -> tuple[Path, bytes]:
    """A live snapshot of a guest rewriting a copy of ``image``, and what it must restore to (the paused copy)."""
    ram, snap, pid_file = workdir / "live.ram", workdir / "live.snap", workdir / "guest.pid"
    ram.write_bytes(image.read_bytes())
    guest = Child([sys.executable, str(WORKLOAD), str(ram), "--rate", "8M", "--pid-file", str(pid_file)], workdir,
                  "guest")  # fmt: skip
    try:
        harness.wait_for_text(pid_file, guest, 15.0, "guest workload")
        time.sleep(0.3)  # writing before the first pass
        report = json.loads(check_run(harness.vmmig(
            "save", str(ram), str(snap), "--live", "--pause-pid", str(guest.pid), "--compress", "zstd", "--level", "1",
            "--downtime-limit", "2s", "--on-no-converge", "switchover", "--json"), "save (live)"))  # fmt: skip
        log(f"live snapshot: {report['passes']} passes, guest paused: {report['paused']}")
        return snap, ram.read_bytes()  # the guest is paused: its RAM is what the snapshot holds
    finally:
        guest.kill()


def check_run(argv: list[str], what: str) -> str:
    done = subprocess.run(argv, cwd=harness.tree(), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise BenchError(f"{what}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


# ----------------------------------------------------------------------------------------------------------------


def print_campaign(campaign: Campaign) -> None:
    print(f"\n{campaign.name} snapshot ({campaign.file_bytes} bytes), {campaign.damages} damages:")
    rows = [[kind, *(str(counter[o]) for o in OUTCOMES)] for kind, counter in campaign.counts.items()]
    rows.append(["all", *(str(campaign.total(o)) for o in OUTCOMES)])
    harness.print_table([("damage", 8), *((o, 9) for o in OUTCOMES)], rows)
    for kind, exits in campaign.exits.items():
        print(f"exit statuses, {kind}: " + ", ".join(f"{code}: {n}" for code, n in sorted(exits.items())))
    for failure in campaign.failures:
        print(f"  FAILURE {failure}")


def main() -> int:
    parser = harness.arg_parser(__doc__, "4MiB", "1 MiB image and 20 damages per snapshot")
    parser.add_argument("--damages", type=int, default=200, help="damages per snapshot (default 200)")
    parser.add_argument("--seed", type=int, default=19, help="seed of the damages (default 19)")
    args = parser.parse_args()
    return harness.run_main(lambda work: benchmark(args, work), "vmmig-bench-damage-", args.tree)


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    if args.quick:
        args.size, args.damages = "1MiB", 20
    size = harness.load_generator().parse_size(args.size)
    image = workdir / "image.ram"
    harness.make_image(harness.load_generator(), image, size)
    full = save_full(image, workdir)
    live, live_expected = save_live(image, workdir)
    campaigns = [run_campaign("full", full, image.read_bytes(), args, workdir),
                 run_campaign("live", live, live_expected, args, workdir)]  # fmt: skip
    print(f"vmmig restore of damaged snapshots: {fmt_size(size)} generated image, zstd level 1, seed {args.seed}")
    for campaign in campaigns:
        print_campaign(campaign)
    bad = sum(c.total("corrupt") + c.total("other") for c in campaigns)
    corrupt = sum(c.total("corrupt") for c in campaigns)
    print(f"\ntarget (issue 19): 0 corrupt images published: {'PASS' if bad == 0 else 'FAIL'} "
          f"({corrupt} corrupt, {bad - corrupt} other outcomes)")  # fmt: skip
    if args.json_path:
        harness.write_json(args.json_path, {"seed": args.seed, "size": size,
                                            "campaigns": {c.name: c.as_json() for c in campaigns}})  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
