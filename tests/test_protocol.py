"""The wire protocol on bytes alone: round trips, the frame-order table, and garbage that must fail cleanly.

Protocol 3: PAGES and PAGE_LIST carry a fingerprint of each non-zero page, and their CRC covers every byte but the
page data, which the receiver checks page by page against those fingerprints instead.
"""

import contextlib
import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate_cli.errors import CorruptFrame, ExitCode, IntegrityError, ProtocolError
from migrate_cli.receiver.discard import DiscardSink
from migrate_cli.wire import codec as codecs
from migrate_cli.wire import protocol as wire
from migrate_cli.wire.conversation import Role
from migrate_cli.wire.digest import fingerprint_pages
from migrate_cli.wire.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Abort,
    Encoding,
    End,
    FrameType,
    Hello,
    Keepalive,
    Pages,
    PassEnd,
    PassLanded,
    Welcome,
)
from migrate_cli.wire.protocol import NEED_DATA, Decoder, VersionMismatch, encode, validate_pages

from .encoded import decoded_pages, fingerprinted, framed

PS = 4096
HELLO = Hello(page_size=PS, image_size=PS * 100, codec=1, level=1, session_id=b"s" * 16, batch_pages=64)
# Nine distinct non-zero pages, zlib-compressed as a sender would: every frame of the streams below carries the
# fingerprints a correct sender computes, so a damaged one can be told from an intact one.
NINE_PAGES = b"".join((bytes([i + 1]) * 100 + b"page %d " % i * 600)[:PS] for i in range(9))
PAGES = fingerprinted(
    Pages(10, 12, Encoding.ZLIB, bytes([0b101, 0b1000]), codecs.by_name("zlib").compressor(1).compress(NINE_PAGES))
)
PAGE_LIST = fingerprinted(
    Pages(3, 3, Encoding.RAW, b"\x02", b"p" * PS + b"q" * PS, indices=np.array([3, 9, 70], dtype=">u8").tobytes())
)
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
RECEIVER_STREAM = [
    Keepalive(),
    Welcome(features=4),
    Keepalive(),
    PassLanded(1),
    PassLanded(2),
    wire.Result(0, b"x" * 16),
]


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
        Pages(f.start, f.count, f.encoding, f.zero_bitmap, bytes(f.data), f.indices, f.fingerprints)
        if isinstance(f, Pages)
        else f
        for f in frames
    ]


def matches_its_fingerprints(frame: Pages) -> bool:
    """What the receiver's page check decides for a batch: its data decodes, and each page to its fingerprint."""
    return decoded_pages(frame) is not None and fingerprinted(frame).fingerprints == frame.fingerprints


def flipped(data: bytes, byte: int, bit: int = 0) -> bytes:
    damaged = bytearray(data)
    damaged[byte] ^= 1 << bit
    return bytes(damaged)


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


def test_a_flipped_payload_bit_of_a_small_frame_is_a_crc_mismatch() -> None:
    """Every frame but PAGES and PAGE_LIST: the CRC covers the whole payload (the rule of protocols 1 to 3)."""
    for frame, name in ((PassEnd(1, 2), "PASS_END"), (End(100, 3, b"d" * 16), "END")):
        stream = encode(HELLO) + encode(PAGES) + encode(frame)
        for byte in range(len(stream) - len(encode(frame)) + HEADER_SIZE, len(stream)):
            with pytest.raises(CorruptFrame, match=f"CRC mismatch in {name}"):
                decode_all(Role.RECEIVER, flipped(stream, byte, 4))


