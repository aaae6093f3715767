"""A TCP proxy for tests: forwards 127.0.0.1 traffic and injects one fault in the sender -> receiver direction.

Faults: ``flip`` one bit at byte offset N, ``cut`` the connection after N bytes (both directions closed), ``stall``
(stop forwarding, keep the connection open) after N bytes. Runs in threads of the test process; ``close()`` stops it.
"""

from __future__ import annotations

import socket
import threading


class FaultProxy:
    def __init__(self, target: str, fault: str, at: int) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.fault, self.at = fault, at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarded = 0
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(self.target)
        self._sockets += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, faulty: bool) -> None:
        try:
            while not self._stop.is_set():
                data = bytearray(src.recv(65536))
                if not data:
                    break
                if faulty:
                    start, self.forwarded = self.forwarded, self.forwarded + len(data)
                    if start <= self.at < self.forwarded:
                        offset = self.at - start
                        if self.fault == "flip":
                            data[offset] ^= 0x04
                        elif self.fault == "cut":
                            dst.sendall(data[:offset])
                            self.close()
                            return
                        elif self.fault == "stall":
                            dst.sendall(data[:offset])
                            self._stop.wait()
                            return
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        for sock in [self.listener, *self._sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
