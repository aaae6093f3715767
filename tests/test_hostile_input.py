"""The receiver against a hostile sender: whatever arrives on its socket, `vmmig recv` ends cleanly.

Every case starts a real `vmmig recv` on 127.0.0.1 (with ``--io-timeout 2s --handshake-timeout 2s``) and feeds it a
crafted stream from a FakePeer, or raw bytes on the same socket. What each case specifies:

- the documented exit code: 5 network (closed, truncated, too slow), 6 protocol (malformed, out of order, out of
  range, longer than its type allows), 7 integrity (CRC, decompression, a page that does not match its fingerprint,
  digest), 8 the peer aborted, 4 destination;
- exactly one error line on stderr, never a traceback;
- a protocol or integrity failure is also told to the sender, as an ABORT with the same code and message (marked
  resumable for damage on the link: a CRC mismatch, data that does not decode, a page that does not match);
- no DEST and no DEST.partial afterwards (a symlink someone else planted is left alone, its target untouched);
- a bounded run: a malformed frame is refused at once (a protocol verdict, not the 2 s silence timer's), and every
  case ends within ``EXIT_WITHIN`` seconds.

Every batch a case sends carries the fingerprints a correct sender computes (tests/encoded.py), unless the case is
about them: protocol 3 checks each page landed against its fingerprint.

The cases that once exposed bugs (a zlib batch inflating past its pages mid-match, an ABORT before HELLO, a HELLO
too large to track) are fixed and stay here as regression tests; each test states the documented behaviour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import re
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zstandard
from zlib_ng import zlib_ng

from migrate_cli.errors import ExitCode, IntegrityError, ProtocolError
from migrate_cli.wire import codec as codecs
from migrate_cli.wire import protocol as wire
from migrate_cli.wire.digest import end_commitment, fingerprint_pages, image_digest
from migrate_cli.wire.frames import (
    FRAME_MAGIC,
    MAX_PAYLOAD,
    RESULT_DIGEST_MISMATCH,
    RESULT_VERIFIED,
    Abort,
    Encoding,
    End,
    Frame,
    FrameType,
    Hello,
    Pages,
    PassEnd,
    Result,
    Welcome,
)
from migrate_cli.wire.protocol import encode

from .conftest import Proc, Processes, assert_no_destination, assert_resumable, still_serves
from .encoded import fingerprinted, framed
from .fakepeer import FakePeer

PS = 4096
# --resume-window 0: a link fault ends the receiver at once (keeping DEST.partial for a resume, checked below).
TIMEOUTS = ("--io-timeout", "2s", "--handshake-timeout", "2s", "--resume-window", "0")
EXIT_WITHIN = 15.0  # seconds: a bound on how long any case may take to end, far above the 2 s timeouts

DESTINATION = ExitCode.DESTINATION
NETWORK = ExitCode.NETWORK
PROTOCOL = ExitCode.PROTOCOL
INTEGRITY = ExitCode.INTEGRITY
PEER = ExitCode.PEER

PROGRESS_LINE = re.compile(r"^vmmig recv: (listening on |pass \d+: )")


# --- the guest image, and the stream a correct sender sends for it ---------------------------------------------


def guest_image(pages: int = 4) -> bytes:
    """Pages of four kinds in turn: a byte pattern, zeros, text and noise (so the stream has a zero bitmap)."""
    kinds = [b"\x01" * PS, bytes(PS), (b"the quick brown fox jumps over the lazy dog " * 100)[:PS]]
    kinds.append(random.Random(7).randbytes(PS))
    return b"".join(kinds[i % len(kinds)] for i in range(pages))


IMAGE = guest_image()


def digest_of(image: bytes) -> bytes:
    """The image digest of docs/PROTOCOL.md, as a correct sender puts it in END."""
    fingerprints = np.empty(len(image) // PS, dtype=np.uint64)
    fingerprint_pages(image, PS, fingerprints)
    return image_digest(fingerprints)


def commitment_of(image: bytes) -> bytes:
    """What a correct sender's END carries for ``image``: the commitment to its digest."""
    return end_commitment(digest_of(image))


def hello(pages: int = 4, codec: int = Encoding.ZLIB, batch: int = 4) -> Hello:
    return Hello(PS, pages * PS, codec, 1, b"h" * 16, batch_pages=batch)


