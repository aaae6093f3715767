"""`vmmig send`: one session's lifecycle, and the retry loop around sessions.

Threads: the calling (main) thread is the network thread. It sends HELLO, waits for WELCOME (handshake.py), then
runs passes (copy_modes.py): each pass feeds batch ranges to the pipeline (pipeline.py) and writes the encoded
batches to the socket under the token bucket (transmit.py), then sends PASS_END. A ``control`` thread per channel
reads what the receiver sends during the run (verdict.py: keepalives, an ABORT, the final RESULT). The first error
anywhere is latched; the main thread then sends ABORT to the peer, closes the socket and joins every thread before
raising it, with the meaning the failure rules (failure_rules.py) give it in the phase it struck (lifecycle.py).

Who owns what: the phase is the Lifecycle's; whether the guest is paused is the GuestHold's; the bandwidth cap is
one BandwidthCap (the bucket, the auto policy, the statistics and the report read it); what the receiver holds is
one ReceiverCopy (the workers record into it, the trackers compare against it, the digest is taken from it).
"""

from __future__ import annotations

import gc
import threading
import time
from functools import partial
from typing import Any

from ..cpus import usable_cpus
from ..errors import CancelledError, MigrateError, NetworkError, OutcomeUnknown, Stalled, is_stall
from ..failure import Failure, spawn
from ..guest.libvirt import LibvirtDomain, LibvirtPauser, LibvirtSourceHandoff
from ..guest.pause import QmpPauser, check_pause_pid
from ..guest.qemu import SourceHandoff, check_backend
from ..metrics import MetricsFile
from ..net.tls import preflight
from ..net.transport import Channel
from ..progress_watch import ProgressWatch
from ..ratelimit import BandwidthCap, TokenBucket
from ..report import live_display, print_json
from ..snapshot.send import SnapshotSource, StoredCopy
from ..stats import Stats
from ..units import format_rate
from ..wire import codec as codecs
from ..wire.digest import end_commitment
from ..wire.frames import FEATURE_PASS_LANDED, FEATURE_RESUME, End, Hello
from .adaptive import AutoPolicy
from .copy_modes import Copy
from .failure_rules import ResumableFailure, as_outcome, conclude, settle_guest
from .guest_hold import GuestHold, make_pauser
from .handshake import Handshake, SessionRecord
from .lifecycle import Lifecycle, Phase
from .options import SendOptions, default_batch_size
from .pipeline import RING, SendPipeline
from .precopy import ConvergencePolicy
from .receiver_copy import ReceiverCopy
from .reporting import SenderControl, SenderReport, announce_stop_and_copy, notice
from .source import SourceImage
from .sources import open_libvirt, open_source
from .verdict import Verdict

__all__ = ["ResumableFailure", "Sender", "notice", "run"]


