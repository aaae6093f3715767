"""Soak: many migrations of small generated images, each with one random fault, checked by invariants.

    python tests/soak.py --runs 200 [--seed N] [--only KIND] [--run I] [--json PATH] [--workdir DIR] [--keep]

The seed is printed first. Run ``i`` draws every parameter (fault kind, image size, profile and seed, codec, fault
offset, the moment of a kill or a cancel) from ``(seed, i)`` alone, so ``--seed S --run I`` replays one run and
``--seed S --only KIND`` replays every run with one kind of fault forced (the other parameters unchanged).

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
  behind (a cancel that comes too late, the last pages out, does not fire: the run must then verify).

Invariants after every run, whatever happened: a DEST that exists equals the source byte for byte (otherwise it is
a *corrupt image published*); every process started exited by itself within a timeout (otherwise it is *left
behind*, and killed by PID); the run ended as its kind expects (a verified completion for a transient fault, exit 9
on both ends for a cancel that landed). The exit status is non-zero when any of the three counts is not 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as `python tests/soak.py`: make `tests.*` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import GENERATOR, ROOT, make_image, vmmig_command
from tests.faultproxy import FaultProxy

MiB = 1 << 20
PAGE = 4096
KINDS: tuple[str, ...] = ("none", "cut", "flip", "stall", "delay", "kill-send", "kill-recv", "cancel")
RESUMING_KINDS = ("cut", "flip", "stall", "kill-send", "kill-recv")  # a fault that fired needs a resume to heal
PROFILES: tuple[str, ...] = tuple(GENERATOR.PROFILES)
CODECS: tuple[str, ...] = ("zlib", "zstd", "none", "auto")
# Batches well below the images' 1-8 MiB (the default is 4 MiB): many frames per run, so faults land mid-stream.
BATCH_SIZES: tuple[int, ...] = (64 * 1024, 256 * 1024, 1024 * 1024)
CAP = "4M"  # bandwidth cap of the kill and cancel runs, so that they are mid-way when the fault lands
CAP_BYTES = 4_000_000
RESUME_WINDOW = 10.0  # recv --resume-window: a receiver left waiting for a sender that never comes exits by itself
SEND_TIMEOUT = 90.0  # a sender must have exited by itself within this (left behind otherwise)
RECV_GRACE = RESUME_WINDOW + 10.0  # a receiver must have exited within this after the (last) sender
STARTUP = 0.4  # about how long a vmmig process takes to start and connect: kills are drawn over it too
READY_TIMEOUT = 20.0


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
    moment: float  # 0..1: when a kill or a cancel lands, as a fraction of the expected transfer time
    delay: float  # seconds per chunk for the delay fault
    batch_size: int = 256 * 1024  # --batch-size of the sender

    def replay(self) -> str:
        return f"python tests/soak.py --seed {self.seed} --run {self.index} --only {self.kind}"


def plan(seed: int, index: int, only: str | None = None) -> RunSpec:
    """Run ``index`` of soak ``seed``. The draws happen in a fixed order whatever ``only`` forces, so forcing the
    kind keeps every other parameter of the run."""
    rng = random.Random(f"vmmig-soak:{seed}:{index}")
    kind = rng.choice(KINDS)
    size = rng.randint(MiB // PAGE, 8 * MiB // PAGE) * PAGE
    profile = rng.choice(PROFILES)
    image_seed = rng.randrange(1, 2**31)
    codec = rng.choice(CODECS)
    at = rng.randrange(size)
    moment = rng.random()
    delay = rng.uniform(0.005, 0.02)
    batch_size = rng.choice(BATCH_SIZES)  # drawn last: the draws before it are those of older soaks
    if only is not None:
        kind = only
    return RunSpec(seed, index, kind, size, profile, image_seed, codec, at, moment, delay, batch_size)


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


# --- one run -------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    index: int
    kind: str
    fired: bool
    expected: str  # "verified" or "cancelled"
    outcome: str  # "verified", "cancelled" or "unexpected"
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

    @property
    def failed(self) -> bool:
        return self.outcome != self.expected or self.corrupt or self.left_behind > 0

    def line(self) -> str:
        spec = self.spec
        verdict = "ok" if not self.failed else "FAIL"
        text = (
            f"run {self.index:4d}  {self.kind:9s} fired={'yes' if self.fired else 'no ':3s} "
            f"{spec['profile']:6s} {spec['size'] / MiB:4.2f}MiB {spec['codec']:4s}  -> {self.outcome:10s} "
            f"resumes={self.resumes} {self.seconds:6.2f}s  {verdict}"
        )
        if self.failed:
            text += f"  [{self.detail}]  replay: {self.replay}"
        return text


class Run:
    def __init__(self, spec: RunSpec, directory: Path) -> None:
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

    # The run itself: start, inject, heal. Waiting for the processes and judging them come after (run_one).

    def execute(self) -> None:
        spec = self.spec
        make_image(self.image, spec.size, profile=spec.profile, seed=spec.image_seed)
        self.est = wire_estimate(self.image, spec.codec, spec.batch_size) / CAP_BYTES
        self.recv_args = ("--json", "--io-timeout", "1s", "--resume-window", f"{RESUME_WINDOW:g}s")
        self.receiver = self.launcher.recv("recv", self.dest, *self.recv_args)
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
            ctl = self.launcher.start("ctl", "ctl", str(self.control), "cancel")
            code = self.launcher.wait(ctl, 20)
            self.fired = code == 0
            if not self.fired:
                self.notes.append(f"ctl cancel exit {code}: {last_line(ctl.stderr())}")
        self.launcher.wait(sender, SEND_TIMEOUT)

    # -- the verdict --------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()

    def verdict(self, error: str) -> tuple[str, bool, str]:
        """(outcome, corrupt, detail) once every process is gone."""
        corrupt = False
        problems: list[str] = []
        if error:
            problems.append(error)
        source = self.image.read_bytes() if self.image.exists() else b""
        if self.dest.exists():
            corrupt = self.dest.read_bytes() != source
            if corrupt:
                problems.append("CORRUPT: DEST differs from the source")
        leftovers = [p.name for p in (self.partial, self.partial_state, self.send_state) if p.exists()]
        sender, receiver = self.sender, self.receiver
        send_code = sender.code if sender is not None else None
        recv_code = receiver.code if receiver is not None and not receiver.killed else None
        outcome = "unexpected"
        if not problems:
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


def run_one(spec: RunSpec, workdir: Path, keep: bool = False) -> RunResult:
    """One migration with its fault, then the invariants. Never raises for what the processes did."""
    directory = workdir / f"run-{spec.index:04d}-{spec.kind}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    run = Run(spec, directory)
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
        run.close()
    seconds = time.monotonic() - began
    outcome, corrupt, detail = run.verdict(error)
    fired_cancel = spec.kind == "cancel" and run.fired
    left = sum(p.left_behind for p in run.launcher.started)
    if left:
        names = ", ".join(p.role for p in run.launcher.started if p.left_behind)
        detail = f"LEFT BEHIND: {names}" + (f"; {detail}" if detail else "")
    final = run.sender.report() if run.sender is not None else {}
    result = RunResult(
        index=spec.index,
        kind=spec.kind,
        fired=run.fired,
        expected="cancelled" if fired_cancel else "verified",
        outcome=outcome,
        seconds=round(seconds, 3),
        resumes=int(final.get("resumes", 0) or 0),
        needs_resume=run.needs_resume,
        corrupt=corrupt,
        left_behind=left,
        detail=detail,
        replay=spec.replay(),
        spec=asdict(spec),
        exits=[(p.role, p.code) for p in run.launcher.started],
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
    resumes: int = 0  # sum of `resumes` of the final senders' reports
    resumes_needed: int = 0  # runs whose fault fired and needed a resume
    corrupt: int = 0  # corrupt images published
    left_behind: int = 0  # processes that did not exit by themselves
    unexpected: int = 0  # runs that did not end as their kind expects
    seconds: float = 0.0
    results: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.corrupt == 0 and self.left_behind == 0 and self.unexpected == 0

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
        self.resumes += result.resumes
        self.resumes_needed += result.needs_resume
        self.corrupt += result.corrupt
        self.left_behind += result.left_behind
        self.unexpected += result.outcome != result.expected
        self.seconds += result.seconds

    def text(self) -> str:
        kinds = "  ".join(f"{k}={self.faults[k]}(fired {self.fired[k]})" for k in KINDS if k in self.faults)
        lines = [
            f"soak summary (seed {self.seed}): {self.runs} runs in {self.seconds:.0f}s",
            f"  faults by kind:            {kinds}",
            f"  verified completions:      {self.verified} of {self.expected_verified} expected",
            f"  cancelled as expected:     {self.cancelled}",
            f"  resumes:                   {self.resumes} (fired faults needing one: {self.resumes_needed})",
            f"  corrupt images published:  {self.corrupt}",
            f"  processes left behind:     {self.left_behind}",
            f"  unexpected outcomes:       {self.unexpected}",
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
) -> Summary:
    """``runs`` runs of soak ``seed`` under ``workdir``: runs 0..runs-1, or exactly ``indices``, or exactly the
    (index, kind) ``picks``. ``only`` forces one fault kind on every run."""
    summary = Summary(seed)
    chosen: list[tuple[int, str | None]] = [(i, only) for i in (indices or range(runs))]
    if picks is not None:
        chosen = list(picks)
    for index, kind in chosen:
        result = run_one(plan(seed, index, kind), workdir, keep=keep)
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
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**32)
    count = len(args.run) if args.run else args.runs
    print(f"soak seed {seed}: {count} runs (replay: python tests/soak.py --seed {seed} --runs {args.runs})", flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmmig-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary = soak(args.runs, seed, workdir, only=args.only, indices=args.run, keep=args.keep)
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
