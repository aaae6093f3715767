"""Spec of the frames the sender's workers produce (send_pipeline.py), checked on bytes: every frame decodes, CRC and
all, and the frames of a batch carry exactly its pages, whether the batch went out whole or cut into runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from migrate_cli.sender.pipeline import Batch, EncodedBatch
from migrate_cli.wire import codec as codecs
from migrate_cli.wire.frames import HEADER_SIZE, Encoding, Pages
from migrate_cli.wire.protocol import check_crc, decode_payload, parse_header

from .conftest import make_image
from .encoded import encode_batches

PAGE = 4096


def encode(image: Path, codec: str, batches: list[Batch]) -> list[EncodedBatch]:
    return encode_batches(image, codec, batches)[0]


def decode(parts: list[bytes]) -> list[Pages]:
    stream, frames = b"".join(parts), []
    while stream:
        header = parse_header(stream[:HEADER_SIZE])
        payload = stream[HEADER_SIZE : HEADER_SIZE + header.length]
        check_crc(header, payload)
        frame = decode_payload(header, payload)
        assert isinstance(frame, Pages)
        frames.append(frame)
        stream = stream[HEADER_SIZE + header.length :]
    return frames


def pages_carried(frame: Pages) -> dict[int, bytes]:
    """Page number -> content, as a receiver would place them."""
    zero = np.unpackbits(np.frombuffer(frame.zero_bitmap, dtype=np.uint8), count=frame.count, bitorder="little")
    size = frame.normal_count * PAGE
    data = bytes(frame.data)
    if frame.encoding != Encoding.RAW:
        codec = codecs.by_wire_id(frame.encoding)
        assert codec is not None
        data = codec.decompressor().decompress(data, size)
    assert len(data) == size
    if frame.indices is not None:
        ids = np.frombuffer(frame.indices, dtype=">u8").astype(np.int64).tolist()
    else:
        ids = list(range(frame.start, frame.start + frame.count))
    carried, pos = {}, 0
    for page, is_zero in zip(ids, zero.tolist(), strict=True):
        if is_zero:
            carried[page] = bytes(PAGE)
        else:
            carried[page] = data[pos : pos + PAGE]
            pos += PAGE
    return carried


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("frames") / "mixed.img", 16 << 20, profile="mixed", seed=5)


@pytest.mark.parametrize("codec", ["zlib", "zstd", "none"])
def test_the_frames_of_each_batch_carry_exactly_its_pages(mixed: Path, codec: str) -> None:
    image = np.frombuffer(mixed.read_bytes(), dtype=np.uint8).reshape(-1, PAGE)
    rng = np.random.default_rng(1)
    scattered = np.sort(rng.choice(image.shape[0], size=256, replace=False)).astype(np.int64)
    batches: list[Batch] = [(start, 256) for start in range(0, image.shape[0], 256)] + [scattered]
    split = 0
    for batch, encoded in zip(batches, encode(mixed, codec, batches), strict=True):
        frames = decode(encoded.parts)
        assert len(frames) == len(encoded.frames)
        split += len(frames) > 1
        carried: dict[int, bytes] = {}
        for frame in frames:
            pages = pages_carried(frame)
            assert not carried.keys() & pages.keys(), "a page in two frames"
            carried |= pages
        wanted = list(range(batch[0], batch[0] + batch[1])) if isinstance(batch, tuple) else batch.tolist()
        assert sorted(carried) == wanted
        assert all(carried[page] == image[page].tobytes() for page in wanted)
    if codec == "zlib":
        assert split > 0, "the mixed image has batches with random runs among text and code: some must be cut"
    else:
        assert split == 0, "zstd passes over random data by itself and none compresses nothing: no cuts"
