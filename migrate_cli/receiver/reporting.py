"""What the receiver tells people and scripts: the ready line and --ready-file, notices and --verbose lines, the
live display's phase, the per-pass line, NDJSON (--stats), `vmmig ctl status`, the summary and the JSON report."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .. import cpu_split
from ..control import ControlServer, Handler
from ..errors import UsageError
from ..report import StatsLog, display_wanted, report, summary_line
from ..safefile import write_atomic
from ..stats import Stats
from ..units import format_bytes
from .allocate import cpu_seconds as allocation_cpu_seconds
from .lifecycle import Phase
from .options import RecvOptions

if TYPE_CHECKING:
    from ..display import DisplayView

# What the live display calls each phase of an attempt (the others leave it as it is).
DISPLAY_PHASES = {
    Phase.ALLOCATING: "allocating",
    Phase.READING_BACK: "reading DEST.partial",
    Phase.TRANSFERRING: "transfer",
    Phase.VERIFYING: "verifying",
    Phase.DONE: "verified",
}


class Reporter:
    """Every line and record the receiver writes about itself, from the ready line to the JSON report."""

    def __init__(self, opts: RecvOptions, stats: Stats, threads: int) -> None:
        self.opts = opts
        self.stats = stats
        self.threads = threads
        self.display = display_wanted(opts.quiet)
        self.view: DisplayView | None = None  # set while an attempt shows the live display
        self.codec_name = ""
        self.session_id = ""  # hex, once a sender is admitted
        self.stats_log = StatsLog(stats, opts.stats_path, {"role": "recv", "threads": threads})
        self.control: ControlServer | None = None

    def notice(self, message: str) -> None:
        if not self.opts.quiet:
            print(f"vmmig recv: {message}", file=sys.stderr, flush=True)

    def verbose(self, message: str) -> None:
        if self.opts.verbose and not self.display and not self.opts.quiet:
            print(f"vmmig recv: {message}", file=sys.stderr, flush=True)

    def show_phase(self, phase: Phase) -> None:
        """Lifecycle observer: the live display names the phase the attempt is in."""
        if self.view is not None and phase in DISPLAY_PHASES:
            self.view.phase = DISPLAY_PHASES[phase]

    def announce(self, bound: str) -> None:
        """The ready line, and --ready-file for scripts (written whole: readers never see half of it)."""
        print(f"vmmig recv: listening on {bound}", file=sys.stderr, flush=True)
        if self.opts.ready_file:
            # a name planted beside it is never opened (safefile.py)
            try:
                write_atomic(self.opts.ready_file, (bound + "\n").encode(), mode=0o644)
            except OSError as exc:
                raise UsageError(f"--ready-file {self.opts.ready_file}: cannot write it: {exc.strerror}") from None

    def open_control(self, handlers: dict[str, Handler]) -> None:
        """`vmmig ctl` (--control): its socket exists before the ready line says the receiver listens."""
        if self.opts.control:
            self.control = ControlServer(self.opts.control, handlers)

    def close(self, final: dict[str, Any] | None) -> None:
        """Close the side channels: `vmmig ctl` and the NDJSON log (its last record is ``final``)."""
        if self.control is not None:
            self.control.close()
        self.stats_log.close(final)

    def metric_labels(self) -> dict[str, str]:
        """--metrics labels besides the role (metrics.py)."""
        return {"session": self.session_id, "codec": self.codec_name}

    def status(self) -> dict[str, Any]:
        """`vmmig ctl status`."""
        return {**self.stats.snapshot().fields(), "role": "recv", "codec": self.codec_name, "threads": self.threads}

    def sender_admitted(self) -> None:
        """The migration's first admitted sender: the process CPU so far is start-up (cpu-startup-seconds)."""
        cpu_split.mark_migration_start()

    def pass_done(self, number: int, batches: int) -> None:
        self.stats.end_pass(number)
        snap = self.stats.snapshot()
        self.stats_log.write("pass", {"pass": number, "batches": batches, "transferred": snap.wire_bytes})
        if not self.display and not self.opts.quiet:
            print(
                f"vmmig recv: pass {number}: {batches:,} batches applied, {format_bytes(snap.wire_bytes)} received",
                file=sys.stderr,
                flush=True,
            )

    def result(self, digest: bytes, resumes: int, handoff: dict[str, Any] | None) -> dict[str, Any]:
        """The summary line on stderr, and the JSON report of a verified migration."""
        opts = self.opts
        snap = self.stats.snapshot()
        if not opts.quiet:
            print("vmmig recv: " + summary_line("received", snap, digest.hex()), file=sys.stderr)
        return report(
            snap,
            {
                "role": "recv",
                "codec": self.codec_name,
                "threads": self.threads,
                "digest": digest.hex(),
                "destination": None if opts.discard else opts.destination,
                "discard": opts.discard,
                "resumes": resumes,
                **({"qemu-handoff": handoff} if handoff is not None else {}),
                **(self.view.cpu_report() if self.view is not None else {}),
                **cpu_split.fields(),
                "cpu-allocation-seconds": round(allocation_cpu_seconds(), 4),
            },
        )
