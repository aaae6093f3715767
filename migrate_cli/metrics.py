"""--metrics FILE: the statistics in Prometheus's text exposition format, for node_exporter's textfile collector.

FILE is rewritten whole once a second and at exit: a new file under an unpredictable name beside it (a hidden
``.NAME.*.tmp``, which the collector skips), renamed over FILE (safefile.write_atomic), so a scrape never reads half
a file and a name planted at FILE is replaced, never written through. Not fsynced: it is rewritten a second later,
and a crash loses nothing that matters. The last write (``vmmig_up 0`` and ``vmmig_exit_code``) stays in place.

The file spans the whole command, retries included: the metrics follow the current session's Stats (``follow``),
and the final write carries the exit code the CLI will exit with, whatever ended the run (an error, a signal).
The format is a few lines of text, written here by hand; the tests parse it back with prometheus_client.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import ExitCode, MigrateError, UsageError
from .safefile import write_atomic
from .stats import Snapshot, Stats

PERIOD = 1.0  # seconds between writes
T = TypeVar("T")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    value: Callable[[Snapshot], float | None]  # None: unknown, no sample written


# docs/STATS.md ("Prometheus metrics") documents each one; a test keeps the two in step.
METRICS = (
    Metric(
        "vmmig_transferred_bytes_total", "counter",
        "Bytes put on (send) or taken off (recv) the wire, frame headers included.", lambda s: s.wire_bytes,
    ),
    Metric(
        "vmmig_image_bytes_total", "counter",
        "Image bytes handled, every pass, zero pages included.", lambda s: s.done_bytes,
    ),
    Metric("vmmig_image_size_bytes", "gauge", "Size of the memory image (0 until known).", lambda s: s.image_bytes),
    Metric(
        "vmmig_remaining_bytes", "gauge",
        "Image bytes left in the current pass (pass 1: of the image).", lambda s: s.remaining_bytes,
    ),
    Metric(
        "vmmig_zero_pages_total", "counter",
        "Zero pages handled (flagged, not sent), all passes.", lambda s: s.zero_pages,
    ),
    Metric("vmmig_pass", "gauge", "The pass in progress (1 = the full first pass).", lambda s: s.pass_number),
    Metric(
        "vmmig_dirty_rate_bytes_per_second", "gauge",
        "Live: image bytes the guest dirtied per second, last measured.", lambda s: s.dirty_rate,
    ),
    Metric(
        "vmmig_expected_downtime_seconds", "gauge",
        "Live: the last downtime estimate (no sample before the first one).", lambda s: s.expected_downtime,
    ),
    Metric(
        "vmmig_throttle_ratio", "gauge",
        "Live: the auto-converge throttle in force, 0 to 1.", lambda s: s.throttle / 100,
    ),
    Metric(
        "vmmig_max_bandwidth_bytes_per_second", "gauge",
        "The bandwidth cap in force, 0 for none (always 0 on recv).", lambda s: s.cap,
    ),
)  # fmt: skip
UP = ("vmmig_up", "gauge", "1 while vmmig runs, 0 once it has exited.")
EXIT_CODE = ("vmmig_exit_code", "gauge", "The exit code vmmig exited with (no sample while it runs).")


def escape(value: str) -> str:
    """A label value as the text format quotes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render(snap: Snapshot, labels: dict[str, str], exit_code: int | None) -> str:
    """The exposition: every metric with its HELP and TYPE lines, each sample carrying ``labels``. ``exit_code``
    None: still running (vmmig_up 1, no vmmig_exit_code sample)."""
    selector = "{" + ",".join(f'{key}="{escape(value)}"' for key, value in labels.items()) + "}"
    rows: list[tuple[str, str, str, float | None]] = [(m.name, m.kind, m.help, m.value(snap)) for m in METRICS]
    rows.append((*UP, 1 if exit_code is None else 0))
    rows.append((*EXIT_CODE, exit_code))
    lines: list[str] = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        if value is not None:
            lines.append(f"{name}{selector} {number(value)}")
    return "\n".join(lines) + "\n"


def exit_code_of(exc: BaseException) -> int:
    """The code the CLI exits with after ``exc`` (cli/params.execute): a MigrateError's own, anything else a bug's."""
    return int(exc.exit_code) if isinstance(exc, MigrateError) else int(ExitCode.INTERNAL)


class MetricsFile:
    """--metrics FILE for one command (``role``: send or recv); inert without a path."""

    def __init__(self, path: str | None, role: str) -> None:
        self.path = path
        self.role = role
        self._lock = threading.Lock()  # one write at a time, and none after the final one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = Stats()  # zeros until a session's Stats is followed
        self._labels: Callable[[], dict[str, str]] = lambda: {"session": "", "codec": ""}
        self._closed = False
        self._warned = False

    def follow(self, stats: Stats, labels: Callable[[], dict[str, str]]) -> None:
        """Report from ``stats`` from now on, labelled with what ``labels`` says at each write (session, codec)."""
        with self._lock:
            self._stats, self._labels = stats, labels

    def around(self, body: Callable[[], T]) -> T:
        """Run ``body`` with FILE written from start to finish: the last write holds the exit code its outcome
        gives. FILE that cannot be written at the start is a usage error (exit 2)."""
        self.start()
        try:
            result = body()
        except BaseException as exc:
            self.close(exit_code_of(exc))
            raise
        self.close(int(ExitCode.OK))
        return result

    def start(self) -> None:
        if self.path is None:
            return
        try:
            self._write(None)
        except OSError as exc:
            raise UsageError(f"--metrics {self.path}: cannot write it: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._tick, name="metrics", daemon=True)
        self._thread.start()

    def close(self, exit_code: int) -> None:
        """The final write: vmmig_up 0 and ``exit_code``; nothing is written after it."""
        if self.path is None:
            return
        self._stop.set()
        try:
            self._write(exit_code, final=True)
        except OSError as exc:
            self._warn(exc)

    def _tick(self) -> None:
        while not self._stop.wait(PERIOD):
            try:
                self._write(None)
            except OSError as exc:
                self._warn(exc)  # a full disk does not fail the migration

    def _write(self, exit_code: int | None, final: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = final
            text = render(self._stats.snapshot(), {"role": self.role, **self._labels()}, exit_code)
            assert self.path is not None
            write_atomic(self.path, text.encode(), mode=0o644, sync=False)  # the collector runs as another user

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            print(f"vmmig {self.role}: --metrics {self.path}: cannot write it: {exc.strerror or exc}", file=sys.stderr)
