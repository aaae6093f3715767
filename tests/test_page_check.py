"""Protocol 3 checks each page once, end to end: the sender's fingerprint of every page travels with it and the
receiver checks what it landed against it (docs/PROTOCOL.md, "Checking each page").

A frozen pass (plain mode, a paused guest) sends raw pages straight from the source's mapping; a page that changes
between its fingerprint and its send is then caught by that check, and the sender reports a source that changed
(exit 3), not a link fault that --retries would repeat.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest

from migrate_cli.errors import CorruptFrame
from migrate_cli.failure import Failure
from migrate_cli.receiver.discard import DiscardSink
from migrate_cli.sender.pipeline import SendPipeline
from migrate_cli.sender.source import SourceImage
from migrate_cli.wire import codec as codecs
from migrate_cli.wire.frames import Abort, Hello, Pages, Scattered, Welcome

from .conftest import (
    Processes,
    address_of,
    assert_no_destination,
    last_line,
    make_image,
    migrate_through_fault,
)
from .fakepeer import FakePeer
from .guest import Guest, start_guest

PS = 4096


def _first_batch(image: Path, frozen: bool, codec: str = "none") -> tuple[SourceImage, SendPipeline, Pages]:
    source = SourceImage(str(image))
    pipeline = SendPipeline(source, codecs.by_name(codec), 1, 1, 64, Failure())
    pipeline.start()
    pipeline.feed([(0, 64)], frozen=frozen)
    (frame,) = pipeline.out.get(timeout=10).frames
    return source, pipeline, frame


def _data(frame: Pages) -> bytes:
    parts = frame.data.parts if isinstance(frame.data, Scattered) else [frame.data]
    return b"".join(bytes(part) for part in parts)


def _rewrite_page(image: Path, page: int) -> None:
    with image.open("r+b") as f:
        f.seek(page * PS)
        f.write(b"\xa5" * PS)


def test_a_frozen_raw_pass_sends_pages_from_the_mapping_and_the_receiver_check_catches_a_change(
    tmp_path: Path,
) -> None:
    """No user-space copy where the source must not change: the frame's data is the mapping itself, so a page
    rewritten after its fingerprint was taken shows in the data, and the receiver's page check names it."""
    image = make_image(tmp_path / "img", 64 * PS, profile="text")
    source, pipeline, frame = _first_batch(image, frozen=True)
    try:
        assert frame.normal_count == 64 and len(frame.fingerprints) == 64 * 8
        _rewrite_page(image, 5)
        assert _data(frame)[5 * PS : 6 * PS] == b"\xa5" * PS, "the data is a view of the mapping, not a copy"
        with pytest.raises(CorruptFrame, match="page 5 does not match the fingerprint the sender took of it"):
            DiscardSink(64 * PS, PS).write_batch(frame, _data(frame))
    finally:
        pipeline.stop()
        del frame
        source.close()


def test_a_live_pass_keeps_its_copy_so_what_was_sent_matches_its_fingerprint(tmp_path: Path) -> None:
    """Before the pause a guest may write any page: the worker copies the pages first, and fingerprint and data
    are both of that copy, so a later write cannot make them disagree."""
    image = make_image(tmp_path / "img", 64 * PS, profile="text")
    source, pipeline, frame = _first_batch(image, frozen=False)
    try:
        _rewrite_page(image, 5)
        assert _data(frame)[5 * PS : 6 * PS] != b"\xa5" * PS
        sink = DiscardSink(64 * PS, PS)
        sink.write_batch(frame, _data(frame))  # no mismatch
        assert sink.fingerprints[5] == frame.fingerprint_array()[5]
    finally:
        pipeline.stop()
        del frame
        source.close()


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_a_frozen_compressed_pass_carries_the_fingerprints_of_what_it_compressed(tmp_path: Path, codec: str) -> None:
    """A batch without zero pages is compressed straight from the mapping of a frozen source; its fingerprints are
    those of the pages it compressed, checked by the receiver after decoding."""
    image = make_image(tmp_path / "img", 64 * PS, profile="text")
    source, pipeline, frame = _first_batch(image, frozen=True, codec=codec)
    try:
        assert frame.encoding != 0, "text pages compress"
        decoded = codecs.by_name(codec).decompressor().decompress(frame.data, frame.normal_count * PS)
        DiscardSink(64 * PS, PS).write_batch(frame, decoded)  # no mismatch
        assert decoded == image.read_bytes()
    finally:
        pipeline.stop()
        del frame
        source.close()


