"""`vmmig send`: the sender's orchestration.

Threads: the calling (main) thread is the network thread: it sends HELLO, waits for WELCOME, then takes encoded
batches from the pipeline's out queue and writes them to the socket under the token bucket. A ``control`` thread
reads what the receiver sends during the run (keepalives, an ABORT, the final RESULT). The pipeline's reader and
compression workers are described in sender.py. The first error anywhere is latched; the main thread then sends
ABORT to the peer, closes the socket and joins every thread before raising it.
"""

from __future__ import annotations

import os
import queue
import secrets
import sys
import threading
from dataclasses import dataclass
from typing import Any

from . import codec as codecs
from .digest import image_digest
from .errors import IntegrityError, MigrateError, NetworkError, PeerError, ProtocolError
from .image import SourceImage
from .pipeline import Failure, Stopped, spawn
from .progress import display_wanted, live_display, print_json, report, summary_line
from .protocol import RESULT_VERIFIED, Abort, Encoding, End, Hello, Keepalive, Result, Role, Welcome
from .ratelimit import TokenBucket
from .sender import SendPipeline
from .stats import Stats
from .transport import Channel, connect, parse_address
from .units import format_rate

KEEPALIVE_INTERVAL = 1.0


@dataclass(frozen=True)
class SendOptions:
    source: str
    destination: str  # HOST:PORT
    codec: str = codecs.DEFAULT_CODEC
    level: int | None = None
    threads: int = 0  # 0 = number of usable CPUs
    max_bandwidth: int | None = None
    page_size: int = 4096
    batch_size: int = 256 * 1024
    connect_timeout: float = 10.0
    io_timeout: float = 30.0
    json: bool = False
    quiet: bool = False


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Sender:
    def __init__(self, opts: SendOptions) -> None:
        self.opts = opts
        self.codec = codecs.by_name(opts.codec)
        self.level = opts.level if opts.level is not None else self.codec.default_level
        self.threads = opts.threads or usable_cpus()
        self.failure = Failure()
        self.result: Result | None = None
        self.result_event = threading.Event()
        self._control: threading.Thread | None = None

    def run(self) -> dict[str, Any]:
        opts = self.opts
        host, port = parse_address(opts.destination)
        source = SourceImage(opts.source, opts.page_size)
        batch_pages = max(1, min(opts.batch_size // opts.page_size, 65536))
        stats = Stats(image_bytes=source.size, page_size=opts.page_size)
        info = (
            f"{opts.source} → {opts.destination}  codec {self.codec.name}:{self.level}  threads {self.threads}  "
            f"cap {format_rate(opts.max_bandwidth) if opts.max_bandwidth else 'none'}"
        )
        channel = Channel(connect(host, port, opts.connect_timeout), Role.SENDER, opts.io_timeout)
        try:
            with live_display(stats, "send", info, display_wanted(opts.quiet)) as view:
                hello = Hello(
                    page_size=opts.page_size,
                    image_size=source.size,
                    codec=self.codec.wire_id,
                    level=self.level,
                    session_id=secrets.token_bytes(16),
                    batch_pages=batch_pages,
                )
                stats.add_wire(channel.send_frame(hello))
                self._await_welcome(channel)
                if view:
                    view.phase = "transfer"
                stats.restart_clock()
                digest = self._transfer(channel, source, batch_pages, stats)
                if view:
                    view.phase = "verifying"
                self._await_result(channel, digest)
                stats.finish()
                if view:
                    view.phase = "verified"

        except BaseException as exc:
            self.failure.set(exc)
            if isinstance(self.failure.error, NetworkError) and self._control is not None:
                self._control.join(1.0)  # an ABORT with the peer's reason may be in flight: let it win
            self._abort_peer(channel)
            raise self.failure.error or exc from None
        finally:
            channel.close()
            source.close()
        snap = stats.snapshot()
        digest_hex = digest.hex()
        if not opts.quiet:
            print("vmmig send: " + summary_line("sent", snap, digest_hex), file=sys.stderr)
        result = report(
            snap,
            {
                "role": "send",
                "codec": self.codec.name,
                "level": self.level,
                "threads": self.threads,
                "max-bandwidth": opts.max_bandwidth or 0,
                "digest": digest_hex,
            },
        )
        if opts.json:
            print_json(result)
        return result

    # -- phases --------------------------------------------------------------------------------------------------

    def _await_welcome(self, channel: Channel) -> None:
        while True:
            frame, _ = channel.read_frame()
            if isinstance(frame, Welcome):
                return
            if isinstance(frame, Abort):
                raise PeerError(frame.message, frame.code)
            if not isinstance(frame, Keepalive):
                raise ProtocolError(f"expected WELCOME, got {type(frame).__name__}")

    def _transfer(self, channel: Channel, source: SourceImage, batch_pages: int, stats: Stats) -> bytes:
        pipeline = SendPipeline(source, self.codec, self.level, self.threads, batch_pages, stats, self.failure)
        bucket = TokenBucket(self.opts.max_bandwidth)
        self._control = spawn("control", lambda: self._read_control(channel), self.failure)
        pipeline.start()
        workers_left = self.threads
        sent = 0
        try:
            while workers_left:
                self.failure.raise_if_set()
                try:
                    batch = pipeline.out.get(timeout=KEEPALIVE_INTERVAL)
                except queue.Empty:
                    stats.add_wire(channel.send_frame(Keepalive()))
                    continue
                if batch is None:
                    workers_left -= 1
                    continue
                wire = len(batch.frame.data) + len(batch.frame.zero_bitmap) + 28
                bucket.consume(wire, self.failure.event)
                frame = batch.frame
                stats.add_wire(channel.send_frame(frame))
                # Counted once on the wire, not when encoded: progress never runs ahead of what was sent.
                stats.add_batch(frame.zero_count, frame.normal_count, len(frame.data), frame.encoding == Encoding.RAW)
                if batch.release:
                    batch.release()
                sent += 1
            self.failure.raise_if_set()
            if sent != pipeline.batches:
                raise MigrateError(f"internal error: sent {sent} of {pipeline.batches} batches")
            digest = image_digest(pipeline.fingerprints)
            stats.add_wire(channel.send_frame(End(source.pages, sent, digest)))
            return digest
        except BaseException as exc:
            self.failure.set(exc)  # first error wins: if a worker failed first, that one is kept
            pipeline.join(2.0)
            raise

    def _read_control(self, channel: Channel) -> None:
        """Read the receiver's frames until its RESULT; an ABORT or a lost connection fails the migration.

        Keeps reading after a local network error too: the peer's ABORT explaining it may still be in flight.
        """
        while not (self.failure.is_set() and not isinstance(self.failure.error, NetworkError)):
            try:
                frame, _ = channel.read_frame()
            except NetworkError:
                if self.failure.is_set():
                    raise Stopped from None
                raise
            if isinstance(frame, Abort):
                raise PeerError(frame.message, frame.code)
            if isinstance(frame, Result):
                self.result = frame
                self.result_event.set()
                return

    def _await_result(self, channel: Channel, digest: bytes) -> None:
        while not self.result_event.wait(0.2):
            self.failure.raise_if_set()
        result = self.result
        assert result is not None
        if result.status != RESULT_VERIFIED or result.digest != digest:
            raise IntegrityError(
                f"digest mismatch: sent image digest {digest.hex()}, receiver computed {result.digest.hex()}"
            )

    def _abort_peer(self, channel: Channel) -> None:
        err = self.failure.error
        if err is None or isinstance(err, PeerError) or channel.closed:
            return
        try:
            channel.sock.settimeout(1.0)
            channel.send_frame(Abort(int(err.exit_code), str(err)))
        except (MigrateError, OSError):
            return
        channel.close_after_abort()


def run(opts: SendOptions) -> dict[str, Any]:
    return Sender(opts).run()
