"""`vmmig save`: the sender's pipeline (sender/pipeline.py) encodes the image's batches; this writes its frames to
FILE.partial (created exclusively) with a header, a PASS_END and END, the trailer and the footer, then publishes
FILE by a rename once the file is complete, synced and its header and trailer read back.

Batches come from the workers in any order; the index records where each page's frame landed in the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass

import numpy as np
from zlib_ng import zlib_ng

from ..errors import DestinationError, MigrateError
from ..failure import Failure, Stopped, get
from ..receiver.dest_checks import check_destination, partial_path
from ..safefile import create_exclusive, fsync_directory
from ..sender.options import default_batch_size
from ..sender.pipeline import RING, SendPipeline, all_ranges
from ..sender.source import SourceImage
from ..wire import codec as codecs
from ..wire.digest import end_commitment, image_digest
from ..wire.frames import End, PassEnd
from ..wire.protocol import encode_parts, pages_wire_size
from .format import (
    FOOTER_SIZE,
    HEADER_SIZE,
    Footer,
    Header,
    Trailer,
    decode_footer,
    decode_header,
    decode_trailer,
    encode_footer,
    encode_header,
    encode_trailer,
    pack_pages,
)

IOV_MAX = 1024  # buffers one writev takes


@dataclass(frozen=True)
class SaveOptions:
    image: str
    file: str
    codec: str = codecs.DEFAULT_CODEC
    level: int | None = None
    threads: int = 1
    page_size: int = 4096
    force: bool = False


@dataclass(frozen=True)
class SaveReport:
    file: str
    image_bytes: int
    file_bytes: int
    pages: int
    zero_pages: int
    frames: int
    seconds: float
    codec: str
    level: int


class _Output:
    """FILE.partial, written sequentially; its offset is where the next frame goes."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = create_exclusive(path, 0o600)
        except FileExistsError:
            raise DestinationError(f"{path} appeared while preparing (another vmmig save?)") from None
        except OSError as exc:
            raise DestinationError(f"{path}: cannot create: {exc.strerror}") from None
        self.offset = 0

    def write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        try:
            while views:
                written = os.writev(self.fd, views[:IOV_MAX])
                self.offset += written
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if written:
                    views[0] = views[0][written:]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DestinationError(f"{self.path}: no space left on device") from None
            raise DestinationError(f"{self.path}: write failed: {exc.strerror}") from None

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise DestinationError(f"{self.path}: flush failed: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def save(opts: SaveOptions) -> SaveReport:
    """Write IMAGE's snapshot to FILE; FILE appears only complete (an existing FILE is kept unless ``force``)."""
    began = time.monotonic()
    codec = codecs.by_name(opts.codec)
    level = opts.level if opts.level is not None else codec.default_level
    check_destination(opts.file, opts.force)  # FILE: a file name, not there (unless force); no leftover .partial
    with SourceImage(opts.image, opts.page_size) as source:
        batch_pages = max(1, min(default_batch_size(opts.threads, RING) // opts.page_size, source.pages))
        header = Header(opts.page_size, source.size, batch_pages, int(codec.wire_id), level)
        out = _Output(partial_path(opts.file))
        try:
            zero_pages, frames = _write(out, source, header, codec, level, opts.threads)
            out.sync()
            out.close()
            _read_back(out.path, header)
            _publish(out.path, opts.file, opts.force)
        except BaseException:
            out.close()
            with contextlib.suppress(OSError):
                os.unlink(out.path)
            raise
        file_bytes = out.offset
    return SaveReport(
        opts.file, source.size, file_bytes, source.pages, zero_pages, frames, time.monotonic() - began,
        codec.name, level,
    )  # fmt: skip


def _write(
    out: _Output, source: SourceImage, header: Header, codec: codecs.Codec, level: int, threads: int
) -> tuple[int, int]:
    """Header, one pass of frames, PASS_END, END, trailer, footer; returns (zero pages, frames)."""
    out.write([encode_header(header)])
    failure = Failure()
    pipeline = SendPipeline(source, codec, level, threads, header.batch_pages, failure)
    index = np.zeros(source.pages, dtype=np.uint64)
    ranges = all_ranges(source.pages, header.batch_pages)
    frames = zero_pages = 0
    pipeline.start()
    try:
        # Not frozen: each worker copies its pages before fingerprinting and compressing them, so every frame is
        # consistent with its fingerprints even if the image changes under us (it should not: save a quiescent image).
        pipeline.feed(ranges, frozen=False)
        for _ in ranges:
            batch = get(pipeline.out, failure)
            offset = out.offset
            for frame in batch.frames:
                index[frame.index_array()] = offset
                offset += pages_wire_size(frame)
                zero_pages += frame.zero_count
            frames += len(batch.frames)
            try:
                out.write(batch.parts)
            finally:
                if batch.release is not None:
                    batch.release()
    except Stopped:
        failure.raise_if_set()
        raise
    except BaseException as exc:
        failure.set(exc)
        raise
    finally:
        pipeline.stop()
    failure.raise_if_set()
    fingerprints = pipeline.fingerprints
    digest = image_digest(fingerprints)
    out.write(encode_parts(PassEnd(1, frames)))
    out.write(encode_parts(End(source.pages, frames, end_commitment(digest))))
    trailer_offset = out.offset
    trailer = encode_trailer(Trailer(frames, 1, pack_pages(index), pack_pages(fingerprints), digest))
    out.write([trailer, encode_footer(Footer(trailer_offset, len(trailer), zlib_ng.crc32(trailer)))])
    return zero_pages, frames


def _read_back(path: str, header: Header) -> None:
    """Read the header, footer and trailer back from the synced file: what a reader will find first."""
    where = f"snapshot {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEADER_SIZE, 0)
            footer = decode_footer(os.pread(fd, FOOTER_SIZE, size - FOOTER_SIZE), size)
            trailer = os.pread(fd, footer.trailer_length, footer.trailer_offset) if footer else b""
        finally:
            os.close(fd)
    except OSError as exc:
        raise DestinationError(f"{path}: cannot read back: {exc.strerror}") from None
    try:
        if decode_header(head, where) != header or footer is None or zlib_ng.crc32(trailer) != footer.trailer_crc:
            raise DestinationError(f"{path}: read back, it is not what was written")
        decode_trailer(trailer, footer.trailer_offset, where)
    except MigrateError as exc:
        raise DestinationError(f"{path}: read back, it is not what was written ({exc})") from None


def _publish(partial: str, file: str, force: bool) -> None:
    """Rename FILE.partial to FILE; without ``force`` a FILE that appeared meanwhile is kept (link(2) fails on it)."""
    try:
        if force:
            os.rename(partial, file)
        else:
            try:
                os.link(partial, file)
            except FileExistsError:
                raise DestinationError(f"{file} appeared while the snapshot was written: kept (use --force)") from None
            os.unlink(partial)
        fsync_directory(file)
    except OSError as exc:
        raise DestinationError(f"{file}: cannot publish: {exc.strerror}") from None
