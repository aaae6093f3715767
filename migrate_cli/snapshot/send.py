"""`vmmig send snapshot:FILE HOST:PORT`: a saved snapshot's frames, sent as they are stored (docs/SNAPSHOT.md).

A snapshot holds the wire protocol's own frames, so the sender needs no compressor: before connecting, the frame
heads of FILE (and of its bases, oldest first) are walked and checked against each trailer as restore checks them
(``SnapshotSource``); then ``StoredCopy`` stands in for the sender's pipeline and copy (sender/session.py): N
workers read each chosen frame's bytes, check its CRC and every page against its fingerprint (decompressing to
check, never recompressing) and hand the very bytes to the channels (sender/transmit.py PassSender.carry). A frame
that fails a check never reaches the receiver: the run ends with SnapshotCorrupt (exit 7, the file and offset
named), which no --retries retries.

Which frames go: a frame is sent when it holds the latest copy of a page the receiver needs, and so is, in turn,
the latest copy of every page such a frame overwrites (``choose_frames``); a frame all of whose pages a later one
supersedes is skipped. The chosen frames go in file order, a PASS_END wherever the file (or the next file of the
chain) has one, so a later copy always lands after an earlier one. A resumed session needs only the pages whose
fingerprint at the receiver differs from the snapshot's.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from ..errors import IntegrityError, MigrateError, ProtocolError, SourceError
from ..failure import Failure, get, put, spawn, stop_workers
from ..net.transport import Channel
from ..ratelimit import TokenBucket
from ..sender.pipeline import EncodedBatch
from ..sender.receiver_copy import ReceiverCopy
from ..sender.reporting import SenderReport
from ..sender.transmit import PassSender
from ..stats import Stats
from ..wire import codec as codecs
from ..wire.digest import end_commitment, fingerprint_pages, image_digest, zero_fingerprint
from ..wire.frames import HEADER_SIZE as FRAME_HEADER_SIZE
from ..wire.frames import Encoding, End, Pages, PassEnd
from ..wire.protocol import Header as FrameHeader
from ..wire.protocol import check_crc, decode_payload, parse_header, validate_pages
from .format import FLAG_INCREMENTAL, SnapshotCorrupt, SnapshotTruncated, unpack_pages
from .reader import SnapshotReader


@dataclass(frozen=True, slots=True)
class StoredFrame:
    """A PAGES or PAGE_LIST frame as the walk found it."""

    index: int  # its place among every frame of the chain
    file: int  # its file's place in the chain (0: the oldest base)
    offset: int
    size: int  # header included: the bytes sent
    part: int  # the pass it belongs to, counted over the whole chain from 1
    pages: np.ndarray  # the page numbers it covers


class SnapshotSource:
    """FILE and its bases (``chain``, from restore.open_chain, the oldest first), walked and checked: what the
    sender needs in place of a mapped image (size, pages, page_size) and every frame to send. ``codec``: the
    session's, which every file's frames use or are raw (``sendable``)."""

    def __init__(self, path: str, chain: list[SnapshotReader], codec: codecs.Codec) -> None:
        self.path = path
        self.chain = chain
        newest = chain[-1].header
        self.page_size, self.size, self.pages = newest.page_size, newest.image_size, newest.pages
        self.codec = codec
        self.batch_pages = max(reader.header.batch_pages for reader in chain)
        self.frames: list[StoredFrame] = []
        parts = 0
        for number, reader in enumerate(chain):
            fingerprints, digest, parts = self._walk(number, reader, parts)
        self.fingerprints, self.digest = fingerprints, digest  # the newest file's: the whole image's
        self.latest = np.full(self.pages, -1, dtype=np.int64)  # the frame holding each page's latest copy
        for index, frame in enumerate(self.frames):
            self.latest[frame.pages] = index
        assert not (self.latest < 0).any()  # the oldest file is a full snapshot, checked to cover every page

    def _walk(self, number: int, reader: SnapshotReader, parts: int) -> tuple[np.ndarray, bytes, int]:
        """Every frame head of one file, then its trailer against them (restore.py _check_end, without the data);
        returns its fingerprints, its digest and the passes counted so far."""
        header = reader.header
        index = np.zeros(header.pages, dtype=np.uint64)
        buffer = bytearray()

        def alloc(frame_header: FrameHeader) -> memoryview:
            nonlocal buffer
            if len(buffer) < frame_header.length:
                buffer = bytearray(frame_header.length)
            return memoryview(buffer)[: frame_header.length]

        passes = carried = frames = 0
        while True:
            at = reader.offset
            frame, size = reader.read_frame(alloc, head_only=True)
            if isinstance(frame, Pages):
                try:
                    validate_pages(frame, header.page_size, header.pages, header.batch_pages)
                except ProtocolError as exc:
                    raise reader.corrupt(str(exc), at) from None
                pages = frame.index_array()
                index[pages] = at
                self.frames.append(StoredFrame(len(self.frames), number, at, size, parts + passes + 1, pages))
                carried += 1
                frames += 1
            elif isinstance(frame, PassEnd):
                if frame.number != passes + 1 or frame.batches != carried:
                    raise reader.corrupt(
                        f"PASS_END {frame.number} of {frame.batches} batches, after pass {passes} and {carried}", at
                    )
                passes, carried = passes + 1, 0
            elif isinstance(frame, End):
                end, end_at = frame, at
                break
        if carried or not passes or end.total_pages != header.pages or end.batches != frames:
            raise reader.corrupt(
                f"END reports {end.total_pages} pages in {end.batches} frames after {passes} passes; the header says "
                f"{header.pages} pages, {frames} frames were read",
                end_at,
            )
        missing = np.flatnonzero(index == 0)
        if missing.size and not header.flags & FLAG_INCREMENTAL:
            raise reader.corrupt(f"page {int(missing[0])} (and {missing.size - 1} more) is in no frame", end_at)
        trailer = reader.read_trailer()
        at = f"{reader.where}: trailer at offset {reader.offset}"
        if trailer.frames != frames or trailer.passes != passes:
            raise SnapshotCorrupt(f"{at}: counts {trailer.frames} frames in {trailer.passes} passes, read {frames}")
        if not np.array_equal(unpack_pages(trailer.index, header.pages, "index", at), index):
            raise SnapshotCorrupt(f"{at}: the index does not point at each page's latest copy")
        fingerprints = unpack_pages(trailer.fingerprints, header.pages, "fingerprint list", at)
        if image_digest(fingerprints) != trailer.digest or end_commitment(trailer.digest) != end.commitment:
            raise SnapshotCorrupt(f"{at}: the digest does not match the fingerprints")
        return fingerprints, trailer.digest, parts + passes

    def check_size(self) -> None:
        """The sender asks a mapped source this; a snapshot's frames are read with pread, checked one by one."""

    def close(self) -> None:
        for reader in self.chain:
            reader.close()


