"""The frames of the vmmig wire protocol: their types, fields and limits, and the page-size rule.

Plain data, no bytes: ``protocol.py`` turns these into bytes and back, ``conversation.py`` says which may come
when. docs/PROTOCOL.md describes every field; keep the three in step.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

# 2: END carries a commitment to the digest, not the digest (digest.end_commitment)
# 3: PAGES and PAGE_LIST carry each non-zero page's fingerprint; their CRC covers every byte but the page data
PROTOCOL_VERSION = 3
FRAME_MAGIC = 0x564D  # "VM"

HEADER = struct.Struct("!HBBII")  # magic, type, flags, payload length, crc32(header[:8] + payload)
HEADER_SIZE = HEADER.size  # 12

MIN_PAGE_SIZE = 512
DEFAULT_PAGE_SIZE = 4096  # x86's base page: what a guest's RAM is tracked in
MAX_PAGE_SIZE = 2 * 1024 * 1024
MAX_BATCH_BYTES = 16 * 1024 * 1024  # page bytes one PAGES frame may describe
MAX_BATCH_PAGES = 65536
MAX_ABORT_MESSAGE = 1024
# head + page numbers (PAGE_LIST) + zero bitmap + fingerprints + page data
MAX_PAYLOAD = 8 + 8 * MAX_BATCH_PAGES + MAX_BATCH_PAGES // 8 + 8 * MAX_BATCH_PAGES + MAX_BATCH_BYTES
FINGERPRINT_SIZE = 8  # xxh3_64 of a page, little-endian (digest.py)
MAX_IMAGE_SIZE = 1 << 50


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    KEEPALIVE = 0x03
    PAGES = 0x10
    PASS_END = 0x11
    PAGE_LIST = 0x12
    RESUME_STATE = 0x13
    PASS_LANDED = 0x14
    END = 0x20
    RESULT = 0x21
    HANDOFF = 0x22
    HANDOFF_DONE = 0x23
    ABORT = 0x7F


class Encoding(IntEnum):
    """How the data of one PAGES frame is encoded; the codec registry maps these ids to codecs."""

    RAW = 0
    ZLIB = 1
    ZSTD = 2


# --- frames -------------------------------------------------------------------------------------------------------


MAX_URI = 256
RESUME_CHUNK_PAGES = 131072  # fingerprints per RESUME_STATE frame: 1 MiB before compression

FEATURE_QEMU_HANDOFF = 1  # HELLO feature: after RESULT, hand the VM over with QEMU's own migration (qemu.py)
FEATURE_RESUME = 2  # HELLO feature: this continues an interrupted session (same session id); see resume.py
FEATURE_PASS_LANDED = 4  # HELLO feature: tell me when each pass is in DEST (PASS_LANDED); a live sender asks

FLAG_RESUMABLE = 0x01  # ABORT header flag: the sender of the ABORT keeps the session for a resume


@dataclass(frozen=True, slots=True)
class Hello:
    """Sender -> receiver, first frame on a channel: who we are and what the image is."""

    page_size: int
    image_size: int
    codec: int  # Encoding id of the codec the sender will use (batches may still go RAW)
    level: int
    session_id: bytes  # 16 random bytes naming this migration
    batch_pages: int  # most pages any PAGES frame will carry
    channels: int = 1
    channel_index: int = 0
    features: int = 0
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    """Receiver -> sender: destination prepared (space allocated), send pages."""

    features: int = 0
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Either way: I am alive, during silent phases (preallocation, digest)."""


class Scattered:
    """Page data in several buffers (runs of pages viewed straight in the source's mapping), one frame's data all the
    same: sent with one sendmsg, never joined (the raw path without a user-space copy, sender/pipeline.py)."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = tuple(parts)
        self.nbytes = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self.nbytes


class Unread:
    """Page data still in the socket: the receiver has read a frame's head and decides where its data goes (into a
    pool buffer, or spliced straight into DEST: receiver/pipeline.py)."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes


PageData = bytes | bytearray | memoryview | Scattered | Unread