def batch_of(image: bytes, start: int = 0, codec: str = "zlib") -> Pages:
    """The PAGES frame a correct sender emits for ``image`` placed at page ``start``: zero pages in the bitmap, a
    fingerprint for each other page."""
    pages = [image[i : i + PS] for i in range(0, len(image), PS)]
    bitmap = sum(1 << i for i, page in enumerate(pages) if not any(page)).to_bytes((len(pages) + 7) // 8, "little")
    normal = b"".join(page for page in pages if any(page))
    chosen = codecs.by_name(codec)
    data = normal if codec == "none" else chosen.compressor(chosen.default_level).compress(normal)
    assert codec == "none" or len(data) < len(normal), "the test image must compress"
    return fingerprinted(Pages(start, len(pages), chosen.wire_id, bitmap, data))


def raw_pages(start: int, count: int, fill: int = 5) -> Pages:
    return fingerprinted(Pages(start, count, Encoding.RAW, bytes((count + 7) // 8), bytes([fill]) * count * PS))


def page_list(indices: list[int], fill: int = 5) -> Pages:
    """A PAGE_LIST frame naming exactly ``indices`` (unchecked: refusing it is the receiver's job)."""
    count = len(indices)
    packed = b"".join(struct.pack("!Q", index) for index in indices)
    data = bytes([fill]) * count * PS
    return fingerprinted(Pages(indices[0], count, Encoding.RAW, bytes((count + 7) // 8), data, packed))


def valid_stream(image: bytes = IMAGE) -> list[Frame]:
    """HELLO, one PAGES batch, PASS_END(1, 1), END with the right digest: what `vmmig send` would send."""
    pages = len(image) // PS
    return [hello(pages, batch=pages), batch_of(image), PassEnd(1, 1), End(pages, 1, commitment_of(image))]


# --- raw frames ------------------------------------------------------------------------------------------------


def header_only(frame_type: int, length: int) -> bytes:
    """A 12-byte header announcing ``length`` payload bytes that will never come."""
    head = struct.pack("!HBBI", FRAME_MAGIC, frame_type, 0, length)
    return head + struct.pack("!I", zlib_ng.crc32(head))


def with_payload_byte(frame: Frame, offset: int, value: int) -> bytes:
    """``frame`` encoded, then one payload byte replaced, and the CRC made right again."""
    data = bytearray(encode(frame))
    data[12 + offset] = value
    return framed(data[2], bytes(data[12:]), data[3])


def flipped_bit(frame: Frame, at: int = -1) -> bytes:
    """``frame`` encoded, then bit 6 of its byte ``at`` flipped (the CRC left as it was)."""
    data = bytearray(encode(frame))
    data[at] ^= 0x40
    return bytes(data)


def in_fingerprints(frame: Pages) -> int:
    """The offset (from the end of its encoding) of ``frame``'s last fingerprint byte: covered by the CRC."""
    return -len(frame.data) - 1


def in_page(frame: Pages, normal: int) -> int:
    """The offset (from the end of its encoding) of the first byte of raw ``frame``'s ``normal``-th non-zero page."""
    return -len(frame.data) + normal * PS


def noise(seed: int, size: int = 4096) -> bytes:
    return random.Random(seed).randbytes(size)


def decoder_verdict(data: bytes) -> int:
    """The exit code that the sans-IO decoder says ``data``, as the first bytes of a stream, deserves."""
    decoder = wire.Decoder(wire.Role.RECEIVER)
    decoder.receive_data(data)
    try:
        frames = list(decoder.frames())
    except ProtocolError:
        return PROTOCOL
    except IntegrityError:
        return INTEGRITY
    return PROTOCOL if frames and not isinstance(frames[0], Hello) else NETWORK


# --- running the receiver and reading its verdict --------------------------------------------------------------


def error_line(err: str) -> str:
    """stderr holds no traceback and, besides the ready line and progress lines, exactly one line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, f"expected exactly one error line, got: {err!r}"
    return lines[0]


def last_word(peer: FakePeer) -> Abort | Result | None:
    """What the receiver said last to the fake sender: ABORT, RESULT, or None when it just closed."""
    try:
        while True:
            for frame in peer.decoder.frames():
                if isinstance(frame, Abort | Result):
                    return frame
            data = peer.sock.recv(1 << 16)
            if not data:
                return None
            peer.decoder.receive_data(data)
    except OSError:
        return None


def half_close(peer: FakePeer) -> None:
    """End the stream here (a FIN, as from a sender that died) while still reading what the receiver says."""
    with contextlib.suppress(OSError):
        peer.sock.shutdown(socket.SHUT_WR)


def send_regardless(peer: FakePeer, *frames: Frame | bytes) -> None:
    """Send, ignoring a receiver that already refused and closed (its verdict is what the test checks)."""
    with contextlib.suppress(OSError):
        peer.send(*frames)


def expect_failure(
    recv: Proc, dest: Path, code: int, fragment: str, peer: FakePeer | None = None, resumable: bool = False
) -> str:
    """The receiver exits ``code`` with one line containing ``fragment``, and leaves no DEST nor DEST.partial;
    a ``resumable`` fault (the link's: a cut or a corrupted frame after the handshake) leaves DEST.partial and its
    state file for `vmmig recv --resume`, and says so.

    With ``peer``, a protocol or integrity failure must also reach the sender as an ABORT with the same code and
    message (recv.py: "any failure ... tells the sender why with ABORT").
    """
    word = last_word(peer) if peer is not None else None
    if peer is not None:
        peer.close()
    exit_code, _, err = recv.wait(timeout=EXIT_WITHIN)
    line = error_line(err)
    assert exit_code == code, err
    assert fragment in line, line
    if peer is not None and code in (PROTOCOL, INTEGRITY):
        assert isinstance(word, Abort), f"no ABORT reached the sender (got {word!r})"
        assert word.code == code and word.message in line
        # Every integrity failure an ABORT reports here is damage on the link: the sender may resume.
        assert word.resumable == (code == INTEGRITY), word
    if resumable:
        assert_resumable(dest)
        assert "vmmig recv --resume" in line
    else:
        assert_no_destination(dest)
    return line


def expect_turned_away(procs: Processes, recv: Proc, dest: Path, code: int, fragment: str, peer: FakePeer) -> None:
    """A connection whose handshake fails is turned away alone: its peer hears why (ABORT with ``code`` for a
    protocol or integrity failure), the receiver logs one "refused a connection" line naming ``fragment``, writes
    nothing, and goes on waiting: a real sender still migrates into it afterwards."""
    word = last_word(peer)
    peer.close()
    if code in (PROTOCOL, INTEGRITY):
        assert isinstance(word, Abort), f"no ABORT reached the peer (got {word!r})"
        assert word.code == code and fragment in word.message, word
    assert recv.popen.poll() is None, "a failed handshake must not end the receiver"
    assert_no_destination(dest)
    err = still_serves(procs, recv, dest.parent)
    assert "Traceback" not in err, err
    refused = [line for line in err.splitlines() if "refused a connection from 127.0.0.1:" in line]
    assert len(refused) == 1 and fragment in refused[0], err


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "dest.img"


@pytest.fixture
def connect() -> Iterator[Callable[[str], FakePeer]]:
    """FakePeer.connect, with every peer closed at the end of the test."""
    opened: list[FakePeer] = []

    def _connect(address: str) -> FakePeer:
        peer = FakePeer.connect(address)
        opened.append(peer)
        return peer

    yield _connect
    for peer in opened:
        peer.close()


def start(procs: Processes, dest: Path, *args: str) -> Proc:
    return procs.recv(dest, *TIMEOUTS, *args)


def streaming(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], session: Hello | None = None, *args: str
) -> tuple[Proc, FakePeer]:
    """A receiver past the handshake: HELLO sent, WELCOME read; the next frame is the test's."""
    recv = start(procs, dest, *args)
    peer = connect(recv.address)
    peer.send(session or hello())
    peer.read_until(Welcome)
    return recv, peer


# --- garbage instead of a HELLO --------------------------------------------------------------------------------

NOISE: dict[str, Callable[[int], bytes]] = {
    "noise": lambda seed: noise(seed),
    "magic-then-noise": lambda seed: struct.pack("!H", FRAME_MAGIC) + noise(seed),
    "hello-header-then-noise": lambda seed: header_only(FrameType.HELLO, 44)[:8] + noise(seed, 48),
    "hello-with-noise-payload": lambda seed: framed(FrameType.HELLO, noise(seed, 44)),
}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shape", list(NOISE))
def test_random_bytes_instead_of_a_hello_are_refused(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], shape: str, seed: int
) -> None:
    """Noise is refused from its first frame, with the verdict the sans-IO decoder gives for the same bytes."""
    data = NOISE[shape](seed)
    expected = decoder_verdict(data)
    assert expected in (PROTOCOL, INTEGRITY), "every shape is refusable from its first 56 bytes"
    recv = start(procs, dest)
    peer = connect(recv.address)
    send_regardless(peer, data)
    half_close(peer)
    expect_turned_away(
        procs, recv, dest, expected, "CRC mismatch in HELLO frame" if expected == INTEGRITY else "", peer
    )


# --- a valid stream cut short ----------------------------------------------------------------------------------

STREAM = [encode(frame) for frame in valid_stream()]
STREAM_BYTES = b"".join(STREAM)
HELLO_LENGTH = len(STREAM[0])


def cut_points() -> list[object]:
    """Every frame boundary, the middle of every frame's payload, and the middle of one header."""
    params: list[object] = []
    offset = 0
    for name, frame in zip(("HELLO", "PAGES", "PASS_END", "END"), STREAM, strict=True):
        boundary = "connection closed by peer before the migration finished"
        if offset:  # a connection closed before its first byte is ignored: see the test after this one
            params.append(pytest.param(offset, boundary, id=f"{offset}-before-{name}"))
        if name == "PAGES":  # every header is read by the same code: one cut header is enough
            params.append(pytest.param(offset + 5, "in the middle of a header", id=f"{offset + 5}-in-{name}-header"))
        middle = offset + 12 + (len(frame) - 12) // 2
        params.append(pytest.param(middle, f"in the middle of a {name} frame", id=f"{middle}-in-{name}-payload"))
        offset += len(frame)
    return params


def feed_prefix(peer: FakePeer, cut: int) -> None:
    """Send the valid stream's first ``cut`` bytes as a sender would (waiting for WELCOME after HELLO), then EOF."""
    if cut <= HELLO_LENGTH:
        send_regardless(peer, STREAM_BYTES[:cut])
    else:
        peer.send(STREAM_BYTES[:HELLO_LENGTH])
        peer.read_until(Welcome)
        send_regardless(peer, STREAM_BYTES[HELLO_LENGTH:cut])
    half_close(peer)


def test_the_whole_valid_stream_is_published(procs: Processes, dest: Path, connect: Callable[[str], FakePeer]) -> None:
    """Control for the truncation cases: the stream they cut is valid and verifies."""
    recv = start(procs, dest)
    peer = connect(recv.address)
    feed_prefix(peer, len(STREAM_BYTES))
    result = last_word(peer)
    code, _, err = recv.wait(timeout=EXIT_WITHIN)
    assert code == 0, err
    assert isinstance(result, Result) and result.status == RESULT_VERIFIED and result.digest == digest_of(IMAGE)
    assert dest.read_bytes() == IMAGE


@pytest.mark.parametrize(("cut", "message"), cut_points())
def test_a_stream_cut_anywhere_is_a_network_error(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], cut: int, message: str
) -> None:
    recv = start(procs, dest)
    peer = connect(recv.address)
    feed_prefix(peer, cut)
    if cut < HELLO_LENGTH:  # a handshake cut short: that connection is turned away, the receiver waits on
        expect_turned_away(procs, recv, dest, NETWORK, message, peer)
        return
    # After the handshake, DEST.partial is kept for a resume only once it holds a page (the PAGES frame applied).
    expect_failure(recv, dest, NETWORK, message, peer, resumable=cut >= HELLO_LENGTH + len(STREAM[1]))


def test_a_connection_closed_before_its_first_byte_is_ignored(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer]
) -> None:
    """A health check, a port scan, or a sender killed before its HELLO must not end a waiting receiver."""
    recv = start(procs, dest)
    for _ in range(3):
        connect(recv.address).close()
    time.sleep(0.5)
    assert recv.popen.poll() is None, "the receiver must keep listening"
    peer = connect(recv.address)
    feed_prefix(peer, len(STREAM_BYTES))
    assert isinstance(last_word(peer), Result)
    assert recv.wait(timeout=EXIT_WITHIN)[0] == 0 and dest.read_bytes() == IMAGE


# --- lengths ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "after_hello", "message"),
    [
        pytest.param(
            header_only(FrameType.HELLO, 10 << 20),
            False,
            "HELLO frame announces 10485760 payload bytes, at most 1024 allowed",
            id="hello-of-10MB",
        ),
        pytest.param(
            header_only(FrameType.HELLO, MAX_PAYLOAD + 1),
            False,
            f"announces {MAX_PAYLOAD + 1} payload bytes, more than the limit {MAX_PAYLOAD}",
            id="hello-just-above-MAX_PAYLOAD",
        ),
        pytest.param(
            header_only(FrameType.PAGES, MAX_PAYLOAD + 1),
            True,
            f"announces {MAX_PAYLOAD + 1} payload bytes, more than the limit {MAX_PAYLOAD}",
            id="pages-just-above-MAX_PAYLOAD",
        ),
        pytest.param(
            header_only(FrameType.PAGES, MAX_PAYLOAD),
            True,
            "exceeds the announced batch of 4 pages",
            id="pages-of-MAX_PAYLOAD-beyond-the-batch",
        ),
        pytest.param(header_only(FrameType.END, 1 << 20), True, "at most 32 allowed", id="end-of-1MB"),
        pytest.param(header_only(FrameType.KEEPALIVE, 1), True, "at most 0 allowed", id="keepalive-with-payload"),
    ],
)
def test_a_header_announcing_too_long_a_payload_is_refused_before_the_payload(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], header: bytes, after_hello: bool, message: str
) -> None:
    """Only the header is sent and the socket stays open: a receiver waiting for the payload would exit 5 at 2 s."""
    if after_hello:
        recv, peer = streaming(procs, dest, connect)
    else:
        recv = start(procs, dest)
        peer = connect(recv.address)
    peer.send(header)
    if after_hello:
        expect_failure(recv, dest, PROTOCOL, message, peer)
    else:
        expect_turned_away(procs, recv, dest, PROTOCOL, message, peer)


# --- batches outside the image, or breaking their own rules ----------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        pytest.param(raw_pages(4, 1), "covers pages 4..4, past the image end (4 pages)", id="pages-past-the-end"),
        pytest.param(raw_pages(3, 2), "covers pages 3..4, past the image end (4 pages)", id="pages-straddling-the-end"),
        pytest.param(raw_pages(2**64 - 1, 1), "past the image end", id="pages-at-2^64-1"),
        pytest.param(page_list([0, 4]), "names page 4, past the image end (4 pages)", id="page-list-past-the-end"),
        pytest.param(page_list([2, 1]), "not strictly increasing", id="page-list-decreasing"),
        pytest.param(page_list([1, 1]), "not strictly increasing", id="page-list-repeating-a-page"),
        pytest.param(raw_pages(0, 5), "exceeds the announced batch of 4 pages", id="pages-above-batch"),
        pytest.param(framed(FrameType.PAGES, struct.pack("!QIBBH", 0, 0, 0, 0, 0)), "page count 0", id="count-0"),
        pytest.param(
            fingerprinted(Pages(0, 2, Encoding.RAW, b"\x04", b"\x05" * 2 * PS)),
            "bits set past its page count",
            id="bitmap-overflow",
        ),
        pytest.param(with_payload_byte(raw_pages(0, 1), 13, 1), "non-zero reserved bytes", id="reserved-byte-set"),
        pytest.param(
            fingerprinted(Pages(0, 1, Encoding.RAW, b"\x00", b"\x05" * (PS - 1))),
            "raw PAGES frame holds 4095 bytes, expected 4096",
            id="raw-data-short",
        ),
        pytest.param(
            fingerprinted(Pages(0, 1, Encoding.ZLIB, b"\x00", b"\x05" * (PS + 1))),
            "compressed PAGES frame holds 4097 bytes for 4096",
            id="compressed-data-longer-than-its-pages",
        ),
    ],
)
def test_a_batch_outside_the_image_or_its_own_rules_is_refused_before_writing(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], frame: Frame | bytes, message: str
) -> None:
    recv, peer = streaming(procs, dest, connect)
    peer.send(frame)
    expect_failure(recv, dest, PROTOCOL, message, peer)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        pytest.param([raw_pages(0, 8)], "covers pages 0..7, past the image end (4 pages)", id="pages-for-8-pages"),
        pytest.param(
            [page_list([0, 2, 4, 6])], "names page 6, past the image end (4 pages)", id="page-list-for-8-pages"
        ),
        pytest.param(
            [batch_of(IMAGE), PassEnd(1, 1), End(8, 1, commitment_of(IMAGE + bytes(4 * PS)))],
            "END frame reports 8 pages in 1 batches, but 4 pages",
            id="end-for-8-pages",
        ),
    ],
)
def test_a_stream_for_a_larger_image_than_its_hello_is_refused(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], frames: list[Frame], message: str
) -> None:
    """HELLO announces 4 pages (in batches of up to 8); the stream that follows is for 8."""
    recv, peer = streaming(procs, dest, connect, hello(pages=4, batch=8))
    send_regardless(peer, *frames)
    expect_failure(recv, dest, PROTOCOL, message, peer)


