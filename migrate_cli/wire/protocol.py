"""The vmmig wire protocol, sans-IO: frames to bytes and bytes to frames, and which frame may come when.

Nothing here touches a socket or a thread. The transport reads a 12-byte header, asks ``parse_header`` how long
the payload is, reads it into a buffer of its own and calls ``decode_payload``; tests and fuzzers use ``Decoder``,
which does the same on a byte stream. ``Conversation`` holds the one table of which frame may follow which.
docs/PROTOCOL.md describes every byte; keep the two in step.

Every number from the wire is checked against local limits here, before any caller can use it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
from zlib_ng import zlib_ng

from ..errors import CorruptFrame, IntegrityError, ProtocolError, VersionMismatch
from .conversation import Conversation, Role
from .frames import (
    FINGERPRINT_SIZE,
    FLAG_RESUMABLE,
    FRAME_MAGIC,
    HEADER,
    HEADER_SIZE,
    MAX_ABORT_MESSAGE,
    MAX_BATCH_BYTES,
    MAX_BATCH_PAGES,
    MAX_IMAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_PAYLOAD,
    MAX_URI,
    MIN_PAGE_SIZE,
    PROTOCOL_VERSION,
    RESUME_CHUNK_PAGES,
    Abort,
    Encoding,
    End,
    Frame,
    FrameType,
    Handoff,
    HandoffDone,
    Hello,
    Keepalive,
    Pages,
    PassEnd,
    PassLanded,
    Result,
    ResumeState,
    Scattered,
    Welcome,
    is_valid_page_size,
)

# --- frame layouts ------------------------------------------------------------------------------------------------

_HELLO = struct.Struct("!HIQBBI16sHHI")
_WELCOME = struct.Struct("!HI")
_PAGES = struct.Struct("!QIBBH")
_PAGE_LIST = struct.Struct("!IBBH")
_PASS_END = struct.Struct("!II")
_PASS_LANDED = struct.Struct("!I")
_END = struct.Struct("!QQ16s")
_RESULT = struct.Struct("!B3x16s")
_ABORT = struct.Struct("!H")
_HANDOFF_DONE = struct.Struct("!B")
_RESUME_STATE = struct.Struct("!QIB3x")

# Largest payload each small frame may announce (HELLO: room for a longer HELLO of a later version, so that the
# version can still be read and named).
MAX_LENGTH: dict[FrameType, int] = {
    FrameType.HELLO: 1024,
    FrameType.WELCOME: 1024,
    FrameType.KEEPALIVE: 0,
    FrameType.PASS_END: _PASS_END.size,
    FrameType.PASS_LANDED: _PASS_LANDED.size,
    FrameType.END: _END.size,
    FrameType.RESULT: _RESULT.size,
    FrameType.ABORT: _ABORT.size + MAX_ABORT_MESSAGE,
    FrameType.HANDOFF: MAX_URI,
    FrameType.HANDOFF_DONE: _HANDOFF_DONE.size + MAX_ABORT_MESSAGE,
    # zlib's worst case for 1 MiB of incompressible fingerprints is a few hundred bytes over it
    FrameType.RESUME_STATE: _RESUME_STATE.size + RESUME_CHUNK_PAGES * 8 + 4096,
}


# --- encoding -----------------------------------------------------------------------------------------------------


def _header(
    frame_type: FrameType, parts: list[bytes | bytearray | memoryview], flags: int = 0, checked: int | None = None
) -> bytes:
    """The 12-byte header of a frame whose payload is ``parts``; its CRC covers the first ``checked`` parts (all of
    them unless said: PAGES and PAGE_LIST leave their page data to the per-page fingerprints)."""
    length = sum(len(p) for p in parts)
    head = struct.pack("!HBBI", FRAME_MAGIC, frame_type, flags, length)
    crc = zlib_ng.crc32(head)
    for part in parts[:checked]:
        crc = zlib_ng.crc32(part, crc)
    return head + struct.pack("!I", crc)


def _pages_parts(frame: Pages) -> list[bytes | bytearray | memoryview]:
    """PAGES / PAGE_LIST payload: the checked head (fields, page numbers, zero bitmap, fingerprints), then the data."""
    if len(frame.fingerprints) != FINGERPRINT_SIZE * frame.normal_count:
        raise ValueError(f"{frame.normal_count} non-zero pages with {len(frame.fingerprints)} bytes of fingerprints")
    if frame.indices is not None:
        head = _PAGE_LIST.pack(frame.count, frame.encoding, 0, 0) + frame.indices
    else:
        head = _PAGES.pack(frame.start, frame.count, frame.encoding, 0, 0)
    data = list(frame.data.parts) if isinstance(frame.data, Scattered) else [frame.data]
    return [head + frame.zero_bitmap + frame.fingerprints, *data]


def encode_parts(frame: Frame) -> list[bytes | bytearray | memoryview]:
    """Encode a frame as a list of buffers to hand to ``sendmsg`` without joining (PAGES data is not copied)."""
    parts: list[bytes | bytearray | memoryview]
    flags = 0
    match frame:
        case Hello():
            parts = [
                _HELLO.pack(
                    frame.version,
                    frame.page_size,
                    frame.image_size,
                    frame.codec,
                    frame.level,
                    frame.features,
                    frame.session_id,
                    frame.channels,
                    frame.channel_index,
                    frame.batch_pages,
                )
            ]
            frame_type = FrameType.HELLO
        case Welcome():
            parts = [_WELCOME.pack(frame.version, frame.features)]
            frame_type = FrameType.WELCOME
        case Keepalive():
            parts = []
            frame_type = FrameType.KEEPALIVE
        case Pages():
            parts = _pages_parts(frame)
            frame_type = FrameType.PAGES if frame.indices is None else FrameType.PAGE_LIST
            return [_header(frame_type, parts, checked=1), *parts]
        case PassEnd():
            parts = [_PASS_END.pack(frame.number, frame.batches)]
            frame_type = FrameType.PASS_END
        case PassLanded():
            parts = [_PASS_LANDED.pack(frame.number)]
            frame_type = FrameType.PASS_LANDED
        case End():
            parts = [_END.pack(frame.total_pages, frame.batches, frame.commitment)]
            frame_type = FrameType.END
        case Result():
            parts = [_RESULT.pack(frame.status, frame.digest)]
            frame_type = FrameType.RESULT
        case Handoff():
            parts = [frame.uri.encode()[:MAX_URI]]
            frame_type = FrameType.HANDOFF
        case HandoffDone():
            parts = [_HANDOFF_DONE.pack(frame.status) + frame.message.encode("utf-8", "replace")[:MAX_ABORT_MESSAGE]]
            frame_type = FrameType.HANDOFF_DONE
        case Abort():
            parts = [_ABORT.pack(frame.code) + frame.message.encode("utf-8", "replace")[:MAX_ABORT_MESSAGE]]
            frame_type = FrameType.ABORT
            flags = FLAG_RESUMABLE if frame.resumable else 0
        case ResumeState():
            count = len(frame.fingerprints)
            if not 1 <= count <= RESUME_CHUNK_PAGES:
                raise ValueError(f"RESUME_STATE carries 1..{RESUME_CHUNK_PAGES} fingerprints, not {count}")
            raw = np.ascontiguousarray(frame.fingerprints, dtype="<u8").tobytes()
            packed = zlib_ng.compress(raw, 1)
            if len(packed) > len(raw) + 1024:  # level 1 can grow random data by ~0.4%: store it instead
                packed = zlib_ng.compress(raw, 0)
            parts = [_RESUME_STATE.pack(frame.first, count, int(frame.last)), packed]
            frame_type = FrameType.RESUME_STATE
        case _:
            raise TypeError(f"not a frame: {frame!r}")
    return [_header(frame_type, parts, flags), *parts]


def encode(frame: Frame) -> bytes:
    return b"".join(encode_parts(frame))


# --- decoding -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    frame_type: FrameType
    length: int
    crc: int
    raw: bytes
    flags: int = 0


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Validate a 12-byte frame header; the caller then reads ``length`` payload bytes."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(data)}")
    magic, frame_type, flags, length, crc = HEADER.unpack(data)
    if magic != FRAME_MAGIC:
        if magic >> 8 == 0x16:  # a TLS handshake record
            raise ProtocolError("the peer speaks TLS: give this end --tls-cert, --tls-key and --tls-ca too")
        raise ProtocolError(f"bad frame magic 0x{magic:04x} (not a vmmig stream, or out of step)")
    try:
        kind = FrameType(frame_type)
    except ValueError:
        raise ProtocolError(f"unknown frame type 0x{frame_type:02x}") from None
    if flags != 0 and not (kind is FrameType.ABORT and flags == FLAG_RESUMABLE):
        raise ProtocolError(f"{kind.name} frame has unknown flags 0x{flags:02x}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"{kind.name} frame announces {length} payload bytes, more than the limit {MAX_PAYLOAD}")
    if length > MAX_LENGTH.get(kind, MAX_PAYLOAD):
        # Small frames have small payloads: nothing is buffered for a lie (before authentication too).
        raise ProtocolError(f"{kind.name} frame announces {length} payload bytes, at most {MAX_LENGTH[kind]} allowed")
    return Header(kind, length, crc, bytes(data[:8]), flags)


def pages_head_length(kind: FrameType, head: bytes | bytearray | memoryview) -> int:
    """The length of a PAGES or PAGE_LIST frame's head (its fields, page numbers, zero bitmap and fingerprints: all
    but the page data), as far as its first bytes ``head`` tell: read that many and ask again, until the answer
    stops growing. Read from bytes the CRC has not checked yet: callers bound it by the frame's length."""
    size = len(head)
    if kind is FrameType.PAGES:
        if size < _PAGES.size:
            return _PAGES.size
        count, offset = struct.unpack_from("!I", head, 8)[0], _PAGES.size
    else:
        if size < _PAGE_LIST.size:
            return _PAGE_LIST.size
        count = struct.unpack_from("!I", head, 0)[0]
        offset = _PAGE_LIST.size + 8 * count
    bitmap_end = offset + (count + 7) // 8
    if size < bitmap_end:
        return bitmap_end
    zeros = int.from_bytes(head[offset:bitmap_end], "little").bit_count()
    return bitmap_end + FINGERPRINT_SIZE * max(0, count - zeros)


