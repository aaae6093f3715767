#!/usr/bin/env python3
"""Migrating over ssh: `vmmig send IMAGE 'exec:ssh HOST vmmig recv --stdio DEST'` against `zstd -1 -T2 | ssh`.

A private sshd on 127.0.0.1 (host and user keys generated in the work directory, `/usr/sbin/sshd -D -f CONFIG -p
PORT`, killed by its PID at the end) is the destination host. On the same image, in interleaved rounds:

* ``vmmig zstd`` / ``vmmig zlib`` / ``vmmig auto``: ``vmmig send IMAGE 'exec:ssh -F CFG vmmighost "cd TREE &&
  python -m migrate_cli recv --stdio DEST"' --compress CODEC --level 1 --compress-threads 2``;
* ``zstd|ssh``: ``zstd -1 -T2 -c IMAGE | ssh -F CFG vmmighost 'zstd -d -o DEST'``;
* ``cat|ssh``: ``cat IMAGE | ssh -F CFG vmmighost 'cat > DEST'`` (the cost of ssh alone).

Every case uses ssh's default cipher and no ssh compression. Each run is verified: exit 0 and DEST equal to IMAGE
byte for byte. Columns: wall time (start of the local command to its exit; ssh exits after the remote command),
image MB/s by wall clock, ``IP MB`` (growth of IpExt OutOctets: ssh's framing included, alike for every case), local
CPU (the local command and its children, from wait4 rusage: vmmig send + ssh, or bash + zstd + ssh) and remote CPU
(the sshd's per-connection processes and everything under them: the growth of the sshd listener's own and reaped
children's CPU once the connection is gone), and ``x zstd|ssh`` (MB/s over the zstd|ssh baseline's). Medians of
``--repeat`` (default 3). Images: the generated 'mixed' image (examples/make_guest_image.py, seed 1) and, with
``--guest-size``, a real guest's RAM from benchmarks/guest_ram.py (cached in ~/.cache/vmmig; booted once if not).

    python benchmarks/bench_ssh.py [--size 1GiB] [--repeat 3] [--quick] [--guest-size 1GiB] [--json PATH]

Exit status 1 only if a run failed (or sshd / zstd are missing); the ratios are reported, not judged.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import harness
from harness import CLK_TCK, MB, BenchError, Child, fmt, fmt_size, log

SSHD = "/usr/sbin/sshd"
CASE_TIMEOUT = 300.0
IDLE_TIMEOUT = 10.0  # seconds for sshd to reap a finished connection
VMMIG_CODECS = {"vmmig zstd": "zstd", "vmmig zlib": "zlib", "vmmig auto": "auto"}
BASELINE, PLAIN = "zstd|ssh", "cat|ssh"
CASES = (*VMMIG_CODECS, BASELINE, PLAIN)
COMPARE_CHUNK = 16 << 20


# ----------------------------------------------------------------------------------------------------------------
# A private sshd on 127.0.0.1


class Sshd:
    """sshd -D on 127.0.0.1 accepting a key generated here for the current user; ``ssh -F self.client vmmighost``."""

    def __init__(self, workdir: Path) -> None:
        if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
            raise BenchError(f"{SSHD} (Debian openssh-server) or the ssh client is not installed")
        keys = workdir / "ssh"
        keys.mkdir(mode=0o700)
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
        (keys / "authorized_keys").write_text((keys / "user_key.pub").read_text())
        os.chmod(keys / "authorized_keys", 0o600)
        self.port = harness.free_port()
        config = keys / "sshd_config"
        config.write_text(
            f"HostKey {keys / 'host_key'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile none\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation directory
        self.log = keys / "sshd.log"
        with self.log.open("w") as log_file:
            self.daemon = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config), "-p", str(self.port), "-o", "ListenAddress=127.0.0.1"],
                stdin=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
            )
        self.client = keys / "ssh_config"
        self.client.write_text(
            f"Host vmmighost\n  HostName 127.0.0.1\n  Port {self.port}\n  IdentityFile {keys / 'user_key'}\n"
            f"  User {pwd.getpwuid(os.getuid()).pw_name}\n  BatchMode yes\n  StrictHostKeyChecking no\n"
            f"  UserKnownHostsFile {keys / 'known_hosts'}\n  Compression no\n  LogLevel ERROR\n"
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while self.daemon.poll() is None and time.monotonic() < deadline:
            probe = subprocess.run(self.ssh("true"), capture_output=True, timeout=30)
            if probe.returncode == 0:
                self.wait_idle()
                return
            time.sleep(0.2)
        raise BenchError(f"sshd did not accept the generated key: {self.log.read_text().strip()[-300:]}")

    def ssh(self, remote: str) -> list[str]:
        return ["ssh", "-F", str(self.client), "vmmighost", remote]

    def cipher(self) -> str:
        """The cipher ssh negotiates with this sshd (ssh -v names it)."""
        out = subprocess.run([*self.ssh("true")[:-2], "-v", "vmmighost", "true"], capture_output=True, text=True)
        for line in out.stderr.splitlines():
            if "cipher:" in line and "server->client" in line:
                return line.split("cipher:", 1)[1].split()[0]
        return "unknown"

    def cpu_s(self) -> float:
        """The listener's CPU plus its reaped children's (utime, stime, cutime, cstime of /proc/PID/stat)."""
        with open(f"/proc/{self.daemon.pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / CLK_TCK

    def children(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == self.daemon.pid:
                    found.append(int(entry))
        return found

    def wait_idle(self) -> None:
        """Until every connection's process has exited and been reaped (its CPU is then in cutime/cstime)."""
        deadline = time.monotonic() + IDLE_TIMEOUT
        while self.children():
            if time.monotonic() > deadline:
                raise BenchError(f"sshd still has connections {self.children()} {IDLE_TIMEOUT:.0f}s after a case")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.daemon.poll() is None:
            for pid in self.children():  # leftover connections of a failed case
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.kill(self.daemon.pid, signal.SIGTERM)
        try:
            self.daemon.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.daemon.pid, signal.SIGKILL)
            self.daemon.wait(10)