def test_a_hello_for_more_pages_than_the_stream_carries_is_refused_at_end(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer]
) -> None:
    """HELLO announces 8 pages, the stream carries 4 and its END says so: the counts disagree, nothing is published."""
    recv, peer = streaming(procs, dest, connect, hello(pages=8, batch=4))
    peer.send(batch_of(IMAGE), PassEnd(1, 1), End(4, 1, commitment_of(IMAGE)))
    expect_failure(recv, dest, PROTOCOL, "END frame reports 4 pages in 1 batches, but 8 pages", peer)


# --- codecs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec_id", [3, 255])
def test_a_hello_naming_an_unknown_codec_is_refused(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], codec_id: int
) -> None:
    recv = start(procs, dest)
    peer = connect(recv.address)
    peer.send(hello(codec=codec_id))
    expect_turned_away(procs, recv, dest, PROTOCOL, f"unknown codec id {codec_id}", peer)


@pytest.mark.parametrize(
    ("session_codec", "frame", "message"),
    [
        pytest.param(
            Encoding.ZLIB,
            batch_of(IMAGE, codec="zstd"),
            "uses codec id 2, but the session announced zlib=1",
            id="zstd-batch-in-a-zlib-session",
        ),
        pytest.param(
            Encoding.RAW,
            batch_of(IMAGE, codec="zlib"),
            "uses codec id 1, but the session announced none=0",
            id="zlib-batch-in-a-raw-session",
        ),
        pytest.param(
            Encoding.ZLIB,
            fingerprinted(Pages(0, 1, 9, b"\x00", b"\x05" * 100)),
            "uses codec id 9",
            id="unknown-codec-in-a-batch",
        ),
    ],
)
def test_a_batch_encoded_with_another_codec_than_the_sessions_is_refused(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], session_codec: int, frame: Pages, message: str
) -> None:
    recv, peer = streaming(procs, dest, connect, hello(codec=session_codec))
    peer.send(frame)
    expect_failure(recv, dest, PROTOCOL, message, peer)


