"""A scripted protocol peer for tests, built on the sans-IO protocol module: sends exactly the frames it is told."""

from __future__ import annotations

import socket
import time

from migrate_cli.wire.conversation import Role
from migrate_cli.wire.frames import Frame
from migrate_cli.wire.protocol import Decoder, encode


class FakePeer:
    def __init__(self, sock: socket.socket, role: Role) -> None:
        self.sock = sock
        self.sock.settimeout(20)
        self.decoder = Decoder(role)

    @classmethod
    def accept(cls, listener: socket.socket) -> FakePeer:
        """A scripted receiver on the next connection ``listener`` takes."""
        listener.settimeout(30)  # a sender that exits before connecting fails the test, never hangs it
        conn, _ = listener.accept()
        return cls(conn, Role.RECEIVER)

    @classmethod
    def connect(cls, address: str) -> FakePeer:
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + 10
        while True:
            try:
                return cls(socket.create_connection((host, int(port))), Role.SENDER)
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def send(self, *frames: Frame | bytes) -> None:
        for frame in frames:
            self.sock.sendall(frame if isinstance(frame, bytes) else encode(frame))

    def read_until(self, kind: type) -> Frame:
        """Read frames (skipping keepalives) until one of ``kind`` arrives; raise if the stream ends first."""
        while True:
            for frame in self.decoder.frames():
                if isinstance(frame, kind):
                    return frame
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"stream ended before a {kind.__name__} frame")
            self.decoder.receive_data(data)

    def close(self) -> None:
        self.sock.close()