def choose_frames(source: SnapshotSource, needed: np.ndarray) -> np.ndarray:
    """Which frames to send (a bool per frame) so that every ``needed`` page ends up holding its latest copy: the
    frame with the latest copy of each, and then, for every page a chosen frame writes, its latest copy too (an
    earlier copy in a chosen frame would otherwise be the last to land)."""
    chosen = np.zeros(len(source.frames), dtype=bool)
    needed = needed.copy()
    while True:
        fresh = np.unique(source.latest[needed])
        fresh = fresh[~chosen[fresh]]
        if not fresh.size:
            return chosen
        chosen[fresh] = True
        needed[:] = False
        for index in fresh:
            needed[source.frames[index].pages] = True


_DONE = None


class StoredCopy:
    """The sender's pipeline and copy for a snapshot source (the interface sender/session.py uses of SendPipeline
    and copy_modes.Copy): passes of stored frames, each checked by a worker before it goes out."""

    def __init__(
        self, source: SnapshotSource, channels: list[Channel], bucket: TokenBucket, stats: Stats, failure: Failure,
        threads: int, sent: ReceiverCopy, reporter: SenderReport,
    ) -> None:  # fmt: skip
        self.source, self.channels, self.bucket, self.stats = source, channels, bucket, stats
        self.failure, self.threads, self.sent, self.reporter = failure, threads, sent, reporter
        self.batch_pages = source.batch_pages
        self.out: queue.Queue[EncodedBatch] = queue.Queue(maxsize=threads * 2)
        self._work: queue.Queue[StoredFrame | None] = queue.Queue(maxsize=threads * 4)
        self._workers: list[threading.Thread] = []
        self._reader: threading.Thread | None = None
        self._zero_fp = np.uint64(zero_fingerprint(source.page_size))
        self.batches_sent = 0
        self.live = None  # the interface of copy_modes.Copy: no pre-copy, nothing to steer
        self.precopy = None

    # -- the pipeline face ----------------------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.threads):
            self._workers.append(spawn(f"check-{i}", self._worker, self.failure))

    def feed(self, frames: list[StoredFrame]) -> None:
        if self._reader is not None:
            self._reader.join()
        self._reader = spawn("reader", lambda: [put(self._work, f, self.failure) for f in frames], self.failure)

    def stop(self, timeout: float = 5.0) -> None:
        stop_workers(self._work, self._workers, self.failure, self._reader, timeout)

    # -- the copy face --------------------------------------------------------------------------------------------

    def run(self, policy: object, resuming: bool) -> bytes:
        """Every chosen frame, a pass per stored pass; returns the snapshot's digest (END commits to it)."""
        source = self.source
        # A resumed session: RESUME_STATE put what the receiver holds into ``sent``.
        needed = source.fingerprints != self.sent.as_array() if resuming else np.ones(source.pages, dtype=bool)
        chosen = choose_frames(source, needed)
        frames = [frame for frame, take in zip(source.frames, chosen, strict=True) if take]
        passes = [list(group) for _, group in groupby(frames, key=lambda frame: frame.part)] or [[]]
        transmit = PassSender(self.channels, self, source, self.bucket, self.stats, self.failure, None)  # type: ignore[arg-type]
        for number, group in enumerate(passes, start=1):
            page_count = sum(frame.pages.size for frame in group)
            self.stats.begin_pass(number, page_count * source.page_size)
            started = time.monotonic()
            self.sent.begin_pass()
            self.feed(group)
            self.reporter.on_pass(transmit.carry(number, len(group), page_count, started))
            self.batches_sent += transmit.batches
        if self.sent.digest() != source.digest:
            raise SnapshotCorrupt(f"snapshot {source.path}: its frames do not add up to the digest its trailer holds")
        return source.digest

    def blame_source(self, error: MigrateError | None) -> MigrateError | None:
        """Every frame was checked before it went out: a page the receiver finds wrong was damaged on the link."""
        return None

    # -- the workers ----------------------------------------------------------------------------------------------

    def _worker(self) -> None:
        decompressor = self.source.codec.decompressor()
        while (frame := get(self._work, self.failure)) is not _DONE:
            put(self.out, self._check(frame, decompressor), self.failure)

    def _check(self, stored: StoredFrame, decompressor: codecs.Decompressor) -> EncodedBatch:
        """Read one frame's bytes, check them as the receiver will, and record what the receiver will hold."""
        source = self.source
        reader = source.chain[stored.file]
        ps = source.page_size
        raw = _pread(reader, stored.size, stored.offset)
        try:
            header = parse_header(raw[:FRAME_HEADER_SIZE])
            payload = memoryview(raw)[FRAME_HEADER_SIZE:]
            if header.length != len(payload):
                raise ProtocolError(f"its length changed since it was read ({header.length}, not {len(payload)})")
            check_crc(header, payload)
            frame = decode_payload(header, payload)
            if not isinstance(frame, Pages):
                raise ProtocolError(f"a {header.frame_type.name} frame where a PAGES frame was read")
            validate_pages(frame, ps, source.pages, reader.header.batch_pages)
            pages = frame.index_array()
            if not np.array_equal(pages, stored.pages):
                raise ProtocolError("it covers other pages than when the file was first read (the file changed)")
            if frame.encoding not in (Encoding.RAW, source.codec.wire_id):
                raise ProtocolError(f"it uses codec id {frame.encoding}, not the {source.codec.name} its header names")
            zero = np.unpackbits(np.frombuffer(frame.zero_bitmap, dtype=np.uint8), bitorder="little")[: frame.count]
            fingerprints = np.full(frame.count, self._zero_fp, dtype=np.uint64)
            if frame.normal_count:
                size = frame.normal_count * ps
                data = frame.data if frame.encoding == Encoding.RAW else decompressor.decompress(frame.data, size)
                found = np.empty(frame.normal_count, dtype=np.uint64)
                fingerprint_pages(np.frombuffer(data, dtype=np.uint8), ps, found)
                expected = frame.fingerprint_array()
                if (wrong := np.flatnonzero(found != expected)).size:
                    page = int(pages[np.flatnonzero(zero == 0)[wrong[0]]])
                    raise IntegrityError(f"page {page} does not match its fingerprint ({wrong.size} pages differ)")
                fingerprints[zero == 0] = found
            own = source.latest[pages] == stored.index  # the pages whose latest copy this is
            if (bad := np.flatnonzero(fingerprints[own] != source.fingerprints[pages[own]])).size:
                page = int(pages[own][bad[0]])
                raise IntegrityError(f"page {page}'s latest copy does not match the trailer's fingerprint")
        except (ProtocolError, IntegrityError) as exc:
            if isinstance(exc, SnapshotCorrupt):
                raise
            raise SnapshotCorrupt(f"{reader.where}: frame at offset {stored.offset}: {exc}") from None
        self.sent.record(pages, fingerprints)
        return _Stored(frame, raw)


class _Stored(EncodedBatch):
    """A stored frame as it goes on the wire: the file's bytes, not re-encoded."""

    def __init__(self, frame: Pages, raw: bytes) -> None:  # no dataclass __init__: parts are the stored bytes
        self.frames = [frame]
        self.release = None
        self.parts = [raw]


def sendable(chain: list[SnapshotReader], codec: codecs.Codec) -> bool:
    """Whether the chain's frames can go as they are in a session of ``codec`` (each file's codec is that codec or
    raw: the receiver takes raw frames and those of the codec HELLO announced)."""
    return all(reader.header.codec in (codec.wire_id, Encoding.RAW) for reader in chain)


def _pread(reader: SnapshotReader, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``; a file cut short since it was walked is truncated (exit 3)."""
    try:
        data = os.pread(reader.fd, size, offset)
        while len(data) < size and (more := os.pread(reader.fd, size - len(data), offset + len(data))):
            data += more
    except OSError as exc:
        raise SourceError(f"{reader.where}: read failed at offset {offset}: {exc.strerror}") from None
    if len(data) < size:
        raise SnapshotTruncated(f"{reader.where}: truncated: the file ends at {offset + len(data)}")
    return data
