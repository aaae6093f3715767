"""TCP channels: listen, connect with retries, and move whole frames. The only module that imports socket.

A ``Channel`` wraps one connected socket. One thread may send while another receives; sends are serialised by a
lock so keepalives from a ticker thread never interleave with a data frame. Every socket error becomes a
NetworkError with one line that says what happened.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from ..errors import ClosedBetweenFrames, MigrateError, NetworkError, PeerError, SourceError, UsageError
from ..wire.conversation import Conversation, Role, State
from ..wire.frames import HEADER_SIZE, Abort, Frame, FrameType, Pages, Unread
from ..wire.protocol import Header, check_crc, decode_payload, encode_parts, pages_head_length, parse_header
from .pipe_stream import PipeStream
from .splice import Splicer
from .tls import clean, refusal

Buffer = bytes | bytearray | memoryview
Stream = socket.socket | PipeStream  # a connection, or standard input and output as ssh gives them (recv --stdio)


def shut(sock: Stream, how: int) -> None:
    """The plain socket's shutdown, also under TLS (SSLSocket's own would speak TLS), or a pipe stream's."""
    if isinstance(sock, socket.socket):
        socket.socket.shutdown(sock, how)
    else:
        sock.shutdown(how)


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (``host``, ``[v6]`` or a bare ``v6`` with ``default_port``); the port may be 0
    (any free port) for listening. Anything else is a usage error: nothing is guessed from a malformed address."""
    host, port = _split_address(text)
    if port is None:
        if default_port is None:
            raise UsageError(f"address {text!r} needs a port: HOST:PORT or [IPv6]:PORT")
        port = str(default_port)
    if not host:
        raise UsageError(f"address {text!r} has no host")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise UsageError(f"address {text!r}: port must be a number from 0 to 65535")
    return host, int(port)


def _split_address(text: str) -> tuple[str, str | None]:
    """(host, port or None) as written; brackets hold exactly one IPv6 address."""
    if text.startswith("["):
        inside, closed, rest = text[1:].partition("]")
        if not closed:
            raise UsageError(f"address {text!r}: no ']' after the IPv6 address")
        if not _is_ipv6(inside):
            raise UsageError(f"address {text!r}: brackets hold an IPv6 address, and {inside!r} is not one")
        if rest and not rest.startswith(":"):
            raise UsageError(f"address {text!r}: unexpected {rest!r} after ']' (write [IPv6]:PORT)")
        return inside, rest[1:] if rest else None
    if text.count(":") > 1:
        if _is_ipv6(text):
            return text, None
        raise UsageError(f"address {text!r}: an IPv6 address with a port is written [IPv6]:PORT")
    host, colon, port = text.partition(":")
    return host, port if colon else None


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NetworkError(f"cannot listen on {format_address(host, port)}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(4)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == 98 else exc.strerror
        raise NetworkError(f"cannot listen on {format_address(host, port)}: {reason}") from None
    return sock


def connect(host: str, port: int, timeout: float, bind: tuple[str, int] | None = None) -> socket.socket:
    """Connect (from the local address ``bind``, --bind), retrying refused or unreachable attempts until ``timeout``
    seconds have passed; a local address that cannot be used fails at once."""
    deadline = time.monotonic() + timeout
    last = "timed out"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NetworkError(
                f"cannot connect to {format_address(host, port)}: {last} "
                f"(gave up after {timeout:g}s, --connect-timeout)"
            )
        try:
            sock = socket.create_connection((host, port), timeout=min(remaining, 5.0), source_address=bind)
        except (ConnectionRefusedError, TimeoutError, OSError) as exc:
            if bind is not None and exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EAFNOSUPPORT):
                raise NetworkError(
                    f"cannot connect to {format_address(host, port)} from --bind "
                    f"{format_address(*bind) if bind[1] else bind[0]}: "
                    f"{exc.strerror}"
                ) from None
            last = "connection refused" if isinstance(exc, ConnectionRefusedError) else (exc.strerror or str(exc))
            if isinstance(exc, socket.gaierror):
                raise NetworkError(f"cannot connect to {format_address(host, port)}: {exc.strerror}") from None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class Channel:
    """One framed connection. ``read_frame`` enforces the frame order of ``Conversation``."""

    def __init__(self, sock: Stream, role: Role, io_timeout: float) -> None:
        self.sock = sock
        self.io_timeout = io_timeout
        sock.settimeout(io_timeout)
        self.conversation = Conversation(role)
        self._send_lock = threading.Lock()
        self._header = bytearray(HEADER_SIZE)
        self.last_send = time.monotonic()
        self.closed = False
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._tls_lock = threading.Lock()  # serialises SSL reads and writes of this channel (see _recv_some)
        self._data = memoryview(b"")  # where a head-only PAGES frame's data would be read to (read_frame)
        self._splicer: Splicer | None = None  # made on the first raw frame landed with splice
        self.index = 0  # channel number within the migration (HELLO's channel_index)
        self.hello_wire = 0  # bytes of its HELLO frame (for the statistics)

    # -- sending -------------------------------------------------------------------------------------------------

    def send_frame(self, frame: Frame) -> int:
        """Send one whole frame; returns the bytes put on the wire."""
        return self.send_parts(encode_parts(frame))

    def send_parts(self, encoded: list[bytes | bytearray | memoryview]) -> int:
        """Send a frame encoded already (``encode_parts``: the sender's workers encode PAGES frames, CRC included,
        so the network thread only moves bytes); returns the bytes put on the wire."""
        parts = [memoryview(p).cast("B") for p in encoded]
        total = sum(len(p) for p in parts)
        if self.tls:  # ssl.SSLSocket has no sendmsg: one whole buffer (a copy of the frame)
            parts = [memoryview(b"".join(parts))]
        with self._send_lock:
            try:
                while self.tls and parts:
                    with self._tls_lock:
                        self.sock.sendall(parts.pop())
                while parts:
                    sent = self.sock.sendmsg(parts)
                    while parts and sent >= len(parts[0]):
                        sent -= len(parts[0])
                        parts.pop(0)
                    if parts and sent:
                        parts[0] = parts[0][sent:]
            except TimeoutError:
                raise NetworkError(
                    f"peer accepted no data for {self.io_timeout:g}s (--io-timeout): it is stalled or gone"
                ) from None
            except (BrokenPipeError, ConnectionResetError):
                raise self._unread_refusal() or NetworkError(
                    "connection lost: the peer closed it while we were sending"
                ) from None
            except ssl.SSLError as exc:
                raise self._unread_refusal() or NetworkError(f"TLS stream broken while sending: {clean(exc)}") from None
            except OSError as exc:
                if exc.errno == errno.EFAULT:  # pages sent from a source's mapping (frozen pass) that was truncated
                    raise SourceError("the source could not be read while sending it: was it truncated?") from None
                raise NetworkError(f"connection lost while sending: {exc.strerror}") from None
            self.last_send = time.monotonic()
        return total

    def _unread_refusal(self) -> MigrateError | None:
        """Under TLS 1.3 a peer that refuses our certificate sends an alert and closes; a write racing that close
        fails first (a reset, a broken pipe) with the alert still unread in our socket: read it to name the cause."""
        if not self.tls:
            return None
        try:
            self.sock.settimeout(0.2)
            self.sock.recv(1)
        except ssl.SSLError as exc:
            return refusal(exc, self._peer)
        except OSError:
            return None
        return None

    # -- receiving -----------------------------------------------------------------------------------------------

    def _recv_some(self, view: memoryview) -> int:
        """One recv. Under TLS, wait for data outside the lock, then read under it.

        One SSL object must never be used by two threads at once (OpenSSL), yet one thread reads a channel while
        another writes it (keepalives, control frames): SSL reads and writes of a channel share ``_tls_lock``,
        and a reader holds it only once data is there, so a writer never waits for the peer to speak.
        """
        if not self.tls:
            return self.sock.recv_into(view)
        assert isinstance(self.sock, ssl.SSLSocket)
        deadline = time.monotonic() + self.io_timeout
        while not self.sock.pending():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([self.sock], [], [], min(remaining, 1.0))
            if readable:
                break
        with self._tls_lock:
            return self.sock.recv_into(view)

    def _recv_exactly(self, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            try:
                n = self._recv_some(view[got:])
            except TimeoutError:
                raise NetworkError(f"no data from peer for {self.io_timeout:g}s (--io-timeout)") from None
            except ConnectionResetError:
                raise NetworkError("connection reset by peer") from None
            except ssl.SSLError as exc:
                # Under TLS 1.3 a sender's handshake ends before the receiver has checked its certificate: a
                # refusal is an alert on the first read.
                raise refusal(exc, self._peer) or NetworkError(f"TLS stream broken: {clean(exc)}") from None
            except OSError as exc:
                raise NetworkError(f"connection lost: {exc.strerror}") from None
            if n == 0:
                if got == 0 and what == "header":
                    raise ClosedBetweenFrames(f"connection closed by peer before the migration finished{self._hint()}")
                raise NetworkError(f"stream truncated: connection closed in the middle of a {what}")
            got += n

    @property
    def _peer(self) -> str:
        return "the receiver" if self.conversation.role is Role.SENDER else "the sender"

    def _hint(self) -> str:
        """Why a TLS receiver may close before its first frame: it refused us without an alert (its log says)."""
        if self.tls and self.conversation.role is Role.SENDER and self.conversation.state is State.HANDSHAKE:
            return " (right after the TLS handshake: did the receiver refuse our certificate? its log says why)"
        return ""

    def read_frame(
        self, alloc: Callable[[Header], memoryview] | None = None, head_only: bool = False
    ) -> tuple[Frame, int]:
        """Read, CRC-check, decode and order-check one frame. ``alloc`` may supply the payload buffer.

        With ``head_only`` a PAGES or PAGE_LIST frame is read only up to its page data (its data is ``Unread``): the
        caller then takes the data with ``read_data`` or ``land_data``. Returns the frame and its size on the wire.
        """
        self._recv_exactly(memoryview(self._header), "header")
        header = parse_header(self._header)
        pages = header.frame_type in (FrameType.PAGES, FrameType.PAGE_LIST)
        payload = alloc(header) if pages and alloc is not None else memoryview(bytearray(header.length))
        if pages and head_only:
            got = 0
            while got < (need := min(header.length, pages_head_length(header.frame_type, payload[:got]))):
                self._recv_exactly(payload[got:need], f"{header.frame_type.name} frame")
                got = need
            check_crc(header, payload[:got])
            frame = decode_payload(header, payload[:got])
            assert isinstance(frame, Pages)
            frame = replace(frame, data=Unread(header.length - got))
            self._data = payload[got:]
        else:
            self._recv_exactly(payload, f"{header.frame_type.name} frame")
            check_crc(header, payload)
            frame = decode_payload(header, payload)
        self.conversation.on_frame(header.frame_type)
        return frame, HEADER_SIZE + header.length

    def read_data(self) -> memoryview:
        """The data of the PAGES frame ``read_frame(head_only=True)`` just returned, read into its payload buffer."""
        data, self._data = self._data, memoryview(b"")
        self._recv_exactly(data, "PAGES frame")
        return data

    def land_data(self, fd: int, runs: list[tuple[int, int]], fallback: Callable[[bytes, int], None]) -> bool:
        """Move that frame's data straight into the file ``fd`` at (offset, length) ``runs`` (splice.py); False,
        nothing read, where this channel cannot (TLS) or the file refused it before."""
        if self.tls or not isinstance(self.sock, socket.socket):
            return False
        if self._splicer is not None and not self._splicer.file_takes_splice:
            return False
        if self._splicer is None:
            self._splicer = Splicer()
        self._splicer.into(self.sock, fd, runs, self.io_timeout, fallback)
        self._data = memoryview(b"")
        return True

    def wake_reader(self) -> None:
        """Make a thread blocked in ``read_frame`` return at once (it then sees the latched failure)."""
        shut(self.sock, socket.SHUT_RD)  # the plain socket call, also under TLS

    def wake_sender(self) -> None:
        """Make a thread blocked in a send (a peer that takes no data) return at once: only --io-timeout would end
        it otherwise. The connection is shut both ways, so not even an ABORT goes out after it; an idle channel is
        left alone for that ABORT."""
        if self._send_lock.locked():
            with contextlib.suppress(OSError):
                shut(self.sock, socket.SHUT_RDWR)

    def abort(self, error: BaseException | None) -> None:
        """Tell the peer why we stop (ABORT with our exit code and message), then close so that it can read it.

        Nothing is sent for an error the peer itself reported (PeerError) or that is not ours to explain.
        """
        if self.closed:
            return
        if isinstance(error, MigrateError) and not isinstance(error, PeerError):
            try:
                self.sock.settimeout(1.0)
                self.send_frame(Abort(int(error.exit_code), str(error), error.resumable))
            except (MigrateError, OSError):
                self.close()
                return
            self.close_after_abort()
        else:
            self.close()

    def close_after_abort(self, linger: float = 0.5) -> None:
        """Close so that an ABORT just sent is read by the peer: half-close, drain briefly, then close.

        Closing with unread data would send a reset, which can destroy the ABORT before the peer reads it.
        """
        try:
            shut(self.sock, socket.SHUT_WR)
            self.sock.settimeout(0.05)
            deadline = time.monotonic() + linger
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if self._splicer is not None:
            self._splicer.close()


class Deadline:
    """Bounds a whole phase (a handshake) in time, not just silence: when it expires the socket is shut down,
    which ends any blocked read; ``check`` then turns the resulting error into the right message."""

    def __init__(self, sock: Stream, seconds: float, option: str) -> None:
        self.seconds, self.option = seconds, option
        self.expired = False
        self._sock = sock
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        try:
            shut(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def follow(self, sock: Stream) -> None:
        """The phase moved to another socket object on the same connection (TLS wrapping detaches the old one)."""
        self._sock = sock
        if self.expired:
            self._expire()

    def cancel(self) -> None:
        self._timer.cancel()

    def check(self, exc: BaseException) -> BaseException:
        if self.expired:
            return NetworkError(f"handshake not completed within {self.seconds:g}s ({self.option})")
        return exc