RAW_IMAGE = batch_of(IMAGE, codec="none")  # pages 0, 2 and 3 in its data (page 1 is zero)


@pytest.mark.parametrize(
    ("session_codec", "frame", "message", "landed"),
    [
        pytest.param(
            Encoding.ZLIB,
            flipped_bit(batch_of(IMAGE), in_fingerprints(batch_of(IMAGE))),
            "CRC mismatch in PAGES frame",
            False,
            id="crc",
        ),
        pytest.param(
            Encoding.ZLIB,
            flipped_bit(batch_of(IMAGE)),
            "batch of pages 0..3: zlib decompression failed",
            False,
            id="zlib-data-flipped",
        ),
        pytest.param(
            Encoding.RAW,
            flipped_bit(RAW_IMAGE, in_page(RAW_IMAGE, 2)),
            "page 3 does not match the fingerprint the sender took of it: damaged in transit",
            True,
            id="raw-data-flipped",
        ),
        pytest.param(
            Encoding.RAW,
            dataclasses.replace(RAW_IMAGE, fingerprints=RAW_IMAGE.fingerprints[:8] + bytes(16)),
            "page 2 (and 1 more of its batch) does not match the fingerprint",
            True,
            id="wrong-fingerprints",
        ),
        pytest.param(
            Encoding.ZLIB,
            fingerprinted(Pages(0, 2, Encoding.ZLIB, b"\x00", b"not deflate at all")),
            "batch of pages 0..1: zlib decompression failed",
            False,
            id="zlib-garbage",
        ),
        pytest.param(
            Encoding.ZSTD,
            fingerprinted(Pages(0, 2, Encoding.ZSTD, b"\x00", b"not a zstd frame")),
            "batch of pages 0..1: zstd decompression failed",
            False,
            id="zstd-garbage",
        ),
    ],
)
def test_a_corrupt_batch_is_an_integrity_error(
    procs: Processes,
    dest: Path,
    connect: Callable[[str], FakePeer],
    session_codec: int,
    frame: Frame | bytes,
    message: str,
    landed: bool,
) -> None:
    """Damage on the link, resumable. Protocol 3: the CRC covers a batch but its page data (a flipped bit there was,
    before, a CRC mismatch); a flip in the data is caught as data that does not decode (resumable now, final
    before) or as a page that does not match its fingerprint, named. A CRC mismatch or undecodable data keeps
    nothing (no page of this session reached DEST.partial); a page that does not match was written, so
    DEST.partial stays for a resume (its fingerprints record what it holds, so the page is sent again)."""
    recv, peer = streaming(procs, dest, connect, hello(codec=session_codec))
    peer.send(frame)
    expect_failure(recv, dest, INTEGRITY, message, peer, resumable=landed)


