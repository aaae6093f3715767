"""A guest libvirt runs moves with `libvirt:` on both ends, and libvirt's view of it stays true.

Two TCG domains of the examples/qemu guest on one libvirtd (started here, by PID, when none answers): the source
defined persistent and running, the destination transient and paused with -incoming defer (examples/libvirt/).
Skipped with the reason when libvirt, QEMU or the built guest is missing (.ci/run installs and builds them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import ROOT, Processes


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


host = load("libvirt_host", ROOT / "examples" / "libvirt" / "libvirt_host.py")
rg = load("run_guest", ROOT / "examples" / "qemu" / "run_guest.py")

needs_libvirt = pytest.mark.skipif(host.missing() is not None, reason=str(host.missing()))


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    started = host.start_daemons()
    yield
    host.stop_daemons(started)


@pytest.fixture
def domains(libvirtd: None) -> Iterator[tuple[str, str, Path]]:
    """A running persistent source domain and a paused transient destination (names, and their directory); both
    destroyed and undefined afterwards, the directory removed."""
    workdir = Path(tempfile.mkdtemp(prefix="vmmig-libvirt-"))
    workdir.chmod(0o755)  # QEMU runs as libvirt's user: it must reach the kernel and the serial logs
    tag = f"{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    src, dst = f"vmmig-test-src-{tag}", f"vmmig-test-dst-{tag}"
    (workdir / "src.xml").write_text(host.domain_xml("source", src, workdir, write_mb=4))
    (workdir / "dst.xml").write_text(host.domain_xml("destination", dst, workdir))
    try:
        host.virsh("define", str(workdir / "src.xml"))
        host.virsh("start", src)
        host.virsh("create", str(workdir / "dst.xml"), "--paused")
        yield src, dst, workdir
    finally:
        for name in (src, dst):
            host.virsh("destroy", name, check=False)
            host.virsh("undefine", name, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@needs_libvirt
def test_a_libvirt_guest_moves_to_another_domain_and_libvirt_shows_the_truth(
    procs: Processes, domains: tuple[str, str, Path]
) -> None:
    src, dst, workdir = domains
    source_log, dest_log = workdir / f"{src}.serial.log", workdir / f"{dst}.serial.log"
    rg.wait_for_line(source_log, r"^HEARTBEAT 3 ", timeout=120)
    recv = procs.recv(Path(f"libvirt:{dst}"), "--json")
    send = procs.start("send", "--live", f"libvirt:{src}", recv.address, "--qemu-handoff", "--json")
    code, out, err = send.wait(180)
    assert code == 0, err
    rcode, rout, rerr = recv.wait(60)
    assert rcode == 0, rerr
    assert f"libvirt:{src}" in err and "RAM is the memfd backend" in err, "the sender says which RAM it found"
    assert f"libvirt:{dst}" in rerr and "RAM is the memfd backend" in rerr
    report = json.loads(out)
    assert report["qemu-handoff"]["source-state"] == "shut off"
    assert json.loads(rout)["digest"] == report["digest"]

    assert host.virsh("domstate", src) == "shut off", "libvirt shows the source stopped: no second copy to resume"
    assert host.virsh("domstate", dst) == "running", "libvirt knows the destination runs"
    last_on_source = max(rg.heartbeats(source_log))
    rg.wait_for_line(dest_log, rf"^HEARTBEAT {last_on_source + 4} ", timeout=60)
    assert rg.heartbeats(dest_log)[0] == last_on_source + 1, "the guest continued, it did not reboot"
    checks = rg.data_checks(dest_log)
    assert checks and all(kind == "OK" for kind, _n in checks), checks


@needs_libvirt
def test_a_destination_that_is_not_waiting_for_a_migration_is_refused_and_the_source_runs_on(
    procs: Processes, domains: tuple[str, str, Path]
) -> None:
    src, dst, workdir = domains
    rg.wait_for_line(workdir / f"{src}.serial.log", r"^HEARTBEAT 2 ", timeout=120)
    # a running domain as the destination: not inmigrate, so refused before a byte of its RAM is written
    recv = procs.recv(Path(f"libvirt:{src}"))
    code, _out, err = procs.start("send", "--live", f"libvirt:{src}", recv.address, "--qemu-handoff").wait(120)
    rcode, _rout, rerr = recv.wait(60)
    assert (code, rcode) == (8, 12), (err, rerr)  # the sender reports the receiver's reason (exit 8, peer:)
    assert "start it with -incoming defer" in rerr
    assert host.virsh("domstate", src) == "running", "the source was never paused, or was resumed"
    assert host.virsh("domstate", dst) == "paused", "the waiting destination was not touched"


def test_a_remote_libvirt_uri_is_refused_in_one_line(procs: Processes) -> None:
    code, _out, err = procs.run(
        "send", "libvirt:vm1", "127.0.0.1:9", "--libvirt-uri", "qemu+ssh://otherhost/system", timeout=30
    )
    assert code == 2
    assert err.strip().count("\n") == 0 and "remote" in err
    code, _out, err = procs.run("recv", "libvirt:vm1", "--libvirt-uri", "qemu+tcp://10.0.0.2/system", timeout=30)
    assert code == 2
    assert err.strip().count("\n") == 0 and "remote" in err


@needs_libvirt
def test_auto_converge_through_libvirt_lowers_the_vcpu_quota_and_puts_the_old_one_back(
    domains: tuple[str, str, Path],
) -> None:
    from migrate_cli.guest.libvirt import LibvirtDomain, LibvirtQuotaThrottle

    src, _dst, _workdir = domains

    def quota() -> str:
        pairs = (line.split(":", 1) for line in host.virsh("schedinfo", src).splitlines() if ":" in line)
        return {key.strip(): value.strip() for key, value in pairs}["vcpu_quota"]

    before = quota()
    domain = LibvirtDomain(src, host.URI)
    try:
        throttle = LibvirtQuotaThrottle(domain)
        assert throttle.step_up() == 20
        assert quota() == "80000", "20% of each 100 ms vCPU period taken away"
        assert throttle.step_up() == 30
        assert quota() == "70000"
        throttle.release()
        assert quota() == before
        throttle.release()  # idempotent
        assert quota() == before
    finally:
        domain.close()
