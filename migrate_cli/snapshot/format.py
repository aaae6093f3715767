"""The snapshot file format, sans-IO: header, trailer and footer to bytes and back, and the error a reader raises.

A snapshot is the frame stream of a migration at rest (docs/SNAPSHOT.md, byte by byte):

    header (64 bytes) | PAGES / PAGE_LIST frames, PASS_END after each pass, END | trailer | footer (32 bytes)

The frames are the wire protocol's own (wire/protocol.py), checked the same way (CRC over all but page data, each
page against its fingerprint). The trailer holds the index (for each page, where its latest copy lies), every
page's fingerprint and the image digest; the footer, at the file's end, says where the trailer is. The snapshot
format has its own version, independent of the wire protocol's.

Every number read here is checked before a caller can use it: a header or trailer that lies is refused, never
allocated for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from zlib_ng import zlib_ng

from ..errors import IntegrityError, SourceError
from ..wire.frames import MAX_BATCH_BYTES, MAX_BATCH_PAGES, MAX_IMAGE_SIZE, is_valid_page_size

SNAPSHOT_VERSION = 1

HEADER_MAGIC = b"VMMIGSNP"
TRAILER_MAGIC = b"VMMIGTRL"
FOOTER_MAGIC = b"VMMIGEND"

# magic, version, flags, page size, image size, batch pages, codec, level, reserved, base digest, reserved, crc32
HEADER = struct.Struct("!8sHHIQIBBH16s12sI")
# magic, frames, passes, reserved, index length, fingerprints length, sections length, digest
TRAILER = struct.Struct("!8sQIIQQQ16s")
# magic, trailer offset, trailer length, crc32 of the trailer, crc32 of the footer's first 28 bytes
FOOTER = struct.Struct("!8sQQII")

HEADER_SIZE = HEADER.size  # 64
TRAILER_HEAD_SIZE = TRAILER.size  # 64
FOOTER_SIZE = FOOTER.size  # 32
NO_BASE = bytes(16)  # base digest of a full snapshot (an incremental one names its base's)
FLAG_INCREMENTAL = 1  # header flag: pages at index 0 are in the base the header's base digest names
FLAG_DEVICE_STATE = 2  # header flag: the trailer holds QEMU's device state (SECTION_QDEV)
KNOWN_FLAGS = FLAG_INCREMENTAL | FLAG_DEVICE_STATE
SECTION = struct.Struct("!4sI")  # a trailer section: tag, length, then that many bytes
SECTION_BASE = b"BASE"  # an incremental snapshot's base: its path relative to this file's directory, UTF-8
MAX_BASE_PATH = 4096
SECTION_QDEV = b"QDEV"  # QEMU's device-state stream (migrate with x-ignore-shared), as QEMU wrote it
MAX_DEVICE_STATE = 1 << 30  # bytes; QEMU's device state without shared RAM is a few hundred KB (VGA RAM: 16 MiB)
SECTION_LIMITS = {SECTION_BASE: MAX_BASE_PATH, SECTION_QDEV: MAX_DEVICE_STATE}


class SnapshotTruncated(SourceError):
    """The file ends before the snapshot does (exit 3): copied short, or still being written."""


class SnapshotForeign(SourceError):
    """Not a vmmig snapshot, or one of a later format version (exit 3)."""


class SnapshotCorrupt(IntegrityError):
    """The file is whole but its bytes are wrong (exit 7): a CRC, a fingerprint, the index or the digest fails."""


@dataclass(frozen=True, slots=True)
class Header:
    page_size: int
    image_size: int
    batch_pages: int
    codec: int  # Encoding id of the codec the frames use (a frame may still be RAW)
    level: int
    flags: int = 0
    base_digest: bytes = NO_BASE
    version: int = SNAPSHOT_VERSION

    @property
    def pages(self) -> int:
        return self.image_size // self.page_size


@dataclass(frozen=True, slots=True)
class Trailer:
    frames: int  # PAGES and PAGE_LIST frames in the body
    passes: int
    index: bytes  # zlib of one little-endian u64 per page: the offset of the frame holding its latest copy
    fingerprints: bytes  # zlib of one little-endian u64 per page: its fingerprint (wire/digest.py)
    digest: bytes  # image_digest of the fingerprints
    sections: bytes = b""  # tagged sections (``encode_sections``): an incremental snapshot's base path


@dataclass(frozen=True, slots=True)
class Footer:
    trailer_offset: int
    trailer_length: int
    trailer_crc: int


def encode_header(header: Header) -> bytes:
    head = HEADER.pack(
        HEADER_MAGIC, header.version, header.flags, header.page_size, header.image_size, header.batch_pages,
        header.codec, header.level, 0, header.base_digest, bytes(12), 0,
    )  # fmt: skip
    return head[:-4] + struct.pack("!I", zlib_ng.crc32(head[:-4]))


def decode_header(data: bytes, where: str) -> Header:
    """The header from the file's first bytes; ``where`` names the file in errors."""
    if len(data) < 8 or data[:8] != HEADER_MAGIC:
        raise SnapshotForeign(f"{where}: not a vmmig snapshot (no {HEADER_MAGIC.decode()} magic at offset 0)")
    if len(data) < HEADER_SIZE:
        raise SnapshotTruncated(f"{where}: truncated: the file ends at offset {len(data)}, inside the header")
    _, version, flags, page_size, image_size, batch_pages, codec, level, reserved, base, reserved2, crc = HEADER.unpack(
        data[:HEADER_SIZE]
    )
    if zlib_ng.crc32(data[: HEADER_SIZE - 4]) != crc:
        raise SnapshotCorrupt(f"{where}: header at offset 0: CRC mismatch")
    if version != SNAPSHOT_VERSION:
        raise SnapshotForeign(
            f"{where}: snapshot format version {version}; this vmmig reads version {SNAPSHOT_VERSION}"
        )
    incremental = bool(flags & FLAG_INCREMENTAL)
    if flags & ~KNOWN_FLAGS or reserved or reserved2 != bytes(12) or (base != NO_BASE) != incremental:
        raise SnapshotForeign(f"{where}: header at offset 0 uses features this vmmig does not know (flags {flags:#x})")
    if not is_valid_page_size(page_size):
        raise SnapshotCorrupt(f"{where}: header at offset 0: page size {page_size} is not a valid page size")
    if image_size == 0 or image_size % page_size or image_size > MAX_IMAGE_SIZE:
        raise SnapshotCorrupt(f"{where}: header at offset 0: image size {image_size} is not a whole number of pages")
    if not 1 <= batch_pages <= MAX_BATCH_PAGES or batch_pages * page_size > MAX_BATCH_BYTES:
        raise SnapshotCorrupt(f"{where}: header at offset 0: batch of {batch_pages} pages exceeds the limits")
    return Header(page_size, image_size, batch_pages, codec, level, flags, base, version)


