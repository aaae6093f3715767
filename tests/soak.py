"""Soak: many migrations of small generated images, each with one random fault and a stranger, checked by invariants.

    python tests/soak.py --runs 200 [--seed N] [--only KIND] [--run I] [--json PATH] [--workdir DIR] [--keep]
                         [--no-stranger]

The seed is printed first. Run ``i`` draws every parameter (fault kind, image size, profile and seed, codec, fault
offset, the moment of a kill, a cancel or a signal, the stranger's moment and probe) from ``(seed, i)`` alone, so
``--seed S --run I`` replays one run and ``--seed S --only KIND`` replays every run with one kind of fault forced (the
other parameters unchanged). ``--no-stranger`` replays without the stranger: a run that fails only with it was
failed by it.

Faults (``KINDS``):

- ``none``: a clean migration;
- ``cut``, ``flip``, ``stall``: through ``FaultProxy`` at a random byte offset of the sender's stream (within the
  image size; an offset past the end of a compressed stream does not fire), healed by ``--retries``;
- ``delay``: a slow link from a random offset on (the sender's --io-timeout stays above the receiver's 1 s keepalive);
- ``kill-send``: kill -9 of a bandwidth-capped sender at a random moment, then ``send --resume`` with the same
  options and state file (a plain ``send`` again if it was killed before it recorded its session);
- ``kill-recv``: kill -9 of the receiver at a random moment, then ``recv --resume DEST`` on the same address (or a
  fresh receiver there when no DEST.partial.state was kept); the sender heals with ``--retries 20``;
- ``cancel``: ``vmmig ctl SOCK cancel`` once the receiver holds the session: both ends exit 9 and leave no file
  behind (a cancel that comes too late, the last pages out, does not fire: the run must then verify);
- ``signal-twice``: a real writing guest (examples/guest_workload.py) migrated in stop-and-copy or live mode with
  ``--pause-pid``; at a random moment the sender gets SIGTERM or SIGINT, then 10-300 ms later one or two more
  signals (drawn). The sender exits with the code of the first signal (130/143: the later ones are ignored during
  its cleanup), the guest is running again, the receiver ends with ``peer: interrupted`` and nothing is published
  (or, the signal landing between END and the verdict, the receiver had published: DEST must equal the paused
  source, and the run is counted in ``published_while_interrupted``); or the signal came too late and the run
  verifies (the guest stays paused, as after any successful switchover). A signal that landed before the session
  reached the receiver leaves it waiting: a sender without signals follows.

A stranger in every run: at a moment drawn like the rest (from the receiver's start, mostly before the sender
connects; from the sender's start, mostly mid-transfer; or just after the fault landed, in a resume window), a
client connects to the receiver's address, sends a drawn probe (nothing; 3 random bytes; an HTTP GET; random
garbage of random length; a HELLO frame with a bad CRC; half a HELLO, then silence), and hangs up. A connection
refused is fine: the receiver closes its listener once the session's channels joined ("found the door closed"); when
no receiver of the run is running at that moment the stranger does not knock at all (the port may be somebody
else's by then). The receiver logs each connection it turns away ("refused a connection from ADDR: reason").

Invariants after every run, whatever happened: a DEST that exists equals the source byte for byte (the source as
the paused guest left it, for ``signal-twice``; otherwise it is a *corrupt image published*); every process started
exited by itself within a timeout (otherwise it is *left behind*, and killed by PID); the run ended as its kind
expects (a verified completion for a transient fault, exit 9 on both ends for a cancel that landed, the first
signal's exit code for a signal that landed); after a sender that was interrupted, the guest is not stopped
(otherwise a *guest left stopped*); and the stranger changed nothing: in a run whose stranger connected, the last
receiver must exit as the kind expects (0; 9 for a cancel; 8, or 0, for an interrupted sender) with only expected
lines on the receivers' stderr, its own "refused a connection" lines among them (otherwise a *receiver ended by the
stranger*; a run that fails on the sender's side alone is an unexpected outcome, not the stranger's doing). The exit
status is non-zero when any of these counts is not 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as `python tests/soak.py`: make `tests.*` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migrate_cli.wire.codec import by_name
from migrate_cli.wire.frames import Hello
from migrate_cli.wire.protocol import encode
from tests.conftest import GENERATOR, ROOT, make_image, vmmig_command
from tests.faultproxy import FaultProxy

MiB = 1 << 20
PAGE = 4096
# The kinds of older soaks are drawn first and as before, so that their seeds replay the same parameters.
LEGACY_KINDS: tuple[str, ...] = ("none", "cut", "flip", "stall", "delay", "kill-send", "kill-recv", "cancel")
KINDS: tuple[str, ...] = (*LEGACY_KINDS, "signal-twice")
RESUMING_KINDS = ("cut", "flip", "stall", "kill-send", "kill-recv")  # a fault that fired needs a resume to heal
GUEST_KINDS = ("signal-twice",)  # a real writing guest, paused by the sender with --pause-pid
PROFILES: tuple[str, ...] = tuple(GENERATOR.PROFILES)
CODECS: tuple[str, ...] = ("zlib", "zstd", "none", "auto")
# Batches well below the images' 1-8 MiB (the default is 4 MiB): many frames per run, so faults land mid-stream.
BATCH_SIZES: tuple[int, ...] = (64 * 1024, 256 * 1024, 1024 * 1024)
CAP = "4M"  # bandwidth cap of the kill, cancel and signal runs, so that they are mid-way when the fault lands
CAP_BYTES = 4_000_000
RESUME_WINDOW = 10.0  # recv --resume-window: a receiver left waiting for a sender that never comes exits by itself
SEND_TIMEOUT = 90.0  # a sender must have exited by itself within this (left behind otherwise)
RECV_GRACE = RESUME_WINDOW + 10.0  # a receiver must have exited within this after the (last) sender
STARTUP = 0.4  # about how long a vmmig process takes to start and connect: kills are drawn over it too
READY_TIMEOUT = 20.0
# The stranger: when, what, and how long it waits for the receiver's side of the conversation.
ANCHORS: tuple[str, ...] = ("ready", "transfer", "fault")  # from the receiver's start, the sender's, the fault's
PROBES: tuple[str, ...] = ("nothing", "bytes3", "http", "garbage", "bad-crc", "half-hello")
FAULT_WINDOW = 0.6  # s: a parked receiver waits about this long for its sender to come back (a restart, a retry)
STRANGER_TIMEOUT = 2.0  # s: its connect and each of its sends
# The guest and its signals.
WORKLOAD = ROOT / "examples" / "guest_workload.py"
SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT")
SIGNAL_EXITS = {"SIGINT": 130, "SIGTERM": 143}
GUEST_RATES: tuple[str, ...] = ("256K", "1M")  # slow enough for a live pre-copy at CAP to converge
GUEST_GRACE = 2.0  # s: after an interrupted sender exited, its guest must be running again within this
RECV_AFTER_SIGNAL = 5.0  # s: a receiver that held the session exits about at once after the sender's ABORT
LIVE = ("--live", "--max-passes", "6", "--on-no-converge", "switchover")  # bounded pre-copy: the run always ends


# --- the plan: every parameter of run i derives from (seed, i) ---------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    seed: int
    index: int
    kind: str
    size: int
    profile: str
    image_seed: int
    codec: str
    at: int  # byte offset of a proxy fault in the sender's stream
    moment: float  # 0..1: when a kill, a cancel or a signal lands, as a fraction of the expected transfer time
    delay: float  # seconds per chunk for the delay fault
    batch_size: int = 256 * 1024  # --batch-size of the sender
    stranger_anchor: str = "ready"  # what the stranger's moment counts from (ANCHORS)
    stranger_moment: float = 0.0  # 0..1 of the anchor's window
    probe: str = "nothing"  # what the stranger sends (PROBES)
    probe_seed: int = 1  # its random bytes
    probe_length: int = 3  # garbage: 1 byte to 64 KiB
    silence: float = 0.1  # half-hello: seconds of silence before hanging up
    live: bool = False  # signal-twice: --live (pre-copy, then pause) rather than stop-and-copy
    signals: tuple[tuple[str, float], ...] = (("SIGTERM", 0.0), ("SIGTERM", 0.1))  # (name, gap after the previous)
    guest_rate: str = "256K"  # signal-twice: the guest's --rate

    def replay(self) -> str:
        return f"python tests/soak.py --seed {self.seed} --run {self.index} --only {self.kind}"


def plan(seed: int, index: int, only: str | None = None) -> RunSpec:
    """Run ``index`` of soak ``seed``. The draws happen in a fixed order whatever ``only`` forces, so forcing the
    kind keeps every other parameter of the run; newer parameters are drawn after older ones, so a seed of an older
    soak replays its runs' parameters (one run in ``len(KINDS)`` becomes a kind that soak did not have)."""
    rng = random.Random(f"vmmig-soak:{seed}:{index}")
    kind = rng.choice(LEGACY_KINDS)
    size = rng.randint(MiB // PAGE, 8 * MiB // PAGE) * PAGE
    profile = rng.choice(PROFILES)
    image_seed = rng.randrange(1, 2**31)
    codec = rng.choice(CODECS)
    at = rng.randrange(size)
    moment = rng.random()
    delay = rng.uniform(0.005, 0.02)
    batch_size = rng.choice(BATCH_SIZES)
    if rng.random() < 1 / len(KINDS):  # the newest kind, as likely as each of the others
        kind = "signal-twice"
    stranger = (rng.choice(ANCHORS), rng.random(), rng.choice(PROBES), rng.randrange(1, 2**31))
    probe_length, silence = int(2 ** rng.uniform(0, 16)), rng.uniform(0.05, 2.0)
    live = rng.random() < 0.5
    first, extra = rng.choice(SIGNALS), rng.randint(1, 2)
    # 10-300 ms, log-uniform: many land in the sender's cleanup, which takes tens of milliseconds
    later = [(rng.choice(SIGNALS), 0.01 * 30 ** rng.random()) for _ in range(2)]  # both drawn, ``extra`` of them sent
    guest_rate = rng.choice(GUEST_RATES)
    if only is not None:
        kind = only
    return RunSpec(
        seed, index, kind, size, profile, image_seed, codec, at, moment, delay, batch_size, *stranger,
        probe_length, silence, live, ((first, 0.0), *later[:extra]), guest_rate,
    )  # fmt: skip


# --- processes, cleaned up by PID ----------------------------------------------------------------------------------


@dataclass
class Started:
    role: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    address: str = ""
    killed: bool = False  # by the soak, as the fault
    left_behind: bool = False  # did not exit by itself in time: killed by the soak

    @property
    def code(self) -> int | None:
        return self.popen.returncode

    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def report(self) -> dict[str, Any]:
        text = self.stdout().strip()
        if not text:
            return {}
        try:
            data = json.loads(text.splitlines()[-1])
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def running(self) -> bool:
        return self.popen.poll() is None


class Launcher:
    """Starts the processes of one run (stdout and stderr to files in the run's directory) and accounts for them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Started] = []

    def start(self, role: str, *args: str) -> Started:
        number = len(self.started)
        tag = role.replace(" ", "-").replace("--", "")
        out, err = self.directory / f"{number}-{tag}.out", self.directory / f"{number}-{tag}.err"
        with out.open("wb") as out_fh, err.open("wb") as err_fh:
            popen = subprocess.Popen(vmmig_command(*args), stdout=out_fh, stderr=err_fh, cwd=ROOT)
        proc = Started(role, popen, out, err)
        self.started.append(proc)
        return proc

    def recv(self, role: str, dest: Path, *args: str, listen: str = "127.0.0.1:0") -> Started:
        ready = self.directory / f"ready-{len(self.started)}"
        proc = self.start(role, "recv", "--listen", listen, "--ready-file", str(ready), *args, str(dest))
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if not proc.running():
                raise RunFailed(f"{role} exited {proc.code} before it was ready: {last_line(proc.stderr())}")
            if time.monotonic() > deadline:
                raise RunFailed(f"{role} was not ready within {READY_TIMEOUT:g}s")
            time.sleep(0.02)
        time.sleep(0.005)  # the ready file is written whole, but give a slow writer its moment
        proc.address = ready.read_text().strip()
        ready.unlink()
        return proc

    def kill(self, proc: Started) -> bool:
        """kill -9 as the fault; False when it had already exited by itself."""
        if not proc.running():
            return False
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)
        proc.killed = True
        return True

    def wait(self, proc: Started, timeout: float) -> int | None:
        """Its exit code, or None when it did not exit within ``timeout`` (then it is left behind: killed by PID)."""
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.left_behind = True
            os.kill(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)
            return None

    def finish(self, timeout: float) -> None:
        """Whatever still runs gets ``timeout`` more to exit by itself, then counts as left behind."""
        deadline = time.monotonic() + timeout
        for proc in self.started:
            if proc.running():
                self.wait(proc, max(0.0, deadline - time.monotonic()))

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.running():
                proc.left_behind = True
                os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)


class RunFailed(Exception):
    """The run could not go on as planned (e.g. a receiver that never became ready)."""


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wire_estimate(image: Path, codec: str, batch: int) -> int:
    """About what a sender puts on the wire for ``image``: its non-zero pages, zlib level 1 per batch unless the
    codec is ``none`` (zstd and auto land near zlib on these images)."""
    pages = np.fromfile(image, dtype=np.uint64).reshape(-1, PAGE // 8)
    data = pages[pages.any(axis=1)].tobytes()
    if codec == "none":
        return len(data)
    return sum(min(batch, len(zlib.compress(data[i : i + batch], 1))) for i in range(0, len(data), batch))


# --- the guest of a pausing run, and the stranger of every run ----------------------------------------------------


class Guest:
    """The writing guest of a ``signal-twice`` run (examples/guest_workload.py on the run's image), killed by PID
    when the run ends."""

    def __init__(self, image: Path, directory: Path, rate: str, seed: int) -> None:
        pid_file = directory / "guest.pid"
        with (directory / "guest.out").open("wb") as out, (directory / "guest.err").open("wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, str(WORKLOAD), str(image), "--pid-file", str(pid_file), "--threads", "2",
                 "--rate", rate, "--seed", str(seed)],
                stdout=out, stderr=err, cwd=ROOT,
            )  # fmt: skip
        self.pid = self.popen.pid
        if not wait_until(lambda: pid_file.exists() or self.popen.poll() is not None, READY_TIMEOUT):
            self.kill()
            raise RunFailed(f"the guest did not start within {READY_TIMEOUT:g}s")
        if self.popen.poll() is not None:
            raise RunFailed(f"the guest exited {self.popen.returncode} at start")

    def stopped(self) -> bool:
        """Any of its threads stopped (state T or t)? What --pause-pid leaves after a pause without a resume."""
        try:
            tasks = list(Path(f"/proc/{self.pid}/task").iterdir())
            states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False  # gone (or a thread gone between the listing and the read): nothing stopped to find
        return any(state in "Tt" for state in states)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)  # works on a stopped process too
            self.popen.wait(10)


def probe_bytes(spec: RunSpec) -> bytes:
    """What the stranger sends (before the silence of a half HELLO)."""
    rng = random.Random(spec.probe_seed)
    hello = encode(
        Hello(page_size=PAGE, image_size=spec.size, codec=by_name("zlib").wire_id, level=1,
              session_id=rng.randbytes(16), batch_pages=64)
    )  # fmt: skip
    match spec.probe:
        case "nothing":
            return b""
        case "bytes3":
            return rng.randbytes(3)
        case "http":
            return b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: soak-stranger\r\n\r\n"
        case "garbage":
            return rng.randbytes(spec.probe_length)
        case "bad-crc":  # a well-formed HELLO whose header CRC (bytes 8-12) is off by one bit
            return hello[:8] + bytes([hello[8] ^ 0x01]) + hello[9:]
        case "half-hello":
            return hello[: len(hello) // 2]
    raise ValueError(f"unknown probe {spec.probe!r}")


@dataclass
class Visit:
    """What the stranger of a run did."""

    anchor: str
    probe: str
    outcome: str = "never"  # connected | refused (the door was closed) | gone (no receiver ran) | error
    address: str = ""  # its own HOST:PORT, as the receiver's log names it
    sent: int = 0
    after: float = 0.0  # seconds after the receiver was ready
    error: str = ""


class Stranger:
    """Somebody else's client: at the run's drawn moment it connects to the receiver's address, sends the drawn
    probe and hangs up. It knocks only while a receiver of the run is running: a port nobody of ours holds may
    already be somebody else's."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.visit = Visit(run.spec.stranger_anchor, run.spec.probe)
        self._began = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="stranger", daemon=True)

    def start(self) -> None:
        self._began = time.monotonic()
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        run, spec = self.run, self.run.spec
        anchors: dict[str, tuple[Callable[[], bool], float]] = {
            "ready": (lambda: True, STARTUP),  # mostly before the sender connects
            "transfer": (run.sender_started, STARTUP + run.est),  # mostly mid-transfer (or after a fast one)
            "fault": (run.fault_landed, FAULT_WINDOW),  # mostly while a receiver is parked or restarting
        }
        anchor, window = anchors[spec.stranger_anchor]
        try:
            wait_until(lambda: anchor() or run.done.is_set(), SEND_TIMEOUT + RECV_GRACE, 0.005)
            run.done.wait(spec.stranger_moment * window)  # the run's end makes the wait moot: nobody to find
            self.visit.after = round(time.monotonic() - self._began, 3)
            self._knock()
        except Exception as exc:  # a bug of the soak itself: say so in the run's verdict
            self.visit.outcome, self.visit.error = "error", f"{type(exc).__name__}: {exc}"

    def _knock(self) -> None:
        run, spec, visit = self.run, self.run.spec, self.visit
        if not run.receiver_running():
            visit.outcome = "gone"
            return
        assert run.receiver is not None
        host, _, port = run.receiver.address.rpartition(":")
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=STRANGER_TIMEOUT)
        except ConnectionRefusedError:
            visit.outcome = "refused"
            return
        except OSError as exc:
            visit.outcome, visit.error = "error", f"connect: {exc}"
            return
        with sock:
            visit.outcome = "connected"
            visit.address = f"{host}:{sock.getsockname()[1]}"
            payload = probe_bytes(spec)
            try:
                sock.sendall(payload)
                visit.sent = len(payload)
                if spec.probe == "half-hello":
                    time.sleep(spec.silence)
            except OSError:
                pass  # the receiver turned us away before we were done: its right


