"""QEMU mode on the receiving end (recv --qmp): the glue between a receiver's attempt and guest/qemu.py's
DestHandoff. Before any page: check the destination QEMU's RAM backend and start its incoming migration (the URI
goes to the sender in HANDOFF). After RESULT: wait for the device state, run the guest, tell the sender
(HANDOFF_DONE)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from ..errors import MigrateError, QemuError
from ..guest.libvirt import LibvirtDestHandoff, LibvirtDomain
from ..guest.qemu import DestHandoff, check_backend
from ..guest.qmp import Qmp
from ..net.transport import Channel
from ..wire.frames import HANDOFF_FAILED, HANDOFF_RUNNING, HandoffDone, Hello
from .options import RecvOptions


def open_handoff(opts: RecvOptions, hello: Hello, libvirt: LibvirtDomain | None = None) -> DestHandoff | None:
    """The destination QEMU, its RAM backend checked against DEST, or None outside QEMU mode. The caller keeps it
    before ``prepare`` (starting the incoming migration on the channel's address) so that a failure there already
    counts as QEMU mode."""
    if libvirt is not None:  # DEST libvirt:DOMAIN, resolved to its RAM (session.py)
        check_backend(libvirt.qmp, opts.destination, hello.image_size, "destination")
        return LibvirtDestHandoff(libvirt)
    if opts.qmp is None:
        return None
    qmp = Qmp(opts.qmp)
    check_backend(qmp, opts.destination, hello.image_size, "destination")
    return DestHandoff(qmp)


def finish_handoff(handoff: DestHandoff, channel: Channel, on_failure: str, verbose: Callable[[str], None]) -> None:
    """Run the destination VM and say so; on failure tell the sender why and, with --on-failure quit-dest, quit
    the destination QEMU."""
    try:
        handoff.finish()
    except QemuError as exc:
        with contextlib.suppress(MigrateError, OSError):
            channel.send_frame(HandoffDone(HANDOFF_FAILED, str(exc)))
        if on_failure == "quit-dest":
            with contextlib.suppress(QemuError):
                handoff.quit()
        raise
    channel.send_frame(HandoffDone(HANDOFF_RUNNING))
    verbose("destination VM running")