# --- decompression bombs ---------------------------------------------------------------------------------------

BOMB_BATCH = 512  # pages of 4 KiB: a 2 MiB batch
BOMB_SIZE = 1 << 30  # what every bomb inflates to


@functools.cache
def zlib_bomb() -> bytes:
    """1 GiB of zeros as one raw-deflate batch: about 1 MiB, so it fits the 2 MiB batch it claims to be."""
    stream = zlib_ng.compressobj(6, zlib_ng.DEFLATED, -15)
    chunk = bytes(1 << 24)
    body = b"".join(stream.compress(chunk) for _ in range(BOMB_SIZE // len(chunk)))
    return body + stream.flush(zlib_ng.Z_FULL_FLUSH)


@functools.cache
def zstd_frame_of_zeros() -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(BOMB_SIZE))


def zstd_bomb(announce: int | None) -> bytes:
    """1 GiB of zeros as one zstd frame whose header announces ``announce`` bytes (None: no content size at all)."""
    frame = zstd_frame_of_zeros()
    descriptor = frame[4]  # frame header descriptor: expect a window byte, then a 4-byte content size
    assert descriptor >> 6 == 2 and not descriptor & 0x27, f"unexpected zstd frame header {frame[:10].hex()}"
    if announce is None:
        return frame[:4] + b"\x00" + frame[5:6] + frame[10:]
    return frame[:6] + struct.pack("<I", announce) + frame[10:]


def wait_with_peak_memory(recv: Proc, timeout: float) -> tuple[int, str, int]:
    """Like Proc.wait, but also learn the receiver's peak resident memory (bytes).

    From /proc/PID/status VmHWM, polled until the process ends: it is the high-water mark of the receiver's own
    memory map. (wait4's ru_maxrss would also count what the forking pytest process held before exec.)
    """
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        try:
            for line in Path(f"/proc/{recv.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        pid, status, _usage = os.wait4(recv.popen.pid, os.WNOHANG)
        if pid:
            break
        assert time.monotonic() < deadline, "the receiver did not exit"
        time.sleep(0.005)
    recv.popen.returncode = os.waitstatus_to_exitcode(status)
    assert recv.popen.stdout is not None and recv.popen.stderr is not None
    err = recv.popen.stderr.read()
    recv.popen.stdout.close()
    recv.popen.stderr.close()
    return recv.popen.returncode, err, peak


@pytest.mark.parametrize(
    ("codec", "bomb", "message"),
    [
        pytest.param(
            Encoding.ZLIB, zlib_bomb, "zlib batch decompressed to 2097152+ bytes, expected 2097152", id="zlib"
        ),
        pytest.param(
            Encoding.ZSTD,
            lambda: zstd_bomb(BOMB_SIZE),
            "zstd batch announces 1073741824 bytes, expected 2097152",
            id="zstd-announcing-1GiB",
        ),
        pytest.param(
            Encoding.ZSTD,
            lambda: zstd_bomb(BOMB_BATCH * PS),
            "zstd decompression failed",
            id="zstd-announcing-one-batch",
        ),
        pytest.param(Encoding.ZSTD, lambda: zstd_bomb(None), "zstd batch announces", id="zstd-announcing-nothing"),
    ],
)
def test_a_decompression_bomb_is_an_integrity_error_within_one_batch_of_memory(
    procs: Processes,
    dest: Path,
    connect: Callable[[str], FakePeer],
    codec: int,
    bomb: Callable[[], bytes],
    message: str,
) -> None:
    """A batch that claims 2 MiB of pages and inflates to 1 GiB is refused; the receiver's peak memory stays far
    below what inflating it would take."""
    data = bomb()
    assert len(data) <= BOMB_BATCH * PS, "the bomb passes the size check and reaches a decompressor"
    recv, peer = streaming(procs, dest, connect, hello(pages=BOMB_BATCH, codec=codec, batch=BOMB_BATCH))
    peer.send(fingerprinted(Pages(0, BOMB_BATCH, codec, bytes(BOMB_BATCH // 8), data)))
    abort = last_word(peer)
    peer.close()
    code, err, peak = wait_with_peak_memory(recv, EXIT_WITHIN)
    assert code == INTEGRITY and message in error_line(err), err
    assert isinstance(abort, Abort) and abort.code == INTEGRITY
    assert peak < BOMB_SIZE // 4, f"peak resident memory {peak >> 20} MiB: the bomb was inflated"
    assert_no_destination(dest)


@functools.cache
def deflate_ending_mid_match(size: int) -> bytes:
    """Raw deflate that inflates to more than ``size`` bytes, cut just after a match that crosses ``size``.

    Asked for at most ``size`` bytes, zlib returns exactly ``size`` and leaves no input over: the excess is pending
    inside the stream's state, not in ``unconsumed_tail``.
    """
    stream = zlib_ng.compressobj(9, zlib_ng.DEFLATED, -15)
    whole = stream.compress(b"\x01" * (size + 300)) + stream.flush(zlib_ng.Z_FULL_FLUSH)
    for cut in range(len(whole), 0, -1):
        bounded = zlib_ng.decompressobj(-15)
        exact = len(bounded.decompress(whole[:cut], size)) == size and not bounded.unconsumed_tail
        if exact and len(zlib_ng.decompressobj(-15).decompress(whole[:cut])) > size:
            return whole[:cut]
    raise AssertionError("no such cut")


def test_a_zlib_batch_inflating_past_its_pages_mid_match_is_an_integrity_error(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer]
) -> None:
    """docs/PROTOCOL.md: decompression must yield exactly normal × page_size bytes, and the receiver fails otherwise.
    Here the batch inflates to 16,514 bytes for 4 pages (16,384); END's digest is that of the first 16,384."""
    data = deflate_ending_mid_match(4 * PS)
    recv, peer = streaming(procs, dest, connect, hello(codec=Encoding.ZLIB))
    batch = fingerprinted(Pages(0, 4, Encoding.ZLIB, b"\x00", data))
    peer.send(batch, PassEnd(1, 1), End(4, 1, commitment_of(b"\x01" * 4 * PS)))
    expect_failure(recv, dest, INTEGRITY, "zlib batch decompressed to", peer)


# --- the end of the stream -------------------------------------------------------------------------------------


def test_a_wrong_digest_is_an_integrity_error_and_the_sender_hears_a_mismatch(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer]
) -> None:
    recv, peer = streaming(procs, dest, connect)
    wrong = bytes(a ^ b for a, b in zip(commitment_of(IMAGE), b"\x01" * 16, strict=True))
    peer.send(batch_of(IMAGE), PassEnd(1, 1), End(4, 1, wrong))
    result = last_word(peer)
    assert isinstance(result, Result) and result.status == RESULT_DIGEST_MISMATCH
    assert result.digest == digest_of(IMAGE), "RESULT carries what DEST really hashes to"
    expect_failure(recv, dest, INTEGRITY, "digest mismatch")


def test_frames_after_end_are_never_read_nor_applied(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer]
) -> None:
    """The receiver stops reading at END and verifies what it has. Frames written after END (here a PAGES frame that
    would overwrite every page, then a second END describing that) are neither applied nor waited for: the image
    END's digest describes is published, exit 0, and DEST never holds the trailing pages."""
    other = guest_image(4)[::-1]
    recv, peer = streaming(procs, dest, connect)
    peer.send(
        batch_of(IMAGE),
        PassEnd(1, 1),
        End(4, 1, commitment_of(IMAGE)),
        batch_of(other),
        End(4, 2, commitment_of(other)),
    )
    code, _, err = recv.wait(timeout=EXIT_WITHIN)
    assert code == 0, err
    assert dest.read_bytes() == IMAGE
    assert not Path(f"{dest}.partial").exists()


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        pytest.param([hello()], "unexpected HELLO frame during streaming", id="second-hello"),
        pytest.param([batch_of(IMAGE), hello()], "unexpected HELLO frame during streaming", id="hello-after-pages"),
        pytest.param([Welcome()], "unexpected WELCOME frame during streaming", id="welcome-from-the-sender"),
        pytest.param([PassEnd(2, 0)], "PASS_END 2", id="pass-end-skipping-a-pass"),
        pytest.param([batch_of(IMAGE), PassEnd(1, 3)], "PASS_END 1 reports 3 batches", id="pass-end-miscounting"),
        pytest.param(
            [batch_of(IMAGE), End(4, 7, commitment_of(IMAGE))],
            "END frame reports 4 pages in 7 batches",
            id="end-miscount",
        ),
        pytest.param([framed(0x55, b"")], "unknown frame type 0x55", id="unknown-frame-type"),
        pytest.param([framed(FrameType.KEEPALIVE, b"", flags=1)], "KEEPALIVE frame has unknown flags", id="flags"),
        pytest.param([b"MV" + encode(wire.Keepalive())[2:]], "bad frame magic 0x4d56", id="bad-magic"),
    ],
)
def test_a_frame_out_of_place_is_refused(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], frames: list[Frame | bytes], message: str
) -> None:
    recv, peer = streaming(procs, dest, connect)
    send_regardless(peer, *frames)
    expect_failure(recv, dest, PROTOCOL, message, peer)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        pytest.param(batch_of(IMAGE), "PAGES", id="pages"),
        pytest.param(End(4, 0, bytes(16)), "END", id="end"),
    ],
)
def test_a_frame_before_the_hello_is_refused(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], frame: Frame, message: str
) -> None:
    recv = start(procs, dest)
    peer = connect(recv.address)
    peer.send(frame)
    expect_turned_away(procs, recv, dest, PROTOCOL, message, peer)