class Sender:
    def __init__(self, opts: SendOptions, resume: bool = False, resumes: int = 0) -> None:
        opts.check()
        self.opts = opts
        self.lifecycle = Lifecycle()
        self.record = SessionRecord(opts, resuming=resume or opts.resume)
        self.resumes = resumes  # how many times the receiver continued this migration (this run counts once done)
        # auto = zlib-ng, applied per batch only when it pays (adaptive.py)
        self.codec = codecs.by_name(codecs.DEFAULT_CODEC if opts.codec == "auto" else opts.codec)
        self.threads = opts.threads or usable_cpus()
        self.level = opts.level if opts.level is not None else self.codec.default_level
        self.cap = BandwidthCap(opts.max_bandwidth)  # the one rate: `vmmig ctl set max-bandwidth` changes it
        self.auto = AutoPolicy(self.threads, cap=self.cap) if opts.codec == "auto" else None
        self.failure = Failure()
        self.bucket = TokenBucket(self.cap)
        self.policy = ConvergencePolicy(opts.downtime_limit, opts.max_passes, opts.max_time)
        self.stats = Stats(page_size=opts.page_size, bandwidth=self.cap)
        self.reporter = SenderReport(
            opts, self.stats, self.cap, self.codec.name, self.level, self.threads, self.auto is not None
        )
        self.control = SenderControl(self.reporter, self.cap, self.policy, self.lifecycle, self.failure)
        self.guest = GuestHold(None, notice)
        self.handoff: SourceHandoff | None = None
        self.libvirt: LibvirtDomain | None = None  # a libvirt:DOMAIN source's domain (guest/libvirt.py)
        self.verdict = Verdict(self.failure, self.lifecycle, self.guest, None, self.reporter.verbose)
        self._control_thread: threading.Thread | None = None  # channel 0's reader: it may bring the peer's reason
        self.session_id = ""  # hex, once the session is recorded (new or resumed)
        self.watch = ProgressWatch(opts.progress_timeout, self.stats, "sent", self._stalled)  # WELCOME to END

    @property
    def resuming(self) -> bool:
        return self.record.resuming

    def metric_labels(self) -> dict[str, str]:
        """--metrics labels besides the role (metrics.py)."""
        return {"session": self.session_id, "codec": str(self.reporter.identity["codec"])}

    def run(self) -> dict[str, Any]:
        opts, stats = self.opts, self.stats
        vm = open_libvirt(opts, notice)
        self.libvirt = vm[0] if vm is not None else None
        source = vm[1] if vm is not None else open_source(opts, self.threads)
        try:
            self._prepare_guest(source)  # type: ignore[arg-type]
        except BaseException:
            if self.libvirt is not None:
                self.libvirt.close()
            raise
        batch_size = opts.batch_size or default_batch_size(self.threads, RING)
        batch_pages = max(1, min(batch_size // opts.page_size, 65536))
        if isinstance(source, SnapshotSource):
            batch_pages = source.batch_pages  # the frames' own: they go as stored
        stats.image_bytes = source.size
        self.control.open()
        self.reporter.stats_log.start()
        handshake = Handshake(opts, self.failure, stats)
        self.reporter.connecting()
        try:
            channels, batch_pages = self._connect(handshake, source, batch_pages)
        except BaseException:
            self.record.restore_replaced()
            self.control.close(None)
            source.close()
            raise
        self.verdict.channels = channels
        self.reporter.verbose(
            f"connected to {opts.destination}" + (f" ({len(channels)} channels)" if len(channels) > 1 else "")
        )
        sent = ReceiverCopy(source.pages)
        pipeline: SendPipeline | StoredCopy
        copy: Copy | StoredCopy
        if isinstance(source, SnapshotSource):  # stored frames, checked and sent as they are (snapshot/send.py)
            pipeline = copy = StoredCopy(
                source, channels, self.bucket, stats, self.failure, self.threads, sent, self.reporter
            )
        else:
            pipeline = SendPipeline(
                source, self.codec, self.level, self.threads, batch_pages, self.failure, self.auto, sent
            )
            copy = Copy(
                opts, source, pipeline, channels, self.bucket, stats, self.failure, self.auto, self.guest,
                self.reporter, self.threads, self.verdict.await_landed,
            )  # fmt: skip
        self.control.precopy = lambda: copy.precopy
        try:
            with live_display(stats, "send", self._info(), self.reporter.display) as view:
                self.reporter.view = view
                self._start(handshake, channels, sent)
                pipeline.start()
                digest = copy.run(self.policy, self.resuming)
                self.watch.stop()
                self.failure.raise_if_set()  # a stall reported just before the last pass ended
                end = End(source.pages, copy.batches_sent, end_commitment(digest))
                self.lifecycle.move(Phase.VERIFYING)  # before END goes out: from its first byte the receiver may act
                stats.add_wire(channels[0].send_frame(end))
                self.reporter.set_phase("verifying")
                self.verdict.await_result(digest)
                if self.handoff is not None:
                    self.verdict.hand_over()
                if self.guest.paused and copy.live is not None:
                    now = time.monotonic()
                    stats.downtime = now - copy.live.paused_at
                    verify_ms = (now - copy.live.paused_at) * 1000 - sum(copy.live.switchover.values())
                    copy.live.switchover["verify"] = round(verify_ms, 3)
                if self.handoff is not None:
                    self._retire_source()  # after the downtime is taken: the destination runs already
                stats.finish()
                self.reporter.set_phase("verified")
        except BaseException as exc:
            raise self._fail(exc, channels, pipeline, copy) from None
        finally:
            for each in channels:
                each.close()
            source.close()
            if self.libvirt is not None:
                self.libvirt.close()
        self.lifecycle.move(Phase.COMPLETED)
        pipeline.stop()
        self.record.remove()
        result = self.reporter.final(
            digest, self.resumes, copy.live, self.guest.paused and self.guest.pauser is not None, self.auto,
            {"uri": self.verdict.handoff_uri, **self.handoff.steps} if self.handoff is not None else None,
        )  # fmt: skip
        self.control.close(result)
        if opts.json:
            print_json(result)
        return result

    def _prepare_guest(self, source: SourceImage) -> None:
        """The pauser the options name (a libvirt: source: libvirt itself); in QEMU mode, the source QEMU checked
        and ready to hand over."""
        self.guest.pauser = LibvirtPauser(self.libvirt) if self.libvirt is not None else make_pauser(self.opts)
        if not self.opts.qemu_handoff:
            return
        assert isinstance(self.guest.pauser, QmpPauser | LibvirtPauser)
        try:
            check_backend(self.guest.pauser.qmp, source.path, source.size, "source")
            self.handoff = (
                LibvirtSourceHandoff(self.libvirt) if self.libvirt is not None else SourceHandoff(self.guest.pauser.qmp)
            )
            self.handoff.prepare()
        except BaseException:
            source.close()
            raise
        self.verdict.handoff = self.handoff

    def _retire_source(self) -> None:
        """The destination runs: a libvirt source is destroyed through libvirt, so that no `virsh resume` can run
        the old copy. The migration has succeeded either way; a failure here is said, loudly."""
        assert self.handoff is not None
        try:
            self.handoff.retire_source()
        except MigrateError as exc:
            notice(f"the destination runs, but the source could not be stopped: {exc}; do not resume it")
            self.handoff.steps["source-state"] = "not destroyed"  # type: ignore[assignment]

    def _info(self) -> str:
        opts = self.opts
        return (
            f"{opts.source} → {opts.destination}  codec {self.codec.name}:{self.level}  threads {self.threads}  "
            f"cap {format_rate(opts.max_bandwidth) if opts.max_bandwidth else 'none'}"
            + (f"  live, downtime limit {opts.downtime_limit * 1000:.0f}ms" if opts.live else "")
        )

    def _connect(
        self, handshake: Handshake, source: SourceImage | SnapshotSource, batch_pages: int
    ) -> tuple[list[Channel], int]:
        """The session recorded (before HELLO: a kill -9 at any later moment can be resumed), channels open; and
        the session's batch size in pages (resuming without --batch-size: the interrupted session's)."""
        opts = self.opts
        state = self.record.open(source, self.level, batch_pages, record=self.handoff is None)  # type: ignore[arg-type]
        self.session_id = state.session
        session = bytes.fromhex(state.session)

        def hello(index: int) -> Hello:
            return Hello(
                page_size=opts.page_size, image_size=source.size, codec=self.codec.wire_id, level=self.level,
                session_id=session, batch_pages=state.batch_pages, channels=opts.channels, channel_index=index,
                features=self._offered(),
            )  # fmt: skip

        return handshake.connect(hello), state.batch_pages

    def _offered(self) -> int:
        return Handshake.offered(self.handoff is not None, self.resuming, self.opts.live)

    def _start(self, handshake: Handshake, channels: list[Channel], sent: ReceiverCopy) -> None:
        """WELCOME on every channel (and, resuming, what the receiver holds): the session has started."""
        welcomes = [handshake.await_welcome(each, self._offered()) for each in channels]
        self.verdict.landing_reported = bool(welcomes[0].features & FEATURE_PASS_LANDED)
        if self.resuming and welcomes[0].features & FEATURE_RESUME:
            handshake.await_resume_state(channels[0], sent)
            self.reporter.verbose("resuming: the receiver reported what it holds")
            self.resumes += 1
        elif self.resuming:
            notice("the receiver holds nothing of this session: sending everything")
            self.record.resuming = False
        self.lifecycle.move(Phase.TRANSFER)
        self.reporter.verbose("destination allocated: sending pages")
        self.reporter.set_phase("transfer")
        self.stats.restart_clock()
        self._control_thread = spawn("control", partial(self.verdict.read, channels[0]), self.failure)
        for index, each in enumerate(channels[1:], start=1):
            spawn(f"control-{index}", partial(self.verdict.read, each), self.failure)
        self.watch.start()

    def _stalled(self, error: Stalled) -> None:
        """--progress-timeout expired: fail the run, and free a send the receiver does not take (a stopped reader)."""
        if self.failure.set(error):
            for each in self.verdict.channels:
                each.wake_sender()

    def _fail(
        self, exc: BaseException, channels: list[Channel], pipeline: SendPipeline | StoredCopy, copy: Copy | StoredCopy
    ) -> BaseException:
        """Stop everything, settle the guest and the state file by the phase the failure struck in."""
        self.watch.stop()
        exc = as_outcome(exc, self.lifecycle)
        self.failure.set(exc, replace=isinstance(exc, OutcomeUnknown))
        control = self._control_thread
        if isinstance(self.failure.error, NetworkError) and control is not None:
            control.join(1.0)  # an ABORT with the peer's reason may be in flight: let it win
        if (blamed := copy.blame_source(self.failure.error)) is not None:
            self.failure.set(blamed, replace=True)  # the source changed under a frozen pass: not the link's fault
        for each in channels:
            each.abort(self.failure.error)
        pipeline.stop(2.0)
        settle_guest(self.guest, self.failure.error, self.lifecycle)
        error = conclude(self.failure.error or exc, self.lifecycle, self.record, self.handoff is not None)
        self.stats.finish("failed" if not isinstance(error, CancelledError) else "cancelled")
        self.control.close({"status": self.stats.status, "error": str(error), **self.reporter.identity})
        return error


def run(opts: SendOptions) -> dict[str, Any]:
    """One migration; with --retries, a link fault is followed by a reconnect that resumes the session. --metrics
    FILE spans them all, to the exit code (metrics.py)."""
    gc.freeze()  # everything imported so far lives as long as the process: out of the collector's sight
    opts.check()  # every option combination, before the TLS files are even read
    metrics = MetricsFile(opts.metrics_path, "send")
    return metrics.around(partial(_sessions, opts, metrics))


def _sessions(opts: SendOptions, metrics: MetricsFile) -> dict[str, Any]:
    resume, resumes = opts.resume, 0
    preflight(opts.tls, server=False, warn=notice)  # bad TLS files fail before connecting; warned once, not per retry
    if opts.pause_pid is not None:
        check_pause_pid(opts.pause_pid)  # a pid that is no guest is the one line, not after the stop-and-copy notice
    announce_stop_and_copy(opts)
    for attempt in range(opts.retries + 1):
        sender = Sender(opts, resume=resume, resumes=resumes)
        metrics.follow(sender.stats, sender.metric_labels)
        try:
            return sender.run()
        except MigrateError as exc:
            if not exc.resumable or is_stall(exc) or attempt == opts.retries:
                raise  # a stall is kept for --resume but not retried: a reconnect does not unstick a peer
            # This session's id again once the receiver WELCOMEd it (it continues it if it holds it, or starts it
            # afresh); a session that never started left no state file: a new session again.
            resume = resume or sender.lifecycle.started
            resumes = sender.resumes
            notice(f"{getattr(exc, 'cause', exc)}; retry {attempt + 1} of {opts.retries} in {opts.retry_delay:g}s")
            time.sleep(opts.retry_delay)
    raise AssertionError("unreachable")
