#!/usr/bin/env python3
"""libvirt on a host without a service manager, and the example domains: for the recipe in README.md and the
end-to-end test (tests/test_e2e_libvirt.py). Import it, or run it:

    libvirt_host.py daemons                     # start virtlogd + libvirtd in the foreground until Ctrl-C
    libvirt_host.py xml source NAME WORKDIR     # print source.xml filled in (kernel/initrd copied to WORKDIR)

``start_daemons()`` starts ``virtlogd`` and ``libvirtd`` as child processes (by PID, never daemonized) only when no
libvirtd answers on ``qemu:///system``; ``stop_daemons`` ends exactly those.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_BUILD = Path(os.environ.get("VMMIG_GUEST_DIR", HERE.parent / "qemu" / "build"))
URI = "qemu:///system"


def missing() -> str | None:
    """Why libvirt cannot run here, or None."""
    tools = (("virsh", "libvirt-clients"), ("libvirtd", "libvirt-daemon-system"),
             ("virtlogd", "libvirt-daemon-system"), ("qemu-system-x86_64", "qemu-system-x86"))  # fmt: skip
    for tool, package in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (apt-get install {package})"
    if os.geteuid() != 0:
        return "libvirt's system daemon needs root"
    for name in ("vmlinuz", "initrd.gz"):
        if not (GUEST_BUILD / name).is_file():
            return f"{GUEST_BUILD / name} is missing: run examples/qemu/build_guest.sh"
    return None


def answers(uri: str = URI) -> bool:
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        done = subprocess.run(["virsh", "-c", uri, "uri"], capture_output=True, text=True, timeout=10)
        return done.returncode == 0
    return False


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def start_daemons(timeout: float = 30) -> list[subprocess.Popen[bytes]]:
    """virtlogd and libvirtd as our children when no libvirtd answers; [] when one does."""
    if answers():
        return []
    started = []
    try:
        for name in ("virtlogd", "libvirtd"):
            started.append(subprocess.Popen([_tool(name)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True))  # fmt: skip
        deadline = time.monotonic() + timeout
        while not answers():
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise RuntimeError("libvirtd did not come up (is another one holding /run/libvirt?)")
            time.sleep(0.2)
    except BaseException:
        stop_daemons(started)
        raise
    return started


def stop_daemons(started: list[subprocess.Popen[bytes]]) -> None:
    for popen in reversed(started):  # libvirtd first, then virtlogd
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def domain_xml(role: str, name: str, workdir: Path, write_mb: int = 4) -> str:
    """source.xml or destination.xml filled in. The kernel and initrd are copied into ``workdir``, which must be
    reachable by the user libvirt runs QEMU as (mode 0755 up the path: not a pytest tmp_path)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for file in ("vmlinuz", "initrd.gz"):
        if not (workdir / file).exists():
            shutil.copy(GUEST_BUILD / file, workdir / file)
    template = (HERE / ("source.xml" if role == "source" else "destination.xml")).read_text()
    values = {"@NAME@": name, "@KERNEL@": str(workdir / "vmlinuz"), "@INITRD@": str(workdir / "initrd.gz"),
              "@SERIAL_LOG@": str(workdir / f"{name}.serial.log"), "@WRITE_MB@": str(write_mb)}  # fmt: skip
    for key, value in values.items():
        template = template.replace(key, value)
    return template


def virsh(*args: str, check: bool = True) -> str:
    done = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode:
        raise RuntimeError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def main(argv: list[str]) -> int:
    if argv[:1] == ["daemons"]:
        started = start_daemons()
        print("libvirtd answers" + (f" (started pids {[p.pid for p in started]})" if started else " (already running)"))
        if started:
            with contextlib.suppress(KeyboardInterrupt):
                started[-1].wait()
            stop_daemons(started)
        return 0
    if len(argv) == 4 and argv[0] == "xml":
        print(domain_xml(argv[1], argv[2], Path(argv[3])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
