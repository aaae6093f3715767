"""Showing the statistics: a live rich display on stderr for people, one JSON report on stdout for scripts.

Progress is data first: workers only bump counters in ``Stats``; the display reads a snapshot when rich
refreshes it (at most 4 times a second). The display is on only when stderr is a terminal and --quiet is unset.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .stats import Snapshot, Stats
from .units import format_bytes, format_rate


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class _View:
    """A rich renderable that re-reads the statistics on every refresh."""

    def __init__(self, stats: Stats, title: str, info: str) -> None:
        self.stats = stats
        self.title = title
        self.info = info
        self.phase = "connecting"

    def __rich__(self) -> RenderableType:
        snap = self.stats.snapshot()
        if snap.pass_number > 1:
            # Each pass of a live migration is its own bar: a bar never runs backwards.
            total, done = snap.pass_total_bytes, snap.pass_done_bytes
            title = f"{self.title} · pass {snap.pass_number}" + (f" · {format_bytes(total)} dirty" if total else "")
        else:
            total, done, title = snap.image_bytes, snap.done_bytes, self.title
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text(title, style="bold"),
            ProgressBar(total=max(total, 1), completed=min(done, total) if total else 0, width=40),
            Text(f"{100 * done / total:5.1f}%" if total else "      "),
            Text(f"{format_bytes(done)} / {format_bytes(total)}" if total else format_bytes(done)),
            Text(f"ETA {_duration(snap.eta)}" if self.phase == "transfer" else self.phase, style="cyan"),
        )
        lines: list[RenderableType] = [
            bar,
            Text(
                f"image {format_rate(snap.image_rate)}  wire {format_rate(snap.wire_rate)}  "
                f"ratio {snap.ratio:.2f}  pages {snap.normal_pages:,} normal / {snap.zero_pages:,} zero  "
                f"batches {snap.compressed_batches:,} compressed / {snap.raw_batches:,} raw",
                style="dim",
            ),
        ]
        if snap.expected_downtime is not None:
            lines.append(
                Text(
                    f"dirty {format_rate(snap.dirty_rate)}  expected downtime {snap.expected_downtime * 1000:.0f} ms"
                    + (f"  throttle {snap.throttle}%" if snap.throttle else ""),
                    style="yellow",
                )
            )
        lines.append(Text(self.info, style="dim"))
        return Group(*lines)


@contextmanager
def live_display(stats: Stats, title: str, info: str, enabled: bool) -> Iterator[_View | None]:
    if not enabled:
        yield None
        return
    view = _View(stats, title, info)
    console = Console(file=sys.stderr)
    with Live(view, console=console, refresh_per_second=4, transient=False):
        yield view


def display_wanted(quiet: bool, stream: TextIO = sys.stderr) -> bool:
    return not quiet and stream.isatty()


def report(snap: Snapshot, extra: dict[str, Any]) -> dict[str, Any]:
    """The final report, with QEMU's query-migrate names and meanings where they exist."""
    seconds = max(snap.elapsed, 1e-9)
    return {
        "status": "completed",
        "transferred": snap.wire_bytes,
        "duplicate": snap.zero_pages,
        "normal": snap.normal_pages,
        "normal-bytes": snap.normal_bytes,
        "total-time": round(snap.elapsed * 1000),
        "mbps": round(snap.wire_bytes * 8 / 1e6 / seconds, 3),
        "image-bytes": snap.image_bytes,
        "image-mbytes-per-second": round(snap.image_rate / 1e6, 3),
        "compression-ratio": round(snap.ratio, 4),
        "raw-batches": snap.raw_batches,
        "compressed-batches": snap.compressed_batches,
        "page-size": snap.page_size,
        **extra,
    }


def print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def summary_line(verb: str, snap: Snapshot, digest: str) -> str:
    return (
        f"verified {format_bytes(snap.image_bytes)} {verb} in {snap.elapsed:.2f}s: "
        f"image {format_rate(snap.image_rate)}, "
        f"wire {format_rate(snap.wire_rate)} ({format_bytes(snap.wire_bytes)}), ratio {snap.ratio:.2f}, "
        f"{snap.zero_pages:,} zero pages; digest {digest}"
    )
