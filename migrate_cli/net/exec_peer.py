"""``exec:COMMAND``: the sender runs COMMAND (``ssh dsthost vmmig recv --stdio DEST``) and migrates through it.

The command gets one end of a socketpair as its standard input and output, so the sender's channel is a real socket
(sendmsg, shutdown, timeouts as over TCP). Its stderr is relayed to ours line by line with a prefix (through
``sys.stderr``, which the live display redirects above itself). It runs in a session of its own (a Ctrl-C at the
terminal reaches vmmig, which then tells the receiver why with ABORT) and is killed and reaped by its process group
on every exit path. A command that ends without an ABORT is named with its exit status in the error.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

from ..errors import NetworkError
from ..wire.conversation import Role
from ..wire.frames import Frame
from ..wire.protocol import Header
from .transport import Channel

EXIT_GRACE = 5.0  # after our end closes, the receiver has this long to finish and exit by itself
SSH_OPTIONS_WITH_VALUE = set("BbcDEeFIiJLlmOoPpQRSWw")


def relay_prefix(command: str) -> str:
    """``HOST: `` for ``ssh [options] HOST ...``, else ``recv: ``."""
    try:
        words = shlex.split(command)
    except ValueError:
        return "recv: "
    if not words or os.path.basename(words[0]) != "ssh":
        return "recv: "
    rest = iter(words[1:])
    for word in rest:
        if word.startswith("-") and len(word) > 1:
            if word[-1] in SSH_OPTIONS_WITH_VALUE and len(word) == 2:
                next(rest, None)
            continue
        return f"{word.rpartition('@')[2]}: "
    return "recv: "


class ExecPeer:
    """One run of COMMAND; ``sock`` is our end of its standard input and output."""

    def __init__(self, command: str) -> None:
        self.command = command
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=theirs,
                stdout=theirs,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            ours.close()
            raise NetworkError(f"cannot run exec:{command}: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        self.sock = ours
        self._prefix = relay_prefix(command)
        self._relay = threading.Thread(target=self._relay_stderr, name="exec stderr", daemon=True)
        self._relay.start()

    def _relay_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            text = line.decode(errors="replace").rstrip("\r\n")
            with contextlib.suppress(OSError, ValueError):
                print(f"{self._prefix}{text}", file=sys.stderr, flush=True)

    def status(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            return f"was killed by signal {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def explain(self, error: NetworkError) -> NetworkError:
        """The error of a stream that broke, naming the command's exit status once it has exited."""
        try:
            self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            return error  # still running: the stream broke for another reason (silence, say)
        explained = copy.copy(error)
        explained.message = f"exec:{self.command} {self.status()} without ABORT ({error.message})"
        explained.args = (explained.message,)
        return explained

    def stop(self) -> None:
        """Reap the command: it has EXIT_GRACE to exit after our end closed, then its process group is killed."""
        try:
            self.proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._relay.join(1.0)
        if self.proc.stderr is not None:
            with contextlib.suppress(OSError):
                self.proc.stderr.close()


class ExecChannel(Channel):
    """A channel to COMMAND: errors of a broken stream name its exit status; closing reaps it."""

    def __init__(self, peer: ExecPeer, role: Role, io_timeout: float) -> None:
        super().__init__(peer.sock, role, io_timeout)
        self.peer = peer

    def read_frame(
        self, alloc: Callable[[Header], memoryview] | None = None, head_only: bool = False
    ) -> tuple[Frame, int]:
        try:
            return super().read_frame(alloc, head_only)
        except NetworkError as exc:
            raise self.peer.explain(exc) from None

    def read_data(self) -> memoryview:
        try:
            return super().read_data()
        except NetworkError as exc:
            raise self.peer.explain(exc) from None

    def send_parts(self, encoded: list[bytes | bytearray | memoryview]) -> int:
        try:
            return super().send_parts(encoded)
        except NetworkError as exc:
            raise self.peer.explain(exc) from None

    def close(self) -> None:
        already = self.closed
        super().close()
        if not already:
            self.peer.stop()
