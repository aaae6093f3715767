"""The wire protocol on bytes alone: round trips, the frame-order table, and garbage that must fail cleanly."""

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate_cli.errors import IntegrityError, ProtocolError
from migrate_cli.wire import protocol as wire
from migrate_cli.wire.conversation import Role
from migrate_cli.wire.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Abort,
    Encoding,
    End,
    Hello,
    Keepalive,
    Pages,
    PassEnd,
    Welcome,
)
from migrate_cli.wire.protocol import NEED_DATA, Decoder, VersionMismatch, encode, validate_pages

HELLO = Hello(page_size=4096, image_size=4096 * 100, codec=1, level=1, session_id=b"s" * 16, batch_pages=64)
PAGES = Pages(start=10, count=12, encoding=Encoding.ZLIB, zero_bitmap=bytes([0b101, 0b1000]), data=b"compressed")
PAGE_LIST = Pages(3, 3, Encoding.RAW, b"\x02", b"p" * 8192, indices=np.array([3, 9, 70], dtype=">u8").tobytes())
SENDER_STREAM = [
    HELLO,
    Keepalive(),
    PAGES,
    Pages(0, 8, Encoding.RAW, b"\xff", b""),
    PassEnd(1, 2),
    PAGE_LIST,
    PassEnd(2, 1),
    End(100, 3, b"d" * 16),
]
RECEIVER_STREAM = [Keepalive(), Welcome(), Keepalive(), wire.Result(0, b"x" * 16)]


def decode_all(role: Role, data: bytes, chunk: int = 0) -> list[object]:
    decoder = Decoder(role)
    frames: list[object] = []
    pieces = [data] if not chunk else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        decoder.receive_data(piece)
        frames.extend(decoder.frames())
    return frames


def normalise(frames: list[object]) -> list[object]:
    return [
        Pages(f.start, f.count, f.encoding, f.zero_bitmap, bytes(f.data), f.indices) if isinstance(f, Pages) else f
        for f in frames
    ]


@pytest.mark.parametrize("chunk", [0, 1, 7, 100])
def test_a_sender_stream_round_trips_whatever_the_chunking(chunk: int) -> None:
    wire = b"".join(encode(f) for f in SENDER_STREAM)
    assert normalise(decode_all(Role.RECEIVER, wire, chunk)) == SENDER_STREAM


def test_a_receiver_stream_round_trips() -> None:
    wire = b"".join(encode(f) for f in RECEIVER_STREAM)
    assert decode_all(Role.SENDER, wire) == RECEIVER_STREAM


def test_abort_carries_code_and_one_printable_line() -> None:
    frames = decode_all(Role.RECEIVER, encode(HELLO) + encode(Abort(4, "no space\nleft\x1b[31m")))
    assert frames[1] == Abort(4, "no space?left?[31m")


def test_pages_counts_zero_and_normal_pages_from_the_bitmap() -> None:
    assert PAGES.zero_count == 3
    assert PAGES.normal_count == 9


def test_header_is_twelve_bytes_and_crc_covers_header_and_payload() -> None:
    wire = bytearray(encode(Keepalive()))
    assert len(wire) == HEADER_SIZE
    for i in range(HEADER_SIZE):  # flip a bit anywhere in the header: refused, or (length) never completes
        broken = bytearray(wire)
        broken[i] ^= 0x01
        decoder = Decoder(Role.SENDER)
        decoder.receive_data(bytes(broken))
        try:
            assert decoder.next_frame() is NEED_DATA
            assert 4 <= i < 8, f"flip in byte {i} went unnoticed"
        except (ProtocolError, IntegrityError):
            pass


def test_a_flipped_payload_bit_is_a_crc_mismatch() -> None:
    wire = bytearray(encode(HELLO) + encode(PAGES))
    wire[-3] ^= 0x10
    with pytest.raises(IntegrityError, match="CRC mismatch in PAGES"):
        decode_all(Role.RECEIVER, bytes(wire))


