"""A TCP proxy for tests: forwards 127.0.0.1 traffic and injects one fault in the sender -> receiver direction.

Faults, at byte offset ``at`` of the sender's stream on the first connection only (later connections, e.g. a
``--retries`` reconnect, pass untouched, so a resume can complete through the same proxy):

- ``flip``: flip one bit;
- ``cut``: forward up to the offset, then close that connection both ways (a link cut);
- ``stall``: forward up to the offset, then stop forwarding and keep the connection open (a black hole);
- ``delay``: from the offset on, hold each chunk ``delay`` seconds before forwarding it (a slow link).

Runs in threads of the test process; ``close()`` stops it and closes every socket.
"""

from __future__ import annotations

import socket
import threading
import time


class FaultProxy:
    def __init__(self, target: str, fault: str, at: int, delay: float = 0.05) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.fault, self.at, self.delay = fault, at, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarded = 0  # sender -> receiver bytes of the first connection
        self.connections = 0
        self.fired = threading.Event()  # the fault happened
        self._first: list[socket.socket] = []
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            first = self.connections == 0
            self.connections += 1
            pair = [client, upstream]
            self._sockets += pair
            if first:
                self._first = pair
            threading.Thread(target=self._pump, args=(upstream, client, False, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, first, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, faulty: bool, pair: list[socket.socket]) -> None:
        try:
            while not self._stop.is_set():
                data = bytearray(src.recv(65536))
                if not data:
                    break
                if faulty:
                    start, self.forwarded = self.forwarded, self.forwarded + len(data)
                    if self.fault == "delay" and self.forwarded > self.at:
                        self.fired.set()
                        time.sleep(self.delay)
                    elif start <= self.at < self.forwarded:
                        offset = self.at - start
                        self.fired.set()
                        if self.fault == "flip":
                            data[offset] ^= 0x04
                        elif self.fault == "cut":
                            dst.sendall(data[:offset])
                            _close(pair)
                            return
                        elif self.fault == "stall":
                            dst.sendall(data[:offset])
                            self._stop.wait()
                            return
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut_now(self) -> None:
        """Cut the first connection at once, wherever it is (a test decides the moment)."""
        self.fired.set()
        _close(self._first)

    def close(self) -> None:
        self._stop.set()
        _close([self.listener, *self._sockets])


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