@dataclass(frozen=True, slots=True)
class Pages:
    """Sender -> receiver: a batch of ``count`` pages from ``start``; decodable on its own, in any order.

    ``zero_bitmap`` has bit i (LSB first within each byte) set when page start+i is all zeros; ``data`` holds the
    other pages, in order, encoded with ``encoding``; ``fingerprints`` the xxh3_64 of each of those pages as the
    sender read it (8 bytes little-endian each, in the same order): the receiver checks every page it lands against
    its fingerprint, which is the check on page data (the frame's CRC covers everything else).

    With ``indices`` (big-endian u64 page numbers, strictly increasing) the batch is a PAGE_LIST frame: page i of
    the batch is page ``indices[i]`` of the image, so scattered dirty pages travel in full-size batches.
    ``start`` is then the first index.
    """

    start: int
    count: int
    encoding: int
    zero_bitmap: bytes
    data: PageData
    indices: bytes | None = None
    fingerprints: bytes = b""

    def index_array(self) -> np.ndarray:
        """The page numbers this batch covers, in order."""
        if self.indices is None:
            return np.arange(self.start, self.start + self.count, dtype=np.int64)
        return np.frombuffer(self.indices, dtype=">u8").astype(np.int64)

    @property
    def zero_count(self) -> int:
        return int.from_bytes(self.zero_bitmap, "little").bit_count()

    @property
    def normal_count(self) -> int:
        return self.count - self.zero_count

    def fingerprint_array(self) -> np.ndarray:
        """The sender's fingerprints of the non-zero pages, in order (uint64)."""
        return np.frombuffer(self.fingerprints, dtype="<u8").astype(np.uint64)


@dataclass(frozen=True, slots=True)
class PassEnd:
    """Sender -> receiver: pass ``number`` is complete after ``batches`` PAGES frames.

    The receiver applies every batch of a pass before any batch of the next one, so when a page is sent again in a
    later pass, the later copy wins.
    """

    number: int
    batches: int


@dataclass(frozen=True, slots=True)
class PassLanded:
    """Receiver -> sender (once FEATURE_PASS_LANDED is accepted): every batch of pass ``number`` is in DEST.

    A live sender waits for it before its next dirty scan, so that at the switchover nothing of an earlier pass is
    still queued at the receiver: the downtime is then the last pass's alone (sender/precopy.py).
    """

    number: int


@dataclass(frozen=True, slots=True)
class End:
    """Sender -> receiver: every page is sent; ``commitment`` is ``digest.end_commitment`` of what DEST must hash to.

    Not the digest itself: the receiver must compute the digest from DEST to check it and to answer with it in
    RESULT, so a receiver that stored nothing cannot echo the sender's own value back and be called verified.
    """

    total_pages: int
    batches: int
    commitment: bytes


@dataclass(frozen=True, slots=True)
class Result:
    """Receiver -> sender: the digest the receiver computed over DEST; status 0 means verified and published."""

    status: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Abort:
    """Either way: I am stopping; ``code`` is my exit code, ``message`` the one-line reason."""

    code: int
    message: str
    resumable: bool = False  # header flag FLAG_RESUMABLE: reconnect with FEATURE_RESUME to continue


@dataclass(frozen=True, slots=True)
class ResumeState:
    """Receiver -> sender (after WELCOME, resumed sessions only): what DEST.partial holds, page by page.

    ``fingerprints`` are the xxh3-64 fingerprints (digest.py) of pages ``first``.. ``first + count - 1`` as read back
    from DEST.partial; the frames cover the image in order and ``last`` marks the final one.
    """

    first: int
    fingerprints: np.ndarray  # uint64, little-endian on the wire, zlib-compressed
    last: bool


@dataclass(frozen=True, slots=True)
class Handoff:
    """Receiver -> sender (QEMU mode, after WELCOME): the URI where the destination QEMU awaits the device state."""

    uri: str


@dataclass(frozen=True, slots=True)
class HandoffDone:
    """Receiver -> sender (QEMU mode, after RESULT): 0 the destination runs; 1 it could not start."""

    status: int
    message: str = ""


HANDOFF_RUNNING = 0
HANDOFF_FAILED = 1

Frame = (
    Hello
    | Welcome
    | Keepalive
    | Pages
    | PassEnd
    | PassLanded
    | End
    | Result
    | Abort
    | Handoff
    | HandoffDone
    | ResumeState
)

RESULT_VERIFIED = 0
RESULT_DIGEST_MISMATCH = 1


def is_valid_page_size(page_size: int) -> bool:
    """The one page-size rule, for options, state files and HELLO alike: a power of two in MIN..MAX_PAGE_SIZE."""
    return MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and not page_size & (page_size - 1)


def check_page_size(page_size: int) -> None:
    """``is_valid_page_size`` as a ValueError naming the rule (options and state files)."""
    if not is_valid_page_size(page_size):
        raise ValueError(f"page size {page_size} is not a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}")