# ----------------------------------------------------------------------------------------------------------------
# One run


@dataclass
class Run:
    wall_s: float
    image_bytes: int
    ip_bytes: int
    local_cpu_s: float
    remote_cpu_s: float
    other_cpu_s: float

    @property
    def mbps(self) -> float:
        return self.image_bytes / MB / self.wall_s


def ensure_zstd() -> None:
    if shutil.which("zstd") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        log("zstd is missing: apt-get install zstd")
        subprocess.run(["apt-get", "install", "-y", "-q", "zstd"], capture_output=True, timeout=600)
    if shutil.which("zstd") is None:
        raise BenchError("zstd is not installed (the zstd|ssh baseline needs it on both ends)")


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while chunk := fa.read(COMPARE_CHUNK):
            if chunk != fb.read(COMPARE_CHUNK):
                return False
    return True


def case_argv(case: str, image: Path, dest: Path, sshd: Sshd) -> list[str]:
    if case in VMMIG_CODECS:
        receiver = shlex.join(harness.vmmig("recv", "--stdio", str(dest)))
        remote = f"cd {shlex.quote(str(harness.tree()))} && {receiver}"
        command = shlex.join(sshd.ssh(remote))
        return harness.vmmig("send", str(image), f"exec:{command}", "--compress", VMMIG_CODECS[case], "--level", "1",
                             "--compress-threads", "2", "--json", "--quiet")  # fmt: skip
    if case == BASELINE:
        local, remote = f"zstd -1 -T2 -q -c {shlex.quote(str(image))}", f"zstd -d -q -o {shlex.quote(str(dest))}"
    else:
        local, remote = f"cat {shlex.quote(str(image))}", f"cat > {shlex.quote(str(dest))}"
    return ["bash", "-o", "pipefail", "-c", f"{local} | {shlex.join(sshd.ssh(remote))}"]


def run_once(case: str, image: Path, workdir: Path, sshd: Sshd) -> Run:
    dest = workdir / "dest.img"
    harness.remove(dest)
    child: Child | None = None
    try:
        sshd.wait_idle()
        remote0, before, ip0 = sshd.cpu_s(), harness.cpu_clock(), harness.ip_out_octets()
        started = time.perf_counter()
        child = Child(case_argv(case, image, dest, sshd), workdir, case.replace(" ", "-").replace("|", "-"))
        harness.wait_all([child], started + CASE_TIMEOUT, case)
        assert child.ended is not None and child.cpu_s is not None
        ip_bytes = harness.ip_out_octets() - ip0
        sshd.wait_idle()
        remote = sshd.cpu_s() - remote0
        others = harness.other_cpu(before, child.cpu_s + remote)
        if case in VMMIG_CODECS and child.report(case).get("status") != "completed":
            raise BenchError(f"{case}: the sender's report says {child.report(case).get('status')}")
        if not dest.exists() or not same_bytes(dest, image):
            raise BenchError(f"{case}: DEST differs from the image: {child.stderr_tail()}")
        return Run(child.ended - started, image.stat().st_size, ip_bytes, child.cpu_s, remote, others)
    finally:
        harness.kill_all([child])
        harness.remove(dest)