# --- time ------------------------------------------------------------------------------------------------------


def test_a_slow_loris_hello_ends_at_the_handshake_timeout(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer]
) -> None:
    """One byte of HELLO every 0.5 s never trips the 2 s silence timer, but the handshake as a whole is bounded."""
    recv = start(procs, dest)
    peer = connect(recv.address)
    started = time.monotonic()
    for byte in STREAM[0]:
        if recv.popen.poll() is not None:
            break
        try:
            peer.sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed <= 6, f"the receiver gave up after {elapsed:.1f}s"
    expect_turned_away(procs, recv, dest, NETWORK, "handshake not completed within", peer)


# --- symlinks at DEST and DEST.partial -------------------------------------------------------------------------

PRECIOUS = b"precious: no vmmig run may change this file"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """The file a planted symlink points at."""
    path = tmp_path / "victim"
    path.write_bytes(PRECIOUS)
    return path


@pytest.mark.parametrize(
    ("planted_at", "target", "message"),
    [
        pytest.param("", "victim", "already exists (use --force", id="dest"),
        pytest.param(".partial", "victim", "leftover", id="partial"),
        pytest.param(".partial", "nowhere", "leftover", id="partial-dangling"),
    ],
)
def test_a_symlink_at_dest_or_its_partial_is_refused_before_listening(
    procs: Processes, tmp_path: Path, dest: Path, victim: Path, planted_at: str, target: str, message: str
) -> None:
    link = Path(f"{dest}{planted_at}")
    link.symlink_to(tmp_path / target)
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", *TIMEOUTS, str(dest), timeout=EXIT_WITHIN)
    assert code == DESTINATION and message in error_line(err) and "listening" not in err
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / target)
    assert victim.read_bytes() == PRECIOUS and not (tmp_path / "nowhere").exists()


