"""Reading a snapshot: its header and footer, then its frames one by one, as a network channel reads a socket.

``SnapshotReader.read_frame`` / ``read_data`` / ``land_data`` are the calls the receiver's pipeline makes on a
channel (net/transport.py Channel, receiver/pipeline.py RecvPipeline.receive), so restore feeds the receiver's own
decode path from a file. Every frame is checked as on the wire (parse_header's limits, the CRC, decode_payload)
and every error names the frame and its file offset.

Truncated or corrupt? The footer decides: when the file's last 32 bytes are a consistent footer, the file is whole
and anything that runs past the end of the frames is corruption (exit 7); without one, a frame that runs past the
end of the file is a truncated file (exit 3).
"""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Callable
from dataclasses import replace

from zlib_ng import zlib_ng

from ..errors import IntegrityError, ProtocolError, SourceError
from ..wire.frames import HEADER_SIZE as FRAME_HEADER_SIZE
from ..wire.frames import Frame, FrameType, Pages, Unread
from ..wire.protocol import Header as FrameHeader
from ..wire.protocol import check_crc, decode_payload, pages_head_length, parse_header
from .format import (
    FOOTER_SIZE,
    HEADER_SIZE,
    TRAILER,
    TRAILER_HEAD_SIZE,
    TRAILER_MAGIC,
    Footer,
    Header,
    SnapshotCorrupt,
    SnapshotTruncated,
    Trailer,
    decode_footer,
    decode_header,
    decode_trailer,
)

BODY_FRAMES = (FrameType.PAGES, FrameType.PAGE_LIST, FrameType.PASS_END, FrameType.END)
MAX_TRAILER = 1 << 40  # bytes; a trailer holds 16 bytes a page before compression at most (plus zlib's overhead)


