"""`vmmig restore FILE DEST` and `vmmig restore --check FILE`: a snapshot's frames through the receiver's pipeline.

The reader (reader.py) stands in for a channel; the receiver's pipeline (receiver/pipeline.py) decompresses on N
workers into the receiver's destination (receiver/destination.py: DEST.partial created exclusively and allocated
once, every page checked against its fingerprint as it lands, published by a rename), or into the discarding sink
for --check. After END: the counts, the trailer's index and fingerprints against what was read, the digest
against DEST's own, END's commitment. Any failure leaves nothing published.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import (
    BaseRefused,
    DestinationModified,
    IntegrityError,
    MigrateError,
    ProtocolError,
    QemuError,
    SourceError,
    UsageError,
)
from ..failure import Failure, Stopped
from ..receiver.dest_checks import check_destination, check_fits
from ..receiver.destination import DestinationImage, InPlaceDestination
from ..receiver.discard import DiscardSink
from ..receiver.pipeline import RecvPipeline
from ..stats import Stats
from ..wire import codec as codecs
from ..wire.digest import end_commitment, image_digest
from ..wire.frames import End, Pages, PassEnd
from ..wire.protocol import validate_pages
from .format import FLAG_INCREMENTAL, SnapshotCorrupt, base_path, device_state, unpack_pages
from .heap import reuse_large_buffers
from .reader import SnapshotReader

if TYPE_CHECKING:
    from ..guest.qmp import Qmp

PAGE_NAMED = re.compile(r"\bpages? (\d+)")


@dataclass(frozen=True)
class RestoreOptions:
    file: str
    dest: str | None  # None: --check, nothing written
    threads: int = 1
    in_place: bool = False
    force: bool = False
    sparse: bool = False
    base_dir: str | None = None  # where an incremental snapshot's bases are, when they moved
    qmp: str | None = None  # DEST is this QEMU's RAM (-incoming defer, in place): feed it the device state and run it


@dataclass(frozen=True)
class RestoreReport:
    file: str
    dest: str | None
    image_bytes: int
    pages: int
    frames: int
    passes: int
    seconds: float
    codec: str
    device_state_bytes: int = 0  # QEMU's device state fed to --qmp's QEMU
    qemu_steps: dict[str, float] | None = None  # --qmp: the durations (ms) of loading the device state and cont


def restore(opts: RestoreOptions) -> RestoreReport:
    began = time.monotonic()
    if opts.qmp is not None and (opts.dest is None or not opts.in_place):
        raise UsageError("--qmp restores into a QEMU's RAM: it needs DEST and --in-place")
    if opts.dest is not None:
        check_destination(opts.dest, opts.force, opts.in_place)
    chain = open_chain(opts.file, opts.base_dir)
    reuse_large_buffers()  # each decompressed batch a new 4 MiB bytes object: reuse the memory, not fault it in
    qemu: tuple[Qmp, bytes] | None = None
    try:
        reader = chain[-1]
        header = reader.header
        codecs_used = [_codec(each) for each in chain]
        codec = codecs_used[-1]
        if opts.qmp is not None:
            assert opts.dest is not None
            qemu = _open_qemu(reader, opts.qmp, opts.dest)
        if opts.dest is None:
            dest: DestinationImage | InPlaceDestination | DiscardSink = DiscardSink(header.image_size, header.page_size)
        elif opts.in_place:
            dest = InPlaceDestination(opts.dest, header.image_size, header.page_size)
        else:
            if not opts.sparse:
                check_fits(opts.dest, header.image_size)
            dest = DestinationImage(opts.dest, header.image_size, header.page_size, sparse=opts.sparse)
        try:
            for each, each_codec in zip(chain, codecs_used, strict=True):  # the base first, each file over it
                frames, passes = _apply(each, dest, each_codec, opts.threads)
            dest.flush()
            dest.publish(opts.force)
        except BaseException as exc:
            dest.discard()
            if isinstance(dest, InPlaceDestination) and dest.modified and isinstance(exc, MigrateError):
                raise DestinationModified(dest.dest, exc) from None
            raise
        dest.close()  # published: the file is DEST's now, and the mapping is done with
        steps = None
        if qemu is not None:  # the RAM is in place and verified: the device state goes after it
            from ..guest.device_state import load_device_state

            steps = load_device_state(*qemu)
    finally:
        for each in chain:
            each.close()
        if qemu is not None:
            qemu[0].close()
    return RestoreReport(
        opts.file, opts.dest, header.image_size, header.pages, frames, passes, time.monotonic() - began, codec.name,
        len(qemu[1]) if qemu else 0, steps,
    )  # fmt: skip


def _open_qemu(reader: SnapshotReader, path: str, dest: str) -> tuple[Qmp, bytes]:
    """--qmp: the snapshot's device state, and the destination QEMU checked (it waits for an incoming migration,
    DEST is its shared RAM) before any page is written."""
    from ..guest.device_state import check_incoming  # only for --qmp: not in every restore's start-up
    from ..guest.qmp import Qmp

    at = f"{reader.where}: trailer at offset {reader.end}"
    state = device_state(reader.header, reader.footer_trailer(), at)
    if state is None:
        raise QemuError(f"{reader.where} holds no QEMU device state (it was saved without --qemu-handoff)")
    qmp = Qmp(path)
    try:
        check_incoming(qmp, dest, reader.header.image_size)
    except BaseException:
        qmp.close()
        raise
    return qmp, state


MAX_CHAIN = 64  # snapshots in one chain: deeper is refused as a loop would be


def _codec(reader: SnapshotReader) -> codecs.Codec:
    codec = codecs.by_wire_id(reader.header.codec)
    if codec is None:
        raise SnapshotCorrupt(f"{reader.where}: header at offset 0: unknown codec id {reader.header.codec}")
    return codec


def open_chain(file: str, base_dir: str | None) -> list[SnapshotReader]:
    """FILE and the bases it rests on, opened, the oldest first. Each base must be the very snapshot its child was
    saved against (its digest), of the same geometry; a missing or altered base, or a chain that comes back to a
    file, is refused (exit 16) before anything is written."""
    chain = [SnapshotReader(file)]
    seen: set[tuple[int, int]] = set()
    try:
        while True:
            child = chain[-1]
            st = os.fstat(child.fd)
            if (st.st_dev, st.st_ino) in seen or len(chain) > MAX_CHAIN:
                raise BaseRefused(f"{child.where}: the chain of bases loops (or is deeper than {MAX_CHAIN})")
            seen.add((st.st_dev, st.st_ino))
            if not child.header.flags & FLAG_INCREMENTAL:
                break
            trailer = child.footer_trailer()
            relative = base_path(child.header, trailer, f"{child.where}: trailer at offset {child.end}")
            assert relative is not None
            path = _find_base(child.path, relative, base_dir)
            try:
                base = SnapshotReader(path)
            except SourceError as exc:
                raise BaseRefused(f"{child.where}: its base {relative} cannot be read ({exc})") from None
            chain.append(base)
            if (base.header.page_size, base.header.image_size) != (child.header.page_size, child.header.image_size):
                raise BaseRefused(f"{child.where}: its base {path} is a snapshot of another image size or page size")
            if base.footer is None or base.footer_trailer().digest != child.header.base_digest:
                raise BaseRefused(
                    f"{child.where}: its base {path} is not the snapshot it was saved against (digest differs)"
                )
    except BaseException:
        for each in chain:
            each.close()
        raise
    chain.reverse()
    return chain


def _find_base(child: str, relative: str, base_dir: str | None) -> str:
    """The base where the child records it (relative to the child's directory), or in --base-dir."""
    if base_dir is not None:
        candidates = [os.path.join(base_dir, relative), os.path.join(base_dir, os.path.basename(relative))]
    else:
        candidates = [os.path.join(os.path.dirname(os.path.abspath(child)), relative)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    hint = "" if base_dir is not None else " (use --base-dir DIR where the bases moved)"
    raise BaseRefused(f"snapshot {child}: its base {relative} is missing: not at {' nor '.join(candidates)}{hint}")


def _apply(
    reader: SnapshotReader, dest: DestinationImage | InPlaceDestination | DiscardSink, codec: codecs.Codec, threads: int
) -> tuple[int, int]:
    """Every frame into ``dest``, then every check of the trailer; returns (frames, passes)."""
    header = reader.header
    failure = Failure()
    stats = Stats(image_bytes=header.image_size, page_size=header.page_size)
    pipeline = RecvPipeline(dest, codec, threads, header.batch_pages, stats, failure)  # type: ignore[arg-type]
    index = np.zeros(header.pages, dtype=np.uint64)  # where each page's latest copy was read
    passes = carried = 0
    pipeline.start()
    try:
        while True:
            failure.raise_if_set()
            at = reader.offset
            frame, size = reader.read_frame(pipeline.alloc, head_only=True)
            if isinstance(frame, Pages):
                try:
                    validate_pages(frame, header.page_size, header.pages, header.batch_pages)
                    index[frame.index_array()] = at  # before a worker can fail on it and be named by it
                    pipeline.receive(frame, reader, size)  # type: ignore[arg-type]
                except ProtocolError as exc:
                    pipeline.release_current()
                    raise reader.corrupt(str(exc), at) from None
                carried += 1
            elif isinstance(frame, PassEnd):
                if frame.number != passes + 1 or frame.batches != carried:
                    raise reader.corrupt(
                        f"PASS_END {frame.number} of {frame.batches} batches, after pass {passes} and {carried}", at
                    )
                pipeline.drain()
                pipeline.new_pass()
                passes, carried = passes + 1, 0
            elif isinstance(frame, End):
                end, end_at = frame, at
                break
        pipeline.finish()
    except Stopped:  # a worker failed while this thread waited on the pipeline: its error is the one
        pipeline.abandon()
        assert failure.error is not None
        raise _named(reader, index, failure.error) from None
    except IntegrityError as exc:
        failure.set(exc)
        pipeline.abandon()
        raise _named(reader, index, failure.error or exc) from None
    except BaseException as exc:
        failure.set(exc)
        pipeline.abandon()
        if isinstance(failure.error, IntegrityError) and not isinstance(failure.error, SnapshotCorrupt):
            raise _named(reader, index, failure.error) from None  # a worker's error came first
        raise
    _check_end(reader, dest, index, end, end_at, passes, carried, pipeline.batches)
    return pipeline.batches, passes


def _check_end(
    reader: SnapshotReader,
    dest: DestinationImage | InPlaceDestination | DiscardSink,
    index: np.ndarray,
    end: End,
    end_at: int,
    passes: int,
    carried: int,
    batches: int,
) -> None:
    header = reader.header
    if carried or not passes:
        raise reader.corrupt(f"END after {carried} frames of an unfinished pass ({passes} passes ended)", end_at)
    if end.total_pages != header.pages or end.batches != batches:
        raise reader.corrupt(
            f"END reports {end.total_pages} pages in {end.batches} frames; the header says {header.pages} pages, "
            f"{batches} frames were read",
            end_at,
        )
    missing = np.flatnonzero(index == 0)
    if missing.size and not header.flags & FLAG_INCREMENTAL:  # an incremental snapshot's other pages: in its base
        raise reader.corrupt(f"page {int(missing[0])} (and {missing.size - 1} more) is in no frame", end_at)
    trailer = reader.read_trailer()
    at = f"{reader.where}: trailer at offset {reader.offset}"
    device_state(header, trailer, at)  # its section and the header's flag agree (restored by --qmp only)
    if trailer.frames != batches or trailer.passes != passes:
        raise SnapshotCorrupt(f"{at}: counts {trailer.frames} frames in {trailer.passes} passes, read {batches}")
    if not np.array_equal(unpack_pages(trailer.index, header.pages, "index", at), index):
        raise SnapshotCorrupt(f"{at}: the index does not point at each page's latest copy")
    fingerprints = dest.fingerprints
    if not np.array_equal(unpack_pages(trailer.fingerprints, header.pages, "fingerprint list", at), fingerprints):
        raise SnapshotCorrupt(f"{at}: the fingerprints do not match the pages")
    digest = image_digest(fingerprints)
    if trailer.digest != digest or end_commitment(digest) != end.commitment:
        raise SnapshotCorrupt(f"{at}: the digest does not match the pages restored")


def _named(reader: SnapshotReader, index: np.ndarray, error: MigrateError) -> MigrateError:
    """A worker's integrity error (a page that does not match its fingerprint, a batch that does not decompress)
    names a page; name the frame holding it and its offset instead, as every other snapshot error does."""
    if not isinstance(error, IntegrityError) or isinstance(error, SnapshotCorrupt):
        return error
    found = PAGE_NAMED.search(str(error))
    page = int(found.group(1)) if found else -1
    if 0 <= page < index.size and index[page]:
        return reader.corrupt(str(error), int(index[page]))
    return SnapshotCorrupt(f"{reader.where}: {error}")