def checked_length(header: Header, payload: bytes | bytearray | memoryview) -> int:
    """How many payload bytes the CRC covers: all of them, except in PAGES and PAGE_LIST, whose page data is checked
    page by page against the fingerprints instead (the receiver fingerprints each page it lands anyway).

    Read before the CRC is checked, so from fields that may be damaged: a damaged count or bitmap only moves the
    end of the checked range, and the CRC over it then fails (never past the payload's end)."""
    if header.frame_type not in (FrameType.PAGES, FrameType.PAGE_LIST):
        return len(payload)
    return min(len(payload), pages_head_length(header.frame_type, payload))


def check_crc(header: Header, payload: bytes | bytearray | memoryview) -> None:
    checked = checked_length(header, payload)
    crc = zlib_ng.crc32(payload[:checked], zlib_ng.crc32(header.raw))
    if crc != header.crc:
        raise CorruptFrame(f"CRC mismatch in {header.frame_type.name} frame ({len(payload)} bytes): stream corrupted")


def _need(kind: FrameType, payload: bytes | bytearray | memoryview, size: int, exact: bool = True) -> None:
    if (len(payload) != size) if exact else (len(payload) < size):
        raise ProtocolError(f"{kind.name} frame payload is {len(payload)} bytes, expected {size}")