def encode_trailer(trailer: Trailer) -> bytes:
    head = TRAILER.pack(
        TRAILER_MAGIC, trailer.frames, trailer.passes, 0, len(trailer.index), len(trailer.fingerprints),
        len(trailer.sections), trailer.digest,
    )  # fmt: skip
    return head + trailer.index + trailer.fingerprints + trailer.sections


def decode_trailer(data: bytes, offset: int, where: str) -> Trailer:
    """The trailer from its bytes (the footer gave their length and CRC, checked by the caller)."""
    at = f"{where}: trailer at offset {offset}"
    if len(data) < TRAILER_HEAD_SIZE or data[:8] != TRAILER_MAGIC:
        raise SnapshotCorrupt(f"{at}: no {TRAILER_MAGIC.decode()} magic")
    _, frames, passes, reserved, index_len, fps_len, sections_len, digest = TRAILER.unpack_from(data)
    if reserved:
        raise SnapshotCorrupt(f"{at}: non-zero reserved field")
    if TRAILER_HEAD_SIZE + index_len + fps_len + sections_len != len(data):
        raise SnapshotCorrupt(
            f"{at}: its lengths ({index_len} + {fps_len} + {sections_len}) do not add up to its {len(data)} bytes"
        )
    index = data[TRAILER_HEAD_SIZE : TRAILER_HEAD_SIZE + index_len]
    fingerprints = data[TRAILER_HEAD_SIZE + index_len : TRAILER_HEAD_SIZE + index_len + fps_len]
    sections = data[TRAILER_HEAD_SIZE + index_len + fps_len :]
    decode_sections(sections, at)  # refuse what this vmmig does not know before anything is applied
    return Trailer(frames, passes, index, fingerprints, digest, sections)


