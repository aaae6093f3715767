"""`vmmig recv`: the receiver's orchestration.

Order matters and is the safety argument:
1. refuse an existing DEST / leftover DEST.partial and a non-loopback address without --insecure, then listen and
   print the ready line (and --ready-file);
2. accept one sender, read its HELLO, check version and codec;
3. create and allocate DEST.partial (keepalives flow meanwhile), then WELCOME the sender;
4. the calling (main) thread reads frames into pool buffers and hands PAGES to the decompression workers
   (receiver.py); a ``keepalive`` thread sends KEEPALIVE every second so the sender's silence timer never trips;
5. at END: wait for the workers, flush DEST.partial, recompute the digest from DEST.partial itself, and only if it
   matches the sender's, rename it to DEST and send RESULT. Any failure before that removes DEST.partial
   (unless --keep-partial) and tells the sender why with ABORT.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import codec as codecs
from .control import ControlServer
from .errors import (
    CancelledError,
    IntegrityError,
    MigrateError,
    NetworkError,
    PeerCancelled,
    PeerError,
    ProtocolError,
    UsageError,
    peer_abort,
)
from .image import DestinationImage, DiscardSink, check_destination
from .pipeline import Failure, spawn
from .progress import DisplayView, StatsLog, display_wanted, live_display, print_json, report, summary_line
from .protocol import (
    RESULT_DIGEST_MISMATCH,
    RESULT_VERIFIED,
    Abort,
    End,
    Hello,
    Keepalive,
    Pages,
    PassEnd,
    Result,
    Role,
    Welcome,
    validate_pages,
)
from .receiver import RecvPipeline
from .send import usable_cpus
from .stats import Stats
from .tls import TlsOptions, wrap_server
from .transport import Channel, Deadline, accept, format_address, is_loopback, listen, parse_address
from .units import format_bytes

KEEPALIVE_INTERVAL = 1.0


@dataclass(frozen=True)
class RecvOptions:
    destination: str
    listen: str = "127.0.0.1:4444"
    insecure: bool = False
    force: bool = False
    keep_partial: bool = False
    sparse: bool = False
    threads: int = 0
    ready_file: str | None = None
    io_timeout: float = 30.0
    json: bool = False
    quiet: bool = False
    discard: bool = False
    tls: TlsOptions | None = None
    handshake_timeout: float = 10.0
    control: str | None = None
    stats_path: str | None = None
    verbose: bool = False


class Receiver:
    def __init__(self, opts: RecvOptions) -> None:
        self.opts = opts
        self.threads = opts.threads or usable_cpus()
        self.failure = Failure()
        self.dest: DestinationImage | DiscardSink | None = None
        self._stop_keepalive = threading.Event()
        self.stats = Stats()
        self.display = display_wanted(opts.quiet)
        self.view: DisplayView | None = None
        self.codec_name = ""
        self.stats_log = StatsLog(self.stats, opts.stats_path, {"role": "recv", "threads": self.threads})

    def run(self) -> dict[str, Any]:
        opts = self.opts
        host, port = parse_address(opts.listen)
        if not opts.insecure and opts.tls is None and not is_loopback(host):
            raise UsageError(
                f"refusing to listen on non-loopback address {host} without TLS (--tls-cert, --tls-key, --tls-ca) "
                "or --insecure: guest memory would cross the network unencrypted"
            )
        if not opts.discard:
            check_destination(opts.destination, opts.force)
        listener = listen(host, port)
        control = (
            ControlServer(opts.control, {"status": self._ctl_status, "cancel": self._ctl_cancel})
            if opts.control
            else None
        )
        try:
            bound = format_address(*listener.getsockname()[:2])
            self._announce(bound)
            conn = accept(listener, poll=self.failure.raise_if_set)
        except BaseException as exc:
            listener.close()
            if control:
                control.close()
            raise (self.failure.error or exc) if isinstance(exc, MigrateError) else exc from None
        listener.close()
        stats = self.stats
        self.stats_log.start()
        deadline = Deadline(conn, opts.handshake_timeout, "--handshake-timeout")  # TLS + HELLO, as a whole
        if opts.tls is not None:
            try:
                conn = wrap_server(conn, opts.tls, opts.handshake_timeout, on_wrapped=deadline.follow)
            except BaseException as exc:
                deadline.cancel()
                if control:
                    control.close()
                self.stats_log.close(None)
                raise deadline.check(exc) from None
        channel = Channel(conn, Role.RECEIVER, opts.io_timeout)
        self.failure.add_waker(channel.wake_reader)  # a worker's error must not wait for the next frame
        self.verbose("sender connected")
        try:
            try:
                hello, wire = channel.read_frame()
            except MigrateError as exc:
                raise deadline.check(exc) from None
            finally:
                deadline.cancel()
            if not isinstance(hello, Hello):
                raise ProtocolError(f"expected HELLO, got {type(hello).__name__}")
            stats.add_wire(wire)
            codec = codecs.by_wire_id(hello.codec)
            if codec is None:
                known = ", ".join(f"{n}={int(codecs.by_name(n).wire_id)}" for n in codecs.names())
                raise ProtocolError(f"sender asked for unknown codec id {hello.codec} (this receiver knows {known})")
            self.codec_name = codec.name
            stats.image_bytes, stats.page_size = hello.image_size, hello.page_size
            spawn("keepalive", lambda: self._keepalive(channel), self.failure)
            where = "(discard)" if opts.discard else opts.destination
            info = f"{bound} → {where}  codec {codec.name}  threads {self.threads}"
            with live_display(stats, "recv", info, self.display) as view:
                self.view = view
                if view:
                    view.phase = "allocating"
                self.dest = (
                    DiscardSink(hello.image_size, hello.page_size)
                    if opts.discard
                    else DestinationImage(opts.destination, hello.image_size, hello.page_size, opts.sparse)
                )
                channel.send_frame(Welcome())
                self.verbose(f"destination allocated ({format_bytes(hello.image_size)}): receiving pages")
                if view:
                    view.phase = "transfer"
                stats.restart_clock()
                end = self._transfer(channel, hello, codec, stats)
                if view:
                    view.phase = "verifying"
                digest = self._verify_and_publish(channel, end)
                stats.finish()
                if view:
                    view.phase = "verified"
        except BaseException as exc:
            self.failure.set(exc)
            self._abort_peer(channel)
            if self.dest is not None:
                self.dest.discard(keep_partial=opts.keep_partial)
            error = self.failure.error or exc
            stats.finish("cancelled" if isinstance(error, CancelledError | PeerCancelled) else "failed")
            self._close_side_channels(control, {"status": stats.status, "error": str(error), "role": "recv"})
            raise error from None
        finally:
            self._stop_keepalive.set()
            channel.close()
        snap = stats.snapshot()
        if not opts.quiet:
            print("vmmig recv: " + summary_line("received", snap, digest.hex()), file=sys.stderr)
        result = report(
            snap,
            {
                "role": "recv",
                "codec": codec.name,
                "threads": self.threads,
                "digest": digest.hex(),
                "destination": None if opts.discard else opts.destination,
                "discard": opts.discard,
                **(self.view.cpu_report() if self.view is not None else {}),
            },
        )
        self._close_side_channels(control, result)
        if opts.json:
            print_json(result)
        return result

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
            tmp = self.opts.ready_file + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(bound + "\n")
            os.replace(tmp, self.opts.ready_file)  # readers never see a half-written file

    def _keepalive(self, channel: Channel) -> None:
        while not self._stop_keepalive.wait(KEEPALIVE_INTERVAL / 4):
            if self.failure.is_set():
                return
            if channel.last_send + KEEPALIVE_INTERVAL <= time.monotonic():
                channel.send_frame(Keepalive())

    def _transfer(self, channel: Channel, hello: Hello, codec: codecs.Codec, stats: Stats) -> End:
        assert self.dest is not None
        pipeline = RecvPipeline(self.dest, codec, self.threads, hello.batch_pages, stats, self.failure)
        pipeline.start()
        total_pages = self.dest.pages
        passes = pass_first_batch = 0
        try:
            while True:
                self.failure.raise_if_set()
                try:
                    frame, wire = channel.read_frame(pipeline.alloc)
                except NetworkError:
                    self.failure.raise_if_set()  # woken by a worker's failure: report that, not the wake-up
                    raise
                if isinstance(frame, Pages):
                    try:
                        validate_pages(frame, hello.page_size, total_pages, hello.batch_pages)
                    except ProtocolError:
                        pipeline.release_current()
                        raise
                    pipeline.submit(frame, wire)
                elif isinstance(frame, PassEnd):
                    stats.add_wire(wire)
                    if frame.number != passes + 1 or frame.batches != pipeline.batches - pass_first_batch:
                        raise ProtocolError(
                            f"PASS_END {frame.number} reports {frame.batches} batches, but pass {passes + 1} "
                            f"carried {pipeline.batches - pass_first_batch}"
                        )
                    pipeline.drain()
                    passes, pass_first_batch = frame.number, pipeline.batches
                    stats.end_pass(passes)
                    self._pass_done(frame.number, frame.batches)
                elif isinstance(frame, End):
                    stats.add_wire(wire)
                    break
                elif isinstance(frame, Abort):
                    raise peer_abort(frame.code, frame.message)
                else:
                    stats.add_wire(wire)
            pipeline.finish()
        except BaseException as exc:
            self.failure.set(exc)  # first error wins: if a worker failed first, that one is kept
            pipeline.abandon()
            raise
        if frame.total_pages != total_pages or frame.batches != pipeline.batches:
            raise ProtocolError(
                f"END frame reports {frame.total_pages} pages in {frame.batches} batches, "
                f"but {total_pages} pages in {pipeline.batches} batches were expected/received"
            )
        return frame

    def _verify_and_publish(self, channel: Channel, end: End) -> bytes:
        assert self.dest is not None
        self.dest.flush()
        digest = self.dest.digest(self.threads)
        if digest != end.digest:
            channel.send_frame(Result(RESULT_DIGEST_MISMATCH, digest))
            raise IntegrityError(
                f"digest mismatch: sender's image digest {end.digest.hex()}, destination hashes to {digest.hex()}"
            )
        self.dest.publish()
        self._stop_keepalive.set()
        channel.send_frame(Result(RESULT_VERIFIED, digest))
        return digest

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


def run(opts: RecvOptions) -> dict[str, Any]:
    return Receiver(opts).run()
