#!/usr/bin/env python3
"""Render a frame of vmmig's real live progress display to an SVG (docs/display.svg, for the README).

Runs a real migration over 127.0.0.1 whose sender has a pty as stderr (so rich draws its live display), captures
everything written to the pty, picks one frame and re-renders it with rich's ``Console.save_svg``.

By default the migration is live: a simulated guest (examples/guest_workload.py, 2 threads, ``--guest-rate``)
rewrites a generated ``mixed`` image while ``vmmig send --live --pause-pid`` copies it under ``--max-bandwidth``, so
the display shows a later pass ("send · pass N · ... dirty") and the dirty-rate / expected-downtime line. The frame
taken is the last one of a pass >= 2 still showing an ETA; without one (or with ``--plain``, a non-live migration)
it is the last frame showing an ETA, i.e. mid-transfer rather than the final "verified" frame.

Frames: rich's Live redraws in place, prefixing each redraw with a carriage return and "erase line / cursor up"
sequences. The captured stream is split on those runs, the cursor-control sequences left in the chosen chunk are
removed (colour SGR sequences are kept), and the text goes through ``rich.text.Text.from_ansi`` into a recording
console of the same width.

    python examples/render_display_svg.py [--out docs/display.svg] [--size 512MiB] [--max-bandwidth 40M]
        [--guest-rate 20M] [--plain] [--columns 120]

Everything runs in a private /dev/shm directory (the image is given to the sender by a relative name, so the frame
shows ``vm.ram``) that is removed at the end; the guest and both vmmig processes are killed by pid on every exit
path. Exit status 0 when the SVG was written, 1 otherwise.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import make_guest_image  # noqa: E402  (the project's own generator, beside this file)

ROWS = 40
START_TIMEOUT = 20.0
RUN_TIMEOUT = 180.0
KILL_WAIT = 5.0

# A redraw prefix: CR, then erase-line and cursor-up sequences (rich's LiveRender.position_cursor).
_REDRAW = re.compile(r"\r?(?:\x1b\[2K|\x1b\[\d*A)+")
# Cursor control left inside a frame: show/hide cursor, cursor movement, erase; and carriage returns.
_CONTROL = re.compile(r"\x1b\[\?\d+[hl]|\x1b\[\d*[ABCDGHJK]|\r")
_PASS = re.compile(r"· pass (\d+)")
_PERCENT = re.compile(r"(\d+\.\d)%")


def vmmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrate_cli", *args]


def kill(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGCONT (the guest may be stopped) then SIGKILL one child by its pid, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            break
    try:
        proc.wait(KILL_WAIT)
    except subprocess.TimeoutExpired:
        print(f"warning: child {proc.pid} did not exit after SIGKILL", file=sys.stderr)


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], what: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if path.exists() and (text := path.read_text().strip()):
            return text
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {START_TIMEOUT:.0f}s")
        time.sleep(0.02)


def drain(fd: int, sink: list[bytes]) -> None:
    """Read the pty master until the slave side is gone (EIO), so the child never blocks on a full buffer."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        sink.append(data)


