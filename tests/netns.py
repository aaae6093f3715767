"""Two network namespaces joined by a veth pair, for end-to-end tests over a real (virtual) link.

Needs root and a working `ip netns`. Everything created here is removed by `close()`: the processes started in the
namespaces are killed by PID first, then both namespaces are deleted, which destroys the veth pair with them. The
names carry this process's PID, so a later run can tell (and delete) namespaces left behind by a run that was killed.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .conftest import ROOT, Proc, await_ready, vmmig_command

PREFIX = "vmmigt"
_counter = itertools.count()
_STALE = re.compile(rf"^{PREFIX}(\d+)x\d+[ab]$")


class NetnsUnavailable(Exception):
    """The machine cannot host the namespaces (not root, no `ip`, `ip netns` refused); the reason is the message."""


def ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they (probably) can."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        return f"`ip netns` is unavailable: {result.stderr.strip()}"
    return None


def remove_stale_namespaces() -> None:
    """Delete our namespaces whose creating process is gone (a test run killed before its teardown)."""
    listing = ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _STALE.match(name)
        if match and int(match.group(1)) != os.getpid() and not Path(f"/proc/{match.group(1)}").exists():
            ip("netns", "delete", name, check=False)


class NetnsPair:
    """Namespace `a` (address `addr_a` on `veth_a`) and namespace `b` (`addr_b` on `veth_b`), one /24 between them."""

    veth_a = "vmig0"
    veth_b = "vmig1"

    def __init__(self, tmp: Path) -> None:
        number = next(_counter)
        self.tmp = tmp
        self.a = f"{PREFIX}{os.getpid()}x{number}a"
        self.b = f"{PREFIX}{os.getpid()}x{number}b"
        # The namespaces have their own routing tables, so the subnet cannot clash with the host's; vary it anyway.
        subnet = f"10.231.{(os.getpid() + number) % 250 + 1}"
        self.addr_a, self.addr_b = f"{subnet}.1", f"{subnet}.2"
        self.created: list[str] = []
        self.started: list[subprocess.Popen[str]] = []

    # -- set up and tear down --------------------------------------------------------------------------------------

    def open(self) -> NetnsPair:
        """Create both namespaces and the link; on any failure remove what was made, then raise NetnsUnavailable."""
        try:
            for name in (self.a, self.b):
                ip("netns", "add", name)
                self.created.append(name)
            # Created inside `a` with its peer placed straight into `b`: the names never exist in the host namespace.
            ip("-n", self.a, "link", "add", "name", self.veth_a, "type", "veth", "peer", "name", self.veth_b,
               "netns", self.b)  # fmt: skip
            ip("-n", self.a, "addr", "add", f"{self.addr_a}/24", "dev", self.veth_a)
            ip("-n", self.b, "addr", "add", f"{self.addr_b}/24", "dev", self.veth_b)
            for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b)):
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", dev, "up")
            self.wait_reachable()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self.close()
            raise NetnsUnavailable(f"cannot set up two namespaces joined by a veth pair: {exc}") from exc
        return self

    def wait_reachable(self, timeout: float = 10) -> None:
        """Wait until both ends have carrier and usable IPv4 addresses (IPv6 DAD is not waited for: unused)."""
        deadline = time.monotonic() + timeout
        while True:
            ready = all(
                "LOWER_UP" in ip("-n", ns, "link", "show", "dev", dev).stdout
                and "tentative" not in ip("-n", ns, "-4", "addr", "show", "dev", dev).stdout
                for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b))
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the veth pair did not come up within {timeout}s")
            time.sleep(0.05)

    def close(self) -> None:
        """Kill every process started here (by PID), then delete the namespaces, which removes the veth pair."""
        for popen in self.started:
            if popen.poll() is None:
                os.kill(popen.pid, signal.SIGKILL)
            try:
                popen.communicate(timeout=5)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        errors: list[str] = []
        for name in reversed(self.created):
            result = ip("netns", "delete", name, check=False)
            if result.returncode != 0:
                errors.append(f"{name}: {result.stderr.strip()}")
        self.created.clear()
        if errors:
            raise RuntimeError(f"could not delete network namespaces: {'; '.join(errors)}")

    def ns(self, side: str) -> str:
        return self.a if side == "a" else self.b

    # -- the link --------------------------------------------------------------------------------------------------

    def set_link(self, side: str, up: bool) -> None:
        """`ip link set <veth> up|down` in namespace `side` ('a' or 'b')."""
        ns, dev = (self.a, self.veth_a) if side == "a" else (self.b, self.veth_b)
        ip("-n", ns, "link", "set", dev, "up" if up else "down")

    def add_netem(self, *params: str) -> None:
        """Add a netem root qdisc with `params` on both veth ends; raise NetnsUnavailable naming why it cannot."""
        if shutil.which("tc") is None:
            raise NetnsUnavailable("`tc` (iproute2) is not installed")
        for ns, dev in ((self.a, self.veth_a), (self.b, self.veth_b)):
            argv = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", *params]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            if result.returncode != 0:
                raise NetnsUnavailable(
                    f"`tc qdisc add dev {dev} root netem {' '.join(params)}` failed (exit {result.returncode}): "
                    f"{result.stderr.strip()} (kernel without the netem qdisc, CONFIG_NET_SCH_NETEM?)"
                )

    # -- vmmig processes -------------------------------------------------------------------------------------------

    def start(self, side: str, *args: str) -> Proc:
        """Run `vmmig ARGS` in namespace `side`. `ip netns exec` execs the command, so the PID is vmmig's own."""
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(side), *vmmig_command(*args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.started.append(popen)
        return Proc(popen)

    def recv(self, side: str, dest: Path, *args: str) -> Proc:
        """`vmmig recv --insecure` on this side's address, port 0; returns once it listens (address in .address)."""
        address = self.addr_a if side == "a" else self.addr_b
        ready = self.tmp / f"ready-{len(self.started)}"
        proc = self.start(
            side, "recv", "--listen", f"{address}:0", "--insecure", "--ready-file", str(ready), *args, str(dest)
        )
        return await_ready(proc, ready, f"recv in {self.ns(side)}")

    def send(self, side: str, source: Path, address: str, *args: str) -> Proc:
        return self.start(side, "send", str(source), address, *args)