def test_a_symlink_planted_at_dest_partial_while_listening_is_not_followed(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], victim: Path
) -> None:
    """Planted between the start-up check and the HELLO: DEST.partial is created O_EXCL | O_NOFOLLOW, so the receiver
    refuses (exit 4), writes nothing through the link, and leaves the link it did not create where it is."""
    recv = start(procs, dest)
    partial = Path(f"{dest}.partial")
    partial.symlink_to(victim)
    peer = connect(recv.address)
    peer.send(hello())
    word = last_word(peer)
    code, _, err = recv.wait(timeout=EXIT_WITHIN)
    assert code == DESTINATION and "appeared while preparing" in error_line(err)
    assert isinstance(word, Abort) and word.code == DESTINATION
    assert partial.is_symlink() and not dest.exists()
    assert victim.read_bytes() == PRECIOUS


def publish_through(procs: Processes, dest: Path, connect: Callable[[str], FakePeer], *args: str) -> None:
    """Run the valid stream into a receiver started with ``args``: it must verify and publish."""
    recv = start(procs, dest, *args)
    peer = connect(recv.address)
    feed_prefix(peer, len(STREAM_BYTES))
    result = last_word(peer)
    code, _, err = recv.wait(timeout=EXIT_WITHIN)
    assert code == 0, err
    assert isinstance(result, Result) and result.status == RESULT_VERIFIED