class SnapshotReader:
    """An open snapshot: ``header`` read and checked, ``footer`` when the file has a consistent one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = f"snapshot {path}"
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"{self.where}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{self.where}: cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{self.where}: not a regular file")
            self.size = st.st_size
            self.header: Header = decode_header(self._pread(HEADER_SIZE, 0), self.where)
            tail = self._pread(FOOTER_SIZE, self.size - FOOTER_SIZE) if self.size >= HEADER_SIZE + FOOTER_SIZE else b""
            self.footer: Footer | None = decode_footer(tail, self.size)
            # Each page is at least one bit of some frame's zero bitmap: a header announcing more pages than the
            # file has bits lies, and is refused before anything is allocated for them.
            if self.header.pages > self.size * 8:
                raise SnapshotCorrupt(
                    f"{self.where}: header at offset 0 announces {self.header.pages} pages, more than a "
                    f"{self.size}-byte file can describe"
                )
        except BaseException:
            os.close(self.fd)
            raise
        self.end = self.footer.trailer_offset if self.footer else self.size  # where the frames must end
        self.offset = HEADER_SIZE  # of the next frame
        self.frame_number = 0  # of the next frame, counted from 1
        self.frame_offsets: list[int] = []  # of every frame read, in order (for naming a frame by its offset)
        self._data = memoryview(b"")
        self._data_at = 0

    # -- the channel face (receiver/pipeline.py) ------------------------------------------------------------------

    def read_frame(
        self, alloc: Callable[[FrameHeader], memoryview] | None = None, head_only: bool = False
    ) -> tuple[Frame, int]:
        """The next frame (a PAGES or PAGE_LIST frame up to its data, which stays Unread), and its size in the file."""
        self.frame_number += 1
        at = self.offset
        self.frame_offsets.append(at)
        raw = self._read_body(FRAME_HEADER_SIZE, at, "its header")
        try:
            header = parse_header(raw)
            if header.frame_type not in BODY_FRAMES:
                raise ProtocolError(f"a {header.frame_type.name} frame has no place in a snapshot")
            size = FRAME_HEADER_SIZE + header.length
            self._check_room(at, size)
            pages = header.frame_type in (FrameType.PAGES, FrameType.PAGE_LIST)
            payload = alloc(header) if pages and alloc is not None else memoryview(bytearray(header.length))
            if pages:
                got = 0
                while got < (need := min(header.length, pages_head_length(header.frame_type, payload[:got]))):
                    payload[got:need] = self._read_body(need - got, at + FRAME_HEADER_SIZE + got, "its head")
                    got = need
                check_crc(header, payload[:got])
                frame = decode_payload(header, payload[:got])
                assert isinstance(frame, Pages)
                self._data, self._data_at = payload[got:], at + FRAME_HEADER_SIZE + got
                frame = replace(frame, data=Unread(header.length - got))
            else:
                payload[:] = self._read_body(header.length, at + FRAME_HEADER_SIZE, "its payload")
                frame = decode_payload(header, payload)
        except (ProtocolError, IntegrityError) as exc:
            if isinstance(exc, SnapshotCorrupt | SnapshotTruncated):
                raise
            raise self.corrupt(str(exc), at) from None
        self.offset = at + size
        return frame, size

    def read_data(self) -> memoryview:
        """The data of the PAGES frame ``read_frame`` just returned, read into its payload buffer."""
        data, self._data = self._data, memoryview(b"")
        if len(data):
            if self._data_at + len(data) > self.end:
                self._past_end(self.frame_offsets[-1], self._data_at + len(data), "reading its data")
            self._pread_into(data, self._data_at)  # straight into the pool buffer: no bytes object, no copy
        return data

    def land_data(self, fd: int, runs: list[tuple[int, int]], fallback: Callable[[bytes, int], None]) -> bool:
        """No splicing from a file: the pipeline reads the data into its buffer (``read_data``)."""
        return False

    # -- after END ------------------------------------------------------------------------------------------------

    def read_trailer(self) -> Trailer:
        """The trailer, which must start where END ended and be the one the footer names."""
        at = self.offset
        if self.footer is None:
            # No consistent footer: a file cut short in its trailer, or a damaged footer on a whole file.
            # The trailer's head says how long the trailer is: a file that ends before trailer and footer is cut.
            expected = at + TRAILER_HEAD_SIZE + FOOTER_SIZE
            if self.size >= at + TRAILER_HEAD_SIZE:
                head = self._pread(TRAILER_HEAD_SIZE, at)
                if head[:8] == TRAILER_MAGIC:
                    _, _, _, _, index_len, fps_len, sections_len, _ = TRAILER.unpack(head)
                    expected += index_len + fps_len + sections_len
            if self.size < expected:
                raise SnapshotTruncated(
                    f"{self.where}: truncated: the file ends at {self.size}, in the trailer at offset {at}"
                )
            raise self.corrupt("no valid footer at the end of the file", self.size - FOOTER_SIZE, "footer")
        if self.footer.trailer_offset != at:
            raise self.corrupt(f"the footer puts the trailer at {self.footer.trailer_offset}, END ends at {at}", at,
                               "trailer")  # fmt: skip
        length = self.footer.trailer_length
        if length > MAX_TRAILER:
            raise self.corrupt(f"the footer announces a trailer of {length} bytes", at, "trailer")
        data = self._pread(length, at)
        if zlib_ng.crc32(data) != self.footer.trailer_crc:
            raise self.corrupt("CRC mismatch", at, "trailer")
        return decode_trailer(data, at, self.where)

    def footer_trailer(self) -> Trailer:
        """The trailer the footer names, without walking the frames (an incremental save's base, a chain's link);
        a restore still walks them and checks the trailer against what they hold."""
        if self.footer is None:
            raise SnapshotTruncated(f"{self.where}: truncated or damaged: no valid footer at the end of the file")
        at, length = self.footer.trailer_offset, self.footer.trailer_length
        if length > MAX_TRAILER:
            raise self.corrupt(f"the footer announces a trailer of {length} bytes", at, "trailer")
        data = self._pread(length, at)
        if zlib_ng.crc32(data) != self.footer.trailer_crc:
            raise self.corrupt("CRC mismatch", at, "trailer")
        return decode_trailer(data, at, self.where)

    # -- errors ---------------------------------------------------------------------------------------------------

    def corrupt(self, message: str, offset: int, what: str | None = None) -> SnapshotCorrupt:
        """The error for damage at ``offset``, naming the frame that holds it (or ``what``, outside the frames)."""
        if what is None:
            what = f"frame {self.frame_at(offset)}"
        return SnapshotCorrupt(f"{self.where}: {what} at offset {offset}: {message}")

    def frame_at(self, offset: int) -> int:
        """The number (from 1) of the frame read at or before ``offset``."""
        return max(1, bisect.bisect_right(self.frame_offsets, offset))

    def frame_offset(self, number: int) -> int:
        return self.frame_offsets[number - 1]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reading --------------------------------------------------------------------------------------------------

    def _check_room(self, at: int, size: int) -> None:
        if at + size > self.end:
            self._past_end(at, at + size, f"which announces {size} bytes")

    def _read_body(self, size: int, offset: int, what: str) -> bytes:
        """``size`` bytes of the frame at ``self.frame_offsets[-1]``, from ``offset``, within the frames."""
        if offset + size > self.end:
            self._past_end(self.frame_offsets[-1], offset + size, f"reading {what}")
        return self._pread(size, offset)

    def _past_end(self, at: int, needed: int, doing: str) -> None:
        frame = f"frame {self.frame_number} at offset {at}"
        if self.footer is None:
            raise SnapshotTruncated(
                f"{self.where}: truncated: the file ends at {self.size}, inside {frame} ({doing}, up to {needed})"
            )
        raise SnapshotCorrupt(
            f"{self.where}: {frame}: runs past the end of the frames at {self.end} ({doing}, up to {needed})"
        )

    def _pread(self, size: int, offset: int) -> bytes:
        chunks, done = [], 0
        try:
            while done < size:
                chunk = os.pread(self.fd, min(size - done, 1 << 24), offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        except OSError as exc:
            raise SourceError(f"{self.where}: read failed at offset {offset + done}: {exc.strerror}") from None
        data = b"".join(chunks)
        if len(data) < size:  # the file shrank since it was opened
            raise SnapshotTruncated(f"{self.where}: truncated: the file ends at {offset + len(data)}")
        return data

    def _pread_into(self, buffer: memoryview, offset: int) -> None:
        done = 0
        try:
            while done < len(buffer):
                got = os.preadv(self.fd, [buffer[done:]], offset + done)
                if not got:
                    raise SnapshotTruncated(f"{self.where}: truncated: the file ends at {offset + done}")
                done += got
        except OSError as exc:
            raise SourceError(f"{self.where}: read failed at offset {offset + done}: {exc.strerror}") from None

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
