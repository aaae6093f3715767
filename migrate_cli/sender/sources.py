"""What the SOURCE argument of `vmmig send` names: a memory image (a path), or `snapshot:FILE`, a file `vmmig save`
wrote, whose stored frames are sent as they are (snapshot/send.py, docs/SNAPSHOT.md "Sending a snapshot").

Other schemes go here too: ``source_path`` says which file identifies a source for --resume, ``resolve_source``
fills in what a source fixes itself (a snapshot: its codec, level and page size) and refuses what makes no sense
with it, ``open_source`` opens it for the sender.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import DestinationModified, UsageError
from ..wire import codec as codecs
from .options import SendOptions
from .source import SourceImage

if TYPE_CHECKING:
    from ..guest.libvirt import LibvirtDomain
    from ..snapshot.send import SnapshotSource

SNAPSHOT = "snapshot:"


def snapshot_file(source: str) -> str | None:
    """FILE of a `snapshot:FILE` source; None for an image."""
    if not source.startswith(SNAPSHOT):
        return None
    file = source[len(SNAPSHOT) :]
    if not file:
        raise UsageError("snapshot: names no file: give snapshot:FILE")
    return file


def source_path(source: str) -> str:
    """The file that identifies the source (what a --resume checks is still the same file)."""
    return snapshot_file(source) or source


def resolve_source(opts: SendOptions, given: set[str]) -> SendOptions:
    """The options with what a snapshot source fixes itself: its page size, and unless --compress names another
    codec, its codec and level (its frames go as stored). ``given``: the option names the operator set
    ("codec", "page_size", "batch_size"); the others hold their defaults. A saved image does not run: the options
    that pause, throttle or track a guest are refused."""
    file = snapshot_file(opts.source)
    if file is None:
        return opts
    from ..snapshot.reader import SnapshotReader

    refused = [
        flag for flag, on in (
            ("--live", opts.live), ("--pause-pid", opts.pause_pid is not None), ("--qmp", opts.qmp is not None),
            ("--pause-cmd", opts.pause_cmd is not None), ("--unpause-cmd", opts.unpause_cmd is not None),
            ("--auto-converge", opts.auto_converge), ("--qemu-handoff", opts.qemu_handoff),
            ("--dirty-tracking", opts.dirty_tracking != "fingerprint"),
        ) if on
    ]  # fmt: skip
    if refused:
        raise UsageError(f"{' '.join(refused)}: a snapshot source is a saved image, no running guest to pause or track")
    with SnapshotReader(file) as reader:
        header = reader.header
    stored = codecs.by_wire_id(header.codec)
    if stored is None:
        from ..snapshot.format import SnapshotCorrupt

        raise SnapshotCorrupt(f"snapshot {file}: header at offset 0: unknown codec id {header.codec}")
    if "page_size" in given and opts.page_size != header.page_size:
        raise UsageError(f"--page-size {opts.page_size}: snapshot {file} was saved in {header.page_size}-byte pages")
    codec = opts.codec if "codec" in given else stored.name
    if codec != stored.name:  # decompressed once, then sent as an ordinary image: every option applies
        return replace(opts, codec=codec, page_size=header.page_size)
    if "batch_size" in given:
        raise UsageError("--batch-size: a snapshot's frames are sent as saved (give another --compress to re-batch)")
    return replace(opts, codec=codec, level=header.level, page_size=header.page_size)


def open_source(opts: SendOptions, threads: int) -> SourceImage | SnapshotSource:
    """The source, opened: an image mapped read-only; a snapshot walked and checked (snapshot/send.py), or, when
    the session's codec is not the one its frames use, decompressed once into an anonymous memory file."""
    file = snapshot_file(opts.source)
    if file is None:
        return SourceImage(opts.source, opts.page_size)
    from ..snapshot.restore import open_chain
    from ..snapshot.send import SnapshotSource, sendable

    chain = open_chain(file, None)  # a missing or altered base: exit 16, as for restore
    try:
        if opts.codec != "auto" and sendable(chain, codec := codecs.by_name(opts.codec)):
            return SnapshotSource(file, chain, codec)
    except BaseException:
        for reader in chain:
            reader.close()
        raise
    for reader in chain:
        reader.close()
    return _unpacked(file, opts.page_size, threads)


def _unpacked(file: str, page_size: int, threads: int) -> SourceImage:
    """The snapshot restored (every check of `vmmig restore`) into a memfd of the image's size, mapped as a source."""
    from ..snapshot.restore import RestoreOptions, restore

    fd = os.memfd_create("vmmig-snapshot", os.MFD_CLOEXEC)
    try:
        from ..snapshot.reader import SnapshotReader

        with SnapshotReader(file) as reader:
            os.ftruncate(fd, reader.header.image_size)
        path = f"/proc/self/fd/{fd}"
        try:
            restore(RestoreOptions(file, path, threads=threads, in_place=True))
        except DestinationModified as exc:  # the memfd is ours and goes: the snapshot's error is the one
            raise exc.cause from None
        return SourceImage(path, page_size)
    finally:
        os.close(fd)


def open_libvirt(opts: SendOptions, say: Callable[[str], None]) -> tuple[LibvirtDomain, SourceImage] | None:
    """A ``libvirt:DOMAIN`` source: the domain over one virsh session and its RAM, found and said (None for
    another source)."""
    name = opts.libvirt_domain
    if name is None:
        return None
    from ..guest.libvirt import LibvirtDomain

    domain = LibvirtDomain(name, opts.libvirt_uri, opts.hook_timeout)
    try:
        ram, _ = domain.find_ram()
        say(f"libvirt:{name} ({domain.virsh.uri}): RAM is the {ram.how}")
        return domain, SourceImage(ram.path, opts.page_size)
    except BaseException:
        domain.close()
        raise