def _check_version(kind: FrameType, payload: bytes | bytearray | memoryview) -> int:
    """HELLO's and WELCOME's first field, read before anything else: another version is refused naming both."""
    _need(kind, payload, 2, exact=False)
    (version,) = struct.unpack_from("!H", payload)
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(PROTOCOL_VERSION, version)
    return int(version)


def decode_payload(header: Header, payload: bytes | bytearray | memoryview) -> Frame:
    """Turn a CRC-checked payload into a frame, validating every field that does not need session context."""
    kind = header.frame_type
    if kind is FrameType.HELLO:
        version = _check_version(kind, payload)
        _need(kind, payload, _HELLO.size)
        fields = _HELLO.unpack(payload)
        (_, page_size, image_size, codec, level, features, session_id, channels, channel_index, batch_pages) = fields
        hello = Hello(
            page_size=page_size,
            image_size=image_size,
            codec=codec,
            level=level,
            session_id=session_id,
            batch_pages=batch_pages,
            channels=channels,
            channel_index=channel_index,
            features=features,
            version=version,
        )
        validate_hello(hello)
        return hello
    if kind is FrameType.WELCOME:
        _check_version(kind, payload)
        _need(kind, payload, _WELCOME.size)
        version, features = _WELCOME.unpack(payload)
        return Welcome(features=features, version=version)
    if kind is FrameType.KEEPALIVE:
        _need(kind, payload, 0)
        return Keepalive()
    if kind is FrameType.PAGES:
        _need(kind, payload, _PAGES.size, exact=False)
        start, count, encoding, reserved1, reserved2 = _PAGES.unpack_from(payload)
        if reserved1 or reserved2:
            raise ProtocolError("PAGES frame has non-zero reserved bytes")
        if not 1 <= count <= MAX_BATCH_PAGES:
            raise ProtocolError(f"PAGES frame has page count {count}, outside 1..{MAX_BATCH_PAGES}")
        bitmap_len = (count + 7) // 8
        _need(kind, payload, _PAGES.size + bitmap_len, exact=False)
        bitmap = bytes(payload[_PAGES.size : _PAGES.size + bitmap_len])
        if count % 8 and bitmap[-1] >> (count % 8):
            raise ProtocolError("PAGES frame zero bitmap has bits set past its page count")
        fingerprints, data = _fingerprints_and_data(kind, payload, _PAGES.size + bitmap_len, count, bitmap)
        return Pages(start, count, encoding, bitmap, data, fingerprints=fingerprints)
    if kind is FrameType.PAGE_LIST:
        _need(kind, payload, _PAGE_LIST.size, exact=False)
        count, encoding, reserved1, reserved2 = _PAGE_LIST.unpack_from(payload)
        if reserved1 or reserved2:
            raise ProtocolError("PAGE_LIST frame has non-zero reserved bytes")
        if not 1 <= count <= MAX_BATCH_PAGES:
            raise ProtocolError(f"PAGE_LIST frame has page count {count}, outside 1..{MAX_BATCH_PAGES}")
        bitmap_len = (count + 7) // 8
        offset = _PAGE_LIST.size + 8 * count
        _need(kind, payload, offset + bitmap_len, exact=False)
        indices = bytes(payload[_PAGE_LIST.size : offset])
        index_array = np.frombuffer(indices, dtype=">u8")
        if count > 1 and not bool(np.all(index_array[1:] > index_array[:-1])):
            raise ProtocolError("PAGE_LIST frame page numbers are not strictly increasing")
        bitmap = bytes(payload[offset : offset + bitmap_len])
        if count % 8 and bitmap[-1] >> (count % 8):
            raise ProtocolError("PAGE_LIST frame zero bitmap has bits set past its page count")
        fingerprints, data = _fingerprints_and_data(kind, payload, offset + bitmap_len, count, bitmap)
        return Pages(int(index_array[0]), count, encoding, bitmap, data, indices, fingerprints)
    if kind is FrameType.PASS_END:
        _need(kind, payload, _PASS_END.size)
        number, batches = _PASS_END.unpack(payload)
        return PassEnd(number=number, batches=batches)
    if kind is FrameType.PASS_LANDED:
        _need(kind, payload, _PASS_LANDED.size)
        (number,) = _PASS_LANDED.unpack(payload)
        if number == 0:
            raise ProtocolError("PASS_LANDED frame names pass 0: passes are numbered from 1")
        return PassLanded(number=number)
    if kind is FrameType.END:
        _need(kind, payload, _END.size)
        total_pages, batches, commitment = _END.unpack(payload)
        return End(total_pages=total_pages, batches=batches, commitment=commitment)
    if kind is FrameType.RESULT:
        _need(kind, payload, _RESULT.size)
        status, digest = _RESULT.unpack(payload)
        return Result(status=status, digest=digest)
    if kind is FrameType.HANDOFF:
        uri = bytes(payload).decode("utf-8", "replace")
        if not uri.startswith("tcp:") or not all(ch.isprintable() for ch in uri):
            raise ProtocolError("HANDOFF frame does not carry a tcp: URI")
        return Handoff(uri)
    if kind is FrameType.HANDOFF_DONE:
        _need(kind, payload, _HANDOFF_DONE.size, exact=False)
        (status,) = _HANDOFF_DONE.unpack_from(payload)
        text = bytes(payload[_HANDOFF_DONE.size :]).decode("utf-8", "replace")
        return HandoffDone(status, "".join(ch if ch.isprintable() else "?" for ch in text))
    if kind is FrameType.ABORT:
        _need(kind, payload, _ABORT.size, exact=False)
        if len(payload) > _ABORT.size + MAX_ABORT_MESSAGE:
            raise ProtocolError(f"ABORT message longer than {MAX_ABORT_MESSAGE} bytes")
        (code,) = _ABORT.unpack_from(payload)
        message = bytes(payload[_ABORT.size :]).decode("utf-8", "replace")
        # The peer's text reaches a terminal: keep it to one printable line.
        message = "".join(ch if ch.isprintable() else "?" for ch in message)
        return Abort(code=code, message=message, resumable=bool(header.flags & FLAG_RESUMABLE))
    if kind is FrameType.RESUME_STATE:
        _need(kind, payload, _RESUME_STATE.size, exact=False)
        first, count, last = _RESUME_STATE.unpack_from(payload)
        if not 1 <= count <= RESUME_CHUNK_PAGES or last > 1:
            raise ProtocolError(f"RESUME_STATE frame has {count} fingerprints (1..{RESUME_CHUNK_PAGES}), last={last}")
        inflater = zlib_ng.decompressobj()
        try:
            raw = inflater.decompress(bytes(payload[_RESUME_STATE.size :]), count * 8)
        except zlib_ng.error as exc:
            raise IntegrityError(f"RESUME_STATE frame does not decompress: {exc}") from None
        if len(raw) != count * 8 or inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise ProtocolError(f"RESUME_STATE frame does not hold exactly {count} fingerprints")
        return ResumeState(first, np.frombuffer(raw, dtype="<u8").astype(np.uint64), bool(last))
    raise AssertionError(f"unhandled frame type {kind!r}")


