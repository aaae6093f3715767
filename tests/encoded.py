"""Frames as a correct protocol-3 sender encodes them, for tests that check frames byte by byte or build them by hand.

``encode_batches`` runs the sender's compression workers on their own. ``fingerprinted`` fills in a hand-made PAGES
or PAGE_LIST frame's fingerprints, and ``framed`` puts the header (and its CRC) on any payload, the way protocol 3
computes it: one copy of each rule for every test and the fuzzer.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path

import numpy as np

from migrate_cli.errors import IntegrityError
from migrate_cli.failure import Failure
from migrate_cli.sender.pipeline import Batch, EncodedBatch, SendPipeline
from migrate_cli.sender.source import SourceImage
from migrate_cli.wire import codec as codecs
from migrate_cli.wire.digest import fingerprint_pages
from migrate_cli.wire.frames import FINGERPRINT_SIZE, FRAME_MAGIC, FrameType, Pages, Scattered
from migrate_cli.wire.protocol import Header, checked_length

PAGE_SIZE = 4096
# What ``fingerprinted`` puts in a frame whose data does not decode: no page can be checked against it, and no
# real page hashes to it in the tests' images.
PLACEHOLDER_FINGERPRINT = b"\xde\xad\xbe\xef" * (FINGERPRINT_SIZE // 4)


def encode_batches(
    image: Path, codec: str, batches: list[Batch], threads: int = 1, batch_pages: int = 256
) -> tuple[list[EncodedBatch], np.ndarray]:
    """``batches`` of ``image`` through a SendPipeline at level 1: the encoded batches in the order they came out,
    their parts copied to bytes, and the pipeline's page fingerprints after them."""
    with SourceImage(str(image)) as source:
        pipeline = SendPipeline(source, codecs.by_name(codec), 1, threads, batch_pages, Failure())
        pipeline.start()
        try:
            pipeline.feed(batches)
            out = []
            for _ in batches:
                batch = pipeline.out.get(timeout=10)
                batch.parts = [bytes(part) for part in batch.parts]  # raw data is a view of the worker's buffer
                if batch.release:
                    batch.release()  # the worker has few buffers: hand each back as a network thread would
                out.append(batch)
            return out, pipeline.fingerprints.copy()
        finally:
            pipeline.stop()


def page_data(frame: Pages) -> bytes:
    """A frame's data as one bytes object, however it is held."""
    parts = frame.data.parts if isinstance(frame.data, Scattered) else [frame.data]
    return b"".join(bytes(part) for part in parts)


def decoded_pages(frame: Pages, page_size: int = PAGE_SIZE) -> bytes | None:
    """The non-zero pages ``frame`` carries, decoded by its codec as a receiver does; None when its data does not
    decode to exactly those pages (garbage, a bomb, a raw batch of the wrong length, an unknown codec)."""
    codec = codecs.by_wire_id(frame.encoding)
    size = frame.normal_count * page_size
    if codec is None or not size:  # size 0 would mean "no limit" to zlib: nothing to decode anyway
        return None if codec is None or len(frame.data) else b""
    try:
        return bytes(codec.decompressor().decompress(page_data(frame), size))
    except IntegrityError:
        return None


def fingerprinted(frame: Pages, page_size: int = PAGE_SIZE) -> Pages:
    """``frame`` with the fingerprints a correct sender sends: xxh3_64 of each non-zero page, in order, taken from
    its raw pages or from its data decoded by its codec. Data that does not decode gets placeholder fingerprints of
    the right length (so the frame encodes): such a frame must be refused before any page is checked."""
    pages = decoded_pages(frame, page_size)
    if pages is None:
        return dataclasses.replace(frame, fingerprints=PLACEHOLDER_FINGERPRINT * frame.normal_count)
    fps = np.empty(frame.normal_count, dtype=np.uint64)
    fingerprint_pages(pages, page_size, fps)
    return dataclasses.replace(frame, fingerprints=fps.astype("<u8").tobytes())


def framed(frame_type: int, payload: bytes, flags: int = 0) -> bytes:
    """A frame of any type (known or not), flags and payload, with the CRC protocol 3 computes: over the header's
    first 8 bytes and the payload, except the page data of PAGES and PAGE_LIST (``protocol.checked_length``, read
    from the payload's own count and bitmap, whatever they say)."""
    head = struct.pack("!HBBI", FRAME_MAGIC, frame_type, flags, len(payload))
    checked = len(payload)
    if frame_type in (FrameType.PAGES, FrameType.PAGE_LIST):
        checked = checked_length(Header(FrameType(frame_type), len(payload), 0, head, flags), payload)
    return head + struct.pack("!I", zlib.crc32(payload[:checked], zlib.crc32(head))) + payload
