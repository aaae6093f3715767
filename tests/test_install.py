"""vmmig as users get it: a wheel built from this tree, installed into a fresh venv outside the checkout.

Every other test runs from the editable install, which hides a package the wheel leaves out (a release once shipped
without ``migrate_cli.cli`` and died with ModuleNotFoundError). Here the installed ``vmmig`` command migrates a
16 MiB image over 127.0.0.1, from a working directory that is not the checkout.
"""

from __future__ import annotations

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from migrate_cli import PROTOCOL_VERSION, __version__

from .conftest import ROOT, make_image


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ directory of a fresh venv holding only the wheel built from this tree (and its dependencies)."""
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True, cwd=work, timeout=600,
    )  # fmt: skip
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (wheel,) = wheels.glob("vmmig-*.whl")
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True, cwd=work, timeout=900,
    )  # fmt: skip
    return venv / "bin"


def test_the_wheel_holds_every_package_of_the_tree(installed: Path) -> None:
    (wheel,) = (installed.parent.parent / "wheels").glob("vmmig-*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith("/__init__.py")}
    in_tree = {str(p.relative_to(ROOT)) for p in (ROOT / "migrate_cli").rglob("__init__.py")}
    assert in_tree and in_tree <= in_wheel, f"left out of the wheel: {sorted(in_tree - in_wheel)}"


def test_the_installed_command_reports_its_version(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(installed / "vmmig"), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert __version__ in out.stdout and f"protocol {PROTOCOL_VERSION}" in out.stdout


def test_the_installed_command_migrates_16_mib_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20)
    dest, ready = tmp_path / "dest.ram", tmp_path / "ready"
    vmmig = str(installed / "vmmig")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    recv = subprocess.Popen(
        [vmmig, "recv", "--listen", "127.0.0.1:0", "--ready-file", str(ready), str(dest)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert recv.poll() is None and time.monotonic() < deadline, recv.stderr.read() if recv.stderr else ""
            time.sleep(0.05)
        send = subprocess.run(
            [vmmig, "send", str(image), ready.read_text().strip()],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        _, recv_err = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait(5)
    assert (send.returncode, recv.returncode) == (0, 0), send.stderr + recv_err
    assert dest.read_bytes() == image.read_bytes()
