"""What the sender tells: notices, per-pass records and lines, the final report, and `vmmig ctl` requests.

The report's ``max-bandwidth`` is read from the one BandwidthCap (ratelimit.py): after `vmmig ctl set
max-bandwidth` it says the rate in force at the end, as the statistics' ``cap`` does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import cpu_split
from ..control import ControlError, ControlServer
from ..errors import CancelledError
from ..failure import Failure
from ..ratelimit import BandwidthCap
from ..report import StatsLog, display_wanted, report, summary_line
from ..stats import Stats
from ..units import format_bytes, parse_duration, parse_rate
from .adaptive import AutoPolicy
from .lifecycle import Lifecycle
from .options import SendOptions
from .precopy import ConvergencePolicy, LiveResult, PassRecord, Precopy

if TYPE_CHECKING:
    from ..display import DisplayView


def notice(message: str) -> None:
    print(f"vmmig send: {message}", file=sys.stderr, flush=True)


def mode_of(opts: SendOptions) -> str:
    if opts.live:
        return "live"
    pausers = (opts.pause_pid, opts.qmp, opts.pause_cmd, opts.libvirt_domain)
    return "stop-and-copy" if any(x is not None for x in pausers) else "plain"


def announce_stop_and_copy(opts: SendOptions) -> None:
    """A pause option without --live pauses the guest for the whole transfer: say so once, as the run starts, so
    that someone who meant a live migration learns it before the downtime does (--quiet silences it)."""
    if mode_of(opts) == "stop-and-copy" and not opts.quiet:
        notice("stop-and-copy: the guest stays paused for the whole transfer (--live migrates it while it runs)")


class SenderReport:
    """Everything the sender writes for people and programs, from the run's shared objects."""

    def __init__(
        self, opts: SendOptions, stats: Stats, cap: BandwidthCap, codec_name: str, level: int, threads: int, auto: bool
    ) -> None:
        self.opts = opts
        self.stats = stats
        self.cap = cap
        self.identity: dict[str, Any] = {
            "role": "send",
            "codec": "auto" if auto else codec_name,
            "level": level,
            "threads": threads,
            "mode": mode_of(opts),
        }
        self.display = display_wanted(opts.quiet)
        self.view: DisplayView | None = None
        self.stats_log = StatsLog(stats, opts.stats_path, self.identity)
        self.pass_records: list[PassRecord] = []

    def verbose(self, message: str) -> None:
        if self.opts.verbose and not self.display and not self.opts.quiet:
            notice(message)

    def connecting(self) -> None:
        """The migration's first connection: the process CPU so far is start-up (cpu-startup-seconds)."""
        cpu_split.mark_migration_start()

    def set_phase(self, phase: str) -> None:
        if self.view:
            self.view.phase = phase

    def on_pass(self, record: PassRecord) -> None:
        """A pass finished: NDJSON record, and a plain line when there is no live display."""
        self.pass_records.append(record)
        self.stats_log.write("pass", record.as_json())
        if not self.display and not self.opts.quiet:
            notice(
                f"pass {record.number}: {record.pages:,} pages ({format_bytes(record.image_bytes)}) in "
                f"{record.duration:.2f}s, {format_bytes(record.wire_bytes)} on the wire"
                + (f", {record.dirty_pages:,} found dirty" if record.number > 1 else "")
                + (", guest paused" if record.paused else "")
            )

    def final(
        self,
        digest: bytes,
        resumes: int,
        live: LiveResult | None,
        guest_left_paused: bool,
        auto: AutoPolicy | None,
        handoff: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The success report (--json, the NDJSON stream's last record, `vmmig ctl status` no more)."""
        snap = self.stats.snapshot()
        digest_hex = digest.hex()
        if not self.opts.quiet:
            notice(summary_line("sent", snap, digest_hex))
            if guest_left_paused:
                downtime = f" after {snap.downtime * 1000:.0f}ms of downtime" if snap.downtime is not None else ""
                notice(f"guest left paused on the source{downtime}: the destination holds its memory")
        extra: dict[str, Any] = {
            **self.identity, "max-bandwidth": self.cap.as_int(), "digest": digest_hex, "resumes": resumes
        }  # fmt: skip
        if live is not None:
            extra["cpu-throttle-percentage"] = max((p.throttle for p in live.passes), default=0)
            extra["converged"] = live.converged
            extra["switchover"] = live.switchover
        if self.pass_records:
            extra["passes"] = [p.as_json() for p in self.pass_records]
        if self.view is not None:
            extra.update(self.view.cpu_report())
        if auto is not None:
            extra.update(auto.stats.as_json())
        if handoff is not None:
            extra["qemu-handoff"] = handoff
        extra.update(cpu_split.fields())  # last: the verified result is in, the migration's CPU is all spent
        return report(snap, extra)


@dataclass(eq=False)
class SenderControl:
    """`vmmig ctl` requests on --control SOCK: status, set (max-bandwidth, downtime-limit, auto-converge),
    switchover, cancel."""

    reporter: SenderReport
    cap: BandwidthCap
    policy: ConvergencePolicy
    lifecycle: Lifecycle
    failure: Failure

    def __post_init__(self) -> None:
        self.server: ControlServer | None = None
        self.precopy: Callable[[], Precopy | None] = lambda: None  # the live pass loop, once there is one

    def open(self) -> None:
        path = self.reporter.opts.control
        if path:
            handlers = {"status": self._status, "set": self._set, "cancel": self._cancel}
            self.server = ControlServer(path, {**handlers, "switchover": self._switchover})

    def close(self, final: dict[str, Any] | None) -> None:
        """Stop answering requests and close the NDJSON stream with ``final`` (or nothing)."""
        if self.server is not None:
            self.server.close()
        self.reporter.stats_log.close(final)

    def _status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {**self.reporter.stats.snapshot().fields(), **self.reporter.identity}

    def _set(self, request: dict[str, Any]) -> dict[str, Any]:
        name, value = str(request.get("name")), str(request.get("value"))
        setters: dict[str, Callable[[str], dict[str, Any]]] = {
            "max-bandwidth": self._set_max_bandwidth,
            "downtime-limit": self._set_downtime_limit,
            "auto-converge": self._set_auto_converge,
        }
        if name not in setters:
            raise ControlError(f"cannot set {name!r}: settable are {', '.join(setters)}")
        return setters[name](value)

    def _live(self, what: str) -> Precopy:
        precopy = self.precopy()
        if precopy is None or not self.reporter.opts.live:
            raise ControlError(f"{what} applies to a live migration (send --live) in pre-copy")
        if self.lifecycle.end_sent or precopy.result.paused_at:
            raise ControlError(f"too late for {what}: the guest is paused and the last pass is out or going")
        return precopy

    def _set_auto_converge(self, value: str) -> dict[str, Any]:
        if value not in ("on", "off"):
            raise ControlError(f"auto-converge: {value!r} is not on or off")
        self._live("auto-converge").set_auto_converge(value == "on")
        return {"auto-converge": value}

    def _switchover(self, _request: dict[str, Any]) -> str:
        self._live("switchover").request_switchover()
        return "switching over after the pass under way"

    def _set_max_bandwidth(self, value: str) -> dict[str, Any]:
        self.cap.set(parse_rate(value))  # the bucket the network threads charge reads it within 50 ms
        return {"max-bandwidth": self.cap.as_int()}

    def _set_downtime_limit(self, value: str) -> dict[str, Any]:
        self.policy.downtime_limit = parse_duration(value)  # read at the next convergence decision
        return {"downtime-limit": round(self.policy.downtime_limit * 1000, 3)}

    def _cancel(self, _request: dict[str, Any]) -> str:
        if self.lifecycle.end_sent:
            raise ControlError("too late to cancel: the last pages are out and the receiver is verifying them")
        self.failure.set(CancelledError("cancelled by vmmig ctl"))
        return "cancelling"