# --- one run -------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    index: int
    kind: str
    fired: bool
    expected: str  # "verified", "cancelled" or "interrupted"
    outcome: str  # "verified", "cancelled", "interrupted" or "unexpected"
    seconds: float
    resumes: int  # `resumes` of the final sender's JSON report
    needs_resume: bool  # a fault that fired and that only a resume heals
    corrupt: bool
    left_behind: int
    detail: str
    replay: str
    spec: dict[str, Any]
    exits: list[tuple[str, int | None]] = field(default_factory=list)
    stderr: dict[str, str] = field(default_factory=dict)  # only for a failed run: each process's stderr
    stranger: dict[str, Any] = field(default_factory=dict)  # what the stranger did (Visit)
    refused_lines: int = 0  # "refused a connection" lines of the receivers (the stranger's and any other)
    ended_by_stranger: bool = False  # the stranger connected and the run or a receiver's log went wrong
    unexpected_lines: list[str] = field(default_factory=list)  # receivers' stderr lines no rule expects
    signals: list[str] = field(default_factory=list)  # signal-twice: the signals that reached a running sender
    guest_left_stopped: bool = False  # signal-twice: an interrupted sender left its guest stopped
    published_while_interrupted: bool = False  # signal-twice: the sender was interrupted after the receiver published

    @property
    def failed(self) -> bool:
        return (
            self.outcome != self.expected
            or self.corrupt
            or self.left_behind > 0
            or self.ended_by_stranger
            or self.guest_left_stopped
        )

    def line(self) -> str:
        spec = self.spec
        verdict = "ok" if not self.failed else "FAIL"
        visit = self.stranger
        stranger = f"{visit['probe']}@{visit['anchor']}:{visit['outcome']}" if visit else "none"
        text = (
            f"run {self.index:4d}  {self.kind:12s} fired={'yes' if self.fired else 'no ':3s} "
            f"{spec['profile']:6s} {spec['size'] / MiB:4.2f}MiB {spec['codec']:4s}  -> {self.outcome:11s} "
            f"resumes={self.resumes} {self.seconds:6.2f}s  stranger={stranger:28s} {verdict}"
        )
        if self.failed:
            text += f"  [{self.detail}]  replay: {self.replay}"
        return text


