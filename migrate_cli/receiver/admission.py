"""The receiver's door: accept connections, run their handshakes concurrently, hand over the valid ones.

A receiver waiting for its sender must not be ended by somebody else's connection: a port scan, an HTTP probe, a
silent socket, three bytes of garbage, a TLS client without the right certificate. Each connection gets a handshake
thread of its own (at most ``MAX_PENDING`` at a time, each bounded by --handshake-timeout), so a silent stranger
never delays the real sender. A handshake that fails is logged in one line and its peer gets an ABORT saying why (a
real but misconfigured sender exits with that reason); the receiver goes on waiting.

The orchestrator takes valid (channel, HELLO) pairs with ``next`` and decides what they mean for the session;
``reject`` turns one away with the same treatment. What counts as valid here is the handshake proper (TLS, a
well-formed HELLO of our version): who may migrate is decided by TLS, not by being first (docs/SECURITY.md).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable

from ..errors import InternalError, MigrateError, NetworkError, ProtocolError
from ..net.endpoints import peer_name
from ..net.stdio import StdioListener
from ..net.transport import Channel, ClosedBetweenFrames, Stream
from ..wire.frames import Hello

MAX_PENDING = 16  # handshakes in flight; beyond that a new connection is closed at once (and logged)

Handshake = Callable[[Stream, float], tuple[Channel, Hello]]


class Admission:
    """Accepts on ``listener`` from a thread of its own until ``close``; ``next`` returns valid handshakes."""

    def __init__(
        self,
        listener: socket.socket | StdioListener,
        handshake: Handshake,
        timeout: float,
        log: Callable[[str], None],
        verbose: Callable[[str], None],
        single: bool = False,
    ) -> None:
        self._listener = listener
        # --stdio: the one connection there will ever be; its failed handshake or refused HELLO ends the session
        self._single = single
        self._failed: MigrateError | None = None
        self._handshake = handshake
        self._timeout = timeout
        self._log, self._verbose = log, verbose
        self._ready: queue.Queue[tuple[Channel, Hello, str]] = queue.Queue()
        self._slots = threading.BoundedSemaphore(MAX_PENDING)
        self._closed = threading.Event()
        self._lock = threading.Lock()  # orders "hand over" against "closed": a late handshake never slips in
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._accept_loop, name="admission", daemon=True)
        self._thread.start()

    def next(self, poll: Callable[[], None]) -> tuple[Channel, Hello, str]:
        """The next valid (channel, HELLO, peer address); ``poll`` is called every 0.1 s and raises to stop."""
        while True:
            poll()
            if self._failed is not None:
                raise self._failed
            if self._error is not None:
                raise NetworkError(f"cannot accept connections: {self._error}")
            try:
                return self._ready.get(timeout=0.1)
            except queue.Empty:
                continue

    def reject(self, channel: Channel, peer: str, error: MigrateError) -> None:
        """Turn away a connection whose HELLO the session cannot take: ABORT with the reason, one log line."""
        self._log(f"refused a connection from {peer}: {error}")
        channel.abort(error)
        channel.close()
        if self._single:
            raise error

    def close(self) -> None:
        """Stop accepting; valid handshakes nobody took are told a migration is in progress."""
        with self._lock:
            self._closed.set()
        self._thread.join(1.0)
        while True:
            try:
                channel, _hello, _peer = self._ready.get_nowait()
            except queue.Empty:
                return
            _turn_away(channel)

    # -- threads ---------------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.1)  # the listener's owner closes it: never block in accept for long
        while not self._closed.is_set():
            try:
                conn, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._closed.is_set() and self._listener.fileno() != -1:
                    self._error = exc
                return
            peer = peer_name(conn, address)
            conn.settimeout(None)
            if isinstance(conn, socket.socket) and conn.family != socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._slots.acquire(blocking=False):
                self._log(f"refused a connection from {peer}: {MAX_PENDING} handshakes are already in progress")
                conn.close()
                continue
            threading.Thread(target=self._run, args=(conn, peer), name=f"handshake {peer}", daemon=True).start()

    def _run(self, conn: socket.socket, peer: str) -> None:
        try:
            try:
                channel, hello = self._handshake(conn, time.monotonic() + self._timeout)
            except ClosedBetweenFrames as exc:
                self._verbose(f"a connection from {peer} closed before sending anything: still listening")
                conn.close()
                self._fail_single(exc)
                return
            except MigrateError as exc:
                self._log(f"refused a connection from {peer}: {exc}")
                conn.close()
                self._fail_single(exc)
                return
            except OSError as exc:  # an OS error on a stranger's socket is the stranger's problem, not ours
                self._log(f"refused a connection from {peer}: {exc}")
                conn.close()
                self._fail_single(NetworkError(f"handshake failed: {exc}"))
                return
            except Exception as exc:  # a bug of ours: the receiver waits on, but the line says what it was
                self._log(f"refused a connection from {peer}: internal error: {type(exc).__name__}: {exc}")
                conn.close()
                self._fail_single(InternalError(exc))
                return
            with self._lock:
                if not self._closed.is_set():
                    self._ready.put((channel, hello, peer))
                    return
            _turn_away(channel)
        finally:
            self._slots.release()

    def _fail_single(self, error: MigrateError) -> None:
        if self._single:
            self._failed = error


def _turn_away(channel: Channel) -> None:
    channel.abort(ProtocolError("this receiver is already migrating another session"))
    channel.close()
