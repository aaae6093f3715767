"""A QMP monitor for tests without QEMU: speaks QEMU's greeting/capabilities/stop/cont/query-status over a unix
socket and pauses a real process (SIGSTOP/SIGCONT) when told to, so `--qmp` runs against a real writing guest."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path


class FakeQmp:
    def __init__(self, path: str, pid: int) -> None:
        self.path, self.pid = path, pid
        self.commands: list[str] = []
        self.status = "running"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn, conn.makefile("rwb") as fh:
            fh.write(json.dumps({"QMP": {"version": {"qemu": {"major": 9}}, "capabilities": []}}).encode() + b"\n")
            fh.flush()
            for line in fh:
                command = json.loads(line)["execute"]
                self.commands.append(command)
                reply: dict[str, object] = {"return": {}}
                if command == "stop":
                    os.kill(self.pid, signal.SIGSTOP)
                    self._wait_stopped()  # like QEMU, reply only once the vCPUs are stopped
                    self.status = "paused"
                    fh.write(json.dumps({"event": "STOP"}).encode() + b"\n")
                elif command == "cont":
                    os.kill(self.pid, signal.SIGCONT)
                    self.status = "running"
                elif command == "query-status":
                    reply = {"return": {"status": self.status, "running": self.status == "running"}}
                elif command == "query-cpus-fast":  # the process's threads but its first stand for vCPU threads
                    tasks = Path(f"/proc/{self.pid}/task").iterdir()
                    tids = sorted(int(t.name) for t in tasks if int(t.name) != self.pid)
                    reply = {"return": [{"cpu-index": i, "thread-id": tid} for i, tid in enumerate(tids)]}
                elif command != "qmp_capabilities":
                    reply = {"error": {"class": "CommandNotFound", "desc": f"unknown command {command}"}}
                fh.write(json.dumps(reply).encode() + b"\n")
                fh.flush()

    def _wait_stopped(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            tasks = Path(f"/proc/{self.pid}/task").iterdir()
            if all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt" for t in tasks):
                return
            time.sleep(0.001)

    def close(self) -> None:
        self.server.close()