# What a receiver may print in a run that went as planned (its final error line aside, when its exit was expected).
RECV_LINES = tuple(
    re.compile(pattern)
    for pattern in (
        r"^vmmig recv: listening on \S+$",
        r"^vmmig recv: verified .* received in ",
        r"^vmmig recv: pass \d+: [\d,]+ batches applied, ",
        r"^vmmig recv: refused a connection from ",
        r"; waiting up to [\d.]+s for the sender to resume",
        r": nothing was received, DEST\.partial removed; waiting for a sender$",
    )
)
RECV_EXITS = {  # what the last receiver exits with, by the run's expected outcome
    "verified": (0,),
    "cancelled": (9,),
    "interrupted": (8, 0),  # 0: it had published before the signal landed, or a sender without signals came after
}
REFUSED = re.compile(r"^vmmig recv: refused a connection from (\S+?): ")


class Run:
    def __init__(self, spec: RunSpec, directory: Path, stranger: bool = True) -> None:
        self.spec = spec
        self.dir = directory
        self.launcher = Launcher(directory)
        self.image = directory / "source.img"
        self.dest = directory / "dest.img"
        self.partial = Path(f"{self.dest}.partial")
        self.partial_state = Path(f"{self.dest}.partial.state")
        self.send_state = directory / "send.state"
        self.control = directory / "send.ctl"
        self.fired = False
        self.needs_resume = False
        self.sender: Started | None = None  # the last sender: its exit and report decide the run
        self.receiver: Started | None = None  # the last receiver
        self.notes: list[str] = []
        self.proxy: FaultProxy | None = None
        self.est = 0.0  # expected transfer time at CAP, seconds
        self.recv_args: tuple[str, ...] = ()
        self.late_kill = False  # kill-send: the receiver had verified and published before the kill landed
        self.stranger = Stranger(self) if stranger else None
        self.done = threading.Event()  # every process of the run has exited
        self.fault = threading.Event()  # the fault landed (a proxy's fault: FaultProxy.fired)
        # signal-twice
        self.guest: Guest | None = None
        self.signalled: Started | None = None  # the sender that got the signals
        self.signals: list[str] = []  # those that reached it while it ran
        self.snapshot: bytes | None = None  # the source while paused, when the first signal went out
        self.reference: bytes | None = None  # the source as the guest stays paused after a successful migration
        self.guest_left_stopped = False
        self.problems: list[str] = []  # found during the run: they make it unexpected

    # What the stranger watches.

    def sender_started(self) -> bool:
        return any(p.role.startswith("send") for p in self.launcher.started)

    def fault_landed(self) -> bool:
        return self.fault.is_set() or (self.proxy is not None and self.proxy.fired.is_set())

    def receiver_running(self) -> bool:
        return any(p.role.startswith("recv") and p.running() for p in self.launcher.started)

    # The run itself: start, inject, heal. Waiting for the processes and judging them come after (run_one).

    def execute(self) -> None:
        spec = self.spec
        make_image(self.image, spec.size, profile=spec.profile, seed=spec.image_seed)
        self.est = wire_estimate(self.image, spec.codec, spec.batch_size) / CAP_BYTES
        if spec.kind in GUEST_KINDS:
            self.guest = Guest(self.image, self.dir, spec.guest_rate, spec.image_seed)
        self.recv_args = ("--json", "--io-timeout", "1s", "--resume-window", f"{RESUME_WINDOW:g}s")
        self.receiver = self.launcher.recv("recv", self.dest, *self.recv_args)
        if self.stranger is not None:
            self.stranger.start()
        common = ("--json", "--compress", spec.codec, "--batch-size", str(spec.batch_size))
        common += ("--state-file", str(self.send_state))
        getattr(self, "_" + spec.kind.replace("-", "_"))(common)

    def _none(self, common: tuple[str, ...]) -> None:
        assert self.receiver is not None
        self.sender = self.launcher.start("send", "send", str(self.image), self.receiver.address, *common)
        self.launcher.wait(self.sender, SEND_TIMEOUT)

    def _proxied(self, common: tuple[str, ...]) -> None:
        spec, receiver = self.spec, self.receiver
        assert receiver is not None
        self.proxy = FaultProxy(receiver.address, spec.kind, at=spec.at, delay=spec.delay)
        # A slow link is not a fault the sender should notice: it gets an --io-timeout above the receiver's keepalive
        # cadence (1 s); a sender with --io-timeout 1s trips on a healthy link whenever the transfer lasts over 1 s.
        timeout = "3s" if spec.kind == "delay" else "1s"
        retries = ("--retries", "3", "--retry-delay", "100ms", "--io-timeout", timeout)
        self.sender = self.launcher.start("send", "send", str(self.image), self.proxy.address, *common, *retries)
        self.launcher.wait(self.sender, SEND_TIMEOUT)
        self.fired = self.proxy.fired.is_set()
        self.needs_resume = self.fired and spec.kind in RESUMING_KINDS
        self.notes.append(f"proxy connections={self.proxy.connections}")

    _cut = _flip = _stall = _delay = _proxied

    def _kill_send(self, common: tuple[str, ...]) -> None:
        receiver = self.receiver
        assert receiver is not None
        args = (str(self.image), receiver.address, *common, "--max-bandwidth", CAP)
        first = self.launcher.start("send", "send", *args)
        self.sender = first
        # A random moment from the sender's start: now and then before it connected, mostly mid-transfer.
        wait_until(lambda: not first.running(), self.spec.moment * (STARTUP + self.est))
        self.fired = self.launcher.kill(first)
        if not self.fired:
            return
        self.fault.set()
        # The receiver parks the session (and says so); or it verified and published before it noticed the kill; or
        # it is still waiting for its first connection (the kill came before the sender connected).
        wait_until(lambda: not receiver.running() or "waiting up to" in receiver.stderr(), 1.0)
        if not receiver.running():
            if receiver.code == 0:
                self.late_kill = True
                self.notes.append("the receiver completed before the kill: nothing to resume")
            else:
                self.notes.append(f"the receiver exited {receiver.code} after the kill: {last_line(receiver.stderr())}")
            return
        self.needs_resume = "waiting up to" in receiver.stderr()
        resume = ("--resume",) if self.send_state.exists() else ()  # the sender records its session before HELLO
        if not resume:
            self.notes.append("killed before the sender recorded its session: sent afresh")
        self.sender = self.launcher.start("send --resume" if resume else "send again", "send", *args, *resume)
        self.launcher.wait(self.sender, SEND_TIMEOUT)

    def _kill_recv(self, common: tuple[str, ...]) -> None:
        first = self.receiver
        assert first is not None
        retries = ("--retries", "20", "--retry-delay", "200ms", "--connect-timeout", "2s")
        sender = self.launcher.start(
            "send", "send", str(self.image), first.address, *common, "--max-bandwidth", CAP, *retries
        )
        self.sender = sender
        # A random moment from the sender's start: now and then before the session exists, mostly mid-transfer.
        wait_until(lambda: not sender.running(), self.spec.moment * (STARTUP + self.est))
        if not sender.running():
            return
        self.fired = self.launcher.kill(first)
        if not self.fired:
            return
        self.fault.set()
        if self.partial_state.exists():
            self.needs_resume = True
            self.receiver = self.launcher.recv(
                "recv --resume", self.dest, "--resume", *self.recv_args, listen=first.address
            )
        elif self.dest.exists():
            self.notes.append("killed after publishing: no receiver restarted")
        else:
            # Killed before the session was recorded: a fresh receiver (a DEST.partial without state is garbage).
            force = ("--force",) if self.partial.exists() else ()
            self.notes.append("killed before the session was recorded: fresh receiver" + (" --force" if force else ""))
            self.receiver = self.launcher.recv("recv fresh", self.dest, *force, *self.recv_args, listen=first.address)
        self.launcher.wait(sender, SEND_TIMEOUT)

    def _cancel(self, common: tuple[str, ...]) -> None:
        receiver = self.receiver
        assert receiver is not None
        sender = self.launcher.start(
            "send", "send", str(self.image), receiver.address, *common, "--max-bandwidth", CAP,
            "--retries", "3", "--control", str(self.control),
        )  # fmt: skip
        self.sender = sender
        # Once the receiver holds the session (a cancel before the sender connected would leave it waiting alone).
        wait_until(lambda: self.partial_state.exists() or not sender.running(), SEND_TIMEOUT)
        wait_until(lambda: not sender.running(), self.spec.moment * self.est * 0.5)  # `ctl` takes a moment to start
        if sender.running():
            self.fault.set()
            ctl = self.launcher.start("ctl", "ctl", str(self.control), "cancel")
            code = self.launcher.wait(ctl, 20)
            self.fired = code == 0
            if not self.fired:
                self.notes.append(f"ctl cancel exit {code}: {last_line(ctl.stderr())}")
        self.launcher.wait(sender, SEND_TIMEOUT)

    def _signal_twice(self, common: tuple[str, ...]) -> None:
        spec, receiver, guest = self.spec, self.receiver, self.guest
        assert receiver is not None and guest is not None
        args = (str(self.image), receiver.address, *common, "--max-bandwidth", CAP, "--pause-pid", str(guest.pid))
        args += LIVE if spec.live else ()
        sender = self.launcher.start("send", "send", *args)
        self.sender = self.signalled = sender
        # Its handlers are in place once it recorded its session (before HELLO); a signal before that ends the
        # interpreter, not vmmig. From there, a random moment: mostly mid-transfer, now and then after it finished.
        wait_until(lambda: self.send_state.exists() or not sender.running(), READY_TIMEOUT)
        wait_until(lambda: not sender.running(), spec.moment * (1.2 * self.est + 0.3))
        self._send_signals(sender, guest)
        code = self.launcher.wait(sender, SEND_TIMEOUT)
        if code == 0:
            self._paused_after_success(guest)
            return
        # Whatever ended it (the signal, a failure, our kill -9 when it hung), it did not confirm a migration. Only a
        # signal between END and the verdict keeps the guest paused on purpose: the receiver may be publishing DEST.
        if "the guest stays paused" in last_line(sender.stderr()):
            self.notes.append("signalled between END and the verdict: the guest stays paused (outcome unknown)")
        elif not wait_until(lambda: not guest.stopped(), GUEST_GRACE):
            self.guest_left_stopped = True
        # The receiver held the session: it exits at once (peer: interrupted). Still running without a session kept:
        # the signal came before the session reached it, and it waits for a sender: one without signals comes.
        wait_until(lambda: not receiver.running(), RECV_AFTER_SIGNAL)
        if receiver.running() and not self.partial_state.exists():
            self.notes.append("interrupted before the session reached the receiver: sent afresh")
            self.sender = self.launcher.start("send again", "send", *args)
            if self.launcher.wait(self.sender, SEND_TIMEOUT) == 0:
                self._paused_after_success(guest)

    def _send_signals(self, sender: Started, guest: Guest) -> None:
        """The first signal, then the later ones after their gaps; only to a sender that still runs."""
        if guest.stopped():  # paused: what a DEST published meanwhile must equal (the pause holds until we signal)
            self.snapshot = self.image.read_bytes()
        for number, (name, gap) in enumerate(self.spec.signals):
            time.sleep(gap)
            if not sender.running():
                break
            sender.popen.send_signal(getattr(signal, name))  # Popen: never signals a pid it has reaped
            self.signals.append(name)
            if number == 0:
                self.fired = True
                self.fault.set()

    def _paused_after_success(self, guest: Guest) -> None:
        """A sender that succeeded leaves its guest paused (the destination holds its memory): DEST must equal it."""
        if guest.stopped():
            self.reference = self.image.read_bytes()
        else:
            self.problems.append("the guest runs after a successful migration (it must stay paused)")

    # -- the verdict --------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        if self.guest is not None:
            self.guest.kill()

    def expected(self) -> str:
        if self.spec.kind == "cancel" and self.fired:
            return "cancelled"
        if self.signalled is not None and self.fired and self.signalled.code != 0:
            return "interrupted"
        return "verified"

    def verdict(self, error: str) -> tuple[str, bool, str]:
        """(outcome, corrupt, detail) once every process is gone."""
        corrupt = False
        problems: list[str] = [error] if error else []
        problems += self.problems
        reference = self.reference
        if reference is None and self.guest is None:
            reference = self.image.read_bytes() if self.image.exists() else b""
        if self.dest.exists():
            if reference is None:  # signal-twice: published although its sender was interrupted
                reference = self.snapshot
            if reference is None:
                corrupt = True
                problems.append("CORRUPT: DEST published and no paused source to compare it with")
            elif self.dest.read_bytes() != reference:
                corrupt = True
                problems.append("CORRUPT: DEST differs from the source")
        if self.guest_left_stopped and self.signalled is not None:
            said = last_line(self.signalled.stderr())
            problems.append(f"GUEST LEFT STOPPED after the sender exited {self.signalled.code} ({said or 'silent'})")
        leftovers = [p.name for p in (self.partial, self.partial_state, self.send_state) if p.exists()]
        sender, receiver = self.sender, self.receiver
        send_code = sender.code if sender is not None else None
        recv_code = receiver.code if receiver is not None and not receiver.killed else None
        outcome = "unexpected"
        if not problems and self.expected() == "interrupted":
            outcome = self._interrupted(send_code, recv_code, leftovers, problems)
        elif not problems:
            verified_dest = self.dest.exists() and not corrupt
            if self.late_kill:  # the killed sender's state file stays: it never learnt of the completion
                leftovers = [name for name in leftovers if name != "send.state"]
                send_code = 0
            if send_code == 0 and recv_code in (0, None) and verified_dest and not leftovers:
                outcome = "verified"
                if recv_code is None and not self.notes:
                    outcome, problems = "unexpected", ["no receiver exit to judge"]
            elif send_code == 9 and recv_code == 9 and not self.dest.exists() and not leftovers:
                outcome = "cancelled"
        if outcome == "unexpected" and not problems:
            where = "present" if self.dest.exists() else "absent"
            problems.append(
                f"send exit {send_code}, recv exit {recv_code}, dest {where}"
                + (f", left {', '.join(leftovers)}" if leftovers else "")
            )
        return outcome, corrupt, "; ".join(problems + self.notes)

    def _interrupted(
        self, send_code: int | None, recv_code: int | None, leftovers: list[str], problems: list[str]
    ) -> str:
        """signal-twice, a signal that landed: the sender exits with the first signal's code whatever came next; the
        receiver ends with it (peer: interrupted) and nothing is published; or a sender sent afresh verifies."""
        assert self.signalled is not None
        first = self.spec.signals[0][0]
        if self.signalled.code != SIGNAL_EXITS[first]:
            problems.append(f"the sender exited {self.signalled.code} after {', '.join(self.signals)} (first {first})")
            return "unexpected"
        if leftovers:
            return "unexpected"
        if self.sender is not self.signalled:  # sent afresh
            return "interrupted" if send_code == 0 and recv_code == 0 and self.dest.exists() else "unexpected"
        if recv_code == 8 and not self.dest.exists():
            return "interrupted"
        if recv_code == 0 and self.dest.exists():  # verified (against the paused source) before the signal landed
            self.notes.append("the receiver had published DEST when the signal landed; the guest stayed paused")
            return "interrupted"
        return "unexpected"

    def receiver_ended_as_expected(self, expected: str) -> bool:
        """The last receiver (unless the fault killed it) exited as the run's kind expects of it."""
        receiver = self.receiver
        if receiver is None or receiver.killed:
            return True
        return receiver.code in RECV_EXITS[expected]

    def receiver_lines(self, expected: str) -> tuple[int, list[str]]:
        """("refused a connection" lines, the lines no rule expects) of every receiver of the run. A receiver's last
        line may be its error when that exit was expected; a line naming the stranger must be its refusal."""
        visit = self.stranger.visit if self.stranger is not None else None
        stranger = re.compile(re.escape(visit.address) + r"(?!\d)") if visit and visit.address else None
        refused, unexpected = 0, []
        for proc in self.launcher.started:
            if not proc.role.startswith("recv"):
                continue
            lines = [line for line in proc.stderr().splitlines() if line.strip()]
            for number, line in enumerate(lines):
                match = REFUSED.match(line)
                refused += match is not None
                if stranger is not None and stranger.search(line) and not (match and stranger.match(match[1])):
                    unexpected.append(f"{proc.role}: {line}  <- names the stranger")
                elif any(rule.search(line) for rule in RECV_LINES):
                    continue
                elif number == len(lines) - 1 and proc.code not in (0, None) and proc.code in RECV_EXITS[expected]:
                    continue  # its final error, as the run expects it (a cancel, an interrupted sender)
                else:
                    unexpected.append(f"{proc.role}: {line}")
        return refused, unexpected


