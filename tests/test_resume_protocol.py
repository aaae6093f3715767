"""Resume on bytes alone: RESUME_STATE frames, the resumable ABORT flag, reassembly, and the state files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zlib_ng import zlib_ng

from migrate_cli.errors import CorruptFrame, ProtocolError, ResumeRefused
from migrate_cli.receiver.state_file import ReceiverState
from migrate_cli.sender.state_file import SenderState
from migrate_cli.wire.conversation import Role
from migrate_cli.wire.frames import FLAG_RESUMABLE, HEADER, RESUME_CHUNK_PAGES, Abort, FrameType, ResumeState, Welcome
from migrate_cli.wire.protocol import Decoder, encode
from migrate_cli.wire.resume import ResumeCollector, resume_frames

from .encoded import framed


def decode_all(role: Role, data: bytes) -> list:
    decoder = Decoder(role)
    decoder.receive_data(data)
    return list(decoder.frames())


@settings(deadline=None)  # up to 3 MiB of fingerprints: a loaded machine must not fail it on time alone
@given(st.integers(min_value=1, max_value=3 * RESUME_CHUNK_PAGES + 5), st.integers(min_value=0, max_value=2**32))
def test_fingerprints_survive_the_trip_in_page_order(pages: int, seed: int) -> None:
    fps = np.random.default_rng(seed).integers(0, 2**63, size=pages, dtype=np.uint64)
    fps[: pages // 2] = 12345  # the zero-page fingerprint repeats a lot in a real DEST: it compresses
    stream = encode(Welcome(features=2)) + b"".join(encode(f) for f in resume_frames(fps))
    frames = decode_all(Role.SENDER, stream)
    collector = ResumeCollector(pages)
    assert [collector.add(f) for f in frames[1:]][-1] is True
    assert np.array_equal(collector.fingerprints, fps)


def test_frames_out_of_order_or_ending_early_are_refused() -> None:
    fps = np.arange(RESUME_CHUNK_PAGES + 10, dtype=np.uint64)
    first, second = list(resume_frames(fps))
    with pytest.raises(ProtocolError, match="out of order"):
        ResumeCollector(len(fps)).add(second)
    with pytest.raises(ProtocolError, match="end before or after"):
        ResumeCollector(len(fps) + 1).add(ResumeState(0, fps, True))
    with pytest.raises(ProtocolError, match="out of order"):
        ResumeCollector(10).add(first)  # more fingerprints than the image has pages


def test_a_resume_state_that_inflates_beyond_its_count_is_refused() -> None:
    """A bomb: 1 fingerprint announced, a megabyte inside. Inflation stops at what was announced."""
    payload = struct.pack("!QIB3x", 0, 1, 1) + zlib_ng.compress(bytes(1 << 20), 9)
    with pytest.raises(ProtocolError, match="exactly 1 fingerprints"):
        decode_all(Role.SENDER, encode(Welcome()) + framed(FrameType.RESUME_STATE, payload))


@pytest.mark.parametrize(
    ("head", "message"),
    [((0, 0, 1), "0 fingerprints"), ((0, RESUME_CHUNK_PAGES + 1, 1), "fingerprints"), ((0, 1, 2), "last=2")],
)
def test_resume_state_header_limits(head: tuple[int, int, int], message: str) -> None:
    payload = struct.pack("!QIB3x", *head) + zlib_ng.compress(bytes(8))
    with pytest.raises(ProtocolError, match=message):
        decode_all(Role.SENDER, encode(Welcome()) + framed(FrameType.RESUME_STATE, payload))


def test_resume_state_is_only_for_the_sender_after_welcome() -> None:
    frame = encode(ResumeState(0, np.zeros(1, dtype=np.uint64), True))
    with pytest.raises(ProtocolError, match="unexpected RESUME_STATE"):
        decode_all(Role.SENDER, frame)
    with pytest.raises(ProtocolError, match="unexpected RESUME_STATE"):
        decode_all(Role.RECEIVER, frame)


def test_abort_carries_the_resumable_flag_and_no_other_frame_may() -> None:
    resumable = encode(Abort(5, "no data from peer for 2s", resumable=True))
    assert HEADER.unpack(resumable[:12])[2] == FLAG_RESUMABLE
    assert decode_all(Role.SENDER, resumable) == [Abort(5, "no data from peer for 2s", True)]
    assert decode_all(Role.SENDER, encode(Abort(7, "digest mismatch"))) == [Abort(7, "digest mismatch", False)]
    with pytest.raises(ProtocolError, match="unknown flags 0x01"):
        decode_all(Role.SENDER, framed(FrameType.WELCOME, struct.pack("!HI", 1, 0), flags=FLAG_RESUMABLE))
    with pytest.raises(ProtocolError, match="unknown flags 0x02"):
        decode_all(Role.SENDER, framed(FrameType.ABORT, struct.pack("!H", 5), flags=2))


def test_a_crc_mismatch_is_a_resumable_integrity_error() -> None:
    data = bytearray(encode(Abort(5, "x")))
    data[-1] ^= 1
    with pytest.raises(CorruptFrame) as caught:
        decode_all(Role.SENDER, bytes(data))
    assert caught.value.resumable and caught.value.exit_code == 7


# --- state files ------------------------------------------------------------------------------------------------


def test_receiver_state_round_trips_and_names_every_mismatch(tmp_path: Path) -> None:
    dest = str(tmp_path / "dest.img")
    Path(dest + ".partial").write_bytes(b"")
    state = ReceiverState("ab" * 16, 8192, 4096, 1, 64)
    state.save(dest)
    assert ReceiverState.load(dest) == state
    assert state.mismatch(bytes.fromhex("ab" * 16), 8192, 4096, 1, 64) is None
    assert "not the interrupted session" in str(state.mismatch(b"\0" * 16, 8192, 4096, 1, 64))
    assert "image size 4096 differs" in str(state.mismatch(bytes.fromhex("ab" * 16), 4096, 4096, 1, 64))
    assert "codec id 2 differs" in str(state.mismatch(bytes.fromhex("ab" * 16), 8192, 4096, 2, 64))


def test_receiver_state_missing_or_torn_is_refused_clearly(tmp_path: Path) -> None:
    dest = str(tmp_path / "dest.img")
    with pytest.raises(ResumeRefused, match="nothing to resume"):
        ReceiverState.load(dest)
    Path(dest + ".partial").write_bytes(b"")
    with pytest.raises(ResumeRefused, match="has no state file"):
        ReceiverState.load(dest)
    Path(dest + ".partial.state").write_text('{"version": 1, "session": ')
    with pytest.raises(ResumeRefused, match="unreadable"):
        ReceiverState.load(dest)


def test_sender_state_refuses_another_image_or_options(tmp_path: Path) -> None:
    path = str(tmp_path / "vmmig" / "send.json")
    saved = SenderState("cd" * 16, "vm.ram", 1, 2, 8192, 4096, "zlib", 1, 64, "127.0.0.1:4444")
    saved.save(path)
    assert json.loads(Path(path).read_text())["session"] == "cd" * 16
    loaded = SenderState.load(path, "vm.ram", "127.0.0.1:4444")
    loaded.check_same(saved)
    elsewhere = SenderState("ef" * 16, "vm.ram", 1, 2, 8192, 4096, "zlib", 1, 64, "10.0.0.2:4444")
    loaded.check_same(elsewhere)  # the receiver may come back on another address: the session id decides
    for changed, named in (
        (SenderState("ef" * 16, "x", 1, 3, 8192, 4096, "zlib", 1, 64, "a"), "source file"),
        (SenderState("ef" * 16, "x", 1, 2, 8192, 4096, "zstd", 1, 64, "a"), "--compress"),
        (SenderState("ef" * 16, "x", 1, 2, 8192, 4096, "zlib", 1, 32, "a"), "--batch-size"),
    ):
        with pytest.raises(ResumeRefused, match=named):
            loaded.check_same(changed)
    SenderState.remove(path)
    with pytest.raises(ResumeRefused, match="no interrupted migration"):
        SenderState.load(path, "vm.ram", "127.0.0.1:4444")
