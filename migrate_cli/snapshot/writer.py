"""`vmmig save`: the sender's pipeline (sender/pipeline.py) encodes the image's batches; this writes its frames to
FILE.partial (created exclusively) with a header, a PASS_END and END, the trailer and the footer, then publishes
FILE by a rename once the file is complete, synced and its header and trailer read back.

Batches come from the workers in any order; the index records where each page's frame landed in the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field

import numpy as np
from zlib_ng import zlib_ng

from ..errors import DestinationError, MigrateError, QemuError, UsageError
from ..failure import Failure, Stopped
from ..guest.device_state import take_device_state
from ..guest.pause import Pauser, QmpPauser
from ..guest.qemu import SourceHandoff, check_backend, set_ignore_shared
from ..receiver.dest_checks import check_destination, partial_path
from ..safefile import create_exclusive, fsync_directory
from ..sender.guest_hold import GuestHold
from ..sender.options import default_batch_size
from ..sender.pipeline import RING, SendPipeline
from ..sender.reporting import notice
from ..sender.source import SourceImage
from ..stats import Stats
from ..wire import codec as codecs
from ..wire.digest import end_commitment, image_digest
from ..wire.frames import End
from ..wire.protocol import encode_parts
from .format import (
    FLAG_DEVICE_STATE,
    FLAG_INCREMENTAL,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_DEVICE_STATE,
    NO_BASE,
    SECTION_BASE,
    SECTION_QDEV,
    Footer,
    Header,
    SnapshotCorrupt,
    Trailer,
    decode_footer,
    decode_header,
    decode_trailer,
    encode_footer,
    encode_header,
    encode_sections,
    encode_trailer,
    pack_pages,
    unpack_pages,
)
from .heap import reuse_large_buffers
from .passes import FilePasses, LivePlan, run_passes
from .reader import SnapshotReader

IOV_MAX = 1024  # buffers one writev takes


@dataclass(frozen=True)
class SaveOptions:
    image: str
    file: str
    codec: str = codecs.DEFAULT_CODEC
    level: int | None = None
    threads: int = 1
    page_size: int = 4096
    force: bool = False
    pauser: Pauser | None = None  # --pause-pid, --qmp, pause hooks: stop-and-copy, or live with plan.live
    plan: LivePlan = field(default_factory=LivePlan)
    leave_running: bool = False  # resume the guest once FILE is published
    base: str | None = None  # incremental: the base snapshot's path
    qemu_handoff: bool = False  # also store QEMU's device state (the pauser is a QmpPauser)


@dataclass(frozen=True)
class SaveReport:
    file: str
    image_bytes: int
    file_bytes: int
    pages: int
    zero_pages: int
    frames: int
    seconds: float
    codec: str
    level: int
    passes: int = 1
    pages_stored: int = 0  # pages this file carries (an incremental one: those that differ from its base)
    paused: bool = False  # the guest was left paused
    device_state_bytes: int = 0  # QEMU's device state stored (--qemu-handoff)


class Output:
    """FILE.partial, written sequentially; its offset is where the next frame goes."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = create_exclusive(path, 0o600)
        except FileExistsError:
            raise DestinationError(f"{path} appeared while preparing (another vmmig save?)") from None
        except OSError as exc:
            raise DestinationError(f"{path}: cannot create: {exc.strerror}") from None
        self.offset = 0

    def write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        try:
            while views:
                written = os.writev(self.fd, views[:IOV_MAX])
                self.offset += written
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if written:
                    views[0] = views[0][written:]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DestinationError(f"{self.path}: no space left on device") from None
            raise DestinationError(f"{self.path}: write failed: {exc.strerror}") from None

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise DestinationError(f"{self.path}: flush failed: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def save(opts: SaveOptions) -> SaveReport:
    """Write IMAGE's snapshot to FILE; FILE appears only complete (an existing FILE is kept unless ``force``).
    With a pauser the guest is left paused (resumed once FILE is published with ``leave_running``); a failed save
    resumes a guest it paused."""
    began = time.monotonic()
    codec = codecs.by_name(opts.codec)
    level = opts.level if opts.level is not None else codec.default_level
    check_destination(opts.file, opts.force)  # FILE: a file name, not there (unless force); no leftover .partial
    reuse_large_buffers()  # each compressed batch a new bytes object of up to 4 MiB: reuse the memory
    guest = GuestHold(opts.pauser, notice)
    qemu: QmpPauser | None = None
    try:
        with SourceImage(opts.image, opts.page_size) as source:
            base = _Base.open(opts.base, opts.file, source) if opts.base is not None else None
            qemu = _prepare_qemu(opts.pauser, opts.image, source.size) if opts.qemu_handoff else None
            batch_pages = max(1, min(default_batch_size(opts.threads, RING) // opts.page_size, source.pages))
            flags = (FLAG_INCREMENTAL if base else 0) | (FLAG_DEVICE_STATE if qemu else 0)
            header = Header(
                opts.page_size, source.size, batch_pages, int(codec.wire_id), level, flags,
                base.digest if base else NO_BASE,
            )  # fmt: skip
            out = Output(partial_path(opts.file))
            try:
                passes, device_state = _write(out, source, header, codec, level, opts, guest, base, qemu)
                out.sync()
                out.close()
                _read_back(out.path, header)
                _publish(out.path, opts.file, opts.force)
            except BaseException:
                out.close()
                with contextlib.suppress(OSError):
                    os.unlink(out.path)
                raise
            file_bytes = out.offset
    except BaseException:
        _release_qemu(qemu)
        guest.settle_after_failure(keep_stopped=False)
        raise
    _release_qemu(qemu)
    if opts.leave_running and guest.paused:
        guest.resume()
    return SaveReport(
        opts.file, source.size, file_bytes, source.pages, passes.zero_pages, passes.frames, time.monotonic() - began,
        codec.name, level, passes.passes, int(np.count_nonzero(passes.index)), guest.paused, device_state,
    )  # fmt: skip


def _prepare_qemu(pauser: Pauser | None, image: str, size: int) -> QmpPauser:
    """--qemu-handoff: IMAGE must be the QEMU's one shared RAM backend; x-ignore-shared is set before the copy, so
    that QEMU's stream after it holds the devices only."""
    if not isinstance(pauser, QmpPauser):
        raise UsageError("--qemu-handoff needs --qmp")
    check_backend(pauser.qmp, image, size, "source")
    SourceHandoff(pauser.qmp).prepare()
    return pauser


def _release_qemu(qemu: QmpPauser | None) -> None:
    """Clear x-ignore-shared again: the guest lives on at the source, and a later QEMU migration of it by other
    tools must carry its RAM."""
    if qemu is not None:
        try:
            set_ignore_shared(qemu.qmp, False)
        except QemuError as exc:
            notice(f"could not clear QEMU's x-ignore-shared capability: {exc}")


@dataclass(frozen=True)
class _Base:
    """The base of an incremental save: its fingerprints and digest (from its trailer) and its path from FILE."""

    fingerprints: np.ndarray
    digest: bytes
    relative: str

    @staticmethod
    def open(path: str, file: str, source: SourceImage) -> _Base:
        with SnapshotReader(path) as reader:
            header = reader.header
            if (header.page_size, header.image_size) != (source.page_size, source.size):
                raise UsageError(
                    f"--base {path}: a snapshot of {header.image_size} bytes in {header.page_size}-byte pages; "
                    f"the image has {source.size} bytes in {source.page_size}-byte pages"
                )
            trailer = reader.footer_trailer()
            fingerprints = unpack_pages(trailer.fingerprints, header.pages, "fingerprint list", reader.where)
        if image_digest(fingerprints) != trailer.digest:
            raise SnapshotCorrupt(f"snapshot {path}: its trailer's fingerprints do not match its digest")
        relative = os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(file)))
        return _Base(fingerprints, trailer.digest, relative)


def _write(
    out: Output, source: SourceImage, header: Header, codec: codecs.Codec, level: int, opts: SaveOptions,
    guest: GuestHold, base: _Base | None, qemu: QmpPauser | None,
) -> tuple[FilePasses, int]:  # fmt: skip
    """Header, the passes of frames, END, trailer, footer; with ``qemu``, its device state taken once the last
    pass is written (the guest paused) goes in the trailer. Returns the passes and the device state's length."""
    out.write([encode_header(header)])
    failure = Failure()
    stats = Stats(image_bytes=source.size, page_size=source.page_size)
    pipeline = SendPipeline(source, codec, level, opts.threads, header.batch_pages, failure)
    passes = FilePasses(out, source, pipeline, failure, stats)
    pipeline.start()
    try:
        run_passes(passes, guest, opts.plan, base.fingerprints if base else None, opts.threads)
    except Stopped:
        failure.raise_if_set()
        raise
    except BaseException as exc:
        failure.set(exc)
        raise
    finally:
        pipeline.stop()
    failure.raise_if_set()
    fingerprints = pipeline.fingerprints
    digest = image_digest(fingerprints)
    sections: dict[bytes, bytes] = {SECTION_BASE: base.relative.encode()} if base else {}
    if qemu is not None:
        sections[SECTION_QDEV] = take_device_state(qemu.qmp, MAX_DEVICE_STATE)
    out.write(encode_parts(End(source.pages, passes.frames, end_commitment(digest))))
    trailer_offset = out.offset
    packed = Trailer(
        passes.frames, passes.passes, pack_pages(passes.index), pack_pages(fingerprints), digest,
        encode_sections(sections),
    )  # fmt: skip
    trailer = encode_trailer(packed)
    out.write([trailer, encode_footer(Footer(trailer_offset, len(trailer), zlib_ng.crc32(trailer)))])
    return passes, len(sections.get(SECTION_QDEV, b""))


def _read_back(path: str, header: Header) -> None:
    """Read the header, footer and trailer back from the synced file: what a reader will find first."""
    where = f"snapshot {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEADER_SIZE, 0)
            footer = decode_footer(os.pread(fd, FOOTER_SIZE, size - FOOTER_SIZE), size)
            trailer = os.pread(fd, footer.trailer_length, footer.trailer_offset) if footer else b""
        finally:
            os.close(fd)
    except OSError as exc:
        raise DestinationError(f"{path}: cannot read back: {exc.strerror}") from None
    try:
        if decode_header(head, where) != header or footer is None or zlib_ng.crc32(trailer) != footer.trailer_crc:
            raise DestinationError(f"{path}: read back, it is not what was written")
        decode_trailer(trailer, footer.trailer_offset, where)
    except MigrateError as exc:
        raise DestinationError(f"{path}: read back, it is not what was written ({exc})") from None


def _publish(partial: str, file: str, force: bool) -> None:
    """Rename FILE.partial to FILE; without ``force`` a FILE that appeared meanwhile is kept (link(2) fails on it)."""
    try:
        if force:
            os.rename(partial, file)
        else:
            try:
                os.link(partial, file)
            except FileExistsError:
                raise DestinationError(f"{file} appeared while the snapshot was written: kept (use --force)") from None
            os.unlink(partial)
        fsync_directory(file)
    except OSError as exc:
        raise DestinationError(f"{file}: cannot publish: {exc.strerror}") from None
