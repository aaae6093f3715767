"""`vmmig recv`: the receiver's orchestration.

Order matters and is the safety argument:
1. refuse an existing DEST / leftover DEST.partial and a non-loopback address without --insecure, then listen and
   print the ready line (and --ready-file);
2. accept connections and run their handshakes concurrently (admission.py): a stranger's connection, garbage or
   a HELLO this session cannot take (version, codec, a resume of another session, an image that does not fit) is
   logged and turned away, and the receiver goes on waiting; the first sender it can take, with all its channels,
   is the session's;
3. create and allocate DEST.partial (keepalives flow meanwhile), then WELCOME the sender;
4. the calling (main) thread reads frames into pool buffers and hands PAGES to the decompression workers
   (recv_pipeline.py); a ``keepalive`` thread sends KEEPALIVE every second so the sender's silence timer never trips;
5. at END: wait for the workers, flush DEST.partial, recompute the digest from DEST.partial itself, and only if it
   matches the sender's, rename it to DEST and send RESULT. Any failure before that removes DEST.partial
   (unless --keep-partial) and tells the sender why with ABORT.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ..control import ControlServer
from ..cpus import usable_cpus
from ..errors import (
    CancelledError,
    DestinationModified,
    IntegrityError,
    MigrateError,
    NetworkError,
    PeerCancelled,
    ProtocolError,
    QemuError,
    ResumeRefused,
    UsageError,
    peer_abort,
)
from ..failure import Failure, spawn
from ..guest.qemu import DestHandoff, check_backend
from ..guest.qmp import Qmp
from ..net.tls import preflight, wrap_server
from ..net.transport import (
    Channel,
    Deadline,
    format_address,
    is_loopback,
    listen,
    parse_address,
)
from ..report import StatsLog, display_wanted, live_display, print_json, report, summary_line
from ..safefile import write_atomic
from ..stats import Stats
from ..units import format_bytes
from ..wire import codec as codecs
from ..wire.digest import end_commitment
from ..wire.protocol import (
    FEATURE_QEMU_HANDOFF,
    FEATURE_RESUME,
    HANDOFF_FAILED,
    HANDOFF_RUNNING,
    RESULT_DIGEST_MISMATCH,
    RESULT_VERIFIED,
    Abort,
    End,
    Handoff,
    HandoffDone,
    Hello,
    Keepalive,
    Pages,
    PassEnd,
    Result,
    Role,
    Welcome,
    validate_pages,
)
from ..wire.resume import resume_frames
from .admission import Admission
from .destination import DestinationImage, DiscardSink, InPlaceDestination, check_destination, check_fits
from .options import RecvOptions
from .pipeline import PassBarrier, RecvPipeline
from .state_file import ReceiverState, StateNotWritable

if TYPE_CHECKING:
    from ..display import DisplayView

KEEPALIVE_INTERVAL = 0.5  # a quiet channel gets a KEEPALIVE this often, so any --io-timeout >= 1s holds
CHECKPOINT_INTERVAL = 5.0  # seconds between flushes of a resumable DEST.partial


class StreamLost(Exception):
    """An attempt ended by a link fault; DEST.partial and its state are kept and the session may continue."""

    def __init__(self, error: MigrateError) -> None:
        super().__init__(str(error))
        self.error = error


class StartOver(Exception):
    """An attempt ended by a link fault before any page arrived; nothing is kept and the receiver waits afresh."""

    def __init__(self, error: MigrateError) -> None:
        super().__init__(str(error))
        self.error = error


class ResumeWindowExpired(NetworkError):
    """Nobody resumed the parked session within --resume-window."""


class ResumeKept(MigrateError):
    """The final error of a session left resumable on disk (its exit code is that of the cause)."""


class Receiver:
    def __init__(self, opts: RecvOptions) -> None:
        self.opts = opts
        self.threads = opts.threads or usable_cpus()
        self.failure = Failure()
        self.dest: DestinationImage | InPlaceDestination | DiscardSink | None = None
        self._stop_keepalive = threading.Event()
        self.stats = Stats()
        self.display = display_wanted(opts.quiet)
        self.view: DisplayView | None = None
        self.codec_name = ""
        self.stats_log = StatsLog(self.stats, opts.stats_path, {"role": "recv", "threads": self.threads})
        self.channels: list[Channel] = []
        self.finished = False  # END arrived: the other channels' closing is expected
        self.published = False
        self.handoff: DestHandoff | None = None
        self.state: ReceiverState | None = None  # the session kept on disk for a resume (resume.py)
        self.parked = False  # a session waits for its sender to come back
        self.resumes = 0
        self.lost: MigrateError | None = None  # what dropped the link the session waits to resume after

    def run(self) -> dict[str, Any]:
        """The session: listen, then attempts until one verifies; a dropped link parks the session for a resume."""
        opts = self.opts
        host, port = parse_address(opts.listen)
        if not opts.insecure and opts.tls is None and not is_loopback(host):
            raise UsageError(
                f"refusing to listen on non-loopback address {host} without TLS (--tls-cert, --tls-key, --tls-ca) "
                "or --insecure: guest memory would cross the network unencrypted"
            )
        if opts.resume:
            if opts.discard or opts.in_place or opts.qmp:
                raise UsageError("--resume cannot be combined with --discard, --in-place or --qmp")
            self.state = ReceiverState.load(opts.destination)
            self.dest = DestinationImage.adopt(opts.destination, self.state.image_size, self.state.page_size)
            self.parked = True
        elif not opts.discard:
            check_destination(opts.destination, opts.force, in_place=opts.in_place)
        try:
            preflight(opts.tls, server=True, warn=self.notice)  # bad TLS files fail now, not at the first sender
            listener = listen(host, port)
        except BaseException:
            if self.dest is not None:
                self.dest.close()
            raise
        control = (
            ControlServer(opts.control, {"status": self._ctl_status, "cancel": self._ctl_cancel})
            if opts.control
            else None
        )
        bound = format_address(*listener.getsockname()[:2])
        self._announce(bound)
        self.stats_log.start()
        window_end: float | None = None
        try:
            while True:
                try:
                    result = self._attempt(listener, bound, window_end)
                    break
                except StartOver as over:
                    listener.close()
                    self.notice(f"{over.error}: nothing was received, DEST.partial removed; waiting for a sender")
                    window_end = None
                    listener = listen(*parse_address(bound))
                except StreamLost as lost:
                    listener.close()
                    self.lost = lost.error
                    if opts.resume_window <= 0:
                        raise self._kept(lost.error) from None
                    window_end = time.monotonic() + opts.resume_window
                    self.notice(
                        f"{lost.error}: keeping {self.dest.partial if self.dest else 'DEST.partial'}; waiting up to "
                        f"{opts.resume_window:g}s for the sender to resume (send --resume or --retries)"
                    )
                    listener = listen(*parse_address(bound))
        except BaseException as exc:
            error = exc if isinstance(exc, MigrateError) else self.failure.error or exc
            if self.parked and self.dest is not None:
                # A session waits for a resume: whatever ended the wait, its files stay for `recv --resume`.
                self.dest.close()
                if isinstance(error, MigrateError) and not isinstance(exc, ResumeKept):
                    error = self._kept(error)
            elif self.dest is not None:
                self.dest.discard(keep_partial=opts.keep_partial)
                if not opts.keep_partial:
                    ReceiverState.remove(opts.destination)
            if isinstance(self.dest, InPlaceDestination) and self.dest.modified and not self.published:
                error = DestinationModified(opts.destination, error)
            self.stats.finish("cancelled" if isinstance(error, CancelledError | PeerCancelled) else "failed")
            self._close_side_channels(control, {"status": self.stats.status, "error": str(error), "role": "recv"})
            raise error from None
        finally:
            listener.close()
        self._close_side_channels(control, result)
        if opts.json:
            print_json(result)
        return result

    def _kept(self, error: MigrateError) -> MigrateError:
        """The final error of a session whose DEST.partial stays for `vmmig recv --resume`, saying so."""
        partial = self.dest.partial if self.dest is not None else self.opts.destination + ".partial"
        if isinstance(error, ResumeWindowExpired) and self.lost is not None:
            cause = f"{self.lost}; no sender resumed within --resume-window {self.opts.resume_window:g}s"
            code = self.lost.exit_code
        else:
            cause, code = str(error), error.exit_code
        kept = ResumeKept(
            f"{cause}; {partial} and its state file are kept: "
            f"`vmmig recv --resume {self.opts.destination}` continues the migration"
        )
        kept.exit_code = code
        return kept

    def _attempt(self, listener: socket.socket, bound: str, window_end: float | None) -> dict[str, Any]:
        """One connection of the sender (all its channels): handshake, transfer, verify. Raises StreamLost when
        the link fails and the session can continue."""
        opts = self.opts
        self.failure = Failure()
        self._stop_keepalive = threading.Event()
        self.finished = False
        self.channels = []
        admission = Admission(listener, self._handshake, opts.handshake_timeout, self.notice, self.verbose)
        try:
            hello, channels = self._admit(admission, partial(self._poll_wait, window_end))
        finally:
            admission.close()
        listener.close()  # connections beyond the announced channels are refused from here on
        for each in channels:
            self.failure.add_waker(each.wake_reader)  # a worker's error must not wait for the next frame
        channels.sort(key=lambda c: c.index)
        self.channels = channels
        channel = channels[0]
        stats = self.stats
        resuming = self.state is not None
        self.verbose(
            ("sender resumed" if resuming else "sender connected")
            + (f" ({len(channels)} channels)" if len(channels) > 1 else "")
        )
        try:
            stats.add_wire(sum(c.hello_wire for c in channels))
            codec = codecs.by_wire_id(hello.codec)
            assert codec is not None  # _check_hello refused an unknown one
            self.codec_name = codec.name
            stats.image_bytes, stats.page_size = hello.image_size, hello.page_size
            handoff_uri = self._prepare_handoff(hello, channel)
            spawn("keepalive", partial(self._keepalive, self._stop_keepalive), self.failure)
            where = "(discard)" if opts.discard else opts.destination
            info = f"{bound} → {where}  codec {codec.name}  threads {self.threads}" + ("  resumed" if resuming else "")
            with live_display(stats, "recv", info, self.display) as view:
                self.view = view
                if view:
                    view.phase = "reading DEST.partial" if resuming else "allocating"
                if self.dest is None:
                    self._create_destination(hello)
                assert self.dest is not None
                if resuming:
                    assert isinstance(self.dest, DestinationImage)
                    fingerprints = self.dest.refingerprint(self.threads)
                    self.parked = False
                for each in channels:
                    each.send_frame(Welcome(features=FEATURE_RESUME if resuming else 0))
                if resuming:
                    for frame in resume_frames(fingerprints):
                        stats.add_wire(channel.send_frame(frame))
                    self.resumes += 1
                if handoff_uri:
                    channel.send_frame(Handoff(handoff_uri))
                self.verbose(
                    f"destination {'read back' if resuming else 'allocated'} ({format_bytes(hello.image_size)}): "
                    "receiving pages"
                )
                if view:
                    view.phase = "transfer"
                stats.restart_clock()
                end = self._transfer(hello, codec, stats)
                if view:
                    view.phase = "verifying"
                digest = self._verify_and_publish(channel, end)
                if self.handoff is not None:
                    self._finish_handoff(channel)
                stats.finish()
                if view:
                    view.phase = "verified"
        except BaseException as exc:
            self.failure.set(exc)
            error = self.failure.error or exc
            if self._can_park(error, resuming):
                error.resumable = True  # our ABORT says so: the sender may reconnect with --resume
                for each in channels:
                    each.abort(error)
                assert isinstance(self.dest, DestinationImage)
                self.dest.stop_allocation()  # a parked session must not go on filling the disk
                with contextlib.suppress(MigrateError):
                    self.dest.flush()
                self.parked = True
                raise StreamLost(error) from None
            for each in channels:
                each.abort(error)
            if self._nothing_received(error, resuming):
                self._drop_destination()
                raise StartOver(error) from None
            raise error from None
        finally:
            self._stop_keepalive.set()
            self.finished = True
            for each in channels:
                each.close()
        if self.state is not None:
            ReceiverState.remove(opts.destination)
        snap = stats.snapshot()
        if not opts.quiet:
            print("vmmig recv: " + summary_line("received", snap, digest.hex()), file=sys.stderr)
        return report(
            snap,
            {
                "role": "recv",
                "codec": codec.name,
                "threads": self.threads,
                "digest": digest.hex(),
                "destination": None if opts.discard else opts.destination,
                "discard": opts.discard,
                "resumes": self.resumes,
                **({"qemu-handoff": {"uri": self.handoff.uri, **self.handoff.steps}} if self.handoff else {}),
                **(self.view.cpu_report() if self.view is not None else {}),
            },
        )

    # -- resume --------------------------------------------------------------------------------------------------

    def _create_destination(self, hello: Hello) -> None:
        opts = self.opts
        if opts.discard:
            self.dest = DiscardSink(hello.image_size, hello.page_size)
        elif opts.in_place:
            self.dest = InPlaceDestination(opts.destination, hello.image_size, hello.page_size)
        else:
            self.dest = DestinationImage(opts.destination, hello.image_size, hello.page_size, opts.sparse)
            if self.handoff is None:
                state = ReceiverState(
                    hello.session_id.hex(), hello.image_size, hello.page_size, hello.codec, hello.batch_pages
                )
                try:
                    state.save(opts.destination)  # from here on a dropped link leaves a resumable DEST.partial
                    self.state = state
                except StateNotWritable as exc:
                    self.notice(f"cannot keep resume state beside DEST ({exc}): this migration cannot be resumed")
            self.dest.allocate_rest()  # after the state file: the allocation may fill the disk

    def _admit(self, admission: Admission, poll: Callable[[], None]) -> tuple[Hello, list[Channel]]:
        """Wait for a sender whose HELLO this session can take, then for its other channels.

        A HELLO the session cannot take, a channel of another session, or a sender whose other channels do not all
        join within --handshake-timeout is turned away (ABORT, one log line), and the receiver goes on waiting.
        """
        while True:
            channel, hello, peer = admission.next(poll)
            try:
                self._check_hello(hello)
            except MigrateError as exc:
                admission.reject(channel, peer, exc)
                continue
            channels = [channel]
            joining_end = time.monotonic() + self.opts.handshake_timeout
            try:
                while len(channels) < hello.channels:
                    extra, extra_hello, extra_peer = admission.next(partial(_joining, poll, joining_end))
                    try:
                        self._check_joining(hello, extra_hello, {c.index for c in channels})
                    except ProtocolError as exc:
                        admission.reject(extra, extra_peer, exc)
                        continue
                    channels.append(extra)
            except JoinTimeout as exc:
                self.notice(f"refused the sender at {peer}: {exc}")
                for each in channels:
                    each.abort(exc)
                continue
            except BaseException as exc:
                for each in channels:
                    each.abort(exc)
                raise
            return hello, channels

    def _check_hello(self, hello: Hello) -> None:
        """Can this session take the sender of ``hello``? Raises the reason it cannot (and stays listening)."""
        opts = self.opts
        if codecs.by_wire_id(hello.codec) is None:
            known = ", ".join(f"{n}={int(codecs.by_name(n).wire_id)}" for n in codecs.names())
            raise ProtocolError(f"sender asked for unknown codec id {hello.codec} (this receiver knows {known})")
        wanted = bool(hello.features & FEATURE_QEMU_HANDOFF)
        if wanted != (opts.qmp is not None):
            raise UsageError(
                "the sender asks for a QEMU handoff: start vmmig recv with --qmp and --in-place"
                if wanted
                else "recv --qmp expects a sender started with --qemu-handoff"
            )
        self._check_resume(hello)
        if self.dest is None and not opts.discard and not opts.sparse:
            # refused before WELCOME, before a byte is allocated: a 56-byte HELLO must not fill the disk
            check_fits(opts.destination, hello.image_size, in_place=opts.in_place)

    def _check_resume(self, hello: Hello) -> None:
        """A resuming sender needs a kept session with its id and parameters; a fresh one needs none."""
        wants = bool(hello.features & FEATURE_RESUME)
        if self.state is None:
            if wants:  # nothing kept here: the session starts afresh (WELCOME without FEATURE_RESUME says so)
                self.verbose("the sender asks to resume, but nothing is kept here: starting afresh")
            return
        if not wants:
            raise ResumeRefused(
                f"this receiver keeps interrupted session {self.state.session[:12]} for a resume: "
                "start the sender with --resume (or this receiver without --resume, with --force)"
            )
        why = self.state.mismatch(hello.session_id, hello.image_size, hello.page_size, hello.codec, hello.batch_pages)
        if why is not None:
            raise ResumeRefused(f"cannot resume: {why}")

    def _can_park(self, error: MigrateError, resuming: bool) -> bool:
        """Keep the session for a resume: only for a link fault, only for a DEST.partial that has a state file,
        holds pages (written now, or kept from before) and was allocated without error."""
        return (
            error.resumable
            and self.state is not None
            and type(self.dest) is DestinationImage
            and (resuming or self.dest.pages_written)
            and not self.dest.allocation_failed
            and self.handoff is None
            and not self.published
        )

    def _nothing_received(self, error: MigrateError, resuming: bool) -> bool:
        """A link fault before any page of a new session arrived (a client that said HELLO and hung up): there is
        nothing to keep, and the receiver waits for a sender again as if the connection had never happened."""
        return (
            error.resumable
            and not resuming
            and type(self.dest) is DestinationImage
            and not self.dest.pages_written
            and self.handoff is None
            and self.opts.resume_window > 0
        )

    def _drop_destination(self) -> None:
        assert self.dest is not None
        self.dest.discard(keep_partial=False)
        if self.state is not None:
            ReceiverState.remove(self.opts.destination)
        self.dest, self.state, self.parked = None, None, False

    def _poll_wait(self, window_end: float | None) -> None:
        self.failure.raise_if_set()
        if window_end is not None and time.monotonic() > window_end:
            raise ResumeWindowExpired("the sender did not come back")

    def notice(self, message: str) -> None:
        if not self.opts.quiet:
            print(f"vmmig recv: {message}", file=sys.stderr, flush=True)

    # -- QEMU mode ----------------------------------------------------------------------------------------------

    def _prepare_handoff(self, hello: Hello, channel: Channel) -> str | None:
        """Check the destination QEMU's RAM backend and start its incoming migration, before any page arrives."""
        if self.opts.qmp is None:
            return None
        qmp = Qmp(self.opts.qmp)
        check_backend(qmp, self.opts.destination, hello.image_size, "destination")
        self.handoff = DestHandoff(qmp)
        return self.handoff.prepare(channel.sock.getsockname()[0])

    def _finish_handoff(self, channel: Channel) -> None:
        assert self.handoff is not None
        try:
            self.handoff.finish()
        except QemuError as exc:
            with contextlib.suppress(MigrateError, OSError):
                channel.send_frame(HandoffDone(HANDOFF_FAILED, str(exc)))
            if self.opts.on_failure == "quit-dest":
                with contextlib.suppress(QemuError):
                    self.handoff.qmp.execute("quit")
            raise
        channel.send_frame(HandoffDone(HANDOFF_RUNNING))
        self.verbose("destination VM running")

    def verbose(self, message: str) -> None:
        if self.opts.verbose and not self.display and not self.opts.quiet:
            print(f"vmmig recv: {message}", file=sys.stderr, flush=True)

    def _close_side_channels(self, control: ControlServer | None, final: dict[str, Any] | None) -> None:
        if control is not None:
            control.close()
        self.stats_log.close(final)

    def _ctl_status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {**self.stats.snapshot().fields(), "role": "recv", "codec": self.codec_name, "threads": self.threads}

    def _ctl_cancel(self, _request: dict[str, Any]) -> str:
        self.failure.set(CancelledError("cancelled by vmmig ctl"))
        return "cancelling"

    def _pass_done(self, number: int, batches: int) -> None:
        self.stats.end_pass(number)
        snap = self.stats.snapshot()
        self.stats_log.write("pass", {"pass": number, "batches": batches, "transferred": snap.wire_bytes})
        if not self.display and not self.opts.quiet:
            print(
                f"vmmig recv: pass {number}: {batches:,} batches applied, {format_bytes(snap.wire_bytes)} received",
                file=sys.stderr,
                flush=True,
            )

    def _announce(self, bound: str) -> None:
        line = f"vmmig recv: listening on {bound}"
        print(line, file=sys.stderr, flush=True)
        if self.opts.ready_file:
            # readers never see a half-written file; a name planted beside it is never opened (safefile.py)
            try:
                write_atomic(self.opts.ready_file, (bound + "\n").encode(), mode=0o644)
            except OSError as exc:
                raise UsageError(f"--ready-file {self.opts.ready_file}: cannot write it: {exc.strerror}") from None

    def _keepalive(self, stop: threading.Event) -> None:
        """KEEPALIVE on quiet channels; and every CHECKPOINT_INTERVAL, DEST.partial to disk, so that a crash of
        the host loses at most that much of a resumable session (a crash of vmmig alone loses nothing)."""
        checkpoint = time.monotonic()
        while not stop.wait(0.1):
            if self.failure.is_set():
                return
            if isinstance(self.dest, DestinationImage):
                self.dest.check_allocation()
            if self.state is not None and time.monotonic() - checkpoint >= CHECKPOINT_INTERVAL:
                checkpoint = time.monotonic()
                if isinstance(self.dest, DestinationImage) and self.dest.array.size:
                    self.dest.flush()
            for channel in self.channels:
                if channel.last_send + KEEPALIVE_INTERVAL <= time.monotonic():
                    channel.send_frame(Keepalive())

    # -- joining channels ----------------------------------------------------------------------------------------

    def _handshake(self, conn: socket.socket, handshake_end: float) -> tuple[Channel, Hello]:
        """TLS (if configured) and the HELLO of one channel, within what is left of the handshake time."""
        opts = self.opts
        deadline = Deadline(conn, max(0.01, handshake_end - time.monotonic()), "--handshake-timeout")
        if opts.tls is not None:
            try:
                conn = wrap_server(conn, opts.tls, opts.handshake_timeout, on_wrapped=deadline.follow)
            except BaseException as exc:
                deadline.cancel()
                raise deadline.check(exc) from None
        channel = Channel(conn, Role.RECEIVER, opts.io_timeout)
        try:
            hello, wire = channel.read_frame()
            while isinstance(hello, Keepalive):
                hello, wire = channel.read_frame()
            if isinstance(hello, Abort):
                raise peer_abort(hello.code, hello.message, hello.resumable)
            if not isinstance(hello, Hello):
                raise ProtocolError(f"expected HELLO, got {type(hello).__name__}")
        except MigrateError as exc:
            error = deadline.check(exc)
            channel.abort(error)
            raise error from None
        finally:
            deadline.cancel()
        channel.index, channel.hello_wire = hello.channel_index, wire
        return channel, hello

    @staticmethod
    def _check_joining(first: Hello, other: Hello, taken: set[int]) -> None:
        same = (first.session_id, first.page_size, first.image_size, first.codec, first.batch_pages, first.channels)
        theirs = (other.session_id, other.page_size, other.image_size, other.codec, other.batch_pages, other.channels)
        if theirs != same:
            raise ProtocolError("a channel joined with another session or other parameters than the first")
        if other.channel_index in taken:
            raise ProtocolError(f"channel {other.channel_index} joined twice")

    # -- the transfer --------------------------------------------------------------------------------------------

    def _transfer(self, hello: Hello, codec: codecs.Codec, stats: Stats) -> End:
        assert self.dest is not None
        pipeline = RecvPipeline(self.dest, codec, self.threads, hello.batch_pages, stats, self.failure)
        barrier = PassBarrier(len(self.channels), pipeline, self.failure, self._pass_done)
        pipeline.start()
        for channel in self.channels[1:]:
            spawn(
                f"channel-{channel.index}", partial(self._read_channel, channel, hello, pipeline, barrier), self.failure
            )
        try:
            end = self._read_channel(self.channels[0], hello, pipeline, barrier)
            assert end is not None
            pipeline.finish()
            stats.begin_pass(max(1, barrier.completed), 0)  # the report names the last pass, not the next one
        except BaseException as exc:
            if isinstance(exc, MigrateError) and exc.resumable and not self.failure.is_set():
                # The link failed, not the data: apply the batches that arrived intact (CRC-checked, queued) so
                # that a resume does not send them again. A worker's own error still wins.
                with contextlib.suppress(MigrateError):
                    pipeline.finish()
            self.failure.set(exc)  # first error wins: if a worker failed first, that one is kept
            pipeline.abandon()
            raise
        if end.total_pages != self.dest.pages or end.batches != pipeline.batches:
            raise ProtocolError(
                f"END frame reports {end.total_pages} pages in {end.batches} batches, "
                f"but {self.dest.pages} pages in {pipeline.batches} batches were expected/received"
            )
        return end

    def _read_channel(self, channel: Channel, hello: Hello, pipeline: RecvPipeline, barrier: PassBarrier) -> End | None:
        """Read one channel's frames: batches to the workers, PASS_END to the barrier; END (channel 0) ends it."""
        assert self.dest is not None
        total_pages, carried = self.dest.pages, 0
        while True:
            self.failure.raise_if_set()
            try:
                frame, wire = channel.read_frame(pipeline.alloc)
            except NetworkError:
                if self.finished:
                    return None  # the sender closes its other channels once the migration is over
                self.failure.raise_if_set()  # woken by a worker's failure: report that, not the wake-up
                raise
            if isinstance(frame, Pages):
                try:
                    validate_pages(frame, hello.page_size, total_pages, hello.batch_pages)
                except ProtocolError:
                    pipeline.release_current()
                    raise
                pipeline.submit(frame, wire)
                carried += 1
            elif isinstance(frame, PassEnd):
                self.stats.add_wire(wire)
                barrier.arrive(frame.number, frame.batches, carried)
                carried = 0
            elif isinstance(frame, End):
                if channel.index != 0:
                    raise ProtocolError(f"END frame on channel {channel.index}: it belongs on channel 0")
                self.stats.add_wire(wire)
                self.finished = True
                return frame
            elif isinstance(frame, Abort):
                raise peer_abort(frame.code, frame.message, frame.resumable)
            else:
                self.stats.add_wire(wire)

    def _verify_and_publish(self, channel: Channel, end: End) -> bytes:
        assert self.dest is not None
        self.dest.flush()
        digest = self.dest.digest(self.threads)
        if end_commitment(digest) != end.commitment:
            channel.send_frame(Result(RESULT_DIGEST_MISMATCH, digest))
            raise IntegrityError(
                f"digest mismatch: destination hashes to {digest.hex()}, not to the digest the sender committed to "
                f"(END {end.commitment.hex()})"
            )
        self.dest.publish(force=self.opts.force)
        self.published = True
        self._stop_keepalive.set()
        channel.send_frame(Result(RESULT_VERIFIED, digest))
        return digest


class JoinTimeout(NetworkError):
    """A sender's other channels did not all connect in time: that sender is turned away."""


def _joining(poll: Callable[[], None], joining_end: float) -> None:
    poll()
    if time.monotonic() > joining_end:
        raise JoinTimeout("the sender's other channels did not connect within --handshake-timeout")


def run(opts: RecvOptions) -> dict[str, Any]:
    gc.freeze()  # everything imported so far lives as long as the process: out of the collector's sight
    return Receiver(opts).run()
