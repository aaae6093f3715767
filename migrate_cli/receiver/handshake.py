"""Which sender a receiving session takes: the handshake of one channel (TLS, HELLO), whether this session can
take that HELLO (codec, QEMU mode, resume, room on disk), and the sender's other channels joining.

admission.py runs the handshakes concurrently and hands over valid ones; ``admit_sender`` decides what they mean
for the session. A HELLO the session cannot take, a channel of another session, or a sender whose other channels
do not all join within --handshake-timeout is turned away (ABORT, one log line) and the receiver goes on waiting.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from functools import partial

from ..errors import JoinTimeout, MigrateError, ProtocolError, ResumeRefused, UsageError, peer_abort
from ..net.tls import wrap_server
from ..net.transport import Channel, Deadline
from ..wire import codec as codecs
from ..wire.conversation import Role
from ..wire.frames import FEATURE_QEMU_HANDOFF, FEATURE_RESUME, Abort, Hello, Keepalive
from .admission import Admission
from .dest_checks import check_fits
from .options import RecvOptions
from .state_file import ReceiverState


def handshake(opts: RecvOptions, conn: socket.socket, handshake_end: float) -> tuple[Channel, Hello]:
    """TLS (if configured) and the HELLO of one channel, within what is left of the handshake time."""
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


def check_hello(
    opts: RecvOptions,
    state: ReceiverState | None,
    allocated: bool,
    verbose: Callable[[str], None],
    hello: Hello,
) -> None:
    """Can this session take the sender of ``hello``? Raises the reason it cannot (and stays listening).
    ``state`` is the session kept for a resume (if any); ``allocated``: DEST.partial exists already."""
    if codecs.by_wire_id(hello.codec) is None:
        known = ", ".join(f"{n}={int(codecs.by_name(n).wire_id)}" for n in codecs.names())
        raise ProtocolError(f"sender asked for unknown codec id {hello.codec} (this receiver knows {known})")
    wanted = bool(hello.features & FEATURE_QEMU_HANDOFF)
    if wanted != opts.qemu_mode:
        raise UsageError(
            "the sender asks for a QEMU handoff: start vmmig recv with --qmp and --in-place"
            if wanted
            else "recv --qmp expects a sender started with --qemu-handoff"
        )
    if opts.stdio and hello.channels != 1:
        raise UsageError(f"--stdio carries one channel, and the sender asks for {hello.channels} (--channels 1)")
    check_resume(state, hello, verbose)
    if not allocated and not opts.discard and not opts.sparse:
        # refused before WELCOME, before a byte is allocated: a 56-byte HELLO must not fill the disk
        check_fits(opts.destination, hello.image_size, in_place=opts.in_place)


def check_resume(state: ReceiverState | None, hello: Hello, verbose: Callable[[str], None]) -> None:
    """A resuming sender needs a kept session with its id and parameters; a fresh one needs none."""
    wants = bool(hello.features & FEATURE_RESUME)
    if state is None:
        if wants:  # nothing kept here: the session starts afresh (WELCOME without FEATURE_RESUME says so)
            verbose("the sender asks to resume, but nothing is kept here: starting afresh")
        return
    if not wants:
        raise ResumeRefused(
            f"this receiver keeps interrupted session {state.session[:12]} for a resume: "
            "start the sender with --resume (or this receiver without --resume, with --force)"
        )
    why = state.mismatch(hello.session_id, hello.image_size, hello.page_size, hello.codec, hello.batch_pages)
    if why is not None:
        raise ResumeRefused(f"cannot resume: {why}")


def check_joining(first: Hello, other: Hello, taken: set[int]) -> None:
    """Another channel of the admitted sender: same session and parameters, an index not taken yet."""
    same = (first.session_id, first.page_size, first.image_size, first.codec, first.batch_pages, first.channels)
    theirs = (other.session_id, other.page_size, other.image_size, other.codec, other.batch_pages, other.channels)
    if theirs != same:
        raise ProtocolError("a channel joined with another session or other parameters than the first")
    if other.channel_index in taken:
        raise ProtocolError(f"channel {other.channel_index} joined twice")


def admit_sender(
    admission: Admission,
    poll: Callable[[], None],
    check: Callable[[Hello], None],
    timeout: float,
    notice: Callable[[str], None],
) -> tuple[Hello, list[Channel]]:
    """Wait for a sender whose HELLO passes ``check``, then for its other channels (within ``timeout``); returns
    its HELLO and its channels in index order."""
    while True:
        channel, hello, peer = admission.next(poll)
        try:
            check(hello)
        except MigrateError as exc:
            admission.reject(channel, peer, exc)
            continue
        channels = [channel]
        joining_end = time.monotonic() + timeout
        try:
            while len(channels) < hello.channels:
                extra, extra_hello, extra_peer = admission.next(partial(_joining, poll, joining_end))
                try:
                    check_joining(hello, extra_hello, {c.index for c in channels})
                except ProtocolError as exc:
                    admission.reject(extra, extra_peer, exc)
                    continue
                channels.append(extra)
        except JoinTimeout as exc:
            notice(f"refused the sender at {peer}: {exc}")
            for each in channels:
                each.abort(exc)
            continue
        except BaseException as exc:
            for each in channels:
                each.abort(exc)
            raise
        channels.sort(key=lambda c: c.index)
        return hello, channels


def _joining(poll: Callable[[], None], joining_end: float) -> None:
    poll()
    if time.monotonic() > joining_end:
        raise JoinTimeout("the sender's other channels did not connect within --handshake-timeout")
