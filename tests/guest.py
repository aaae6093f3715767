"""The simulated guest (examples/guest_workload.py) as a test helper: a real process writing into an image."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "examples" / "guest_workload.py"


class Guest:
    """The simulated guest process writing into an image; killed by PID at the end of the test."""

    def __init__(self, image: Path, tmp: Path, *args: str) -> None:
        pid_file = tmp / "guest.pid"
        self.popen = subprocess.Popen(
            [sys.executable, str(WORKLOAD), str(image), "--pid-file", str(pid_file), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not pid_file.exists():
            assert self.popen.poll() is None and time.monotonic() < deadline, "workload did not start"
            time.sleep(0.02)
        self.pid = self.popen.pid

    def state(self) -> str:
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def is_paused(self) -> bool:
        states = [
            (t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in Path(f"/proc/{self.pid}/task").iterdir()
        ]
        return all(s in "Tt" for s in states)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(5)


def start_guest(guests: list[Guest], image: Path, tmp: Path, *args: str) -> Guest:
    """Start a guest writing into ``image``; ``guests`` (the fixture's list) kills it at the end of the test."""
    guest = Guest(image, tmp, *args)
    guests.append(guest)
    return guest