def run_one(spec: RunSpec, workdir: Path, keep: bool = False, stranger: bool = True) -> RunResult:
    """One migration with its fault and its stranger, then the invariants. Never raises for what the processes
    did."""
    directory = workdir / f"run-{spec.index:04d}-{spec.kind}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    run = Run(spec, directory, stranger=stranger)
    began = time.monotonic()
    error = ""
    try:
        try:
            run.execute()
        except RunFailed as exc:
            error = str(exc)
        except Exception as exc:
            error = f"soak harness error: {type(exc).__name__}: {exc}"
        run.launcher.finish(RECV_GRACE)  # every process gets its time to exit by itself
    finally:  # an interrupt (Ctrl-C, a pytest timeout) too: nothing outlives the run
        run.launcher.kill_all()
        run.done.set()
        if run.stranger is not None:
            run.stranger.join(3 * STRANGER_TIMEOUT + 5.0)
        run.close()
    seconds = time.monotonic() - began
    visit = run.stranger.visit if run.stranger is not None else None
    if visit is not None and visit.outcome == "error" and not error:
        error = f"soak harness error: the stranger: {visit.error}"
    outcome, corrupt, detail = run.verdict(error)
    expected = run.expected()
    refused, unexpected_lines = run.receiver_lines(expected)
    # The stranger is to blame when a receiver's log or exit went wrong in a run that it visited, not for a sender's
    # own misstep that its receiver reported as the kind expects.
    receiver_went_wrong = bool(unexpected_lines) or not run.receiver_ended_as_expected(expected)
    ended = visit is not None and visit.outcome == "connected" and receiver_went_wrong
    notes = [detail] if detail else []
    if ended and visit is not None:
        notes.insert(0, f"RECEIVER ENDED BY THE STRANGER ({visit.probe} from {visit.address})")
    if unexpected_lines:
        notes.append("unexpected receiver lines: " + " | ".join(unexpected_lines))
    left = sum(p.left_behind for p in run.launcher.started)
    if left:
        names = ", ".join(p.role for p in run.launcher.started if p.left_behind)
        notes.insert(0, f"LEFT BEHIND: {names}")
    final = run.sender.report() if run.sender is not None else {}
    result = RunResult(
        index=spec.index,
        kind=spec.kind,
        fired=run.fired,
        expected=expected,
        outcome=outcome,
        seconds=round(seconds, 3),
        resumes=int(final.get("resumes", 0) or 0),
        needs_resume=run.needs_resume,
        corrupt=corrupt,
        left_behind=left,
        detail="; ".join(notes),
        replay=spec.replay(),
        spec=asdict(spec),
        exits=[(p.role, p.code) for p in run.launcher.started],
        stranger=asdict(visit) if visit is not None else {},
        refused_lines=refused,
        ended_by_stranger=ended,
        unexpected_lines=unexpected_lines,
        signals=list(run.signals),
        guest_left_stopped=run.guest_left_stopped,
        published_while_interrupted=outcome == "interrupted" and run.sender is run.signalled and run.dest.exists(),
    )
    if result.failed:
        result.stderr = {f"{n}-{p.role}": p.stderr() for n, p in enumerate(run.launcher.started)}
    if not keep and not result.failed:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        for path in (run.image, run.dest, run.partial):  # keep the logs and state files, not the images
            if not keep and path.exists():
                path.unlink()
    return result


