"""Showing the statistics: a live rich display on stderr for people, NDJSON and a JSON report for scripts.

Progress is data first: workers only bump counters in ``Stats``; the display reads a snapshot when rich refreshes
it (4 times a second). The display is on only when stderr is a terminal and --quiet is unset; otherwise the
orchestration prints one plain line per pass and a final line (see ``Reporter``). The display measures its own
CPU time (its refresh thread's) and shows it as a share of the process's.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, TextIO

import psutil
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .stats import Snapshot, Stats
from .units import format_bytes, format_rate

REFRESH_PER_SECOND = 4


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


class CpuSampler:
    """CPU % per named thread since the previous sample (psutil), and the process total."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._last: dict[int, float] = {}
        self._last_time = time.monotonic()

    def thread_cpu(self) -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in self._process.threads()}

    def sample(self) -> list[tuple[str, float]]:
        now, cpu = time.monotonic(), self.thread_cpu()
        interval = max(now - self._last_time, 1e-3)
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        shares = [
            (names.get(tid, "other"), 100 * (used - self._last.get(tid, used)) / interval) for tid, used in cpu.items()
        ]
        self._last, self._last_time = cpu, now
        return sorted((s for s in shares if s[1] >= 1.0), key=lambda s: -s[1])

    def process_cpu(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system


def forecast(snap: Snapshot) -> str | None:
    """A convergence forecast in words, when a live migration's dirty rate outruns the link."""
    if snap.expected_downtime is None or snap.achieved_rate <= 0 or snap.dirty_rate <= snap.achieved_rate:
        return None
    return (
        f"dirty {format_rate(snap.dirty_rate)} > {format_rate(snap.achieved_rate)} achieved: will not converge; "
        "consider --auto-converge or a higher cap"
    )


class DisplayView:
    """A rich renderable that re-reads the statistics on every refresh."""

    def __init__(self, stats: Stats, title: str, info: str) -> None:
        self.stats = stats
        self.title = title
        self.info = info
        self.phase = "connecting"
        self.cpu = CpuSampler()
        self._cpu_lines = ""
        self._cpu_at = 0.0
        self._refresh_tid: int | None = None
        self._own_cpu = 0.0
        self._start_cpu = self.cpu.process_cpu()

    def own_cpu_seconds(self) -> float:
        """CPU time of rich's refresh thread (building and drawing every frame), or of our renders if unknown."""
        if self._refresh_tid is not None:
            return self.cpu.thread_cpu().get(self._refresh_tid, self._own_cpu)
        return self._own_cpu

    def own_cpu_share(self) -> float:
        """The display's CPU time as a share of the process's since the display started."""
        total = self.cpu.process_cpu() - self._start_cpu
        return self.own_cpu_seconds() / total if total > 0 else 0.0

    def cpu_report(self) -> dict[str, float]:
        """For the final report: what the display itself cost."""
        return {
            "display-cpu-seconds": round(self.own_cpu_seconds(), 4),
            "display-cpu-share": round(self.own_cpu_share(), 5),
        }

    def __rich__(self) -> RenderableType:
        started = time.thread_time()
        if threading.current_thread() is not threading.main_thread():
            self._refresh_tid = threading.get_native_id()
        snap = self.stats.snapshot()
        now = time.monotonic()
        if now - self._cpu_at >= 1.0:  # psutil reads /proc: once a second is plenty
            shares = self.cpu.sample()
            self._cpu_lines = "  ".join(f"{name} {pct:.0f}%" for name, pct in shares[:6])
            self._cpu_at = now
        group = self._render(snap)
        self._own_cpu += time.thread_time() - started
        return group

    def _render(self, snap: Snapshot) -> Group:
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
                f"image {format_rate(snap.image_rate)}  wire {format_rate(snap.wire_rate)}  ratio {snap.ratio:.2f}  "
                f"sent {format_bytes(snap.wire_bytes)}  remaining {format_bytes(snap.remaining_bytes)}  "
                f"pages {snap.normal_pages:,} normal / {snap.zero_pages:,} zero",
                style="dim",
            ),
        ]
        if snap.expected_downtime is not None:
            lines.append(
                Text(
                    f"dirty {format_rate(snap.dirty_rate)}  pages moved {format_rate(snap.achieved_rate)}  "
                    f"expected downtime {snap.expected_downtime * 1000:.0f} ms"
                    + (f"  throttle {snap.throttle}%" if snap.throttle else ""),
                    style="yellow",
                )
            )
            words = forecast(snap)
            if words:
                lines.append(Text(words, style="bold red"))
        lines.append(
            Text(
                f"cap {format_rate(snap.cap) if snap.cap else 'none'}  cpu {self._cpu_lines}  "
                f"display {100 * self.own_cpu_share():.1f}%",
                style="dim",
            )
        )
        lines.append(Text(self.info, style="dim"))
        return Group(*lines)


@contextmanager
def live_display(stats: Stats, title: str, info: str, enabled: bool) -> Iterator[DisplayView | None]:
    if not enabled:
        yield None
        return
    view = DisplayView(stats, title, info)
    console = Console(file=sys.stderr)
    with Live(view, console=console, refresh_per_second=REFRESH_PER_SECOND, transient=False):
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

    Writes come from the ticker thread and the orchestration; a lock keeps lines whole.
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
            self._out = open(path, "w", buffering=1)  # noqa: SIM115 (closed in close())
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
