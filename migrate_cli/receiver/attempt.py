"""One attempt of a receiving session: one connection of the sender, with all its channels.

1. admission (admission.py, handshake.py): the first sender this session can take, and its other channels;
2. DEST.partial created and allocated (a new session) or read back (a resumed one: RESUME_STATE tells the sender
   which pages it holds), the QEMU handoff prepared, WELCOME; a ``keepalive`` thread keeps quiet channels alive
   and checkpoints a resumable DEST.partial;
3. the transfer (transfer.py) until END;
4. verify: DEST.partial flushed, its digest recomputed from its own content, and only if it matches the sender's
   commitment, published as DEST and RESULT sent (then, in QEMU mode, the destination VM started).
A failure is judged by failure_rules.py: the attempt raises StreamLost (park), StartOver, or the error itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import IntegrityError, MigrateError, NoSender, Stalled
from ..failure import Failure, spawn
from ..net.stdio import StdioListener
from ..net.transport import Channel
from ..progress_watch import ProgressWatch
from ..report import live_display
from ..units import format_bytes
from ..wire import codec as codecs
from ..wire.digest import end_commitment
from ..wire.frames import (
    FEATURE_PASS_LANDED,
    FEATURE_RESUME,
    RESULT_DIGEST_MISMATCH,
    RESULT_VERIFIED,
    End,
    Handoff,
    Hello,
    Keepalive,
    PassLanded,
    Result,
    Welcome,
)
from ..wire.resume import resume_frames
from .admission import Admission
from .destination import DestinationImage, InPlaceDestination
from .discard import DiscardSink
from .failure_rules import ResumeWindowExpired, StartOver, StreamLost, drop_destination, parks, starts_over
from .handshake import admit_sender, check_hello, handshake
from .lifecycle import Phase
from .qemu_handoff import finish_handoff, open_handoff
from .state_file import ReceiverState, StateNotWritable, hold_state
from .transfer import Transfer

if TYPE_CHECKING:
    from .session import Receiver

KEEPALIVE_INTERVAL = 0.5  # a quiet channel gets a KEEPALIVE this often, so any --io-timeout >= 1s holds
CHECKPOINT_INTERVAL = 5.0  # seconds between flushes of a resumable DEST.partial


class Attempt:
    """Runs once (``run``); the session's DEST, state file, handoff and lifecycle are read and moved on ``session``."""

    def __init__(self, session: Receiver, failure: Failure) -> None:
        self.session = session
        self.failure = failure
        self.channels: list[Channel] = []
        self._stop_keepalive = threading.Event()

    def run(self, listener: socket.socket | StdioListener, bound: str, window_end: float | None) -> dict[str, Any]:
        """Admit a sender, receive, verify; the report of a verified migration. Raises StreamLost when the link
        fails and the session can continue, StartOver when nothing was received."""
        session, opts, reporter = self.session, self.session.opts, self.session.reporter
        admission = Admission(
            listener, partial(handshake, opts), opts.handshake_timeout, reporter.notice, reporter.verbose, opts.stdio
        )
        try:
            check = partial(check_hello, opts, session.state, session.dest is not None, reporter.verbose)
            poll = partial(self._poll, window_end)
            hello, channels = admit_sender(admission, poll, check, opts.handshake_timeout, reporter.notice)
        finally:
            admission.close()
        listener.close()  # connections beyond the announced channels are refused from here on
        reporter.sender_admitted()
        for each in channels:
            self.failure.add_waker(each.wake_reader)  # a worker's error must not wait for the next frame
        self.channels = channels
        resuming = session.state is not None
        reporter.verbose(
            ("sender resumed" if resuming else "sender connected")
            + (f" ({len(channels)} channels)" if len(channels) > 1 else "")
        )
        try:
            digest = self._receive(hello, bound, resuming)
        except BaseException as exc:
            self._judge(exc, resuming)
        finally:
            self._stop_keepalive.set()
            for each in channels:
                each.close()
        if session.state is not None:
            ReceiverState.remove(opts.destination)
        session.lifecycle.move(Phase.DONE)
        handoff = session.handoff
        return reporter.result(digest, session.resumes, {"uri": handoff.uri, **handoff.steps} if handoff else None)

    def _receive(self, hello: Hello, bound: str, resuming: bool) -> bytes:
        session, opts, reporter, stats = self.session, self.session.opts, self.session.reporter, self.session.stats
        lifecycle, channel = session.lifecycle, self.channels[0]
        lifecycle.move(Phase.READING_BACK if resuming else Phase.ALLOCATING)
        stats.add_wire(sum(c.hello_wire for c in self.channels))
        codec = codecs.by_wire_id(hello.codec)
        assert codec is not None  # check_hello refused an unknown one
        reporter.codec_name = codec.name
        reporter.session_id = hello.session_id.hex()
        stats.image_bytes, stats.page_size = hello.image_size, hello.page_size
        session.handoff = open_handoff(opts, hello, session.libvirt)
        handoff_uri = session.handoff.prepare(channel.sock.getsockname()[0]) if session.handoff else None
        spawn("keepalive", partial(self._keepalive, self._stop_keepalive), self.failure)
        where = "(discard)" if opts.discard else opts.destination
        info = f"{bound} → {where}  codec {codec.name}  threads {session.threads}" + ("  resumed" if resuming else "")
        with live_display(stats, "recv", info, reporter.display) as view:
            reporter.view = view
            reporter.show_phase(lifecycle.phase)
            if session.dest is None:
                self._create_destination(hello)
            dest = session.dest
            assert dest is not None
            if resuming:
                assert isinstance(dest, DestinationImage)
                fingerprints = dest.refingerprint(session.threads)
            lifecycle.move(Phase.TRANSFERRING)  # the sender is welcomed: the session is no longer parked
            # A pass's landing is reported to a sender that asks (a live one waits for it before its next scan).
            landed = bool(hello.features & FEATURE_PASS_LANDED)
            accepted = (FEATURE_RESUME if resuming else 0) | (FEATURE_PASS_LANDED if landed else 0)
            for each in self.channels:
                each.send_frame(Welcome(features=accepted))
            if resuming:
                for frame in resume_frames(fingerprints):
                    stats.add_wire(channel.send_frame(frame))
                session.resumes += 1
            if handoff_uri:
                channel.send_frame(Handoff(handoff_uri))
            reporter.verbose(
                f"destination {'read back' if resuming else 'allocated'} ({format_bytes(hello.image_size)}): "
                "receiving pages"
            )
            stats.restart_clock()

            def pass_done(number: int, batches: int) -> None:
                reporter.pass_done(number, batches)
                if landed:
                    stats.add_wire(channel.send_frame(PassLanded(number)))

            transfer = Transfer(
                dest, hello, codec, self.channels, session.threads, stats, self.failure, lifecycle, pass_done
            )
            watch = ProgressWatch(opts.progress_timeout, stats, "landed", self._stalled)
            watch.start()
            try:
                end = transfer.run()
            finally:
                watch.stop()
            self.failure.raise_if_set()  # a stall reported just before END arrived
            digest = self._verify_and_publish(dest, channel, end)
            if session.handoff is not None:
                lifecycle.move(Phase.HANDING_OVER)
                finish_handoff(session.handoff, channel, opts.on_failure, reporter.verbose)
            dest.close()  # unmapping DEST after the verdict (and the handoff): the sender's guest waits for neither
            stats.finish()
            reporter.show_phase(Phase.DONE)  # the display's last word; DONE itself once the state file is gone
        return digest

    def _judge(self, exc: BaseException, resuming: bool) -> NoReturn:
        """A failed attempt: park the session, start over, or raise the error (failure_rules.py)."""
        session = self.session
        self.failure.set(exc)
        error = self.failure.error or exc
        assert isinstance(error, MigrateError)  # the latch wraps anything else as InternalError
        if parks(error, session.lifecycle, resuming, session.dest, session.state, session.handoff):
            error.resumable = True  # our ABORT says so: the sender may reconnect with --resume
            for each in self.channels:
                each.abort(error)
            assert isinstance(session.dest, DestinationImage)
            session.dest.stop_allocation()  # a parked session must not go on filling the disk
            with contextlib.suppress(MigrateError):
                session.dest.flush()
            session.lifecycle.move(Phase.PARKED)
            raise StreamLost(error) from None
        for each in self.channels:
            each.abort(error)
        if starts_over(error, session.lifecycle, resuming, session.dest, session.handoff, session.opts):
            assert session.dest is not None
            drop_destination(session.dest, session.state, session.opts)
            session.dest, session.state = None, None
            session.lifecycle.move(Phase.LISTENING)
            raise StartOver(error) from None
        raise error from None

    def _create_destination(self, hello: Hello) -> None:
        session, opts = self.session, self.session.opts
        if opts.discard:
            session.dest = DiscardSink(hello.image_size, hello.page_size)
        elif opts.in_place:
            session.dest = InPlaceDestination(opts.destination, hello.image_size, hello.page_size)
        else:
            session.dest = DestinationImage(opts.destination, hello.image_size, hello.page_size, opts.sparse)
            if session.handoff is None:
                state = ReceiverState(
                    hello.session_id.hex(), hello.image_size, hello.page_size, hello.codec, hello.batch_pages
                )
                try:
                    state.save(opts.destination)  # from here on a dropped link leaves a resumable DEST.partial
                    session.state = state
                    if session.state_lock is not None:  # a session before this one (started over)
                        os.close(session.state_lock)
                    session.state_lock = hold_state(opts.destination, 0)
                except StateNotWritable as exc:
                    session.reporter.notice(
                        f"cannot keep resume state beside DEST ({exc}): this migration cannot be resumed"
                    )
            session.dest.allocate_rest()  # after the state file: the allocation may fill the disk

    def _verify_and_publish(
        self, dest: DestinationImage | InPlaceDestination | DiscardSink, channel: Channel, end: End
    ) -> bytes:
        dest.flush()
        digest = dest.digest(self.session.threads)
        if end_commitment(digest) != end.commitment:
            channel.send_frame(Result(RESULT_DIGEST_MISMATCH, digest))
            raise IntegrityError(
                f"digest mismatch: destination hashes to {digest.hex()}, not to the digest the sender committed to "
                f"(END {end.commitment.hex()})"
            )
        dest.publish(force=self.session.opts.force)
        self.session.lifecycle.move(Phase.PUBLISHED)
        self._stop_keepalive.set()
        channel.send_frame(Result(RESULT_VERIFIED, digest))
        return digest

    def _stalled(self, error: Stalled) -> None:
        """--progress-timeout expired: fail the attempt, and free a send the sender does not take."""
        if self.failure.set(error):
            for each in self.channels:
                each.wake_sender()

    def _poll(self, window_end: float | None) -> None:
        """Called while admission waits: a cancel (vmmig ctl) or the end of the resume window stops the wait."""
        self.failure.raise_if_set()
        if window_end is not None and time.monotonic() > window_end:
            raise ResumeWindowExpired("the sender did not come back")
        accept_end = self.session.accept_end
        if window_end is None and accept_end is not None and time.monotonic() > accept_end:
            raise NoSender(
                f"no sender completed a handshake within {self.session.opts.accept_timeout:g}s (--accept-timeout)"
            )

    def _keepalive(self, stop: threading.Event) -> None:
        """KEEPALIVE on quiet channels; and every CHECKPOINT_INTERVAL, DEST.partial to disk, so that a crash of
        the host loses at most that much of a resumable session (a crash of vmmig alone loses nothing)."""
        session = self.session
        checkpoint = time.monotonic()
        while not stop.wait(0.1):
            if self.failure.is_set():
                return
            dest = session.dest
            if isinstance(dest, DestinationImage):
                dest.check_allocation()
            if session.state is not None and time.monotonic() - checkpoint >= CHECKPOINT_INTERVAL:
                checkpoint = time.monotonic()
                if isinstance(dest, DestinationImage) and dest.array.size:
                    dest.flush()
            for channel in self.channels:
                if channel.last_send + KEEPALIVE_INTERVAL <= time.monotonic():
                    channel.send_frame(Keepalive())
