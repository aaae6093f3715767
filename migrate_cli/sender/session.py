"""`vmmig send`: the sender's orchestration.

Threads: the calling (main) thread is the network thread. It sends HELLO, waits for WELCOME, then runs passes:
each pass feeds batch ranges to the pipeline (send_pipeline.py) and writes the encoded batches to the socket under the
token bucket, then sends PASS_END. A ``control`` thread reads what the receiver sends during the run (keepalives,
an ABORT, the final RESULT). The first error anywhere is latched; the main thread then sends ABORT to the peer,
closes the socket and joins every thread before raising it.

Three modes, chosen by options:
- plain (no --live, no pause option): one pass, then a re-scan; if any page changed meanwhile the run fails
  (the image was not quiescent) and DEST is not published;
- stop-and-copy (a pause option without --live): pause, one pass, then a re-scan: a page that changed while
  paused fails the run (exit 14) and DEST is not published;
- live (--live): iterative pre-copy (precopy.py), then pause and a last pass.
In the last two, the guest is resumed if anything fails before the receiver confirmed; if the link breaks after
END went out and before the verdict arrives, the outcome is unknown and the guest stays paused (exit 11).
"""

from __future__ import annotations

import gc
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ..control import ControlError, ControlServer
from ..cpus import usable_cpus
from ..errors import (
    CancelledError,
    IntegrityError,
    MigrateError,
    NetworkError,
    OutcomeUnknown,
    PauseError,
    ProtocolError,
    QemuError,
    SourceError,
    peer_abort,
)
from ..failure import Failure, Stopped, spawn
from ..guest.pause import CommandPauser, Pauser, PidPauser, QmpPauser, Throttle
from ..guest.qemu import SourceHandoff, check_backend
from ..net.tls import preflight, wrap_client
from ..net.transport import Channel, connect, parse_address
from ..ratelimit import TokenBucket
from ..report import StatsLog, display_wanted, live_display, print_json, report, summary_line
from ..stats import Stats
from ..units import format_bytes, format_rate, parse_duration, parse_rate
from ..wire import codec as codecs
from ..wire.digest import end_commitment, image_digest
from ..wire.protocol import (
    FEATURE_QEMU_HANDOFF,
    FEATURE_RESUME,
    HANDOFF_RUNNING,
    RESULT_VERIFIED,
    Abort,
    End,
    Handoff,
    HandoffDone,
    Hello,
    Keepalive,
    Result,
    ResumeState,
    Role,
    Welcome,
)
from ..wire.resume import ResumeCollector
from .adaptive import AutoPolicy
from .dirty import DirtyTracker, FingerprintTracker, SoftDirtyTracker, soft_dirty_supported
from .options import SendOptions, default_batch_size
from .pipeline import RING, SendPipeline
from .precopy import ConvergencePolicy, LiveResult, PassRecord, Precopy
from .source import SourceImage
from .state_file import SenderState
from .transmit import PassSender

if TYPE_CHECKING:
    from ..display import DisplayView


def notice(message: str) -> None:
    print(f"vmmig send: {message}", file=sys.stderr, flush=True)