def _fingerprints_and_data(
    kind: FrameType, payload: bytes | bytearray | memoryview, offset: int, count: int, bitmap: bytes
) -> tuple[bytes, memoryview]:
    """A PAGES or PAGE_LIST frame's fingerprints (one per non-zero page) and, after them, its data."""
    normal = count - int.from_bytes(bitmap, "little").bit_count()
    end = offset + FINGERPRINT_SIZE * normal
    _need(kind, payload, end, exact=False)
    return bytes(payload[offset:end]), memoryview(payload)[end:]


def pages_wire_size(frame: Pages) -> int:
    """Bytes a PAGES or PAGE_LIST frame takes on the wire, header included (what the bandwidth cap charges)."""
    head = _PAGE_LIST.size + len(frame.indices) if frame.indices is not None else _PAGES.size
    return HEADER_SIZE + head + len(frame.zero_bitmap) + len(frame.fingerprints) + len(frame.data)


def max_pages_payload(batch_pages: int, page_size: int) -> int:
    """The largest payload a PAGES or PAGE_LIST frame of a session with this batch may carry (the receiver's buffers):
    the larger head (PAGES', or PAGE_LIST's with its 8-byte index per page), the zero bitmap, a fingerprint and the
    raw bytes of every page."""
    head = max(_PAGES.size, _PAGE_LIST.size + 8 * batch_pages)
    return head + (batch_pages + 7) // 8 + batch_pages * (FINGERPRINT_SIZE + page_size)