def encode_sections(sections: dict[bytes, bytes]) -> bytes:
    return b"".join(SECTION.pack(tag, len(value)) + value for tag, value in sections.items())


def decode_sections(data: bytes, at: str) -> dict[bytes, bytes]:
    """The trailer's sections by tag: each known, once, with a length inside the trailer."""
    found: dict[bytes, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + SECTION.size > len(data):
            raise SnapshotCorrupt(f"{at}: a section head runs past the trailer's end")
        tag, length = SECTION.unpack_from(data, offset)
        offset += SECTION.size
        if tag not in SECTION_LIMITS:
            raise SnapshotForeign(f"{at}: carries a section this vmmig does not know ({tag!r})")
        if tag in found or length > SECTION_LIMITS[tag] or offset + length > len(data):
            raise SnapshotCorrupt(f"{at}: a {tag.decode()} section of {length} bytes does not fit or repeats")
        found[tag] = data[offset : offset + length]
        offset += length
    return found


def base_path(header: Header, trailer: Trailer, at: str) -> str | None:
    """An incremental snapshot's base path as recorded (relative to its directory); None for a full snapshot."""
    value = decode_sections(trailer.sections, at).get(SECTION_BASE)
    if (value is None) != (header.flags & FLAG_INCREMENTAL == 0):
        raise SnapshotCorrupt(f"{at}: the base path section and the header's incremental flag disagree")
    if value is None:
        return None
    try:
        path = value.decode()
    except UnicodeDecodeError:
        raise SnapshotCorrupt(f"{at}: the base path is not UTF-8") from None
    if not path or "\0" in path:
        raise SnapshotCorrupt(f"{at}: the base path is empty or holds a NUL")
    return path


def device_state(header: Header, trailer: Trailer, at: str) -> bytes | None:
    """QEMU's device state as saved (``save --qemu-handoff``); None when the snapshot holds RAM only."""
    value = decode_sections(trailer.sections, at).get(SECTION_QDEV)
    if (value is None) != (header.flags & FLAG_DEVICE_STATE == 0):
        raise SnapshotCorrupt(f"{at}: the device state section and the header's device-state flag disagree")
    if value is not None and not value:
        raise SnapshotCorrupt(f"{at}: the device state section is empty")
    return value


def encode_footer(footer: Footer) -> bytes:
    head = FOOTER.pack(FOOTER_MAGIC, footer.trailer_offset, footer.trailer_length, footer.trailer_crc, 0)
    return head[:-4] + struct.pack("!I", zlib_ng.crc32(head[:-4]))


def decode_footer(data: bytes, file_size: int) -> Footer | None:
    """The footer from the file's last 32 bytes, or None when they are not a consistent footer (a truncated file
    has none: the caller then finds the trailer by walking the frames)."""
    if len(data) != FOOTER_SIZE or data[:8] != FOOTER_MAGIC:
        return None
    _, offset, length, trailer_crc, crc = FOOTER.unpack(data)
    if zlib_ng.crc32(data[:-4]) != crc or offset < HEADER_SIZE or offset + length + FOOTER_SIZE != file_size:
        return None
    return Footer(offset, length, trailer_crc)


def pack_pages(values: np.ndarray) -> bytes:
    """An index or fingerprint array as the trailer stores it: little-endian u64 per page, zlib level 1."""
    return zlib_ng.compress(np.ascontiguousarray(values, dtype="<u8").tobytes(), 1)


def unpack_pages(data: bytes, pages: int, what: str, at: str) -> np.ndarray:
    """The inverse of ``pack_pages``: exactly ``pages`` values, or SnapshotCorrupt (never more memory than that)."""
    inflater = zlib_ng.decompressobj()
    try:
        raw = inflater.decompress(data, pages * 8)
        extra = inflater.decompress(inflater.unconsumed_tail, 1) if inflater.unconsumed_tail else b""
    except zlib_ng.error as exc:
        raise SnapshotCorrupt(f"{at}: the {what} does not decompress: {exc}") from None
    if len(raw) != pages * 8 or extra or not inflater.eof or inflater.unused_data:
        raise SnapshotCorrupt(f"{at}: the {what} does not hold exactly {pages} entries")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