class Sender:
    def __init__(self, opts: SendOptions, resume: bool = False, resumes: int = 0) -> None:
        opts.check()
        self.opts = opts
        self.resuming = resume or opts.resume
        self.resumes = resumes  # how many times the receiver continued this migration (this run counts once done)
        self.session_started = False  # the receiver WELCOMEd this session: a link fault leaves it resumable
        self.replaced_state: bytes | None = None  # the state file this (new) session replaced
        # auto = zlib-ng, applied per batch only when it pays (adaptive.py)
        self.codec = codecs.by_name(codecs.DEFAULT_CODEC if opts.codec == "auto" else opts.codec)
        self.auto = AutoPolicy(opts.threads or usable_cpus(), cap=opts.max_bandwidth) if opts.codec == "auto" else None
        self.level = opts.level if opts.level is not None else self.codec.default_level
        self.threads = opts.threads or usable_cpus()
        self.failure = Failure()
        self.result: Result | None = None
        self.result_event = threading.Event()
        self._control: threading.Thread | None = None
        self.pauser: Pauser | None = None
        self.throttle: Throttle | None = None
        self.paused = False
        self.end_sent = False
        self.live: LiveResult | None = None
        self.pass_records: list[PassRecord] = []
        self.batches_sent = 0
        self.channels: list[Channel] = []
        self.handoff: SourceHandoff | None = None
        self.handoff_uri: str | None = None
        self.handoff_done: HandoffDone | None = None
        self.handoff_event = threading.Event()
        self.dest_may_run = False  # QEMU's device state went out: the destination VM may be running
        self.bucket = TokenBucket(opts.max_bandwidth)
        self.policy = ConvergencePolicy(opts.downtime_limit, opts.max_passes, opts.max_time)
        self.stats = Stats(page_size=opts.page_size, cap=opts.max_bandwidth or 0)
        self.display = display_wanted(opts.quiet)
        self.view: DisplayView | None = None
        self.stats_log = StatsLog(self.stats, opts.stats_path, self._identity())

    def run(self) -> dict[str, Any]:
        opts = self.opts
        host, port = parse_address(opts.destination)
        source = SourceImage(opts.source, opts.page_size)
        self.pauser = self._make_pauser()
        if opts.qemu_handoff:
            assert isinstance(self.pauser, QmpPauser)
            try:
                check_backend(self.pauser.qmp, opts.source, source.size, "source")
                self.handoff = SourceHandoff(self.pauser.qmp)
                self.handoff.prepare()
            except BaseException:
                source.close()
                raise
        batch_size = opts.batch_size or default_batch_size(self.threads, RING)
        batch_pages = max(1, min(batch_size // opts.page_size, 65536))
        stats = self.stats
        stats.image_bytes = source.size
        control = self._start_control()
        self.stats_log.start()
        info = (
            f"{opts.source} → {opts.destination}  codec {self.codec.name}:{self.level}  threads {self.threads}  "
            f"cap {format_rate(opts.max_bandwidth) if opts.max_bandwidth else 'none'}"
            + (f"  live, downtime limit {opts.downtime_limit * 1000:.0f}ms" if opts.live else "")
        )
        channels: list[Channel] = []
        try:
            state = self._session_state(source, batch_pages)
            batch_pages = state.batch_pages  # resuming without --batch-size: the interrupted session's
            if self.handoff is None:
                if not self.resuming:  # an interrupted session's record survives a new run that never starts
                    self.replaced_state = SenderState.read_raw(opts.state_path())
                state.save(opts.state_path())  # before HELLO: a kill -9 at any later moment can be resumed
            session = bytes.fromhex(state.session)
            for index in range(opts.channels):
                sock = connect(host, port, opts.connect_timeout)
                if opts.tls is not None:
                    sock = wrap_client(sock, opts.tls, host, opts.handshake_timeout)
                channels.append(Channel(sock, Role.SENDER, opts.io_timeout))
                self.failure.add_waker(channels[-1].wake_reader)  # a cancel must not wait for the peer's next frame
                # HELLO right away: the receiver takes the next channel (and its TLS handshake) only after this one's.
                hello = Hello(
                    page_size=opts.page_size,
                    image_size=source.size,
                    codec=self.codec.wire_id,
                    level=self.level,
                    session_id=session,
                    batch_pages=batch_pages,
                    channels=opts.channels,
                    channel_index=index,
                    features=self._offered_features(),
                )
                stats.add_wire(channels[-1].send_frame(hello))
        except BaseException:
            for channel in channels:
                channel.close()
            self._restore_replaced_state()
            self._close_side_channels(control, None)
            source.close()
            raise
        self.channels = channels
        channel = channels[0]  # the primary channel: END and RESULT travel here
        self.verbose(f"connected to {opts.destination}" + (f" ({len(channels)} channels)" if len(channels) > 1 else ""))
        pipeline = SendPipeline(source, self.codec, self.level, self.threads, batch_pages, self.failure, self.auto)
        try:
            with live_display(stats, "send", info, self.display) as view:
                self.view = view
                welcomes = [self._await_welcome(each, self._offered_features()) for each in channels]
                if self.resuming and welcomes[0].features & FEATURE_RESUME:
                    self._await_resume_state(channel, pipeline)
                    self.resumes += 1
                elif self.resuming:
                    notice("the receiver holds nothing of this session: sending everything")
                    self.resuming = False
                self.session_started = True
                self.verbose("destination allocated: sending pages")
                if view:
                    view.phase = "transfer"
                stats.restart_clock()
                self._control = spawn("control", lambda: self._read_control(channel), self.failure)
                for index, each in enumerate(channels[1:], start=1):
                    spawn(f"control-{index}", partial(self._read_control, each), self.failure)
                pipeline.start()
                digest = self._copy(pipeline, source, self.bucket, stats)
                stats.add_wire(channel.send_frame(End(source.pages, self.batches_sent, end_commitment(digest))))
                self.end_sent = True
                if view:
                    view.phase = "verifying"
                self._await_result(digest)
                if self.handoff is not None:
                    self._hand_over(stats)
                if self.paused and self.live is not None:
                    now = time.monotonic()
                    stats.downtime = now - self.live.paused_at
                    verify_ms = (now - self.live.paused_at) * 1000 - sum(self.live.switchover.values())
                    self.live.switchover["verify"] = round(verify_ms, 3)
                stats.finish()
                if view:
                    view.phase = "verified"
        except BaseException as exc:
            if self.dest_may_run and not isinstance(exc, OutcomeUnknown):
                exc = OutcomeUnknown(f"{exc}; the destination VM may be running, so the source stays stopped")
            self.failure.set(exc, replace=isinstance(exc, OutcomeUnknown))
            if isinstance(self.failure.error, NetworkError) and self._control is not None:
                self._control.join(1.0)  # an ABORT with the peer's reason may be in flight: let it win
            for each in channels:
                each.abort(self.failure.error)
            pipeline.stop(2.0)
            self._settle_guest_after_failure()
            error = self.failure.error or exc
            if self.session_started and error.resumable and self.handoff is None:
                error = ResumableFailure(error, opts.state_path(), self.end_sent)
            elif not self.session_started:
                self._restore_replaced_state()
            elif not error.resumable:
                SenderState.remove(opts.state_path())  # the receiver drops the session too
            stats.finish("failed" if not isinstance(error, CancelledError) else "cancelled")
            self._close_side_channels(control, {"status": stats.status, "error": str(error), **self._identity()})
            raise error from None
        finally:
            for each in channels:
                each.close()
            source.close()
        pipeline.stop()
        SenderState.remove(opts.state_path())
        result = self._report(stats, digest)
        self._close_side_channels(control, result)
        if self.opts.json:
            print_json(result)
        return result

    # -- the copy, by mode -----------------------------------------------------------------------------------------

    def _copy(self, pipeline: SendPipeline, source: SourceImage, bucket: TokenBucket, stats: Stats) -> bytes:
        def send_pass(number: int, pages: np.ndarray | None, paused: bool) -> PassRecord:
            passes = PassSender(self.channels, pipeline, source, bucket, stats, self.failure, self.auto)
            record = passes.send(number, pages, paused, self.throttle.percentage if self.throttle else 0)
            self.batches_sent += passes.batches
            return record

        tracker = self._make_tracker(source, pipeline.fingerprints)
        # A resumed session starts from what the receiver holds (pipeline.fingerprints came from RESUME_STATE):
        # its first pass sends only the pages that are missing there or differ, found by the dirty scan.
        first: Callable[[], np.ndarray | None] = tracker.scan if self.resuming else lambda: None
        if self.opts.live:
            assert self.pauser is not None
            if self.opts.auto_converge:
                assert self.opts.pause_pid is not None
                self.throttle = Throttle(self.opts.pause_pid)
            precopy = Precopy(
                self.policy, tracker, send_pass, self.pauser, source.page_size, stats,
                abort_on_no_converge=self.opts.on_no_converge == "abort", throttle=self.throttle, notice=notice,
                on_pass=self.on_pass, first_pass=first,
            )  # fmt: skip
            self.live = precopy.result
            try:
                precopy.run()
            finally:
                self.paused = precopy.paused
            # The post-pause scan saw the image as it is while paused; the last pass sent exactly the pages that
            # differed, so what was sent must now equal it page for page. The digest comes from that one scan.
            live = tracker.live_fingerprints()
            if not np.array_equal(live, pipeline.fingerprints):
                self._wrote_while_paused(int(np.count_nonzero(live != pipeline.fingerprints)))
            return image_digest(live)
        if self.pauser is not None:  # stop-and-copy: every copy is taken while the guest is paused
            self.paused = True  # before the call: a signal landing inside pause() must still lead to a resume
            self.pauser.pause()
            self.on_pass(send_pass(1, first(), True))
            # Verify the pause held: a pause that did not stop the writer (the wrong pid, a hook that did nothing)
            # would otherwise publish an image that matches no moment of the source.
            changed = tracker.scan()
            if changed.size:
                self._wrote_while_paused(int(changed.size))
            return image_digest(pipeline.fingerprints)
        self.on_pass(send_pass(1, first(), False))
        changed = tracker.scan()  # a plain copy: the image must not have changed while it was sent
        if changed.size:
            raise SourceError(
                f"source {self.opts.source} changed while it was sent ({changed.size} pages differ): "
                "use --live or a pause option (--pause-pid, --qmp, --pause-cmd) for a running guest"
            )
        return image_digest(pipeline.fingerprints)

    def _wrote_while_paused(self, pages: int) -> None:
        hint = " (QEMU: use --qmp, a SIGSTOP does not stop in-kernel devices)" if self.opts.pause_pid else ""
        raise PauseError(f"{pages} pages changed while the guest was paused: the pause did not stop its writes{hint}")

    # -- guest control -------------------------------------------------------------------------------------------

    def _make_pauser(self) -> Pauser | None:
        opts = self.opts
        if opts.pause_pid is not None:
            return PidPauser(opts.pause_pid)
        if opts.qmp is not None:
            return QmpPauser(opts.qmp, timeout=opts.hook_timeout)
        if opts.pause_cmd is not None and opts.unpause_cmd is not None:
            return CommandPauser(opts.pause_cmd, opts.unpause_cmd, opts.hook_timeout)
        return None

    def _make_tracker(self, source: SourceImage, sent: np.ndarray) -> DirtyTracker:
        if self.opts.dirty_tracking == "soft-dirty" and self.resuming:
            notice("a resumed session compares fingerprints with the receiver's: using fingerprint tracking")
        elif self.opts.dirty_tracking == "soft-dirty":
            assert self.opts.pause_pid is not None
            if soft_dirty_supported():
                try:
                    return SoftDirtyTracker(self.opts.pause_pid, self.opts.source, source.array, source.page_size, sent)
                except (LookupError, ValueError, OSError) as exc:
                    notice(f"soft-dirty tracking unavailable ({exc}): using fingerprint tracking")
            else:
                notice("this kernel does not track soft-dirty pages: using fingerprint tracking")
        return FingerprintTracker(
            source.array, source.page_size, sent, self.threads, source.check_size, source.data_extents
        )

    def _settle_guest_after_failure(self) -> None:
        """Resume the guest if it is paused and the destination never confirmed; never when the outcome is unknown."""
        if self.throttle is not None:
            self.throttle.release()
        if not self.paused or self.pauser is None:
            return
        if isinstance(self.failure.error, OutcomeUnknown) or self.dest_may_run:
            notice("the source guest stays stopped: the destination VM may be running")
            return
        try:
            self.pauser.resume()
            self.paused = False
            notice(f"guest resumed on the source ({self.pauser.description})")
        except PauseError as exc:
            notice(f"could not resume the guest: {exc}")

    # -- protocol phases -----------------------------------------------------------------------------------------

    def _offered_features(self) -> int:
        return (FEATURE_QEMU_HANDOFF if self.handoff else 0) | (FEATURE_RESUME if self.resuming else 0)

    def _await_welcome(self, channel: Channel, offered: int) -> Welcome:
        while True:
            try:
                frame, _ = channel.read_frame()
            except NetworkError as exc:
                if self.opts.tls is None and not self.failure.is_set():
                    raise NetworkError(
                        f"{exc} during the handshake: if the receiver requires TLS, give --tls-cert, --tls-key "
                        "and --tls-ca here too"
                    ) from None
                raise
            if isinstance(frame, Welcome):
                if frame.features & ~offered:  # a receiver may accept what we offer, never add to it
                    raise ProtocolError(
                        f"the receiver's WELCOME accepts features {frame.features:#x}, but this sender offered only "
                        f"{offered:#x}"
                    )
                return frame
            if isinstance(frame, Abort):
                raise peer_abort(frame.code, frame.message, frame.resumable)
            if not isinstance(frame, Keepalive):
                raise ProtocolError(f"expected WELCOME, got {type(frame).__name__}")

    def _await_resume_state(self, channel: Channel, pipeline: SendPipeline) -> None:
        """Read the receiver's RESUME_STATE frames: what DEST.partial holds becomes what was sent."""
        collector = ResumeCollector(len(pipeline.fingerprints))
        while True:
            frame, wire = channel.read_frame()
            self.stats.add_wire(wire)
            if isinstance(frame, ResumeState):
                if collector.add(frame):
                    break
            elif isinstance(frame, Abort):
                raise peer_abort(frame.code, frame.message, frame.resumable)
            elif not isinstance(frame, Keepalive):
                raise ProtocolError(f"expected RESUME_STATE, got {type(frame).__name__}")
        pipeline.fingerprints[:] = collector.fingerprints
        self.verbose("resuming: the receiver reported what it holds")

    def _restore_replaced_state(self) -> None:
        """A new session that never started (refused, unreachable) leaves no state file of its own: the one before
        it gets its file back, or there is none (a resume would name a session no receiver ever saw)."""
        if self.resuming:
            return  # the interrupted session's own file: it stays for the next --resume
        if self.replaced_state is not None:
            SenderState.write_raw(self.opts.state_path(), self.replaced_state)
        else:
            SenderState.remove(self.opts.state_path())

    def _session_state(self, source: SourceImage, batch_pages: int) -> SenderState:
        """This run's session: a new one, or (resuming) the interrupted one, refused if anything differs."""
        opts = self.opts
        st = os.stat(opts.source)
        current = SenderState(
            session=secrets.token_bytes(16).hex(), source=opts.source, device=st.st_dev, inode=st.st_ino,
            image_size=source.size, page_size=opts.page_size, codec=opts.codec, level=self.level,
            batch_pages=batch_pages, destination=opts.destination,
        )  # fmt: skip
        if not self.resuming:
            return current
        saved = SenderState.load(opts.state_path(), opts.source, opts.destination)
        if opts.batch_size is None:  # not given: whatever the interrupted session used (an older default, say)
            current = replace(current, batch_pages=saved.batch_pages)
        saved.check_same(current)
        return saved

    def _read_control(self, channel: Channel) -> None:
        """Read the receiver's frames until its RESULT; an ABORT or a lost connection fails the migration.

        Keeps reading after a local network error too: the peer's ABORT explaining it may still be in flight.
        """
        while not (self.failure.is_set() and not isinstance(self.failure.error, NetworkError)):
            try:
                frame, _ = channel.read_frame()
            except NetworkError:
                if self.failure.is_set() or (self.result_event.is_set() and not self.dest_may_run):
                    raise Stopped from None  # latched already, or the migration is over and channels close
                if self.end_sent and channel is not self.channels[0]:
                    # A receiver that verified closes every channel, and this one's EOF can come before channel 0
                    # delivers RESULT: channel 0 has the verdict (and fails on its own if the receiver died).
                    raise Stopped from None
                raise
            if isinstance(frame, Abort):
                raise peer_abort(frame.code, frame.message, frame.resumable)
            if isinstance(frame, Handoff):
                self.handoff_uri = frame.uri
            elif isinstance(frame, HandoffDone):
                self.handoff_done = frame
                self.handoff_event.set()
                return
            elif isinstance(frame, Result):
                self.result = frame
                self.result_event.set()
                if self.handoff is None or channel is not self.channels[0]:
                    return

    def _hand_over(self, stats: Stats) -> None:
        """QEMU mode, RAM verified: send the device state with QEMU's migration and let the receiver start the VM."""
        assert self.handoff is not None
        if self.handoff_uri is None:
            raise ProtocolError("the receiver announced no QEMU handoff address")
        self.handoff.migrate(self.handoff_uri)  # a failure here: the destination has no device state, cannot run
        self.dest_may_run = True  # from here on, never resume the source unless the receiver says its VM failed
        while not self.handoff_event.wait(0.05):
            error = self.failure.error
            if error is not None:
                raise OutcomeUnknown(
                    f"lost the receiver while QEMU handed the VM over ({error}); the source stays stopped: "
                    "check whether the destination VM runs before resuming either"
                )
        done = self.handoff_done
        assert done is not None
        if done.status != HANDOFF_RUNNING:
            self.dest_may_run = False  # the receiver says its VM did not start: resuming the source is safe
            raise QemuError(f"the destination QEMU did not start: {done.message}")
        self.verbose("destination VM running")

    def _await_result(self, digest: bytes) -> None:
        while not self.result_event.wait(0.2):
            error = self.failure.error
            if error is not None and isinstance(error, NetworkError) and self.paused:
                raise OutcomeUnknown(
                    f"connection lost after the last pages were sent and before the receiver's verdict ({error}); "
                    "the guest stays paused: check the destination before resuming either copy"
                )
            self.failure.raise_if_set()
        result = self.result
        assert result is not None
        if result.status != RESULT_VERIFIED or result.digest != digest:
            raise IntegrityError(
                f"digest mismatch: sent image digest {digest.hex()}, receiver computed {result.digest.hex()}"
            )

    # -- reporting -----------------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        opts = self.opts
        return {
            "role": "send",
            "codec": "auto" if self.auto else self.codec.name,
            "level": self.level,
            "threads": self.threads,
            "mode": "live" if opts.live else ("stop-and-copy" if self._has_pause_option() else "plain"),
        }

    def _has_pause_option(self) -> bool:
        return any(x is not None for x in (self.opts.pause_pid, self.opts.qmp, self.opts.pause_cmd))

    def _report(self, stats: Stats, digest: bytes) -> dict[str, Any]:
        opts = self.opts
        snap = stats.snapshot()
        digest_hex = digest.hex()
        if not opts.quiet:
            notice(summary_line("sent", snap, digest_hex))
            if self.paused and self.pauser is not None:
                downtime = f" after {snap.downtime * 1000:.0f}ms of downtime" if snap.downtime is not None else ""
                notice(f"guest left paused on the source{downtime}: the destination holds its memory")
        extra: dict[str, Any] = {
            **self._identity(), "max-bandwidth": opts.max_bandwidth or 0, "digest": digest_hex, "resumes": self.resumes
        }  # fmt: skip
        if self.live is not None:
            passes = self.live.passes
            extra["cpu-throttle-percentage"] = max((p.throttle for p in passes), default=0)
            extra["converged"] = self.live.converged
            extra["switchover"] = self.live.switchover
        if self.pass_records:
            extra["passes"] = [p.as_json() for p in self.pass_records]
        if self.view is not None:
            extra.update(self.view.cpu_report())
        if self.auto is not None:
            extra.update(self.auto.stats.as_json())
        if self.handoff is not None:
            extra["qemu-handoff"] = {"uri": self.handoff_uri, **self.handoff.steps}
        return report(snap, extra)

    # -- statistics and control ----------------------------------------------------------------------------------

    def verbose(self, message: str) -> None:
        if self.opts.verbose and not self.display and not self.opts.quiet:
            notice(message)

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

    def _start_control(self) -> ControlServer | None:
        if not self.opts.control:
            return None
        return ControlServer(
            self.opts.control, {"status": self._ctl_status, "set": self._ctl_set, "cancel": self._ctl_cancel}
        )

    def _close_side_channels(self, control: ControlServer | None, final: dict[str, Any] | None) -> None:
        if control is not None:
            control.close()
        self.stats_log.close(final)

    def _ctl_status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {**self.stats.snapshot().fields(), **self._identity()}

    def _ctl_set(self, request: dict[str, Any]) -> dict[str, Any]:
        name, value = str(request.get("name")), str(request.get("value"))
        if name == "max-bandwidth":
            rate = parse_rate(value)
            self.bucket.set_rate(rate)  # the same bucket the network thread charges: effective within 50 ms
            if self.auto is not None:
                self.auto.cap = rate
            self.stats.cap = rate or 0
            return {"max-bandwidth": rate or 0}
        if name == "downtime-limit":
            self.policy.downtime_limit = parse_duration(value)  # read at the next convergence decision
            return {"downtime-limit": round(self.policy.downtime_limit * 1000, 3)}
        raise ControlError(f"cannot set {name!r}: settable are max-bandwidth and downtime-limit")

    def _ctl_cancel(self, _request: dict[str, Any]) -> str:
        if self.end_sent:
            raise ControlError("too late to cancel: the last pages are out and the receiver is verifying them")
        self.failure.set(CancelledError("cancelled by vmmig ctl"))
        return "cancelling"


class ResumableFailure(MigrateError):
    """A link fault after the session started: the receiver keeps it, and so does our state file."""

    resumable = True

    def __init__(self, cause: MigrateError, state_path: str, end_sent: bool = False) -> None:
        verdict = (
            "the receiver may have verified and published DEST before the link dropped (check it); if it still waits, "
            if end_sent
            else ""
        )
        super().__init__(f"{cause}; {verdict}the session can continue: vmmig send --resume (state in {state_path})")
        self.exit_code = cause.exit_code
        self.cause = cause


def run(opts: SendOptions) -> dict[str, Any]:
    """One migration; with --retries, a link fault is followed by a reconnect that resumes the session."""
    gc.freeze()  # everything imported so far lives as long as the process: out of the collector's sight
    resume, resumes = opts.resume, 0
    preflight(opts.tls, server=False, warn=notice)  # bad TLS files fail before connecting; warned once, not per retry
    for attempt in range(opts.retries + 1):
        sender = Sender(opts, resume=resume, resumes=resumes)
        try:
            return sender.run()
        except MigrateError as exc:
            if not exc.resumable or attempt == opts.retries:
                raise
            # This session's id again once the receiver WELCOMEd it (it continues it if it holds it, or starts it
            # afresh); a session that never started left no state file: a new session again.
            resume = resume or sender.session_started
            resumes = sender.resumes
            notice(f"{getattr(exc, 'cause', exc)}; retry {attempt + 1} of {opts.retries} in {opts.retry_delay:g}s")
            time.sleep(opts.retry_delay)
    raise AssertionError("unreachable")