def test_a_damaged_page_names_itself_and_a_retry_sends_it_again(
    procs: Processes, tmp_path: Path, image_8m: Path
) -> None:
    """A bit flipped in page data is not in any CRC any more: the receiver's check finds it, names the page, and
    keeps the session; the sender's --retries resumes it and the page is sent again: DEST ends byte-identical."""
    dest = tmp_path / "dest.img"
    send_args = ["--compress", "none", "--batch-size", "1M", "--retries", "2", "--retry-delay", "0.2s"]
    run = migrate_through_fault(procs, image_8m, dest, "flip", 1_500_000, [], send_args)
    assert run.proxy.fired.is_set()
    assert (run.send_code, run.recv_code) == (0, 0), run.send_err + run.recv_err
    assert re.search(r"page \d+ does not match the fingerprint the sender took of it", run.send_err)
    assert dest.read_bytes() == image_8m.read_bytes()


def test_a_source_rewritten_during_a_plain_copy_is_exit_3_however_it_is_caught(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    """Plain mode promises a source that does not change. A page written while it is in flight fails the receiver's
    check; one written after fails the sender's re-scan. Either way the sender says the source changed (exit 3),
    and it does not retry: a resume would meet the same moving source. Three rounds, so that both ways are likely
    to be seen (which one happens depends on timing)."""
    for round_ in range(3):
        image = make_image(tmp_path / f"vm{round_}.ram", 16 << 20, seed=round_ + 1)
        guest = start_guest(guests, image, tmp_path, "--rate", "40M", "--threads", "2", "--seed", str(round_))
        dest = tmp_path / f"dest{round_}.ram"
        recv = procs.recv(dest, "--resume-window", "0")
        send = procs.send(image, recv.address, "--compress", "none", "--max-bandwidth", "40M", "--retries", "3")
        code, _, err = send.wait(120)
        recv_code, _, recv_err = recv.wait(30)
        assert code == 3 and "changed while it was sent" in last_line(err), err
        assert "resuming" not in err, "a changed source is not a link fault: no retry"
        assert not dest.exists(), "nothing is published"
        if recv_code == 8:  # the sender's re-scan caught it and told the receiver, which dropped the session
            assert "peer: source" in recv_err
            assert_no_destination(dest)
        else:  # its own page check caught it first: to the receiver that is damage in transit, kept for a resume
            assert recv_code == 7 and "does not match the fingerprint" in recv_err, recv_err
        guest.kill()


def test_a_version_2_sender_is_refused_by_name_not_as_an_integrity_error(procs: Processes, tmp_path: Path) -> None:
    """HELLO keeps a whole-frame CRC in every version: a peer of the previous protocol hears which versions
    disagree (exit 6), never a CRC mismatch."""
    recv = procs.recv(tmp_path / "dest.img", "--resume-window", "0")
    peer = FakePeer.connect(recv.address)
    try:
        peer.send(Hello(PS, 4 * PS, 1, 1, b"v" * 16, batch_pages=4, version=2))
        abort = peer.read_until(Abort)
    finally:
        peer.close()
    assert isinstance(abort, Abort) and abort.code == 6
    assert "peer speaks version 2, this vmmig speaks 3" in abort.message
    assert_no_destination(tmp_path / "dest.img")


def test_a_version_2_receiver_is_refused_by_name(
    procs: Processes, tmp_path: Path, fake_receiver: socket.socket
) -> None:
    image = make_image(tmp_path / "img", 4 * PS)
    send = procs.send(image, address_of(fake_receiver), "--compress", "none")
    peer = FakePeer.accept(fake_receiver)
    try:
        peer.read_until(Hello)
        peer.send(Welcome(version=2))
        code, _, err = send.wait(30)
    finally:
        peer.close()
    assert code == 6 and "peer speaks version 2, this vmmig speaks 3" in last_line(err)


def test_pages_of_a_frozen_pass_that_lie_in_many_pieces_are_copied_not_sent_in_pieces(tmp_path: Path) -> None:
    """At most 64 views of the mapping per frame: a batch whose non-zero pages alternate with zero pages is
    gathered into the worker's buffer instead (one buffer), and still carries one fingerprint per non-zero page."""
    data = np.zeros((256, PS), dtype=np.uint8)
    data[::2] = 7  # 128 separate non-zero pages
    image = tmp_path / "img"
    image.write_bytes(data.tobytes())
    with SourceImage(str(image)) as source:
        pipeline = SendPipeline(source, codecs.by_name("none"), 1, 1, 256, Failure())
        pipeline.start()
        try:
            pipeline.feed([(0, 256)], frozen=True)
            (frame,) = pipeline.out.get(timeout=10).frames
            assert not isinstance(frame.data, Scattered) and len(frame.data) == 128 * PS
            assert len(frame.fingerprints) == 128 * 8
            del frame
        finally:
            pipeline.stop()
