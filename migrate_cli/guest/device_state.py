"""QEMU's device state as bytes, for snapshots: taken from a stopped QEMU, fed to one started with -incoming defer.

Both ends use ``x-ignore-shared``, as the migration handoff does (guest/qemu.py): the RAM travels apart, as a
snapshot's frames, and QEMU's stream holds only the devices (and small unshared blocks such as the BIOS ROMs).
The stream goes over one end of a socketpair handed to QEMU with ``getfd`` (URI ``fd:NAME``): no path on disk or in
the socket namespace that anyone else could open, swap or read.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from ..errors import QemuError
from .qemu import DestHandoff, SourceHandoff, check_backend, set_ignore_shared
from .qmp import Qmp

FD_NAME = "vmmig-device-state"
CHUNK = 1 << 16


class _Drain:
    """Reads QEMU's stream to its end in a thread (QEMU's migration thread blocks on a full socket), up to a limit."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock, self.limit = sock, limit
        self.data = bytearray()
        self.overflow = False
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name="device-state", daemon=True)

    def _run(self) -> None:
        try:
            while chunk := self.sock.recv(CHUNK):
                self.data += chunk
                if len(self.data) > self.limit:
                    self.overflow = True  # stop reading: QEMU's write fails and so does its migrate
                    self.sock.shutdown(socket.SHUT_RDWR)
                    return
        except OSError as exc:
            self.error = exc


def _hand_over(qmp: Qmp) -> socket.socket:
    """Our end of a socketpair whose other end QEMU now holds as ``FD_NAME``."""
    ours, theirs = socket.socketpair()
    try:
        qmp.send_fd(FD_NAME, theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours


def _forget(qmp: Qmp) -> None:
    """Drop the fd QEMU may still hold under ``FD_NAME`` when the command that would consume it failed."""
    with contextlib.suppress(QemuError):
        qmp.execute("closefd", fdname=FD_NAME)


def take_device_state(qmp: Qmp, limit: int, timeout: float = 60.0) -> bytes:
    """QEMU's device-state stream (``migrate`` with x-ignore-shared, which the caller set before the copy). The
    guest must be stopped; it stays so (QEMU: ``postmigrate``). More than ``limit`` bytes is refused."""
    ours = _hand_over(qmp)
    with ours:
        drain = _Drain(ours, limit)
        drain.thread.start()
        try:
            SourceHandoff(qmp).migrate(f"fd:{FD_NAME}", timeout)
        except QemuError:
            _forget(qmp)
            if drain.overflow:
                raise QemuError(f"QEMU's device state exceeds {limit} bytes: not stored") from None
            raise
        finally:
            drain.thread.join(timeout)  # QEMU closes its end once the migration is cleaned up
            if drain.thread.is_alive():
                with contextlib.suppress(OSError):
                    ours.shutdown(socket.SHUT_RDWR)
                drain.thread.join()
                raise QemuError(f"QEMU did not close its device-state stream within {timeout:g}s")
    if drain.overflow:
        raise QemuError(f"QEMU's device state exceeds {limit} bytes: not stored")
    if drain.error is not None or not drain.data:
        reason = drain.error.strerror if drain.error is not None else "it is empty"
        raise QemuError(f"reading QEMU's device state failed: {reason}")
    return bytes(drain.data)


def check_incoming(qmp: Qmp, ram: str, image_size: int) -> None:
    """Before any page is written: the destination QEMU waits for an incoming migration (``-incoming defer``), its
    one shared RAM backend is ``ram`` of ``image_size`` bytes; then x-ignore-shared is set."""
    status = qmp.status()
    if status != "inmigrate":
        raise QemuError(f"destination QEMU is {status!r}: start it with -incoming defer (and -S)")
    check_backend(qmp, ram, image_size, "destination")
    set_ignore_shared(qmp)


def load_device_state(qmp: Qmp, data: bytes, timeout: float = 60.0) -> dict[str, float]:
    """Feed ``data`` to the destination QEMU (``migrate-incoming``), wait until it has loaded it and ``cont``:
    the guest runs. Returns the steps' durations in ms."""
    ours = _hand_over(qmp)
    with ours:
        try:
            qmp.execute("migrate-incoming", uri=f"fd:{FD_NAME}")
        except QemuError:
            _forget(qmp)
            raise
        ours.settimeout(timeout)
        try:
            ours.sendall(data)
            ours.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise QemuError(
                f"destination QEMU stopped reading the device state ({exc.strerror or exc}): did it fail to load it?"
            ) from None
    handoff = DestHandoff(qmp)
    handoff.finish(timeout)
    return handoff.steps