# --- the soak ------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    seed: int
    runs: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # runs by kind
    fired: dict[str, int] = field(default_factory=dict)  # of which the fault fired
    verified: int = 0  # verified completions
    expected_verified: int = 0
    cancelled: int = 0
    interrupted: int = 0  # signal-twice runs whose signal landed and ended the sender, as expected
    resumes: int = 0  # sum of `resumes` of the final senders' reports
    resumes_needed: int = 0  # runs whose fault fired and needed a resume
    corrupt: int = 0  # corrupt images published
    left_behind: int = 0  # processes that did not exit by themselves
    unexpected: int = 0  # runs that did not end as their kind expects
    stranger_connected: int = 0  # strangers that found the receiver's door open
    stranger_refused: int = 0  # strangers whose connection was refused (the listener closed during a transfer)
    stranger_gone: int = 0  # strangers that came when no receiver of the run ran: they did not knock
    refused_lines: int = 0  # "refused a connection" lines of the receivers
    receivers_ended_by_stranger: int = 0  # runs whose stranger connected and that went wrong
    guests_left_stopped: int = 0  # signal-twice: interrupted senders that left their guest stopped
    signals_sent: int = 0  # signal-twice: signals that reached a running sender
    published_while_interrupted: int = 0  # signal-twice: the receiver had published when the signal landed
    runs_with_unexpected_lines: int = 0  # receivers printed a line no rule expects (with a stranger or not)
    seconds: float = 0.0
    results: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.corrupt == 0
            and self.left_behind == 0
            and self.unexpected == 0
            and self.receivers_ended_by_stranger == 0
            and self.guests_left_stopped == 0
        )

    @property
    def failures(self) -> list[RunResult]:
        return [r for r in self.results if r.failed]

    def add(self, result: RunResult) -> None:
        self.results.append(result)
        self.runs += 1
        self.faults[result.kind] = self.faults.get(result.kind, 0) + 1
        self.fired[result.kind] = self.fired.get(result.kind, 0) + int(result.fired)
        self.verified += result.outcome == "verified"
        self.expected_verified += result.expected == "verified"
        self.cancelled += result.outcome == "cancelled"
        self.interrupted += result.outcome == "interrupted"
        self.resumes += result.resumes
        self.resumes_needed += result.needs_resume
        self.corrupt += result.corrupt
        self.left_behind += result.left_behind
        self.unexpected += result.outcome != result.expected
        outcome = result.stranger.get("outcome")
        self.stranger_connected += outcome == "connected"
        self.stranger_refused += outcome == "refused"
        self.stranger_gone += outcome == "gone"
        self.refused_lines += result.refused_lines
        self.receivers_ended_by_stranger += result.ended_by_stranger
        self.guests_left_stopped += result.guest_left_stopped
        self.signals_sent += len(result.signals)
        self.published_while_interrupted += result.published_while_interrupted
        self.runs_with_unexpected_lines += bool(result.unexpected_lines)
        self.seconds += result.seconds

    def text(self) -> str:
        kinds = "  ".join(f"{k}={self.faults[k]}(fired {self.fired[k]})" for k in KINDS if k in self.faults)
        lines = [
            f"soak summary (seed {self.seed}): {self.runs} runs in {self.seconds:.0f}s",
            f"  faults by kind:            {kinds}",
            f"  verified completions:      {self.verified} of {self.expected_verified} expected",
            f"  cancelled as expected:     {self.cancelled}",
            f"  interrupted as expected:   {self.interrupted} ({self.signals_sent} signals reached a sender; "
            f"{self.published_while_interrupted} after the receiver had published)",
            f"  resumes:                   {self.resumes} (fired faults needing one: {self.resumes_needed})",
            f"  stranger connections:      {self.stranger_connected} made, {self.stranger_refused} refused, "
            f"{self.stranger_gone} found no receiver; {self.refused_lines} 'refused a connection' lines",
            f"  corrupt images published:  {self.corrupt}",
            f"  processes left behind:     {self.left_behind}",
            f"  guests left stopped:       {self.guests_left_stopped}",
            f"  receivers ended by the stranger: {self.receivers_ended_by_stranger}",
            f"  unexpected outcomes:       {self.unexpected}"
            + (
                f" (runs with unexpected receiver lines: {self.runs_with_unexpected_lines})"
                if self.runs_with_unexpected_lines
                else ""
            ),
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["failures"] = [r.replay for r in self.failures]
        return data


def soak(
    runs: int,
    seed: int,
    workdir: Path,
    only: str | None = None,
    indices: Sequence[int] | None = None,
    picks: Sequence[tuple[int, str]] | None = None,
    keep: bool = False,
    echo: bool = True,
    stranger: bool = True,
) -> Summary:
    """``runs`` runs of soak ``seed`` under ``workdir``: runs 0..runs-1, or exactly ``indices``, or exactly the
    (index, kind) ``picks``. ``only`` forces one fault kind on every run; ``stranger=False`` leaves the strangers
    out (to tell whether a failure needs one)."""
    summary = Summary(seed)
    chosen: list[tuple[int, str | None]] = [(i, only) for i in (indices or range(runs))]
    if picks is not None:
        chosen = list(picks)
    for index, kind in chosen:
        result = run_one(plan(seed, index, kind), workdir, keep=keep, stranger=stranger)
        summary.add(result)
        if echo:
            print(result.line(), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python tests/soak.py")
    parser.add_argument("--runs", type=int, default=200, help="number of runs (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="soak seed (default: random, printed first)")
    parser.add_argument("--only", choices=KINDS, default=None, help="force this fault kind in every run")
    parser.add_argument("--run", type=int, action="append", default=None, help="run only this index (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary and every run as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs happen (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every run's directory, images included")
    parser.add_argument("--no-stranger", action="store_true", help="no stranger in any run (to replay a failure)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**32)
    count = len(args.run) if args.run else args.runs
    print(f"soak seed {seed}: {count} runs (replay: python tests/soak.py --seed {seed} --runs {args.runs})", flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmmig-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary = soak(
        args.runs, seed, workdir, only=args.only, indices=args.run, keep=args.keep, stranger=not args.no_stranger
    )
    print(summary.text())
    if args.json is not None:
        args.json.write_text(json.dumps(summary.to_json(), indent=1) + "\n")
    failures = summary.failures
    if failures:
        print(f"soak FAILED (seed {seed}); failing runs kept under {workdir}. Replay each with:", file=sys.stderr)
        for result in failures:
            print(f"  {result.replay}    # {result.detail}", file=sys.stderr)
            for name, text in result.stderr.items():
                if text.strip():
                    print(f"    {name} stderr: {text.strip()}", file=sys.stderr)
    elif args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