def test_a_peer_of_another_version_is_refused_naming_both() -> None:
    """HELLO's and WELCOME's version is read before anything else; a version-2 peer (or any other) is refused with
    a protocol error that names both versions."""
    ours = f"this vmmig speaks {PROTOCOL_VERSION}"
    assert PROTOCOL_VERSION == 3
    for theirs in (2, 9):
        hello = Hello(PS, PS * 100, 1, 1, b"s" * 16, batch_pages=64, version=theirs)
        with pytest.raises(VersionMismatch, match=f"peer speaks version {theirs}, {ours}") as refused:
            decode_all(Role.RECEIVER, encode(hello))
        assert refused.value.exit_code == ExitCode.PROTOCOL and not refused.value.resumable
    with pytest.raises(VersionMismatch, match=f"peer speaks version 2, {ours}"):
        decode_all(Role.SENDER, encode(Welcome(version=2)))


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
    """Built by hand: a bitmap with more zero pages than the count cannot be encoded (no fingerprint count fits)."""
    bad = encode(HELLO) + framed(FrameType.PAGES, struct.pack("!QIBBH", 0, 3, Encoding.RAW, 0, 0) + b"\xf8")
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


def what_lands(frames: list[object]) -> list[object]:
    """A stream's meaning to a receiver: every frame, a batch as its fields and the pages it lands (not the bytes
    that encode them: deflate's padding bits, say, change nothing that lands)."""
    return [
        (f.start, f.count, f.zero_bitmap, f.indices, f.fingerprints, decoded_pages(f)) if isinstance(f, Pages) else f
        for f in frames
    ]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_single_bit_flip_in_a_valid_stream_is_detected(data: st.DataObject) -> None:
    """Protocol 3: a flip outside page data fails the decoder (the CRC, or a field that no longer makes sense); a
    flip in page data passes the decoder and fails the receiver's page check (the batch no longer decodes, or a
    page no longer matches its fingerprint). Nothing damaged ever lands."""
    wire = bytearray(b"".join(encode(f) for f in SENDER_STREAM))
    pos = data.draw(st.integers(min_value=0, max_value=len(wire) * 8 - 1))
    wire[pos // 8] ^= 1 << (pos % 8)
    decoder = Decoder(Role.RECEIVER)
    decoder.receive_data(bytes(wire))
    try:
        frames = list(decoder.frames())
    except (ProtocolError, IntegrityError):
        return
    if any(isinstance(f, Pages) and not matches_its_fingerprints(f) for f in frames):
        return
    assert what_lands(frames) == what_lands(SENDER_STREAM[: len(frames)]), f"bit {pos} changed what lands, unnoticed"
    # Fewer frames: a flip inside a length field makes the decoder wait for bytes that never come, a truncation the
    # transport reports.
    assert len(frames) == len(SENDER_STREAM) or decoder.next_frame() is NEED_DATA


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

    ranged = fingerprinted(Pages(8, 3, Encoding.RAW, b"\x02", b"\x07" * 2 * 4096))
    listed = fingerprinted(Pages(1, 3, Encoding.RAW, b"\x00", b"\x07" * 3 * 4096, struct.pack("!3Q", 1, 5, 9)))
    for frame in (ranged, listed):
        assert len(frame.fingerprints) == 8 * frame.normal_count
        assert pages_wire_size(frame) == len(encode(frame))


def test_the_receivers_buffers_hold_the_largest_batch_frame_of_either_kind() -> None:
    from migrate_cli.wire.frames import HEADER_SIZE
    from migrate_cli.wire.protocol import max_pages_payload

    pages = 64
    indices = struct.pack(f"!{pages}Q", *range(pages))
    largest = fingerprinted(Pages(0, pages, Encoding.RAW, bytes(pages // 8), b"\x07" * pages * 4096, indices))
    assert len(encode(largest)) - HEADER_SIZE == max_pages_payload(pages, 4096)


# --- protocol 3: fingerprints, and what the CRC covers -----------------------------------------------------------


def fingerprints_of(pages: bytes) -> bytes:
    fps = np.empty(len(pages) // PS, dtype=np.uint64)
    fingerprint_pages(pages, PS, fps)
    return fps.astype("<u8").tobytes()


def test_fingerprints_travel_with_their_batch_in_page_order() -> None:
    """Each non-zero page's xxh3_64, 8 bytes little-endian, in the order of the pages; zero pages have none."""
    assert PAGES.fingerprints == fingerprints_of(NINE_PAGES)
    assert PAGE_LIST.fingerprints == fingerprints_of(b"p" * PS + b"q" * PS)
    pages, page_list = decode_all(Role.RECEIVER, encode(HELLO) + encode(PAGES) + encode(PAGE_LIST))[1:]
    assert pages.fingerprints == PAGES.fingerprints and page_list.fingerprints == PAGE_LIST.fingerprints
    assert pages.fingerprint_array().tolist() == np.frombuffer(PAGES.fingerprints, "<u8").tolist()
    assert bytes(pages.data) == bytes(PAGES.data) and bytes(page_list.data) == bytes(PAGE_LIST.data)


def checked_regions(frame: Pages) -> dict[str, range]:
    """The payload bytes of ``frame`` the CRC covers, by field (offsets into the payload)."""
    head = 8 + len(frame.indices) if frame.indices is not None else 16
    regions = {"head": range(0, 16 if frame.indices is None else 8)}
    if frame.indices is not None:
        regions["page numbers"] = range(8, head)
    bitmap_end = head + len(frame.zero_bitmap)
    regions["bitmap"] = range(head, bitmap_end)
    regions["fingerprints"] = range(bitmap_end, bitmap_end + len(frame.fingerprints))
    return regions


@pytest.mark.parametrize(
    ("frame", "name", "field"),
    [(PAGES, "PAGES", field) for field in ("head", "bitmap", "fingerprints")]
    + [(PAGE_LIST, "PAGE_LIST", field) for field in ("head", "page numbers", "bitmap", "fingerprints")],
)
def test_a_flipped_bit_in_a_batch_outside_its_data_is_a_crc_mismatch(frame: Pages, name: str, field: str) -> None:
    """Every bit of a batch's fields, page numbers, zero bitmap and fingerprints is covered by its CRC (a flip in
    the count or the bitmap moves the end of the checked range: the CRC fails all the same)."""
    region = checked_regions(frame)[field]
    stream = encode(HELLO) + encode(frame)
    payload_at = len(stream) - len(encode(frame)) + HEADER_SIZE
    assert len(region) > 0
    for byte in region:
        for bit in range(8):
            with pytest.raises(CorruptFrame, match=f"CRC mismatch in {name} frame"):
                decode_all(Role.RECEIVER, flipped(stream, payload_at + byte, bit))


def test_the_crc_covers_everything_but_the_page_data() -> None:
    """protocol.checked_length: head, page numbers, bitmap and fingerprints of a batch; all of any other payload."""
    for frame in (PAGES, PAGE_LIST):
        encoded = encode(frame)
        header = wire.parse_header(encoded[:HEADER_SIZE])
        payload = encoded[HEADER_SIZE:]
        assert wire.checked_length(header, payload) == len(payload) - len(frame.data)
        assert max(max(r) for r in checked_regions(frame).values()) + 1 == len(payload) - len(frame.data)
    end = encode(End(100, 3, b"d" * 16))
    assert wire.checked_length(wire.parse_header(end[:HEADER_SIZE]), end[HEADER_SIZE:]) == len(end) - HEADER_SIZE


@pytest.mark.parametrize(
    ("frame", "damaged_page"),
    [(PAGE_LIST, 3), (PAGE_LIST, 70), (PAGES, None)],
    ids=["page-list-first-page", "page-list-last-page", "zlib-pages"],
)
def test_a_flipped_bit_in_page_data_passes_the_decoder_and_fails_the_page_check(
    frame: Pages, damaged_page: int | None
) -> None:
    """The CRC no longer covers page data: the decoder returns the batch, data damaged and all, and the receiver's
    page check refuses it as a damaged frame (CorruptFrame: resumable), naming the page when it decodes."""
    stream = encode(HELLO) + encode(frame)
    data_at = len(stream) - len(frame.data)
    if damaged_page is None:
        positions = range(data_at, len(stream), 7)  # deflate: any byte of the stream
    else:
        first = data_at + [3, 70].index(damaged_page) * PS
        positions = range(first, first + PS, 509)
    for byte in positions:
        (_, got) = decode_all(Role.RECEIVER, flipped(stream, byte, 3))
        assert (got.start, got.count, got.zero_bitmap, got.indices, got.fingerprints) == (
            frame.start,
            frame.count,
            frame.zero_bitmap,
            frame.indices,
            frame.fingerprints,
        )
        assert bytes(got.data) != bytes(frame.data) and not matches_its_fingerprints(got)
        pages = decoded_pages(got)
        if damaged_page is not None:
            assert pages is not None
            with pytest.raises(CorruptFrame, match=f"^page {damaged_page} does not match the fingerprint"):
                DiscardSink(100 * PS, PS).write_batch(got, pages)


def test_an_intact_batch_passes_the_page_check() -> None:
    """The control for the test above: the same frames undamaged land, and their fingerprints are kept."""
    sink = DiscardSink(100 * PS, PS)
    for frame in decode_all(Role.RECEIVER, encode(HELLO) + encode(PAGES) + encode(PAGE_LIST))[1:]:
        pages = decoded_pages(frame)
        assert pages is not None
        sink.write_batch(frame, pages)
    assert sink.fingerprints[[3, 70]].tolist() == PAGE_LIST.fingerprint_array().tolist()
    normal = [p for i, p in enumerate(range(10, 22)) if i not in (0, 2, 11)]
    assert sink.fingerprints[normal].tolist() == PAGES.fingerprint_array().tolist()


@pytest.mark.parametrize(("frame", "name"), [(PAGES, "PAGES"), (PAGE_LIST, "PAGE_LIST")])
def test_a_batch_whose_fingerprints_are_cut_short_is_a_protocol_error(frame: Pages, name: str) -> None:
    """A payload that ends before the fingerprints its bitmap calls for (CRC right all the same) is malformed."""
    payload = encode(frame)[HEADER_SIZE:]
    short = len(payload) - len(frame.data) - 8
    with pytest.raises(ProtocolError, match=f"{name} frame payload is {short} bytes, expected {short + 8}"):
        decode_all(Role.RECEIVER, encode(HELLO) + framed(getattr(FrameType, name), payload[:short]))


@pytest.mark.parametrize("delta", [-8, -1, 8])
def test_a_batch_without_one_fingerprint_per_non_zero_page_does_not_encode(delta: int) -> None:
    for frame in (PAGES, PAGE_LIST):
        fingerprints = frame.fingerprints + bytes(8) if delta > 0 else frame.fingerprints[:delta]
        with pytest.raises(ValueError, match="non-zero pages with"):
            encode(dataclasses.replace(frame, fingerprints=fingerprints))
    with pytest.raises(ValueError, match="2 non-zero pages with 0 bytes of fingerprints"):
        encode(Pages(0, 2, Encoding.RAW, b"\x00", b"\x07" * 2 * PS))


def test_pass_landed_is_four_bytes_and_names_a_pass_from_one() -> None:
    wire_bytes = encode(PassLanded(7))
    assert len(wire_bytes) == HEADER_SIZE + 4
    assert decode_all(Role.SENDER, encode(Welcome()) + wire_bytes) == [Welcome(), PassLanded(7)]
    with pytest.raises(ProtocolError, match="pass 0"):
        decode_all(Role.SENDER, encode(Welcome()) + encode(PassLanded(0)))


def test_pass_landed_comes_only_from_the_receiver_and_only_while_streaming() -> None:
    with pytest.raises(ProtocolError, match="unexpected PASS_LANDED"):
        decode_all(Role.RECEIVER, encode(HELLO) + encode(PassLanded(1)))  # a sender never sends it
    with pytest.raises(ProtocolError, match="unexpected PASS_LANDED"):
        decode_all(Role.SENDER, encode(PassLanded(1)))  # before WELCOME