def test_unknown_version_names_both_sides() -> None:
    payload = bytearray(encode(HELLO)[HEADER_SIZE:])
    payload[0:2] = struct.pack("!H", 9)
    from zlib_ng import zlib_ng

    head = struct.pack("!HBBI", 0x564D, 0x01, 0, len(payload))
    crc = zlib_ng.crc32(payload, zlib_ng.crc32(head))
    with pytest.raises(VersionMismatch, match="peer speaks version 9, this vmmig speaks 2"):
        decode_all(Role.RECEIVER, head + struct.pack("!I", crc) + bytes(payload))


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([PAGES], "unexpected PAGES frame during handshake"),
        ([HELLO, HELLO], "unexpected HELLO frame during streaming"),
        ([HELLO, End(1, 0, b"d" * 16), PAGES], "unexpected PAGES frame during done"),
        ([HELLO, Abort(1, "x"), PAGES], "after the peer aborted"),
    ],
)
def test_frames_out_of_order_are_refused(frames: list[object], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_all(Role.RECEIVER, b"".join(encode(f) for f in frames))  # type: ignore[arg-type]


def test_a_decoder_stays_failed_after_an_error() -> None:
    decoder = Decoder(Role.RECEIVER)
    decoder.receive_data(b"\x00" * 12)
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    decoder.receive_data(encode(HELLO))
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_huge_announced_lengths_are_refused_before_buffering() -> None:
    head = struct.pack("!HBBII", 0x564D, 0x10, 0, MAX_PAYLOAD + 1, 0)
    with pytest.raises(ProtocolError, match="more than the limit"):
        decode_all(Role.RECEIVER, encode(HELLO) + head)


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        (Hello(4095, 4095 * 4, 1, 1, b"s" * 16, 4), "not a power of two"),
        (Hello(4096, 4096 * 4 + 1, 1, 1, b"s" * 16, 4), "not a positive multiple"),
        (Hello(4096, 0, 1, 1, b"s" * 16, 4), "not a positive multiple"),
        (Hello(4096, 4096, 1, 1, b"s" * 16, 0), "batch"),
        (Hello(4096, 4096, 1, 1, b"s" * 16, 8192), "batch"),
        (Hello(4096, 4096, 1, 1, b"s" * 16, 4, channels=1, channel_index=1), "channel"),
    ],
)
def test_hello_fields_are_validated(hello: Hello, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_all(Role.RECEIVER, encode(hello))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (Pages(99, 2, Encoding.RAW, b"\x00", b"x" * 8192), "past the image end"),
        (Pages(100, 1, Encoding.RAW, b"\x00", b"x" * 4096), "past the image end"),
        (Pages(0, 65, Encoding.RAW, bytes(9), b""), "more than the announced batch"),
        (Pages(0, 2, Encoding.RAW, b"\x00", b"x" * 100), "expected 8192"),
        (Pages(0, 2, Encoding.ZLIB, b"\x00", b"x" * 9000), "compressed PAGES frame holds 9000"),
        (Pages(0, 2, Encoding.ZLIB, b"\x03", b"x"), "compressed PAGES frame holds 1"),
    ],
)
def test_pages_are_checked_against_the_session_before_memory_is_touched(frame: Pages, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        validate_pages(frame, page_size=4096, total_pages=100, batch_pages=64)


def test_bitmap_bits_past_the_count_are_refused() -> None:
    bad = encode(HELLO) + encode(Pages(0, 3, Encoding.RAW, b"\xf8", b""))
    with pytest.raises(ProtocolError, match="past its page count"):
        decode_all(Role.RECEIVER, bad)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([Role.SENDER, Role.RECEIVER]))
def test_garbage_only_ever_raises_protocol_or_integrity_errors(data: bytes, role: Role) -> None:
    decoder = Decoder(role)
    decoder.receive_data(data)
    with contextlib.suppress(ProtocolError, IntegrityError):
        list(decoder.frames())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_truncation_of_a_valid_stream_yields_a_prefix_and_then_waits(data: st.DataObject) -> None:
    wire = b"".join(encode(f) for f in SENDER_STREAM)
    cut = data.draw(st.integers(min_value=0, max_value=len(wire)))
    decoder = Decoder(Role.RECEIVER)
    decoder.receive_data(wire[:cut])
    frames = normalise(list(decoder.frames()))
    assert frames == SENDER_STREAM[: len(frames)]
    assert decoder.next_frame() is NEED_DATA


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_single_bit_flip_in_a_valid_stream_is_detected(data: st.DataObject) -> None:
    wire = bytearray(b"".join(encode(f) for f in SENDER_STREAM))
    pos = data.draw(st.integers(min_value=0, max_value=len(wire) * 8 - 1))
    wire[pos // 8] ^= 1 << (pos % 8)
    decoder = Decoder(Role.RECEIVER)
    decoder.receive_data(bytes(wire))
    with pytest.raises((ProtocolError, IntegrityError)):
        frames = list(decoder.frames())
        # A flip inside a length field can make the decoder wait for bytes that never come: that is a truncation,
        # which the transport reports; here it must at least not yield the original stream.
        assert normalise(frames) != SENDER_STREAM
        raise ProtocolError("stream ended early")


def test_a_page_list_names_its_pages_and_must_be_strictly_increasing() -> None:
    assert PAGE_LIST.index_array().tolist() == [3, 9, 70]
    assert PAGES.index_array().tolist() == list(range(10, 22))
    bad = Pages(3, 2, Encoding.RAW, b"\x03", b"", indices=np.array([9, 3], dtype=">u8").tobytes())
    with pytest.raises(ProtocolError, match="not strictly increasing"):
        decode_all(Role.RECEIVER, encode(HELLO) + encode(bad))


def test_a_page_list_past_the_image_end_is_refused() -> None:
    frame = Pages(3, 2, Encoding.RAW, b"\x03", b"", indices=np.array([3, 100], dtype=">u8").tobytes())
    with pytest.raises(ProtocolError, match="names page 100, past the image end"):
        validate_pages(frame, page_size=4096, total_pages=100, batch_pages=64)


def test_the_wire_size_of_a_batch_frame_is_its_encoded_length() -> None:
    """What the bandwidth cap charges for a batch is exactly what goes on the wire, PAGE_LIST indices included."""
    from migrate_cli.wire.protocol import pages_wire_size

    ranged = Pages(8, 3, Encoding.RAW, b"\x02", b"\x07" * 2 * 4096)
    listed = Pages(1, 3, Encoding.RAW, b"\x00", b"\x07" * 3 * 4096, struct.pack("!3Q", 1, 5, 9))
    for frame in (ranged, listed):
        assert pages_wire_size(frame) == len(encode(frame))


def test_the_receivers_buffers_hold_the_largest_batch_frame_of_either_kind() -> None:
    from migrate_cli.wire.frames import HEADER_SIZE
    from migrate_cli.wire.protocol import max_pages_payload

    pages = 64
    indices = struct.pack(f"!{pages}Q", *range(pages))
    largest = Pages(0, pages, Encoding.RAW, bytes(pages // 8), b"\x07" * pages * 4096, indices)
    assert len(encode(largest)) - HEADER_SIZE == max_pages_payload(pages, 4096)
