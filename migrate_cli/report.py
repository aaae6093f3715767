"""Showing the statistics: a live rich display on stderr for people (display.py), NDJSON and a JSON report for
scripts.

Progress is data first: workers only bump counters in ``Stats``; the display reads a snapshot when rich refreshes
it (4 times a second). The display is on only when stderr is a terminal and --quiet is unset; otherwise the
orchestration prints one plain line per pass and a final line (see ``Reporter``). The display measures its own
CPU time (its refresh thread's) and shows it as a share of the process's.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, TextIO

from .errors import UsageError
from .safefile import open_output
from .stats import Snapshot, Stats
from .units import format_bytes, format_rate

if TYPE_CHECKING:
    from .display import DisplayView


@contextmanager
def live_display(stats: Stats, title: str, info: str, enabled: bool) -> Iterator[DisplayView | None]:
    if not enabled:
        yield None
        return
    from .display import live  # rich and psutil load only for a terminal: ~45 ms of start-up otherwise

    with live(stats, title, info) as view:
        yield view


def display_wanted(quiet: bool, stream: TextIO = sys.stderr) -> bool:
    return not quiet and stream.isatty()


def report(snap: Snapshot, extra: dict[str, Any]) -> dict[str, Any]:
    """The final report: the documented fields (docs/STATS.md) and the extras of the role."""
    return {**snap.fields(), **extra}


def print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def summary_line(verb: str, snap: Snapshot, digest: str) -> str:
    return (
        f"verified {format_bytes(snap.image_bytes)} {verb} in {snap.elapsed:.2f}s: "
        f"image {format_rate(snap.image_rate)}, "
        f"wire {format_rate(snap.wire_rate)} ({format_bytes(snap.wire_bytes)}), ratio {snap.ratio:.2f}, "
        f"{snap.zero_pages:,} zero pages; digest {digest}"
    )


class StatsLog:
    """--stats FILE: NDJSON, one ``progress`` object a second, one ``pass`` object per finished pass, one at the end.

    Writes come from the ticker thread and the orchestration; a lock keeps lines whole. FILE is opened with
    safefile.open_output: created if missing, rewritten from its start if it is a regular file with no other
    hard link, written as it is if it is a FIFO or a device; a symlink at FILE is refused, never followed (a
    name in a shared directory may have been planted).
    """

    def __init__(self, stats: Stats, path: str | None, extra: dict[str, Any]) -> None:
        self.stats = stats
        self.extra = extra
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._out: IO[str] | None = None
        self._owns = False
        self._thread: threading.Thread | None = None
        if path == "-":
            self._out = sys.stdout
        elif path:
            try:
                fd = open_output(path)
            except OSError as exc:
                raise UsageError(f"--stats {path}: {exc.strerror or exc}") from None
            self._out = os.fdopen(fd, "w", buffering=1)  # closed in close()
            self._owns = True

    def start(self) -> None:
        if self._out is not None:
            self._thread = threading.Thread(target=self._tick, name="stats-log", daemon=True)
            self._thread.start()

    def write(self, event: str, fields: dict[str, Any]) -> None:
        if self._out is None:
            return
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields})
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.write("progress", {**self.stats.snapshot().fields(), **self.extra})

    def close(self, final: dict[str, Any] | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if final is not None:
            self.write(final.get("status", "completed"), final)
        if self._owns and self._out is not None:
            self._out.close()
        self._out = None