@pytest.mark.parametrize("planted_at", ["", ".partial"], ids=["dest", "partial"])
def test_with_force_a_planted_symlink_is_replaced_not_followed(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], victim: Path, planted_at: str
) -> None:
    """--force replaces a symlink at DEST with the verified file (rename over the link) and removes one at
    DEST.partial (unlink of the link); the file the link pointed at keeps its content."""
    Path(f"{dest}{planted_at}").symlink_to(victim)
    publish_through(procs, dest, connect, "--force")
    assert not dest.is_symlink() and dest.read_bytes() == IMAGE
    assert not os.path.lexists(f"{dest}.partial")
    assert victim.read_bytes() == PRECIOUS


def test_a_symlink_planted_at_dest_during_the_transfer_is_never_followed(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], victim: Path
) -> None:
    """DEST was free at start-up and a symlink appears there before END: whatever the receiver decides, it never
    writes through the link. (Today it renames the verified file over the link and exits 0; refusing with exit 4,
    as an existing DEST is refused at start-up, would satisfy this test too.)"""
    recv, peer = streaming(procs, dest, connect)
    dest.symlink_to(victim)
    peer.send(*valid_stream()[1:])
    last_word(peer)
    code, _, err = recv.wait(timeout=EXIT_WITHIN)
    assert victim.read_bytes() == PRECIOUS
    if code == 0:
        assert not dest.is_symlink() and dest.read_bytes() == IMAGE
    else:
        assert code == DESTINATION and dest.is_symlink(), err
    assert not os.path.lexists(f"{dest}.partial")


# --- ABORT from the sender -------------------------------------------------------------------------------------

C0_AND_DEL = "".join(chr(c) for c in [*range(32), 0x7F]) * 32  # 1056 characters, cut to 1024 bytes on the wire
C1_BIDI_SEPARATORS = "\u009b31m\u202e\u2028\u2029\u200b\u0085\x1b]0;owned\x07" * 64


@pytest.mark.parametrize("message", [C0_AND_DEL, C1_BIDI_SEPARATORS], ids=["c0-and-del", "c1-bidi-separators"])
def test_an_abort_full_of_control_characters_is_printed_as_one_clean_line(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer], message: str
) -> None:
    wire = message.encode()[:1024]
    assert len(wire) == 1024
    recv, peer = streaming(procs, dest, connect)
    peer.send(framed(FrameType.ABORT, struct.pack("!H", 3) + wire))
    line = expect_failure(recv, dest, PEER, "vmmig recv: peer: ")
    text = line.removeprefix("vmmig recv: peer: ")
    assert text and all(ch.isprintable() for ch in text), repr(text)
    assert not {"\x1b", "\x9b", "\u202e", "\r"} & set(line)


def test_an_abort_instead_of_a_hello_is_relayed_as_the_peers_reason(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer]
) -> None:
    recv = start(procs, dest)
    peer = connect(recv.address)
    peer.send(Abort(3, "source image vanished"))
    expect_turned_away(procs, recv, dest, PEER, "peer: source image vanished", peer)


# --- an image too large to keep track of -----------------------------------------------------------------------


def limit_private_memory(pid: int, headroom: int = 1 << 30) -> None:
    """Cap the process's private writable memory (RLIMIT_DATA) at what it uses now plus ``headroom``.

    Shared file mappings (DEST itself) do not count, so only an allocation that tracks the image in memory (one
    fingerprint per page) can hit the cap, and it then fails instead of filling this machine's RAM.
    """
    with open(f"/proc/{pid}/status") as status:
        data_kib = next(int(line.split()[1]) for line in status if line.startswith("VmData:"))
    limit = data_kib * 1024 + headroom
    resource.prlimit(pid, resource.RLIMIT_DATA, (limit, limit))
    assert resource.prlimit(pid, resource.RLIMIT_DATA)[0] == limit


def start_discarding(procs: Processes, tmp_path: Path) -> Proc:
    """`vmmig recv --discard` (no DEST argument), ready to accept."""
    ready = tmp_path / "ready-discard"
    recv = procs.start("recv", "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--discard", *TIMEOUTS)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert recv.popen.poll() is None and time.monotonic() < deadline, "recv --discard did not become ready"
        time.sleep(0.02)
    recv.address = ready.read_text().strip()
    return recv


@pytest.mark.parametrize(
    ("mode", "image_size"), [("sparse", 1 << 40), ("discard", 1 << 50)], ids=["sparse-1TiB", "discard-1PiB"]
)
def test_a_hello_for_an_image_too_large_to_track_is_refused_cleanly(
    procs: Processes, tmp_path: Path, dest: Path, connect: Callable[[str], FakePeer], mode: str, image_size: int
) -> None:
    """HELLO allows images up to 2^50 bytes of 512-byte pages. A receiver that cannot hold one says so like a full
    disk (exit 4, before WELCOME) and leaves no DEST.partial, instead of an internal error (exit 1 means a bug)."""
    recv = start_discarding(procs, tmp_path) if mode == "discard" else start(procs, dest, "--sparse")
    limit_private_memory(recv.popen.pid)
    peer = connect(recv.address)
    peer.send(Hello(512, image_size, Encoding.ZLIB, 1, b"h" * 16, batch_pages=4))
    word = last_word(peer)
    expect_failure(recv, dest, DESTINATION, "")
    assert isinstance(word, Abort) and word.code == DESTINATION


def test_a_page_sent_twice_in_one_pass_is_refused(
    procs: Processes, dest: Path, connect: Callable[[str], FakePeer]
) -> None:
    """Within a pass a page may travel once: two copies would race between the decompression workers."""
    recv, peer = streaming(procs, dest, connect, hello(codec=Encoding.RAW))
    peer.send(
        fingerprinted(Pages(0, 2, Encoding.RAW, b"\x00", b"\x01" * 2 * PS)),
        fingerprinted(Pages(1, 2, Encoding.RAW, b"\x00", b"\x02" * 2 * PS)),
    )
    expect_failure(recv, dest, PROTOCOL, "sent twice in one pass", peer)