# ----------------------------------------------------------------------------------------------------------------
# Images, rounds, output


def prepare_images(args: argparse.Namespace, workdir: Path, size: int) -> list[tuple[str, Path]]:
    images = [("generated", workdir / "generated.ram")]
    harness.make_image(harness.load_generator(), images[0][1], size, allocate=True)
    if args.guest_size:
        import guest_ram  # numpy and zlib-ng: only when a guest image is wanted

        guest_size = harness.load_generator().parse_size(args.guest_size)
        cached = guest_ram.ensure(guest_size, workdir)
        path = workdir / "guest.ram"
        shutil.copyfile(cached.path, path)
        images.append((f"guest ({cached.describe()})", path))
    return images


def measure(images: list[tuple[str, Path]], repeat: int, workdir: Path, sshd: Sshd) -> dict[str, dict[str, list[Run]]]:
    results: dict[str, dict[str, list[Run]]] = {name: {case: [] for case in CASES} for name, _ in images}
    for round_ in range(repeat):
        for name, path in images:
            for case in CASES if round_ % 2 == 0 else reversed(CASES):  # interleaved; the order flips each round
                run = run_once(case, path, workdir, sshd)
                results[name][case].append(run)
                log(f"round {round_ + 1} {name.split()[0]} {case}: {run.wall_s:.2f}s {run.mbps:.1f} MB/s "
                    f"local {run.local_cpu_s:.2f}s remote {run.remote_cpu_s:.2f}s CPU")  # fmt: skip
    return results


def med(runs: list[Run], attribute: str) -> float | None:
    return harness.median_of(runs, lambda run: getattr(run, attribute))


def print_results(name: str, size: int, runs: dict[str, list[Run]], repeat: int) -> None:
    print(f"\n{name}: {fmt_size(size)}, medians of {repeat} interleaved rounds")
    base = med(runs[BASELINE], "mbps")
    rows = []
    for case in CASES:
        mbps = med(runs[case], "mbps")
        ratio = None if mbps is None or not base else mbps / base
        ip = med(runs[case], "ip_bytes")
        rows.append([case, fmt(med(runs[case], "wall_s"), ".2f"), fmt(mbps), fmt(None if ip is None else ip / MB),
                     fmt(med(runs[case], "local_cpu_s"), ".2f"), fmt(med(runs[case], "remote_cpu_s"), ".2f"),
                     fmt(ratio, ".2f"), fmt(med(runs[case], "other_cpu_s"), ".2f")])  # fmt: skip
    harness.print_table(
        [("case", 10), ("wall s", 6), ("MB/s", 6), ("IP MB", 7), ("local CPU s", 11), ("remote CPU s", 12),
         ("x zstd|ssh", 10), ("other CPU s", 11)], rows)  # fmt: skip
    warning = harness.busy_warning([(case, med(runs[case], "other_cpu_s"), med(runs[case], "wall_s") or 0)
                                    for case in CASES])  # fmt: skip
    if warning:
        print(warning)


def main() -> int:
    parser = harness.arg_parser(__doc__, "1GiB", "256 MiB generated image (rounds as --repeat)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--guest-size", metavar="SIZE", help="also a real guest's RAM of SIZE (benchmarks/guest_ram.py)"
    )
    args = parser.parse_args()
    return harness.run_main(lambda work: benchmark(args, work), "vmmig-bench-ssh-", args.tree)


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    ensure_zstd()
    size = harness.load_generator().parse_size("256MiB" if args.quick else args.size)
    images = prepare_images(args, workdir, size)
    sshd = Sshd(workdir)
    try:
        cipher = sshd.cipher()
        log(f"sshd on 127.0.0.1:{sshd.port} (pid {sshd.daemon.pid}), cipher {cipher}")
        results = measure(images, args.repeat, workdir, sshd)
    finally:
        sshd.stop()
    info = harness.machine_info()
    print(f"vmmig over ssh against zstd -1 -T2 | ssh ({info['cpu-model']}, {harness.CPUS} usable CPUs, "
          f"load {' '.join(info['load-average'])}; ssh cipher {cipher}, both ends on this machine)")  # fmt: skip
    for name, path in images:
        print_results(name, path.stat().st_size, results[name], args.repeat)
    if args.json_path:
        harness.write_json(args.json_path, {"machine": info, "cipher": cipher, "results": {
            name: {case: [asdict(run) for run in runs] for case, runs in cases.items()}
            for name, cases in results.items()}})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