def run_sender(command: Sequence[str], cwd: Path, columns: int) -> tuple[int, bytes]:
    """Run the sender with a ``columns`` x ROWS pty as stderr; return its exit status and everything it drew."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": "truecolor", "COLUMNS": str(columns)}
    env.pop("NO_COLOR", None)
    captured: list[bytes] = []
    reader = threading.Thread(target=drain, args=(master, captured), daemon=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        try:
            proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave
            )
        finally:
            os.close(slave)
        reader.start()
        code = proc.wait(RUN_TIMEOUT)
        reader.join(5.0)
        return code, b"".join(captured)
    finally:
        kill(proc)
        if reader.is_alive():
            reader.join(1.0)
        os.close(master)


def frames(stream: str) -> list[str]:
    """The drawn frames, in order, each without cursor control and trailing blank lines."""
    chunks = (_CONTROL.sub("", chunk) for chunk in _REDRAW.split(stream))
    return [chunk.rstrip("\n") for chunk in chunks if chunk.strip()]


def pick_frame(all_frames: Sequence[str]) -> tuple[str, str]:
    """The frame to show, and a description of it.

    Preference: the last frame of a pass >= 2 with an ETA and its bar between 10 % and 95 %; else the last frame of
    a pass >= 2 with an ETA; else the last frame with an ETA and its bar below 95 %; else the last with an ETA.
    """
    plain = [Text.from_ansi(f).plain for f in all_frames]

    def later_pass(text: str) -> int:
        match = _PASS.search(text)
        return int(match.group(1)) if match else 1

    def mid_bar(text: str) -> bool:
        match = _PERCENT.search(text)
        return match is not None and 10.0 <= float(match.group(1)) <= 95.0

    tests = (
        lambda t: later_pass(t) >= 2 and mid_bar(t),
        lambda t: later_pass(t) >= 2,
        mid_bar,
        lambda t: True,
    )
    for test in tests:
        for index in range(len(all_frames) - 1, -1, -1):
            if "ETA" in plain[index] and test(plain[index]):
                number = later_pass(plain[index])
                kind = f"live migration, pass {number}" if number >= 2 else "pass 1, mid-transfer"
                bar = _PERCENT.search(plain[index])
                return all_frames[index], (
                    f"frame {index + 1}/{len(all_frames)}: {kind}, bar at {bar.group(1) if bar else '?'} %"
                )
    raise RuntimeError(f"no frame with an ETA among {len(all_frames)} captured frames")


def render_svg(frame: str, out: Path, columns: int) -> None:
    console = Console(record=True, width=columns, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print(Text.from_ansi(frame, no_wrap=True), crop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(out), title="vmmig send")


def capture(args: argparse.Namespace, workdir: Path) -> bytes:
    """Generate the image, run guest (live only), receiver and sender; return the sender's pty output."""
    image = workdir / "vm.ram"
    make_guest_image.generate(str(image), make_guest_image.parse_size(args.size), seed=1, profile="mixed")
    guest: subprocess.Popen[bytes] | None = None
    recv: subprocess.Popen[bytes] | None = None
    try:
        send_args = ["--max-bandwidth", args.max_bandwidth]
        if not args.plain:
            pid_file = workdir / "guest.pid"
            guest = subprocess.Popen(
                [sys.executable, str(HERE / "guest_workload.py"), str(image), "--threads", "2",
                 "--rate", args.guest_rate, "--pid-file", str(pid_file)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            pid = wait_for_file(pid_file, guest, "guest workload")
            send_args = ["--live", "--pause-pid", pid, *send_args]
        ready = workdir / "recv.ready"
        recv = subprocess.Popen(
            vmmig("recv", "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--discard", "--quiet"),
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        address = wait_for_file(ready, recv, "receiver")
        code, data = run_sender(vmmig("send", image.name, address, *send_args), workdir, args.columns)
        recv_code = recv.wait(30)
        if code != 0 or recv_code != 0:
            err = recv.stderr.read().decode(errors="replace").strip() if recv.stderr else ""
            tail = Text.from_ansi(data.decode(errors="replace")[-400:]).plain
            raise RuntimeError(f"migration failed: send exit {code}, recv exit {recv_code}: {err} {tail}")
        return data
    finally:
        kill(guest)
        kill(recv)
        if recv is not None and recv.stderr is not None:
            recv.stderr.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "display.svg"), help="SVG path (default docs/display.svg)")
    parser.add_argument("--size", default="512MiB", help="image size (default 512MiB)")
    parser.add_argument("--max-bandwidth", default="40M", help="sender cap (default 40M)")
    parser.add_argument("--guest-rate", default="20M", help="guest write rate for the live migration (default 20M)")
    parser.add_argument("--plain", action="store_true", help="a non-live migration (no guest)")
    parser.add_argument("--columns", type=int, default=120, help="terminal width (default 120)")
    args = parser.parse_args(argv)
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    workdir = Path(tempfile.mkdtemp(prefix="vmmig-svg-", dir=base))
    try:
        data = capture(args, workdir)
    except RuntimeError as exc:
        print(f"render_display_svg: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    all_frames = frames(data.decode(errors="replace"))
    try:
        frame, description = pick_frame(all_frames)
    except RuntimeError as exc:
        print(f"render_display_svg: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    render_svg(frame, out, args.columns)
    print(f"wrote {out} ({description})")
    print(Text.from_ansi(frame).plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
