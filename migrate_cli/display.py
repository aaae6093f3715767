"""The live display on stderr (rich): a bar per pass, rates, CPU per thread and a convergence forecast.

Imported only when the display is on (progress.live_display): rich and psutil cost ~45 ms of every start-up, and a
migration's clock starts with the sender's process.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
def live(stats: Stats, title: str, info: str) -> Iterator[DisplayView]:
    view = DisplayView(stats, title, info)
    console = Console(file=sys.stderr)
    with Live(view, console=console, refresh_per_second=REFRESH_PER_SECOND, transient=False):
        yield view
