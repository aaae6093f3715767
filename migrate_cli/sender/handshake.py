"""Opening a session: its state file, the channels with HELLO, the receiver's WELCOME and, resuming, RESUME_STATE.

The state file is written before HELLO, so a kill -9 at any later moment can be resumed. A new session that
never starts (refused, unreachable) gives the file it replaced back (``SessionRecord.restore_replaced``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import replace

from ..errors import NetworkError, ProtocolError, peer_abort
from ..failure import Failure
from ..net.endpoints import EXEC, UNIX, connect_unix
from ..net.exec_peer import ExecChannel, ExecPeer
from ..net.tls import wrap_client
from ..net.transport import Channel, connect
from ..stats import Stats
from ..wire.conversation import Role
from ..wire.frames import (
    FEATURE_PASS_LANDED,
    FEATURE_QEMU_HANDOFF,
    FEATURE_RESUME,
    Abort,
    Hello,
    Keepalive,
    ResumeState,
    Welcome,
)
from ..wire.resume import ResumeCollector
from .options import SendOptions
from .receiver_copy import ReceiverCopy
from .source import SourceImage
from .sources import source_path
from .state_file import SenderState


class SessionRecord:
    """This run's session (new, or the interrupted one when resuming) and the state file that records it."""

    def __init__(self, opts: SendOptions, resuming: bool) -> None:
        self.opts = opts
        self.resuming = resuming  # continue the interrupted session; False once the receiver holds none of it
        self.replaced: bytes | None = None  # the state file this (new) session replaced

    def open(self, source: SourceImage, level: int, batch_pages: int, record: bool) -> SenderState:
        """The session's state, saved (when ``record``: not in QEMU mode) before anything is sent."""
        state = self._session_state(source, level, batch_pages)
        if record:
            if not self.resuming:  # an interrupted session's record survives a new run that never starts
                self.replaced = SenderState.read_raw(self.opts.state_path())
            state.save(self.opts.state_path())
        return state

    def _session_state(self, source: SourceImage, level: int, batch_pages: int) -> SenderState:
        """A new session, or (resuming) the interrupted one, refused if anything differs."""
        opts = self.opts
        # snapshot:FILE: the file; libvirt:DOMAIN: the RAM found (not resumable, but recorded the same way)
        st = os.stat(source.path if opts.libvirt_domain is not None else source_path(opts.source))
        current = SenderState(
            session=secrets.token_bytes(16).hex(), source=opts.source, device=st.st_dev, inode=st.st_ino,
            image_size=source.size, page_size=opts.page_size, codec=opts.codec, level=level,
            batch_pages=batch_pages, destination=opts.destination,
        )  # fmt: skip
        if not self.resuming:
            return current
        saved = SenderState.load(opts.state_path(), opts.source, opts.destination)
        if opts.batch_size is None:  # not given: whatever the interrupted session used (an older default, say)
            current = replace(current, batch_pages=saved.batch_pages)
        saved.check_same(current)
        return saved

    def restore_replaced(self) -> None:
        """A new session that never started leaves no state file of its own: the one before it gets its file back,
        or there is none (a resume would name a session no receiver ever saw)."""
        if self.resuming:
            return  # the interrupted session's own file: it stays for the next --resume
        if self.replaced is not None:
            SenderState.write_raw(self.opts.state_path(), self.replaced)
        else:
            SenderState.remove(self.opts.state_path())

    def remove(self) -> None:
        SenderState.remove(self.opts.state_path())


class Handshake:
    """HELLO on every channel, then WELCOME on every channel; resuming, RESUME_STATE on the primary one."""

    def __init__(self, opts: SendOptions, failure: Failure, stats: Stats) -> None:
        self.opts = opts
        self.failure = failure
        self.stats = stats

    def connect(self, hello: Callable[[int], Hello]) -> list[Channel]:
        """Open every channel and send its HELLO (``hello(index)``); on failure none stays open."""
        opts = self.opts
        channels: list[Channel] = []
        try:
            for index in range(opts.channels):
                channels.append(self._open())
                self.failure.add_waker(channels[-1].wake_reader)  # a cancel must not wait for the peer's next frame
                # HELLO right away: the receiver takes the next channel (and its TLS handshake) only after this one's.
                self.stats.add_wire(channels[-1].send_frame(hello(index)))
        except BaseException:
            for channel in channels:
                channel.close()
            raise
        return channels

    def _open(self) -> Channel:
        """One channel to the destination: TCP (TLS if configured), a unix socket, or a run of exec:'s command."""
        opts, where = self.opts, self.opts.endpoint()
        if where.scheme == EXEC:
            return ExecChannel(ExecPeer(where.target), Role.SENDER, opts.io_timeout)
        if where.scheme == UNIX:
            sock = connect_unix(where.target, opts.connect_timeout)
        else:
            sock = connect(where.host, where.port, opts.connect_timeout, opts.bind_address())
        if opts.tls is not None:  # over unix: the name checked is --tls-peer-name, by default localhost
            sock = wrap_client(sock, opts.tls, where.host or "localhost", opts.handshake_timeout)
        return Channel(sock, Role.SENDER, opts.io_timeout)

    @staticmethod
    def offered(handoff: bool, resuming: bool, live: bool = False) -> int:
        return (
            (FEATURE_QEMU_HANDOFF if handoff else 0)
            | (FEATURE_RESUME if resuming else 0)
            | (FEATURE_PASS_LANDED if live else 0)
        )

    def await_welcome(self, channel: Channel, offered: int) -> Welcome:
        while True:
            try:
                frame, _ = channel.read_frame()
            except NetworkError as exc:
                if self.opts.tls is None and self.opts.endpoint().scheme != EXEC and not self.failure.is_set():
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

    def await_resume_state(self, channel: Channel, sent: ReceiverCopy) -> None:
        """Read the receiver's RESUME_STATE frames: what DEST.partial holds becomes what was sent."""
        collector = ResumeCollector(len(sent))
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
        sent.replace_from(collector.fingerprints)