def validate_hello(hello: Hello) -> None:
    ps = hello.page_size
    if not is_valid_page_size(ps):
        raise ProtocolError(f"HELLO page size {ps} is not a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}")
    if hello.image_size == 0 or hello.image_size % ps or hello.image_size > MAX_IMAGE_SIZE:
        raise ProtocolError(f"HELLO image size {hello.image_size} is not a positive multiple of the page size {ps}")
    if not 1 <= hello.batch_pages <= MAX_BATCH_PAGES or hello.batch_pages * ps > MAX_BATCH_BYTES:
        raise ProtocolError(f"HELLO batch of {hello.batch_pages} pages exceeds the limits")
    if not 1 <= hello.channels <= 256 or hello.channel_index >= hello.channels:
        raise ProtocolError(f"HELLO channel {hello.channel_index} of {hello.channels} is invalid")


def validate_pages(frame: Pages, page_size: int, total_pages: int, batch_pages: int) -> None:
    """Check a PAGES frame against the session before any memory is touched."""
    if frame.count > batch_pages:
        raise ProtocolError(f"PAGES frame carries {frame.count} pages, more than the announced batch of {batch_pages}")
    if frame.indices is not None:
        last = int(np.frombuffer(frame.indices, dtype=">u8")[-1])
        if last >= total_pages:
            raise ProtocolError(f"PAGE_LIST frame names page {last}, past the image end ({total_pages} pages)")
    elif frame.start >= total_pages or frame.count > total_pages - frame.start:
        raise ProtocolError(
            f"PAGES frame covers pages {frame.start}..{frame.start + frame.count - 1}, "
            f"past the image end ({total_pages} pages)"
        )
    normal_bytes = frame.normal_count * page_size
    if frame.encoding == Encoding.RAW:
        if len(frame.data) != normal_bytes:
            raise ProtocolError(f"raw PAGES frame holds {len(frame.data)} bytes, expected {normal_bytes}")
    elif len(frame.data) > normal_bytes or (normal_bytes == 0 and len(frame.data)):
        raise ProtocolError(f"compressed PAGES frame holds {len(frame.data)} bytes for {normal_bytes} of pages")


class NeedData(Enum):
    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA


class Decoder:
    """Feed bytes, get frames: the byte-stream face of this module (tests, fuzzing, simple peers).

    ``receive_data`` only buffers; ``next_frame`` returns a frame or NEED_DATA and raises ProtocolError or
    IntegrityError on anything malformed, after which the decoder stays failed.
    """

    def __init__(self, role: Role) -> None:
        self.conversation = Conversation(role)
        self._buffer = bytearray()
        self._error: Exception | None = None

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | NeedData:
        if self._error is not None:
            raise self._error
        try:
            if len(self._buffer) < HEADER_SIZE:
                return NEED_DATA
            header = parse_header(bytes(self._buffer[:HEADER_SIZE]))
            if len(self._buffer) < HEADER_SIZE + header.length:
                return NEED_DATA
            payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + header.length])
            check_crc(header, payload)
            frame = decode_payload(header, payload)
            self.conversation.on_frame(header.frame_type)
            del self._buffer[: HEADER_SIZE + header.length]
            return frame
        except (ProtocolError, IntegrityError) as exc:
            self._error = exc
            raise

    def frames(self) -> Iterator[Frame]:
        while True:
            frame = self.next_frame()
            if frame is NEED_DATA:
                return
            assert not isinstance(frame, NeedData)
            yield frame
